"""The fine-grained benchmarks (CUB-200-2011, FGVC-Aircraft, Stanford Cars) and ImageFolder trees.

Every dataset here exposes ``targets`` (one int label per item) and ``classes`` (names), returns
``(image, label)`` with RGB PIL images (grayscale and palette images are converted), and fails
early and clearly:

- a missing file or folder raises FileNotFoundError naming it, where it was looked for and where
  the data comes from;
- a malformed annotation line, or an image id listed twice, raises ValueError naming the file;
- a split without images raises ValueError;
- an image that cannot be decoded raises `ImageReadError` naming the image file.

Labels index ``classes``. Splits are matched by class *name* (`align_classes`): an ImageFolder
test split that lacks a training class keeps every other class's label.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

CUB_SOURCE = (
    "CUB-200-2011 comes from https://www.vision.caltech.edu/datasets/cub_200_2011/ "
    "(CUB_200_2011.tgz, https://data.caltech.edu/records/65de6-vp158); extract it so that "
    "<root>/CUB_200_2011/images.txt exists"
)
AIRCRAFT_SOURCE = (
    "FGVC-Aircraft comes from https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/ "
    "(fgvc-aircraft-2013b.tar.gz); extract it so that <root>/fgvc-aircraft-2013b/data/ exists "
    "(torchvision.datasets.FGVCAircraft(root, download=True) does this)"
)
CARS_SOURCE = (
    "Stanford Cars' original site (https://ai.stanford.edu/~jkrause/cars/car_dataset.html) is "
    "offline and torchvision cannot download it; get cars_train/, cars_test/, the devkit "
    "(cars_meta.mat, cars_train_annos.mat) and cars_test_annos_withlabels.mat from a mirror and "
    "lay them out as <root>/stanford_cars/{cars_train,cars_test,devkit,"
    "cars_test_annos_withlabels.mat} (the torchvision.datasets.StanfordCars layout)"
)
IMAGEFOLDER_SOURCE = (
    "an ImageFolder tree is <root>/<split>/<class name>/<image file>, e.g. <root>/train/cat/1.jpg"
)


class ImageReadError(OSError):
    """An image file exists but cannot be decoded (truncated, corrupt or not an image)."""


def load_image(path: str | os.PathLike, crop_bottom: int = 0) -> Image.Image:
    """Open ``path`` as an RGB PIL image, optionally cutting ``crop_bottom`` pixel rows.

    Raises FileNotFoundError if the file is absent and ImageReadError (naming the file) if it
    cannot be decoded. ``crop_bottom`` removes e.g. FGVC-Aircraft's 20-px copyright banner.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()  # decode now, so a truncated file fails here, naming itself
            image = im.convert("RGB")  # grayscale / CMYK / palette images -> 3 channels
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(f"cannot decode image file {path}: {e}") from e
    if crop_bottom:
        w, h = image.size
        if h <= crop_bottom:
            raise ImageReadError(
                f"image file {path} is {h} px high, too small to crop {crop_bottom} px "
                "off the bottom"
            )
        image = image.crop((0, 0, w, h - crop_bottom))
    return image


def _require(path: Path, what: str, looked_in: str, source: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path} (looked in {looked_in}). {source}")
    return path


def _read_table(path: Path, columns: int, source: str) -> list[list[str]]:
    """Whitespace-separated rows of an annotation file, each split into ``columns`` fields."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.split(maxsplit=columns - 1)
            if len(fields) != columns:
                raise ValueError(
                    f"malformed line {lineno} of {path}: expected {columns} fields, got "
                    f"{line.rstrip()!r}. {source}"
                )
            rows.append(fields)
    return rows


def _int(value: str, path: Path, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"malformed {what} {value!r} in {path}: expected an integer") from None


def _id_table(path: Path, what: str, source: str) -> dict[int, str]:
    """``<id> <value>`` rows of an annotation file as {id: value}; an id twice is an error."""
    table: dict[int, str] = {}
    for key, value in _read_table(path, 2, source):
        key_id = _int(key, path, what)
        if key_id in table:
            raise ValueError(
                f"malformed {path}: {what} {key_id} is listed twice ({table[key_id]!r} and "
                f"{value.strip()!r}); each {what} must appear once. {source}"
            )
        table[key_id] = value.strip()
    return table


class _ImageListDataset(torch.utils.data.Dataset):
    """(path, label) list + a loader + a transform, the common core of the datasets below."""

    samples: list[tuple[str, int]]
    classes: list[str]
    crop_bottom: int = 0

    def __init__(self, transform: Callable | None = None) -> None:
        self.transform = transform

    @property
    def targets(self) -> list[int]:
        return [t for _, t in self.samples]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        image = load_image(path, self.crop_bottom)
        if self.transform is not None:
            image = self.transform(image)
        return image, target


class CUB200(_ImageListDataset):
    """CUB-200-2011 (Wah et al. 2011) from its official text files: 5,994 train / 5,794 test.

    Args:
        root: the folder that holds CUB_200_2011/ (or the CUB_200_2011 folder itself).
        split: "train" or "test" (from train_test_split.txt: 1 = train).
        transform: applied to the PIL image.

    Reads images.txt (``<id> <path under images/>``), image_class_labels.txt (``<id> <1..200>``),
    train_test_split.txt (``<id> <0|1>``) and classes.txt (``<id> <name>``).
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", transform=None) -> None:
        super().__init__(transform)
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test' for CUB-200-2011, got {split!r}")
        root = Path(root).expanduser()
        candidates = [root / "CUB_200_2011", root]
        base = next((c for c in candidates if (c / "images.txt").is_file()), None)
        if base is None:
            looked = " and ".join(str(c) for c in candidates)
            raise FileNotFoundError(
                f"CUB-200-2011 file images.txt not found (looked in {looked}). {CUB_SOURCE}"
            )
        self.root = base
        files = {}
        for name in ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt"):
            files[name] = _require(base / name, "CUB-200-2011 file", str(base), CUB_SOURCE)
        images_dir = _require(base / "images", "CUB-200-2011 image folder", str(base), CUB_SOURCE)

        tables = {
            name: _id_table(path, "class id" if name == "classes.txt" else "image id", CUB_SOURCE)
            for name, path in files.items()
        }
        paths = tables["images.txt"]
        labels = {i: _int(c, files["image_class_labels.txt"], "class id")
                  for i, c in tables["image_class_labels.txt"].items()}  # fmt: skip
        is_train = {i: _int(t, files["train_test_split.txt"], "split flag")
                    for i, t in tables["train_test_split.txt"].items()}  # fmt: skip
        self.classes = list(tables["classes.txt"].values())
        for ids, name in ((labels, "image_class_labels.txt"), (is_train, "train_test_split.txt")):
            missing = sorted(set(paths) - set(ids))
            if missing:
                raise ValueError(
                    f"malformed {files[name]}: no entry for image id {missing[0]} "
                    f"({len(missing)} ids of images.txt missing). {CUB_SOURCE}"
                )
        bad = [c for c in labels.values() if not 1 <= c <= len(self.classes)]
        if bad:
            raise ValueError(
                f"malformed {files['image_class_labels.txt']}: class id {bad[0]} outside "
                f"1..{len(self.classes)} (the classes of classes.txt)"
            )
        want = 1 if split == "train" else 0
        self.samples = [
            (str(images_dir / paths[i]), labels[i] - 1)
            for i in sorted(paths)
            if is_train[i] == want
        ]


class FGVCAircraft(_ImageListDataset):
    """FGVC-Aircraft (Maji et al. 2013) via `torchvision.datasets.FGVCAircraft`'s annotation parser.

    Args:
        root: the folder that holds fgvc-aircraft-2013b/.
        split: "trainval" (the usual training set, 6,667), "train", "val" or "test" (3,333).
        annotation_level: "variant" (100 classes, the usual protocol), "family" (70) or
            "manufacturer" (30).
        crop_banner: cut the 20-px copyright banner off the bottom of every image.
        transform: applied to the PIL image.
    """

    BANNER = 20

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "trainval",
        annotation_level: str = "variant",
        crop_banner: bool = False,
        transform=None,
    ) -> None:
        from torchvision import datasets

        super().__init__(transform)
        if split not in ("train", "val", "trainval", "test"):
            raise ValueError(
                f"split must be 'train', 'val', 'trainval' or 'test' for FGVC-Aircraft, "
                f"got {split!r}"
            )
        levels = {"variant": "variants.txt", "family": "families.txt", "manufacturer":
                  "manufacturers.txt"}  # fmt: skip
        if annotation_level not in levels:
            raise ValueError(
                f"annotation_level must be one of {tuple(levels)}, got {annotation_level!r}"
            )
        data = Path(root).expanduser() / "fgvc-aircraft-2013b" / "data"
        looked = str(data)
        _require(data, "FGVC-Aircraft folder", str(Path(root).expanduser()), AIRCRAFT_SOURCE)
        _require(data / levels[annotation_level], "FGVC-Aircraft file", looked, AIRCRAFT_SOURCE)
        labels_file = data / f"images_{annotation_level}_{split}.txt"
        _require(labels_file, "FGVC-Aircraft file", looked, AIRCRAFT_SOURCE)
        _require(data / "images", "FGVC-Aircraft image folder", looked, AIRCRAFT_SOURCE)
        try:
            tv = datasets.FGVCAircraft(root, split=split, annotation_level=annotation_level)
        except (ValueError, KeyError) as e:  # a line without a space, or an unknown class name
            raise ValueError(
                f"malformed FGVC-Aircraft annotation file {labels_file} or "
                f"{data / levels[annotation_level]}: {e!r}. {AIRCRAFT_SOURCE}"
            ) from e
        self.classes = list(tv.classes)
        self.samples = list(zip(tv._image_files, tv._labels, strict=True))
        self.crop_bottom = self.BANNER if crop_banner else 0


class StanfordCars(_ImageListDataset):
    """Stanford Cars (Krause et al. 2013) via `torchvision.datasets.StanfordCars`: 8,144 / 8,041.

    Needs scipy to read the devkit's .mat files (``pip install scipy``).

    Args:
        root: the folder that holds stanford_cars/ (or the stanford_cars folder itself).
        split: "train" or "test".
        transform: applied to the PIL image.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", transform=None) -> None:
        super().__init__(transform)
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test' for Stanford Cars, got {split!r}")
        from torchvision import datasets

        root = Path(root).expanduser()
        if root.name == "stanford_cars" and not (root / "stanford_cars").exists():
            root = root.parent
        base = root / "stanford_cars"
        _require(base, "Stanford Cars folder", str(root), CARS_SOURCE)
        devkit = base / "devkit"
        _require(devkit / "cars_meta.mat", "Stanford Cars file", str(devkit), CARS_SOURCE)
        if split == "train":
            annos, images = devkit / "cars_train_annos.mat", base / "cars_train"
        else:
            annos, images = base / "cars_test_annos_withlabels.mat", base / "cars_test"
        _require(annos, "Stanford Cars file", str(annos.parent), CARS_SOURCE)
        _require(images, "Stanford Cars image folder", str(base), CARS_SOURCE)
        try:  # the files are there: now their reader (torchvision imports it; say it first)
            import scipy.io  # noqa: F401
        except ImportError as e:
            raise ImportError(
                "Stanford Cars needs scipy to read its .mat annotations: pip install scipy "
                '(or pip install "fgattn[cars]")'
            ) from e
        try:
            tv = datasets.StanfordCars(root, split=split)
        except (ValueError, KeyError, TypeError, IndexError, OSError) as e:
            raise ValueError(
                f"malformed Stanford Cars annotation file {annos} or {devkit / 'cars_meta.mat'}: "
                f"{e!r}. {CARS_SOURCE}"
            ) from e
        self.classes = [str(c) for c in tv.classes]
        self.samples = [(p, int(t)) for p, t in tv._samples]
        bad = [t for _, t in self.samples if not 0 <= t < len(self.classes)]
        if bad:
            raise ValueError(
                f"malformed {annos}: class {bad[0] + 1} outside 1..{len(self.classes)} "
                f"(the classes of {devkit / 'cars_meta.mat'})"
            )


class ImageFolder(_ImageListDataset):
    """Any ``<root>/<split>/<class>/<image>`` tree, via `torchvision.datasets.ImageFolder`.

    Args:
        root: the tree's root.
        split: the sub-folder to read ("train", "test", "val", ...); "test" falls back to "val"
            when the tree has no test folder.
        transform: applied to the PIL image.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", transform=None) -> None:
        from torchvision import datasets

        super().__init__(transform)
        folder = Path(root).expanduser() / split
        if split == "test" and not folder.exists() and (folder.parent / "val").is_dir():
            folder = folder.parent / "val"  # many trees name their held-out split "val"
        _require(folder, "ImageFolder split folder", str(Path(root).expanduser()),
                 IMAGEFOLDER_SOURCE)  # fmt: skip
        try:
            tv = datasets.ImageFolder(folder)
        except FileNotFoundError as e:  # no class folders, or no images in them
            raise FileNotFoundError(f"{e} (in {folder}). {IMAGEFOLDER_SOURCE}") from e
        self.classes = list(tv.classes)
        self.samples = list(tv.samples)


DATASETS = ("synthetic", "cub", "aircraft", "cars", "imagefolder")


def align_classes(
    dataset, classes: list[str], what: str = "the test split", of: str = "the training split"
) -> list[str]:
    """Relabel ``dataset`` so that its label i names ``classes[i]``, matching classes by name.

    The classes of ``dataset`` must all be in ``classes`` (a ValueError lists those that are not);
    classes it has no images of are allowed and returned, so the caller can say so. Datasets that
    already have exactly ``classes`` are unchanged.

    Args:
        dataset: a dataset of this module (``classes`` and ``samples``; others only if their
            classes already equal ``classes``).
        classes: the class names the labels must index (the training split's, a checkpoint's).
        what: how to name ``dataset`` in messages.
        of: how to name the owner of ``classes`` in messages.
    """
    own = list(dataset.classes)
    classes = list(classes)
    if own == classes:
        return []
    index = {name: i for i, name in enumerate(classes)}
    unknown = [name for name in own if name not in index]
    if unknown:
        shown = ", ".join(repr(n) for n in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise ValueError(
            f"{what} has {len(own)} classes, {len(unknown)} of them not among the "
            f"{len(classes)} classes of {of} ({shown}); the class names must match"
        )
    if len(index) != len(classes) or not hasattr(dataset, "samples"):
        why = ("its class names repeat" if len(index) != len(classes)
               else f"a {type(dataset).__name__} cannot be relabelled")  # fmt: skip
        raise ValueError(
            f"{what} lists its classes in another order than {of}, and {why}; build both from "
            f"the same class list"
        )
    remap = [index[name] for name in own]
    dataset.samples = [(path, remap[target]) for path, target in dataset.samples]
    dataset.classes = classes
    present = set(own)
    return [name for name in classes if name not in present]


def create_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    split: str = "train",
    transform=None,
    **kwargs,
):
    """Build a dataset by name.

    Args:
        name: one of "synthetic", "cub", "aircraft", "cars", "imagefolder".
        root: where the data lies (unused for "synthetic").
        split: "train" or "test". For FGVC-Aircraft "train" means the usual "trainval" set;
            pass split="train" with ``aircraft_split="train"`` to get the smaller one.
        transform: applied to each image.
        **kwargs: dataset options — synthetic: num_classes, images_per_class, image_size, seed;
            aircraft: annotation_level, crop_banner, aircraft_split.

    Returns a dataset with ``targets`` and ``classes``.
    """
    from .synthetic import SyntheticFineGrained

    if name not in DATASETS:
        raise ValueError(f"dataset name must be one of {DATASETS}, got {name!r}")
    if name == "synthetic":
        return SyntheticFineGrained(split=split, transform=transform, **kwargs)
    if root is None:
        raise ValueError(f"dataset {name!r} needs a root folder (data root), got None")
    if name == "cub":
        dataset = CUB200(root, split, transform, **kwargs)
    elif name == "aircraft":
        aircraft_split = kwargs.pop("aircraft_split", None)
        split = aircraft_split or ("trainval" if split == "train" else split)
        dataset = FGVCAircraft(root, split, transform=transform, **kwargs)
    elif name == "cars":
        dataset = StanfordCars(root, split, transform, **kwargs)
    else:
        dataset = ImageFolder(root, split, transform, **kwargs)
    if len(dataset) == 0:
        raise ValueError(
            f"the {split!r} split of dataset {name!r} in {root} holds no images; check the "
            f"dataset's split files"
        )
    return dataset


__all__ = [
    "CUB200",
    "DATASETS",
    "FGVCAircraft",
    "ImageFolder",
    "ImageReadError",
    "StanfordCars",
    "align_classes",
    "create_dataset",
    "load_image",
]
