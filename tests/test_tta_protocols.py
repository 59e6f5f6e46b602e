"""Protocols turn a benchmark's domains into streams as the references build them; the stream's loaders split each
global batch across DDP ranks without duplicates or drops."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import entreg.configs
import pytest
import torch
from hydra.utils import instantiate
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.data import ConcatDataset, Dataset, DistributedSampler, Subset, TensorDataset

from entreg.tta.protocols import PROTOCOLS, describe, dirichlet_order, labels_of, protocol
from entreg.tta.stream_loader import RankBatches, global_batches, segment_loader

CORRUPTIONS = ("gaussian_noise", "fog", "contrast")
CONFIG_DIR = Path(entreg.configs.__file__).parent


class Domain(NamedTuple):  # the fields of entreg.data's Domain
    name: str
    dataset: Dataset
    corruption: str | None
    severity: int | None


def domains(n: int = 20, severities=(1, 2, 3, 4, 5), classes: int = 4) -> list[Domain]:
    """Corruption-major domains; sample i of corruption c at severity s has the id 1000 c + 100 s + i (input)."""
    out = []
    for c, corruption in enumerate(CORRUPTIONS):
        for s in severities:
            ids = torch.arange(n) + 1000 * c + 100 * s
            out.append(Domain(f"{corruption}_{s}", TensorDataset(ids, ids % classes), corruption, s))
    return out


def ids(segment) -> list[int]:
    return (
        segment.dataset.tensors[0][segment.indices].tolist()
        if isinstance(segment.dataset, TensorDataset)
        else [int(segment.dataset[int(i)][0]) for i in segment.indices]
    )


def test_every_protocol_is_described_in_one_line_and_its_config_is_its_registry_entry():
    from hydra import compose, initialize_config_module

    assert {"mild", "continual", "mixed", "label_shift", "gradual", "bs1", "open_set"} == set(PROTOCOLS)
    assert len(describe().splitlines()) == len(PROTOCOLS)
    assert sorted(p.stem for p in (CONFIG_DIR / "protocol").glob("*.yaml")) == sorted(PROTOCOLS)
    for name in PROTOCOLS:
        with initialize_config_module("entreg.configs", version_base="1.3"):
            cfg = compose("adapt", overrides=[f"protocol={name}", "paths.output_dir=unused"])
        assert instantiate(cfg.protocol, _convert_="all") == PROTOCOLS[name]
        assert f"# {name}: " in (CONFIG_DIR / "protocol" / f"{name}.yaml").read_text()


def test_continual_visits_the_corruptions_in_order_at_severity_5_and_never_resets():
    stream = protocol("continual").build(domains(), batch_size=8)
    assert stream.names == list(CORRUPTIONS) and stream.reset == "continual"
    for c, segment in enumerate(stream.segments):
        assert ids(segment) == list(range(1000 * c + 500, 1000 * c + 520))  # the stream's order, kept
        assert segment.batch_size == 8
    assert protocol("mild").build(domains(), batch_size=8).reset == "per_dataloader"


def test_gradual_goes_up_and_down_the_severities_of_each_corruption():
    stream = protocol("gradual").build(domains(), batch_size=8)
    expected = [n for c in CORRUPTIONS for n in [*(f"{c}-{s}" for s in (1, 2, 3, 4, 5)),
                                                 *(f"{c}-{s}#2" for s in (4, 3, 2, 1))]]  # fmt: skip
    assert stream.names == expected and stream.reset == "continual"
    assert ids(stream.segments[5])[0] == 400 and ids(stream.segments[9])[0] == 1100
    message = r"needs gaussian_noise at severities \[1, 2, 3, 4, 5, 4, 3, 2, 1\]; the stream has \[5\] \(load them"
    with pytest.raises(ValueError, match=message):
        protocol("gradual").build(domains(severities=(5,)), batch_size=8)


def test_mixed_shuffles_every_sample_of_every_corruption_into_one_stream_by_the_seed():
    stream = protocol("mixed").build(domains(), batch_size=8, seed=3)
    (segment,) = stream.segments
    got = ids(segment)
    assert sorted(got) == sorted(i for c in range(3) for i in range(1000 * c + 500, 1000 * c + 520))
    assert got != sorted(got) and ids(protocol("mixed").build(domains(), 8, seed=3).segments[0]) == got
    assert ids(protocol("mixed").build(domains(), 8, seed=4).segments[0]) != got


def test_label_shift_sorts_by_class_or_correlates_by_dirichlet():
    stream = protocol("label_shift", shuffle=True).build(domains(n=40), batch_size=8, seed=0)
    for segment in stream.segments:
        labels = labels_of(segment.dataset)[segment.indices]
        assert bool((labels[1:] >= labels[:-1]).all())
    correlated = protocol("label_shift", concentration=0.01).build(domains(n=400), batch_size=8).segments[0]
    labels = labels_of(correlated.dataset)[correlated.indices]
    changes = int((labels[1:] != labels[:-1]).sum())
    assert sorted(correlated.indices.tolist()) == list(range(400)) and 3 <= changes < 40  # long runs, not sorted


def test_dirichlet_order_spreads_every_class_over_the_chunks_for_a_large_concentration():
    labels = torch.arange(10).repeat(100)
    order = dirichlet_order(labels, 1e4, torch.Generator().manual_seed(0))
    assert sorted(order.tolist()) == list(range(1000))
    # 10 chunks of 100, each all 10 classes one after the other (NOTE's construction): runs of about 10
    runs = labels[order].unique_consecutive(return_counts=True)[1]
    assert 90 <= len(runs) <= 100 and int(runs.max()) <= 25  # two chunks may meet on the same class
    with pytest.raises(ValueError, match="concentration must be > 0"):
        protocol("label_shift", concentration=0.0)


def test_bs1_and_open_set():
    assert {s.batch_size for s in protocol("bs1").build(domains(), batch_size=64).segments} == {1}
    unknown = TensorDataset(torch.full((50,), -7), torch.zeros(50, dtype=torch.long))
    stream = protocol("open_set", unknown_ratio=0.5).build(domains(), batch_size=8, unknown=unknown)
    labels = labels_of(stream.segments[0].dataset)[stream.segments[0].indices]
    assert len(labels) == 30 and int((labels == -1).sum()) == 10  # known labels 0..3, the 10 unknown read as -1
    assert stream.segments[0].dataset[25][0] == -7
    with pytest.raises(ValueError, match="protocol mild takes no unknown samples"):
        protocol("mild").build(domains(), batch_size=8, unknown=unknown)


def test_domains_without_severity_are_kept_in_place_and_errors_name_the_problem():
    folders = [Domain("sketch", TensorDataset(torch.arange(5), torch.zeros(5, dtype=torch.long)), None, None)]
    assert protocol("continual").build(folders, batch_size=2).names == ["sketch"]
    with pytest.raises(ValueError, match=r"unknown protocol 'continuous'; valid: .* \(did you mean 'continual'\?\)"):
        protocol("continuous")
    with pytest.raises(ValueError, match="no batch size"):
        protocol("mild").build(folders)


def test_labels_are_read_without_loading_images_where_the_dataset_says_them():
    class Targets(Dataset):
        targets = (3, 1, 2)

        def __len__(self):
            return 3

        def __getitem__(self, i):
            raise AssertionError("no image read")

    class Items(Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return torch.zeros(1), 5 + i

    both = ConcatDataset([Subset(Targets(), [2, 0]), Items()])
    assert labels_of(both).tolist() == [2, 3, 5, 6]


@given(st.integers(1, 70), st.integers(1, 9), st.integers(1, 4))
def test_ranks_read_each_sample_once_and_their_kth_batches_make_global_batch_k(size, batch, world):
    if batch < world:
        with pytest.raises(ValueError, match=f"cannot give each of {world} processes a sample"):
            global_batches(size, batch, world)
        return
    data = TensorDataset(torch.arange(size) * 10, torch.arange(size))
    segment = protocol("mild").build([Domain("d", data, "d", 5)], batch_size=batch).segments[0]
    ranks = [[y.tolist() for _, y in segment_loader(segment, rank, world)] for rank in range(world)]
    assert len({len(r) for r in ranks}) == 1  # the same number of batches everywhere: collectives cannot hang
    flat = sorted(y for r in ranks for b in r for y in b)
    assert flat == list(range(size))  # every sample once
    for k, batch_range in enumerate(global_batches(size, batch, world)):
        assert sorted(y for r in ranks for y in r[k]) == list(batch_range)
    one = [y.tolist() for _, y in segment_loader(segment)]
    assert one == [list(r) for r in global_batches(size, batch, 1)]


def test_lightning_keeps_the_stream_loaders_and_workers_draw_nothing_from_the_global_generator():
    data = TensorDataset(torch.arange(12.0), torch.arange(12))
    segment = protocol("mild").build([Domain("d", data, "d", 5)], batch_size=4).segments[0]
    loader = segment_loader(segment, rank=1, world_size=2)
    assert isinstance(loader.sampler, DistributedSampler)  # so Lightning adds no sampler of its own
    state = torch.get_rng_state()
    assert [y.tolist() for _, y in loader] == [[1, 3], [5, 7], [9, 11]]
    assert torch.equal(torch.get_rng_state(), state)

    class Items(Dataset):  # any dataset: items collated
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return torch.full((2,), float(i)), i

    batches = RankBatches(protocol("mild").build([Domain("d", Items(), "d", 5)], batch_size=5).segments[0])
    x, y = batches[0]
    assert x.shape == (5, 2) and y.tolist() == [0, 1, 2, 3, 4]
