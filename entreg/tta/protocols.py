"""Test-time adaptation protocols, named as in the literature: which domains a stream holds, in which order, in
what batches, and when the method is reset.

A benchmark stream (e.g. CIFAR-10-C) gives its *domains*: objects with ``name``, ``dataset`` (items ``(image,
label)``), ``corruption`` and ``severity`` (``None`` for a domain that is not a corruption, e.g. ImageNet-R). A
:class:`Protocol` turns them into a :class:`Stream`: segments (one dataloader each, adapted one after the other)
and the reset mode of :class:`~entreg.callbacks.TestTimeAdaptation`. :data:`PROTOCOLS` holds the standard ones,
each described in one line (:func:`describe`); ``protocol(name, **changes)`` returns one with fields changed.
Orders are drawn from one seeded ``torch.Generator``, so a seed gives the same stream to every method.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from typing import Protocol as TypingProtocol

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import ConcatDataset, Dataset, Subset, TensorDataset

__all__ = [
    "PROTOCOLS",
    "DomainLike",
    "Protocol",
    "Segment",
    "Stream",
    "describe",
    "dirichlet_order",
    "labels_of",
    "protocol",
]

RESETS = ("per_dataloader", "continual", "episodic")


class DomainLike(TypingProtocol):
    """What a protocol reads from a benchmark's domain (``entreg.data``'s ``Domain`` has these fields)."""

    @property
    def name(self) -> str: ...
    @property
    def dataset(self) -> Dataset: ...
    @property
    def corruption(self) -> str | None: ...
    @property
    def severity(self) -> int | None: ...


@dataclass(frozen=True)
class Protocol:
    """How a stream is built from a benchmark's domains.

    Args:
        name: the protocol's name in :data:`PROTOCOLS`.
        description: one line.
        reset: the reset mode of :class:`~entreg.callbacks.TestTimeAdaptation`: ``per_dataloader`` (back to the
            source before each segment), ``continual`` (never) or ``episodic`` (before every batch).
        severities: the severities of each corruption, in stream order (``(1, 2, 3, 4, 5, 4, 3, 2, 1)`` for the
            gradual protocol); domains without a severity are kept as they are; ``None``: every domain as given.
        shuffle: shuffle the samples of each segment with the protocol's seed (default: keep the stream's order;
            entreg's benchmark streams shuffle each domain with their seed as mariodoebler's code does).
        label_shift: order each segment by class: sorted (``concentration=None``, SAR's "label shifts" with
            imbalance ratio 500000, nearly class order) or Dirichlet-correlated with ``concentration`` (NOTE's
            and mariodoebler's ``correlated`` setting: small values give long single-class runs).
        concentration: the Dirichlet concentration (mariodoebler's ``TEST.DELTA_DIRICHLET``; 0.01 in its
            ImageNet-C tables).
        mixed: all domains shuffled together into one segment.
        batch_size: the global batch size (``None``: the caller's, e.g. the stream's).
        open_set: samples of classes the model does not know are part of the stream (the domains' own, or those
            of an ``unknown`` dataset mixed into each segment, ``unknown_ratio`` of them per known sample).
        unknown_ratio: unknown samples per known sample when an ``unknown`` dataset is given.
    """

    name: str
    description: str
    reset: str = "per_dataloader"
    severities: tuple[int, ...] | None = (5,)
    shuffle: bool = False
    label_shift: bool = False
    concentration: float | None = None
    mixed: bool = False
    batch_size: int | None = None
    open_set: bool = False
    unknown_ratio: float = 1.0

    def __post_init__(self) -> None:
        if self.reset not in RESETS:
            raise ValueError(f"protocol {self.name}: reset must be one of {RESETS}, got {self.reset!r}")
        if self.severities is not None:
            object.__setattr__(self, "severities", tuple(int(s) for s in self.severities))
            if not self.severities or any(s < 1 for s in self.severities):
                raise ValueError(f"protocol {self.name}: severities must be ints >= 1, got {list(self.severities)}")
        if self.concentration is not None and not self.concentration > 0:
            raise ValueError(f"protocol {self.name}: concentration must be > 0 (None: class-sorted)")
        if self.batch_size is not None and (isinstance(self.batch_size, bool) or self.batch_size < 1):
            raise ValueError(f"protocol {self.name}: batch_size must be an int >= 1, got {self.batch_size!r}")
        if not self.unknown_ratio > 0:
            raise ValueError(f"protocol {self.name}: unknown_ratio must be > 0, got {self.unknown_ratio}")

    def build(
        self,
        domains: Sequence[DomainLike],
        batch_size: int | None = None,
        seed: int = 0,
        unknown: Dataset | Sequence[DomainLike] | None = None,
    ) -> Stream:
        """The stream of ``domains``: segments in order, each with its samples' order and global batch size.

        ``batch_size``: the caller's (the protocol's own wins); ``unknown`` (open set): a dataset of samples
        outside the model's classes (labels ignored, read as -1), or domains matched to ``domains`` by corruption
        and severity. Raises if a severity the protocol needs is missing.
        """
        size = self.batch_size or batch_size
        if size is None:
            raise ValueError(f"protocol {self.name}: no batch size (pass batch_size or set the protocol's)")
        if unknown is not None and not self.open_set:
            raise ValueError(f"protocol {self.name} takes no unknown samples (protocol open_set does)")
        picked = self._select(list(domains))
        generator = torch.Generator().manual_seed(seed)
        datasets = [(name, self._with_unknown(d, unknown, generator)) for name, d in picked]
        if self.mixed:
            datasets = [("mixed", ConcatDataset([dataset for _, dataset in datasets]))]
        segments = [Segment(name, dataset, self._order(dataset, generator), size) for name, dataset in datasets]
        return Stream(self, segments)

    def _select(self, domains: list[DomainLike]) -> list[tuple[str, DomainLike]]:
        """(segment name, domain) in stream order: per corruption (in order of appearance), its severities in
        the protocol's order; a segment met twice (gradual) gets ``#2``."""
        if not domains:
            raise ValueError(f"protocol {self.name}: the stream has no domain")
        if self.severities is None:
            return [(d.name, d) for d in domains]
        by_key: dict[tuple[str, int], DomainLike] = {}
        picked: list[tuple[str, DomainLike | None]] = []  # None: a corruption, its severities filled in below
        for d in domains:
            if d.severity is None:
                picked.append((d.name, d))  # keeps its place among the corruptions
                continue
            corruption = d.corruption or d.name
            if not any(by_corruption == corruption for by_corruption, _ in by_key):
                picked.append((corruption, None))
            by_key[(corruption, int(d.severity))] = d
        out: list[tuple[str, DomainLike]] = []
        seen: dict[str, int] = {}
        several = len(self.severities) > 1
        for name, domain in picked:
            if domain is not None:
                out.append((name, domain))
                continue
            for severity in self.severities:
                if (name, severity) not in by_key:
                    have = sorted(s for c, s in by_key if c == name)
                    raise ValueError(
                        f"protocol {self.name} needs {name} at severities {list(self.severities)}; the stream has "
                        f"{have} (load them, e.g. stream.severities={sorted(set(self.severities))})"
                    )
                label = f"{name}-{severity}" if several else name
                seen[label] = seen.get(label, 0) + 1
                out.append((label if seen[label] == 1 else f"{label}#{seen[label]}", by_key[(name, severity)]))
        return out

    def _with_unknown(
        self, domain: DomainLike, unknown: Dataset | Sequence[DomainLike] | None, generator: torch.Generator
    ) -> Dataset:
        """The domain's dataset, with unknown samples appended (open set)."""
        if unknown is None:
            return domain.dataset
        if not isinstance(unknown, Dataset):
            match = [u for u in unknown if (u.corruption, u.severity) == (domain.corruption, domain.severity)]
            if not match:
                raise ValueError(f"open_set: no unknown domain for {domain.corruption} at severity {domain.severity}")
            unknown = match[0].dataset
        count = min(len(unknown), math.ceil(self.unknown_ratio * len(domain.dataset)))
        chosen = torch.randperm(len(unknown), generator=generator)[:count]
        return ConcatDataset([domain.dataset, Subset(_Unknown(unknown), chosen.tolist())])

    def _order(self, dataset: Dataset, generator: torch.Generator) -> Tensor:
        """The positions of ``dataset`` in stream order."""
        indices = torch.arange(len(dataset))
        if self.shuffle:
            indices = torch.randperm(len(dataset), generator=generator)
        if not self.label_shift:
            return indices
        labels = labels_of(dataset)[indices]
        if self.concentration is None:
            return indices[torch.argsort(labels, stable=True)]  # by class; within a class in the previous order
        return indices[dirichlet_order(labels, self.concentration, generator)]


class _Unknown(Dataset):
    """Items of ``dataset`` with the label -1 (a class the model does not know)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.dataset[index][0], -1


@dataclass
class Segment:
    """One dataloader of a stream: ``dataset[indices]`` in this order, in global batches of ``batch_size``."""

    name: str
    dataset: Dataset
    indices: Tensor
    batch_size: int

    def __len__(self) -> int:
        return len(self.indices)


@dataclass
class Stream:
    """A protocol's segments, adapted in order, and how the method is reset (``protocol.reset``)."""

    protocol: Protocol
    segments: list[Segment]

    @property
    def reset(self) -> str:
        return self.protocol.reset

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.segments]


PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in (
        Protocol("mild", "each corruption at severity 5 a stream of its own, the method reset before each"),
        Protocol("continual", "the corruptions in order at severity 5, one after the other, never reset", "continual"),
        Protocol(
            "mixed", "every corruption at severity 5 shuffled into one stream", "continual", shuffle=True, mixed=True
        ),
        Protocol(
            "label_shift",
            "each corruption at severity 5 ordered by class (Dirichlet-correlated with a concentration), reset before "
            "each",
            label_shift=True,
        ),
        Protocol(
            "gradual",
            "each corruption at severities 1, 2, 3, 4, 5, 4, 3, 2, 1 in turn, never reset",
            "continual",
            severities=(1, 2, 3, 4, 5, 4, 3, 2, 1),
        ),
        Protocol(
            "bs1",
            "each corruption at severity 5 one image at a time (SAR's wild setting), reset before each",
            batch_size=1,
        ),
        Protocol(
            "open_set",
            "each corruption at severity 5 with samples of unknown classes mixed in, reset before each",
            open_set=True,
        ),
    )
}


def protocol(name: str, **changes: Any) -> Protocol:
    """The protocol ``name`` of :data:`PROTOCOLS` with ``changes`` to its fields (e.g. ``severities=(3,)``).

    Example:
        >>> protocol("label_shift", concentration=0.01).concentration
        0.01
        >>> protocol("continuous")
        Traceback (most recent call last):
        ...
        ValueError: unknown protocol 'continuous'; valid: [...] (did you mean 'continual'?)
    """
    if name not in PROTOCOLS:
        close = difflib.get_close_matches(name, PROTOCOLS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown protocol {name!r}; valid: {sorted(PROTOCOLS)}{hint}")
    if "severities" in changes and changes["severities"] is not None:
        changes["severities"] = tuple(changes["severities"])
    return dataclasses.replace(PROTOCOLS[name], **changes)


def describe() -> str:
    """One line per protocol.

    Example:
        >>> print(describe().splitlines()[1])
        continual: the corruptions in order at severity 5, one after the other, never reset
    """
    return "\n".join(f"{p.name}: {p.description}" for p in PROTOCOLS.values())


def labels_of(dataset: Dataset) -> Tensor:
    """The labels of ``dataset`` (long tensor): from ``targets``/``labels``, a TensorDataset's second tensor,
    through Subset and ConcatDataset, else by reading every item's second element."""
    if isinstance(dataset, Subset):
        return labels_of(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    if isinstance(dataset, ConcatDataset):
        return torch.cat([labels_of(d) for d in dataset.datasets])
    if isinstance(dataset, _Unknown):
        return torch.full((len(dataset),), -1, dtype=torch.long)
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) > 1:
        return dataset.tensors[1].long()
    for attribute in ("targets", "labels"):
        if hasattr(dataset, attribute):
            return torch.as_tensor(np.asarray(getattr(dataset, attribute)), dtype=torch.long)
    return torch.as_tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.long)


def dirichlet_order(
    labels: Tensor, concentration: float, generator: torch.Generator, min_chunk: int = 10, max_tries: int = 1000
) -> Tensor:
    """A class-correlated order of ``labels`` (positions), after NOTE (Gong et al., NeurIPS 2022) as
    mariodoebler/test-time-adaptation's ``sort_by_dirichlet``: C chunks (C = number of classes); each class's
    samples, shuffled, are split over the chunks by proportions drawn from Dir(concentration), chunks already
    holding N/C samples getting none; drawn again until every chunk has ``min_chunk`` samples (at most N // C);
    the chunks are then emitted in order, each one class after another in a shuffled class order.

    Example:
        >>> labels = torch.arange(10).repeat(30)
        >>> order = dirichlet_order(labels, 0.01, torch.Generator().manual_seed(0))
        >>> sorted(order.tolist()) == list(range(300)), int((labels[order][1:] != labels[order][:-1]).sum()) < 60
        (True, True)
    """
    n = len(labels)
    classes = int(labels.max()) + 1 if n else 0
    rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=generator)))
    y = labels.cpu().numpy()
    need = min(min_chunk, n // max(classes, 1))
    for _ in range(max_tries):
        chunks: list[list[np.ndarray]] = [[] for _ in range(classes)]
        sizes = np.zeros(classes, dtype=np.int64)
        for k in range(classes):
            members = rng.permutation(np.flatnonzero(y == k))
            p = rng.dirichlet(np.full(classes, concentration)) * (sizes < n / classes)
            cuts = (np.cumsum(p / p.sum()) * len(members)).astype(int)[:-1]
            for chunk, part in zip(chunks, np.split(members, cuts), strict=True):
                chunk.append(part)
            sizes += np.array([len(part) for part in np.split(members, cuts)])
        if sizes.min() >= need:
            break
    else:
        raise ValueError(f"dirichlet_order: no split with {need} samples per chunk at concentration {concentration}")
    order = [part for chunk in chunks for k in rng.permutation(classes) for part in (chunk[k],)]
    return torch.as_tensor(np.concatenate(order) if order else np.zeros(0, dtype=np.int64), dtype=torch.long)
