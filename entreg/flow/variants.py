"""The GRPO variants for flow models as a registry of specs: what each one rolls out in an iteration.

A variant is a :class:`GRPOVariant`: a function from the run's settings, the iteration and the time grid to
that iteration's rollout plans (:mod:`entreg.flow.plans`), whether its rollouts branch off a deterministic
anchor trajectory or run from noise, and whether a group's members share their starting noise. Adding a
variant is one :func:`register_variant` call; :class:`entreg.modules.grpo.GRPOModule` reads only the spec.

- ``flow_grpo`` (Flow-GRPO): every step stochastic, independent noise per member.
- ``mixgrpo`` (MixGRPO): SDE steps in a window that slides towards the data every ``shift_every`` iterations;
  a group shares its noise, so its members share their states up to the window.
- ``g2rpo`` (G2RPO): one SDE step per branch point off the anchor.
- ``egrpo`` (E-GRPO): as G2RPO, low-entropy steps merged until exp(h) per dimension reaches ``tau``.

Example:
    >>> from types import SimpleNamespace
    >>> settings = SimpleNamespace(steps=4, active_steps=2, noise_level=0.7, tau=0.0, shift_every=1, window_size=1)
    >>> [plan.branch for plan in GRPO_VARIANTS["g2rpo"].plans(settings, 0, [1.0, 0.75, 0.5, 0.25, 0.0])]
    [0, 1]
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from entreg.flow.plans import RolloutPlan, egrpo_plans, flow_grpo_plan, mixgrpo_plan, mixgrpo_window_start

__all__ = ["GRPO_VARIANTS", "GRPOVariant", "get_variant", "register_variant"]

PlanFn = Callable[[Any, int, Sequence[float]], list[RolloutPlan]]
T = TypeVar("T")


@dataclass(frozen=True)
class GRPOVariant:
    """A GRPO variant.

    Args:
        plans: ``(settings, iteration, grid) -> plans`` of one iteration; ``settings`` has the module's
            hyperparameters as attributes (``steps``, ``active_steps``, ``noise_level``, ``tau``, ...).
        branched: rollouts start at each plan's branch point of a deterministic anchor trajectory (one group
            per prompt and plan); otherwise they run from noise, one plan per iteration.
        shared_noise: a group's members start from the same noise (only where ``branched`` is False).
        check: optional validation of the settings at construction; raises ValueError.
    """

    plans: PlanFn
    branched: bool
    shared_noise: bool = False
    check: Callable[[Any], None] | None = None


GRPO_VARIANTS: dict[str, GRPOVariant] = {}


def register(registry: dict[str, T], name: str, item: T, what: str) -> T:
    """Add ``item`` to ``registry`` under ``name`` (a name can be registered once; ``what`` names the kind)."""
    if name in registry:
        raise ValueError(f"a {what} named {name!r} is registered already")
    registry[name] = item
    return item


def register_variant(name: str, variant: GRPOVariant) -> GRPOVariant:
    """Add ``variant`` under ``name`` (a name can be registered once)."""
    return register(GRPO_VARIANTS, name, variant, "GRPO variant")


def get_variant(name: str) -> GRPOVariant:
    """The variant called ``name``, or a ValueError listing the registered ones."""
    if name not in GRPO_VARIANTS:
        close = difflib.get_close_matches(name, GRPO_VARIANTS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"variant must be one of {sorted(GRPO_VARIANTS)}, got {name!r}{hint}")
    return GRPO_VARIANTS[name]


def _check_window(settings: Any) -> None:
    if not 1 <= settings.window_size <= settings.active_steps:
        raise ValueError(
            f"window_size must be in [1, active_steps={settings.active_steps}], got {settings.window_size}"
        )


def _mixgrpo_plans(settings: Any, iteration: int, grid: Sequence[float]) -> list[RolloutPlan]:
    start = mixgrpo_window_start(iteration, settings.shift_every, settings.window_size, settings.active_steps)
    return [mixgrpo_plan(settings.steps, start, settings.window_size)]


register_variant("flow_grpo", GRPOVariant(lambda s, it, grid: [flow_grpo_plan(s.steps)], branched=False))
register_variant("mixgrpo", GRPOVariant(_mixgrpo_plans, branched=False, shared_noise=True, check=_check_window))
register_variant("g2rpo", GRPOVariant(lambda s, it, grid: egrpo_plans(grid, s.noise_level, 0.0, s.active_steps), True))
register_variant(
    "egrpo", GRPOVariant(lambda s, it, grid: egrpo_plans(grid, s.noise_level, s.tau, s.active_steps), True)
)
