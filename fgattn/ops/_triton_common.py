"""Shared pieces of the fused channel-attention kernels: a jitted row-block dot and tile picking.

Layout convention of every kernel: tensors are (B, C, L); the softmax runs over the C axis
(flash-attention's "sequence") and L is the reduction axis of the logits (its "head dim").
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

# Tile sizes, module-level so tests can shrink them to exercise the multi-block and masked paths.
# How they were chosen and what they measure: benchmarks/README.md.
TILES = {
    "block_m": 64,  # rows of the output a program owns
    "block_n": 64,  # columns of the C x C logits a program handles per loop step
    "max_tile": 256,  # widest accumulator (output columns) a program keeps in registers
    "max_chunk": 64,  # widest slice of a reduction over L loaded per tl.dot
}


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1 at import time)."""
    return bool(triton.knobs.runtime.interpret)


def check_device(*xs: torch.Tensor) -> None:
    if any(x.device.type != "cuda" for x in xs) and not interpreting():
        raise RuntimeError(
            "fgattn's Triton kernels need CUDA tensors; CPU tensors only run under the Triton "
            "interpreter (set TRITON_INTERPRET=1 before fgattn.ops.triton_backend is imported)"
        )


def device_guard(x: torch.Tensor):
    """Launch on x's GPU (Triton uses the current device), not whatever device is current."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def precision(x: torch.Tensor, tf32: bool) -> str:
    """tl.dot input precision: only matters for fp32 inputs (TF32 tensor cores vs exact fp32)."""
    return "tf32" if (tf32 and x.dtype == torch.float32) else "ieee"


def chunk(width: int) -> int:
    """Width of the slices a reduction over `width` is looped in.

    L = 196 is not a power of two: one 256-wide block would waste 23% of the dot work, 32-wide
    chunks pad it to 224 only. Take the widest chunk padding to at most 15% over `width`, else the
    one padding least (tl.dot needs at least 16).
    """
    options = [c for c in (128, 64, 32, 16) if c <= TILES["max_chunk"]] or [16]
    padded = {c: triton.cdiv(width, c) * c for c in options}
    good = [c for c in options if padded[c] <= 1.15 * width]
    if good:
        return good[0]
    least = min(padded.values())
    return next(c for c in options if padded[c] == least)


# Shared memory a program stages per unit of (tile width x itemsize), measured on the largest kernel
# (the SCI backward stages two BLOCK_N x tile operands): 144 KiB at tile 256 in fp32 on sm_80/sm_90.
# benchmarks/kernel_resources.py compiles every kernel per architecture and checks the rule holds.
SMEM_PER_TILE_BYTE = 144


@functools.cache
def _device_shared_memory(index: int) -> int:
    return torch.cuda.get_device_properties(index).shared_memory_per_block_optin


def shared_memory_limit(x: torch.Tensor) -> int | None:
    """Shared memory one program may use on x's GPU (bytes); None (no limit) off the GPU."""
    if x.device.type != "cuda":
        return None
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    return _device_shared_memory(index)


def tile(width: int, like: torch.Tensor, max_tile: int | None = None) -> int:
    """Width of an output accumulator tile over `width` columns of tensors like `like`.

    The whole row up to `max_tile` (else the grid splits it), halved until the operand tiles fit the
    GPU's shared memory: 256 fits sm_80/sm_90 in every dtype, while sm_86/sm_89 (~99 KiB per
    block) take 128 in fp32 and sm_75 (64 KiB) less still.
    """
    cap = max_tile or TILES["max_tile"]
    limit = shared_memory_limit(like)
    while limit is not None and cap > 16 and SMEM_PER_TILE_BYTE * cap * like.element_size() > limit:
        cap //= 2
    return max(16, min(triton.next_power_of_2(width), cap))


def warps(*tiles: int) -> int:
    return 8 if max(tiles) >= 256 else 4


@triton.jit
def dot_rows(
    a_ptr,
    b_ptr,
    offs_m,
    offs_n,
    C,
    K,
    stride_ac,
    stride_ak,
    stride_bc,
    stride_bk,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """a[offs_m, :K] · b[offs_n, :K]ᵀ in fp32, looping over K in BLOCK_K chunks (masked tail)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(
            a_ptr + offs_m[:, None] * stride_ac + offs_k[None, :] * stride_ak,
            mask=(offs_m[:, None] < C) & (offs_k[None, :] < K),
            other=0.0,
        )
        # Loaded transposed (K x N) so tl.dot needs no register transpose.
        bt = tl.load(
            b_ptr + offs_n[None, :] * stride_bc + offs_k[:, None] * stride_bk,
            mask=(offs_n[None, :] < C) & (offs_k[:, None] < K),
            other=0.0,
        )
        acc = tl.dot(a, bt, acc, input_precision=PRECISION)
    return acc


@triton.jit
def probs(s, m, log_sum, valid):
    """Softmax probabilities exp((s − max) − log Σ) of scaled logits from their rows' kept
    (max, log Σ) pair, broadcast to s; 0 where not `valid` (a padding row or column would give
    exp(0 − lse) = inf when lse ≪ 0)."""
    return tl.exp(tl.where(valid, (s - m) - log_sum, float("-inf")))


@triton.jit
def load_tile(ptr, offs_c, offs_l, C, L, stride_c, stride_l):
    """ptr[offs_c, offs_l], zero outside (C, L)."""
    return tl.load(
        ptr + offs_c[:, None] * stride_c + offs_l[None, :] * stride_l,
        mask=(offs_c[:, None] < C) & (offs_l[None, :] < L),
        other=0.0,
    )


@triton.jit
def store_tile(ptr, val, offs_c, offs_l, C, L, stride_c, stride_l):
    tl.store(
        ptr + offs_c[:, None] * stride_c + offs_l[None, :] * stride_l,
        val.to(ptr.dtype.element_ty),
        mask=(offs_c[:, None] < C) & (offs_l[None, :] < L),
    )
