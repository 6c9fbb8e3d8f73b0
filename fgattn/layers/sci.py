"""Self-channel interaction (CIN, Gao et al. AAAI 2020, eq. 1–3)."""

from __future__ import annotations

import torch
from torch import nn

from .. import _args
from .._shapes import check_image_batch, check_module_input
from ..functional import channel_attention
from .helpers import conv_input, logit_scale


class SCI(nn.Module):
    """Self-channel interaction: Z = φ(W X) + X with W = softmax(scale · X Xᵀ) over channels.

    CIN eq. 1: Y = W X; eq. 2: W_ij = exp(−(X Xᵀ)_ij) / Σ_k exp(−(X Xᵀ)_ik); eq. 3: Z = φ(Y) + X,
    φ a 3×3 convolution.

    Args:
        channels: C, the channels of the input feature map (at most 65536).
        scale: multiplies the logits X Xᵀ, |scale| <= 1e4. The paper uses −1 (default).
        length_normalized: divide the scale by L = H·W, as the public Hawkeye reimplementation
            does (S = X Xᵀ / (H·W)); off by default, following the paper.
        kernel_size: size of φ's convolution (3 in the paper).

    Shapes:
        x: (B, C, H, W) -> Z: (B, C, H, W); with ``return_interaction=True`` also Y: (B, C, H, W).
    """

    def __init__(
        self,
        channels: int,
        scale: float = -1.0,
        length_normalized: bool = False,
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        self.channels = _args.integer(channels, "channels", minimum=1, maximum=_args.MAX_CHANNELS)
        self.scale = _args.real(scale, "scale", low=-_args.MAX_SCALE, high=_args.MAX_SCALE)
        self.length_normalized = _args.boolean(length_normalized, "length_normalized")
        kernel_size = _args.integer(kernel_size, "kernel_size", minimum=1)
        if kernel_size % 2 == 0:  # φ(Y) + X needs φ to keep the spatial size
            raise ValueError(f"kernel_size must be odd (same-size output), got {kernel_size}")
        self.phi = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2)

    def effective_scale(self, x: torch.Tensor) -> float:
        """The logit scale used for input x (scale, or scale / (H·W) when length-normalised)."""
        return logit_scale(self.scale, self.length_normalized, x)

    def interaction(self, x: torch.Tensor) -> torch.Tensor:
        """Y = W X (CIN eq. 1), same shape as x."""
        check_image_batch(x, "x", self.channels)
        check_module_input(x, "x", self)
        return channel_attention(x, scale=self.effective_scale(x))

    def forward(
        self, x: torch.Tensor, return_interaction: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        y = self.interaction(x)
        z = x + self.phi(conv_input(y))  # x first: z keeps x's memory format
        return (z, y) if return_interaction else z

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, scale={self.scale}, "
            f"length_normalized={self.length_normalized}"
        )
