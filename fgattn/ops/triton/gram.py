"""The "triton_gram" implementation: channel attention for long rows (L > 256) as two GEMMs, in
Triton.

softmax(scale · q kᵀ) v with q, k: (B, C, L), v: (B, C, Lv), the softmax over the C channels.
`triton_flash` keeps a whole row of q in one program and stops at L = 256; past that, the logits
S = scale · q kᵀ (C x C) are a GEMM with a K-loop over L, and materialising S in fp32 is cheap next
to it (C = 2048, L = 784: 6.6 GFLOP of Gram product against 17 MB of fp32 S per batch element).
So the forward is

1. `_gram_kernel`: S tiles in fp32, the sign applied before any max; in the epilogue, per row and
   column block, the partial statistics (max, Σ exp(s − max)), reduced to the row pair
   (max, log Σ) by torch ops (`_row_stats`). Self attention (q = k) computes only the blocks
   I ≤ J of the symmetric S and stores each tile and its transpose, with the column-block
   statistics of the transpose: half the Gram FLOPs.
2. `_pv_kernel`: out = P v with P = exp((S − max) − log Σ) formed in the GEMM's prologue from the
   fp32 S tiles, then fed to the tensor cores in v's dtype (as flash attention does).

The batch is processed in chunks (`CHUNK_BYTES`, `MIN_CHUNKS`) so the S buffer stays small; S is
not kept for the backward, which saves q, k, v and the row statistics, as flash attention does.

The self-attention backward (q = k = v = X) recomputes S in two passes over the blocks I ≤ J,
each with the three tile products S_IJ = X_I X_Jᵀ, dP_IJ = dO_I X_Jᵀ and dP_JIᵀ = X_I dO_Jᵀ:
`_bwd_delta_kernel` gets the row sums δ_i = Σ_j p_ij dp_ij (recomputed rather than dO · out, see
`flash`), then `_bwd_ds_kernel` writes
    W = [G | Pᵀ],   G = dS + dSᵀ,   dS = scale · P ∘ (dP − δ)
(G symmetric, so one tile serves G_IJ and G_JI) in X's dtype, and one cuBLAS GEMM gives
    dX = W · [X; dO] = (dS + dSᵀ) X + Pᵀ dO.
The cross backward does the same without symmetry: two passes over all tiles with S and
dP = dO vᵀ (`_bwd_cross_delta_kernel`, `_bwd_cross_ds_kernel`) write [dS | P], and cuBLAS gives
dq = dS k, dk = dSᵀ q, dv = Pᵀ dO.

The partial statistics and row sums go to buffers with one slot per narrowest column block
(`tuning.GRAM_MIN_BLOCK`); every launch writes every slot (`language.store_partial`), so the
reduction never depends on which block width the autotuner tried or picked.

Tiles, warps and pipeline depth are autotuned per (C, L, dtype) on the user's GPU
(`tuning.gram_autotune`). The dispatcher offers these kernels for L > 256 only; they take any L.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ..call import ATTENTION, FLOATS, Call, Limits
from . import tuning
from .language import (
    load_tile,
    load_tile_t,
    partial_stats,
    probs,
    store_partial,
    store_tile_t,
)
from .library import aligned, custom_op_pair, devices, gradient_buffers, launcher, one_dtype, tf32
from .tuning import GRAM_MIN_BLOCK, gram_autotune, precision

# Bytes of (B, C, C)-sized temporaries one batch chunk may hold: the fp32 S buffer of the forward,
# the [G | Pᵀ] buffer of the backward. 64 MiB: four batch elements at C = 2048 in the forward.
CHUNK_BYTES = 64 << 20
# and at most 1/MIN_CHUNKS of the batch, so the temporaries stay a small fraction of eager's
# B·C² matrices at small C too (eager's peak at C = 512, L = 784 bf16 is 340 MB: 1/5 is 68 MB)
MIN_CHUNKS = 8
LIMITS = Limits(devices(), FLOATS, min_length=tuning.FLASH_MAX_LENGTH + 1)


def refusal(call: Call) -> str | None:
    """Why these kernels cannot run `call` (None: they can): CUDA (or the interpreter), fp16,
    bf16 or fp32, L > 256 (where `triton_flash` stops; the kernels take any L), and every kernel
    the call runs has a config that fits the GPU's shared memory."""
    reason = LIMITS.refusal(call)
    if reason or call.op not in ATTENTION:
        return reason
    kinds = ("gram", "pv") + (("sym_bwd" if call.op == "self" else "cross_bwd",) * call.grad)
    device = torch.device(call.device)
    for kind in kinds:
        reason = tuning.gram_refusal(kind, call.dtype, device)
        if reason:
            return reason
    return None


# ----------------------------------------------------------------------------------------------
# Kernels


@gram_autotune("gram", ["C", "L", "SYMMETRIC"])
@triton.jit
def _gram_kernel(
    Q, K, S, PART,
    C, L, NB, scale,
    sqb, sqc, sql, skb, skc, skl, ssb, ssr, ssc,
    SYMMETRIC: tl.constexpr, PRECISION: tl.constexpr, SLOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    # grid: (row blocks I, column blocks J, batch). S tile [I, J] = scale · q_I k_Jᵀ in fp32, and
    # PART (batch, 2, C, NB) gets the tile's per-row (max, Σ exp) in the slots of rows I that
    # column block J covers (`store_partial`). SYMMETRIC (q = k, BLOCK_M = BLOCK_N): only I ≤ J
    # run; each also stores the transpose at [J, I] and its per-row statistics in rows J's slots
    # of block I.
    tl.static_assert(not SYMMETRIC or BLOCK_M == BLOCK_N)
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    if SYMMETRIC and pid_i > pid_j:
        return
    b = tl.program_id(2).to(tl.int64)
    Q += b * sqb
    K += b * skb
    S += b * ssb
    PART += b * 2 * C * NB
    rows = pid_i * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_j * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in tl.range(0, L, BLOCK_K, num_stages=STAGES):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = load_tile(Q, rows, offs_k, C, L, sqc, sql)
        bt = load_tile_t(K, cols, offs_k, C, L, skc, skl)
        acc = tl.dot(a, bt, acc, input_precision=PRECISION)
    # -- epilogue: the sign applied in fp32 before any max; S and the partial statistics
    s = acc * scale
    valid = (rows[:, None] < C) & (cols[None, :] < C)
    tl.store(S + rows[:, None] * ssr + cols[None, :] * ssc, s, mask=valid)
    s = tl.where(valid, s, float("-inf"))
    m, total = partial_stats(s, 1)
    store_partial(PART, rows, C, NB, pid_j, m, float("-inf"), BLOCK_N // SLOT)
    store_partial(PART + C * NB, rows, C, NB, pid_j, total, 0.0, BLOCK_N // SLOT)
    if SYMMETRIC and pid_i != pid_j:
        store_tile_t(S, s, rows, cols, C, ssr, ssc)
        m, total = partial_stats(s, 0)
        store_partial(PART, cols, C, NB, pid_i, m, float("-inf"), BLOCK_M // SLOT)
        store_partial(PART + C * NB, cols, C, NB, pid_i, total, 0.0, BLOCK_M // SLOT)


@gram_autotune("pv", ["C", "LV"])
@triton.jit
def _pv_kernel(
    S, STATS, V, Out,
    C, LV,
    ssb, ssr, ssc, svb, svc, svl, sob, soc, sol,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    # grid: (row blocks, column blocks of out, batch). out[rows, cols] = Σ_n p[rows, n] v[n, cols],
    # p = exp((s − max) − log Σ) formed from the fp32 S tile in the prologue of each K step.
    # STATS: (batch, 2, C) fp32 [max, log Σ].
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    S += b * ssb
    V += b * svb
    Out += b * sob
    STATS += b * 2 * C
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_d * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.load(STATS + rows, mask=rows < C, other=0.0)
    lo = tl.load(STATS + C + rows, mask=rows < C, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for n0 in tl.range(0, C, BLOCK_K, num_stages=STAGES):
        offs_n = n0 + tl.arange(0, BLOCK_K)
        s = load_tile(S, rows, offs_n, C, C, ssr, ssc)
        p = probs(s, m[:, None], lo[:, None], (rows[:, None] < C) & (offs_n[None, :] < C))
        v = load_tile(V, offs_n, cols, C, LV, svc, svl)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
    tl.store(
        Out + rows[:, None] * soc + cols[None, :] * sol,
        acc.to(Out.dtype.element_ty),
        mask=(rows[:, None] < C) & (cols[None, :] < LV),
    )


@triton.jit
def _bwd_tiles(
    X, DO, rows, cols, C, L, sxc, sxl, sdc, sdl, scale, STATS,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """For the tile [I, J] = [rows, cols] of a self-attention backward: p (p_ij), pt (p_ji),
    dp (dp_ij = do_i · x_j), dpt (dp_ji = x_i · do_j) in fp32, and δ of rows and cols."""
    s = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    dp = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    dpt = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in tl.range(0, L, BLOCK_K, num_stages=STAGES):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xi = load_tile(X, rows, offs_k, C, L, sxc, sxl)
        doi = load_tile(DO, rows, offs_k, C, L, sdc, sdl)
        xjt = load_tile_t(X, cols, offs_k, C, L, sxc, sxl)
        dojt = load_tile_t(DO, cols, offs_k, C, L, sdc, sdl)
        s = tl.dot(xi, xjt, s, input_precision=PRECISION)
        dp = tl.dot(doi, xjt, dp, input_precision=PRECISION)
        dpt = tl.dot(xi, dojt, dpt, input_precision=PRECISION)
    s = s * scale
    valid = (rows[:, None] < C) & (cols[None, :] < C)  # padding: exp(0 − lse) = inf
    m_i = tl.load(STATS + rows, mask=rows < C, other=0.0)
    lo_i = tl.load(STATS + C + rows, mask=rows < C, other=0.0)
    m_j = tl.load(STATS + cols, mask=cols < C, other=0.0)
    lo_j = tl.load(STATS + C + cols, mask=cols < C, other=0.0)
    p = probs(s, m_i[:, None], lo_i[:, None], valid)
    pt = probs(s, m_j[None, :], lo_j[None, :], valid)
    return p, pt, dp, dpt


@gram_autotune("sym_bwd", ["C", "L"])
@triton.jit
def _bwd_delta_kernel(
    X, DO, STATS, PART,
    C, L, NB, scale,
    sxb, sxc, sxl, sdb, sdc, sdl,
    PRECISION: tl.constexpr, SLOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    # grid: (row blocks I, column blocks J, batch), I ≤ J only. PART (batch, C, NB) gets
    # Σ_j p_ij dp_ij over the tile at [rows I, J] and Σ_i p_ji dp_ji at [rows J, I]: δ is its row
    # sum. STATS: (batch, 2, C) fp32 [max, log Σ].
    tl.static_assert(BLOCK_M == BLOCK_N)
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    if pid_i > pid_j:
        return
    b = tl.program_id(2).to(tl.int64)
    X += b * sxb
    DO += b * sdb
    STATS += b * 2 * C
    PART += b * C * NB
    rows = pid_i * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_j * BLOCK_N + tl.arange(0, BLOCK_N)
    p, pt, dp, dpt = _bwd_tiles(
        X, DO, rows, cols, C, L, sxc, sxl, sdc, sdl, scale, STATS,
        PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, STAGES,
    )  # fmt: skip
    store_partial(PART, rows, C, NB, pid_j, tl.sum(p * dp, 1), 0.0, BLOCK_N // SLOT)
    if pid_i != pid_j:
        store_partial(PART, cols, C, NB, pid_i, tl.sum(pt * dpt, 0), 0.0, BLOCK_M // SLOT)


@gram_autotune("sym_bwd", ["C", "L"])
@triton.jit
def _bwd_ds_kernel(
    X, DO, STATS, DELTA, W,
    C, L, scale,
    sxb, sxc, sxl, sdb, sdc, sdl, swb, swr, swc,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    # grid as _bwd_delta_kernel. W (batch, C, 2C) in X's dtype gets [G | Pᵀ] with
    # G = dS + dSᵀ, dS = scale · P ∘ (dP − δ): G_IJ and Pᵀ_IJ = P_JIᵀ from the tile [I, J], and
    # for I < J also G_JI = G_IJᵀ and Pᵀ_JI = P_IJᵀ. DELTA: (batch, C) fp32.
    tl.static_assert(BLOCK_M == BLOCK_N)
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    if pid_i > pid_j:
        return
    b = tl.program_id(2).to(tl.int64)
    X += b * sxb
    DO += b * sdb
    STATS += b * 2 * C
    DELTA += b * C
    W += b * swb
    rows = pid_i * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_j * BLOCK_N + tl.arange(0, BLOCK_N)
    p, pt, dp, dpt = _bwd_tiles(
        X, DO, rows, cols, C, L, sxc, sxl, sdc, sdl, scale, STATS,
        PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, STAGES,
    )  # fmt: skip
    delta_i = tl.load(DELTA + rows, mask=rows < C, other=0.0)
    delta_j = tl.load(DELTA + cols, mask=cols < C, other=0.0)
    g = (p * (dp - delta_i[:, None]) + pt * (dpt - delta_j[None, :])) * scale
    valid = (rows[:, None] < C) & (cols[None, :] < C)
    tile = rows[:, None] * swr + cols[None, :] * swc
    tl.store(W + tile, g.to(W.dtype.element_ty), mask=valid)
    tl.store(W + C * swc + tile, pt.to(W.dtype.element_ty), mask=valid)
    if pid_i != pid_j:
        store_tile_t(W, g, rows, cols, C, swr, swc)
        store_tile_t(W + C * swc, p, rows, cols, C, swr, swc)


@triton.jit
def _cross_tiles(
    Q, K, V, DO, STATS, rows, cols, C, L, LV, scale,
    sqc, sql, skc, skl, svc, svl, sdc, sdl,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """For the tile [rows, cols] of a cross-attention backward: p and dp = do vᵀ in fp32."""
    s = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in tl.range(0, L, BLOCK_K, num_stages=STAGES):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = load_tile(Q, rows, offs_k, C, L, sqc, sql)
        bt = load_tile_t(K, cols, offs_k, C, L, skc, skl)
        s = tl.dot(a, bt, s, input_precision=PRECISION)
    dp = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in tl.range(0, LV, BLOCK_K, num_stages=STAGES):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = load_tile(DO, rows, offs_k, C, LV, sdc, sdl)
        bt = load_tile_t(V, cols, offs_k, C, LV, svc, svl)
        dp = tl.dot(a, bt, dp, input_precision=PRECISION)
    valid = (rows[:, None] < C) & (cols[None, :] < C)
    m = tl.load(STATS + rows, mask=rows < C, other=0.0)
    lo = tl.load(STATS + C + rows, mask=rows < C, other=0.0)
    return probs(s * scale, m[:, None], lo[:, None], valid), dp


@gram_autotune("cross_bwd", ["C", "L", "LV"])
@triton.jit
def _bwd_cross_delta_kernel(
    Q, K, V, DO, STATS, PART,
    C, L, LV, NB, scale,
    sqb, sqc, sql, skb, skc, skl, svb, svc, svl, sdb, sdc, sdl,
    PRECISION: tl.constexpr, SLOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    # grid: (row blocks I, column blocks J, batch). PART (batch, C, NB) gets Σ_j p_ij dp_ij over
    # the tile at [rows I, J]: δ is its row sum.
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    rows = pid_i * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_j * BLOCK_N + tl.arange(0, BLOCK_N)
    p, dp = _cross_tiles(
        Q + b * sqb, K + b * skb, V + b * svb, DO + b * sdb, STATS + b * 2 * C, rows, cols,
        C, L, LV, scale, sqc, sql, skc, skl, svc, svl, sdc, sdl,
        PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, STAGES,
    )  # fmt: skip
    store_partial(PART + b * C * NB, rows, C, NB, pid_j, tl.sum(p * dp, 1), 0.0, BLOCK_N // SLOT)


@gram_autotune("cross_bwd", ["C", "L", "LV"])
@triton.jit
def _bwd_cross_ds_kernel(
    Q, K, V, DO, STATS, DELTA, W,
    C, L, LV, scale,
    sqb, sqc, sql, skb, skc, skl, svb, svc, svl, sdb, sdc, sdl, swb, swr, swc,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    # grid as _bwd_cross_delta_kernel. W (batch, C, 2C) in q's dtype gets [dS | P] with
    # dS = scale · P ∘ (dP − δ). DELTA: (batch, C) fp32.
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    rows = pid_i * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_j * BLOCK_N + tl.arange(0, BLOCK_N)
    p, dp = _cross_tiles(
        Q + b * sqb, K + b * skb, V + b * svb, DO + b * sdb, STATS + b * 2 * C, rows, cols,
        C, L, LV, scale, sqc, sql, skc, skl, svc, svl, sdc, sdl,
        PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, STAGES,
    )  # fmt: skip
    delta = tl.load(DELTA + b * C + rows, mask=rows < C, other=0.0)
    ds = p * (dp - delta[:, None]) * scale
    valid = (rows[:, None] < C) & (cols[None, :] < C)
    tile = W + b * swb + rows[:, None] * swr + cols[None, :] * swc
    tl.store(tile, ds.to(W.dtype.element_ty), mask=valid)
    tl.store(tile + C * swc, p.to(W.dtype.element_ty), mask=valid)


# ----------------------------------------------------------------------------------------------
# Launchers (plain functions on real tensors)


def _padded(x: torch.Tensor) -> torch.Tensor:
    """x (B, C, L) contiguous with rows zero-padded to a multiple of 16 columns, so every row
    starts 16-byte aligned for the pipelined loads (no copy where it already is)."""
    length = x.shape[2]
    return aligned(x, 1, length, triton.cdiv(length, 16) * 16)


def _chunk(batch: int, item_bytes: int) -> int:
    """Batch elements per chunk: as many (item_bytes each) as fit `CHUNK_BYTES`, at most
    batch / `MIN_CHUNKS` rounded up, at least one."""
    return max(1, min(triton.cdiv(batch, MIN_CHUNKS), CHUNK_BYTES // item_bytes))


@contextlib.contextmanager
def _matmul_tf32(enabled: bool):
    """cuBLAS fp32 products in TF32 exactly when the op's `tf32` says so."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _row_stats(part: torch.Tensor, stats: torch.Tensor) -> None:
    """Reduce partial (max, Σ exp(s − max)) (n, 2, C, slots) into stats (n, 2, C) =
    [max, log Σ]; slots a block covered beyond its first hold (−inf, 0)."""
    m = part[:, 0].amax(-1)
    total = (part[:, 1] * torch.exp(part[:, 0] - m[..., None])).sum(-1)
    stats[:, 0] = m
    stats[:, 1] = torch.log(total)


def _tile_grid(c: int, width: int, chunk: int):
    """(row blocks, column blocks of `width`, chunk) for a kernel over C x width tiles."""
    return lambda meta: (
        triton.cdiv(c, meta["BLOCK_M"]),
        triton.cdiv(width, meta["BLOCK_N"]),
        chunk,
    )


@launcher
def _forward(q, k, v, scale: float, tf32: bool, is_self: bool = False):
    bsz, c, _ = q.shape
    lv = v.shape[2]
    prec = precision(q, tf32)
    q = _padded(q)
    k = q if is_self else _padded(k)
    v = q if is_self else _padded(v)
    out = torch.empty((bsz, c, lv), device=v.device, dtype=v.dtype)
    stats = torch.empty((bsz, 2, c), device=q.device, dtype=torch.float32)  # [max, log Σ]
    n = _chunk(bsz, c * c * 4)
    s = torch.empty((n, c, c), device=q.device, dtype=torch.float32)
    nb = triton.cdiv(c, GRAM_MIN_BLOCK)
    part = torch.empty((n, 2, c, nb), device=q.device, dtype=torch.float32)  # every slot written
    for b0 in range(0, bsz, n):
        b1 = min(b0 + n, bsz)
        qc, kc, vc, oc = q[b0:b1], k[b0:b1], v[b0:b1], out[b0:b1]
        _gram_kernel[_tile_grid(c, c, b1 - b0)](
            qc, kc, s, part, c, q.shape[2], nb, scale, *qc.stride(), *kc.stride(), *s.stride(),
            SYMMETRIC=is_self, PRECISION=prec, SLOT=GRAM_MIN_BLOCK,
        )  # fmt: skip
        _row_stats(part[: b1 - b0], stats[b0:b1])
        _pv_kernel[_tile_grid(c, lv, b1 - b0)](
            s, stats[b0:b1], vc, oc, c, lv, *s.stride(), *vc.stride(), *oc.stride(),
            PRECISION=prec,
        )  # fmt: skip
    return out, stats


@launcher
def _backward_self(do, x, stats, scale: float, tf32: bool, needs: list[bool]):
    bsz, c, length = x.shape
    prec = precision(x, tf32)
    do = do.to(x.dtype)
    stats = stats.contiguous()
    dx = torch.empty((bsz, c, length), device=x.device, dtype=x.dtype)
    xp, dop = _padded(x), _padded(do)
    n = _chunk(bsz, 2 * c * c * x.element_size())
    nb = triton.cdiv(c, GRAM_MIN_BLOCK)
    part = torch.empty((n, c, nb), device=x.device, dtype=torch.float32)  # every slot written
    w = torch.empty((n, c, 2 * c), device=x.device, dtype=x.dtype)  # [G | Pᵀ]
    for b0 in range(0, bsz, n):
        b1 = min(b0 + n, bsz)
        grid = _tile_grid(c, c, b1 - b0)
        xc, dc, sc = xp[b0:b1], dop[b0:b1], stats[b0:b1]
        _bwd_delta_kernel[grid](
            xc, dc, sc, part, c, xp.shape[2], nb, scale, *xc.stride(), *dc.stride(),
            PRECISION=prec, SLOT=GRAM_MIN_BLOCK,
        )  # fmt: skip
        delta = part[: b1 - b0].sum(-1)
        _bwd_ds_kernel[grid](
            xc, dc, sc, delta, w, c, xp.shape[2], scale, *xc.stride(), *dc.stride(), *w.stride(),
            PRECISION=prec,
        )  # fmt: skip
        with _matmul_tf32(tf32):  # dX = [G | Pᵀ] · [X; dO]
            torch.bmm(w[: b1 - b0], torch.cat([x[b0:b1], do[b0:b1]], 1), out=dx[b0:b1])
    return dx


@launcher
def _backward_cross(do, q, k, v, stats, scale: float, tf32: bool, needs: list[bool]):
    bsz, c, _ = q.shape
    prec = precision(q, tf32)
    do = do.to(v.dtype)
    stats = stats.contiguous()
    dq, dk, dv = gradient_buffers((q, k, v), needs)
    qp, kp, vp, dop = _padded(q), _padded(k), _padded(v), _padded(do)
    n = _chunk(bsz, 2 * c * c * q.element_size())
    nb = triton.cdiv(c, GRAM_MIN_BLOCK)
    part = torch.empty((n, c, nb), device=q.device, dtype=torch.float32)  # every slot written
    w = torch.empty((n, c, 2 * c), device=q.device, dtype=q.dtype)  # [dS | P]
    for b0 in range(0, bsz, n):
        b1 = min(b0 + n, bsz)
        grid = _tile_grid(c, c, b1 - b0)
        tensors = [t[b0:b1] for t in (qp, kp, vp, dop)]
        sizes = (c, qp.shape[2], vp.shape[2])
        strides = [st for t in tensors for st in t.stride()]
        _bwd_cross_delta_kernel[grid](
            *tensors, stats[b0:b1], part, *sizes, nb, scale, *strides, PRECISION=prec,
            SLOT=GRAM_MIN_BLOCK,
        )  # fmt: skip
        delta = part[: b1 - b0].sum(-1)
        _bwd_cross_ds_kernel[grid](
            *tensors, stats[b0:b1], delta, w, *sizes, scale, *strides, *w.stride(),
            PRECISION=prec,
        )  # fmt: skip
        ds, p = w[: b1 - b0, :, :c], w[: b1 - b0, :, c:]
        with _matmul_tf32(tf32):  # cuBLAS: dq = dS k, dk = dSᵀ q, dv = Pᵀ dO
            if needs[0]:
                torch.bmm(ds, k[b0:b1], out=dq[b0:b1])
            if needs[1]:
                torch.bmm(ds.transpose(1, 2), q[b0:b1], out=dk[b0:b1])
            if needs[2]:
                torch.bmm(p.transpose(1, 2), do[b0:b1], out=dv[b0:b1])
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# Ops (schema, fake and autograd: `custom_op_pair`) and entry points


def _forward_self(x, scale: float, tf32: bool):
    return _forward(x, x, x, scale, tf32, True)


triton_gram_cross_fwd, triton_gram_cross_bwd = custom_op_pair(
    "triton_gram_cross", ("q", "k", "v"), _forward, _backward_cross, value=2
)
triton_gram_self_fwd, triton_gram_self_bwd = custom_op_pair(
    "triton_gram_self", ("x",), _forward_self, _backward_self
)


def self_attention(x: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scale · x xᵀ) x on (B, C, L), any L (meant for L > 256)."""
    return triton_gram_self_fwd(x, scale, tf32())[0]


def cross_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """softmax(scale · q kᵀ) v on (B, C, L) q, k and (B, C, Lv) v, any L; v's dtype."""
    return triton_gram_cross_fwd(*one_dtype(q, k, v), scale, tf32())[0].to(v.dtype)
