"""ImageNet-C, ImageNet-R/A and ImageFolder streams on small trees in the published layouts: the id-list subset,
labels from the sorted wnids, the 200-class maps, orders, and errors naming the missing or damaged file."""

from __future__ import annotations

import hashlib
import json
import random

import pytest
import torch
from torchvision.datasets import ImageFolder

from entreg.data import (
    IMAGENET_A_CLASSES,
    IMAGENET_R_CLASSES,
    IMAGENET_WNIDS,
    ImageFolderStream,
    ImageNetADataModule,
    ImageNetCDataModule,
    ImageNetRDataModule,
    read_image_ids,
    robustbench_imagenet_c_ids,
)
from tests.stream_fixtures import save_jpeg, val_id, write_id_list, write_image_folder, write_imagenet_c

# wnids of ImageNet classes 0, 1, 500 and 999 (a partial tree must keep the full tree's labels)
WNIDS = {0: "n01440764", 1: "n01443537", 500: IMAGENET_WNIDS[500], 999: "n15075141"}
IDS = [val_id(WNIDS[999], 7), val_id(WNIDS[0], 3), val_id(WNIDS[500], 11), val_id(WNIDS[1], 2), val_id(WNIDS[0], 1)]
LABELS = [999, 0, 500, 1, 0]


# ---- the built-in class lists and id list ---------------------------------------------------------------------


def test_wnids_are_robustbench_class_map_byte_for_byte():
    assert len(IMAGENET_WNIDS) == 1000 and list(IMAGENET_WNIDS) == sorted(set(IMAGENET_WNIDS))
    class_map = json.dumps({wnid: i for i, wnid in enumerate(IMAGENET_WNIDS)})
    # md5 of robustbench/helper_files/imagenet_class_to_id_map.json (RobustBench@78fcc9e)
    assert hashlib.md5(class_map.encode()).hexdigest() == "0990e148dc205bf3639ab34f4be66bd4"


def test_robustbench_ids_are_its_file_byte_for_byte():
    ids = robustbench_imagenet_c_ids()
    # md5 of robustbench/helper_files/imagenet_test_image_ids.txt (RobustBench@78fcc9e; no trailing newline)
    assert hashlib.md5("\n".join(ids).encode()).hexdigest() == "8de8bbba2cf05cb54190e49247375985"
    assert len(ids) == len(set(ids)) == 5000 and len({i.split("/")[0] for i in ids}) == 997
    assert ids[0] == "n09468604/ILSVRC2012_val_00015253.JPEG"


def test_the_200_class_subsets_are_hendrycks_lists():
    for subset, md5 in (
        (IMAGENET_R_CLASSES, "66d6fbc5a378e0c0e69e86a85c3105be"),
        (IMAGENET_A_CLASSES, "a599898eec798bab5f74ff6ffff1b189"),
    ):
        assert len(subset) == 200 and list(subset) == sorted(set(subset)) and 0 <= subset[0] and subset[-1] < 1000
        assert hashlib.md5(str(list(subset)).encode()).hexdigest() == md5  # mariodoebler's masks (imagenet_subsets.py)
    assert IMAGENET_R_CLASSES != IMAGENET_A_CLASSES
    assert IMAGENET_R_CLASSES[:4] == (1, 2, 4, 6) and IMAGENET_A_CLASSES[:4] == (6, 11, 13, 15)


# ---- ImageNet-C -------------------------------------------------------------------------------------------------


@pytest.fixture
def imagenet_c(tmp_path):
    root = tmp_path / "ImageNet-C"
    write_imagenet_c(root, ["fog", "snow"], [3, 5], IDS)
    save_jpeg(root / "fog" / "5" / WNIDS[1] / "extra.JPEG")  # in the tree but not in the list
    return root


def test_id_list_gives_those_images_in_its_order_labelled_by_sorted_wnid(imagenet_c, tmp_path):
    ids_file = write_id_list(tmp_path / "ids.txt", IDS, crlf=True)  # mariodoebler's copy has CRLF endings
    dm = ImageNetCDataModule(imagenet_c, ["snow", "fog"], [5, 3], image_ids=str(ids_file), shuffle=False)
    dm.setup()
    assert [(d.name, d.corruption, d.severity) for d in dm.domains] == [
        ("snow_5", "snow", 5), ("snow_3", "snow", 3), ("fog_5", "fog", 5), ("fog_3", "fog", 3)
    ]  # fmt: skip
    for d in dm.domains:
        assert d.dataset.paths == [imagenet_c / d.corruption / str(d.severity) / i for i in IDS]
        assert d.dataset.targets == LABELS
    image, label = dm.domains[0].dataset[0]
    assert image.shape == (3, 224, 224) and image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    assert label == 999 and dm.num_classes == 1000 and dm.cropped and dm.class_subset is None


def test_all_finds_every_image_in_imagefolder_order_and_a_list_can_be_given_inline(imagenet_c):
    dm = ImageNetCDataModule(imagenet_c, ["fog"], [5], image_ids="all", shuffle=False)
    dm.setup()
    (domain,) = dm.domains
    reference = ImageFolder(str(imagenet_c / "fog" / "5"))  # the full tree would give the same order
    assert [str(p) for p in domain.dataset.paths] == [path for path, _ in reference.samples]
    assert sorted(domain.dataset.targets) == [0, 0, 1, 1, 500, 999]
    inline = ImageNetCDataModule(imagenet_c, ["fog"], image_ids=IDS[:2], shuffle=False)
    inline.setup()
    assert inline.domains[0].dataset.targets == [999, 0]


def test_shuffle_and_first_k_of_the_list(imagenet_c):
    dm = ImageNetCDataModule(imagenet_c, ["fog"], [3], image_ids=IDS, n_examples=4, shuffle=True, seed=2)
    dm.setup()
    order = list(range(4))
    random.Random(2).shuffle(order)
    assert dm.domains[0].dataset.targets == [LABELS[i] for i in order]


def test_robustbench_list_needs_only_the_images_the_stream_takes(tmp_path):
    root = tmp_path / "ImageNet-C"
    first = robustbench_imagenet_c_ids()[:3]
    write_imagenet_c(root, ["gaussian_noise"], [5], first, size=32)
    dm = ImageNetCDataModule(root, ["gaussian_noise"], n_examples=3, shuffle=False)  # default: RobustBench's ids
    dm.setup()
    assert dm.domains[0].dataset.targets == [IMAGENET_WNIDS.index(i.split("/")[0]) for i in first]
    more = ImageNetCDataModule(root, ["gaussian_noise"], n_examples=5)
    missing = root / "gaussian_noise" / "5" / robustbench_imagenet_c_ids()[3]
    with pytest.raises(
        FileNotFoundError, match=rf"2 of the 5 listed images are missing in .*gaussian_noise/5: {missing}"
    ):
        more.setup()


def test_imagenet_c_errors_name_the_folder_file_or_line(imagenet_c, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing folder .*ImageNet-C/fog/1, .*ImageNet-C/frost/3"):
        ImageNetCDataModule(imagenet_c, ["fog", "frost"], [1, 3])
    with pytest.raises(FileNotFoundError, match=r"root='.*nowhere' is not a directory.*zenodo\.org/records/2235448"):
        ImageNetCDataModule(tmp_path / "nowhere", ["fog"])
    bad = write_id_list(tmp_path / "bad.txt", [IDS[0], "n01440764"])
    with pytest.raises(ValueError, match=r"bad\.txt:2: 'n01440764' is not '<wnid>/<file>'"):
        ImageNetCDataModule(imagenet_c, ["fog"], image_ids=str(bad))
    unknown = write_id_list(tmp_path / "unknown.txt", [IDS[0], "n99999999/x.JPEG"])
    with pytest.raises(ValueError, match=r"unknown\.txt:2: 'n99999999/x\.JPEG' .* one of ImageNet's 1000 wnids"):
        ImageNetCDataModule(imagenet_c, ["fog"], image_ids=str(unknown))
    twice = write_id_list(tmp_path / "twice.txt", [IDS[0], IDS[1], IDS[0]])
    with pytest.raises(ValueError, match=r"twice\.txt:3: .* is listed twice"):
        read_image_ids(twice)
    with pytest.raises(FileNotFoundError, match=r"image id list not found: .*absent\.txt"):
        ImageNetCDataModule(imagenet_c, ["fog"], image_ids=str(tmp_path / "absent.txt"))
    (imagenet_c / "fog" / "5" / "n99999999").mkdir()
    with pytest.raises(
        ValueError, match=r"fog/5 has class folders that are not among the 1000 classes: \['n99999999'\]"
    ):
        ImageNetCDataModule(imagenet_c, ["fog"], image_ids="all").setup()


def test_a_truncated_jpeg_is_named_when_read(imagenet_c):
    path = imagenet_c / "fog" / "5" / IDS[2]
    path.write_bytes(path.read_bytes()[:300])
    dm = ImageNetCDataModule(imagenet_c, ["fog"], image_ids=IDS, shuffle=False, num_workers=0)
    dm.setup()
    dm.domains[0].dataset[1]  # the others read
    with pytest.raises(OSError, match=rf"cannot read image {path}"):
        dm.domains[0].dataset[2]


# ---- ImageNet-R / ImageNet-A ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "subset", "name"),
    [(ImageNetRDataModule, IMAGENET_R_CLASSES, "imagenet_r"), (ImageNetADataModule, IMAGENET_A_CLASSES, "imagenet_a")],
)
def test_200_class_streams_label_by_position_in_the_subset(tmp_path, module, subset, name):
    positions = [0, 57, 199]  # a partial tree: three of the 200 classes
    wnids = [IMAGENET_WNIDS[subset[j]] for j in positions]
    write_image_folder(tmp_path / name, wnids, per_class=2)
    dm = module(tmp_path / name, shuffle=False, num_workers=0)
    dm.setup()
    (domain,) = dm.domains
    assert (domain.name, domain.corruption, domain.severity) == (name, None, None)
    assert dm.num_classes == 200 and dm.class_subset == list(subset) and not dm.cropped
    assert domain.dataset.targets == [0, 0, 57, 57, 199, 199]
    for path, label in zip(domain.dataset.paths, domain.dataset.targets, strict=True):
        assert IMAGENET_WNIDS[dm.class_subset[label]] == path.parent.name  # the logit kept for label j is its class
    logits = torch.arange(1000.0).repeat(6, 1)  # logit k of a 1000-class model = k
    kept = logits[:, dm.class_subset]
    assert kept.shape == (6, 200)
    assert [int(kept[i, y]) for i, y in enumerate(domain.dataset.targets)] == [
        subset[j] for j in (0, 0, 57, 57, 199, 199)
    ]
    image, _ = domain.dataset[0]
    assert image.shape == (3, 40, 40)  # no resize by default: the model's transform does it (set_transform)


def test_a_folder_outside_the_subset_is_named(tmp_path):
    outside = IMAGENET_WNIDS[0]  # class 0 is in neither ImageNet-R nor ImageNet-A
    assert 0 not in IMAGENET_R_CLASSES and 0 not in IMAGENET_A_CLASSES
    write_image_folder(tmp_path / "imagenet-r", [IMAGENET_WNIDS[1], outside])
    with pytest.raises(
        ValueError, match=rf"imagenet-r has class folders that are not among the 200 classes: \['{outside}'\]"
    ):
        ImageNetRDataModule(tmp_path / "imagenet-r").setup()


def test_image_folder_stream_is_mariodoebler_order_over_torchvision_imagefolder(tmp_path):
    write_image_folder(tmp_path / "sketch", ["b_cls", "a_cls", "c_cls"], per_class=3)
    dm = ImageFolderStream(tmp_path / "sketch", shuffle=True, seed=1, num_workers=0)
    dm.setup()
    samples = ImageFolder(str(tmp_path / "sketch")).samples
    state = random.getstate()
    random.seed(1)
    random.shuffle(samples)  # mariodoebler: random.seed(seed); random.shuffle(ImageFolder(...).samples)
    random.setstate(state)
    dataset = dm.domains[0].dataset
    assert [(str(p), y) for p, y in zip(dataset.paths, dataset.targets, strict=True)] == samples
    assert dm.classes == ["a_cls", "b_cls", "c_cls"] and dm.num_classes == 3 and dm.domains[0].name == "sketch"


def test_image_folder_stream_classes_domains_and_subsets(tmp_path):
    for domain in ("clipart", "painting"):
        write_image_folder(tmp_path / "domainnet" / domain, ["dog", "cat"], per_class=2)
    dm = ImageFolderStream(
        tmp_path / "domainnet", classes=["dog", "cat", "cow"], class_subset=[5, 3, 9], domains=["painting", "clipart"],
        shuffle=False, num_workers=0,
    )  # fmt: skip
    dm.setup()
    assert [d.name for d in dm.domains] == ["painting", "clipart"] and dm.num_classes == 3
    assert dm.domains[0].dataset.targets == [1, 1, 0, 0]  # cat (label 1) sorts first on disk
    assert dm.class_subset == [5, 3, 9]
    sketch = ImageFolderStream(tmp_path / "domainnet" / "clipart", classes="imagenet", num_workers=0)
    with pytest.raises(ValueError, match=r"not among the 1000 classes: \['cat', 'dog'\]"):
        sketch.setup()
    with pytest.raises(ValueError, match="class_subset has 2 indices but there are 3 classes"):
        ImageFolderStream(tmp_path / "domainnet" / "clipart", classes=["dog", "cat", "cow"], class_subset=[1, 2])
    with pytest.raises(ValueError, match="num_classes=5 but there are 2 classes"):
        ImageFolderStream(tmp_path / "domainnet" / "clipart", num_classes=5)
    with pytest.raises(FileNotFoundError, match=r"domain folders missing under .*domainnet: \[.*sketch'\]"):
        ImageFolderStream(tmp_path / "domainnet", domains=["clipart", "sketch"])
    subset = ImageFolderStream(tmp_path / "domainnet" / "clipart", n_examples=2, shuffle=True, seed=0, num_workers=0)
    subset.setup()
    order = list(range(4))
    random.Random(0).shuffle(order)
    assert subset.domains[0].dataset.targets == [[0, 0, 1, 1][i] for i in order[:2]]  # a seeded random subset
