"""Deterministic sampling of rectified-flow models: the SD3-shifted time grid and the Euler ODE solver.

Convention (all of :mod:`entreg.flow`): ``x_t = (1 - t) x_0 + t eps`` for data ``x_0`` and noise
``eps ~ N(0, I)``, t in [0, 1] with t = 1 pure noise; the network predicts the velocity ``v = eps - x_0``
(``dx_t / dt``), and sampling integrates the ODE ``dx/dt = v(x, t)`` from t = 1 down to t = 0.

References:
    - Liu, Gong and Liu, "Flow Straight and Fast: Learning to Generate and Transfer Data with Rectified
      Flow", ICLR 2023 (arXiv:2209.03003).
    - Lipman, Chen, Ben-Hamu, Nickel and Le, "Flow Matching for Generative Modeling", ICLR 2023
      (arXiv:2210.02747).
    - Esser et al., "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis" (SD3), ICML
      2024 (arXiv:2403.03206): the timestep shift ``t = s u / (1 + (s - 1) u)``.

Example:
    >>> import torch
    >>> time_grid(4, shift=3.0)
    tensor([1.0000, 0.9000, 0.7500, 0.5000, 0.0000], dtype=torch.float64)
    >>> x0 = torch.tensor([[1.0, -2.0]])
    >>> straight = lambda x, t, cond: x - x0  # the velocity of the straight line from x to x0 at t = 1
    >>> ode_sample(straight, torch.zeros(1, 2), steps=1)
    tensor([[ 1., -2.]])
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["Velocity", "ode_sample", "time_grid"]

Velocity = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]


def _check(steps: int, shift: float) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift!r}")


def time_grid(steps: int, shift: float = 1.0) -> Tensor:
    """The ``steps + 1`` times (float64, from 1 down to 0) of a ``steps``-step sampler: the uniform grid
    ``u_k = 1 - k / steps`` mapped by SD3's shift ``t = s u / (1 + (s - 1) u)``.

    ``shift`` > 1 spends more steps near the noise (t = 1), < 1 near the data; 1 is the uniform grid.

    Equals the ``sigmas`` of diffusers' ``FlowMatchEulerDiscreteScheduler(shift=s)`` (with
    ``use_dynamic_shifting=False`` and no Karras/exponential/beta sigmas, the defaults) after
    ``set_timesteps(sigmas=[1 - k / steps for k in range(steps)])``: the scheduler shifts the given values and
    appends the final 0. (Its default ``set_timesteps(steps)`` grid differs: it ends at ``1 / 1000`` before the
    appended 0.) Tested to float32 rounding.

    Example:
        >>> time_grid(2)
        tensor([1.0000, 0.5000, 0.0000], dtype=torch.float64)
    """
    _check(steps, shift)
    u = 1.0 - torch.arange(steps + 1, dtype=torch.float64) / steps
    return shift * u / (1.0 + (shift - 1.0) * u)


def ode_sample(velocity: Velocity, noise: Tensor, steps: int, shift: float = 1.0, cond: Tensor | None = None) -> Tensor:
    """Integrate ``dx/dt = velocity(x, t, cond)`` from ``x = noise`` at t = 1 to t = 0 with ``steps`` Euler steps
    on :func:`time_grid` ``(steps, shift)``: ``x_{i+1} = x_i + (t_{i+1} - t_i) v(x_i, t_i)``.

    Args:
        velocity: ``velocity(x, t, cond) -> v`` of ``x``'s shape, with ``t`` a (B,) tensor in [0, 1] of ``x``'s
            dtype and device (e.g. :meth:`entreg.modules.flow.FlowMatchingModule.velocity`).
        noise: the starting points at t = 1, (B, ...).
        steps: Euler steps (model evaluations), >= 1.
        shift: SD3 time shift, > 0.
        cond: passed to ``velocity`` unchanged (class labels, or None).

    Returns the samples at t = 0, of ``noise``'s shape and dtype. Gradients flow if the caller enables them.
    """
    _check(steps, shift)
    grid = time_grid(steps, shift).tolist()
    x = noise
    for t, t_next in itertools.pairwise(grid):
        x = x + (t_next - t) * velocity(x, torch.full((len(x),), t, dtype=x.dtype, device=x.device), cond)
    return x
