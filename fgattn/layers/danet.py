"""DANet's channel attention module (Fu et al., Dual Attention Network for Scene Segmentation,
CVPR 2019, §3.3): the same channel softmax as CIN's SCI, behind a learned residual gate."""

from __future__ import annotations

import torch
from torch import nn

from .. import _args
from .._shapes import check_image_batch
from ..functional import channel_attention


class ChannelAttentionModule(nn.Module):
    """E = γ · softmax(rowmax(S) − S) A + A with S = A Aᵀ over the C channels of A.

    This is what DANet's official code computes (and its copies: mmsegmentation's ``CAM``,
    PaddleSeg, gluon-cv): ``energy_new = max(energy, -1) - energy; softmax(energy_new)``.
    rowmax(S) − S differs from −S by one constant per row, which the softmax cancels, so the
    attention is softmax(−A Aᵀ), CIN eq. 2's W, and the module runs on fgattn's dispatched
    channel attention (fused kernels, no C × C matrix on the GPU paths) with ``scale=-1``.
    γ is one learned scalar, zero at the start, so a freshly inserted module is the identity.

    Args:
        scale: logit scale of S; −1 reproduces the official code (softmax(rowmax(S) − S)).
        gamma_init: the starting γ (DANet: 0).

    Shapes:
        x: (B, C, H, W) -> (B, C, H, W), x's dtype and memory format.
    """

    def __init__(self, scale: float = -1.0, gamma_init: float = 0.0) -> None:
        super().__init__()
        self.scale = _args.real(scale, "scale")
        # Shape (1,) as in DANet, so its checkpoints' ``gamma`` loads as it is.
        self.gamma = nn.Parameter(torch.full((1,), _args.real(gamma_init, "gamma_init")))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image_batch(x, "x")
        y = channel_attention(x, scale=self.scale)
        return self.gamma.to(y.dtype) * y + x

    def extra_repr(self) -> str:
        return f"scale={self.scale}"
