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


def time_config(kernel_call, quantiles):
    """The autotuners' timer: Triton's own on a GPU. Under the interpreter the prunes keep one
    config, which Triton 3.4 still times (through a GPU driver there is none of): no run."""
    if interpreting():
        return [0.0 for _ in quantiles]
    from triton.testing import do_bench

    return do_bench(kernel_call, quantiles=quantiles)


def autotuned(configs: list, key: list[str], prune):
    """`triton.autotune` over `configs`, keyed on `key`, pruned by `prune` (an
    early_config_prune), timed by `time_config`: the autotuned kernels' one decorator."""
    return triton.autotune(
        configs=configs, key=key, prune_configs_by={"early_config_prune": prune},
        do_bench=time_config,
    )  # fmt: skip


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


# ----------------------------------------------------------------------------------------------
# Custom ops: every kernel family registers its pair the same way.


def fused_op(
    name: str, inputs: tuple[str, ...], forward, backward, *, value: int = 0, stats: int = 1
):
    """Registers a kernel family's pair of ops, fgattn::{name}_fwd and fgattn::{name}_bwd, with
    their fakes and autograd, and returns (fwd, bwd).

        fwd(*inputs, float scale, bool tf32) -> (out, *stats)
        bwd(grad, *inputs, *stats, float scale, bool tf32) -> the gradient of each input

    `forward` and `backward` run the kernels on real tensors with those arguments. out is
    (B, C, Lv) in the dtype and width of `inputs[value]`; each of the `stats` tensors is (B, 2, C)
    fp32, the [max, log Σ] of one softmax's rows, which the backward reuses. The ops are opaque to
    torch.compile (the fakes give it shapes); autograd saves the inputs and the statistics and
    calls bwd, so the backward is an op of its own too.
    """
    tensors = ", ".join(f"Tensor {arg}" for arg in inputs)
    saved = ", ".join(f"Tensor stats{i}" for i in range(stats))
    grads = "Tensor" if len(inputs) == 1 else f"({', '.join(['Tensor'] * len(inputs))})"
    fwd = torch.library.custom_op(
        f"fgattn::{name}_fwd", forward, mutates_args=(),
        schema=f"({tensors}, float scale, bool tf32) -> ({', '.join(['Tensor'] * (1 + stats))})",
    )  # fmt: skip
    bwd = torch.library.custom_op(
        f"fgattn::{name}_bwd", backward, mutates_args=(),
        schema=f"(Tensor grad, {tensors}, {saved}, float scale, bool tf32) -> {grads}",
    )  # fmt: skip
    n = len(inputs)

    @fwd.register_fake
    def _(*args):
        x, like = args[0], args[value]
        row_stats = (
            x.new_empty((x.shape[0], 2, x.shape[1]), dtype=torch.float32) for _ in range(stats)
        )
        return like.new_empty((*x.shape[:2], like.shape[2])), *row_stats

    @bwd.register_fake
    def _(grad, *args):
        out = tuple(torch.empty_like(x) for x in args[:n])
        return out if n > 1 else out[0]

    def setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:n], *output[1:])
        ctx.scale, ctx.tf32 = inputs[n:]

    def grad(ctx, grad_out, *_grad_stats):
        out = bwd(grad_out, *ctx.saved_tensors, ctx.scale, ctx.tf32)
        return *(out if n > 1 else (out,)), None, None

    fwd.register_autograd(grad, setup_context=setup)
    return fwd, bwd


def one_dtype(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """xs cast to their promoted dtype: a kernel takes one (callers cast the result back)."""
    common = functools.reduce(torch.promote_types, (x.dtype for x in xs))
    return tuple(x.to(common) for x in xs)
