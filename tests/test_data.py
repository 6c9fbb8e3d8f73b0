"""fgattn.data: synthetic set, paired samplers, dataset loaders in the official layouts, errors."""

from __future__ import annotations

import random
import sys
from collections import Counter

import pytest
import torch
from _fgvc_trees import KINDS, make_tree
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from fgattn import data as D


# ----------------------------------------------------------------------------- synthetic
def test_synthetic_is_deterministic_and_splits_differ():
    a = D.SyntheticFineGrained("train", num_classes=8, images_per_class=4, image_size=48, seed=3)
    b = D.SyntheticFineGrained("train", num_classes=8, images_per_class=4, image_size=48, seed=3)
    c = D.SyntheticFineGrained("train", num_classes=8, images_per_class=4, image_size=48, seed=4)
    t = D.SyntheticFineGrained("test", num_classes=8, images_per_class=4, image_size=48, seed=3)
    x, y = a[5]
    assert x.dtype == torch.uint8 and x.shape == (3, 48, 48) and y == 5
    assert torch.equal(x, b[5][0])
    assert not torch.equal(x, c[5][0])
    train = torch.stack([a[i][0] for i in range(len(a))]).flatten(1)
    test = torch.stack([t[i][0] for i in range(len(t))]).flatten(1)
    assert torch.cdist(train.float(), test.float()).min() > 0  # no test image is a train image
    assert Counter(a.targets) == {c: 4 for c in range(8)}
    assert len(set(a.classes)) == 8


def test_synthetic_classes_differ_only_in_parts():
    """Two images of different classes that share every nuisance differ only in a few pixels."""
    ds = D.SyntheticFineGrained("train", num_classes=16, images_per_class=1, image_size=64)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    from fgattn.data.synthetic import _render

    x0 = _render(64, D.class_attributes(0) | {"tail_shape": 0}, g1)
    x1 = _render(64, D.class_attributes(1) | {"tail_shape": 0}, g2)  # head colour differs
    changed = (x0 != x1).any(0).float().mean().item()
    assert 0 < changed < 0.05  # the head: a few % of the image
    assert D.class_attributes(5) == {"head_color": 1, "wing_pattern": 1, "tail_shape": 0}
    image, _ = D.SyntheticFineGrained(image_format="pil", image_size=40)[0]
    assert isinstance(image, Image.Image) and image.size == (40, 40)
    assert ds.classes[0] != ds.classes[1]


@pytest.mark.parametrize(
    "kwargs",
    [dict(split="val"), dict(num_classes=1), dict(num_classes=65), dict(image_size=8),
     dict(image_format="jpeg"), dict(images_per_class=0)],
)  # fmt: skip
def test_synthetic_rejects_bad_arguments(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        D.SyntheticFineGrained(**kwargs)


# ----------------------------------------------------------------------------- samplers
def _labels(n_classes=6, per_class=7):
    labels = [c for c in range(n_classes) for _ in range(per_class)]
    random.Random(0).shuffle(labels)
    return labels


def test_pair_sampler_layout_coverage_and_seed():
    targets = _labels()
    s = D.PairBatchSampler(targets, batch_size=5, seed=1)
    batches = list(s)
    assert len(batches) == len(s) == len(targets) // 5
    anchors = []
    for b in batches:
        assert len(b) == 10
        for a, p in zip(b[:5], b[5:], strict=True):
            assert targets[a] == targets[p] and a != p
        anchors += b[:5]
    assert len(set(anchors)) == len(anchors)  # each image at most once as an anchor per epoch
    assert list(D.PairBatchSampler(targets, batch_size=5, seed=1)) == batches
    s.set_epoch(1)
    assert list(s) != batches
    single = D.PairBatchSampler([0, 1, 1], batch_size=3, seed=0)
    (b,) = list(single)
    pairs = dict(zip(b[:3], b[3:], strict=True))
    assert pairs[0] == 0 and pairs[1] == 2 and pairs[2] == 1  # lone image pairs with itself


def test_pk_sampler_cin_layout_has_positive_and_negative_pairs():
    targets = _labels(8, 9)
    s = D.PKBatchSampler(targets, num_classes=4, num_images=5, seed=0)
    assert s.pairs_per_batch == (8, 2)
    counts = Counter()
    for b in s:
        assert len(b) == 20
        assert len(set(b)) == 20  # distinct images (every class has >= K)
        per_class = Counter(targets[i] for i in b)
        assert len(per_class) == 4 and set(per_class.values()) == {5}
        pos = sum(targets[a] == targets[p] for a, p in zip(b[:10], b[10:], strict=True))
        assert pos == 8
        counts.update(per_class)
    assert max(counts.values()) - min(counts.values()) <= 5  # classes visited evenly
    even = D.PKBatchSampler(targets, num_classes=2, num_images=4, seed=0)
    assert even.pairs_per_batch == (4, 0)
    tiny = [0, 0, 1, 1, 1]  # class 0 has fewer than K = 3 images: repeats, pairs still hold
    for b in D.PKBatchSampler(tiny, num_classes=2, num_images=3, num_batches=3):
        same = [tiny[a] == tiny[p] for a, p in zip(b[:3], b[3:], strict=True)]
        assert sum(same) == 2 and Counter(tiny[i] for i in b) == {0: 3, 1: 3}


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(num_classes=9), "num_classes"), (dict(num_classes=3, num_images=5), "P·K even"),
     (dict(num_classes=1, num_images=3), "P·K even"), (dict(num_images=0), "num_images")],
)  # fmt: skip
def test_pk_sampler_rejects_bad_layouts(kwargs, match):
    with pytest.raises(ValueError, match=match):
        D.PKBatchSampler(_labels(8, 5), **kwargs)


@pytest.mark.parametrize("kind", ["pair", "pk"])
def test_samplers_split_batches_across_ranks_and_resume(kind):
    targets = _labels(8, 10)

    def make(rank, world):
        if kind == "pair":
            return D.PairBatchSampler(targets, 4, seed=5, rank=rank, world_size=world)
        return D.PKBatchSampler(targets, 4, 2, seed=5, rank=rank, world_size=world)

    single = list(make(0, 1))
    r0, r1 = make(0, 2), make(1, 2)
    for s in (r0, r1):
        s.set_epoch(3)
    b0, b1 = list(r0), list(r1)
    assert len(b0) == len(b1) == len(single) // 2
    assert not {tuple(b) for b in b0} & {tuple(b) for b in b1}  # ranks draw different batches
    r0.set_epoch(3, start_batch=2)
    assert list(r0) == b0[2:]
    assert list(r0) == b0  # the skip applies once
    seeded = make(0, 1)
    seeded.with_seeds = True
    first = next(iter(seeded))
    assert [i for i, _ in first] == single[0] and len({s for _, s in first}) == len(first)


def test_sharded_eval_sampler_covers_each_index_once():
    shards = [list(D.ShardedEvalSampler(11, r, 3)) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(11))
    assert [len(D.ShardedEvalSampler(11, r, 3)) for r in range(3)] == [4, 4, 3]
    with pytest.raises(ValueError, match="rank"):
        D.ShardedEvalSampler(11, 3, 3)


def test_seeded_dataset_reproducible_and_leaves_global_rng_alone():
    ds = D.SyntheticFineGrained(images_per_class=2, image_size=40,
                                transform=D.create_transform(True, 32, 36))  # fmt: skip
    wrapped = D.SeededDataset(ds)
    state = torch.get_rng_state()
    x1, _ = wrapped[(3, 123)]
    x2, _ = wrapped[(3, 123)]
    x3, _ = wrapped[(3, 124)]
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(x1, x2)
    assert not torch.equal(x1, x3)  # a different seed gives another crop / flip
    assert len(wrapped) == len(ds) and wrapped.classes == ds.classes


# ----------------------------------------------------------------------------- transforms
def test_transforms_train_random_test_deterministic():
    image = Image.new("RGB", (120, 90), (10, 200, 30))
    image.paste((255, 0, 0), (0, 0, 30, 90))
    train, test = D.create_transform(True, 64, 72), D.create_transform(False, 64, 72)
    outs = [train(image) for _ in range(8)]
    assert all(o.shape == (3, 64, 64) and o.dtype == torch.float32 for o in outs)
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
    assert torch.equal(test(image), test(image)) and test(image).shape == (3, 64, 64)
    with pytest.raises(ValueError, match="resize"):
        D.create_transform(True, 448, 400)
    with pytest.raises(ValueError, match="hflip"):
        D.create_transform(True, 64, 72, hflip=2.0)


# ----------------------------------------------------------------------------- real layouts
@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    return {k: make_tree(k, tmp_path_factory.mktemp(k)) for k in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_official_layouts_load(trees, kind):
    train = D.create_dataset(kind, trees[kind], "train")
    test = D.create_dataset(kind, trees[kind], "test")
    assert (len(train), len(test)) == (24, 12)
    assert len(train.classes) == 4 and sorted(set(train.targets)) == [0, 1, 2, 3]
    assert Counter(test.targets) == {c: 3 for c in range(4)}
    image, label = train[0]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (80, 80)
    assert label == train.targets[0]
    transformed = D.create_dataset(kind, trees[kind], "test", D.create_transform(False, 32, 36))
    assert transformed[0][0].shape == (3, 32, 32)


def test_cub_grayscale_image_becomes_rgb(trees):
    base = trees["cub"] / "CUB_200_2011"
    first = (base / "images.txt").read_text().split()[1]
    assert Image.open(base / "images" / first).mode == "L"
    ds = D.CUB200(trees["cub"], "train")
    assert ds[0][0].mode == "RGB"
    assert D.CUB200(base, "train").samples == ds.samples  # root may also be CUB_200_2011 itself


def test_aircraft_levels_and_banner_crop(trees):
    fam = D.FGVCAircraft(trees["aircraft"], "trainval", annotation_level="family")
    assert len(fam.classes) == 2
    full = D.FGVCAircraft(trees["aircraft"], "test")[0][0]
    cropped = D.FGVCAircraft(trees["aircraft"], "test", crop_banner=True)[0][0]
    assert full.size == (80, 80) and cropped.size == (80, 60)
    banner = pil_to_tensor(full)[:, 62:].float().mean()
    assert banner > 240  # the painted white banner is what the crop removed
    assert pil_to_tensor(cropped).float().mean() < banner


def test_cars_without_scipy_says_so(trees, monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy", None)
    monkeypatch.setitem(sys.modules, "scipy.io", None)
    with pytest.raises(ImportError, match="pip install scipy"):
        D.StanfordCars(trees["cars"], "train")


def test_cars_data_is_checked_before_scipy(tmp_path, monkeypatch):
    """--recipe cin-cars on a wrong --data-root says where the data is missing, not "pip
    install scipy" first."""
    monkeypatch.setitem(sys.modules, "scipy", None)
    monkeypatch.setitem(sys.modules, "scipy.io", None)
    with pytest.raises(FileNotFoundError, match="Stanford Cars folder not found"):
        D.StanfordCars(tmp_path, "train")


MISSING = [
    ("cub", "CUB_200_2011/train_test_split.txt", "train_test_split.txt", "caltech.edu"),
    ("cub", "CUB_200_2011/images.txt", "images.txt", "caltech.edu"),
    ("aircraft", "fgvc-aircraft-2013b/data/images_variant_test.txt", "images_variant_test",
     "robots.ox.ac.uk"),
    ("cars", "stanford_cars/cars_test_annos_withlabels.mat", "cars_test_annos_withlabels.mat",
     "mirror"),
    ("imagefolder", "test", "test", "ImageFolder tree"),
]  # fmt: skip


@pytest.mark.parametrize("kind, rel, name, source", MISSING)
def test_missing_files_name_file_place_and_source(tmp_path, kind, rel, name, source):
    root = make_tree(kind, tmp_path, num_classes=2, train=1, test=1, size=40)
    target = root / rel
    if target.is_dir():
        import shutil

        shutil.rmtree(target)
    else:
        target.unlink()
    with pytest.raises(FileNotFoundError) as err:
        D.create_dataset(kind, root, "test")
    message = str(err.value)
    assert name in message and str(target.parent) in message and source in message


def test_missing_root_and_no_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="looked in"):
        D.create_dataset("aircraft", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="root"):
        D.create_dataset("cub", None)
    with pytest.raises(ValueError, match="dataset name"):
        D.create_dataset("inat", tmp_path)


def test_malformed_annotations_name_file_and_line(tmp_path):
    root = make_tree("cub", tmp_path / "cub", num_classes=2, train=2, test=1, size=40)
    labels = root / "CUB_200_2011" / "image_class_labels.txt"
    lines = labels.read_text().splitlines()
    lines[2] = "3"  # a field is missing
    labels.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"line 3 of .*image_class_labels\.txt"):
        D.CUB200(root)
    lines[2] = "3 9"  # a class id outside classes.txt
    labels.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="class id 9"):
        D.CUB200(root)
    air = make_tree("aircraft", tmp_path / "air", num_classes=2, train=1, test=1, size=40)
    ann = air / "fgvc-aircraft-2013b" / "data" / "images_variant_test.txt"
    ann.write_text(ann.read_text() + "1234567 Unknown Plane\n")
    with pytest.raises(ValueError, match=r"images_variant_test\.txt"):
        D.FGVCAircraft(air, "test")


@pytest.mark.parametrize("kind", ["cub", "imagefolder"])
def test_corrupt_image_names_the_file(tmp_path, kind):
    root = make_tree(kind, tmp_path, num_classes=2, train=2, test=1, size=40)
    ds = D.create_dataset(kind, root, "train")
    path = ds.samples[1][0]
    with open(path, "r+b") as f:  # truncate the file mid-stream
        data = f.read()
        f.seek(0)
        f.write(data[: len(data) // 3])
        f.truncate()
    with pytest.raises(D.ImageReadError, match=str(path).replace(".", r"\.")):
        ds[1]
    with open(path, "wb") as f:
        f.write(b"not an image at all")
    with pytest.raises(D.ImageReadError, match="cannot decode"):
        ds[1]


# ----------------------------------------------------------------------------- splits and classes
def _imagefolder(root, split, classes, per_class=2, size=24):
    for c in classes:
        (root / split / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", (size, size), (40 * i, 90, 200)).save(root / split / c / f"{i}.png")
    return root


def test_a_test_split_without_a_training_class_keeps_every_label(tmp_path, capsys):
    """ImageFolder numbers the classes of each split folder on its own: without matching by name,
    a test split lacking "b" would label every "c" image as "b"."""
    from fgattn.train import TrainConfig, build_datasets

    root = _imagefolder(tmp_path, "train", ["a", "b", "c"])
    _imagefolder(root, "test", ["a", "c"])
    cfg = TrainConfig(dataset="imagefolder", data_root=str(root), image_size=16, resize=16)
    train, test = build_datasets(cfg)
    assert test.classes == train.classes == ["a", "b", "c"]
    assert sorted(set(test.targets)) == [0, 2]  # "c" is still class 2
    assert [test.classes[t] for _, t in test.samples] == [p.split("/")[-2] for p, _ in test.samples]
    assert "no images of 1 of the 3 training classes (b)" in capsys.readouterr().out


def test_a_test_split_with_other_class_names_is_an_error(tmp_path):
    from fgattn.train import TrainConfig, build_datasets

    root = _imagefolder(tmp_path, "train", ["a", "b"])
    _imagefolder(root, "test", ["a", "x"])
    cfg = TrainConfig(dataset="imagefolder", data_root=str(root), image_size=16, resize=16)
    with pytest.raises(ValueError, match=r"test split has 2 classes, 1 of them not among .*'x'"):
        build_datasets(cfg)


def test_duplicate_cub_ids_are_errors(tmp_path):
    root = make_tree("cub", tmp_path, num_classes=2, train=2, test=1, size=40)
    images = root / "CUB_200_2011" / "images.txt"
    lines = images.read_text().splitlines()
    images.write_text("\n".join([*lines, f"2 {lines[0].split()[1]}"]) + "\n")
    with pytest.raises(ValueError, match=r"images\.txt: image id 2 is listed twice"):
        D.CUB200(root)


def test_an_empty_split_is_an_error(tmp_path):
    root = make_tree("cub", tmp_path, num_classes=2, train=2, test=1, size=40)
    split = root / "CUB_200_2011" / "train_test_split.txt"
    split.write_text("".join(f"{line.split()[0]} 1\n" for line in split.read_text().splitlines()))
    assert len(D.create_dataset("cub", root, "train")) == 6
    with pytest.raises(ValueError, match=r"the 'test' split of dataset 'cub' .* holds no images"):
        D.create_dataset("cub", root, "test")
