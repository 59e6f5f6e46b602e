"""EVODiff: entropy-reducing, variance-optimised multistep sampling as a diffusers scheduler.

EVODiff (Li et al., "Beyond Predictive Accuracy: Variance-Optimised Sampling for Diffusion Models",
arXiv 2509.26096, NeurIPS 2025). Reference code: github.com/ShiguiLi/EVODiff @ 1811f9e
(``code_demo/edm_cifar10/samplers/evodiff.py``, a custom EDM sampler, not diffusers). This is our own
implementation from the method's equations, checked against the reference's outputs
(``tests/test_evodiff_parity.py``).

The sampler integrates the probability-flow ODE in data prediction, in the exact form
``x_t / sigma_t = x_s / sigma_s + int D d(1/s)`` where ``s = sigma / alpha`` is the noise level in EDM units
(diffusers' VP ``sigmas``; ``sigma / (1 - sigma)`` for flow matching), with one model evaluation per step:

* predictor: ``x^E = (sigma_t/sigma_0) x + alpha_t s_t h D_0`` (DDIM, ``h = 1/s_t - 1/s_0``) plus the second-order
  term ``alpha_t s_t h / (2 r~) (D_0 - b_1 D_1)``, where ``b_1`` balances the previous prediction by the
  least-squares coefficient ``<D_0, D_1>/<D_1, D_1>`` (per sample and channel, clipped to +-2) mixed
  with the noise ratio ``sqrt((s_t/s_0)/(s_0/s_1))`` by ``w = (1 - t~^2)/2``, ``t~`` the noise level's
  position in the grid; ``r~ = clip(sigmoid(|b_1|/4) r, r/4, 3r/2)``, ``r`` the logSNR step ratio of
  DPM-Solver++(2M) (the previous step's length in logSNR over this one's);
* corrector, applied at the start of the next :meth:`step` with the one new evaluation ``D_t`` (as
  UniPC does): ``x = x^E + alpha_t s_t h / (2 zeta) B``, ``B`` a variance-minimising interpolation of the two
  divided differences (weights through ``eta = sigmoid(|eta*|)/2``), ``zeta = sigmoid(|zeta*| - 1/2)``
  from a projection of the predictor's residual;
* a last step into the smallest positive noise level that shrinks ``x^E`` by ``1 - sqrt(s_t s_0)``
  and mixes ``D_0 - c D_1`` (``c`` from ``s_t/s_0``), then ``x = D`` if the grid ends at zero (the
  reference's ``denoise_to_zero``).

With ``balance=False, adaptive_ratio=False, corrector=False, final_step="dpmsolver"`` every step is
DPM-Solver++(2M)'s, so the scheduler reproduces :class:`~diffusers.DPMSolverMultistepScheduler`, except where
diffusers takes a first-order step into a positive last level (``final_sigmas_type="sigma_min"`` below 15 steps,
``lower_order_final``, or ``euler_at_final=True``; we keep the second-order step there).

Pipelines. :meth:`EVODiffScheduler.from_config` takes the scheduler config a diffusers pipeline ships
(:func:`evodiff_config`): DDPM-family configs (DDIM, PNDM, Euler, DPM-Solver, UniPC, ...) keep their noise schedule
and prediction type; a ``FlowMatchEulerDiscreteScheduler`` config (SD3, FLUX and other flow-matching transformers)
becomes flow prediction on flow noise (``alpha = 1 - sigma``) with that scheduler's grid: the same shift, dynamic
shifting (``mu``), ``shift_terminal`` and spacing, float timesteps ``1000 sigma``, and ``set_timesteps(sigmas=...)``
read as FlowMatchEuler reads them. Configs of other models (EDM-preconditioned, consistency-distilled, VE, discrete)
are refused with the reason. ``set_timesteps(sigmas=...)`` follows the diffusers scheduler of the same noise: VP
noise as :class:`~diffusers.EulerDiscreteScheduler` (the whole decreasing grid, its last level included: N + 1
values for N steps), flow noise as :class:`~diffusers.FlowMatchEulerDiscreteScheduler` (the N levels the model sees,
before the shift; the shift or ``mu`` applied and the final 0 appended). ``use_flow_sigmas=True`` (set by hand)
keeps DPM-Solver's own flow grid (first level ``1 - 1/1000`` before the shift) and integer timesteps.

Flow-matching grids, what we found (README: "EVODiff in text-to-image pipelines"): their first level is at or next
to ``sigma = 1`` (``alpha = 0``, logSNR -inf), so the first step is 5.4-5.9x longer in logSNR than the second
(DPM-Solver's shift-3 grid at 5-20 steps; infinitely longer on FlowMatchEuler's grid, which starts at 1). The
reference's second-order terms assume logSNR steps that do not shrink (``r <= 1`` on each of its grids): its
corrector weights the newest difference by ``r`` (``B = r (D_t - b D_0) / h``, the derivative only for ``r = 1``)
and its balance prior ``sqrt((s_t/s_0)/(s_0/s_1))`` is 7 there. The second step then overshoots (on an exact 2-D
mixture, 10 steps: 0.22 RMSE from the ODE solution after it against DPM-Solver++'s 0.0011), and a grid starting at 1
gave a division by zero. Hence ``max_step_ratio`` (below) and DDIM in the sigma-ratio form from ``alpha = 0``. The
last positive level of DPM-Solver's and FLUX's flow grids is far above the reference's 0.002 (0.14-0.44 at 5-20
steps), where its last step's shrink hurts; that of FlowMatchEuler's static-shift grid (SD3) is 0.0089 after a long
last step, where it helps: ``final_step="auto"`` (what ``from_config`` sets) chooses by the grid. With both, EVODiff
is at par with DPM-Solver++ 2M at NFE 5-8 on flow grids and worse from NFE 10 (exact mixtures, README).

Differences from the reference, all documented options:

* ``bounded_zeta=True`` (our correction, the default): for grids of more than 20 steps the reference
  switches to ``zeta = sigmoid(-(|zeta*| - 1/2) c)``, which can approach 0 and makes the corrector
  ``1/zeta`` times larger; we keep ``zeta >= sigmoid(-1/2)``, the lower bound of its own rule for 20
  steps or fewer. The reference's samples of a 2-D mixture blow up (|x| ~ 1e64) at 60 steps without
  it. ``bounded_zeta=False`` is the reference.
* ``max_step_ratio=2.0`` (our correction): a step whose previous step is more than twice as long in logSNR
  (``r > 2``; never on the reference's grids, at most 1.5 on diffusers' VP grids, 4.5-6 or infinite at the second
  step of flow grids) is DPM-Solver++(2M)'s (``b = 1``, ``r~ = r``, no corrector; DDIM where the previous level has
  ``alpha = 0``, ``r`` infinite). ``None`` is the reference.
* Noise-level constants in absolute EDM units (the final shrink ``1 - sqrt(s_t s_0)``) are kept as in
  the reference; ``w``'s endpoints are the first sampled and smallest positive noise levels (80 and
  0.002 in the reference's EDM grid).
* Only order 2 (the reference's ``order=3`` silently skips its updates).
* Inner products of 3-D samples are taken per sample and feature over the second axis: packed latents
  ``(batch, tokens, features)`` of FLUX-class pipelines (4-D and larger: per sample and channel, as the
  reference).

Example:
    >>> import torch
    >>> from diffusers import DPMSolverMultistepScheduler
    >>> config = DPMSolverMultistepScheduler(prediction_type="sample").config  # a pipeline's scheduler
    >>> scheduler = EVODiffScheduler.from_config(config)
    >>> scheduler.set_timesteps(8)
    >>> x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    >>> for t in scheduler.timesteps:  # a "model" that always predicts a clean image of zeros
    ...     x = scheduler.step(torch.zeros_like(x), t, x).prev_sample
    >>> float(x.abs().max()) < 1e-6
    True
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerOutput
from torch import Tensor

__all__ = ["EVODiffScheduler", "evodiff_config", "is_flow_matching_config"]

CLIP = 2.0  # bound of every least-squares coefficient
TEMPERATURE = 0.25  # r~ = clip(sigmoid(|b| * TEMPERATURE) * r, ...)
ZETA_SHIFT = 0.5
MANY_STEPS = 20  # above this many steps the reference changes its zeta rule
# final-step advice (measured on exact mixtures, README): the reference's last step hurts where it shrinks the sample
# by more than SHRINK_WARNING and the last step is not long; the ordinary step hurts where it is long, i.e. where the
# logSNR ratio r of the step before to the last one is below LONG_LAST_STEP (last interval > 2x the previous one)
SHRINK_WARNING = 0.1
LONG_LAST_STEP = 0.5

# scheduler classes whose configs describe a VP (DDPM-family) model: their keys are DPM-Solver's
VP_SCHEDULERS = frozenset(
    {
        "DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
        "HeunDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler",
        "DPMSolverSinglestepScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
        "DEISMultistepScheduler", "UniPCMultistepScheduler", "DPMSolverSDEScheduler", "DDIMParallelScheduler",
        "DDPMParallelScheduler", "SASolverScheduler", "EVODiffScheduler",
    }
)  # fmt: skip
# flow-matching schedulers (x_t = (1 - sigma) x_0 + sigma eps, velocity prediction) whose grid EVODiff reproduces
FLOW_MATCH_SCHEDULERS = frozenset({"FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"})
# FlowMatchEulerDiscreteScheduler's grid options, kept in EVODiff's config under the same names (``shift``: flow_shift)
FLOW_MATCH_KEYS = (
    "num_train_timesteps", "use_dynamic_shifting", "base_shift", "max_shift", "base_image_seq_len",
    "max_image_seq_len", "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
    "time_shift_type",
)  # fmt: skip
_CONSISTENCY = "a consistency-distilled model: sample it with its own few-step scheduler"
_EDM = "an EDM-preconditioned model (c_in/c_out scalings around sigma_data), not a DDPM-family or flow model"
CANNOT_SERVE = {
    "LCMScheduler": _CONSISTENCY,
    "TCDScheduler": _CONSISTENCY,
    "FlowMatchLCMScheduler": _CONSISTENCY,
    "CMStochasticIterativeScheduler": _CONSISTENCY,
    "EDMEulerScheduler": _EDM,
    "EDMDPMSolverMultistepScheduler": _EDM,
    "CosineDPMSolverMultistepScheduler": _EDM,
}


def is_flow_matching_config(config: Mapping[str, Any]) -> bool:
    """Whether a scheduler config is a flow-matching scheduler's (:data:`FLOW_MATCH_SCHEDULERS` by ``_class_name``;
    in memory, without it: a ``shift`` and no ``beta_schedule``)."""
    name = config.get("_class_name")
    return name in FLOW_MATCH_SCHEDULERS or (name is None and "shift" in config and "beta_schedule" not in config)


def evodiff_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The :class:`EVODiffScheduler` config for a pipeline's scheduler config (what ``from_config`` applies).

    DDPM-family configs (:data:`VP_SCHEDULERS`, or a config without ``_class_name``) are kept: their betas,
    prediction type and spacing are DPM-Solver's keys. Flow-matching configs (:data:`FLOW_MATCH_SCHEDULERS`: SD3,
    FLUX, ...; in memory, without ``_class_name``: a ``shift`` and no ``beta_schedule``) become flow prediction with
    ``flow_shift = shift`` and the same dynamic shifting and grid options; ``mu`` and ``sigmas`` then work as in
    ``FlowMatchEulerDiscreteScheduler.set_timesteps``. Anything else is a ValueError that says why.

    Example:
        >>> from diffusers import FlowMatchEulerDiscreteScheduler
        >>> mapped = evodiff_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config)  # SD3's scheduler
        >>> mapped["prediction_type"], mapped["flow_shift"], mapped["use_flow_sigmas"]
        ('flow_prediction', 3.0, False)
        >>> evodiff_config({"_class_name": "LCMScheduler"})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: EVODiffScheduler cannot serve ... is LCMScheduler: a consistency-distilled model: sample it with ...
    """
    config = dict(config)
    name = config.get("_class_name")
    flow_keys = is_flow_matching_config(config)
    if name == "EVODiffScheduler":
        return config
    if (name is None and not flow_keys) or name in VP_SCHEDULERS:
        # another scheduler's config: its solver keys (DEIS's algorithm, a third order) are not EVODiff's, the last
        # step is chosen by the grid
        return {"final_step": "auto", **config, "solver_order": 2, "algorithm_type": "dpmsolver++"}
    if flow_keys:
        if config.get("invert_sigmas"):
            raise ValueError(
                f"EVODiffScheduler cannot serve a {name} with invert_sigmas=True (the model's time runs from noise at "
                "sigma = 0, as in Mochi); flow matching with noise at sigma = 1 only"
            )
        mapped = {k: v for k, v in config.items() if k in FLOW_MATCH_KEYS or k.startswith("_")}
        mapped["_use_default_values"] = []  # every mapped key is passed, FlowMatchEuler's defaults included
        return {**mapped, "prediction_type": "flow_prediction", "use_flow_sigmas": False, "final_step": "auto",
                "flow_shift": float(config.get("shift", 1.0)), "final_sigmas_type": "zero"}  # fmt: skip
    reason = CANNOT_SERVE.get(name, "not a DDPM-family (VP) or flow-matching scheduler")
    raise ValueError(
        f"EVODiffScheduler cannot serve a pipeline whose scheduler is {name}: {reason}"
        + ("" if name in CANNOT_SERVE else "; for a VP or flow model, EVODiffScheduler(**keys) builds one by hand")
    )


def reduced_dims(ndim: int, per_channel: bool) -> tuple[int, ...]:
    """The dims an inner product of ``ndim``-D samples reduces: all after the first (per sample) or, ``per_channel``,
    dims >= 2 of 4-D and larger (B, C, ...) samples and the token axis of 3-D (B, tokens, features) ones."""
    if not per_channel or ndim < 3:
        return tuple(range(1, ndim))
    if ndim == 3:
        return (1,)
    return tuple(range(2, ndim))


def _rows(shape: torch.Size, per_channel: bool) -> tuple[torch.Size, int] | None:
    """(the kept leading shape, the number of reduced dims) where the reduced dims are the trailing ones, so that a
    sample of this shape is a (rows, n) matrix of the vectors an inner product takes; None for packed 3-D latents per
    channel."""
    dims = reduced_dims(len(shape), per_channel)
    if not dims or dims[-1] != len(shape) - 1:
        return None
    return shape[: dims[0]], len(dims)


def inner(a: Tensor, b: Tensor, per_channel: bool) -> Tensor:
    """<a, b> per sample or, ``per_channel``, per sample and channel (:func:`reduced_dims`), shaped to broadcast
    against ``a``. One pass over ``a`` and ``b``: a batched (1, n) by (n, 1) matrix product of their rows, instead of
    ``(a * b).sum``'s product latent and second pass (which packed 3-D latents per channel keep). It accumulates in
    the samples' dtype as the sum did (float32: relative errors ~1e-6 instead of ~1e-7, far below what the clipped
    coefficients resolve); on CUDA with ``torch.backends.cuda.matmul.allow_tf32`` set, in TF32."""
    rows = _rows(a.shape, per_channel)
    if rows is None:
        return (a * b).sum(dim=reduced_dims(a.ndim, per_channel), keepdim=True)
    keep, reduced = rows
    n = math.prod(keep)
    return torch.bmm(a.reshape(n, 1, -1), b.reshape(n, -1, 1)).view(keep + (1,) * reduced)


def squared_norm(a: Tensor, per_channel: bool) -> Tensor:
    """<a, a> (as :func:`inner`) in one pass over ``a``: the squared 2-norm."""
    return torch.linalg.vector_norm(a, dim=reduced_dims(a.ndim, per_channel), keepdim=True).square_()


def pair_gram(pair: Tensor, per_channel: bool) -> tuple[Tensor, Tensor, Tensor]:
    """<u, u>, <u, v>, <v, v> (as :func:`inner`) of the two latents ``pair = (u, v)`` stacked on a new first dim (a
    contiguous tensor), in one pass over both: per sample (and channel) the (2, n) matrix of their vectors times its
    transpose, one batched matrix product."""
    rows = _rows(pair.shape[1:], per_channel)
    if rows is None:
        u, v = pair
        return squared_norm(u, per_channel), inner(u, v, per_channel), squared_norm(v, per_channel)
    keep, reduced = rows
    stacked = pair.view(2, math.prod(keep), -1).transpose(0, 1)  # (rows, 2, n)
    uu, uv, _, vv = torch.bmm(stacked, stacked.mT).view(*keep, 4, *(1,) * reduced).unbind(len(keep))
    return uu, uv, vv


def clipped_ratio(num: Tensor, den: Tensor, bound: float = CLIP) -> Tensor:
    """num / den clipped to [-bound, bound] for inner products ``num = <a, b>``, ``den = <b, b>``: 0 where ``den`` is
    0 (then ``num`` is 0 too; the minimum-norm least-squares coefficient, where the reference divides 0 by 0,
    e.g. when two float32 evaluations are equal on a fine grid)."""
    return (num / den.clamp_min(torch.finfo(den.dtype).tiny)).clamp_(-bound, bound)


def minus_scaled(a: Tensor, b: Tensor, coef: Tensor | float, out: Tensor | None = None) -> Tensor:
    """a - coef b in one pass (``coef`` a broadcastable tensor or a number), into ``out`` if given."""
    if isinstance(coef, Tensor):
        return torch.addcmul(a, coef, b, value=-1.0, out=out)
    return torch.add(a, b, alpha=-coef, out=out)


@dataclass
class _Pending:
    """A predictor step waiting for its corrector: everything the corrector reuses (x^E in the
    scheduler's coordinates, the rest in EDM units)."""

    x_euler: Tensor  # x^E
    pair: Tensor  # (d1, f) stacked: d1 = D_0 - b_1 D_1; f, the corrector's, written there for one pair_gram
    d_prev: Tensor  # D_0 (the latest evaluation before the step)
    slope_coef: Tensor | None  # the zeta rule's slope coefficient on grids of more than MANY_STEPS steps
    r: float
    half_inv_r_tilde: Tensor  # 1 / (2 r~)
    h: float
    s_t: float
    s_prev: float
    alpha_t: float
    base: float  # sqrt((s_t/s_0) / (s_0/s_1))
    w: float


@dataclass(frozen=True)
class _Level:
    """One level of the grid in float64: alpha, sigma and the EDM noise level s = sigma / alpha (inf at alpha = 0;
    the end of a zero grid is alpha = 1, sigma = s = 0)."""

    alpha: float
    sigma: float
    s: float


def _merged_signature(own, parent) -> inspect.Signature:
    """``own``'s keyword parameters followed by every parameter of ``parent`` (for diffusers' config
    machinery, which reads the accepted keys from ``__init__``'s signature)."""
    params = [p for p in inspect.signature(own).parameters.values() if p.kind != p.VAR_KEYWORD]
    names = {p.name for p in params}
    extra = [p for name, p in inspect.signature(parent).parameters.items() if name != "self" and name not in names]
    return inspect.Signature(params + [p.replace(kind=p.KEYWORD_ONLY) for p in extra])


class EVODiffScheduler(DPMSolverMultistepScheduler):
    """EVODiff sampling, a drop-in for :class:`~diffusers.DPMSolverMultistepScheduler` (any of its config
    keys; epsilon, sample, v and flow predictions; VP and flow noise levels) and, through :meth:`from_config`, for the
    scheduler of any DDPM-family or flow-matching diffusers pipeline.

    Args:
        balance: balance the previous prediction by its least-squares coefficient (``b``); False: b = 1.
        adaptive_ratio: rescale the step ratio ``r`` by ``sigmoid(|b|/4)``; False: DPM-Solver++'s ``r``.
        corrector: apply the corrector with the next evaluation.
        final_step: ``"evodiff"`` (the reference's last step), ``"dpmsolver"`` (the same update as the
            other steps) or ``"auto"`` (the one measured better for the grid's last step, below; what
            :meth:`from_config` sets for another scheduler's config). Which is better depends on the grid's last
            step (exact mixtures, README), and a warning names the other where it was measured better:
            ``"dpmsolver"`` where the reference's factor ``1 - sqrt(s_t s_0)`` is below 0.9 and the last step is at
            most twice the previous one in logSNR (diffusers' trailing/linspace/leading spacing, a logSNR grid
            stopping at 0.3, FLUX's grid: 1.9-14x lower RMSE); ``"evodiff"`` where the last step is longer than that
            (EDM-style time-uniform or quadratic grids, ``final_sigmas_type="sigma_min"``, SD3's grid:
            ``"dpmsolver"`` extrapolates over it, 1.6-20x higher RMSE). Elsewhere (logSNR, Karras and EDM grids) they
            are within 0.5-1.9x of each other and ``"auto"`` takes ``"evodiff"``.
        bounded_zeta: keep ``zeta >= sigmoid(-1/2)`` on grids of more than 20 steps (our correction;
            False: the reference, which can diverge there).
        per_channel: least-squares coefficients per sample and channel (the reference); False: per sample.
        max_step_ratio: a step whose previous step is more than this many times longer in logSNR is
            DPM-Solver++(2M)'s (our correction for the second step of flow-matching grids); None: the reference.
        base_shift, max_shift, base_image_seq_len, max_image_seq_len, shift_terminal: flow-matching grids, as in
            :class:`~diffusers.FlowMatchEulerDiscreteScheduler` (pipelines read the first four to compute ``mu``).
        **kwargs: :class:`~diffusers.DPMSolverMultistepScheduler`'s config (betas, ``prediction_type``,
            ``timestep_spacing``, ``use_lu_lambdas``, ``final_sigmas_type``, ``flow_shift``,
            ``use_dynamic_shifting``, ...). ``use_lu_lambdas=True`` (uniform logSNR) is EVODiff's grid;
            ``solver_order`` must be 2 and ``algorithm_type`` ``dpmsolver++``. ``prediction_type="flow_prediction"``
            means flow noise; with ``use_flow_sigmas=False`` the grid is FlowMatchEulerDiscreteScheduler's.
    """

    order = 1

    def __init__(
        self,
        balance: bool = True,
        adaptive_ratio: bool = True,
        corrector: bool = True,
        final_step: str = "evodiff",
        bounded_zeta: bool = True,
        per_channel: bool = True,
        max_step_ratio: float | None = 2.0,
        base_shift: float = 0.5,
        max_shift: float = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        shift_terminal: float | None = None,
        **kwargs,
    ) -> None:
        if final_step not in ("evodiff", "dpmsolver", "auto"):
            raise ValueError(f"final_step must be 'evodiff', 'dpmsolver' or 'auto', got {final_step!r}")
        if max_step_ratio is not None and not max_step_ratio > 0:
            raise ValueError(f"max_step_ratio must be None or a number > 0, got {max_step_ratio!r}")
        if kwargs.get("solver_order", 2) != 2:
            raise ValueError(f"EVODiff is a second-order solver: solver_order must be 2, got {kwargs['solver_order']}")
        if kwargs.get("algorithm_type", "dpmsolver++") != "dpmsolver++":
            raise ValueError(
                f"EVODiff integrates the data-prediction ODE: algorithm_type must be 'dpmsolver++', "
                f"got {kwargs['algorithm_type']!r}"
            )
        super().__init__(**kwargs)
        self._reset_state()

    __init__.__signature__ = _merged_signature(__init__, DPMSolverMultistepScheduler.__init__)
    __init__ = register_to_config(__init__)

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None = None, return_unused_kwargs: bool = False, **kwargs):
        """:meth:`ConfigMixin.from_config` of :func:`evodiff_config` (``config``): any DDPM-family or flow-matching
        pipeline's scheduler config; ``kwargs`` override it (e.g. ``final_step="dpmsolver"``)."""
        if isinstance(config, Mapping):
            config = evodiff_config(config)
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @property
    def flow(self) -> bool:
        """Flow noise: ``alpha = 1 - sigma`` (``use_flow_sigmas`` or flow prediction)."""
        return bool(self.config.use_flow_sigmas) or self.config.prediction_type == "flow_prediction"

    @property
    def flow_match_grid(self) -> bool:
        """The grid is FlowMatchEulerDiscreteScheduler's (flow prediction without ``use_flow_sigmas``)."""
        return self.config.prediction_type == "flow_prediction" and not self.config.use_flow_sigmas

    def _sigma_to_alpha_sigma_t(self, sigma: Tensor) -> tuple[Tensor, Tensor]:
        if self.flow:
            return 1 - sigma, sigma
        return super()._sigma_to_alpha_sigma_t(sigma)

    def _reset_state(self) -> None:
        self._history: list[Tensor] = []  # the last two data predictions D (views of self._data)
        self._data: Tensor | None = None  # where they are: D_k in [k % 2] of a (2, *sample shape) buffer
        self._pair: Tensor | None = None  # the pending corrector's (d1, f), in one (2, *sample shape) buffer
        self._levels: list[float] = []  # their noise levels s
        self._pending: _Pending | None = None
        self._bounds: tuple[float, float, int] | None = None
        self._grid: list[_Level] | None = None

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        mu: float | None = None,
        timesteps: list[int] | None = None,
        sigmas: list[float] | np.ndarray | Tensor | None = None,
    ) -> None:
        """The grid of ``num_inference_steps`` steps, as :meth:`DPMSolverMultistepScheduler.set_timesteps`, or:

        * flow-matching grids (flow prediction without ``use_flow_sigmas``, e.g. from a FlowMatchEuler config):
          exactly :meth:`FlowMatchEulerDiscreteScheduler.set_timesteps` with this config's shift (``flow_shift``),
          dynamic shifting (``mu``), ``shift_terminal`` and sigma spacing; ``sigmas``: the N levels the model sees,
          before the shift (FLUX passes ``linspace(1, 1/N, N)``), the final 0 appended; float timesteps
          ``1000 sigma``. ``use_flow_sigmas=True`` reads ``sigmas`` and ``mu`` (with ``use_dynamic_shifting``) in
          the same way, with integer timesteps as DPM-Solver's flow mode; without them, DPM-Solver's own flow grid.
        * VP noise with ``sigmas``: the whole decreasing grid of noise levels ``s_0 > ... > s_N >= 0``
          (sqrt((1 - abar)/abar), as :class:`~diffusers.EulerDiscreteScheduler` reads ``sigmas``), kept in float64;
          the model is evaluated at all but the last (e.g. the reference's EDM grid, or a grid ending in 0 for a
          final ``x = D``).

        ``mu`` is ignored without ``use_dynamic_shifting`` (as FlowMatchEuler does; FLUX passes it always)."""
        self._reset_state()
        mu = mu if self.config.use_dynamic_shifting else None
        if self.flow_match_grid or (self.flow and (sigmas is not None or mu is not None)):
            grid, times = self._flow_grid(num_inference_steps, device, mu, timesteps, sigmas)
        elif sigmas is not None:
            if num_inference_steps is not None or timesteps is not None:
                raise ValueError("pass either sigmas or num_inference_steps/timesteps, not both")
            grid = torch.as_tensor(sigmas, dtype=torch.float64).flatten().cpu()
            if len(grid) < 2 or not bool((grid[1:] < grid[:-1]).all()) or grid[-1] < 0:
                raise ValueError(f"sigmas must be at least 2 strictly decreasing values >= 0, got {grid.tolist()}")
            abar = self.alphas_cumprod.double()
            log_sigmas = (((1 - abar) / abar).sqrt().log()).numpy()
            times = torch.from_numpy(self._sigma_to_t(grid[:-1].numpy(), log_sigmas)).to(device=device)
        else:
            super().set_timesteps(num_inference_steps, device=device, timesteps=timesteps)
            return
        self.sigmas = grid
        self.timesteps = times
        self.num_inference_steps = len(times)
        self.model_outputs = [None] * self.config.solver_order
        self.lower_order_nums = 0
        self._step_index = None
        self._begin_index = None

    def _flow_grid(
        self,
        num_inference_steps: int | None,
        device: str | torch.device | None,
        mu: float | None,
        timesteps: list[float] | None,
        sigmas: Any,
    ) -> tuple[Tensor, Tensor]:
        """(sigmas in float64 on the CPU, final level included; timesteps on ``device``) of a flow grid, computed by
        a FlowMatchEulerDiscreteScheduler with this config's grid options."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        c = self.config
        if sigmas is not None:
            levels = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
            if len(levels) < 1 or not bool((levels[1:] < levels[:-1]).all() and levels[-1] > 0 and levels[0] <= 1):
                raise ValueError(
                    "flow sigmas are the N strictly decreasing levels in (0, 1] the model is evaluated at, before the "
                    f"shift (the final 0 is appended), got {levels.tolist()}"
                )
        options = {key: c[key] for key in FLOW_MATCH_KEYS}
        if not self.flow_match_grid:  # use_flow_sigmas=True: DPM-Solver's levels and spacing keys mean VP levels
            options |= {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}
            if sigmas is None and timesteps is None:  # DPM-Solver's flow levels before the shift
                levels = np.linspace(1 - 1 / c.num_train_timesteps, 0, num_inference_steps + 1)
                sigmas, num_inference_steps = levels[:-1], None
        delegate = FlowMatchEulerDiscreteScheduler(shift=c.flow_shift, **options)
        delegate.set_timesteps(num_inference_steps, device=device, sigmas=sigmas, mu=mu, timesteps=timesteps)
        grid = delegate.sigmas.double().cpu()
        if not self.flow_match_grid:  # as DPM-Solver and UniPC in flow mode: integer timesteps, final level
            if c.final_sigmas_type == "sigma_min":
                grid[-1] = grid[-2]
            return grid, delegate.timesteps.to(torch.int64)
        return grid, delegate.timesteps

    def scale_noise(self, sample: Tensor, timestep: Tensor, noise: Tensor) -> Tensor:
        """The noisy sample at ``timestep`` for img2img flow pipelines (FlowMatchEuler's ``scale_noise``,
        ``(1 - sigma) sample + sigma noise``; VP: ``alpha sample + sigma noise``): :meth:`add_noise`."""
        return self.add_noise(sample, noise, timestep)

    def _final_step(self, s_t: float, s_prev: float, r: float) -> str:
        """The last step's rule (into the smallest positive level ``s_t`` from ``s_prev``; ``r``: logSNR ratio of
        the step before to this one): ``final_step``, or for ``"auto"`` the one measured more accurate on such a grid.
        Warns where a fixed choice is the one measured less accurate."""
        factor = 1 - math.sqrt(s_t * s_prev)
        if r < LONG_LAST_STEP:
            better = "evodiff"
        elif factor < 1 - SHRINK_WARNING:
            better = "dpmsolver"
        else:
            better = None  # within 0.5-1.9x of each other
        chosen = self.config.final_step
        if chosen == "auto":
            return better or "evodiff"
        if better == "dpmsolver" and chosen == "evodiff":
            warnings.warn(
                f"EVODiff's last step multiplies the sample by 1 - sqrt(s_t s_0) = {factor:.3f}: the reference tuned "
                f"it in absolute EDM noise units for grids ending near 0.002, and this grid ends at {s_t:.3g}; "
                "final_step='dpmsolver' makes the last step an ordinary one (1.9-14x lower RMSE on such grids, see the "
                "README's EVODiff benchmark; final_step='auto' chooses by the grid)",
                stacklevel=4,
            )
        elif better == "evodiff" and chosen == "dpmsolver":
            warnings.warn(
                f"final_step='dpmsolver' on a grid whose last step is {1 / r:.1f}x the previous one in logSNR: the "
                "ordinary second-order step extrapolates over it (1.6-20x the RMSE of the reference's last step on "
                "such grids, see the README's EVODiff benchmark); final_step='evodiff' (the default) is made for it",
                stacklevel=4,
            )
        return chosen

    # --- the update: EDM units (noise level s = sigma / alpha), folded into the sample's coordinates -----

    def _level(self, index: int) -> _Level:
        """The grid's level ``index``; the whole grid is converted once, in float64."""
        if self._grid is None:
            sigmas, inf = torch.as_tensor(self.sigmas, dtype=torch.float64).cpu(), math.inf
            alphas, sigma_ts = self._sigma_to_alpha_sigma_t(sigmas)
            self._grid = [
                _Level(1.0, 0.0, 0.0) if sigma == 0.0 else _Level(alpha, sigma_t, sigma_t / alpha if alpha else inf)
                for sigma, alpha, sigma_t in zip(sigmas.tolist(), alphas.tolist(), sigma_ts.tolist(), strict=True)
            ]  # fmt: skip
        return self._grid[index]

    def _grid_bounds(self, start: int) -> tuple[float, float, int]:
        """(largest, smallest positive) noise level in EDM units from grid index ``start`` on (where sampling
        starts: 0, or an img2img pipeline's begin index) and the number of steps between them."""
        levels = (self._level(i).s for i in range(start, len(self.sigmas)))
        positive = sorted({s for s in levels if s > 0}, reverse=True)  # a repeated last level counts once
        return positive[0], positive[-1], len(positive) - 1

    def _weight(self, s_t: float) -> float:
        """w = (1 - t~^2) / 2 with t~ = (s_t + s_min) / (s_max + s_min). On flow grids s_max is infinite (sigma = 1)
        or in the thousands (DPM-Solver's flow grid), so t~ is 0 or nearly and w = 1/2 at every step: the weight's
        schedule only acts on VP/EDM grids."""
        s_max, s_min, _ = self._bounds
        position = (s_t + s_min) / (s_max + s_min)
        return 0.5 * (1.0 - position * position)

    def _balance(self, fit: Tensor | None, w: float, base: float) -> Tensor | float:
        """b = (1 - w) base + w fit, ``fit`` = <D_new, D_old> / <D_old, D_old> (clipped; one per step, shared by the
        corrector and the predictor), or 1 without balancing."""
        if not self.config.balance:
            return 1.0
        return fit.mul(w).add_((1 - w) * base)

    def _data_prediction(self, model_output: Tensor, x: Tensor, now: _Level, out: Tensor) -> Tensor:
        """D from the model output at level ``now``, written into ``out``: in one pass for flow (``x - sigma v``) and
        epsilon (``(x - sigma eps) / alpha``) predictions, with the grid's alpha and sigma; the others, thresholding
        and learned variances through :meth:`convert_model_output`."""
        c = self.config
        if not c.thresholding and c.prediction_type == "flow_prediction":
            return torch.add(x, model_output, alpha=-now.sigma, out=out)
        if (
            not c.thresholding
            and c.prediction_type == "epsilon"
            and c.variance_type not in ("learned", "learned_range")
        ):
            return torch.add(x, model_output, alpha=-now.sigma, out=out).div_(now.alpha)
        return out.copy_(self.convert_model_output(model_output, sample=x))

    def _predict(self, x: Tensor, now: _Level, nxt: _Level, final: bool, fit: Tensor | None) -> Tensor:
        """The sample at the next level from ``x`` (the sample's coordinates), storing the corrector's inputs;
        ``fit`` = <D_0, D_1> / <D_1, D_1>, clipped."""
        s_prev, alpha_t, s_t = now.s, nxt.alpha, nxt.s
        d0 = self._history[-1]
        rho, h = s_t / s_prev, 1.0 / s_t - 1.0 / s_prev
        # x^E = (sigma_t / sigma_0) x + alpha_t s_t h D_0: DDIM in the sample's coordinates (from alpha_0 = 0 too);
        # on flow noise (alpha = 1 - sigma) the weights add up to 1, and x^E is one lerp from x to D_0
        ddim = alpha_t * s_t * h
        x_euler = torch.lerp(x, d0, ddim) if self.flow else torch.add(x * (nxt.sigma / now.sigma), d0, alpha=ddim)
        if len(self._history) < 2:  # the first step: DDIM (DPM-Solver++(1))
            return x_euler
        d1_prev, s_prev2 = self._history[-2], self._levels[-2]
        step = alpha_t * 0.5 * s_t * h
        r = math.log(s_prev2 / s_prev) / math.log(s_prev / s_t)  # infinite after a level with alpha = 0
        if final and self._final_step(s_t, s_prev, r) == "evodiff":
            c = 1 - 0.5 * math.sqrt(rho) if rho < 0.5 else 1 - 0.5 * math.sqrt(rho - 0.5)
            shrunk = x_euler * (1 - math.sqrt(s_t * s_prev))
            return torch.add(torch.add(shrunk, d0, alpha=step), d1_prev, alpha=-step * c)
        if self.config.max_step_ratio is not None and r > self.config.max_step_ratio:  # DPM-Solver++(2M)'s step
            return torch.add(x_euler, d0 - d1_prev, alpha=step / r)
        if math.isinf(r):
            raise ValueError(
                "the reference's second-order step after a level with alpha = 0 (sigma = 1 on a flow grid) is "
                "infinite; max_step_ratio (default 2.0) takes DPM-Solver++'s step there, which is DDIM"
            )
        base, w = math.sqrt(rho / (s_prev / s_prev2)), self._weight(s_t)
        b1 = self._balance(fit, w, base)
        # d1 goes into the pair buffer, whose previous d1 this step's corrector is done with
        pair = self._pair if self.config.corrector and not final else None
        d1 = minus_scaled(d0, d1_prev, b1, out=None if pair is None else pair[0])
        if self.config.adaptive_ratio:
            # 1 / (2 r~) with r~ = sigmoid(|b| / 4) r is (1 + exp(-|b| / 4)) / (2 r); the reference's clip of r~ to
            # [r / 4, 3 r / 2] never binds, as sigmoid(|b| / 4) is in [1/2, 1)
            b1 = torch.as_tensor(b1, dtype=x.dtype, device=x.device)
            half_inv_r_tilde = b1.abs().mul_(-TEMPERATURE).exp_().add_(1.0).mul_(0.5 / r)
        else:
            half_inv_r_tilde = torch.tensor(0.5 / r, dtype=x.dtype, device=x.device)
        # x^P = x^E + alpha_t s_t h d1 / (2 r~)
        x_pred = torch.addcmul(x_euler, half_inv_r_tilde, d1, value=alpha_t * s_t * h)
        if pair is not None:
            slope_coef = None  # needs D_1, which the next evaluation overwrites: computed now
            if self._bounds[2] > MANY_STEPS:
                g, per_channel = d0 - d1_prev, self.config.per_channel  # the slope (D_0 - D_1) / h
                slope_coef = clipped_ratio(inner(d0, g, per_channel) * h, squared_norm(g, per_channel))
            self._pending = _Pending(
                x_euler, pair, d0, slope_coef, r, half_inv_r_tilde, h, s_t, s_prev, alpha_t, base, w
            )
        return x_pred

    def _correct(self, p: _Pending, d_new: Tensor, fit: Tensor | None) -> Tensor:
        """The corrector of the pending predictor with the new evaluation ``d_new`` (``fit`` = <D_t, D_0> / <D_0, D_0>,
        clipped).

        With d2 = D_t - b2 D_0, P = r d2 / h, M = d1 / (r h) and f = d2 - d1 / r^2 (so P - M = r f / h), the
        reference's projections reduce to inner products of d1 and f:
        eta* = <P + M, P - M> / |P - M|^2 / 2 = (1 + 2 <d1, f> / (r^2 |f|^2)) / 2 and
        zeta* = <x^P - x^E - s h B / (2 r~), d1> / |d1|^2 / (s h), B = a d1 + b d2."""
        per_channel = self.config.per_channel
        b2 = self._balance(fit, p.w, p.base)
        d2 = minus_scaled(d_new, p.d_prev, b2)
        d1 = p.pair[0]
        torch.add(d2, d1, alpha=-1.0 / p.r**2, out=p.pair[1])  # f
        d1_norm, d1_f, f_f = pair_gram(p.pair, per_channel)
        two_eta = clipped_ratio(torch.add(f_f, d1_f, alpha=2.0 / p.r**2), f_f).mul_(0.5).abs_().sigmoid_()
        a, b = two_eta * (-0.5 / p.r), two_eta.mul(-0.5 * p.r).add_(p.r)  # B = a d1 + b d2: -eta / r, r (1 - eta)
        d1_d2 = torch.add(d1_f, d1_norm, alpha=1.0 / p.r**2)
        along = torch.addcmul(d1_norm, a, d1_norm, value=-1.0).addcmul_(b, d1_d2, value=-1.0)  # <(1-a) d1 - b d2, d1>
        # zeta* = clip(<...> s h / (2 r~) / |d1|^2, +-2) / (s h): the s h folded into the bound
        zeta_star = clipped_ratio(along.mul_(p.half_inv_r_tilde), d1_norm, CLIP / (p.h * p.s_t))
        if self._bounds[2] > MANY_STEPS:
            consistency = torch.sigmoid(p.slope_coef * (2 - (p.s_t / p.s_prev) ** 2))
            zeta = torch.sigmoid(-(zeta_star.abs() - ZETA_SHIFT) * consistency)
            if self.config.bounded_zeta:
                zeta = zeta.clamp(min=1 / (1 + math.exp(ZETA_SHIFT)))
        else:
            zeta = zeta_star.abs_().sub_(ZETA_SHIFT).sigmoid_()
        weight = p.alpha_t * 0.5 * p.s_t * p.h  # x = x^E + alpha_t s_t h / (2 zeta) B
        return torch.addcmul(torch.addcmul(p.x_euler, a / zeta, d1, value=weight), b / zeta, d2, value=weight)

    def step(
        self,
        model_output: Tensor,
        timestep: int | Tensor,
        sample: Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """Correct the pending prediction with ``model_output`` (the one evaluation of this step), then
        predict the sample at the next noise level. Computes in float32, or float64 for float64 samples."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        if self.step_index is None:
            self._init_step_index(timestep)
        k = self.step_index
        dtype = torch.promote_types(sample.dtype, torch.float32)
        x = sample.to(dtype)
        if not self._history:  # the first step of this run
            self._bounds = self._grid_bounds(k)
            self._data = x.new_empty((2, *x.shape))
            self._pair = x.new_empty((2, *x.shape)) if self.config.corrector else None
        now, nxt = self._level(k), self._level(k + 1)
        # D_t overwrites D_1, two steps old (no longer used), so that D_t and D_0 are one pair
        data = self._data_prediction(model_output.to(dtype), x, now, out=self._data[k % 2])
        fit = None  # <D_t, D_0> / <D_0, D_0>, clipped: the least-squares part of both balance coefficients
        if self.config.balance and self._history:
            norm_even, cross, norm_odd = pair_gram(self._data, self.config.per_channel)
            fit = clipped_ratio(cross, norm_odd if k % 2 == 0 else norm_even)
        if self._pending is not None:
            x = self._correct(self._pending, data, fit)
            self._pending = None
        self._history = [*self._history[-1:], data]
        self._levels = [*self._levels[-1:], now.s]
        if nxt.s == 0.0:
            prev = data  # a view of the buffer, which no later step writes (set_timesteps allocates a new one)
        elif nxt.s == now.s:  # a repeated level (e.g. Karras sigmas with final_sigmas_type="sigma_min"): no step
            prev = x
        else:
            last_positive = nxt.s == self._bounds[1]
            prev = self._predict(x, now, nxt, last_positive and self.config.lower_order_final, fit)
        self.lower_order_nums = min(self.lower_order_nums + 1, self.config.solver_order)
        self._step_index += 1
        prev = prev.to(model_output.dtype)
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)
