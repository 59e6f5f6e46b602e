"""Rewards for text-to-image GRPO, as plug-ins: ``reward(images, prompts) -> (B,)`` for a batch of decoded images
(B, 3, H, W) in [0, 1] and their prompts. :class:`entreg.modules.grpo_pipeline.GRPOPipelineModule` calls them
without gradients; any callable of this signature works.

Built in and offline:

- :class:`JPEGCompressibility`: minus the JPEG size in kB at quality 95 (Flow-GRPO's and DDPO's toy reward;
  ``incompressible=True`` gives plus the size);
- :class:`ClassifierImageReward`: ``log p(target | image)`` of any image classifier (a fixed class, or one per
  prompt);
- :class:`WeightedReward`: a weighted sum of named rewards (each component's mean is kept in ``last``).

From weights on local disk (``transformers``; nothing is downloaded, a missing path is a clear error):

- :class:`CLIPScore`: cosine similarity of CLIP image and text embeddings (times ``scale``), from a CLIP model
  directory saved with ``save_pretrained`` (e.g. ``openai/clip-vit-large-patch14``); PickScore is the same
  computation with PickScore's weights and the logit scale (:func:`pickscore`);
- :class:`AestheticScore`: the LAION aesthetic predictor, an MLP head on CLIP ViT-L/14 image embeddings;
- :class:`HPSv2`: HPS-v2.1, which needs ``open_clip_torch`` and the ``HPS_v2.1_compressed.pt`` checkpoint.

Example:
    >>> images = torch.zeros(2, 3, 16, 16)
    >>> images[1] = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))  # noise compresses badly
    >>> reward = JPEGCompressibility()
    >>> r = reward(images, ["a", "b"])
    >>> r.shape, bool(r[0] > r[1])
    (torch.Size([2]), True)
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = [
    "AestheticScore",
    "CLIPScore",
    "ClassifierImageReward",
    "HPSv2",
    "ImageReward",
    "JPEGCompressibility",
    "WeightedReward",
    "pickscore",
]

ImageReward = Callable[[Tensor, Sequence[str]], Tensor]


def _check_images(images: Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be a (B, 3, H, W) batch in [0, 1], got shape {tuple(images.shape)}")


def _local_dir(path: str | Path | None, what: str) -> Path:
    if path is None:
        raise ValueError(f"{what} needs the path of its weights on local disk (nothing is downloaded)")
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{what}: {path} does not exist (save the model there first; nothing is downloaded)")
    return path


class JPEGCompressibility:
    """``-size`` (or ``+size`` with ``incompressible``) of each image as a JPEG at ``quality``, in kB.

    Example:
        >>> flat = torch.full((1, 3, 32, 32), 0.5)
        >>> JPEGCompressibility(incompressible=True)(flat, ["p"]).item() > 0
        True
    """

    def __init__(self, incompressible: bool = False, quality: int = 95) -> None:
        if not 1 <= quality <= 100:
            raise ValueError(f"quality must be in [1, 100], got {quality}")
        self.sign, self.quality = (1.0 if incompressible else -1.0), quality

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        from PIL import Image

        _check_images(images)
        pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
        sizes = []
        for array in pixels.numpy():
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, format="JPEG", quality=self.quality)
            sizes.append(buffer.tell() / 1000.0)
        return self.sign * torch.tensor(sizes, dtype=torch.float32)


class ClassifierImageReward(nn.Module):
    """``log p(target | image)`` of a frozen image classifier (kept in eval mode).

    Args:
        classifier: images (B, 3, H, W) in [0, 1] (after ``transform``) -> logits (B, K).
        target: the rewarded class, or a mapping prompt -> class.
        transform: applied to the images first (e.g. resizing and normalisation).

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
        >>> reward = ClassifierImageReward(net, target={"cat": 0, "dog": 1})
        >>> images = torch.rand(2, 3, 4, 4)
        >>> torch.allclose(reward(images, ["cat", "dog"]), net(images).log_softmax(-1)[[0, 1], [0, 1]])
        True
    """

    def __init__(
        self,
        classifier: nn.Module,
        target: int | Mapping[str, int],
        transform: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)
        self.target, self.transform = target, transform

    def train(self, mode: bool = True) -> ClassifierImageReward:
        super().train(mode)
        self.classifier.eval()
        return self

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        _check_images(images)
        if isinstance(self.target, Mapping):
            unknown = sorted({p for p in prompts if p not in self.target})
            if unknown:
                raise ValueError(f"no target class for the prompts {unknown}")
            classes = [self.target[p] for p in prompts]
        else:
            classes = [int(self.target)] * len(images)
        x = images if self.transform is None else self.transform(images)
        logits = self.classifier(x).float()
        index = torch.tensor(classes, device=logits.device)
        return logits.log_softmax(-1).gather(1, index[:, None]).squeeze(1)


class WeightedReward:
    """``sum_k weights[k] * rewards[k](images, prompts)``; ``last`` holds each component's mean of the latest
    call (to log them).

    Example:
        >>> reward = WeightedReward({"jpeg": JPEGCompressibility(), "zero": lambda x, p: torch.zeros(len(x))},
        ...                         {"jpeg": 0.5, "zero": 2.0})
        >>> images = torch.full((1, 3, 16, 16), 0.5)
        >>> torch.allclose(reward(images, ["p"]), 0.5 * JPEGCompressibility()(images, ["p"])), sorted(reward.last)
        (True, ['jpeg', 'zero'])
    """

    def __init__(self, rewards: Mapping[str, ImageReward], weights: Mapping[str, float] | None = None) -> None:
        if not rewards:
            raise ValueError("WeightedReward needs at least one reward")
        weights = dict.fromkeys(rewards, 1.0) if weights is None else dict(weights)
        if set(weights) != set(rewards):
            raise ValueError(f"weights must name the rewards {sorted(rewards)}, got {sorted(weights)}")
        self.rewards, self.weights = dict(rewards), {k: float(v) for k, v in weights.items()}
        self.last: dict[str, float] = {}

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        total = torch.zeros(len(images))
        for name, reward in self.rewards.items():
            value = torch.as_tensor(reward(images, prompts)).float().cpu().reshape(-1)
            if value.shape != (len(images),):
                raise ValueError(f"reward {name!r} returned shape {tuple(value.shape)}, expected ({len(images)},)")
            self.last[name] = float(value.mean())
            total = total + self.weights[name] * value
        return total


class CLIPScore(nn.Module):
    """``scale * cos(image embedding, text embedding)`` of a CLIP model loaded with ``transformers`` from a local
    directory (``CLIPModel`` and its processor; ``processor_path`` when the processor lives elsewhere, as for
    PickScore). Images are resized and normalised by the processor's settings, differentiably.

    Example (a missing path):
        >>> CLIPScore("/no/such/clip")
        Traceback (most recent call last):
        ...
        FileNotFoundError: CLIPScore: /no/such/clip does not exist (save the model there first; nothing is downloaded)
    """

    def __init__(self, model_path: str | Path, processor_path: str | Path | None = None, scale: float = 1.0) -> None:
        super().__init__()
        from transformers import CLIPModel, CLIPProcessor

        model_dir = _local_dir(model_path, type(self).__name__)
        processor_dir = _local_dir(processor_path or model_path, type(self).__name__)
        model = CLIPModel.from_pretrained(model_dir, local_files_only=True)  # offline-ok: a local folder only
        self.model = model.eval().requires_grad_(False)
        self.processor = CLIPProcessor.from_pretrained(processor_dir, local_files_only=True)  # offline-ok
        image_processor = self.processor.image_processor
        size = image_processor.crop_size
        self.size = (int(size["height"]), int(size["width"])) if "height" in size else (int(size), int(size))
        self.register_buffer("mean", torch.tensor(image_processor.image_mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(image_processor.image_std).view(1, 3, 1, 1))
        self.scale = scale

    def train(self, mode: bool = True) -> CLIPScore:
        super().train(mode)
        self.model.eval()
        return self

    def image_features(self, images: Tensor) -> Tensor:
        """Unit-norm CLIP image embeddings of images in [0, 1]."""
        _check_images(images)
        x = nn.functional.interpolate(images.float(), size=self.size, mode="bicubic", align_corners=False)
        x = (x.clamp(0, 1) - self.mean) / self.std
        features = self.model.get_image_features(pixel_values=x.to(self.model.dtype))
        features = getattr(features, "pooler_output", features)
        return nn.functional.normalize(features.float(), dim=-1)

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        tokens = self.processor.tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt")
        text = self.model.get_text_features(**{k: v.to(images.device) for k, v in tokens.items()})
        text = nn.functional.normalize(getattr(text, "pooler_output", text).float(), dim=-1)
        return self.scale * (self.image_features(images) * text).sum(-1)


def pickscore(model_path: str | Path, processor_path: str | Path) -> CLIPScore:
    """PickScore (Kirstain et al. 2023): :class:`CLIPScore` with PickScore's weights (``yuvalkirstain/PickScore_v1``
    saved locally), the processor of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` and the model's logit scale."""
    reward = CLIPScore(model_path, processor_path)
    reward.scale = float(reward.model.logit_scale.exp())
    return reward


class AestheticScore(nn.Module):
    """The LAION aesthetic predictor v2: an MLP (768 -> 1024 -> 128 -> 64 -> 16 -> 1) on unit-norm CLIP ViT-L/14
    image embeddings. ``clip_path``: a local ``openai/clip-vit-large-patch14``; ``head_path``: the predictor's
    state dict (``sac+logos+ava1-l14-linearMSE.pth``, keys ``layers.{0,2,4,6,7}.*``)."""

    def __init__(self, clip_path: str | Path, head_path: str | Path) -> None:
        super().__init__()
        head_file = _local_dir(head_path, type(self).__name__)
        self.clip = CLIPScore(clip_path)
        dim = self.clip.model.config.projection_dim
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2), nn.Linear(128, 64),
            nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )  # fmt: skip
        state = torch.load(head_file, map_location="cpu", weights_only=True)
        self.load_state_dict({k: v for k, v in state.items() if k.startswith("layers.")}, strict=False)
        self.requires_grad_(False).eval()

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return self.layers(self.clip.image_features(images)).squeeze(-1)


class HPSv2(nn.Module):
    """HPS-v2.1 (Wu et al. 2023): ``open_clip``'s ViT-H-14 with the HPS checkpoint, ``cos(image, text)`` of its
    embeddings (E-GRPO's and DanceGRPO's reward). Needs ``pip install open_clip_torch`` and the checkpoint
    ``HPS_v2.1_compressed.pt`` at ``checkpoint`` (the ViT-H-14 architecture is built without weights)."""

    def __init__(self, checkpoint: str | Path) -> None:
        super().__init__()
        path = _local_dir(checkpoint, type(self).__name__)
        try:
            import open_clip
        except ImportError as error:
            raise ImportError("HPSv2 needs open_clip_torch: pip install open_clip_torch") from error
        model, _, preprocess = open_clip.create_model_and_transforms("ViT-H-14", pretrained=None)
        state = torch.load(path, map_location="cpu", weights_only=False)
        model.load_state_dict(state.get("state_dict", state))
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer("ViT-H-14")
        normalize = preprocess.transforms[-1]
        self.register_buffer("mean", torch.tensor(normalize.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(normalize.std).view(1, 3, 1, 1))

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        _check_images(images)
        x = nn.functional.interpolate(images.float(), size=(224, 224), mode="bicubic", align_corners=False)
        image = nn.functional.normalize(self.model.encode_image((x.clamp(0, 1) - self.mean) / self.std), dim=-1)
        text = nn.functional.normalize(self.model.encode_text(self.tokenizer(list(prompts)).to(x.device)), dim=-1)
        return (image * text).sum(-1)
