"""EXPERIMENTAL: ReCAP, region confidence proxy for wild test-time adaptation (Hu, Hu, Li, Tang, Duan; ICML 2025,
PMLR 267:24371-24390; arXiv 2505.20704).

Entropy minimisation treats each sample alone. ReCAP minimises the confidence of a whole local region
around the sample's embedding instead: the region is a Gaussian N(z, tau Sigma) around the input z of
the final linear layer, with Sigma a diagonal variance of the embeddings. Two closed-form upper
bounds replace the expectations over the region, so one forward and one backward suffice, as in Tent:
the regional entropy L_RE and the regional instability L_RI. The loss of a sample is
alpha(x) 1[L_RE < tau_RE] (L_RE + lambda L_RI).

Reference code not available here (github.com/hzcar/ReCAP could not be fetched); implemented from the
paper (arXiv 2505.20704v2). Only its abstract and secondary summaries of it could be read: the method
section's equations were reconstructed, see :class:`ReCAP` for what was read and what was assumed.
Until they are checked against the paper's text, ReCAP is experimental: it is not registered in
``entreg.tta.METHODS`` (not reachable from the callback or the CLI), not exported by ``entreg.tta``, and building it
warns (:data:`EXPERIMENTAL`). Import it from this module to experiment. What its tests check is the code against the
reconstructed equations (hand-written formulas, Monte Carlo estimates of the bounded region quantities, a written-out
step), not the equations against the paper.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from entreg.tta.base import StepInfo, TTAMethod, entropy_margin
from entreg.tta.norm import ALL_NORMS, SAR_EXCLUDE, SAR_EXCLUDE_NAMES

__all__ = ["EXPERIMENTAL", "ReCAP", "pairwise_region_variance", "regional_entropy", "regional_instability"]

EXPERIMENTAL = (
    "ReCAP is experimental: its equations are reconstructed from summaries of the paper, not checked against the "
    "paper or its code (see entreg.tta.recap); it is not registered as a method"
)
RUNNING_MOMENTUM = 0.1  # fallback Sigma: moments m <- 0.9 m + 0.1 (batch moments), as EATA's moving average


def pairwise_region_variance(weight: Tensor, variance: Tensor) -> Tensor:
    """d_jk = (w_j - w_k)^T diag(variance) (w_j - w_k) for the rows w_j of ``weight`` (C, D): the
    variance of the logit difference l_j - l_k when the embedding moves by e ~ N(0, diag(variance)).
    Returns a symmetric (C, C) matrix with a zero diagonal.

    Example:
        >>> pairwise_region_variance(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([1.0, 0.5]))
        tensor([[0., 3.],
                [3., 0.]])
    """
    if weight.dim() != 2 or variance.shape != weight.shape[1:]:
        raise ValueError(f"need weight (C, D) and variance (D,), got {tuple(weight.shape)} and {tuple(variance.shape)}")
    scaled = weight * variance  # W diag(var)
    gram = scaled @ weight.T  # M_jk = w_j^T diag(var) w_k
    diag = gram.diagonal()
    d = (diag[:, None] + diag[None, :] - 2 * gram).clamp_min(0)
    return d.fill_diagonal_(0)


def regional_instability(logits: Tensor, distances: Tensor, tau: float) -> Tensor:
    """L_RI per sample: sum_k p_k log sum_j p_j exp(tau/2 d_jk), p = softmax(logits) (N, C), d from
    :func:`pairwise_region_variance`. It upper-bounds E_{z'~N(z, tau Sigma)} KL(p(z) || p(z')) (Jensen
    on the log, Gaussian moment generating function); >= 0, and 0 for tau = 0 or a one-hot p."""
    log_p = logits.log_softmax(1)
    # inner[n, k] = logsumexp_j (log p_nj + tau/2 d_kj), and d_kj = d_jk
    inner = torch.logsumexp(log_p.unsqueeze(1) + (0.5 * tau) * distances.unsqueeze(0), dim=2)
    return (log_p.exp() * inner).sum(1)


def regional_entropy(logits: Tensor, distances: Tensor, tau: float) -> Tensor:
    """L_RE per sample: sum_k p_k log sum_j exp(l_j - l_k + tau/2 d_jk), which upper-bounds the
    expected cross-entropy E_{z'~N(z, tau Sigma)} [-sum_k p_k(z) log p_k(z')] of the region's
    predictions against the centre's. Equal to H(p) + :func:`regional_instability`, hence to the
    Shannon entropy H(p) (values and gradients) for tau = 0.

    Example:
        >>> logits = torch.tensor([[2.0, 0.0, -1.0]])
        >>> d = pairwise_region_variance(torch.eye(3), torch.ones(3))
        >>> h = -(logits.softmax(1) * logits.log_softmax(1)).sum(1)
        >>> torch.allclose(regional_entropy(logits, d, 0.0), h), bool(regional_entropy(logits, d, 1.0) > h)
        (True, True)
    """
    log_p = logits.log_softmax(1)
    return -(log_p.exp() * log_p).sum(1) + regional_instability(logits, distances, tau)


class ReCAP(TTAMethod, register=False):
    """Minimise the region confidence proxy L_RE + lambda L_RI of reliable samples.

    Each step: one forward pass, where a forward hook on the final linear layer ``head`` (l = W z + b)
    records its input z and output l; the region of each sample is N(z, tau Sigma) with Sigma =
    diag(variance); d_jk = (w_j - w_k)^T Sigma (w_j - w_k) (:func:`pairwise_region_variance`);

    - L_RE = sum_k p_k log sum_j exp(l_j - l_k + tau/2 d_jk) >= E_region CE(p(z), p(z'))  (:func:`regional_entropy`)
    - L_RI = sum_k p_k log sum_j p_j exp(tau/2 d_jk) >= E_region KL(p(z) || p(z'))        (:func:`regional_instability`)
    - loss = mean over the samples with L_RE < margin of exp(margin_e0 - L_RE) (L_RE + lambda L_RI)

    and one optimizer step (none when no sample passes). Since d is constant (W is frozen), the loss
    depends on the logits only; the embeddings serve to estimate Sigma. Only the affine parameters of
    BatchNorm/LayerNorm/GroupNorm layers are adapted, the top of the network frozen as in SAR/DeYO.

    What could be read (secondary summaries of the paper; the arXiv HTML's method section could not be
    retrieved here, only its abstract): the region is a Gaussian N(z_t, tau Sigma) in embedding space
    with Sigma a diagonal variance estimated from a small source set, shared by all samples ("domain
    level"); region confidence = a bias term (entropy integrated over the region) plus a variance term
    (KL divergence between the sample's prediction and its neighbours'); two closed-form upper bounds
    replace them, L_RE (regional entropy) and L_RI (regional instability), with no sampling; the
    objective is min alpha(x) 1[L_RE(x) < tau_RE] (L_RE(x) + lambda L_RI(x)); only normalisation affine
    parameters are updated; the cost is about Tent's (+5%); tau = 1.2, lambda = 0.5 are the reported
    values; it can be stacked on SAR/DeYO sample selection.

    Assumptions (not read, reconstructed):

    1. The bounds are the ISDA-style Jensen bounds above (E log X <= log E X with the Gaussian moment
       generating function E exp(a^T e) = exp(tau/2 a^T Sigma a)). L_RE bounds the region's expected
       cross-entropy against the centre prediction (= H(p) + E KL), not the region's average entropy
       E H(p(z')), which has no closed-form bound of this kind; L_RE reduces to the entropy for tau = 0.
       The centre probabilities p are not detached (tau = 0 gives exactly Tent's gradient).
    2. alpha(x) = exp(margin_e0 - L_RE), detached, as EATA/DeYO weight entropies (``reweight=False``:
       alpha = 1); tau_RE (``margin``) and margin_e0 default to 0.4 ln C, SAR/EATA's E0.
    3. Without source statistics (:meth:`set_source_statistics` or ``source_variance``), Sigma is the
       running variance of the test embeddings: moments m <- 0.9 m + 0.1 (batch moments) over the
       stream (the first batch's moments at first, over all DDP ranks), cleared by :meth:`reset`.
       Sigma is population (biased) variance per dimension.
    4. Standalone ReCAP only (its own L_RE selection); the SAR+ReCAP and DeYO+ReCAP variants are not
       implemented. No model recovery unless ``recovery=True``.

    Args:
        model, num_classes, optimizer, lr, entropy, recovery, recovery_threshold: see :class:`TTAMethod`.
            With ``entropy="come"``, L_RE = COME's entropy + L_RI (no longer a bound).
        head: dotted name of the final ``nn.Linear`` (``"fc"``, ``"head"``...) whose input is the
            embedding; default: the last ``nn.Linear`` with ``num_classes`` outputs.
        tau: region size tau >= 0 (1.2).
        lam: weight lambda >= 0 of L_RI (0.5).
        margin: tau_RE, samples with L_RE < margin are kept (default 0.4 ln C).
        margin_e0: E0 of the weight exp(E0 - L_RE) (default 0.4 ln C).
        reweight: weight the kept samples by exp(E0 - L_RE) (True) or not.
        source_variance: per-dimension embedding variance (D,) of source data (or set later with
            :meth:`set_source_statistics`); ``None``: the running test variance (assumption 3).

    Memory: O(N C^2) for the logsumexp of L_RI (about 256 MB in float32 for N = 64, C = 1000).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.GroupNorm(2, 4),
        ...                           torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 10))
        >>> recap = ReCAP(net, num_classes=10, head="4", margin=math.log(10))
        >>> recap.set_source_statistics([torch.randn(8, 3, 8, 8)])
        >>> recap.source_variance.shape
        torch.Size([4])
        >>> logits, info = recap.adapt(torch.randn(16, 3, 8, 8))
        >>> logits.shape, info.total
        (torch.Size([16, 10]), 16)
    """

    name = "recap"
    uses_source_data = True
    norm_types = ALL_NORMS
    exclude = SAR_EXCLUDE
    exclude_names = SAR_EXCLUDE_NAMES
    threshold_args = ("margin",)

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        head: str | None = None,
        tau: float = 1.2,
        lam: float = 0.5,
        margin: float | None = None,
        margin_e0: float | None = None,
        reweight: bool = True,
        source_variance: Tensor | None = None,
        **kwargs,
    ) -> None:
        warnings.warn(EXPERIMENTAL, UserWarning, stacklevel=2)
        super().__init__(model, num_classes, **kwargs)
        self.head_name, self.head = self._find_head(head)
        if not (math.isfinite(tau) and tau >= 0):
            raise ValueError(f"tau (region size) must be a finite number >= 0, got {tau}")
        if not (math.isfinite(lam) and lam >= 0):
            raise ValueError(f"lam (weight of L_RI) must be a finite number >= 0, got {lam}")
        self.margin = entropy_margin(num_classes) if margin is None else float(margin)
        self.margin_e0 = entropy_margin(num_classes) if margin_e0 is None else float(margin_e0)
        if not (self.margin > 0 and self.margin_e0 > 0):
            raise ValueError(f"margin and margin_e0 must be > 0 nats, got {margin}, {margin_e0}")
        self.tau, self.lam, self.reweight = float(tau), float(lam), bool(reweight)
        self.source_variance: Tensor | None = None
        if source_variance is not None:
            self.source_variance = self._check_variance(torch.as_tensor(source_variance))
        self.running: tuple[Tensor, Tensor] | None = None  # (E z, E z^2) of the test embeddings, fallback Sigma

    # --- the head and Sigma ----------------------------------------------------------------

    def _find_head(self, head: str | None) -> tuple[str, nn.Linear]:
        linears = [(n, m) for n, m in self.model.named_modules() if isinstance(m, nn.Linear)]
        if head is None:
            fits = [(n, m) for n, m in linears if m.out_features == self.num_classes]
            if not fits:
                raise ValueError(
                    f"ReCAP needs the final nn.Linear layer (head=...): the model has none with num_classes="
                    f"{self.num_classes} outputs; its nn.Linear layers: {[n for n, _ in linears]}"
                )
            return fits[-1]
        try:
            module = self.model.get_submodule(head)
        except AttributeError:
            raise ValueError(
                f"head={head!r} is not a submodule of the model; its nn.Linear layers: {[n for n, _ in linears]}"
            ) from None
        if not isinstance(module, nn.Linear):
            raise ValueError(
                f"head={head!r} must name the final nn.Linear layer, got {type(module).__name__}; "
                f"the model's nn.Linear layers: {[n for n, _ in linears]}"
            )
        if module.out_features != self.num_classes:
            raise ValueError(f"head={head!r} has {module.out_features} outputs, not num_classes={self.num_classes}")
        return head, module

    def _check_variance(self, variance: Tensor) -> Tensor:
        weight = self.head.weight
        if variance.shape != (weight.shape[1],):
            raise ValueError(f"source_variance must have shape ({weight.shape[1]},), got {tuple(variance.shape)}")
        if not bool(torch.isfinite(variance).all() and (variance >= 0).all()):
            raise ValueError("source_variance must be finite and >= 0")
        return variance.detach().to(device=weight.device, dtype=weight.dtype).clone()

    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(model output, head input z (N, D), head output l (N, C)) of one forward pass; the hook
        lives only during the call."""
        captured: list[tuple[Tensor, Tensor]] = []

        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            captured.append((args[0], output))

        handle = self.head.register_forward_hook(hook)
        try:
            out = self.logits(x)
        finally:
            handle.remove()
        if len(captured) != 1:
            raise RuntimeError(f"the head {self.head_name!r} ran {len(captured)} times in one forward, expected once")
        z, logits = captured[0]
        if z.dim() != 2 or logits.shape != (len(x), self.num_classes):
            raise RuntimeError(
                f"the head {self.head_name!r} must map (N, D) embeddings to (N, {self.num_classes}) logits, "
                f"got {tuple(z.shape)} -> {tuple(logits.shape)}"
            )
        return out, z, logits

    def prepare(self, batches: Iterable[Tensor]) -> None:
        """:meth:`set_source_statistics` (the callback's ``source_batches``)."""
        self.set_source_statistics(batches)

    @torch.no_grad()
    def set_source_statistics(self, batches: Iterable[Tensor]) -> None:
        """Sigma from clean source ``batches``: the per-dimension (population) variance of the head's
        input over all their samples, computed with the configured model (as EATA's Fisher)."""
        total, total_sq, count = None, None, 0
        for x in batches:
            _, z, _ = self._forward(x)
            z = z.detach().double()
            total = z.sum(0) if total is None else total + z.sum(0)
            total_sq = (z * z).sum(0) if total_sq is None else total_sq + (z * z).sum(0)
            count += len(z)
        if count < 2:
            raise ValueError(f"set_source_statistics needs at least 2 samples, got {count}")
        mean = total / count
        self.source_variance = self._check_variance((total_sq / count - mean * mean).clamp_min(0))

    def _running_variance(self, z: Tensor) -> Tensor:
        """Assumption 3: the moving average of the embedding moments over the stream (all ranks)."""
        z = z.detach()
        sums = self.all_sum(torch.cat([z.sum(0), (z * z).sum(0), z.new_tensor([len(z)])]))
        d = z.shape[1]
        mean, mean_sq = sums[:d] / sums[-1], sums[d : 2 * d] / sums[-1]
        if self.running is not None:
            m = RUNNING_MOMENTUM
            mean, mean_sq = (1 - m) * self.running[0] + m * mean, (1 - m) * self.running[1] + m * mean_sq
        self.running = (mean, mean_sq)
        return (mean_sq - mean * mean).clamp_min(0)

    def reset(self) -> None:
        super().reset()
        self.running = None

    # --- one step -------------------------------------------------------------------------

    def region_losses(self, logits: Tensor, variance: Tensor) -> tuple[Tensor, Tensor]:
        """(L_RE, L_RI) per sample for head ``logits`` (N, C) and the diagonal Sigma ``variance`` (D,)."""
        dtype = torch.promote_types(logits.dtype, torch.float32)
        logits = logits.to(dtype)
        distances = pairwise_region_variance(self.head.weight.detach().to(dtype), variance.to(dtype))
        ri = regional_instability(logits, distances, self.tau)
        return self.entropy(logits) + ri, ri

    def step(self, x: Tensor) -> tuple[Tensor, StepInfo]:
        out, z, logits = self._forward(x)
        variance = self.source_variance if self.source_variance is not None else self._running_variance(z)
        re, ri = self.region_losses(logits, variance)
        reliable = torch.nonzero(re.detach() < self.margin).flatten()
        re, ri = re[reliable], ri[reliable]
        loss = re + self.lam * ri
        if self.reweight:
            loss = loss * torch.exp(self.margin_e0 - re.detach())
        value, count = self.backward_mean(loss)
        if count:  # no step when no sample is kept
            self.optimizer.step()
        self.optimizer.zero_grad()
        mask = self.selection_mask(len(x), reliable)
        return out, StepInfo(count, len(x), value if count else None, mask=mask)
