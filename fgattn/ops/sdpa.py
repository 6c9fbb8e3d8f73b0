"""The "sdpa_cudnn", "sdpa_flash" and "sdpa_efficient" implementations: channel attention through
PyTorch's `scaled_dot_product_attention` (SDPA), each naming the SDPA kernel it asks for.

softmax(scale · q kᵀ) v over channels is attention with the C channels as the sequence and L as the
head dimension, one head: (B, C, L) -> (B, 1, C, L). Three things make SDPA compute it exactly:

- **The sign goes into q, the magnitude into SDPA's scale.** Flash attention takes the row maximum
  of the raw scores and multiplies by the scale afterwards, which is the wrong end of the row for a
  negative scale (SDPA(x, x, x, scale=-1) returns NaN on an H100). Negating q is exact in every
  dtype, and SDPA applies |scale| to its fp32 scores, so the logits are the reference's fp32 logits.
- **On CUDA, L is zero-padded to a multiple of 8.** cuDNN and memory-efficient attention need head
  dims in multiples of 8; zero columns change no dot product and the padded output columns are
  sliced off. The CPU's flash kernel takes any head dim.
- **A value wider than q (PCA-Net's [F1 | F2]) is split into q-wide chunks along the head axis**,
  since flash and cuDNN need equal q/k/v head dims; q and k are repeated per chunk.

SDPA accumulates the scores and the softmax statistics in fp32 whatever the input dtype, as the
reference does. If the named kernel refuses the shape, the next in `FALLBACK` takes it, so a call
never fails for that reason. A NaN (or inf) in a row of q gives a NaN row, as in the reference
(`_keep_nan`).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .call import ALL_FLOATS, FLOATS, HALF, Call, Limits

# The SDPA kernels fgattn names, by the suffix of its implementation names ("sdpa_cudnn", ...).
KERNELS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}
# Tried after the named kernel, in this order. On CUDA mem-efficient attention takes every fp16,
# bf16 and fp32 shape once L is padded; on CPU the flash kernel takes every dtype.
FALLBACK = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)

PAD = 8
# Where each kernel runs, as fgattn offers it (the CPU's flash kernel takes every dtype).
LIMITS = {
    "cudnn": Limits(("cuda",), HALF),
    "flash": Limits(("cuda", "cpu"), ALL_FLOATS),
    "efficient": Limits(("cuda",), FLOATS),
}


def refusal(call: Call, kernel: str) -> str | None:
    """Why SDPA's `kernel` is not offered for `call` (None: it is). Under torch.compile on the CPU
    with a backward to follow, SDPA is not offered: at a layer's second input size (dynamic
    shapes) inductor fails to order the symbolic strides of the views SDPA's CPU kernel saves for
    its backward ("cannot determine truth value of Relational", pytorch/pytorch#185510). Dynamo
    gives no way to tell that trace from a static one, so every compiled CPU training call takes
    the reference instead (eager runs and inference keep SDPA)."""
    reason = LIMITS[kernel].refusal(call)
    compiling = torch.compiler.is_compiling()
    if reason is None and call.device_type == "cpu" and call.grad and compiling:
        reason = "under torch.compile on the CPU its backward does not compile at a second size"
    return reason


# sdpa_kernel(..., set_priority=True) makes the list an order, not a set (torch >= 2.6).
_SET_PRIORITY = "set_priority" in inspect.signature(sdpa_kernel).parameters


def _kernel_context(kernel: str):
    first = KERNELS[kernel]
    order = [first, *(k for k in FALLBACK if k != first)]
    return sdpa_kernel(order, set_priority=True) if _SET_PRIORITY else sdpa_kernel(order)


def _width(length: int, device: torch.device) -> int:
    """The head dim SDPA gets: on CUDA L rounded up to a multiple of `PAD`; on the CPU, whose flash
    kernel takes any head dim, L itself (a padded width also made inductor fail there, "cannot
    determine truth value of Relational", when a compiled layer met a second input size)."""
    return -(-length // PAD) * PAD if device.type == "cuda" else length


def _padded(x: torch.Tensor, width: int) -> torch.Tensor:
    """x (..., L) -> (..., width), zeros on the right; contiguous either way."""
    extra = width - x.shape[-1]
    return F.pad(x, (0, extra)) if extra else x.contiguous()


def _heads(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, D) -> SDPA's (B, H, C, D), as a view in the layout cuDNN accepts."""
    return x.transpose(1, 2)


def _attend(q, k, v, scale: float, kernel: str) -> torch.Tensor:
    """SDPA on (B, C, H, D) tensors, the sign of `scale` already in q -> (B, C, H, D)."""
    with torch.autocast(q.device.type, enabled=False), _kernel_context(kernel):
        out = F.scaled_dot_product_attention(
            _heads(q), _heads(k), _heads(v), scale=abs(float(scale))
        )
    if out.requires_grad and not torch.compiler.is_compiling():
        out = _FirstOrderOnly.apply(out, f"sdpa_{kernel}")
    return _heads(out)


class _FirstOrderOnly(torch.autograd.Function):
    """Identity whose backward says, in fgattn's words, that SDPA's backward has no derivative
    (torch itself would fail later, deep inside: "derivative for
    aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented")."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, name: str) -> torch.Tensor:
        ctx.name = name
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if torch.is_grad_enabled():  # create_graph=True: a derivative of the gradient will follow
            raise RuntimeError(
                f"fgattn: the {ctx.name!r} implementation has no second derivative (SDPA's "
                "backward is not differentiable); for a double backward run the ops with "
                "fgattn.backends.use_backend('reference')"
            )
        return grad, None


def _keep_nan(out: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """out with a NaN row wherever q's row holds a NaN or an inf, as the reference gives: SDPA's
    kernels take the row maximum past a NaN logit and return a finite row there. q's row sums
    times 0 are 0, or NaN for such a row; their gradient is 0."""
    return out + (q.sum(-1, keepdim=True) * 0).to(out.dtype)


def self_attention(x: torch.Tensor, scale: float, kernel: str) -> torch.Tensor:
    """softmax(scale · x xᵀ) x: x (B, C, L) -> (B, C, L)."""
    length = x.shape[-1]
    xp = _padded(x, _width(length, x.device)).unsqueeze(2)  # (B, C, 1, width)
    q = -xp if scale < 0 else xp  # the sign, exactly; |scale| is applied by SDPA in fp32
    return _keep_nan(_attend(q, xp, xp, scale, kernel)[:, :, 0, :length], x)


def cross_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, kernel: str
) -> torch.Tensor:
    """softmax(scale · q kᵀ) v: q, k (B, C, L), v (B, C, Lv) -> (B, C, Lv) in v's dtype."""
    out_dtype = v.dtype
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    bsz, c, length = q.shape
    lv = v.shape[2]
    width = _width(length, q.device)
    heads = -(-lv // length)  # v = [v_1 | v_2 | ...], each q-wide, one head each
    v = _padded(v.to(dtype), heads * length).unflatten(2, (heads, length))
    v = _padded(v, width)  # (B, C, heads, width)
    q0 = q
    q = -q if scale < 0 else q
    q, k = (_padded(t.to(dtype), width).unsqueeze(2) for t in (q, k))
    if heads > 1:  # flash and cuDNN want dense heads, not stride-0 ones
        q, k = (t.expand(bsz, c, heads, width).contiguous() for t in (q, k))
    out = _attend(q, k, v, scale, kernel)[..., :length].flatten(2)[..., :lv]
    return _keep_nan(out.to(out_dtype), q0)
