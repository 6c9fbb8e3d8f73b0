"""The "reference" implementation: plain PyTorch, the ground truth the others are tested against.

All inputs are (B, C, L). Logits and the softmax are computed in at least fp32 (fp64 stays fp64)
with autocast disabled, because -X Xᵀ overflows fp16 for ordinary post-ReLU features
(|x| ≈ 30, L = 196 gives logits near 1e5). `torch.softmax` subtracts the row max after scaling,
so a negative scale is safe. Results are returned in the dtype of `v` (resp. `x_a`). It builds the
(B, C, C) matrices, so on a GPU it takes a call only where they fit in free memory.
"""

from __future__ import annotations

import torch

from .call import ALL_FLOATS, Call, Limits, matrices_bytes, matrices_fit

LIMITS = Limits(("cpu", "cuda", "mps"), ALL_FLOATS, empty=True)


def refusal(call: Call) -> str | None:
    """Why the reference cannot run `call` (None: it can)."""
    reason = LIMITS.refusal(call)
    if reason is None and not matrices_fit(call):
        reason = (
            f"its (B, C, C) matrices need {matrices_bytes(call) / 2**30:.1f} GiB, more than free"
        )
    return reason


def _compute_dtype(*xs: torch.Tensor) -> torch.dtype:
    dtype = torch.float32
    for x in xs:
        dtype = torch.promote_types(dtype, x.dtype)
    return dtype


def channel_attention_weights(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """W = softmax(scale · q kᵀ) over the last axis: (B, C, L) x2 -> (B, C, C) in fp32 (or fp64)."""
    dtype = _compute_dtype(q, k)
    with torch.autocast(q.device.type, enabled=False):
        logits = torch.bmm(q.to(dtype), k.to(dtype).transpose(1, 2)) * scale
        return torch.softmax(logits, dim=-1)


def cross_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """softmax(scale · q kᵀ) v: q, k (B, C, L), v (B, C, Lv) -> (B, C, Lv) in v's dtype."""
    w = channel_attention_weights(q, k, scale)
    with torch.autocast(q.device.type, enabled=False):
        return torch.bmm(w, v.to(w.dtype)).to(v.dtype)


def self_attention(x: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scale · x xᵀ) x: x (B, C, L) -> (B, C, L) (CIN eq. 1–2)."""
    return cross_attention(x, x, x, scale)


def contrastive_attention(
    x_a: torch.Tensor, x_b: torch.Tensor, eta: torch.Tensor, scale: float
) -> torch.Tensor:
    """|W_A − η W_B| X_A with W_X = softmax(scale · X Xᵀ); eta (B,) -> (B, C, L) in x_a's dtype."""
    w_a = channel_attention_weights(x_a, x_a, scale)
    w_b = channel_attention_weights(x_b, x_b, scale)
    with torch.autocast(x_a.device.type, enabled=False):
        w = (w_a - eta.to(w_a.dtype).view(-1, 1, 1) * w_b).abs()
        return torch.bmm(w, x_a.to(w.dtype)).to(x_a.dtype)
