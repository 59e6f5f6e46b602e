"""ReCAP (experimental): its closed-form region bounds written out by hand, checked against Monte Carlo estimates
of the region quantities they bound, and its step (selection, weights, no-step, reset) against a manual one. These
check the code against the reconstructed equations, not the equations against the paper."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from torch import nn

from entreg.tta.base import TTAMethod
from entreg.tta.come import come_entropy
from entreg.tta.recap import EXPERIMENTAL, ReCAP, pairwise_region_variance, regional_entropy, regional_instability

pytestmark = pytest.mark.filterwarnings("ignore:ReCAP is experimental")  # warned at every construction: tested below
SGD = functools.partial(torch.optim.SGD, lr=0.5)  # no momentum: one step is theta - lr * grad


class HeadNet(nn.Module):
    """conv -> GroupNorm -> spatial mean -> ``fc``: GroupNorm has no batch dependence, so the
    embeddings of a batch can be recomputed by hand."""

    def __init__(self, classes: int = 3, dim: int = 4, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(2, dim, 1)
        self.gn = nn.GroupNorm(2, dim)
        self.fc = nn.Linear(dim, classes)
        with torch.no_grad():
            self.fc.weight.mul_(4.0)
            self.gn.weight.copy_(1 + torch.rand(dim))
            self.gn.bias.copy_(torch.randn(dim))

    def embed(self, x):
        return self.gn(self.conv(x)).mean(dim=(2, 3))

    def forward(self, x):
        return self.fc(self.embed(x))


def batch(n: int = 12, seed: int = 1, side: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, side, side, generator=g).double()


def entropy(logits):
    log_p = logits.log_softmax(1)
    return -(log_p.exp() * log_p).sum(1)


def hand_distances(weight, variance):
    c = weight.shape[0]
    d = torch.zeros(c, c, dtype=weight.dtype)
    for j in range(c):
        for k in range(c):
            d[j, k] = (variance * (weight[j] - weight[k]) ** 2).sum()
    return d


def hand_re(logits, d, tau):
    """sum_k p_k log sum_j exp(l_j - l_k + tau/2 d_jk), the ISDA-style bound written directly."""
    p = logits.softmax(1)
    lse = torch.logsumexp(logits[:, None, :] - logits[:, :, None] + 0.5 * tau * d[None], dim=2)  # [n, k]
    return (p * lse).sum(1)


def hand_ri(logits, d, tau):
    p = logits.softmax(1)
    c = logits.shape[1]
    out = torch.zeros(len(logits), dtype=logits.dtype)
    for n in range(len(logits)):
        for k in range(c):
            out[n] += p[n, k] * torch.log(sum(p[n, j] * torch.exp(0.5 * tau * d[j, k]) for j in range(c)))
    return out


def manual_step(net, params, loss):
    grads = torch.autograd.grad(loss(net), params)
    return [p.detach() - 0.5 * g for p, g in zip(params, grads, strict=True)]


# --- the bounds ------------------------------------------------------------------------------


def test_bounds_match_the_formulas_written_out():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 3, generator=g, dtype=torch.float64)
    variance = torch.rand(3, generator=g, dtype=torch.float64) + 0.1
    logits = torch.randn(5, 4, generator=g, dtype=torch.float64) * 2
    d = pairwise_region_variance(weight, variance)
    torch.testing.assert_close(d, hand_distances(weight, variance))
    assert torch.equal(d, d.T) and torch.all(d.diagonal() == 0)
    for tau in (0.0, 0.7, 1.2, 3.0):
        re, ri = regional_entropy(logits, d, tau), regional_instability(logits, d, tau)
        torch.testing.assert_close(re, hand_re(logits, d, tau))
        torch.testing.assert_close(ri, hand_ri(logits, d, tau))
        torch.testing.assert_close(re - ri, entropy(logits))  # L_RE = H + L_RI
        assert torch.all(ri >= 0)
    torch.testing.assert_close(regional_entropy(logits, d, 0.0), entropy(logits))
    assert torch.all(regional_instability(logits, d, 0.0).abs() < 1e-12)
    one_hot = torch.tensor([[40.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    assert regional_instability(one_hot, d, 1.2).item() < 1e-12  # a certain prediction is stable
    with pytest.raises(ValueError, match=r"weight \(C, D\) and variance \(D,\)"):
        pairwise_region_variance(weight, variance[:2])


def test_bounds_do_not_overflow_for_large_regions():
    logits = torch.tensor([[30.0, -30.0, 0.0]])
    d = torch.tensor([[0.0, 400.0, 300.0], [400.0, 0.0, 350.0], [300.0, 350.0, 0.0]])
    re, ri = regional_entropy(logits, d, 2.0), regional_instability(logits, d, 2.0)
    assert torch.isfinite(re).all() and torch.isfinite(ri).all() and re.item() > 100


@pytest.mark.parametrize("tau", [1.2, 3.0])
def test_bounds_upper_bound_monte_carlo_estimates_of_the_region(tau):
    """Many embeddings z' ~ N(z, tau Sigma): L_RE >= mean CE(p(z), p(z')), L_RI >= mean KL(p(z) || p(z'))."""
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(5, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(5, generator=g, dtype=torch.float64)
    variance = torch.tensor([0.3, 0.8, 0.5], dtype=torch.float64)
    d = pairwise_region_variance(weight, variance)
    for z in torch.randn(4, 3, generator=g, dtype=torch.float64):
        logits = (z @ weight.T + bias)[None]
        samples = z + torch.randn(200_000, 3, generator=g, dtype=torch.float64) * (tau * variance).sqrt()
        log_q = (samples @ weight.T + bias).log_softmax(1)
        p, log_p = logits.softmax(1), logits.log_softmax(1)
        ce = -(p * log_q).sum(1)
        kl = (p * (log_p - log_q)).sum(1)
        for value, bound in ((ce, regional_entropy(logits, d, tau)), (kl, regional_instability(logits, d, tau))):
            sem = value.std() / math.sqrt(len(value))
            assert value.mean() - 4 * sem <= bound.item(), (value.mean().item(), bound.item())
        assert kl.mean() > 0.01  # the region is not degenerate: the bound is tested on something


def test_instability_matches_its_second_order_expansion_for_small_regions():
    """For tau -> 0: L_RI ~ tau tr(F Sigma) with F = W^T (diag p - p p^T) W, while the true expected KL
    ~ tau/2 tr(F Sigma) (Monte Carlo): the Jensen bound is twice the region's divergence at first order."""
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(4, 3, generator=g, dtype=torch.float64)
    variance = torch.tensor([0.5, 1.0, 0.2], dtype=torch.float64)
    z = torch.randn(3, generator=g, dtype=torch.float64)
    logits = (z @ weight.T)[None]
    p = logits.softmax(1)[0]
    fisher = weight.T @ (torch.diag(p) - torch.outer(p, p)) @ weight
    trace = (fisher.diagonal() * variance).sum()
    d = pairwise_region_variance(weight, variance)
    tau = 1e-4
    assert regional_instability(logits, d, tau).item() == pytest.approx(tau * trace.item(), rel=1e-3)
    samples = z + torch.randn(200_000, 3, generator=g, dtype=torch.float64) * (tau * variance).sqrt()
    log_q = (samples @ weight.T).log_softmax(1)
    kl = (p * (logits.log_softmax(1) - log_q)).sum(1)
    assert kl.mean().item() == pytest.approx(0.5 * tau * trace.item(), rel=0.03)


# --- the step --------------------------------------------------------------------------------


def reference_loss(net, x, variance, tau, lam, margin, e0):
    """ReCAP's per-batch loss written out: bounds, L_RE filter, exp(E0 - L_RE) weights."""
    logits = net(x)
    d = hand_distances(net.fc.weight.detach(), variance)
    re, ri = hand_re(logits, d, tau), hand_ri(logits, d, tau)
    keep = re.detach() < margin
    loss = (re + lam * ri) * torch.exp(e0 - re.detach())
    return loss[keep].mean(), int(keep.sum())


def test_step_selects_weights_and_updates_like_the_written_out_loss():
    net = HeadNet().double()
    x = batch()
    variance = torch.tensor([0.4, 0.9, 0.2, 0.6], dtype=torch.float64)
    reference = copy.deepcopy(net)
    with torch.no_grad():
        re = hand_re(reference(x), hand_distances(reference.fc.weight, variance), 1.2)
    margin = re.median().item()  # about half the batch passes
    expected_loss, expected_count = reference_loss(reference, x, variance, 1.2, 0.5, margin, 0.7)
    assert 0 < expected_count < len(x)
    params = list(reference.gn.parameters())
    expected = manual_step(reference, params, lambda m: reference_loss(m, x, variance, 1.2, 0.5, margin, 0.7)[0])

    recap = ReCAP(net, num_classes=3, head="fc", margin=margin, margin_e0=0.7, source_variance=variance, optimizer=SGD)
    assert recap.params == [net.gn.weight, net.gn.bias]
    logits, info = recap.adapt(x)
    torch.testing.assert_close(logits, reference(x).detach())  # before the update
    assert info.selected == expected_count and info.total == len(x)
    assert info.loss == pytest.approx(expected_loss.item())
    torch.testing.assert_close(list(net.gn.parameters()), expected)
    assert not torch.equal(net(x), logits)
    assert not net.fc._forward_hooks  # the hook lives only during the forward


def test_zero_region_without_weights_is_entropy_minimisation_of_the_kept_samples():
    net = HeadNet().double()
    x = batch(seed=4)
    reference = copy.deepcopy(net)
    params = list(reference.gn.parameters())
    expected = manual_step(reference, params, lambda m: entropy(m(x)).mean())
    recap = ReCAP(net, num_classes=3, head="fc", tau=0.0, lam=3.0, margin=10.0, reweight=False, optimizer=SGD)
    recap.adapt(x)
    torch.testing.assert_close(list(net.gn.parameters()), expected)


def test_no_step_when_no_sample_is_kept():
    net = HeadNet().double()
    before = copy.deepcopy(net.state_dict())
    recap = ReCAP(net, num_classes=3, head="fc", margin=1e-9)  # default SGD with momentum
    logits, info = recap.adapt(batch())
    assert info.selected == 0 and info.loss is None and info.total == 12
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert not recap.optimizer.state and all(p.grad is None for p in recap.params)
    assert logits.shape == (12, 3)


def test_reset_restores_source_weights_optimizer_and_running_variance():
    net = HeadNet().double()
    source = copy.deepcopy(net)
    recap = ReCAP(net, num_classes=3, head="fc", margin=10.0, lr=0.05)
    first, _ = recap.adapt(batch(seed=0))
    for seed in range(1, 4):
        recap.adapt(batch(seed=seed))
    assert recap.optimizer.state and recap.running is not None
    assert not torch.equal(net.gn.weight, source.gn.weight)
    recap.reset()
    for name, value in net.state_dict().items():
        assert torch.equal(value, source.state_dict()[name]), name
    assert not recap.optimizer.state and recap.running is None and recap.resets == 1
    again, _ = recap.adapt(batch(seed=0))
    assert torch.equal(again, first)
    fresh = ReCAP(copy.deepcopy(source), num_classes=3, head="fc", margin=10.0, lr=0.05)
    fresh.adapt(batch(seed=0))
    for a, b in zip(fresh.model.parameters(), net.parameters(), strict=True):
        assert torch.equal(a, b)


# --- Sigma -----------------------------------------------------------------------------------


def test_source_statistics_are_the_population_variance_of_the_head_input():
    net = HeadNet().double()
    recap = ReCAP(net, num_classes=3, head="fc")
    batches = [batch(n=5, seed=s) for s in range(3)]
    recap.set_source_statistics(batches)
    with torch.no_grad():
        z = torch.cat([net.embed(b) for b in batches])
    torch.testing.assert_close(recap.source_variance, z.var(0, unbiased=False))
    recap.adapt(batch())
    assert recap.running is None  # the source Sigma is used, not the running one
    with pytest.raises(ValueError, match="at least 2 samples"):
        recap.set_source_statistics([batch(n=1)])


def test_running_variance_is_a_moving_average_of_the_embedding_moments():
    net = HeadNet().double()
    recap = ReCAP(net, num_classes=3, head="fc", margin=10.0)
    x1, x2 = batch(seed=1), batch(seed=2)
    with torch.no_grad():
        z1 = net.embed(x1)
    recap.adapt(x1)
    mean, mean_sq = recap.running
    torch.testing.assert_close(mean_sq - mean**2, z1.var(0, unbiased=False))
    with torch.no_grad():
        z2 = net.embed(x2)  # with the weights after the first step
    recap.adapt(x2)
    torch.testing.assert_close(recap.running[0], 0.9 * z1.mean(0) + 0.1 * z2.mean(0))
    torch.testing.assert_close(recap.running[1], 0.9 * (z1**2).mean(0) + 0.1 * (z2**2).mean(0))


def test_the_loss_uses_the_running_variance_when_no_source_statistics_are_given():
    net = HeadNet().double()
    x = batch()
    with torch.no_grad():
        variance = net.embed(x).var(0, unbiased=False)
    a, b = copy.deepcopy(net), copy.deepcopy(net)
    _, info_a = ReCAP(a, num_classes=3, head="fc", margin=10.0, optimizer=SGD).adapt(x)
    _, info_b = ReCAP(b, num_classes=3, head="fc", margin=10.0, source_variance=variance, optimizer=SGD).adapt(x)
    assert info_a.loss == pytest.approx(info_b.loss)
    torch.testing.assert_close(list(a.parameters()), list(b.parameters()))


# --- the TTAMethod API, the head, the arguments ----------------------------------------------


def small_convnet(classes: int = 10) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.GroupNorm(4, 8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 16),
        nn.ReLU(),
        nn.Linear(16, classes),
    )


def test_runs_through_the_ttamethod_api_on_a_groupnorm_convnet():
    net = small_convnet()
    recap = ReCAP(net, num_classes=10, margin=math.log(10))  # head found: the last Linear with 10 outputs
    assert isinstance(recap, TTAMethod) and recap.name == "recap"
    assert recap.head_name == "7" and recap.head is net[7]
    assert recap.params == [net[1].weight, net[1].bias]
    recap.set_source_statistics([torch.randn(16, 3, 8, 8)])
    before = copy.deepcopy(net.state_dict())
    selected = 0
    for seed in range(3):
        torch.manual_seed(seed)
        logits, info = recap.adapt(torch.randn(8, 3, 8, 8))
        assert logits.shape == (8, 10) and not logits.requires_grad and info.total == 8
        assert info.loss is None or math.isfinite(info.loss)
        selected += info.selected
    assert selected > 0 and not torch.equal(net[1].weight, before["1.weight"])
    assert torch.equal(net[7].weight, before["7.weight"])  # the head is frozen
    _, info = recap.adapt(torch.randn(1, 3, 8, 8))  # batch size 1
    assert info.total == 1


def test_head_errors_are_clear():
    net = small_convnet()
    with pytest.raises(ValueError, match=r"head='1' must name the final nn.Linear layer, got GroupNorm.*\['5', '7'\]"):
        ReCAP(net, num_classes=10, head="1")
    with pytest.raises(ValueError, match="head='fc' is not a submodule"):
        ReCAP(net, num_classes=10, head="fc")
    with pytest.raises(ValueError, match="has 16 outputs, not num_classes=10"):
        ReCAP(net, num_classes=10, head="5")
    no_linear = nn.Sequential(nn.Conv2d(3, 10, 1), nn.GroupNorm(2, 10), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ValueError, match=r"needs the final nn.Linear layer \(head=...\)"):
        ReCAP(no_linear, num_classes=10)


def test_arguments_are_validated():
    with pytest.raises(ValueError, match=r"tau .* >= 0"):
        ReCAP(HeadNet(), num_classes=3, tau=-0.1)
    with pytest.raises(ValueError, match=r"lam .* >= 0"):
        ReCAP(HeadNet(), num_classes=3, lam=float("nan"))
    with pytest.raises(ValueError, match="margin and margin_e0 must be > 0"):
        ReCAP(HeadNet(), num_classes=3, margin=0.0)
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        ReCAP(HeadNet(), num_classes=3, source_variance=torch.ones(3))
    with pytest.raises(ValueError, match="finite and >= 0"):
        ReCAP(HeadNet(), num_classes=3, source_variance=-torch.ones(4))


def test_defaults_and_thresholds_scale_with_the_number_of_classes():
    recap = ReCAP(small_convnet(classes=10), num_classes=10)
    assert (recap.tau, recap.lam, recap.reweight) == (1.2, 0.5, True)
    assert (recap.margin, recap.margin_e0) == pytest.approx((0.4 * math.log(10), 0.4 * math.log(10)))
    assert ReCAP(HeadNet(), num_classes=3).margin == pytest.approx(0.4 * math.log(3))


def test_come_entropy_replaces_the_entropy_part_of_the_regional_entropy():
    net = HeadNet().double()
    recap = ReCAP(net, num_classes=3, head="fc", entropy="come")
    logits = net(batch()).detach()
    variance = torch.ones(4, dtype=torch.float64)
    re, ri = recap.region_losses(logits, variance)
    d = pairwise_region_variance(net.fc.weight.detach(), variance)
    torch.testing.assert_close(ri, regional_instability(logits, d, 1.2))
    torch.testing.assert_close(re, come_entropy(logits) + ri)


@pytest.mark.filterwarnings("default")
def test_recap_is_clearly_experimental():
    """Building it warns; it is neither a registered method (callback, CLI) nor exported by entreg.tta."""
    import entreg.tta
    from entreg.tta import METHODS

    with pytest.warns(UserWarning, match="ReCAP is experimental: its equations are reconstructed") as caught:
        ReCAP(HeadNet(), num_classes=3)
    assert [str(w.message) for w in caught] == [EXPERIMENTAL] and caught[0].filename == __file__
    assert "recap" not in METHODS and not hasattr(entreg.tta, "ReCAP")
    assert ReCAP.__module__ == "entreg.tta.recap" and entreg.tta.recap.__doc__.startswith("EXPERIMENTAL: ReCAP")
