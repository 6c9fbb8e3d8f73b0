"""fgattn's Triton backend: the fused kernels behind `fgattn.backend` (name ``"triton"``).

Runs CUDA tensors; CPU tensors only under the Triton interpreter (``TRITON_INTERPRET=1`` set before
this module is imported), which is how CI tests the kernels. fp32 uses exact fp32 products unless
``torch.backends.cuda.matmul.allow_tf32`` is set; fp16/bf16 use the tensor cores with fp32
accumulation. float64 and empty inputs go to the reference implementation.
"""

from __future__ import annotations

import torch

from . import reference

try:
    from .triton_channel_attention import channel_attention as _channel_attention
    from .triton_contrastive import contrastive_channel_attention as _contrastive
except ImportError as err:  # triton missing or too old
    AVAILABLE = False
    UNAVAILABLE_REASON = f"Triton kernels could not be imported: {err}"
else:
    AVAILABLE = True
    UNAVAILABLE_REASON = ""

__all__ = ["AVAILABLE", "UNAVAILABLE_REASON", "channel_attention", "contrastive_channel_attention"]


def _use_reference(*xs: torch.Tensor) -> bool:
    return any(x.dtype == torch.float64 or x.numel() == 0 for x in xs)


def _tf32() -> bool:
    return torch.backends.cuda.matmul.allow_tf32


def channel_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """softmax(scale · q kᵀ) v: q, k (B, C, L), v (B, C, Lv) -> (B, C, Lv) in v's dtype."""
    if _use_reference(q, k, v):
        return reference.channel_attention(q, k, v, scale)
    return _channel_attention(q, k, v, scale, _tf32())


def contrastive_channel_attention(
    x_a: torch.Tensor, x_b: torch.Tensor, eta: torch.Tensor, scale: float
) -> torch.Tensor:
    """|W_A − η W_B| X_A with W_X = softmax(scale · X Xᵀ); eta (B,) -> (B, C, L) in x_a's dtype."""
    if _use_reference(x_a, x_b):
        return reference.contrastive_channel_attention(x_a, x_b, eta, scale)
    return _contrastive(x_a, x_b, eta, scale, _tf32())
