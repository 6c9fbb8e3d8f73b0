"""The `@triton.jit` helpers every kernel family shares: loads and stores of row tiles, rows held as
power-of-two pieces, row statistics and the softmax probabilities rebuilt from them.

Layout convention of every kernel: tensors are (B, C, L); the softmax runs over the C axis (flash
attention's "sequence") and L is the reduction axis of the logits (its "head dim"). A program's
pointers are already offset to its batch element.

Rows wider than a power of two are held as up to three power-of-two pieces (K0, K1, K2; 0 where
absent): L = 196 is 128 + 64 + 16 = 208 columns, not 256, and every product over L is the sum of
the pieces' products. Triton has no zero-width tensors, so an absent piece repeats the first and is
never used (the compiler drops it).
"""

from __future__ import annotations

import triton
import triton.language as tl

# ----------------------------------------------------------------------------------------------
# Tiles


@triton.jit
def load_tile(ptr, offs_c, offs_l, C, L, stride_c, stride_l):
    """ptr[offs_c, offs_l], zero outside (C, L)."""
    return tl.load(
        ptr + offs_c[:, None] * stride_c + offs_l[None, :] * stride_l,
        mask=(offs_c[:, None] < C) & (offs_l[None, :] < L),
        other=0.0,
    )


@triton.jit
def load_tile_t(ptr, offs_c, offs_l, C, L, stride_c, stride_l):
    """ptr[offs_c, offs_l]ᵀ as an (offs_l x offs_c) tile, zero outside (C, L): a tl.dot operand
    that needs no register transpose."""
    return tl.load(
        ptr + offs_c[None, :] * stride_c + offs_l[:, None] * stride_l,
        mask=(offs_c[None, :] < C) & (offs_l[:, None] < L),
        other=0.0,
    )


@triton.jit
def store_tile(ptr, val, offs_c, offs_l, C, L, stride_c, stride_l):
    """ptr[offs_c, offs_l] = val (in ptr's dtype), inside (C, L) only."""
    tl.store(
        ptr + offs_c[:, None] * stride_c + offs_l[None, :] * stride_l,
        val.to(ptr.dtype.element_ty),
        mask=(offs_c[:, None] < C) & (offs_l[None, :] < L),
    )


@triton.jit
def store_tile_t(ptr, val, offs_r, offs_c, C, stride_r, stride_c):
    """ptr[offs_c, offs_r] = valᵀ for a (offs_r x offs_c) tile `val`, inside (C, C) only."""
    tl.store(
        ptr + offs_c[None, :] * stride_r + offs_r[:, None] * stride_c,
        val.to(ptr.dtype.element_ty),
        mask=(offs_r[:, None] < C) & (offs_c[None, :] < C),
    )


@triton.jit
def dot_rows(
    a_ptr, b_ptr, offs_m, offs_n, C, K, stride_ac, stride_ak, stride_bc, stride_bk,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
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


# ----------------------------------------------------------------------------------------------
# Rows as power-of-two pieces


@triton.jit
def load_rows(ptr, rows, R, col0, W: tl.constexpr, END, stride_r, stride_c):
    """ptr[rows, col0 : col0 + W] (W a power of two), zero where rows ≥ R or columns ≥ END."""
    cols = col0 + tl.arange(0, W)
    return tl.load(
        ptr + rows[:, None] * stride_r + cols[None, :] * stride_c,
        mask=(rows[:, None] < R) & (cols[None, :] < END),
        other=0.0,
    )


@triton.jit
def store_rows(ptr, val, rows, R, col0, W: tl.constexpr, END, stride_r, stride_c):
    """ptr[rows, col0 : col0 + W] = val, where rows < R and columns < END."""
    cols = col0 + tl.arange(0, W)
    tl.store(
        ptr + rows[:, None] * stride_r + cols[None, :] * stride_c,
        val.to(ptr.dtype.element_ty),
        mask=(rows[:, None] < R) & (cols[None, :] < END),
    )


@triton.jit
def load_pieces(ptr, rows, R, col0, END, stride_r, stride_c,
                K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr):  # fmt: skip
    """ptr[rows, col0 : col0 + K0 + K1 + K2] as its pieces, zero past row R and column END."""
    t0 = load_rows(ptr, rows, R, col0, K0, END, stride_r, stride_c)
    t1 = t0
    t2 = t0
    if K1 > 0:
        t1 = load_rows(ptr, rows, R, col0 + K0, K1, END, stride_r, stride_c)
    if K2 > 0:
        t2 = load_rows(ptr, rows, R, col0 + K0 + K1, K2, END, stride_r, stride_c)
    return t0, t1, t2


@triton.jit
def store_pieces(ptr, t0, t1, t2, rows, R, col0, END, stride_r, stride_c,
                 K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr):  # fmt: skip
    """ptr[rows, col0 : col0 + K0 + K1 + K2] = the pieces t0, t1, t2, where rows < R and
    columns < END."""
    store_rows(ptr, t0, rows, R, col0, K0, END, stride_r, stride_c)
    if K1 > 0:
        store_rows(ptr, t1, rows, R, col0 + K0, K1, END, stride_r, stride_c)
    if K2 > 0:
        store_rows(ptr, t2, rows, R, col0 + K0 + K1, K2, END, stride_r, stride_c)


@triton.jit
def zeros_pieces(ROWS: tl.constexpr, K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr):
    """fp32 accumulators for the pieces of ROWS rows."""
    a0 = tl.zeros((ROWS, K0), dtype=tl.float32)
    a1 = a0
    a2 = a0
    if K1 > 0:
        a1 = tl.zeros((ROWS, K1), dtype=tl.float32)
    if K2 > 0:
        a2 = tl.zeros((ROWS, K2), dtype=tl.float32)
    return a0, a1, a2


@triton.jit
def dot_pieces(a, b0, b1, b2, acc0, acc1, acc2,
               K1: tl.constexpr, K2: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    """acc_i += a · b_i for each piece i (a: rows x streamed rows, b_i: streamed rows x K_i)."""
    acc0 = tl.dot(a, b0, acc0, input_precision=PRECISION)
    if K1 > 0:
        acc1 = tl.dot(a, b1, acc1, input_precision=PRECISION)
    if K2 > 0:
        acc2 = tl.dot(a, b2, acc2, input_precision=PRECISION)
    return acc0, acc1, acc2


@triton.jit
def dot_t(a0, a1, a2, b0, b1, b2, K1: tl.constexpr, K2: tl.constexpr, PRECISION: tl.constexpr):
    """Σ_i a_i b_iᵀ in fp32 over the pieces of L (a_i, b_i: rows x piece i)."""
    acc = tl.dot(a0, tl.trans(b0), input_precision=PRECISION)
    if K1 > 0:
        acc = tl.dot(a1, tl.trans(b1), acc, input_precision=PRECISION)
    if K2 > 0:
        acc = tl.dot(a2, tl.trans(b2), acc, input_precision=PRECISION)
    return acc


@triton.jit
def descriptors(ptr, R, END, stride_r, ROWS: tl.constexpr,
                K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr):  # fmt: skip
    """On-device TMA descriptors of ptr[:R, :END] (contiguous rows `stride_r` apart, base and rows
    16-byte aligned) for (ROWS x K_i) blocks, one per piece. A block reaching past row R reads
    zeros there, as `load_rows`' mask does."""
    d0 = tl.make_tensor_descriptor(ptr, [R, END], [stride_r, 1], [ROWS, K0])
    d1 = d0
    d2 = d0
    if K1 > 0:
        d1 = tl.make_tensor_descriptor(ptr, [R, END], [stride_r, 1], [ROWS, K1])
    if K2 > 0:
        d2 = tl.make_tensor_descriptor(ptr, [R, END], [stride_r, 1], [ROWS, K2])
    return d0, d1, d2


@triton.jit
def load_streamed(ptr, d0, d1, d2, row0, rows, R, col0, END, stride_r, stride_c,
                  K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
                  USE_TMA: tl.constexpr):  # fmt: skip
    """ptr[rows, col0 : col0 + K0 + K1 + K2] (rows = row0 + arange) as its pieces, zero past row
    R and column END: through the `descriptors` d_i if USE_TMA, else masked pointer loads."""
    if USE_TMA:
        t0 = d0.load([row0, col0])
        t1 = t0
        t2 = t0
        if K1 > 0:
            t1 = d1.load([row0, col0 + K0])
        if K2 > 0:
            t2 = d2.load([row0, col0 + K0 + K1])
    else:
        t0, t1, t2 = load_pieces(ptr, rows, R, col0, END, stride_r, stride_c, K0, K1, K2)
    return t0, t1, t2


# ----------------------------------------------------------------------------------------------
# Softmax statistics


@triton.jit
def probs(s, m, log_sum, valid):
    """Softmax probabilities exp((s − max) − log Σ) of scaled logits from their rows' kept
    (max, log Σ) pair, broadcast to s; 0 where not `valid` (a padding row or column would give
    exp(0 − lse) = inf when lse ≪ 0)."""
    return tl.exp(tl.where(valid, (s - m) - log_sum, float("-inf")))


@triton.jit
def row_stats(STATS, offs, C):
    """(max, log Σ) of rows `offs` of one batch element's (2, C) row statistics. The log-sum-exp
    is kept as that pair: with |logits| ~ 1e4 a single fp32 max + log Σ would round log Σ to
    ~1e-3 and leave the recomputed p unnormalised by as much."""
    return (
        tl.load(STATS + offs, mask=offs < C, other=0.0),
        tl.load(STATS + C + offs, mask=offs < C, other=0.0),
    )


@triton.jit
def backward_stats(BST, offs, C):
    """(max, log Σ, δ) of rows `offs` of one batch element's (3, C) backward statistics."""
    mask = offs < C
    m = tl.load(BST + offs, mask=mask, other=0.0)
    lo = tl.load(BST + C + offs, mask=mask, other=0.0)
    delta = tl.load(BST + 2 * C + offs, mask=mask, other=0.0)
    return m, lo, delta


@triton.jit
def store_backward_stats(BST, offs, C, m, lo, num, r):
    """BST (3, C) = [max, log Σ + log r, δ / r] of rows `offs`, from the forward's (max, log Σ),
    the recomputed row sums r = Σ_j p_ij and num = Σ_j p_ij dp_ij. Dividing by r renormalises:
    the gradient is exactly that of the softmax the backward recomputes."""
    tl.store(BST + offs, m, mask=offs < C)
    tl.store(BST + C + offs, lo + tl.log(r), mask=offs < C)
    tl.store(BST + 2 * C + offs, num / r, mask=offs < C)


@triton.jit
def partial_stats(s, axis: tl.constexpr):
    """(max, Σ exp(s − max)) of the -inf-masked tile s along `axis`; rows with no valid entry
    (padding) give (0, 0) rather than NaN and are never stored."""
    m = tl.max(s, axis)
    m = tl.where(m == float("-inf"), 0.0, m)
    return m, tl.sum(tl.exp(s - tl.expand_dims(m, axis)), axis)


@triton.jit
def store_partial(PART, rows, C, NB, block, value, neutral, COVER: tl.constexpr):
    """PART[rows, block·COVER : (block + 1)·COVER] = [value, neutral, ...] (PART: C x NB).

    A buffer of per-block partial results has one slot per narrowest column block; a program
    covering COVER of them writes its value in the first and `neutral` (−inf for a max, 0 for a
    sum) in the others. So every launch writes every slot whatever block width the autotuner
    picked, and the reduction over the slots never reads a stale one."""
    slots = block * COVER + tl.arange(0, COVER)
    first = tl.arange(0, COVER)[None, :] == 0
    tl.store(
        PART + rows[:, None] * NB + slots[None, :],
        tl.where(first, value[:, None], neutral),
        mask=(rows[:, None] < C) & (slots[None, :] < NB),
    )


@triton.jit
def sign(w):
    """sign(w) with sign(0) = 0: PyTorch's d|u|/du."""
    return tl.where(w > 0, 1.0, tl.where(w < 0, -1.0, 0.0))
