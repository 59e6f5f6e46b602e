"""Run a test-time adaptation method over a protocol's stream with :class:`TestTimeAdaptation`, and build the
standard table (:class:`entreg.tta.benchmark.BenchmarkTable`): online error per segment and the mean, one row per
method, ``source`` and ``bn_adapt`` included (they are methods like the others).

The adaptation is the callback's, DDP path included; this module only feeds it the stream (one test dataloader per
segment, split across ranks by :mod:`entreg.tta.stream_loader`) and records what it did (:class:`OnlineRecorder`).
The model is wrapped so that the test step does nothing but the callback's adaptation (no second forward pass).
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from entreg.callbacks.test_time_adaptation import TestTimeAdaptation
from entreg.distributed import all_gather_uneven
from entreg.tta.benchmark import BenchmarkTable, OnlineStats
from entreg.tta.protocols import Segment, Stream
from entreg.tta.stream_loader import segment_loader

__all__ = ["OnlineRecorder", "StreamDataModule", "run_benchmark", "run_stream"]

RESULTS_KEY = "tta_benchmark/results"  # rank zero's results, in callback_metrics (back from ddp_fork workers)
TrainerFactory = Callable[[list[L.Callback], bool], L.Trainer]  # (callbacks, log to the loggers) -> Trainer


class StreamDataModule(L.LightningDataModule):
    """A protocol's stream as Lightning sees it: one test dataloader per segment (this rank's share of each global
    batch), and clean source data as the validation dataloader (what the callback's ``source_batches`` reads, e.g.
    for EATA's Fisher information).

    Args:
        stream: the protocol's stream (:meth:`entreg.tta.protocols.Protocol.build`).
        source: clean samples ``(image, label)`` of the source distribution (``None``: none).
        source_batch_size: batch size of ``source`` (default: the stream's).
        loader_options: ``num_workers``, ``pin_memory``, ``persistent_workers`` of every loader.
    """

    def __init__(
        self,
        stream: Stream,
        source: Dataset | None = None,
        source_batch_size: int | None = None,
        loader_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.stream, self.source = stream, source
        self.source_batch_size = source_batch_size or stream.segments[0].batch_size
        self.loader_options = dict(loader_options or {})

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (0, 1) if trainer is None else (trainer.global_rank, trainer.world_size)

    def test_dataloader(self) -> list[DataLoader]:
        rank, world = self._rank()
        return [segment_loader(segment, rank, world, **self.loader_options) for segment in self.stream.segments]

    def val_dataloader(self) -> DataLoader:
        if self.source is None:
            raise ValueError(
                "this method reads clean source batches (source_batches > 0, e.g. EATA's Fisher information) and the "
                "stream has none: give clean source data (entreg-adapt source_data=<data config>) or set "
                "source_batches=0"
            )
        options = {k: v for k, v in self.loader_options.items() if k in ("num_workers", "pin_memory")}
        return DataLoader(self.source, batch_size=self.source_batch_size, shuffle=False, **options)


class _Predictor(L.LightningModule):
    """``model`` behind a test step that does nothing: the callback's adaptation step is the whole work."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        num_classes = getattr(getattr(model, "hparams", {}), "num_classes", None)
        if num_classes is not None:
            self.save_hyperparameters({"num_classes": int(num_classes)})

    def forward(self, x: Tensor) -> Any:
        return self.model(x)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        return None


class OnlineRecorder(L.Callback):
    """Records, per test dataloader (segment), the pre-update logits of ``tta`` with the batch's labels
    (:class:`~entreg.tta.benchmark.OnlineStats`), sums them over DDP ranks when the run ends, and then measures the
    adapted model, as adaptation left it and without updates, on the segments of ``after`` (e.g. the clean test set:
    forgetting). :attr:`results` (on every rank, and in the main process of a ``ddp_fork`` run through
    ``callback_metrics``): ``{"segments": {name: metrics}, "after": {name: metrics}, "extra": {seconds,
    images_per_second}}``, seconds from the start of the test loop (the method built, EATA's Fisher computed) to
    its end."""

    def __init__(self, tta: TestTimeAdaptation, names: list[str], after: Mapping[str, Segment] | None = None) -> None:
        self.tta, self.names, self.after = tta, list(names), dict(after or {})
        self.stats: dict[int, OnlineStats] = {}
        self.results: dict[str, Any] | None = None
        self._start = 0.0

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.stats, self.results = {i: OnlineStats() for i in range(len(self.names))}, None
        self._start = time.perf_counter()

    def on_test_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        stats = self.stats[dataloader_idx]
        inputs, targets = (batch[0], batch[1]) if isinstance(batch, (list, tuple)) and len(batch) > 1 else (batch, None)
        if self.tta.last_logits is None:
            stats.skip(len(inputs))
            return
        method = self.tta.method
        stats.update(self.tta.last_logits, targets, self.tta.last_info, method.updates, trainer.world_size)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        seconds = time.perf_counter() - self._start
        segments = {name: self._total(trainer, self.stats[i]) for i, name in enumerate(self.names)}
        after = {name: self._total(trainer, self._evaluate(trainer, segment)) for name, segment in self.after.items()}
        samples = sum(r["samples"] for r in segments.values())
        extra = {"seconds": seconds, "images_per_second": samples / seconds if seconds else None}
        self.results = {"segments": segments, "after": after, "extra": extra}
        encoded = torch.frombuffer(bytearray(json.dumps(self.results).encode()), dtype=torch.uint8)
        trainer.callback_metrics[RESULTS_KEY] = encoded  # read back in the main process of a ddp_fork run

    @staticmethod
    def _total(trainer: L.Trainer, stats: OnlineStats) -> dict[str, Any]:
        """The metrics of ``stats`` summed over the ranks."""
        strategy = trainer.strategy
        if trainer.world_size > 1:
            stats.load_vector(strategy.reduce(stats.vector().to(strategy.root_device), reduce_op="sum"))
            if stats.msp:  # the open-set scores of every rank
                flags = torch.cat(stats.known_flags).to(strategy.root_device)
                scores = torch.cat(stats.msp).to(strategy.root_device)
                stats.known_flags = [all_gather_uneven(strategy, flags).cpu()]
                stats.msp = [all_gather_uneven(strategy, scores).cpu()]
        return stats.result()

    @torch.no_grad()
    def _evaluate(self, trainer: L.Trainer, segment: Segment) -> OnlineStats:
        """The adapted model's predictions on ``segment`` (this rank's share), no update."""
        method, device, stats = self.tta.method, trainer.strategy.root_device, OnlineStats()
        for batch in segment_loader(segment, trainer.global_rank, trainer.world_size):
            stats.update(method.logits(batch[0].to(device)), batch[1].to(device), updates=False)
        return stats


def run_stream(
    model: nn.Module,
    stream: Stream,
    tta: TestTimeAdaptation,
    trainer: TrainerFactory,
    source: Dataset | None = None,
    after: Mapping[str, Segment] | None = None,
    loader_options: Mapping[str, Any] | None = None,
    log: bool = False,
    seed: int | None = None,
    source_batch_size: int | None = None,
) -> dict[str, Any]:
    """Adapt ``model`` with ``tta`` over ``stream`` (its reset mode set on the callback) in
    ``trainer(callbacks, log).test``; returns ``{"segments": {name: metrics}, "after": {name: metrics}, "extra":
    {seconds, images_per_second}}`` (:meth:`OnlineStats.result <entreg.tta.benchmark.OnlineStats.result>`; "after":
    the adapted model on each segment of ``after``, no update).
    ``seed``: ``torch.manual_seed`` just before the run (DeYO's patch shuffle draws from the global generator);
    ``source``/``source_batch_size``: clean batches for the callback's ``source_batches`` (:class:`StreamDataModule`).
    ``model`` is adapted in place and given back as it came by the callback (``keep_adapted=False``)."""
    if tta.module:
        tta.module = f"model.{tta.module}"  # inside the wrapper
    tta.reset = stream.reset
    recorder = OnlineRecorder(tta, stream.names, after)
    runner = trainer([tta, recorder], log)
    datamodule = StreamDataModule(stream, source, source_batch_size, loader_options)
    if seed is not None:
        torch.manual_seed(seed)
    runner.test(_Predictor(model), datamodule=datamodule, verbose=False)
    if recorder.results is not None:
        return recorder.results
    encoded = runner.callback_metrics.get(RESULTS_KEY)
    if encoded is None:
        raise RuntimeError("the test run returned no results (did it end early?)")
    return json.loads(bytes(encoded.to(torch.uint8).tolist()).decode())


def run_benchmark(
    model: nn.Module,
    stream: Stream,
    rows: Mapping[str, Callable[[], TestTimeAdaptation]],
    trainer: TrainerFactory,
    source: Dataset | None = None,
    after: Mapping[str, Segment] | None = None,
    loader_options: Mapping[str, Any] | None = None,
    log: Callable[[str], bool] = lambda label: False,
    seed: int | None = None,
    source_batch_size: int | None = None,
) -> BenchmarkTable:
    """One :func:`run_stream` per row (a label and a factory of its callback, e.g. ``{"source": lambda:
    TestTimeAdaptation("source"), "tent": lambda: TestTimeAdaptation("tent", lr=1e-3)}``), each on the same stream
    and the same source model; ``log(label)``: whether that row writes its per-batch ``tta/*`` values to the
    loggers. Returns the table (extra per row: seconds, images/s, and ``after``: the metrics of each segment of
    ``after``)."""
    table = BenchmarkTable(stream.names, info={"protocol": stream.protocol.name, "reset": stream.reset})
    for label, make in rows.items():
        fresh = copy.deepcopy(model)  # every row from the source model, whatever a callback leaves behind
        result = run_stream(
            fresh, stream, make(), trainer, source, after, loader_options, log(label), seed, source_batch_size
        )
        table.add(label, result["segments"], **result["extra"], after=result["after"])
    return table
