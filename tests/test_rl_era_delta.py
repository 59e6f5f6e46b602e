"""ERA's compensation delta (GaussianERA delta / learn_delta): the update rule, its bounds, the entropy floor with
delta, checkpoints, and the SAC update that steps it."""

from __future__ import annotations

import math

import pytest
import torch

from entreg.distributions import HALF_LOG_2PI_E
from entreg.entropy import gaussian_entropy
from entreg.nn.era import GaussianERA
from entreg.rl.buffer import ReplayBatch
from entreg.rl.policies import GaussianActor
from entreg.rl.sac import SAC


def test_update_rule_is_projected_descent_on_delta_times_the_entropy_gap():
    era = GaussianERA(2, target_entropy=0.5, delta=0.2, learn_delta=True, delta_lr=0.1)
    assert float(era.compensation_step(torch.tensor(0.3))) == pytest.approx(0.2 - 0.1 * (0.3 - 0.5))  # below: up
    assert float(era.compensation_step(torch.tensor(0.9))) == pytest.approx(0.22 - 0.1 * 0.4)  # above: down
    assert float(era.compensation_step(torch.tensor(50.0))) == 0.0  # never below 0
    top = 2 * (0.0 + HALF_LOG_2PI_E) - 0.5  # the largest Gaussian entropy the clamps allow, less H0
    assert era.delta_max() == pytest.approx(top)
    assert float(era.compensation_step(torch.tensor(-1e4))) == pytest.approx(top)  # nor above delta_max
    with pytest.raises(RuntimeError, match="learn_delta"):
        GaussianERA(2, target_entropy=0.5, delta=0.2).compensation_step(torch.tensor(0.0))
    for kwargs in ({"delta": -0.1}, {"delta": top + 0.1}, {"delta_lr": 0.0}):
        with pytest.raises(ValueError, match="delta"):
            GaussianERA(2, target_entropy=0.5, **kwargs)


def test_the_gaussian_gets_h0_plus_delta_in_every_state_and_the_floor_holds():
    torch.manual_seed(0)
    scores = torch.randn(256, 3) * 4
    plain = GaussianERA(3, target_entropy=-1.0)
    for delta in (0.0, 0.7, 2.0):
        era = GaussianERA(3, target_entropy=-1.0, delta=delta)
        _, log_std = era(torch.zeros(256, 3), scores)
        entropy = gaussian_entropy(log_std)
        assert bool((entropy >= -1.0 - 1e-5).all())  # ERA's floor H0 holds with any delta >= 0
        torch.testing.assert_close(entropy, torch.full((256,), -1.0 + delta))  # no log-std at its floor here
    torch.testing.assert_close(plain(torch.zeros(4, 3), scores[:4])[1], GaussianERA(3, -1.0, delta=0.0)(*[
        torch.zeros(4, 3), scores[:4]])[1], rtol=0, atol=0)  # fmt: skip


def test_delta_survives_a_state_dict_and_old_state_dicts_load_with_delta_zero():
    era = GaussianERA(2, target_entropy=0.5, learn_delta=True, delta_lr=0.5)
    era.compensation_step(torch.tensor(-0.5))
    copy = GaussianERA(2, target_entropy=0.5, learn_delta=True)
    copy.load_state_dict(era.state_dict())
    assert float(copy.delta) == pytest.approx(0.5) and copy.target_entropy == 0.5
    old = GaussianERA(2, target_entropy=0.5)
    old.load_state_dict({"_extra_state": {"target_entropy": 0.25}})  # saved before delta existed
    assert float(old.delta) == 0.0 and old.target_entropy == 0.25


def test_learned_delta_brings_the_truncated_policys_entropy_to_the_target():
    """A truncated Gaussian pushed against the bound (tanh(mean) = 0.95) has less entropy than its Gaussian; the
    learned delta raises the Gaussian's target until the batch estimate -mean log pi of the bounded policy is H0."""
    torch.manual_seed(0)
    target = 2 * 0.25
    actor = GaussianActor(3, 2, hidden=(8,), squash="truncated", era=GaussianERA.per_dimension(2, 0.25))
    actor.era = GaussianERA.per_dimension(2, 0.25, learn_delta=True, delta_lr=0.05)
    with torch.no_grad():
        actor.net[-1].weight.zero_()
        actor.net[-1].bias.copy_(torch.tensor([math.atanh(0.95), -math.atanh(0.95), 0.0, 0.0]))
    obs, g = torch.randn(4096, 3), torch.Generator().manual_seed(1)
    with torch.no_grad():
        before = -float(actor.sample(obs, g)[1].mean())
        for _ in range(300):
            actor.era.compensation_step(-actor.sample(obs, g)[1].mean())
        after = -float(actor.sample(obs, g)[1].mean())
    assert before < target - 0.3  # truncation removed entropy
    assert after == pytest.approx(target, abs=0.05) and float(actor.era.delta) > 0.3


def test_sac_update_steps_delta_from_the_batchs_entropy_estimate():
    g = torch.Generator().manual_seed(0)
    batch = ReplayBatch(
        torch.randn(32, 4, generator=g),
        torch.rand(32, 2, generator=g) * 2 - 1,
        torch.randn(32, generator=g),
        torch.randn(32, 4, generator=g),
        torch.zeros(32),
    )
    era = GaussianERA.per_dimension(2, 0.25, delta=0.1, learn_delta=True, delta_lr=0.01)
    sac = SAC(4, 2, hidden=(16, 16), era=era)
    stats = sac.update(batch, *sac.optimizers(lambda p: torch.optim.Adam(p, lr=1e-3)), generator=g)
    expected = min(max(0.1 - 0.01 * (float(stats["policy_entropy"]) - 0.5), 0.0), era.delta_max())
    assert float(stats["era_delta"]) == pytest.approx(expected, abs=1e-7) == float(era.delta)
    constant = SAC(4, 2, hidden=(16, 16), era=GaussianERA.per_dimension(2, 0.25, delta=0.1))
    stats = constant.update(batch, *constant.optimizers(lambda p: torch.optim.Adam(p, lr=1e-3)), generator=g)
    assert float(stats["era_delta"]) == pytest.approx(0.1) and float(stats["gaussian_entropy"]) == pytest.approx(0.6)


def test_module_and_config_take_delta(compose_train):
    pytest.importorskip("mujoco")
    from hydra.utils import instantiate

    cfg = compose_train("model=sac_era_authors", "~backbone", "model.env_id=InvertedPendulum-v5")
    assert cfg.model.era_delta == 0.0 and cfg.model.era_learn_delta is False  # off, as released
    module = instantiate(cfg.model, era_learn_delta=True, era_delta=0.2, hidden=[8, 8], _convert_="all")
    assert module.sac.era.learn_delta and float(module.sac.era.delta) == pytest.approx(0.2)
    with pytest.raises(Exception, match="set era_entropy_per_dim"):
        instantiate(cfg.model, era_entropy_per_dim=None, era_delta=0.2, hidden=[8, 8], _convert_="all")
