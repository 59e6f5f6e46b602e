"""Execute a :class:`~entreg.flow.plans.RolloutPlan` with a velocity model, recording every stochastic
transition so that its log-probability can be recomputed under updated weights (the GRPO ratio).

``velocity(x, t, cond) -> v`` is any callable with ``t`` a (B,) tensor in [0, 1] (t = 1 noise) and ``cond``
the class labels or None, e.g. ``FlowMatchingModule.velocity``.

Example:
    >>> import torch
    >>> from entreg.flow.plans import branch_plan
    >>> velocity = lambda x, t, cond: x  # any callable (x, t, cond) -> v
    >>> grid = [1.0, 0.75, 0.5, 0.25, 0.0]
    >>> out = rollout(velocity, torch.randn(3, 2), grid, branch_plan(4, start=1, length=2), noise_level=0.7)
    >>> out.nfe, [(tr.t, tr.t_next) for tr in out.transitions]
    (3, [(0.75, 0.25)])
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from entreg.flow.plans import RolloutPlan, Segment
from entreg.flow.sampling import Velocity
from entreg.flow.sde import get_step_type, sde_step

__all__ = ["Rollout", "Transition", "log_prob_under", "ode_states", "rollout", "transition_log_prob_of"]


@dataclass
class Transition:
    """One SDE segment of a rollout: the state ``x`` at ``t`` before it, the ``sample`` it drew at ``t_next``,
    the transition's ``std`` and the sampling policy's ``log_prob`` of the sample (per sample)."""

    segment: Segment
    t: float
    t_next: float
    x: Tensor
    sample: Tensor
    std: float
    log_prob: Tensor


@dataclass
class Rollout:
    """The final ``sample`` (t = 0), the stochastic ``transitions`` in order, and the model evaluations made."""

    sample: Tensor
    transitions: list[Transition]
    nfe: int


def _times(grid: Sequence[float] | Tensor) -> list[float]:
    return [float(t) for t in (grid.tolist() if isinstance(grid, Tensor) else grid)]


def _at(t: float, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)


def rollout(
    velocity: Velocity,
    x: Tensor,
    grid: Sequence[float] | Tensor,
    plan: RolloutPlan,
    noise_level: float,
    cond: Tensor | None = None,
    generator: torch.Generator | None = None,
    start: int = 0,
    reduce: str = "mean",
    noises: Iterator[Tensor] | None = None,
    step_type: str = "sde",
) -> Rollout:
    """Run ``plan`` from state ``x`` at grid index ``start`` (a segment boundary; 0: ``x`` is the noise) to
    t = 0. ODE segments take Euler steps, SDE segments Euler-Maruyama steps of :func:`entreg.flow.sde.sde_step`
    (a merged segment evaluates the velocity once, at its start), with standard normal noise from ``noises``
    (one tensor of x's shape per SDE segment) or drawn from ``generator``; ``step_type`` is a name in
    :data:`entreg.flow.sde.STEP_TYPES`. No gradients are recorded."""
    t = _times(grid)
    if len(t) != plan.steps + 1:
        raise ValueError(f"the grid has {len(t) - 1} steps but the plan covers {plan.steps}")
    segments = [s for s in plan.segments if s.start >= start]
    if not segments or segments[0].start != start:
        raise ValueError(f"start={start} is not the start of a segment of the plan")
    transitions: list[Transition] = []
    with torch.no_grad():
        for segment in segments:
            t_now, t_next = t[segment.start], t[segment.end]
            v = velocity(x, _at(t_now, x), cond)
            if segment.kind == "ode":
                x = x + (t_next - t_now) * v
                continue
            noise = None if noises is None else next(noises)
            step = sde_step(x, v, t_now, t_next, noise_level, t[1], generator, reduce, noise, step_type)
            transitions.append(Transition(segment, t_now, t_next, x, step.sample, step.std, step.log_prob))
            x = step.sample
    return Rollout(x, transitions, len(segments))


def ode_states(
    velocity: Velocity, x: Tensor, grid: Sequence[float] | Tensor, until: int, cond: Tensor | None = None
) -> list[Tensor]:
    """The deterministic (ODE, Euler) anchor states at grid indices ``0..until`` from the noise ``x``
    (``until`` model evaluations; no gradients)."""
    t = _times(grid)
    if not 0 <= until < len(t):
        raise ValueError(f"until must be in [0, {len(t) - 1}], got {until}")
    states = [x]
    with torch.no_grad():
        for i in range(until):
            states.append(states[-1] + (t[i + 1] - t[i]) * velocity(states[-1], _at(t[i], x), cond))
    return states


def log_prob_under(
    velocity: Velocity,
    transition: Transition,
    noise_level: float,
    t_max: float,
    cond: Tensor | None = None,
    reduce: str = "mean",
    step_type: str = "sde",
) -> tuple[Tensor, Tensor]:
    """(log-probability of ``transition.sample``, the transition's mean) under ``velocity`` (differentiable:
    the GRPO ratio's numerator). ``t_max`` is the grid's second level (for the t = 1 clamp)."""
    x = transition.x
    return transition_log_prob_of(velocity(x, _at(transition.t, x), cond), transition, noise_level, t_max, reduce,
                                  step_type)  # fmt: skip


def transition_log_prob_of(
    v: Tensor, transition: Transition, noise_level: float, t_max: float, reduce: str = "mean", step_type: str = "sde"
) -> tuple[Tensor, Tensor]:
    """(log-probability of ``transition.sample``, the mean) given the velocity ``v`` at ``transition.x`` (rows
    of ``v`` may be fewer: ``len(x) // len(v)`` consecutive rows share one velocity)."""
    kind = get_step_type(step_type)
    x = transition.x
    repeat = len(x) // len(v)
    mean, _ = kind.mean_std(x[::repeat], v, transition.t, transition.t_next, noise_level, t_max)
    mean = mean.repeat_interleave(repeat, 0) if repeat > 1 else mean
    return kind.log_prob(transition.sample, mean, transition.std, reduce), mean
