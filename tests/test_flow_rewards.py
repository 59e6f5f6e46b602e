"""Rewards (region, classifier), reward-hacking guards (held-out classifier, PCA-Gaussian likelihood) and the
sample-diversity metrics used by GRPO fine-tuning of flow models."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from entreg.data import DigitsDataModule
from entreg.data.digits_nets import digits_classifier, digits_pca_likelihood
from entreg.data.ring import ring_centers
from entreg.flow.diversity import (
    in_target_fraction,
    mean_pairwise_distance,
    mode_entropy,
    nearest_mode,
    pixel_variance,
)
from entreg.flow.rewards import ClassifierReward, PCAGaussianLikelihood, RegionReward, held_out_accuracy


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    datamodule = DigitsDataModule(size=8, scale="minus_one_one")
    datamodule.setup("fit")
    return datamodule


@pytest.fixture(scope="module")
def classifiers() -> dict[str, nn.Module]:
    """The benchmark's pair: an MLP reward classifier and a held-out CNN of another seed."""
    return {"mlp": digits_classifier(seed=0, arch="mlp"), "cnn": digits_classifier(seed=1, arch="cnn")}


# ---------------------------------------------------------------- region reward (2-D ring)


def test_ring_centers_are_on_the_circle_at_the_stated_angles():
    centers = ring_centers(8, radius=4.0)
    assert centers.shape == (8, 2)
    torch.testing.assert_close(centers.norm(dim=1), torch.full((8,), 4.0))
    angles = torch.atan2(centers[:, 1], centers[:, 0]).remainder(2 * math.pi)
    torch.testing.assert_close(angles, 2 * math.pi * torch.arange(8) / 8, atol=1e-5, rtol=0)


def test_region_reward_is_one_at_targets_zero_elsewhere_and_the_max_over_targets():
    centers = ring_centers()
    reward = RegionReward(centers, targets=(0, 1, 2), width=0.5)
    torch.testing.assert_close(reward(centers[[0, 1, 2]], None), torch.ones(3))
    assert reward(centers[3:], None).max() < 1e-6
    points = torch.randn(64, 2, generator=torch.Generator().manual_seed(0)) * 3
    brute = torch.stack([torch.exp(-(points - centers[m]).square().sum(1) / 0.5) for m in (0, 1, 2)]).amax(0)
    torch.testing.assert_close(reward(points, None), brute)
    assert reward(points, None).max() > 0.1  # the brute force check is not 0 == 0


def test_region_reward_buffers_move_with_the_module():
    reward = RegionReward(ring_centers(), targets=(5,)).double()
    assert reward.target_centers.dtype == torch.float64
    assert "target_centers" in reward.state_dict()
    assert reward(ring_centers()[[5]].double(), None).dtype == torch.float64


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"targets": ()}, "at least one"),
        ({"targets": (0, 8)}, r"in \[0, 8\)"),
        ({"targets": (-1,)}, r"in \[0, 8\)"),
        ({"width": 0.0}, "width"),
    ],
)
def test_region_reward_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RegionReward(ring_centers(), **kwargs)


def test_region_reward_rejects_samples_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        RegionReward(ring_centers())(torch.zeros(4, 1, 8, 8), None)


# ---------------------------------------------------------------- classifier reward and held-out classifiers (digits)


def test_both_digit_classifiers_are_accurate_on_the_test_split(digits, classifiers):
    x, y = digits.test_set.tensors
    for arch, net in classifiers.items():
        accuracy = held_out_accuracy(net, x, y)
        print(f"{arch}: test accuracy {accuracy:.4f} on {len(y)} digits")
        assert accuracy >= 0.95, (arch, accuracy)
        assert not net.training and not any(p.requires_grad for p in net.parameters())
        assert net(x.flatten(1)).shape == (len(x), 10)  # (B, 64) is accepted too


def test_digit_classifiers_are_deterministic_and_seeds_differ():
    a, b, c = digits_classifier(seed=0, steps=20), digits_classifier(seed=0, steps=20), digits_classifier(1, steps=20)
    x = torch.rand(8, 1, 8, 8) * 2 - 1
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    assert not torch.allclose(a(x), c(x))


def test_classifier_reward_is_log_softmax_and_prefers_the_true_class(digits, classifiers):
    x, y = digits.test_set.tensors
    net = classifiers["mlp"]
    reward = ClassifierReward(net)
    right, wrong = reward(x, y), reward(x, (y + 1) % 10)
    torch.testing.assert_close(right, net(x).log_softmax(-1)[torch.arange(len(y)), y])
    assert right.shape == (len(y),) and (right <= 0).all()
    assert (right > wrong).float().mean() >= 0.95
    assert right.mean() > wrong.mean() + 5  # nats


def test_classifier_reward_keeps_its_classifier_frozen_in_eval_mode():
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.Dropout(0.5))
    parent = nn.ModuleDict({"reward": ClassifierReward(net)}).train()
    assert parent["reward"].training and not net.training
    x, c = torch.randn(6, 1, 8, 8), torch.arange(6)
    torch.testing.assert_close(parent["reward"](x, c), parent["reward"](x, c), rtol=0, atol=0)
    assert not any(p.requires_grad for p in net.parameters())


@pytest.mark.parametrize(
    ("cond", "match"),
    [
        (None, "needs cond"),
        (torch.zeros(4), "integer"),
        (torch.zeros(3, dtype=torch.long), r"\(4,\)"),
        (torch.tensor([0, 1, 2, 10]), "outside"),
    ],
)
def test_classifier_reward_rejects_bad_cond(cond, match):
    reward = ClassifierReward(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)))
    with pytest.raises(ValueError, match=match):
        reward(torch.zeros(4, 1, 8, 8), cond)


def test_digits_classifier_and_held_out_accuracy_reject_bad_input():
    with pytest.raises(ValueError, match="arch"):
        digits_classifier(arch="resnet")
    with pytest.raises(ValueError, match="steps"):
        digits_classifier(steps=-1)
    with pytest.raises(ValueError, match="one class per sample"):
        held_out_accuracy(nn.Flatten(), torch.zeros(4, 10), torch.zeros(3, dtype=torch.long))


# ---------------------------------------------------------------- PCA-Gaussian likelihood


def test_pca_likelihood_matches_the_full_gaussian_it_defines():
    g = torch.Generator().manual_seed(0)  # seeded: the global RNG's state depends on the tests that ran before
    data = torch.randn(300, 5, generator=g) @ torch.randn(5, 5, generator=g)
    model = PCAGaussianLikelihood(data, components=2)
    # covariance: V diag(lambda) V^T + s2 (I - V V^T)
    v = model.basis.double()
    cov = v @ torch.diag(model.variances.double()) @ v.T + model.residual_variance.double() * (torch.eye(5) - v @ v.T)
    reference = torch.distributions.MultivariateNormal(model.mean.double(), covariance_matrix=cov)
    points = data[:10]
    torch.testing.assert_close(model.log_likelihood(points, reduce="sum").double(), reference.log_prob(points.double()))
    torch.testing.assert_close(model(points), model.log_likelihood(points, reduce="sum") / 5)


def test_pca_likelihood_separates_real_digits_from_noise_and_reward_hacked_digits(digits, classifiers):
    x, y = digits.test_set.tensors
    pca = digits_pca_likelihood(components=16)
    real = pca(x)
    noise = pca(torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    # reward hacking: signed-gradient ascent on the MLP reward toward another class, kept in [-1, 1]
    reward, target, hacked = ClassifierReward(classifiers["mlp"]), (y + 1) % 10, x.clone()
    for _ in range(20):
        hacked.requires_grad_(True)
        (grad,) = torch.autograd.grad(reward(hacked, target).sum(), hacked)
        hacked = (hacked.detach() + 0.05 * grad.sign()).clamp(-1, 1)
    hacked_ll = pca(hacked)
    judge = held_out_accuracy(classifiers["cnn"], hacked, target)
    print(
        f"log-likelihood per dim: test digits {real.mean():.3f} (min {real.min():.3f}), uniform noise "
        f"{noise.mean():.3f} (max {noise.max():.3f}), reward-hacked {hacked_ll.mean():.3f}; hacked reward "
        f"{reward(hacked, target).mean():.3f} vs real {reward(x, y).mean():.3f}; held-out CNN accuracy on the "
        f"hacked targets {judge:.3f}"
    )
    assert reward(hacked, target).mean() > reward(x, y).mean()  # the hack works on the reward
    assert noise.max() < real.min()  # every noise image below every real test digit
    assert hacked_ll.mean() < real.mean() - 0.5  # nats per dimension, i.e. > 32 nats per image
    assert (hacked_ll < real.median()).float().mean() > 0.9


def test_the_digits_reward_config_reports_the_hacking_guards(digits, classifiers):
    """reward=digits_classifier's eval_metrics (what entreg-finetune and bench_grpo report): the held-out CNN's
    accuracy, the PCA-Gaussian log-likelihood per pixel and the within-class distance, equal to the functions
    they wrap; real test digits score high, uniform noise low."""
    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate

    from entreg.flow.rewards import HackingGuards

    with initialize_config_module("entreg.configs", version_base="1.3"):
        cfg = compose("finetune", overrides=["reward=digits_classifier"])
    guards = instantiate(cfg.eval_metrics, _convert_="all")
    assert isinstance(guards, HackingGuards)
    x, y = digits.test_set.tensors
    real = guards(x, y)
    assert real == {
        "held_out_accuracy": held_out_accuracy(classifiers["cnn"], x, y),
        "pca_log_likelihood": float(digits_pca_likelihood().log_likelihood(x).mean()),
        "pairwise_distance": mean_pairwise_distance(x, y),
    }
    assert real["held_out_accuracy"] > 0.9 and real["pca_log_likelihood"] > -0.5
    noise = guards(torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1, y)
    assert noise["held_out_accuracy"] < 0.3 and noise["pca_log_likelihood"] < -3
    with pytest.raises(ValueError, match="needs cond"):
        guards(x, None)


def test_pca_likelihood_rejects_bad_input():
    data = torch.randn(50, 8)
    with pytest.raises(ValueError, match="components"):
        PCAGaussianLikelihood(data, components=8)
    with pytest.raises(ValueError, match="components"):
        PCAGaussianLikelihood(data, components=0)
    with pytest.raises(ValueError, match="8 values"):
        PCAGaussianLikelihood(data, components=2)(torch.zeros(3, 9))
    with pytest.raises(ValueError, match="reduce"):
        PCAGaussianLikelihood(data, components=2).log_likelihood(data, reduce="max")


# ---------------------------------------------------------------- diversity: modes


def _around(centers: torch.Tensor, counts: list[int], seed: int = 0) -> torch.Tensor:
    """counts[k] samples within 0.25 std of mode k."""
    g = torch.Generator().manual_seed(seed)
    return torch.cat([centers[k] + 0.25 * torch.randn(n, 2, generator=g) for k, n in enumerate(counts) if n])


def test_mode_entropy_is_log_k_for_an_even_split_and_zero_for_a_collapse():
    centers = ring_centers()
    even = _around(centers, [10] * 8)
    assert mode_entropy(even, centers) == pytest.approx(math.log(8))
    assert mode_entropy(even, centers, normalize=True) == pytest.approx(1.0)
    collapsed = _around(centers, [0, 0, 40, 0, 0, 0, 0, 0])
    assert mode_entropy(collapsed, centers) == 0.0
    assert mode_entropy(collapsed, centers, targets=(0, 1, 2), normalize=True) == 0.0


def test_mode_entropy_over_targets_ignores_the_other_modes():
    centers = ring_centers()
    samples = _around(centers, [5, 5, 10, 30, 0, 0, 0, 0])  # targets 0, 1, 2 get shares 1/4, 1/4, 1/2
    expected = -(2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5))
    assert mode_entropy(samples, centers, targets=(0, 1, 2)) == pytest.approx(expected)
    assert mode_entropy(samples, centers, targets=(0, 1, 2), normalize=True) == pytest.approx(expected / math.log(3))
    assert in_target_fraction(samples, centers, (0, 1, 2)) == pytest.approx(20 / 50)
    assert math.isnan(mode_entropy(samples, centers, targets=(5, 6)))


def test_nearest_mode_matches_brute_force():
    centers = ring_centers()
    samples = torch.randn(50, 2, generator=torch.Generator().manual_seed(1)) * 4
    index, distance = nearest_mode(samples, centers)
    for i, point in enumerate(samples):
        distances = [(point - c).norm().item() for c in centers]
        assert index[i].item() == min(range(8), key=distances.__getitem__)
        assert distance[i].item() == pytest.approx(min(distances), abs=1e-5)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda s, c: mode_entropy(s, c, targets=()), "targets"),
        (lambda s, c: mode_entropy(s, c, targets=(0, 0)), "targets"),
        (lambda s, c: mode_entropy(s, c, targets=(8,)), "targets"),
        (lambda s, c: mode_entropy(s, c, targets=(1,), normalize=True), "at least 2 modes"),
        (lambda s, c: mode_entropy(s[:0], c), "non-empty"),
        (lambda s, c: mode_entropy(s.reshape(-1, 1), c), r"\(B, 2\)"),
        (lambda s, c: in_target_fraction(s, c[0], (0,)), r"\(K, D\)"),
    ],
)
def test_mode_metrics_reject_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call(torch.zeros(4, 2), ring_centers())


# ---------------------------------------------------------------- diversity: images


def test_mean_pairwise_distance_is_zero_for_identical_samples_and_matches_brute_force():
    assert mean_pairwise_distance(torch.ones(5, 1, 8, 8)) == 0.0
    g = torch.Generator().manual_seed(0)
    samples, cond = torch.randn(30, 1, 8, 8, generator=g), torch.randint(0, 4, (30,), generator=g)
    per_class = []
    for c in cond.unique():
        members = samples[cond == c].flatten(1)
        pairs = list(itertools.combinations(range(len(members)), 2))
        per_class.append(sum((members[i] - members[j]).norm().item() for i, j in pairs) / len(pairs))
    assert mean_pairwise_distance(samples, cond) == pytest.approx(sum(per_class) / len(per_class), rel=1e-6)
    flat = samples.flatten(1)
    whole = torch.stack([(flat[i] - flat[j]).norm() for i, j in itertools.combinations(range(30), 2)]).mean()
    assert mean_pairwise_distance(samples) == pytest.approx(whole.item(), rel=1e-5)


def test_pixel_variance_matches_per_class_variance_and_skips_singletons():
    g = torch.Generator().manual_seed(0)
    samples = torch.randn(9, 1, 8, 8, generator=g)
    cond = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 2])  # class 2 has one sample: no spread to measure
    expected = (samples[:3].var(0).mean() + samples[3:8].var(0).mean()) / 2
    assert pixel_variance(samples, cond) == pytest.approx(expected.item(), rel=1e-6)
    assert math.isnan(mean_pairwise_distance(samples[8:], cond[8:]))
    assert math.isnan(pixel_variance(samples[:1]))


def test_image_diversity_rejects_bad_input():
    with pytest.raises(ValueError, match="one class per sample"):
        mean_pairwise_distance(torch.zeros(4, 64), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="non-empty"):
        pixel_variance(torch.zeros(0, 64))
