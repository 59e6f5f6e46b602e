"""ERA: Entropy Regularizing Activation (Kang, Liao, Xu, Xu; arXiv 2510.08549, ICLR 2026).

ERA replaces an entropy bonus by an output transform that guarantees a minimum entropy for
every input, so the loss stays unchanged (plain cross-entropy, or the policy objective).

* :class:`ERA` (discrete): maps classifier logits z to z' such that H(softmax(z')) >= H0 for
  every sample, through the Lambert W function. It preserves the order of the classes, so
  applying it at evaluation only changes calibration, not predictions.
* :class:`GaussianERA` (continuous): turns a mean and raw log-std scores into a diagonal
  Gaussian whose entropy equals the target, by splitting a log-std budget over the action
  dimensions with a softmax.

Written from the paper's formulas (the reference code, GitHub nothingbutbut/era, has no
licence). Where it differs from the paper we follow the code and expose the paper's variant:
the code approximates W_{-1} in closed form (``lambert_w="approx"``, default); the paper's
exact W_{-1} is ``lambert_w="exact"``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from entreg.distributions import HALF_LOG_2PI_E, _as_float

__all__ = ["ERA", "GaussianERA", "era_logits", "era_target_range", "lambert_wm1_neg"]

LambertW = Literal["approx", "exact"]


def era_target_range(num_classes: int, tau: float = 4.0) -> tuple[float, float]:
    """Open-closed range (low, high] of ERA target entropies for ``num_classes`` and ``tau``.

    With U = ln(tau)/tau the construction needs U < exp(H0 - 1) <= num_classes * U, i.e.
    H0 in (1 + ln U, 1 + ln(num_classes * U)]. For tau = 4 and 10 classes: (-0.0597, 2.2429].
    """
    u = math.log(tau) / tau
    return 1.0 + math.log(u), 1.0 + math.log(num_classes * u)


def lambert_wm1_neg(h: Tensor, method: LambertW = "approx") -> Tensor:
    """W_{-1}(-h) for h in (0, 1/e): the solution w <= -1 of w * exp(w) = -h.

    ``"approx"`` is the closed form -1 - sqrt(2u) - 3u/4 with u = -1 - ln h (the reference
    code's choice; it lies between the known bounds -1 - sqrt(2u) - u and -1 - sqrt(2u) - 2u/3).
    ``"exact"`` refines it by Newton's method on w + ln(-w) = ln h in float64 and attaches the
    exact derivative dw/dh = w / (h (1 + w)).
    """
    u = -1.0 - torch.log(h)
    w = -1.0 - torch.sqrt(2.0 * u) - 0.75 * u
    if method == "approx":
        return w
    if method != "exact":
        raise ValueError(f"lambert_w must be 'approx' or 'exact', got {method!r}")
    with torch.no_grad():
        log_h = torch.log(h.double())
        x = w.double()
        for _ in range(6):  # quadratic convergence from the closed form: 6 steps reach float64 precision
            x = x - (x + torch.log(-x) - log_h) / (1.0 + 1.0 / x)
        x = x.to(h.dtype)
        slope = x / (h * (1.0 + x))
    return x + (h - h.detach()) * slope


def era_logits(logits: Tensor, target_entropy: float = 0.6, tau: float = 4.0, lambert_w: LambertW = "approx") -> Tensor:
    """Transform logits (..., D) so that the softmax entropy of every row is at least ``target_entropy``.

    With p = softmax(z), U = ln(tau)/tau and C = exp(H0 - 1), each class gets
    h_i = U + (C - D U)/(D - 1) * (1 - p_i) in (0, U] (the h_i sum to C), and
    z'_i = W_{-1}(-h_i), i.e. q_i = exp(z'_i) <= 1/e solves -q_i ln q_i = h_i. For
    pi = q / sum(q) = softmax(z'), H(pi) = C / S + ln S >= 1 + ln C = H0 with S = sum(q).
    As C <= D U, a larger p_i gives a larger h_i, and on this branch q = exp(W_-1(-h)) grows
    with h (-q ln q increases on (0, 1/e]): a larger p_i gives a larger q_i, so the class order is kept.

    Half-precision logits are computed and returned in float32.

    Example:
        >>> z = torch.tensor([[30.0, 0.0, 0.0, 0.0]])
        >>> from entreg.entropy import categorical_entropy
        >>> bool(categorical_entropy(era_logits(z, target_entropy=0.6)) >= 0.6)
        True
    """
    num_classes = logits.shape[-1]
    _check_target(target_entropy, num_classes, tau)
    p = torch.softmax(_as_float(logits), dim=-1)
    u = math.log(tau) / tau
    c = math.exp(target_entropy - 1.0)
    h = u + (c - num_classes * u) / (num_classes - 1) * (1.0 - p)
    return lambert_wm1_neg(h, lambert_w)


def _check_target(target_entropy: float, num_classes: int, tau: float) -> None:
    if num_classes < 2:
        raise ValueError(f"ERA needs at least 2 classes, got {num_classes}")
    if not tau > math.e:
        raise ValueError(f"ERA tau must be > e (2.718...) to stay on the W_-1 branch, got {tau}")
    low, high = era_target_range(num_classes, tau)
    if not low < target_entropy <= high:
        raise ValueError(
            f"ERA target entropy {target_entropy} is out of range for {num_classes} classes and "
            f"tau={tau}: valid range is ({low:.4f}, {high:.4f}] nats (ln {num_classes} = "
            f"{math.log(num_classes):.4f} is the maximum entropy)"
        )


class _TargetEntropyModule(nn.Module):
    """A module with a ``target_entropy`` that is validated on every set (``check_target``) and
    saved in the state dict, so a target moved during training survives a checkpoint."""

    _target_entropy: float

    def check_target(self, value: float) -> None:
        raise NotImplementedError

    @property
    def target_entropy(self) -> float:
        return self._target_entropy

    @target_entropy.setter
    def target_entropy(self, value: float) -> None:
        self.check_target(float(value))
        self._target_entropy = float(value)

    def get_extra_state(self) -> dict[str, float]:
        return {"target_entropy": self._target_entropy}

    def set_extra_state(self, state: dict[str, float]) -> None:
        self.target_entropy = state["target_entropy"]


class ERA(_TargetEntropyModule):
    """Entropy Regularizing Activation for classifier logits: H(softmax(output)) >= target, per sample.

    Train with plain cross-entropy on the output. ``target_entropy`` can be changed during
    training (e.g. by :class:`entreg.callbacks.EntropyController`); it is validated on every set.

    Args:
        num_classes: number of classes D (>= 2).
        target_entropy: H0 in nats, in ``era_target_range(D, tau)``; the paper's default 0.6.
        tau: per-class cap parameter (> e); the paper's default 4.
        apply_at_eval: also transform in eval mode (default, as the reference code does);
            the class order is kept either way, so only calibration differs.
        lambert_w: ``"approx"`` (reference code, default) or ``"exact"`` (the paper's W_{-1}).

    Example:
        >>> era = ERA(num_classes=10, target_entropy=0.6)
        >>> out = era(torch.randn(8, 10) * 100)
        >>> from entreg.entropy import categorical_entropy
        >>> bool((categorical_entropy(out) >= 0.6).all())
        True
    """

    def __init__(
        self,
        num_classes: int,
        target_entropy: float = 0.6,
        tau: float = 4.0,
        apply_at_eval: bool = True,
        lambert_w: LambertW = "approx",
    ) -> None:
        super().__init__()
        if lambert_w not in ("approx", "exact"):
            raise ValueError(f"lambert_w must be 'approx' or 'exact', got {lambert_w!r}")
        self.num_classes = num_classes
        self.tau = tau
        self.apply_at_eval = apply_at_eval
        self.lambert_w: LambertW = lambert_w
        self.target_entropy = target_entropy

    def check_target(self, value: float) -> None:
        _check_target(value, self.num_classes, self.tau)

    def forward(self, logits: Tensor) -> Tensor:
        if logits.shape[-1] != self.num_classes:
            raise ValueError(f"ERA was built for {self.num_classes} classes, got logits of shape {tuple(logits.shape)}")
        if not self.training and not self.apply_at_eval:
            return logits
        return era_logits(logits, self._target_entropy, self.tau, self.lambert_w)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, target_entropy={self._target_entropy}, tau={self.tau}, "
            f"apply_at_eval={self.apply_at_eval}, lambert_w={self.lambert_w!r}"
        )


class GaussianERA(_TargetEntropyModule):
    """ERA for a diagonal Gaussian policy: its entropy equals ``target_entropy`` in every state where no
    log-std reaches ``log_std_min``, and is higher where one does.

    From raw scores s (..., D) the log-stds are
    log sigma_i = max(log_std_max + (H0 - D c - D log_std_max) softmax(s)_i, log_std_min),
    c = 0.5 ln(2 pi e). Before the clamp sum_i log sigma_i = H0 - D c, so the entropy is exactly
    H0; the floor clamp can only raise it. The softmax decides which dimensions get the noise.
    With D = 1 the std is a constant, exp(H0 - c). The mean passes through unchanged.

    Compensation delta (the paper and project page; absent from the released code, so off by default): the Gaussian
    gets the target H0' = H0 + delta, delta >= 0, to make up for the entropy that bounding the action (tanh
    squashing, truncation) removes, so that the *bounded* policy's entropy is near H0. ``delta`` is a constant, or
    with ``learn_delta`` it is learned by minimising the page's L(delta) = E_s[delta (H[pi(.|s)] - H0)], whose
    gradient is H - H0: :meth:`compensation_step` takes one projected gradient step from the caller's estimate of
    the bounded policy's entropy on a batch (e.g. -mean log pi of its sampled actions),
    delta <- clip(delta - delta_lr (H_hat - H0), 0, delta_max), delta_max = D (log_std_max + c) - H0 (the largest
    Gaussian entropy the clamps allow). The page names no optimiser or rate: plain projected descent and
    ``delta_lr`` are ours. delta is saved with the target in the module's extra state.

    Args:
        action_dim: number of action dimensions D.
        target_entropy: H0 in nats for the whole action; default -0.5 * D (the reference
            constructor's per-dimension -0.5; its training script uses +0.25 per dimension).
        log_std_min, log_std_max: clamps of each log-std (reference code: -8 and 0).
        delta: the compensation in nats (constant, or the initial value with ``learn_delta``).
        learn_delta: learn delta by :meth:`compensation_step`.
        delta_lr: step size of :meth:`compensation_step`.

    Example:
        >>> era = GaussianERA(action_dim=3, target_entropy=-1.0)
        >>> mean, log_std = era(torch.zeros(5, 3), torch.randn(5, 3))
        >>> from entreg.entropy import gaussian_entropy
        >>> torch.allclose(gaussian_entropy(log_std), torch.full((5,), -1.0))
        True
    """

    def __init__(
        self,
        action_dim: int,
        target_entropy: float | None = None,
        log_std_min: float = -8.0,
        log_std_max: float = 0.0,
        delta: float = 0.0,
        learn_delta: bool = False,
        delta_lr: float = 1e-3,
    ) -> None:
        super().__init__()
        if action_dim < 1:
            raise ValueError(f"GaussianERA needs action_dim >= 1, got {action_dim}")
        if not log_std_min < log_std_max:
            raise ValueError(f"log_std_min ({log_std_min}) must be < log_std_max ({log_std_max})")
        if not delta_lr > 0:
            raise ValueError(f"delta_lr must be > 0, got {delta_lr}")
        self.action_dim = action_dim
        self.log_std_min = float(log_std_min)
        self.log_std_max = float(log_std_max)
        self.target_entropy = -0.5 * action_dim if target_entropy is None else target_entropy
        if not 0.0 <= delta <= self.delta_max():
            raise ValueError(
                f"GaussianERA delta must be in [0, {self.delta_max():.4f}] (the Gaussian's target H0 + delta must stay "
                f"within the log-std clamps), got {delta}"
            )
        self.learn_delta, self.delta_lr = bool(learn_delta), float(delta_lr)
        # a buffer so that it follows .to(); saved through the extra state (old checkpoints load with delta 0)
        self.register_buffer("delta", torch.tensor(float(delta)), persistent=False)
        self._compensated = self.learn_delta or delta != 0.0  # else forward is exactly the uncompensated map

    def delta_max(self) -> float:
        """The largest delta: D (log_std_max + c) - H0."""
        return self.target_range()[1] - self._target_entropy

    @torch.no_grad()
    def compensation_step(self, entropy: Tensor) -> Tensor:
        """One projected descent step on L(delta) = delta (H_hat - H0) from ``entropy`` = H_hat, an estimate of the
        bounded policy's entropy (a 0-dim tensor; no host synchronisation): delta <- clip(delta - delta_lr
        (H_hat - H0), 0, delta_max). Returns delta.

        Example:
            >>> era = GaussianERA(2, target_entropy=0.5, delta=0.2, learn_delta=True, delta_lr=0.1)
            >>> round(float(era.compensation_step(torch.tensor(0.3))), 6)  # entropy below H0: delta grows
            0.22
        """
        if not self.learn_delta:
            raise RuntimeError("compensation_step needs learn_delta=True (delta is a constant)")
        step = self.delta_lr * (entropy.detach().to(self.delta) - self._target_entropy)
        return self.delta.sub_(step).clamp_(0.0, self.delta_max())

    def target_range(self) -> tuple[float, float]:
        """Range (low, high] of targets reachable within the log-std clamps."""
        d = self.action_dim
        return d * (self.log_std_min + HALF_LOG_2PI_E), d * (self.log_std_max + HALF_LOG_2PI_E)

    def check_target(self, value: float) -> None:
        low, high = self.target_range()
        if not low < value <= high:
            d = self.action_dim
            raise ValueError(
                f"GaussianERA target entropy {value} nats (the total over action_dim={d}: {value / d:.4g} per "
                f"dimension) is out of range for log-std clamps [{self.log_std_min}, {self.log_std_max}]: valid "
                f"totals are ({low:.4f}, {high:.4f}], i.e. ({low / d:.4f}, {high / d:.4f}] nats per dimension"
            )

    @classmethod
    def per_dimension(
        cls,
        action_dim: int,
        entropy_per_dim: float,
        log_std_min: float = -8.0,
        log_std_max: float = 0.0,
        **delta: float | bool,
    ) -> GaussianERA:
        """A GaussianERA whose target is ``entropy_per_dim`` nats per action dimension (the RL agents'
        ``era_entropy_per_dim``); an out-of-range value is reported per dimension. ``delta``: ``delta``,
        ``learn_delta``, ``delta_lr`` of the constructor.

        Example:
            >>> GaussianERA.per_dimension(3, 100.0)
            Traceback (most recent call last):
            ...
            ValueError: era_entropy_per_dim=100.0 nats per action dimension ... valid (-6.5811, 1.4189] ...
        """
        low, high = (bound + HALF_LOG_2PI_E for bound in (log_std_min, log_std_max))
        if not low < entropy_per_dim <= high:
            raise ValueError(
                f"era_entropy_per_dim={entropy_per_dim} nats per action dimension is out of range for log-std clamps "
                f"[{log_std_min}, {log_std_max}]: valid ({low:.4f}, {high:.4f}] (a target of "
                f"{entropy_per_dim * action_dim} nats over {action_dim} dimension{'s' if action_dim != 1 else ''})"
            )
        return cls(action_dim, entropy_per_dim * action_dim, log_std_min, log_std_max, **delta)

    def get_extra_state(self) -> dict[str, float | Tensor]:
        return {"target_entropy": self._target_entropy, "delta": self.delta.detach().cpu().clone()}

    def set_extra_state(self, state: dict[str, float | Tensor]) -> None:
        super().set_extra_state(state)
        if "delta" in state:
            self.delta.copy_(torch.as_tensor(state["delta"]))
            self._compensated = self._compensated or bool(self.delta != 0)

    def forward(self, mean: Tensor, log_std_scores: Tensor) -> tuple[Tensor, Tensor]:
        if log_std_scores.shape[-1] != self.action_dim:
            raise ValueError(
                f"GaussianERA was built for {self.action_dim} dims, got scores {tuple(log_std_scores.shape)}"
            )
        d = self.action_dim
        budget = self._target_entropy - d * HALF_LOG_2PI_E - d * self.log_std_max
        if self._compensated:
            budget = self.delta + budget  # a tensor: no host synchronisation
        weights = torch.softmax(_as_float(log_std_scores), dim=-1)
        log_std = (self.log_std_max + budget * weights).clamp(min=self.log_std_min)
        return mean, log_std

    def extra_repr(self) -> str:
        return (
            f"action_dim={self.action_dim}, target_entropy={self._target_entropy}, "
            f"log_std_min={self.log_std_min}, log_std_max={self.log_std_max}"
            + (f", learn_delta={self.learn_delta}, delta_lr={self.delta_lr}" if self._compensated else "")
        )
