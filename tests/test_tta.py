"""Test-time adaptation methods: the formulas of each paper's reference code, written out in the tests."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from entreg.tta import EATA, ETA, SAR, DeYO, Tent, build_method, check_method_kwargs, fisher_information
from entreg.tta.deyo import plpd, shuffle_patches
from entreg.tta.norm import ALL_NORMS, SAR_EXCLUDE, SAR_EXCLUDE_NAMES, collect_norm_params
from entreg.tta.sar import sam_perturbation

SGD = functools.partial(torch.optim.SGD, lr=0.5)  # no momentum: one step is theta - lr * grad


class LogitNet(nn.Module):
    """logits = spatial mean of BN(x) for x of shape (N, C, H, W): with 1x1 inputs the logits are the
    batch-standardised inputs times gamma plus beta, so every quantity of a step can be written out."""

    def __init__(self, classes: int = 4, norm: str = "bn") -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(classes) if norm == "bn" else nn.GroupNorm(1, classes)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            self.bn.weight.copy_(1 + torch.rand(classes, generator=g) * 3)
            self.bn.bias.copy_(torch.randn(classes, generator=g))

    def forward(self, x):
        return self.bn(x).mean(dim=(2, 3))


def batch(n: int = 8, classes: int = 4, seed: int = 1, scale: float = 1.0, side: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, classes, side, side, generator=g) * scale).double()


def entropy(logits):
    log_p = logits.log_softmax(1)
    return -(log_p.exp() * log_p).sum(1)


def manual_step(net, params, loss):
    """theta - lr * grad of ``loss`` (a function of the network), on a copy."""
    grads = torch.autograd.grad(loss(net), params)
    return [p.detach() - 0.5 * g for p, g in zip(params, grads, strict=True)]


# --- configuration ---------------------------------------------------------------------------


def test_tent_adapts_batchnorm2d_affine_only_with_batch_statistics():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.GroupNorm(2, 4), nn.Flatten(), nn.LazyLinear(3))
    net(torch.randn(2, 3, 2, 2))
    net.eval()
    tent = Tent(copy.deepcopy(net), num_classes=3)
    assert tent.params == [tent.model[1].weight, tent.model[1].bias]
    assert [n for n, p in tent.model.named_parameters() if p.requires_grad] == ["1.weight", "1.bias"]
    bn = tent.model[1]
    assert bn.running_mean is None and not bn.track_running_stats and not tent.model.training
    x = torch.randn(6, 3, 2, 2)
    z = net[0](x)
    expected = (z - z.mean((0, 2, 3), keepdim=True)) / (z.var((0, 2, 3), unbiased=False, keepdim=True) + 1e-5).sqrt()
    torch.testing.assert_close(bn(z), expected * bn.weight[:, None, None] + bn.bias[:, None, None])  # in eval()


def test_sar_excludes_the_top_of_resnets_and_vits():
    from entreg.nn.backbones import build_backbone

    resnet = build_backbone("resnet18", 10, 3, norm="group")
    params = set(collect_norm_params(resnet, ALL_NORMS, SAR_EXCLUDE))
    names = {n for n, p in resnet.named_parameters() if p in params}
    assert names and not any("layer4" in n for n in names) and any("layer3" in n for n in names)
    vit = build_backbone("vit_tiny_patch16_224", 10, 3, img_size=32, patch_size=4)
    params = set(collect_norm_params(vit, ALL_NORMS, SAR_EXCLUDE, SAR_EXCLUDE_NAMES))
    adapted = {n.rsplit(".", 1)[0] for n, p in vit.named_parameters() if p in params}
    assert "blocks.8.norm1" in adapted and "blocks.9.norm1" not in adapted and "norm" not in adapted
    assert not any(n.startswith("blocks.11") for n in adapted)


def test_no_norm_layers_is_a_clear_error_and_bad_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="BatchNorm2d layers; none found"):
        Tent(nn.Linear(3, 3), num_classes=3)
    with pytest.raises(ValueError, match=r"did you mean 'sar'"):
        build_method("sra", nn.BatchNorm2d(3), 3)
    with pytest.raises(TypeError, match="unexpected argument 'rho'"):
        check_method_kwargs("tent", {"rho": 0.1})
    with pytest.raises(ValueError, match="num_classes"):
        Tent(nn.BatchNorm2d(3), num_classes=1)


# --- Tent ------------------------------------------------------------------------------------


def test_tent_returns_pre_update_logits_and_takes_one_entropy_step():
    net = LogitNet().double()
    reference = copy.deepcopy(net)
    reference.bn.track_running_stats, reference.bn.running_mean, reference.bn.running_var = False, None, None
    params = list(reference.bn.parameters())
    x = batch()
    expected_params = manual_step(reference, params, lambda m: entropy(m(x)).mean())
    tent = Tent(net, num_classes=4, optimizer=SGD)
    logits, info = tent.adapt(x)
    torch.testing.assert_close(logits, reference(x).detach())
    torch.testing.assert_close(list(net.bn.parameters()), expected_params)
    assert info.selected == info.total == 8 and info.loss == pytest.approx(entropy(reference(x)).mean().item())


def test_reset_restores_source_weights_and_optimizer_state_exactly():
    net = LogitNet().double()
    tent = Tent(net, num_classes=4, lr=0.1)  # SGD with momentum: the optimizer has state after a step
    source = copy.deepcopy(net.state_dict())
    for seed in range(3):
        tent.adapt(batch(seed=seed))
    assert tent.optimizer.state and not torch.equal(net.bn.weight, source["bn.weight"])
    tent.reset()
    for name, value in net.state_dict().items():
        assert torch.equal(value, source[name]), name
    assert not tent.optimizer.state and tent.resets == 1


# --- EATA ------------------------------------------------------------------------------------


def eata_reference_loss(logits, e_margin, d_margin, probs_avg):
    """EATA's loss written out: entropy filter, redundancy filter, exp(E0 - H) weights."""
    h = entropy(logits)
    keep = h < e_margin
    p = logits.softmax(1)
    if probs_avg is not None:
        keep = keep & (F.cosine_similarity(probs_avg[None], p, dim=1).abs() < d_margin)
    return (h[keep] * torch.exp(e_margin - h[keep].detach())).mean(), int(keep.sum()), p[keep].detach().mean(0)


def test_eata_masks_weights_and_moving_average():
    net = LogitNet().double()
    x1, x2 = batch(seed=1), batch(seed=2)
    e_margin = float(entropy(LogitNet().double()(x1)).median())  # about half the batch is reliable
    eata = ETA(net, num_classes=4, e_margin=e_margin, d_margin=0.9, optimizer=SGD)
    reference = copy.deepcopy(net)
    params = list(reference.bn.parameters())
    # batch 1: no moving average yet, entropy filter only
    _, kept1, m1 = eata_reference_loss(reference(x1), e_margin, 0.9, None)
    expected = manual_step(reference, params, lambda m: eata_reference_loss(m(x1), e_margin, 0.9, None)[0])
    _, info = eata.adapt(x1)
    assert info.selected == kept1 and 0 < kept1 < 8
    assert torch.equal(info.mask, entropy(LogitNet().double()(x1)) < e_margin)
    torch.testing.assert_close(list(net.bn.parameters()), expected)
    torch.testing.assert_close(eata.model_probs, m1)
    # batch 2: redundancy filter against m1, then m <- 0.9 m + 0.1 mean(p kept)
    with torch.no_grad():
        for p, v in zip(params, expected, strict=True):
            p.copy_(v)
    _, kept2, mean2 = eata_reference_loss(reference(x2), e_margin, 0.9, m1)
    _, info = eata.adapt(x2)
    assert info.selected == kept2
    torch.testing.assert_close(eata.model_probs, 0.9 * m1 + 0.1 * mean2)


def test_eata_takes_no_step_when_nothing_is_kept():
    net = LogitNet().double()
    eata = ETA(net, num_classes=4, e_margin=1e-6, optimizer=SGD)
    before = copy.deepcopy(net.state_dict())
    _, info = eata.adapt(batch())
    assert info.selected == 0 and info.loss is None and eata.model_probs is None
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_fisher_information_and_penalty():
    net = LogitNet().double()
    eata = EATA(net, num_classes=4, e_margin=10.0, fisher_alpha=3.0, optimizer=SGD)
    batches = [batch(seed=s) for s in (5, 6)]
    eata.set_fishers(batches)
    params = dict(net.named_parameters())
    for name in ("bn.weight", "bn.bias"):
        grads = []
        for x in batches:
            logits = net(x)
            (g,) = torch.autograd.grad(F.cross_entropy(logits, logits.argmax(1)), params[name])
            grads.append(g**2)
        torch.testing.assert_close(eata.fishers[name][0], (grads[0] + grads[1]) / 2)
    with torch.no_grad():
        net.bn.weight.add_(0.1)
    fisher = eata.fishers["bn.weight"][0]
    torch.testing.assert_close(eata.penalty(), 3.0 * (fisher * 0.1**2).sum())
    with pytest.raises(ValueError, match="at least one batch"):
        fisher_information(net, [])


def test_eta_refuses_a_fisher_weight():
    with pytest.raises(ValueError, match="use EATA"):
        ETA(LogitNet(), num_classes=4, fisher_alpha=1.0)


# --- SAR -------------------------------------------------------------------------------------


def test_sam_perturbation_is_rho_times_the_normalised_gradient():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0, 0.0])
    e = sam_perturbation([a, b], rho=0.05)
    torch.testing.assert_close(e[0], torch.tensor([0.03, 0.0]))
    torch.testing.assert_close(e[1], torch.tensor([0.0, 0.04, 0.0]))


def test_sar_step_uses_the_gradient_at_the_perturbed_point():
    net = LogitNet(norm="gn").double()
    x = batch(scale=3.0)
    margin = float(entropy(net(x)).median()) + 1e-3
    reference = copy.deepcopy(net)
    params = list(reference.parameters())
    h = entropy(reference(x))
    keep = h < margin
    grads = torch.autograd.grad(h[keep].mean(), params)
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            p.add_(0.05 * g / (norm + 1e-12))
    h2 = entropy(reference(x))[keep]
    second = torch.autograd.grad(h2[h2 < margin].mean(), params)
    expected = [p.detach() - 0.5 * g for p, g in zip(net.parameters(), second, strict=True)]
    sar = SAR(net, num_classes=4, margin=margin, optimizer=SGD, recovery_threshold=0.0)
    _, info = sar.adapt(x)
    torch.testing.assert_close(list(net.parameters()), expected)
    assert info.selected == int((h2 < margin).sum()) and sar.ema == pytest.approx(info.loss)


def test_sar_recovery_resets_below_the_threshold_and_skips_nan():
    net = LogitNet(norm="gn").double()
    source = copy.deepcopy(net.state_dict())
    sar = SAR(net, num_classes=4, margin=1e-9, optimizer=SGD)  # nothing reliable: the loss is NaN
    sar.adapt(batch())
    assert sar.ema is None and sar.resets == 0  # NaN does not enter the moving average
    # any loss is "too low": the reference restores the weights but keeps momentum and the moving average
    sar = SAR(net, num_classes=4, margin=10.0, lr=0.1, recovery_threshold=100.0)
    _, info = sar.adapt(batch())
    assert info.reset and sar.resets == 1 and sar.ema == pytest.approx(info.loss) and sar.optimizer.state
    assert all(torch.equal(v, source[k]) for k, v in net.state_dict().items())
    _, info = sar.adapt(batch(seed=2))
    assert info.reset and sar.resets == 2  # the low average survived: the next batch resets again
    clean = SAR(net, num_classes=4, margin=10.0, lr=0.1, recovery_threshold=100.0, reference_recovery=False)
    _, info = clean.adapt(batch())
    assert info.reset and clean.ema is None and not clean.optimizer.state


# --- DeYO ------------------------------------------------------------------------------------


def test_shuffle_patches_permutes_whole_patches_with_the_global_rng():
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float64).reshape(2, 1, 8, 8)
    torch.manual_seed(3)
    y = shuffle_patches(x, 4)
    torch.manual_seed(3)
    assert torch.equal(y, shuffle_patches(x, 4))  # reproducible from the global seed

    def patches(t):
        return {
            tuple(t[i, :, r : r + 2, c : c + 2].flatten().tolist())
            for i in range(2)
            for r in range(0, 8, 2)
            for c in range(0, 8, 2)
        }

    assert patches(y) == patches(x) and not torch.equal(x, y)
    odd = torch.randn(1, 3, 10, 10)
    assert shuffle_patches(odd, 4).shape == odd.shape  # resized to 8x8 for the shuffle and back
    with pytest.raises(ValueError, match="at least 4x4 pixels"):
        shuffle_patches(torch.randn(1, 3, 2, 2), 4)


def test_plpd_sign_and_deyo_weights():
    logits = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    destroyed = torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    expected = torch.tensor([logits[0].softmax(0)[0] - 0.5, logits[1].softmax(0)[1] - destroyed[1].softmax(0)[1]])
    torch.testing.assert_close(plpd(logits, destroyed), expected)
    assert expected[0] > 0 > expected[1]  # shape-based prediction vs one that the shuffle made surer

    net = LogitNet(norm="gn").double()
    x = batch(n=16, classes=4, scale=3.0, side=4)
    deyo = DeYO(net, num_classes=4, margin=10.0, margin_e0=1.0, plpd_threshold=-1.0, optimizer=SGD)
    reference = copy.deepcopy(net)
    params = list(reference.parameters())
    torch.manual_seed(7)
    with torch.no_grad():
        d = plpd(reference(x), reference(shuffle_patches(x, 4)))

    def weighted(m):
        h = entropy(m(x))
        return (h * (torch.exp(1.0 - h.detach()) + torch.exp(d))).mean()

    expected_params = manual_step(reference, params, weighted)
    torch.manual_seed(7)
    _, info = deyo.adapt(x)
    assert info.selected == 16
    torch.testing.assert_close(list(net.parameters()), expected_params)


def test_deyo_takes_no_step_when_no_sample_passes_plpd():
    net = LogitNet(norm="gn").double()
    before = copy.deepcopy(net.state_dict())
    deyo = DeYO(net, num_classes=4, margin=10.0, plpd_threshold=0.99, optimizer=SGD)
    _, info = deyo.adapt(batch(side=4))
    assert info.selected == 0 and info.loss is None
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


@pytest.mark.parametrize("name", ["tent", "eta", "sar", "deyo", "ostta"])
def test_step_info_mask_marks_the_samples_in_the_loss(name):
    norm = "gn" if name in ("sar", "deyo") else "bn"
    x = batch(n=16, side=4)
    source = LogitNet(norm=norm).double()
    margin = float(entropy(source(x)).detach().median())  # about half the batch passes the entropy filters
    kwargs = {"tent": {}, "ostta": {}, "eta": {"e_margin": margin, "d_margin": 1.01}}.get(name, {"margin": margin})
    if name == "deyo":  # LogitNet averages over space: shuffled patches change nothing, PLPD = 0
        kwargs["plpd_threshold"] = -0.5
    method = build_method(name, copy.deepcopy(source), 4, optimizer=SGD, **kwargs)
    for _ in range(2):  # OSTTA keeps every sample of the first batch (adapted == frozen), not of the second
        torch.manual_seed(0)
        logits, info = method.adapt(x)
    mask = info.mask
    assert mask.dtype == torch.bool and mask.shape == (16,) and int(mask.sum()) == info.selected
    if name == "tent":
        assert mask.all()
    elif name == "ostta":
        frozen_conf, frozen_label = method.frozen(x).softmax(1).max(1)
        assert torch.equal(mask, logits.softmax(1).gather(1, frozen_label[:, None]).squeeze(1) >= frozen_conf)
    else:  # a subset of the samples below the entropy margin of the pre-update logits
        assert 0 < info.selected and not (mask & (entropy(logits) >= margin)).any()


def test_thresholds_scale_with_the_number_of_classes():
    assert EATA(LogitNet(), num_classes=4).e_margin == pytest.approx(0.4 * math.log(4))
    deyo = DeYO(LogitNet(norm="gn"), num_classes=4)
    assert (deyo.margin, deyo.margin_e0) == pytest.approx((0.5 * math.log(4), 0.4 * math.log(4)))
