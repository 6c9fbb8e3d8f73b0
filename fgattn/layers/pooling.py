"""Second-order pooling: bilinear (B-CNN) and bilinear attention pooling (WS-DAN / PCA-Net code)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .. import _args
from .._shapes import check_image_batch, check_same_device

# How BilinearAttentionPooling flattens P: attention-major "mc" or feature-major "cm".
ORDERS = ("mc", "cm")


def _at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    """The dtype the pooling sums in: fp32, or float64 for float64 input."""
    return torch.promote_types(dtype, torch.float32)


def signed_sqrt(x: torch.Tensor, eps: float) -> torch.Tensor:
    """sign(x) · sqrt(|x| + eps); eps keeps the gradient finite at 0."""
    return torch.sign(x) * torch.sqrt(x.abs() + eps)


class BilinearPooling(nn.Module):
    """Bilinear pooling of Lin et al. (B-CNN, ICCV 2015), as used by PCA-Net (§4.1).

    B = X Yᵀ / L over the L = H·W positions (Y = X by default), flattened, passed through the signed
    square root and L2-normalised. Computed in fp32 (float64 for float64 input), also under autocast
    (sums of L products).

    Args:
        eps: added inside the square root, in [0, 1].

    Shapes:
        forward(x, y=None): x (B, C1, H, W), y (B, C2, H, W) -> (B, C1·C2).
    """

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = _args.real(eps, "eps", low=0.0, high=1.0)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        check_image_batch(x, "x")
        y = x if y is None else y
        check_image_batch(y, "y")
        check_same_device(x, "x", y, "y")
        if x.shape[0] != y.shape[0] or x.shape[2:] != y.shape[2:]:
            raise ValueError(
                f"y must match x in batch and spatial size: x has shape {tuple(x.shape)}, "
                f"y has shape {tuple(y.shape)}"
            )
        length = x.shape[2] * x.shape[3]
        with torch.autocast(x.device.type, enabled=False):
            dtype = _at_least_fp32(x.dtype)
            x3 = rearrange(x.to(dtype), "b c h w -> b c (h w)")
            y3 = rearrange(y.to(dtype), "b c h w -> b c (h w)")
            b = torch.bmm(x3, y3.transpose(1, 2)) / length
            b = signed_sqrt(rearrange(b, "b c d -> b (c d)"), self.eps)
            return F.normalize(b, dim=1).to(x.dtype)


class BilinearAttentionPooling(nn.Module):
    """Bilinear attention pooling: features pooled by each of M attention maps.

    As PCA-Net's official code (after WS-DAN, Hu et al. 2019): P_mc = Σ_hw A_m F_c / (H·W),
    flattened to M·C, signed square root, L2 normalisation, times `scale` (the official code uses
    100 and feeds its 512 × 32 = 16384-d output to the classifier).

    Args:
        eps: added inside the square root, in [0, 1].
        scale: multiplies the normalised vector (1 by default), in (0, 1e4].
        order: how P is flattened: "mc" (attention-major, index m·C + c; the default) or "cm"
            (feature-major, index c·M + m: the official code's bmm(F, Aᵀ), whose classifier
            weights load without permuting).

    Shapes:
        forward(features, attention): features (B, C, H, W), attention (B, M, h, w); attention maps
        of another size are resized bilinearly to (H, W) -> (B, M·C) in ``order``.
    """

    def __init__(self, eps: float = 1e-5, scale: float = 1.0, order: str = "mc") -> None:
        super().__init__()
        self.eps = _args.real(eps, "eps", low=0.0, high=1.0)
        self.scale = _args.real(scale, "scale", low=0.0, high=_args.MAX_SCALE, low_open=True)
        self.order = _args.choice(order, "order", ORDERS)

    def forward(self, features: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        check_image_batch(features, "features")
        check_image_batch(attention, "attention")
        check_same_device(features, "features", attention, "attention")
        if attention.shape[0] != features.shape[0]:
            raise ValueError(
                f"attention must have one set of maps per image: features has shape "
                f"{tuple(features.shape)}, attention has shape {tuple(attention.shape)}"
            )
        h, w = features.shape[2:]
        if attention.shape[2:] != features.shape[2:]:
            attention = F.interpolate(attention, size=(h, w), mode="bilinear", align_corners=False)
        with torch.autocast(features.device.type, enabled=False):
            dtype = _at_least_fp32(features.dtype)
            f3 = rearrange(features.to(dtype), "b c h w -> b c (h w)")
            a3 = rearrange(attention.to(dtype), "b m h w -> b m (h w)")
            p = torch.bmm(a3, f3.transpose(1, 2)) / (h * w)
            flat = "b m c -> b (m c)" if self.order == "mc" else "b m c -> b (c m)"
            p = signed_sqrt(rearrange(p, flat), self.eps)
            return (F.normalize(p, dim=1) * self.scale).to(features.dtype)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, scale={self.scale}, order={self.order!r}"
