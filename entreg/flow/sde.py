"""The reverse SDE of a rectified-flow model, its Gaussian transitions, their log-probabilities and entropies.

Convention: ``x_t = (1 - t) x_0 + t eps`` (t = 1 is noise), the model predicts the velocity ``v = eps - x_0``
and sampling runs from t = 1 down to 0. Flow-GRPO (Liu et al., arXiv 2505.05470, reference code
yifan123/flow_grpo @ ac4c86e, ``sd3_sde_with_logprob.py``) turns the ODE ``dx = v dt`` into the SDE with the
same marginals ``dx = [v + sigma_t^2 / (2 t) (x + (1 - t) v)] dt + sigma_t dw`` (the bracket adds
``-sigma_t^2 / 2`` times the score ``-(x + (1 - t) v) / t``), with ``sigma_t = a sqrt(t / (1 - t))``, ``a`` the
noise level (0.7 in Flow-GRPO and E-GRPO). One Euler-Maruyama step from ``t`` to ``t_next < t``
(``delta = t - t_next``) is the Gaussian

    x_next ~ N(mu, sigma_t^2 delta I),  mu = x - delta [v + sigma_t^2 / (2 t) (x + (1 - t) v)],

and ``a = 0`` is the ODE's Euler step ``x - delta v``. At t = 1, ``t / (1 - t)`` is infinite: as the
reference does, ``sigma_t`` then uses ``1 - t_max`` (``t_max`` the grid's second level) in its denominator
(only there; the drift keeps ``1 - t = 0``).

The log-probability of a transition is reduced over the sample's dimensions by the **mean** (the references'
choice: their PPO ratio is a per-dimension geometric mean, which is why their clip range is 1e-4) or the sum
(``reduce="sum"``; the clip range must then be far wider). The transition's entropy does not depend on the
model: per dimension ``h = log(2 pi e sigma_t^2 delta) / 2`` nats (E-GRPO, arXiv 2601.00423, eq. 11).

Step types (:data:`STEP_TYPES`, Flow-GRPO's ``sde_type``): ``"sde"`` is the step above; ``"cps"`` is
coefficients-preserving sampling (Wang and Yu, arXiv 2509.05952, as in Flow-GRPO's code): with
``x0 = x - t v`` and ``x1 = x + (1 - t) v``, ``std = t_next sin(a pi / 2)`` and
``mu = (1 - t_next) x0 + sqrt(t_next^2 - std^2) x1``; its "log-probability" is ``-(x_next - mu)^2`` reduced over
the dimensions, without the Gaussian's constants or variance (the reference's choice; a ratio of two such values
is still a ratio of Gaussian densities of equal variance, up to the scale of the exponent).

Example:
    >>> import torch
    >>> x, v = torch.zeros(4, 2), torch.ones(4, 2)
    >>> step = sde_step(x, v, t=0.5, t_next=0.25, noise_level=0.7, generator=torch.Generator().manual_seed(0))
    >>> step.sample.shape, step.log_prob.shape
    (torch.Size([4, 2]), torch.Size([4]))
    >>> torch.allclose(step.log_prob, transition_log_prob(step.sample, step.mean, step.std))
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from entreg.distributions import gaussian_entropy, gaussian_log_prob

__all__ = [
    "STEP_TYPES",
    "SDEStep",
    "StepType",
    "cps_mean_std",
    "gaussian_kl",
    "get_step_type",
    "sde_mean",
    "sde_mean_std",
    "sde_sigma",
    "sde_step",
    "step_entropy",
    "transition_log_prob",
]

REDUCTIONS = ("mean", "sum")


def _check_times(t: float, t_next: float) -> None:
    if not 0.0 < t <= 1.0 or not 0.0 <= t_next < t:
        raise ValueError(
            f"need 0 <= t_next < t <= 1 (sampling runs from noise t = 1 to data t = 0), got {t=}, {t_next=}"
        )


def _reduce(per_dim: Tensor, reduce: str) -> Tensor:
    """Per sample: the mean or the sum over the dimensions after the first."""
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    dims = tuple(range(1, per_dim.ndim))
    return per_dim.mean(dim=dims) if reduce == "mean" else per_dim.sum(dim=dims)


def sde_sigma(t: float, noise_level: float, t_max: float | None = None) -> float:
    """sigma_t = a sqrt(t / (1 - t)); at t = 1, ``1 - t_max`` replaces ``1 - t`` (``t_max`` < 1 required there)."""
    if noise_level < 0:
        raise ValueError(f"noise_level must be >= 0, got {noise_level}")
    if not 0.0 < t <= 1.0:
        raise ValueError(f"t must be in (0, 1], got {t}")
    if t == 1.0:
        if t_max is None or not 0.0 < t_max < 1.0:
            raise ValueError(f"at t = 1 sigma_t needs t_max in (0, 1) (the grid's second level), got {t_max}")
        return noise_level * math.sqrt(t / (1.0 - t_max))
    return noise_level * math.sqrt(t / (1.0 - t))


def sde_mean(x: Tensor, v: Tensor, t: float, t_next: float, sigma: float) -> Tensor:
    """mu = x - delta [v + sigma^2 / (2 t) (x + (1 - t) v)], delta = t - t_next: the Euler-Maruyama mean."""
    _check_times(t, t_next)
    delta, c = t - t_next, sigma * sigma / (2.0 * t)
    return x * (1.0 - delta * c) - v * (delta * (1.0 + c * (1.0 - t)))


def transition_log_prob(x_next: Tensor, mean: Tensor, std: float | Tensor, reduce: str = "mean") -> Tensor:
    """log N(x_next; mean, std^2 I) per sample (dims >= 1 reduced by ``reduce``: ``"mean"`` or ``"sum"``)."""
    return _reduce(gaussian_log_prob(x_next, mean, std=std, dim=None), reduce)


def step_entropy(sigma: float, delta: float) -> float:
    """Differential entropy per dimension, in nats, of a step with noise std ``sigma sqrt(delta)``:
    ``log(2 pi e sigma^2 delta) / 2``."""
    if sigma <= 0 or delta <= 0:
        raise ValueError(f"the entropy needs sigma > 0 and delta > 0, got {sigma=}, {delta=}")
    log_std = torch.tensor(math.log(sigma) + 0.5 * math.log(delta), dtype=torch.float64)
    return float(gaussian_entropy(log_std, dim=None))


def gaussian_kl(mean: Tensor, mean_ref: Tensor, std: float | Tensor, reduce: str = "mean") -> Tensor:
    """KL(N(mean, std^2 I) || N(mean_ref, std^2 I)) per sample: ``|mean - mean_ref|^2 / (2 std^2)`` per
    dimension, reduced by ``reduce``. ``std`` includes the step length (``sigma_t sqrt(delta)``); Flow-GRPO's
    code divides by ``2 sigma_t^2`` only, which is this KL times ``delta``."""
    per_dim = (mean - mean_ref) ** 2 / (2 * torch.as_tensor(std, dtype=mean.dtype, device=mean.device) ** 2)
    return _reduce(per_dim, reduce)


def sde_mean_std(
    x: Tensor, v: Tensor, t: float, t_next: float, noise_level: float, t_max: float | None = None
) -> tuple[Tensor, float]:
    """The ``"sde"`` step's mean :func:`sde_mean` and std ``sigma_t sqrt(t - t_next)``."""
    sigma = sde_sigma(t, noise_level, t_max)
    return sde_mean(x, v, t, t_next, sigma), sigma * math.sqrt(t - t_next)


def cps_mean_std(
    x: Tensor, v: Tensor, t: float, t_next: float, noise_level: float, t_max: float | None = None
) -> tuple[Tensor, float]:
    """The ``"cps"`` step's mean ``(1 - t_next) x0 + sqrt(t_next^2 - std^2) x1`` and std
    ``t_next sin(a pi / 2)`` (``x0 = x - t v``, ``x1 = x + (1 - t) v``; ``t_max`` is unused).

    Example:
        >>> mean, std = cps_mean_std(torch.zeros(1, 2), torch.ones(1, 2), t=1.0, t_next=0.5, noise_level=1.0)
        >>> mean.tolist(), std  # a = 1: all of t_next is fresh noise, the mean is (1 - t_next) x0
        ([[-0.5, -0.5]], 0.5)
    """
    _check_times(t, t_next)
    if not 0 <= noise_level <= 1:
        raise ValueError(f"the cps step needs noise_level in [0, 1] (std = t_next sin(a pi / 2)), got {noise_level}")
    std = t_next * math.sin(noise_level * math.pi / 2)
    x0, x1 = x - t * v, x + (1.0 - t) * v
    return x0 * (1.0 - t_next) + x1 * math.sqrt(max(t_next * t_next - std * std, 0.0)), std


def _cps_log_prob(x_next: Tensor, mean: Tensor, std: float | Tensor, reduce: str = "mean") -> Tensor:
    return _reduce(-((x_next - mean) ** 2), reduce)


@dataclass(frozen=True)
class StepType:
    """A stochastic step: ``mean_std(x, v, t, t_next, noise_level, t_max) -> (mean, std)`` and
    ``log_prob(x_next, mean, std, reduce) -> (B,)``."""

    mean_std: Callable[..., tuple[Tensor, float]]
    log_prob: Callable[..., Tensor]


STEP_TYPES: dict[str, StepType] = {
    "sde": StepType(sde_mean_std, transition_log_prob),
    "cps": StepType(cps_mean_std, _cps_log_prob),
}


def get_step_type(name: str) -> StepType:
    """The step type called ``name`` (``"sde"`` or ``"cps"``), or a ValueError naming them."""
    if name not in STEP_TYPES:
        raise ValueError(f"step_type must be one of {sorted(STEP_TYPES)}, got {name!r}")
    return STEP_TYPES[name]


@dataclass
class SDEStep:
    """One stochastic transition: the new ``sample``, the Gaussian's ``mean`` and ``std`` (scalar), and
    ``log_prob`` of the sample under it (per sample)."""

    sample: Tensor
    mean: Tensor
    std: float
    log_prob: Tensor


def sde_step(
    x: Tensor,
    v: Tensor,
    t: float,
    t_next: float,
    noise_level: float,
    t_max: float | None = None,
    generator: torch.Generator | None = None,
    reduce: str = "mean",
    noise: Tensor | None = None,
    step_type: str = "sde",
) -> SDEStep:
    """One stochastic step from ``t`` to ``t_next`` with velocity ``v`` at ``(x, t)``: Euler-Maruyama of the
    reverse SDE (``step_type="sde"``) or coefficients-preserving (``"cps"``); ``noise`` (standard normal, x's
    shape) overrides drawing it from ``generator``. ``noise_level`` must be > 0 (with 0 the step is the ODE's,
    ``x - (t - t_next) v``, and has no density)."""
    if noise_level <= 0:
        raise ValueError(f"an SDE step needs noise_level > 0 (0 is the deterministic ODE step), got {noise_level}")
    kind = get_step_type(step_type)
    mean, std = kind.mean_std(x, v, t, t_next, noise_level, t_max)
    if noise is None:
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    sample = mean + std * noise
    return SDEStep(sample, mean, std, kind.log_prob(sample, mean, std, reduce))
