"""Functional channel-bilinear attention ops.

Each op takes (B, C, L) or (B, C, H, W) feature maps, checks them, and runs on the implementation
that `fgattn.ops.dispatch` chooses: the fastest correct one for the call (see `fgattn.backends`).
Logits are accumulated and normalised in fp32 whatever the input dtype, also under autocast; the
result comes back in the input dtype.
"""

from __future__ import annotations

import math

import torch

from ._shapes import check_float, check_same, check_same_device, like_layout, to_bcl
from .backends import check_backend
from .ops import dispatch
from .ops import reference as _reference

__all__ = ["channel_attention", "channel_attention_weights", "contrastive_channel_attention"]


def _check_scale(scale: float) -> float:
    if isinstance(scale, (bool, torch.Tensor)) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a Python float, got {type(scale).__name__}")
    if not (scale == scale and abs(scale) != math.inf):  # isfinite, in a form dynamo traces
        raise ValueError(f"scale must be a finite float (the papers use -1.0), got {scale}")
    return float(scale)


def _check_backend(backend: str | None) -> str | None:
    return None if backend is None else check_backend(backend, "backend")


def channel_attention(
    q: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    *,
    scale: float = -1.0,
    backend: str | None = None,
) -> torch.Tensor:
    """Channel attention softmax(scale · q kᵀ) v, the softmax taken over channels.

    CIN eq. 1–2 with q = k = v = X (SCI: Y = W X, W = softmax(−X Xᵀ)); PCA-Net eq. 1–2 with
    q = F1, k = F2, v = [F1, F2] concatenated along L (one W, both outputs).

    Args:
        q: (B, C, L) or (B, C, H, W) queries.
        k: keys of q's shape; defaults to q.
        v: (B, C, Lv) or (B, C, Hv, Wv) values, any Lv; defaults to k.
        scale: multiplies the logits q kᵀ; the papers use −1.
        backend: run this implementation (see `fgattn.backends`); None follows the global
            setting, which by default picks the fastest correct one.

    With k and v both None this is self attention (SCI), whose fused paths compute one gradient
    for q = k = v.

    Returns:
        softmax(scale · q kᵀ) v with v's shape, dtype and memory format.
    """
    scale = _check_scale(scale)
    backend = _check_backend(backend)
    if k is None and v is None:
        out = dispatch.run("self", [to_bcl(q, "q")], scale, backend)
        return like_layout(out, q)
    k = q if k is None else k
    v = k if v is None else v
    q3, k3, v3 = to_bcl(q, "q"), to_bcl(k, "k"), to_bcl(v, "v")
    check_same(q3, "q", k3, "k", (0, 1, 2), "batch, channels and length")
    check_same(q3, "q", v3, "v", (0, 1), "batch and channels")
    check_same_device(q3, "q", k3, "k")
    check_same_device(q3, "q", v3, "v")
    out = dispatch.run("cross", [q3, k3, v3], scale, backend)
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
    check_same_device(q3, "q", k3, "k")
    return _reference.channel_attention_weights(q3, k3, scale)


def contrastive_channel_attention(
    x_a: torch.Tensor,
    x_b: torch.Tensor,
    eta: torch.Tensor,
    *,
    scale: float = -1.0,
    backend: str | None = None,
) -> torch.Tensor:
    """Contrastive channel attention |W_A − η W_B| X_A (CIN eq. 5 and Y'_A of eq. 6).

    W_X = softmax(scale · X Xᵀ) over channels. Differentiable in x_a, x_b and eta; the gradient of
    |·| at 0 is taken as 0, as in PyTorch.

    Args:
        x_a: (B, C, L) or (B, C, H, W) features of the first image of each pair.
        x_b: features of the partner images, same shape as x_a.
        eta: (B,) or (B, 1) weight of the partner's matrix, one per pair.
        scale: multiplies the logits X Xᵀ; the paper uses −1.
        backend: run this implementation (see `fgattn.backends`); None: the global setting.

    Returns:
        Y'_A with x_a's shape, dtype and memory format.
    """
    scale = _check_scale(scale)
    backend = _check_backend(backend)
    a3, b3 = to_bcl(x_a, "x_a"), to_bcl(x_b, "x_b")
    check_same(a3, "x_a", b3, "x_b", (0, 1, 2), "batch, channels and length")
    check_float(eta, "eta")
    check_same_device(a3, "x_a", b3, "x_b")
    check_same_device(a3, "x_a", eta, "eta")
    if eta.shape not in ((a3.shape[0],), (a3.shape[0], 1)):
        raise ValueError(
            f"eta must have shape ({a3.shape[0]},) or ({a3.shape[0]}, 1) for a batch of "
            f"{a3.shape[0]} pairs, got shape {tuple(eta.shape)}"
        )
    eta = eta.reshape(-1)
    out = dispatch.run("contrastive", [a3, b3, eta], scale, backend)
    return like_layout(out, x_a)
