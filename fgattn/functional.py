"""Functional channel-bilinear attention ops.

Each op takes (B, C, L) or (B, C, H, W) feature maps, checks them, and runs on the backend that
`fgattn.backend` picks (``backend="auto"``: fused kernels on GPU, plain PyTorch otherwise).
Logits are accumulated and normalised in fp32 whatever the input dtype, also under autocast; the
result comes back in the input dtype.
"""

from __future__ import annotations

import torch

from . import backend as _backend
from ._shapes import check_float, check_same, like_layout, to_bcl
from .ops import reference as _reference

__all__ = ["channel_attention", "channel_attention_weights", "contrastive_channel_attention"]


def _check_scale(scale: float) -> float:
    if isinstance(scale, torch.Tensor) or not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a Python float, got {type(scale).__name__}")
    return float(scale)


def channel_attention(
    q: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    *,
    scale: float = -1.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Channel attention softmax(scale · q kᵀ) v, the softmax taken over channels.

    CIN eq. 1–2 with q = k = v = X (SCI: Y = W X, W = softmax(−X Xᵀ)); PCA-Net eq. 1–2 with
    q = F1, k = F2, v = [F1, F2] concatenated along L (one W, both outputs).

    Args:
        q: (B, C, L) or (B, C, H, W) queries.
        k: keys of q's shape; defaults to q.
        v: (B, C, Lv) or (B, C, Hv, Wv) values, any Lv; defaults to k.
        scale: multiplies the logits q kᵀ; the papers use −1.
        backend: "auto", "torch", "triton" or "cuda" (see `fgattn.backend`).

    Returns:
        softmax(scale · q kᵀ) v with v's shape, dtype and memory format.
    """
    scale = _check_scale(scale)
    k = q if k is None else k
    v = k if v is None else v
    # Defaulted k/v stay the same object as q, so backends can spot self-attention (SCI).
    q3 = to_bcl(q, "q")
    k3 = q3 if k is q else to_bcl(k, "k")
    v3 = k3 if v is k else to_bcl(v, "v")
    check_same(q3, "q", k3, "k", (0, 1, 2), "batch, channels and length")
    check_same(q3, "q", v3, "v", (0, 1), "batch and channels")
    out = _backend.get(backend, v.device).channel_attention(q3, k3, v3, scale)
    return like_layout(out, v)


def channel_attention_weights(
    q: torch.Tensor, k: torch.Tensor | None = None, *, scale: float = -1.0
) -> torch.Tensor:
    """The channel attention matrix W = softmax(scale · q kᵀ) (CIN eq. 2, PCA-Net eq. 1).

    Materialises W, so it is meant for visualisation and tests; the fused paths never build it.

    Args:
        q: (B, C, L) or (B, C, H, W); k: same shape, defaults to q.

    Returns:
        (B, C, C) row-stochastic matrix in fp32 (fp64 for fp64 input).
    """
    scale = _check_scale(scale)
    k = q if k is None else k
    q3, k3 = to_bcl(q, "q"), to_bcl(k, "k")
    check_same(q3, "q", k3, "k", (0, 1, 2), "batch, channels and length")
    return _reference.channel_attention_weights(q3, k3, scale)


def contrastive_channel_attention(
    x_a: torch.Tensor,
    x_b: torch.Tensor,
    eta: torch.Tensor,
    *,
    scale: float = -1.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Contrastive channel attention |W_A − η W_B| X_A (CIN eq. 5 and Y'_A of eq. 6).

    W_X = softmax(scale · X Xᵀ) over channels. Differentiable in x_a, x_b and eta; the gradient of
    |·| at 0 is taken as 0, as in PyTorch.

    Args:
        x_a: (B, C, L) or (B, C, H, W) features of the first image of each pair.
        x_b: features of the partner images, same shape as x_a.
        eta: (B,) or (B, 1) weight of the partner's matrix, one per pair.

    Returns:
        Y'_A with x_a's shape, dtype and memory format.
    """
    scale = _check_scale(scale)
    a3, b3 = to_bcl(x_a, "x_a"), to_bcl(x_b, "x_b")
    check_same(a3, "x_a", b3, "x_b", (0, 1, 2), "batch, channels and length")
    check_float(eta, "eta")
    if eta.shape not in ((a3.shape[0],), (a3.shape[0], 1)):
        raise ValueError(
            f"eta must have shape ({a3.shape[0]},) or ({a3.shape[0]}, 1) for a batch of "
            f"{a3.shape[0]} pairs, got shape {tuple(eta.shape)}"
        )
    eta = eta.reshape(-1)
    out = _backend.get(backend, x_a.device).contrastive_channel_attention(a3, b3, eta, scale)
    return like_layout(out, x_a)
