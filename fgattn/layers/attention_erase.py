"""Attention erase (PCA-Net, Zhang et al. ICME 2021, eq. 3–5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import reduce
from torch import nn

from .. import _args
from .._shapes import check_image_batch, check_same_device

MODES = ("max", "top_channel", "sampled")
NORMALIZATIONS = ("minmax", "max")


def check_threshold(
    threshold: float | tuple[float, float] | list[float], name: str = "threshold"
) -> float | tuple[float, float]:
    """θ of eq. 4: a float in [0, 1] or a pair (lo, hi) with 0 <= lo <= hi <= 1; returned as a
    float or a tuple."""
    threshold = tuple(threshold) if isinstance(threshold, (list, tuple)) else threshold
    values = threshold if isinstance(threshold, tuple) else (threshold,)
    for t in values:
        if isinstance(t, bool) or not isinstance(t, (int, float)):
            raise TypeError(
                f"{name} must be a float or a pair of floats, got {type(t).__name__} {t!r}"
            )
    if len(values) not in (1, 2) or not all(0.0 <= float(t) <= 1.0 for t in values):
        raise ValueError(
            f"{name} must be a float in [0, 1] or a pair (lo, hi) with 0 <= lo <= hi <= 1, "
            f"got {threshold!r}"
        )
    if len(values) == 2 and values[0] > values[1]:
        raise ValueError(f"{name} (lo, hi) must have lo <= hi, got {threshold!r}")
    return threshold


class AttentionErase(nn.Module):
    """Erase the most attended region of each image.

    PCA-Net eq. 3: A_ij = max_m F_W(m, i, j), normalised per image and upsampled to the image size;
    eq. 4: M = 0 where A > θ, else 1; eq. 5: I_e = I ⊗ M.

    Args:
        threshold: θ in [0, 1], or (lo, hi) to draw θ ~ U(lo, hi) per image in training (the
            official code draws U(0.2, 0.5)); in eval a pair uses its midpoint.
        mode: how the attention map A is formed from F_W:
            "max" (eq. 3): max over channels;
            "top_channel" (the text of §3.2): the channel with the largest global average;
            "sampled" (official code): one channel per image drawn with probability
            ∝ sqrt(its mean activation).
        normalize: "minmax" (default) rescales A to [0, 1] per image; "max" divides by its max,
            as the official code does (θ × max).
        seed: seeds this module's own random generator (threshold draws and channel sampling).

    Shapes:
        forward(images, fw, generator=None): images (B, 3, H, W), fw (B, C, h, w) co-attended
        features of the same images -> (I_e (B, 3, H, W), M (B, 1, H, W) in images' dtype).
        An image whose fw holds NaN or Inf gets a NaN mask (and erased image), not a guess.
        No gradient flows into fw; images receive the gradient of I ⊗ M.
    """

    def __init__(
        self,
        threshold: float | tuple[float, float] = 0.5,
        mode: str = "max",
        normalize: str = "minmax",
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.threshold = check_threshold(threshold)
        self.mode = _args.choice(mode, "mode", MODES)
        self.normalize = _args.choice(normalize, "normalize", NORMALIZATIONS)
        self.seed = None if seed is None else _args.integer(seed, "seed", minimum=0)
        self._generator: torch.Generator | None = None

    def _default_generator(self) -> torch.Generator | None:
        if self.seed is None:
            return None
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(self.seed)
        return self._generator

    def attention_map(
        self, fw: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """A (B, h, w) before normalisation, per `mode`."""
        if self.mode == "max":
            return fw.amax(dim=1)
        activation = reduce(fw, "b c h w -> b c", "mean").float()
        if self.mode == "top_channel":
            index = activation.argmax(dim=1)
        else:
            probs = activation.clamp_min(0).sqrt().cpu()
            dead = probs.sum(dim=1, keepdim=True) == 0
            probs = torch.where(dead, torch.ones_like(probs), probs)  # all-zero map: uniform
            index = torch.multinomial(probs, 1, generator=generator).squeeze(1).to(fw.device)
        return fw[torch.arange(fw.shape[0], device=fw.device), index]

    def thresholds(
        self, batch: int, device: torch.device, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """θ per image, (B, 1, 1, 1)."""
        if not isinstance(self.threshold, tuple):
            theta = torch.full((batch,), float(self.threshold))
        elif self.training:
            lo, hi = self.threshold
            theta = lo + (hi - lo) * torch.rand(batch, generator=generator)
        else:
            theta = torch.full((batch,), sum(self.threshold) / 2)
        return theta.view(batch, 1, 1, 1).to(device)

    @torch.no_grad()
    def mask(self, fw: torch.Tensor, size: tuple[int, int], generator=None) -> torch.Tensor:
        """M (B, 1, *size) in fp32: 0 on the erased region, 1 elsewhere (eq. 3–4)."""
        generator = generator if generator is not None else self._default_generator()
        a = self.attention_map(fw.detach(), generator).float().unsqueeze(1)
        peak = a.amax(dim=(2, 3), keepdim=True)
        if self.normalize == "minmax":
            low = a.amin(dim=(2, 3), keepdim=True)
            a = (a - low) / (peak - low).clamp_min(1e-12)
        else:
            a = a / peak.clamp_min(1e-12)
        a = F.interpolate(a, size=size, mode="bilinear", align_corners=False)
        theta = self.thresholds(a.shape[0], a.device, generator)
        # A map with NaN/Inf says nothing about where to erase: that image's mask is NaN, so
        # the erased image and its loss are too, instead of a silently erased whole image.
        finite = torch.isfinite(a).flatten(1).all(dim=1).view(-1, 1, 1, 1)
        return torch.where(finite, (a <= theta).float(), float("nan"))

    def forward(
        self, images: torch.Tensor, fw: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        check_image_batch(images, "images")
        check_image_batch(fw, "fw")
        check_same_device(images, "images", fw, "fw")
        if fw.shape[0] != images.shape[0]:
            raise ValueError(
                f"fw must have one feature map per image: images has shape "
                f"{tuple(images.shape)}, fw has shape {tuple(fw.shape)} "
                f"(wanted ({images.shape[0]}, C, h, w))"
            )
        m = self.mask(fw, (images.shape[2], images.shape[3]), generator).to(images.dtype)
        return images * m, m

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}, mode={self.mode!r}, normalize={self.normalize!r}"
