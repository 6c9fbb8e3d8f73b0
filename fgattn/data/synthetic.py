"""A deterministic synthetic fine-grained dataset, rendered on the fly.

Every image shows one "bird": a large ellipse body whose colour, size, position and facing are
random nuisances shared by all classes, on a random smooth background. Classes differ only in small
local parts — the colour of the head, the pattern of a wing patch and the shape of the tail — the
way CUB species differ in a crown colour or a wing bar. A classifier therefore has to find and
compare small regions, which is what CIN's and PCA-Net's attention is for, yet the set is easy
enough that a small network learns it on a CPU in minutes.

Image ``index`` of a split is a pure function of ``(seed, split, index)``: nothing is stored, two
processes (or DDP ranks, or dataloader workers) render identical pixels, and the test split never
shares an image with the train split.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from .seeding import mix_seed

# Class attributes. Each is flip-invariant (no "facing left" classes), so horizontal flip
# augmentation keeps labels valid.
HEAD_COLORS = (
    (0.90, 0.10, 0.10),  # red
    (0.10, 0.75, 0.15),  # green
    (0.15, 0.30, 0.95),  # blue
    (0.95, 0.85, 0.10),  # yellow
)
WING_PATTERNS = ("solid", "hstripes", "vstripes", "checker")
TAIL_SHAPES = ("triangle", "square", "fork", "bar")
ATTRIBUTES = (
    ("head_color", len(HEAD_COLORS)),
    ("wing_pattern", len(WING_PATTERNS)),
    ("tail_shape", len(TAIL_SHAPES)),
)
MAX_CLASSES = len(HEAD_COLORS) * len(WING_PATTERNS) * len(TAIL_SHAPES)
SPLITS = ("train", "test")


def class_attributes(label: int) -> dict[str, int]:
    """The part attributes that define class ``label`` (mixed radix: head colour varies fastest).

    With fewer than 64 classes the higher attributes are not class-defining; they are then drawn at
    random per image (nuisance), e.g. with 16 classes the tail shape carries no information.
    """
    out, rest = {}, int(label)
    for name, radix in ATTRIBUTES:
        out[name] = rest % radix
        rest //= radix
    return out


class SyntheticFineGrained(torch.utils.data.Dataset):
    """Synthetic fine-grained classification set: classes differ only in small local parts.

    Args:
        split: "train" or "test" (disjoint images, same classes).
        num_classes: 2 to 64. Class ``c`` has head colour ``c % 4``, wing pattern ``(c // 4) % 4``
            and tail shape ``c // 16``; attributes not used by the class count are random nuisances.
        images_per_class: images per class in this split (the length is
            ``num_classes * images_per_class``; labels cycle so every class has the same count).
        image_size: side of the rendered square image in pixels (>= 32).
        seed: selects the whole dataset; the same seed always gives the same pixels.
        image_format: "tensor" returns uint8 (3, H, W) tensors, "pil" returns RGB PIL images.
        transform: applied to the image (as torchvision datasets do).

    Items: ``(image, label)`` with label an int in [0, num_classes). ``targets`` lists all labels.
    """

    def __init__(
        self,
        split: str = "train",
        num_classes: int = 16,
        images_per_class: int = 64,
        image_size: int = 72,
        seed: int = 0,
        image_format: str = "tensor",
        transform=None,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not 2 <= int(num_classes) <= MAX_CLASSES:
            raise ValueError(f"num_classes must be in [2, {MAX_CLASSES}], got {num_classes!r}")
        if int(images_per_class) < 1:
            raise ValueError(f"images_per_class must be >= 1, got {images_per_class!r}")
        if int(image_size) < 32:
            raise ValueError(f"image_size must be >= 32 pixels, got {image_size!r}")
        if image_format not in ("tensor", "pil"):
            raise ValueError(f"image_format must be 'tensor' or 'pil', got {image_format!r}")
        self.split = split
        self.num_classes = int(num_classes)
        self.images_per_class = int(images_per_class)
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.image_format = image_format
        self.transform = transform
        self.classes = [self._class_name(c) for c in range(self.num_classes)]
        self.targets = [i % self.num_classes for i in range(len(self))]

    @staticmethod
    def _class_name(label: int) -> str:
        a = class_attributes(label)
        color = ("red", "green", "blue", "yellow")[a["head_color"]]
        wing, tail = WING_PATTERNS[a["wing_pattern"]], TAIL_SHAPES[a["tail_shape"]]
        return f"{color}_head-{wing}_wing-{tail}_tail"

    def __len__(self) -> int:
        return self.num_classes * self.images_per_class

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(f"index must be in [0, {len(self)}), got {index}")
        label = self.targets[index]
        image = self.render(index)
        if self.image_format == "pil":
            from torchvision.transforms.v2.functional import to_pil_image

            image = to_pil_image(image)
        if self.transform is not None:
            image = self.transform(image)
        return image, label

    def render(self, index: int) -> torch.Tensor:
        """Image ``index`` as a uint8 (3, S, S) tensor."""
        label = self.targets[index]
        g = torch.Generator().manual_seed(mix_seed(self.seed, SPLITS.index(self.split), index))
        attrs = class_attributes(label)
        # Attributes beyond what num_classes encodes are nuisances: draw them per image.
        n_used, radix = 0, 1
        for _, r in ATTRIBUTES:
            if radix >= self.num_classes:
                break
            radix *= r
            n_used += 1
        for name, r in ATTRIBUTES[n_used:]:
            attrs[name] = int(torch.randint(r, (), generator=g))
        return _render(self.image_size, attrs, g)


def _u(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _render(size: int, attrs: dict[str, int], g: torch.Generator) -> torch.Tensor:
    s = float(size)
    # Pixel-centre coordinates, (S, S) each.
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")

    # Background: a smooth random colour field (4x4 upsampled) plus fine noise.
    coarse = torch.rand(1, 3, 4, 4, generator=g) * 0.6 + 0.2
    img = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[0]
    img = img + 0.04 * torch.randn(3, size, size, generator=g)

    def paint(mask: torch.Tensor, color) -> None:
        nonlocal img
        color = torch.as_tensor(color, dtype=torch.float32).view(3, 1, 1)
        img = torch.where(mask, color.expand_as(img), img)

    # Body: the same random ellipse distribution for every class.
    facing = 1.0 if float(torch.rand((), generator=g)) < 0.5 else -1.0
    a, b = _u(g, 0.20, 0.26) * s, _u(g, 0.12, 0.16) * s
    cx, cy = _u(g, 0.40, 0.60) * s, _u(g, 0.45, 0.62) * s
    body_color = torch.rand(3, generator=g) * 0.5 + 0.25
    paint(((xs - cx) / a) ** 2 + ((ys - cy) / b) ** 2 <= 1.0, body_color)

    # Head (class part 1): a small circle in front of the body, its colour set by the class.
    r = _u(g, 0.075, 0.09) * s
    hx, hy = cx + facing * (a + 0.5 * r), cy - 0.6 * b
    jitter = 0.08 * (torch.rand(3, generator=g) - 0.5)
    head_color = (torch.tensor(HEAD_COLORS[attrs["head_color"]]) + jitter).clamp(0, 1)
    paint((xs - hx) ** 2 + (ys - hy) ** 2 <= r**2, head_color)
    eye = (xs - (hx + facing * 0.35 * r)) ** 2 + (ys - (hy - 0.2 * r)) ** 2 <= (0.22 * r) ** 2
    paint(eye, (0.05, 0.05, 0.05))

    # Wing patch (class part 2): a small rectangle on the body with one of four patterns.
    ww, wh = _u(g, 0.13, 0.16) * s, _u(g, 0.08, 0.10) * s
    wx, wy = cx - facing * 0.1 * a, cy - 0.1 * b
    inside = ((xs - wx).abs() <= ww / 2) & ((ys - wy).abs() <= wh / 2)
    period = max(2.0, s / 24)
    # Stripe/checker cell indices (the +size offset keeps them positive so int() truncation
    # equals floor, which is much faster than Tensor.floor on some CPU builds).
    u = ((xs - wx) / period + size).to(torch.int64)
    v = ((ys - wy) / period + size).to(torch.int64)
    pattern = WING_PATTERNS[attrs["wing_pattern"]]
    dark = {
        "solid": torch.ones_like(inside),
        "hstripes": v.remainder(2) == 0,
        "vstripes": u.remainder(2) == 0,
        "checker": (u + v).remainder(2) == 0,
    }[pattern]
    paint(inside & dark, (0.05, 0.05, 0.05))
    paint(inside & ~dark, (0.97, 0.97, 0.97))

    # Tail (class part 3): a small shape behind the body.
    t = _u(g, 0.07, 0.09) * s
    tx, ty = cx - facing * (a + 0.6 * t), cy - 0.2 * b
    dx, dy = (xs - tx) * facing, ys - ty  # dx > 0 points towards the body
    shape = TAIL_SHAPES[attrs["tail_shape"]]
    if shape == "triangle":
        tail = (dx <= t) & (dx >= -t) & (dy.abs() <= (t - dx) / 2)
    elif shape == "square":
        tail = (dx.abs() <= 0.8 * t) & (dy.abs() <= 0.8 * t)
    elif shape == "fork":
        tail = ((dx + 0.3 * t) ** 2 + (dy - 0.7 * t) ** 2 <= (0.45 * t) ** 2) | (
            (dx + 0.3 * t) ** 2 + (dy + 0.7 * t) ** 2 <= (0.45 * t) ** 2
        )
    else:  # bar
        tail = (dx.abs() <= 1.0 * t) & (dy.abs() <= 0.3 * t)
    paint(tail, body_color * 0.5)

    # Global illumination change, so absolute colours alone are unreliable.
    img = img * _u(g, 0.8, 1.15)
    return (img.clamp(0, 1) * 255 + 0.5).to(torch.uint8)  # +0.5 then truncate = round


def preview_grid(dataset: SyntheticFineGrained, per_class: int = 4) -> torch.Tensor:
    """A uint8 (3, C·S, per_class·S) grid, one row per class, for eyeballing the classes."""
    rows = []
    for c in range(dataset.num_classes):
        idx = [c + k * dataset.num_classes for k in range(min(per_class, dataset.images_per_class))]
        rows.append(torch.stack([dataset.render(i) for i in idx]))
    grid = torch.stack(rows)  # (C, k, 3, S, S)
    return rearrange(grid, "c k ch h w -> ch (c h) (k w)")


__all__ = ["MAX_CLASSES", "SyntheticFineGrained", "class_attributes", "preview_grid"]
