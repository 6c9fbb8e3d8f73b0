"""FGVC transforms: Resize(512) + RandomCrop(448) + flip; test Resize(512) + CenterCrop(448).

This is the protocol of CIN, PCA-Net and most fine-grained papers. timm's `create_transform`
training mode uses RandomResizedCrop instead, so the pipeline is assembled here from torchvision
transforms (v2: they accept PIL images and uint8 tensors alike), with timm's ImageNet statistics.
"""

from __future__ import annotations

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T


def create_transform(
    train: bool,
    image_size: int = 448,
    resize: int | None = 512,
    hflip: float = 0.5,
    mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN,
    std: tuple[float, float, float] = IMAGENET_DEFAULT_STD,
    interpolation: str = "bilinear",
):
    """Image (PIL or uint8 (3, H, W) tensor) -> normalised float32 (3, image_size, image_size).

    Args:
        train: random crop + horizontal flip if True, centre crop if False.
        image_size: side of the crop (paper: 448).
        resize: the shorter side is resized to this first (paper: 512); None keeps the image size
            (then it must be at least image_size).
        hflip: probability of a horizontal flip in training.
        mean, std: normalisation statistics (timm's ImageNet defaults).
        interpolation: "bilinear" or "bicubic" for the resize.
    """
    if int(image_size) < 1:
        raise ValueError(f"image_size must be a positive number of pixels, got {image_size!r}")
    if resize is not None and int(resize) < int(image_size):
        raise ValueError(
            f"resize must be >= image_size so the crop fits, got resize={resize}, "
            f"image_size={image_size}"
        )
    if not 0.0 <= hflip <= 1.0:
        raise ValueError(f"hflip must be a probability in [0, 1], got {hflip!r}")
    modes = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}
    if interpolation not in modes:
        raise ValueError(f"interpolation must be one of {tuple(modes)}, got {interpolation!r}")
    steps = [T.ToImage()]
    if resize is not None:
        steps.append(T.Resize(int(resize), interpolation=modes[interpolation], antialias=True))
    if train:
        steps.append(T.RandomCrop(int(image_size)))
        if hflip > 0:
            steps.append(T.RandomHorizontalFlip(hflip))
    else:
        steps.append(T.CenterCrop(int(image_size)))
    steps += [T.ToDtype(torch.float32, scale=True), T.Normalize(mean=list(mean), std=list(std))]
    return T.Compose(steps)


__all__ = ["create_transform"]
