"""Co-attention between two same-class images (PCA-Net, Zhang et al. ICME 2021, eq. 1–2)."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from .. import _args
from .._shapes import check_image_batch, check_same_device, split_pairs
from ..functional import channel_attention


class CoAttention(nn.Module):
    """Channel co-attention of a pair of feature maps.

    PCA-Net eq. 1: W = softmax(scale · F1 F2ᵀ) over channels (scale −1 in the paper);
    eq. 2: F_W1 = W F1, F_W2 = W F2. With the default shared W both outputs come from one attention
    call whose values are [F1, F2] concatenated along the spatial axis.

    Args:
        scale: logit scale (paper: −1), |scale| <= 1e4.
        shared_weights: True (paper) uses one W for both images. False follows the official code:
            F_W1 = softmax(scale · F1 F2ᵀ) F1, F_W2 = softmax(scale · F2 F1ᵀ) F2.
        residual: add the input back (F_W + F), as the official code does. Off in the paper.

    Shapes:
        forward(f1, f2): two (N, C, H, W) maps -> (F_W1, F_W2), each (N, C, H, W).
        forward(f): one (2N, C, H, W) batch whose first half pairs with its second half
        -> (2N, C, H, W), [F_W1; F_W2].
    """

    def __init__(
        self,
        scale: float = -1.0,
        shared_weights: bool = True,
        residual: bool = False,
    ) -> None:
        super().__init__()
        self.scale = _args.real(scale, "scale", low=-_args.MAX_SCALE, high=_args.MAX_SCALE)
        self.shared_weights = _args.boolean(shared_weights, "shared_weights")
        self.residual = _args.boolean(residual, "residual")

    def forward(
        self, f1: torch.Tensor, f2: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if f2 is None:
            check_image_batch(f1, "f")
            return torch.cat(self.forward(*split_pairs(f1, "f")), dim=0)
        check_image_batch(f1, "f1")
        check_image_batch(f2, "f2")
        check_same_device(f1, "f1", f2, "f2")
        if f1.shape != f2.shape:
            raise ValueError(
                f"f2 must have f1's shape {tuple(f1.shape)} (a pair of same-size feature maps), "
                f"got shape {tuple(f2.shape)}"
            )
        if self.shared_weights:
            # One W, both images as values: [F1 | F2] along the flattened spatial axis.
            both = torch.cat([rearrange(f, "n c h w -> n c (h w)") for f in (f1, f2)], dim=2)
            out = channel_attention(f1, f2, both, scale=self.scale)
            fw1, fw2 = (
                rearrange(o, "n c (h w) -> n c h w", h=f1.shape[2]) for o in out.chunk(2, dim=2)
            )
        else:
            fw1 = channel_attention(f1, f2, f1, scale=self.scale)
            fw2 = channel_attention(f2, f1, f2, scale=self.scale)
        if self.residual:
            fw1, fw2 = fw1 + f1, fw2 + f2
        return fw1, fw2

    def extra_repr(self) -> str:
        return f"scale={self.scale}, shared_weights={self.shared_weights}, residual={self.residual}"
