"""Rectified-flow (flow-matching) training of a velocity network with EMA weights, sampled by the Euler ODE.

Liu, Gong and Liu, "Flow Straight and Fast" (ICLR 2023, arXiv:2209.03003); Lipman et al., "Flow Matching for
Generative Modeling" (ICLR 2023, arXiv:2210.02747); the logit-normal time sampling and the time shift of
Esser et al. (SD3, ICML 2024, arXiv:2403.03206).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from entreg.flow.sampling import ode_sample
from entreg.modules.diffusion import (
    sample_metrics,
)
from entreg.modules.ema import EMATrainedNetwork, OptimizerFactory
from entreg.nn.denoisers import denoiser_from_checkpoint

__all__ = ["TIME_SAMPLINGS", "FlowMatchingModule"]

TIME_SAMPLINGS = ("uniform", "logit_normal")


class FlowMatchingModule(EMATrainedNetwork):
    """Rectified-flow training: ``x_t = (1 - t) x_0 + t eps`` (t = 1 noise), the network regressing the velocity
    ``v = eps - x_0`` (MSE), with ``t ~ U(0, 1)`` or SD3's logit-normal ``t = sigmoid(m + s n)``, n ~ N(0, 1).
    Samples integrate ``dx/dt = v`` from t = 1 to 0 with Euler steps on the SD3-shifted grid
    (:func:`entreg.flow.sampling.ode_sample`).

    The network is called ``net(x_t, time_scale * t)`` (unconditional) or ``net(x_t, time_scale * t,
    class_labels=y)``: t in [0, 1] is scaled (by 1000, diffusers' ``num_train_timesteps`` convention) so that the
    sinusoidal time embeddings of :mod:`entreg.nn.denoisers` and ``UNet2DModel``, built for timesteps in
    [0, 1000), resolve it. :meth:`velocity` hides the scale: it takes t in [0, 1].

    Class-conditional when ``num_classes`` is set: batches ``(x, y)`` train on their labels (the digits and ring
    DataModules give them); with ``class_dropout`` > 0 a label is replaced by the null class ``num_classes``
    (what ``class_labels=None`` selects in the entreg denoisers) with that probability, so the same network
    also models the unconditional distribution.

    An exponential moving average of the weights (``self.ema``, an ``AveragedModel`` with diffusers' warm-up,
    :func:`entreg.modules.ema.warmed_up_ema`, in the checkpoint) is updated after every training batch and
    is what :meth:`sample` and validation use. A training batch whose loss is not finite (on any rank) is skipped
    (:class:`entreg.modules.skipping.SkipNonFiniteSteps`).

    Validation logs ``val/loss`` (EMA weights, fixed noise and times) and, every ``sample_every_n_epochs``
    epochs, samples as many points as it holds validation points (up to ``num_val_samples``; with the
    validation labels when conditional) from fixed noise and logs
    :func:`entreg.modules.diffusion.sample_metrics` against them (``val/fd`` for images with a
    ``feature_extractor``; ``val/sliced_wasserstein`` and, with a ``reference_mixture``, ``val/log_likelihood``
    for vectors) and ``val/samples`` to TensorBoard (an image grid, or the 2-D histogram of 2-D points).

    Args:
        net: velocity network ``net(x, t) -> v`` of ``x``'s shape (accepting ``class_labels=`` when
            conditional), e.g. :class:`entreg.nn.denoisers.MLPDenoiser` or :func:`entreg.nn.denoisers.unet2d`.
        num_classes: number of classes of a class-conditional ``net`` (labels in [0, num_classes)); None:
            unconditional (batch labels are ignored).
        class_dropout: probability of training on the null class instead of the label, in [0, 1).
        time_sampling: ``"uniform"`` or ``"logit_normal"``.
        logit_mean, logit_std: m and s of the logit-normal time sampling (SD3: 0 and 1).
        time_scale: multiplies t before the network.
        optimizer: factory ``params -> Optimizer`` (Hydra ``_partial_: true``); default AdamW(lr=1e-3).
        ema_decay: decay of the EMA weights, in [0, 1), reached after the warm-up min(decay, (1 + n) / (10 + n)).
        sample_steps: Euler steps of validation samples (and of :meth:`sample` by default).
        sample_shift: SD3 time shift of the sampling grid (> 0; 1 = uniform).
        sample_every_n_epochs: sample at validation every this many epochs (0: never).
        num_val_samples: samples (and validation points) compared at validation.
        feature_extractor: frozen ``nn.Module`` mapping images to features for the Frechet distance (not saved in
            checkpoints), e.g. :func:`entreg.data.digits_nets.digits_feature_extractor`.
        reference_mixture: the true :class:`entreg.diffusion.GaussianMixture` of vector data.
        data_range: (low, high) of the data, mapped to [0, 1] for image grids (:meth:`to_image`).

    Example:
        >>> from entreg.nn.denoisers import MLPDenoiser
        >>> model = FlowMatchingModule(MLPDenoiser(dim=2, hidden=16, num_classes=3), num_classes=3)
        >>> model.sample(4, steps=3, shift=2.0, class_labels=torch.tensor([0, 1, 2, 0])).shape
        torch.Size([4, 2])
        >>> model.velocity(torch.zeros(4, 2), torch.full((4,), 0.5), torch.tensor([0, 1, 2, 3])).shape
        torch.Size([4, 2])
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int | None = None,
        class_dropout: float = 0.0,
        time_sampling: str = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        time_scale: float = 1000.0,
        optimizer: OptimizerFactory | None = None,
        ema_decay: float = 0.999,
        sample_steps: int = 20,
        sample_shift: float = 1.0,
        sample_every_n_epochs: int = 1,
        num_val_samples: int = 64,
        feature_extractor: nn.Module | None = None,
        reference_mixture: Any | None = None,
        data_range: Sequence[float] = (-1.0, 1.0),
    ) -> None:
        super().__init__()
        if num_classes is not None and (isinstance(num_classes, bool) or num_classes < 1):
            raise ValueError(f"num_classes must be None or >= 1, got {num_classes!r}")
        if not 0.0 <= class_dropout < 1.0 or (class_dropout > 0 and num_classes is None):
            raise ValueError(f"class_dropout must be in [0, 1) and needs num_classes, got {class_dropout}")
        if time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"time_sampling must be one of {TIME_SAMPLINGS}, got {time_sampling!r}")
        if not logit_std > 0 or not time_scale > 0:
            raise ValueError(f"logit_std and time_scale must be > 0, got {logit_std} and {time_scale}")
        if sample_steps < 1 or not sample_shift > 0 or sample_every_n_epochs < 0 or num_val_samples < 2:
            raise ValueError(
                "need sample_steps >= 1, sample_shift > 0, sample_every_n_epochs >= 0 and num_val_samples >= 2; "
                f"got {sample_steps}, {sample_shift}, {sample_every_n_epochs}, {num_val_samples}"
            )
        self.save_hyperparameters(ignore=["net", "optimizer", "feature_extractor", "reference_mixture"])
        self.net = net
        self.init_training(net, ema_decay, optimizer, data_range)
        self.feature_extractor = feature_extractor.eval().requires_grad_(False) if feature_extractor else None
        self.reference_mixture = reference_mixture
        self.num_classes, self.class_dropout, self.time_scale = num_classes, class_dropout, float(time_scale)
        self.sample_steps, self.sample_shift = sample_steps, float(sample_shift)
        self.sample_every_n_epochs, self.num_val_samples = sample_every_n_epochs, num_val_samples
        self._val_real: list[tuple[Tensor, Tensor | None]] = []

    @classmethod
    def load_checkpoint(cls, path: str | Path, map_location: Any = "cpu", **kwargs: Any) -> FlowMatchingModule:
        """Load a checkpoint written by Lightning, rebuilding an entreg denoiser from the spec stored in it (pass
        ``net=`` for any other). ``kwargs`` go to ``load_from_checkpoint`` (e.g. ``feature_extractor``)."""
        if kwargs.get("net") is None:
            kwargs["net"] = denoiser_from_checkpoint(path)
        return cls.load_from_checkpoint(path, map_location=map_location, weights_only=True, **kwargs)

    # ---- the velocity ---------------------------------------------------------------------------------------

    def _call(self, net: nn.Module, x: Tensor, t: Tensor, class_labels: Tensor | None) -> Tensor:
        t = self.time_scale * t
        return net(x, t) if class_labels is None else net(x, t, class_labels=class_labels)

    def velocity(self, x: Tensor, t: Tensor, cond: Tensor | None = None, ema: bool = True) -> Tensor:
        """The velocity ``v(x, t)`` (an estimate of ``eps - x_0``) at times ``t`` (B,) in [0, 1], for class labels
        ``cond`` (B,) or None (unconditional; the null class of a conditional entreg denoiser), from the EMA
        weights (``ema=True``) or the trained ones. Gradients flow unless the caller disables them. This is the
        ``velocity(x, t, cond)`` callable of :func:`entreg.flow.sampling.ode_sample` and
        :func:`entreg.flow.rollout.rollout`."""
        return self._call(self.ema.module if ema else self.net, x, t, cond)

    def forward(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """The trained (not EMA) network's velocity at times ``t`` in [0, 1]."""
        return self.velocity(x, t, class_labels, ema=False)

    # ---- training -------------------------------------------------------------------------------------------

    def sample_times(self, n: int, generator: torch.Generator | None = None, device: Any = "cpu") -> Tensor:
        """``n`` training times in (0, 1): uniform or logit-normal (drawn on ``device``, or on the generator's)."""
        device = device if generator is None else generator.device
        if self.hparams.time_sampling == "uniform":
            return torch.rand(n, generator=generator, device=device)
        normal = torch.randn(n, generator=generator, device=device)
        return torch.sigmoid(self.hparams.logit_mean + self.hparams.logit_std * normal)

    def flow_matching_loss(
        self,
        net: nn.Module,
        x0: Tensor,
        class_labels: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """MSE between ``net``'s velocity at ``x_t = (1 - t) x0 + t eps`` and ``eps - x0``, with noise and times
        drawn from ``generator`` (a CPU generator, when given) or the global RNG."""
        device = x0.device if generator is None else generator.device
        noise = torch.randn(x0.shape, generator=generator, device=device).to(x0)
        t = self.sample_times(len(x0), generator, device).to(x0)
        t_ = t.reshape(-1, *([1] * (x0.ndim - 1)))
        prediction = self._call(net, (1 - t_) * x0 + t_ * noise, t, class_labels)
        return F.mse_loss(prediction.float(), (noise - x0).float())

    def _batch(self, batch: Any) -> tuple[Tensor, Tensor | None]:
        """The data of a batch and, when this model is conditional, its labels."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if self.num_classes is None:
            return x, None
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ValueError("a class-conditional FlowMatchingModule needs batches (x, labels)")
        return x, batch[1].long()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x0, labels = self._batch(batch)
        if labels is not None and self.class_dropout > 0:
            drop = torch.rand(len(labels), device=labels.device) < self.class_dropout
            labels = labels.masked_fill(drop, self.num_classes)
        loss = self.flow_matching_loss(self.net, x0, labels)
        return self.loss_step(loss, batch_idx, len(x0))

    def trained_network(self) -> nn.Module:
        return self.net

    # ---- sampling -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(
        self,
        n: int,
        steps: int | None = None,
        shift: float | None = None,
        generator: torch.Generator | None = None,
        class_labels: Tensor | None = None,
        shape: Sequence[int] | None = None,
        ema: bool = True,
    ) -> Tensor:
        """``n`` samples (n, *shape) by the Euler ODE (:func:`entreg.flow.sampling.ode_sample`) from noise drawn
        with ``generator`` (on its device), with ``steps`` (default ``sample_steps``) on the grid of ``shift``
        (default ``sample_shift``), for ``class_labels`` (n,) or unconditionally, from the EMA weights (or the
        trained ones with ``ema=False``)."""
        shape = self.sample_shape if shape is None else tuple(shape)
        if class_labels is not None:
            class_labels = torch.as_tensor(class_labels, device=self.device).long()
            if class_labels.shape != (n,):
                raise ValueError(f"class_labels must have shape ({n},), got {tuple(class_labels.shape)}")
        noise_device = self.device if generator is None else generator.device
        noise = torch.randn((n, *shape), generator=generator, device=noise_device).to(self.device)
        net = self.ema.module if ema else self.net
        was_training = net.training
        net.eval()
        try:
            return ode_sample(
                lambda x, t, cond: self._call(net, x, t, cond),
                noise,
                self.sample_steps if steps is None else steps,
                self.sample_shift if shift is None else shift,
                class_labels,
            )
        finally:
            net.train(was_training)

    # ---- validation -----------------------------------------------------------------------------------------

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        x0, labels = self._batch(batch)
        loss = self.flow_matching_loss(self.ema.module, x0, labels, torch.Generator().manual_seed(batch_idx))
        self.log("val/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(x0), sync_dist=True)
        held = sum(len(x) for x, _ in self._val_real)
        if held < self.num_val_samples:
            keep = self.num_val_samples - held
            self._val_real.append((x0[:keep].detach(), None if labels is None else labels[:keep]))
        return loss

    def on_validation_epoch_end(self) -> None:
        held, self._val_real = self._val_real, []
        every = self.sample_every_n_epochs
        if not held or self.trainer.sanity_checking or not every or (self.current_epoch + 1) % every:
            return
        real = torch.cat([x for x, _ in held])
        labels = None if self.num_classes is None else torch.cat([y for _, y in held])
        samples = self.sample(
            len(real), generator=torch.Generator().manual_seed(0), class_labels=labels, shape=real.shape[1:]
        )
        self.log_validation_samples(
            samples, sample_metrics(samples, real, self.feature_extractor, self.reference_mixture)
        )
