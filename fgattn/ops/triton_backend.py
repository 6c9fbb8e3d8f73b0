"""fgattn's fused Triton kernels as one implementation of the ops (`fgattn.ops.dispatch`: "triton").

Runs CUDA tensors; CPU tensors only under the Triton interpreter (``TRITON_INTERPRET=1`` set before
Triton is imported), which is how CI tests the kernels. fp32 uses exact fp32 products unless
``torch.backends.cuda.matmul.allow_tf32`` is set; fp16/bf16 use the tensor cores with fp32
accumulation. The dispatcher sends float64 and empty inputs elsewhere.

`kernels` picks the kernel family: "fused" (`triton_channel_attention`, `triton_contrastive`; any L)
or "flash" (the FlashAttention-2-shaped `triton_flash`, `triton_flash_contrastive`; L ≤ 256; the
dispatcher's "triton_fa") or "gram" (`triton_gram`: the logits as an fp32 Gram GEMM, for L > 256;
self and cross attention only; the dispatcher's "triton_gram").
"""

from __future__ import annotations

import torch

try:
    from . import triton_channel_attention as _attention
    from . import triton_contrastive as _contrastive
    from . import triton_flash as _flash
    from . import triton_flash_contrastive as _flash_contrastive
    from . import triton_gram as _gram
    from ._triton_common import interpreting
except ImportError as err:  # triton missing or too old
    AVAILABLE = False
    UNAVAILABLE_REASON = f"Triton kernels could not be imported: {err}"
else:
    AVAILABLE = True
    UNAVAILABLE_REASON = ""

__all__ = [
    "AVAILABLE",
    "UNAVAILABLE_REASON",
    "channel_attention",
    "contrastive_channel_attention",
    "interpreting",
    "self_attention",
]


def _tf32() -> bool:
    return torch.backends.cuda.matmul.allow_tf32


def _module(kernels: str):
    return {"flash": _flash, "gram": _gram}.get(kernels, _attention)


def self_attention(x: torch.Tensor, scale: float, kernels: str = "fused") -> torch.Tensor:
    """softmax(scale · x xᵀ) x: x (B, C, L) -> (B, C, L)."""
    return _module(kernels).self_attention(x, scale, _tf32())


def channel_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, kernels: str = "fused"
) -> torch.Tensor:
    """softmax(scale · q kᵀ) v: q, k (B, C, L), v (B, C, Lv) -> (B, C, Lv) in v's dtype."""
    return _module(kernels).channel_attention(q, k, v, scale, _tf32())


def contrastive_channel_attention(
    x_a: torch.Tensor, x_b: torch.Tensor, eta: torch.Tensor, scale: float, kernels: str = "fused"
) -> torch.Tensor:
    """|W_A − η W_B| X_A with W_X = softmax(scale · X Xᵀ); eta (B,) -> (B, C, L) in x_a's dtype."""
    module = _flash_contrastive if kernels == "flash" else _contrastive
    return module.contrastive_channel_attention(x_a, x_b, eta, scale, _tf32())
