"""Small on-disk trees in the official layouts of CUB-200-2011, FGVC-Aircraft, Stanford Cars and
ImageFolder, filled with synthetic images (so a model can actually learn on them)."""

from __future__ import annotations

from pathlib import Path

from torchvision.transforms.v2.functional import to_pil_image

from fgattn.data import SyntheticFineGrained

KINDS = ("cub", "aircraft", "cars", "imagefolder")


def _images(num_classes: int, per_class: int, size: int, split: str):
    ds = SyntheticFineGrained(split, num_classes, per_class, size, seed=7)
    for i in range(len(ds)):
        yield i, to_pil_image(ds.render(i)), ds.targets[i]


def make_cub(root: Path, num_classes=4, train=6, test=3, size=80) -> Path:
    base = root / "CUB_200_2011"
    names = [f"{c + 1:03d}.Species_{c}" for c in range(num_classes)]
    rows, labels, split = [], [], []
    n = 0
    for flag, per_class, name in ((1, train, "train"), (0, test, "test")):
        for i, image, label in _images(num_classes, per_class, size, name):
            n += 1
            rel = f"{names[label]}/{name}_{i:04d}.jpg"
            (base / "images" / names[label]).mkdir(parents=True, exist_ok=True)
            if n == 1:
                image = image.convert("L")  # CUB holds a few grayscale images
            image.save(base / "images" / rel)
            rows.append(f"{n} {rel}")
            labels.append(f"{n} {label + 1}")
            split.append(f"{n} {flag}")
    (base / "images.txt").write_text("\n".join(rows) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (base / "train_test_split.txt").write_text("\n".join(split) + "\n")
    (base / "classes.txt").write_text("".join(f"{c + 1} {x}\n" for c, x in enumerate(names)))
    return root


def make_aircraft(root: Path, num_classes=4, train=6, test=3, size=80) -> Path:
    data = root / "fgvc-aircraft-2013b" / "data"
    (data / "images").mkdir(parents=True)
    variants = [f"Model {c}-{100 + c}" for c in range(num_classes)]  # names contain spaces
    families = [f"Family {c // 2}" for c in range(num_classes)]
    makers = [f"Maker {c // 2}" for c in range(num_classes)]
    level_files = {"variant": variants, "family": families, "manufacturer": makers}
    (data / "variants.txt").write_text("\n".join(variants) + "\n")
    (data / "families.txt").write_text("\n".join(dict.fromkeys(families)) + "\n")
    (data / "manufacturers.txt").write_text("\n".join(dict.fromkeys(makers)) + "\n")
    n = 1000000
    for split, per_class in (("trainval", train), ("test", test)):
        lines = {level: [] for level in level_files}
        for _, image, label in _images(num_classes, per_class, size, split.replace("val", "")):
            n += 1
            # Real images carry a 20-px banner at the bottom: paint one so cropping is visible.
            image = image.copy()
            image.paste((255, 255, 255), (0, size - 20, size, size))
            image.save(data / "images" / f"{n}.jpg")
            for level, names in level_files.items():
                lines[level].append(f"{n} {names[label]}")
        for level, rows in lines.items():
            (data / f"images_{level}_{split}.txt").write_text("\n".join(rows) + "\n")
    return root


def make_cars(root: Path, num_classes=4, train=6, test=3, size=80) -> Path:
    import numpy as np
    import pytest

    # Writing (and reading) the devkit's .mat files needs scipy, an optional extra of fgattn.
    savemat = pytest.importorskip("scipy.io", reason="Stanford Cars needs scipy").savemat

    base = root / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    names = np.array([f"Car {c} 2012" for c in range(num_classes)], dtype=object)
    savemat(base / "devkit" / "cars_meta.mat", {"class_names": names.reshape(1, -1)})
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"]
    for split, per_class, mat in (
        ("train", train, base / "devkit" / "cars_train_annos.mat"),
        ("test", test, base / "cars_test_annos_withlabels.mat"),
    ):
        (base / f"cars_{split}").mkdir()
        records = []
        for i, image, label in _images(num_classes, per_class, size, split):
            fname = f"{i + 1:05d}.jpg"
            image.save(base / f"cars_{split}" / fname)
            records.append((1, 1, size, size, label + 1, fname))
        arr = np.empty((1, len(records)), dtype=[(f, "O") for f in fields])
        for j, rec in enumerate(records):
            arr[0, j] = rec
        savemat(mat, {"annotations": arr})
    return root


def make_imagefolder(root: Path, num_classes=4, train=6, test=3, size=80) -> Path:
    for split, per_class in (("train", train), ("test", test)):
        for i, image, label in _images(num_classes, per_class, size, split):
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{i:04d}.png")
    return root


def make_tree(kind: str, root: Path, **kwargs) -> Path:
    return {"cub": make_cub, "aircraft": make_aircraft, "cars": make_cars,
            "imagefolder": make_imagefolder}[kind](Path(root), **kwargs)  # fmt: skip
