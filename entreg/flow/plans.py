"""Rollout plans: which steps of a flow model's sampling grid are stochastic, and E-GRPO's entropy-merged steps.

A plan is a sequence of :class:`Segment`, one per model evaluation, covering the grid ``t_0 = 1 > t_1 > ...
> t_T = 0`` without gaps: an ODE segment is one Euler step (over one interval, or several for a coarser
continuation: :func:`coarsened`); an SDE segment is one Euler-Maruyama step of
:mod:`entreg.flow.sde` that may span several grid intervals (a *merged* step: the drift evaluated once at
its start, the step length the whole span). The variants of group-relative policy optimisation of flow
models differ only in their plans:

* Flow-GRPO (arXiv 2505.05470): every step SDE (:func:`flow_grpo_plan`);
* MixGRPO (arXiv 2507.21802): an SDE window that slides towards the data over training, ODE elsewhere
  (:func:`mixgrpo_plan`, :func:`mixgrpo_window_start`);
* G2RPO (arXiv 2510.01982): one single-interval SDE step per branch off a deterministic anchor
  trajectory (:func:`branch_plan`; :func:`egrpo_plans` with ``tau=0``);
* E-GRPO (arXiv 2601.00423, reference code shengjun-zhang/VisualGRPO @ ae619bf): like G2RPO, but
  consecutive low-entropy intervals are merged into one SDE step until its entropy reaches ``tau``
  (:func:`egrpo_merges`, :func:`egrpo_plans`).

**How tau is normalised.** A step from ``t_m`` over ``l`` intervals has per-dimension differential entropy
``h = log(2 pi e sigma_{t_m}^2 (t_m - t_{m+l})) / 2`` nats (:func:`entreg.flow.sde.step_entropy`); ``tau`` is a
threshold on ``exp(h) = sqrt(2 pi e) sigma_{t_m} sqrt(t_m - t_{m+l})``, i.e. ``sqrt(2 pi e)`` (4.13) times the
step's noise std, independent of the data's dimension. E-GRPO's paper setting ``tau = 2.2`` with 16 steps,
shift 3 and noise level 0.7 gives the merges (start, length) (0, 1), (1, 1), (2, 2), (4, 2), (6, 3) over its
8 trained steps (the released script hard-codes (0, 1), (1, 1), (2, 2), (4, 3), which this rule gives with 7
active steps for tau in (2.2408, 2.8240], the exp(h) of the steps (4, 2) and (4, 3) (tested); it never computes an
entropy). After a merged step the ODE continues
from the grid level the step reached (the reference code restarts one level after the merge's start,
re-integrating part of the span; we do not).

Example:
    >>> grid = [1.0, 0.75, 0.5, 0.25, 0.0]
    >>> [(s.start, s.length, s.kind) for s in branch_plan(4, start=1, length=2).segments]
    [(0, 1, 'ode'), (1, 2, 'sde'), (3, 1, 'ode')]
    >>> egrpo_merges(grid, noise_level=0.7, tau=0.0, active_steps=2)  # tau = 0: G2RPO, no merging
    [(0, 1), (1, 1)]
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from entreg.flow.sde import sde_sigma, step_entropy

__all__ = [
    "RolloutPlan",
    "Segment",
    "branch_plan",
    "coarsened",
    "egrpo_merges",
    "egrpo_plans",
    "flow_grpo_plan",
    "mixgrpo_plan",
    "mixgrpo_window_start",
    "ode_plan",
    "step_entropies",
]


@dataclass(frozen=True)
class Segment:
    """One model evaluation: a step from grid index ``start`` over ``length`` intervals, ``"ode"`` or ``"sde"``."""

    start: int
    length: int
    kind: Literal["ode", "sde"]

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass(frozen=True)
class RolloutPlan:
    """Segments covering grid indices ``0..steps`` in order; ``branch`` is the grid index of the first SDE
    segment (members of a group that share their initial noise share every state up to it)."""

    segments: tuple[Segment, ...]

    def __post_init__(self) -> None:
        position = 0
        for segment in self.segments:
            if segment.kind not in ("ode", "sde"):
                raise ValueError(f"a segment's kind must be 'ode' or 'sde', got {segment.kind!r}")
            if segment.start != position or segment.length < 1:
                raise ValueError(f"segments must cover the grid in order without gaps, got {self.segments}")
            position = segment.end
        if not self.segments:
            raise ValueError("a plan needs at least one segment")

    @property
    def steps(self) -> int:
        """Grid intervals covered (T)."""
        return self.segments[-1].end

    @property
    def sde_segments(self) -> tuple[Segment, ...]:
        return tuple(s for s in self.segments if s.kind == "sde")

    @property
    def branch(self) -> int:
        sde = self.sde_segments
        return sde[0].start if sde else self.steps

    @property
    def nfe(self) -> int:
        """Model evaluations of one rollout from the start (one per segment)."""
        return len(self.segments)


def _check_steps(steps: int) -> None:
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")


def _plan(steps: int, sde: Sequence[tuple[int, int]]) -> RolloutPlan:
    """ODE steps everywhere except the (start, length) SDE segments."""
    _check_steps(steps)
    starts = dict(sde)
    segments, i = [], 0
    while i < steps:
        length = starts.get(i)
        segments.append(Segment(i, length, "sde") if length else Segment(i, 1, "ode"))
        i += length or 1
    plan = RolloutPlan(tuple(segments))
    if plan.steps != steps or len(plan.sde_segments) != len(starts):
        raise ValueError(f"SDE segments {list(sde)} do not fit a grid of {steps} steps")
    return plan


def ode_plan(steps: int) -> RolloutPlan:
    """Every step deterministic (the ODE's Euler steps)."""
    return _plan(steps, [])


def flow_grpo_plan(steps: int) -> RolloutPlan:
    """Flow-GRPO: every step stochastic."""
    return _plan(steps, [(i, 1) for i in range(steps)])


def mixgrpo_plan(steps: int, window_start: int, window_size: int) -> RolloutPlan:
    """MixGRPO: SDE steps ``window_start .. window_start + window_size - 1``, ODE elsewhere."""
    if window_size < 1 or not 0 <= window_start <= steps - window_size:
        raise ValueError(
            f"need 1 <= window_size and 0 <= window_start <= steps - window_size = {steps - window_size}, "
            f"got {window_start=}, {window_size=}"
        )
    return _plan(steps, [(i, 1) for i in range(window_start, window_start + window_size)])


def mixgrpo_window_start(iteration: int, shift_every: int, window_size: int, active_steps: int) -> int:
    """MixGRPO's progressive window: it starts at step 0 and moves one step towards the data every
    ``shift_every`` iterations, stopping where its end reaches ``active_steps``."""
    if shift_every < 1 or window_size < 1 or active_steps < window_size:
        raise ValueError(
            f"need shift_every >= 1 and 1 <= window_size <= active_steps, got {shift_every=}, "
            f"{window_size=}, {active_steps=}"
        )
    return min(iteration // shift_every, active_steps - window_size)


def branch_plan(steps: int, start: int, length: int = 1) -> RolloutPlan:
    """One SDE step from grid index ``start`` over ``length`` intervals, ODE before and after (G2RPO for
    ``length`` 1, an E-GRPO merged step otherwise)."""
    if not 0 <= start < steps or not 1 <= length <= steps - start:
        raise ValueError(f"need 0 <= start < steps and 1 <= length <= steps - start, got {start=}, {length=}, {steps=}")
    return _plan(steps, [(start, length)])


def _grid(grid: Sequence[float] | Tensor) -> list[float]:
    values = [float(t) for t in (grid.tolist() if isinstance(grid, Tensor) else grid)]
    if len(values) < 2 or values[0] != 1.0 or values[-1] != 0.0 or any(b >= a for a, b in itertools.pairwise(values)):
        raise ValueError(f"the grid must decrease strictly from 1 to 0, got {values}")
    return values


def step_entropies(grid: Sequence[float] | Tensor, noise_level: float, length: int = 1) -> list[float]:
    """exp(h) of the step from every grid index over ``length`` intervals (clipped at the grid's end)."""
    t = _grid(grid)
    steps = len(t) - 1
    return [
        math.exp(step_entropy(sde_sigma(t[i], noise_level, t[1]), t[i] - t[min(i + length, steps)]))
        for i in range(steps)
    ]


def egrpo_merges(
    grid: Sequence[float] | Tensor, noise_level: float, tau: float, active_steps: int | None = None
) -> list[tuple[int, int]]:
    """E-GRPO's branch points: from step 0, each merged step spans the fewest intervals whose exp(h) reaches
    ``tau`` (all that remain if none does), the next starting where it ends, while the start is below
    ``active_steps`` (default: every step). Returns (start, length) pairs."""
    t = _grid(grid)
    steps = len(t) - 1
    active = steps if active_steps is None else active_steps
    if not 1 <= active <= steps:
        raise ValueError(f"active_steps must be in [1, {steps}], got {active_steps}")
    if tau < 0:
        raise ValueError(f"tau must be >= 0, got {tau}")
    merges, start = [], 0
    while start < active:
        sigma = sde_sigma(t[start], noise_level, t[1])
        length = 1
        while start + length < steps and math.exp(step_entropy(sigma, t[start] - t[start + length])) < tau:
            length += 1
        merges.append((start, length))
        start += length
    return merges


def egrpo_plans(
    grid: Sequence[float] | Tensor, noise_level: float, tau: float, active_steps: int | None = None
) -> list[RolloutPlan]:
    """One :func:`branch_plan` per merged step of :func:`egrpo_merges`."""
    steps = len(_grid(grid)) - 1
    return [branch_plan(steps, start, length) for start, length in egrpo_merges(grid, noise_level, tau, active_steps)]


def coarsened(plan: RolloutPlan, granularity: int) -> RolloutPlan:
    """``plan`` up to the end of its first SDE segment, then Euler steps of ``granularity`` grid intervals (the
    last one shorter) to t = 0: G2RPO's coarser ODE continuation (E-GRPO's code, ``granular_list``; its first step
    after the SDE step spans one interval and it stops at the last level its stride reaches, using the predicted
    x0 there; here every step spans ``granularity`` intervals up to the grid's end).

    Example:
        >>> [(s.start, s.length, s.kind) for s in coarsened(branch_plan(8, start=1, length=2), 2).segments]
        [(0, 1, 'ode'), (1, 2, 'sde'), (3, 2, 'ode'), (5, 2, 'ode'), (7, 1, 'ode')]
    """
    if granularity < 1:
        raise ValueError(f"granularity must be >= 1, got {granularity}")
    sde = plan.sde_segments
    cut = sde[0].end if sde else 0
    head = [s for s in plan.segments if s.end <= cut]
    tail = [Segment(i, min(granularity, plan.steps - i), "ode") for i in range(cut, plan.steps, granularity)]
    return RolloutPlan(tuple(head + tail))
