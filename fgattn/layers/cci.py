"""Contrastive channel interaction (CIN, Gao et al. AAAI 2020, eq. 5–6)."""

from __future__ import annotations

import torch
from einops import reduce
from torch import nn

from .. import _args
from .._shapes import check_image_batch, check_module_input, check_same_device, split_pairs
from ..functional import channel_attention, contrastive_channel_attention
from .helpers import conv_input, logit_scale


class CCI(nn.Module):
    """Contrastive channel interaction between the two images of each pair.

    CIN eq. 5: W_AB = |W_A − η W_B|, W_BA = |W_B − γ W_A| with η = ψ([Y_A, Y_B]),
    γ = ψ([Y_B, Y_A]); eq. 6: Z'_A = φ(W_AB X_A) + X_A, Z'_B = φ(W_BA X_B) + X_B (the paper prints
    "+ X_A" in the second term, a typo). W_X = softmax(scale · X Xᵀ) as in SCI.

    ψ is a fully connected layer on the globally average-pooled [Y_A, Y_B] (2C -> 1), so the module
    works at any input size (the Hawkeye reimplementation flattens a 7×7 map into its Linear and
    only runs at 224 px).

    Args:
        channels: C (at most 65536).
        scale: logit scale of the SCI matrices (paper: −1), |scale| <= 1e4.
        length_normalized: divide the scale by H·W (Hawkeye's variant), see `SCI`.
        phi: the 3×3 convolution φ; pass ``sci.phi`` to share it with SCI. A new one if None.
            It must keep the shape of its input (checked at forward: Z' = φ(·) + X).

    Shapes:
        forward(x_a, x_b, y_a=None, y_b=None): x_a, x_b (N, C, H, W) feature maps of the pairs;
        y_a, y_b the SCI interactions Y (computed when not given). With x_b None, x_a is a batch of
        2N images whose first half pairs with its second half.
        Returns (Z'_A, Z'_B, η, γ): two (N, C, H, W) maps and two (N,) weights.
    """

    def __init__(
        self,
        channels: int,
        scale: float = -1.0,
        length_normalized: bool = False,
        phi: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.channels = _args.integer(channels, "channels", minimum=1, maximum=_args.MAX_CHANNELS)
        self.scale = _args.real(scale, "scale", low=-_args.MAX_SCALE, high=_args.MAX_SCALE)
        self.length_normalized = _args.boolean(length_normalized, "length_normalized")
        if phi is not None and not isinstance(phi, nn.Module):
            raise TypeError(
                f"phi must be an nn.Module (e.g. sci.phi) or None, got {type(phi).__name__}"
            )
        self.phi = phi if phi is not None else nn.Conv2d(channels, channels, 3, padding=1)
        self.psi = nn.Linear(2 * channels, 1)

    def weights(self, y_a: torch.Tensor, y_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """η = ψ([Y_A, Y_B]) and γ = ψ([Y_B, Y_A]), each (N,)."""
        pooled_a = reduce(y_a, "n c h w -> n c", "mean")
        pooled_b = reduce(y_b, "n c h w -> n c", "mean")
        eta = self.psi(torch.cat([pooled_a, pooled_b], dim=1)).squeeze(1)
        gamma = self.psi(torch.cat([pooled_b, pooled_a], dim=1)).squeeze(1)
        return eta, gamma

    def forward(
        self,
        x_a: torch.Tensor,
        x_b: torch.Tensor | None = None,
        y_a: torch.Tensor | None = None,
        y_b: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if x_b is None:
            check_image_batch(x_a, "x")
            x_a, x_b = split_pairs(x_a, "x")
            if y_a is not None:
                y_a, y_b = split_pairs(y_a, "y")
        check_image_batch(x_a, "x_a", self.channels)
        check_image_batch(x_b, "x_b")
        check_module_input(x_a, "x_a", self)
        check_same_device(x_a, "x_a", x_b, "x_b")
        if x_a.shape != x_b.shape:
            raise ValueError(
                f"x_b must have x_a's shape {tuple(x_a.shape)}, got shape {tuple(x_b.shape)}"
            )
        for y, name in ((y_a, "y_a"), (y_b, "y_b")):
            if y is not None and (not isinstance(y, torch.Tensor) or y.shape != x_a.shape):
                got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                raise ValueError(
                    f"{name} (the SCI interaction Y) must have x_a's shape {tuple(x_a.shape)}, "
                    f"got {got}"
                )
            if y is not None:
                check_same_device(x_a, "x_a", y, name)
        scale = logit_scale(self.scale, self.length_normalized, x_a)
        if y_a is None or y_b is None:
            y_a = channel_attention(x_a, scale=scale)
            y_b = channel_attention(x_b, scale=scale)
        eta, gamma = self.weights(y_a, y_b)
        y_ab = contrastive_channel_attention(x_a, x_b, eta, scale=scale)
        y_ba = contrastive_channel_attention(x_b, x_a, gamma, scale=scale)
        z_ab, z_ba = self.phi(conv_input(y_ab)), self.phi(conv_input(y_ba))
        if z_ab.shape != x_a.shape:  # a φ that changes the shape would be broadcast into X
            raise ValueError(
                f"phi must keep the shape of its input (Z' = φ(Y) + X): it maps {tuple(x_a.shape)} "
                f"to {tuple(z_ab.shape)}; use a same-padded convolution (padding=kernel_size // 2)"
            )
        return x_a + z_ab, x_b + z_ba, eta, gamma  # x first: x's memory format

    def extra_repr(self) -> str:
        return f"channels={self.channels}, scale={self.scale}"
