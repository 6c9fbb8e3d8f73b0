"""Attention erase (PCA-Net, Zhang et al. ICME 2021, eq. 3–5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import reduce
from torch import nn

from .. import _args
from .._shapes import check_image_batch, check_same_device

MODES = ("max", "top_channel", "sampled")
NORMALIZATIONS = ("minmax", "max", "upsampled_max")


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


def _upsampled_means(fw: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C) means of each channel of ``fw`` bilinearly upsampled to ``size``, without
    upsampling it: bilinear interpolation is separable and linear, so the mean is r_hᵀ F r_w / HW
    with r the column sums of the 1-D interpolation matrices."""
    (h, w), (big_h, big_w) = fw.shape[2:], size
    dtype = torch.promote_types(fw.dtype, torch.float32)

    def column_sums(n: int, big: int) -> torch.Tensor:
        basis = torch.eye(n, device=fw.device, dtype=dtype).view(n, 1, n, 1)
        up = F.interpolate(basis, size=(big, 1), mode="bilinear", align_corners=False)
        return up.sum(dim=(1, 2, 3))  # (n,): how much each source row adds up to

    r_h, r_w = column_sums(h, big_h), column_sums(w, big_w)
    return torch.einsum("bchw,h,w->bc", fw.to(dtype), r_h, r_w) / (big_h * big_w)


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
        normalize: "minmax" (default) rescales A to [0, 1] per image; "max" divides by its max
            (θ × max of the h×w map); "upsampled_max" is the official code: A upsampled to the
            image first, pixels strictly below θ × the upsampled map's max kept, and with
            ``mode="sampled"`` the channel probabilities ∝ sqrt(mean of each upsampled channel)
            + 1e-12.
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
        self,
        fw: torch.Tensor,
        generator: torch.Generator | None = None,
        size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """A (B, h, w) before normalisation, per `mode` (``size``: the image size, which the
        official channel probabilities of "sampled" with "upsampled_max" depend on)."""
        if self.mode == "max":
            return fw.amax(dim=1)
        if self.mode == "top_channel":
            index = reduce(fw, "b c h w -> b c", "mean").float().argmax(dim=1)
        else:
            probs = self.channel_probabilities(fw, size).cpu()
            index = torch.multinomial(probs, 1, generator=generator).squeeze(1).to(fw.device)
        return fw[torch.arange(fw.shape[0], device=fw.device), index]

    def channel_probabilities(
        self, fw: torch.Tensor, size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """(B, C) probabilities of each channel in ``mode="sampled"``: ∝ sqrt(its mean activation),
        uniform for an all-zero map; with ``normalize="upsampled_max"`` (and ``size``) the
        official code's sqrt(mean of the channel upsampled to ``size``) + 1e-12."""
        if self.normalize == "upsampled_max" and size is not None:
            weights = _upsampled_means(fw, size).clamp_min(0).sqrt() + 1e-12
            return weights / weights.sum(dim=1, keepdim=True)
        probs = reduce(fw, "b c h w -> b c", "mean").float().clamp_min(0).sqrt()
        dead = probs.sum(dim=1, keepdim=True) == 0
        return torch.where(dead, torch.ones_like(probs), probs)  # all-zero map: uniform

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
        """M (B, 1, *size), at least fp32: 0 on the erased region, 1 elsewhere (eq. 3–4)."""
        generator = generator if generator is not None else self._default_generator()
        a = self.attention_map(fw.detach(), generator, size).unsqueeze(1)
        a = a.to(torch.promote_types(a.dtype, torch.float32))
        if self.normalize == "upsampled_max":  # the official code: upsample, then θ × max
            a = F.interpolate(a, size=size, mode="bilinear", align_corners=False)
            theta = self.thresholds(a.shape[0], a.device, generator).to(a.dtype)
            keep = a < theta * a.amax(dim=(2, 3), keepdim=True)
        else:
            peak = a.amax(dim=(2, 3), keepdim=True)
            if self.normalize == "minmax":
                low = a.amin(dim=(2, 3), keepdim=True)
                a = (a - low) / (peak - low).clamp_min(1e-12)
            else:
                a = a / peak.clamp_min(1e-12)
            a = F.interpolate(a, size=size, mode="bilinear", align_corners=False)
            keep = a <= self.thresholds(a.shape[0], a.device, generator)
        # A map with NaN/Inf says nothing about where to erase: that image's mask is NaN, so
        # the erased image and its loss are too, instead of a silently erased whole image.
        finite = torch.isfinite(a).flatten(1).all(dim=1).view(-1, 1, 1, 1)
        return torch.where(finite, keep.to(a.dtype), float("nan"))

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
