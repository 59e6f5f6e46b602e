"""entreg.rl.buffer.ReplayBuffer: storage, FIFO overwrite, uniform sampling, non-finite rejection, exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from entreg.rl.buffer import ReplayBuffer


def _transition(i: int) -> tuple[np.ndarray, np.ndarray, float, np.ndarray, bool]:
    """Transition number i: every field encodes i, so a sampled row can be checked field by field."""
    return np.full(3, i), np.full(2, -i), float(i) / 10, np.full(3, i + 0.5), i % 2 == 1


def _check_rows(batch) -> np.ndarray:
    ids = batch.obs[:, 0]
    torch.testing.assert_close(batch.obs, ids[:, None].expand(-1, 3))
    torch.testing.assert_close(batch.actions, -ids[:, None].expand(-1, 2))
    torch.testing.assert_close(batch.rewards, ids / 10)
    torch.testing.assert_close(batch.next_obs, ids[:, None].expand(-1, 3) + 0.5)
    torch.testing.assert_close(batch.terminated, ids.remainder(2))
    return ids.long().numpy()


def test_fifo_overwrite_and_fields():
    buffer = ReplayBuffer(capacity=5, obs_dim=3, action_dim=2, seed=0)
    for i in range(7):
        assert buffer.add(*_transition(i))
    assert len(buffer) == 5
    ids = _check_rows(buffer.sample(200))
    assert set(ids) == {2, 3, 4, 5, 6}  # 0 and 1 were overwritten


def test_batched_add_wraps_around():
    buffer = ReplayBuffer(capacity=6, obs_dim=3, action_dim=2, seed=0)
    buffer.add(*_transition(0))
    batch = [_transition(i) for i in range(1, 9)]  # 8 rows into a buffer of 6: only the last 6 survive
    stored = buffer.add(*(np.stack(field) for field in zip(*batch, strict=True)))
    assert stored.tolist() == [True] * 8 and len(buffer) == 6
    assert set(_check_rows(buffer.sample(300))) == {3, 4, 5, 6, 7, 8}
    buffer.add(*_transition(9))  # continues FIFO from the right position
    assert set(_check_rows(buffer.sample(300))) == {4, 5, 6, 7, 8, 9}


@pytest.mark.parametrize("field", range(4))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_transitions_are_refused_and_counted(field: int, bad: float):
    buffer = ReplayBuffer(capacity=10, obs_dim=3, action_dim=2, seed=0)
    buffer.add(*_transition(1))
    fields = list(_transition(2))
    value = np.array(fields[field], dtype=np.float64)  # a copy
    value.reshape(-1)[0] = bad  # the first entry of this field
    fields[field] = float(value) if field == 2 else value
    assert buffer.add(*fields) is False
    assert buffer.rejected == 1 and len(buffer) == 1
    assert set(_check_rows(buffer.sample(50))) == {1}
    # in a batch, only the bad row is refused
    rows = [_transition(3), tuple(fields), _transition(4)]
    assert buffer.add(*(np.stack(f) for f in zip(*rows, strict=True))).tolist() == [True, False, True]
    assert buffer.rejected == 2 and set(_check_rows(buffer.sample(200))) == {1, 3, 4}


def test_sampling_is_uniform():
    buffer = ReplayBuffer(capacity=8, obs_dim=3, action_dim=2, seed=1)
    for i in range(8):
        buffer.add(*_transition(i))
    counts = np.bincount(_check_rows(buffer.sample(80_000)), minlength=8)
    chi2 = ((counts - 10_000) ** 2 / 10_000).sum()
    assert chi2 < 24.3  # 99.9% quantile of chi-square with 7 degrees of freedom


def test_state_dict_resumes_exactly():
    a = ReplayBuffer(capacity=50, obs_dim=3, action_dim=2, seed=3)
    for i in range(30):
        a.add(*_transition(i))
    a.add(*_transition(float("nan")))
    a.sample(7)
    b = ReplayBuffer(capacity=50, obs_dim=3, action_dim=2, seed=99)
    b.load_state_dict(a.state_dict())
    assert (len(b), b.rejected) == (30, 1)
    for i in range(30, 60):  # wraps around in both
        a.add(*_transition(i))
        b.add(*_transition(i))
        for x, y in zip(a.sample(16), b.sample(16), strict=True):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
    with pytest.raises(ValueError, match="capacity 50"):
        ReplayBuffer(capacity=40, obs_dim=3, action_dim=2).load_state_dict(a.state_dict())


def test_errors():
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(capacity=0, obs_dim=3, action_dim=2)
    with pytest.raises(ValueError, match="obs_dim"):
        ReplayBuffer(capacity=5, obs_dim=0, action_dim=2)
    with pytest.raises(RuntimeError, match="empty"):
        ReplayBuffer(capacity=5, obs_dim=3, action_dim=2).sample(1)
