"""The "triton_flash" implementation: channel attention in the FlashAttention-2 shape, in Triton.

softmax(scale · q kᵀ) v with q, k: (B, C, L), v: (B, C, Lv), the softmax over the C channels
(flash attention's sequence) and L its head dim; and the contrastive |P_A − η P_B| X_A (CIN eq. 5).
A program keeps its BLOCK_M rows of q for the whole sweep and streams BLOCK_N-row tiles of k and v
through a software-pipelined loop (`tl.range(num_stages=...)`), as in Triton's tutorial
06-fused-attention. This needs the whole row of q in one program, so L ≤ 256
(`tuning.FLASH_MAX_LENGTH`); rows are held as up to three power-of-two pieces (`pieces`:
L = 196 is 128 + 64 + 16). A value wider than 256 (PCA-Net's v = [F1 | F2], Lv = 2L) is split
into equal column tiles, one per program along the grid's second axis.

Tiles, warps and pipeline depth are autotuned per shape on the user's GPU at first call
(`tuning.flash_autotune`). fp32 inputs are refused on GPUs (`tuning.flash_refusal`: every backward
config spilled registers), and the dispatcher never offers them (`refusal`). The forward kernels'
configs come twice, streaming k / v through masked pointer loads (cp.async) or through on-device
TMA descriptors (`USE_TMA`, kept only on sm_90+ with Triton ≥ 3.5); their launches set Triton's
allocator for the descriptors' scratch for that launch only (`tuning.launch`).

Numerics: fp32 logits scaled (sign included) before any running max, fp32 softmax statistics kept
as the pair (max, log Σ), and the backward's δ_i = Σ_j p_ij dp_ij recomputed rather than taken
from the stored output (with |x| ≈ 30 and a peaked softmax, dp − δ cancels to a tiny difference of
~1e2-sized numbers, which the rounding of a bf16 output would swamp).

Self attention (q = k = v = X) has a tied backward: the program owning rows n of dX keeps X_n,
dO_n and one fp32 accumulator, and gets the q, k and v sides of the gradient from one recomputed
(symmetric) logit tile per step:
    dX_n = Σ_m scale (dS_nm + dS_mn) x_m + P_mn do_m,   dS = P ∘ (dP − δ),  dP = dO Xᵀ,
five tile products per (n, m) block, no atomics and no second dQ pass. The cross-attention
backward (v in ≤ 256-wide column tiles t) takes four sweeps of the same shape: δ, dQ_i (q_i
resident), dK_j (k_j resident) and dV_j[t] (k_j resident, one program per tile). dP = Σ_t dO[t]
V[t]ᵀ sums over the tiles, and so does dS = P ∘ (dP − δ) when the first tile alone subtracts δ:
dQ and dK keep one accumulator over all tiles, with no partial buffers.

The contrastive op (formulas: `tiled`) handles both softmaxes in the same pass:
  1. `_contrastive_stats_kernel`: the row (max, log Σ) of P_A and of P_B in one sweep;
  2. `_contrastive_fwd_kernel`: |P_A − η P_B| X_A from the recomputed, normalised P_A and P_B;
  3. `_contrastive_rowsum_kernel`: δ_i = Σ_k P_A,ik G_ik D_ik and ε_i = Σ_k P_B,ik G_ik D_ik;
  4. `_contrastive_bwd_kernel`, launched twice: rows n of dX_A, then of dX_B, from the
     symmetric logits, both orientations of the softmax from one tile per matrix. Two passes
     because two (rows x L) fp32 accumulators in one program spilled registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..call import FLOATS, HALF, Call, Limits
from . import tuning
from .language import (
    backward_stats,
    descriptors,
    dot_pieces,
    dot_t,
    load_pieces,
    load_streamed,
    probs,
    row_stats,
    sign,
    store_backward_stats,
    store_pieces,
    store_rows,
    zeros_pieces,
)
from .library import (
    aligned,
    custom_op_pair,
    devices,
    gradient_buffers,
    interpreting,
    launcher,
    one_dtype,
    tf32,
)
from .tuning import flash_autotune, launch, precision

MAX_PIECES = 3
# fp32 only under the interpreter: on a GPU every backward config spilled (tuning.FP32_REFUSED)
LIMITS = Limits(devices(), FLOATS if interpreting() else HALF, max_length=tuning.FLASH_MAX_LENGTH)


def pieces(width: int) -> tuple[int, int, int]:
    """Power-of-two widths (each ≥ 16, then zeros) whose sum is the smallest multiple of 16 ≥
    `width` that needs at most three of them: 196 -> (128, 64, 16), 49 -> (64, 0, 0)."""
    total = max(16, triton.cdiv(width, 16) * 16)
    while (total // 16).bit_count() > MAX_PIECES:
        total += 16
    parts = [16 << i for i in reversed(range((total // 16).bit_length())) if (total // 16) >> i & 1]
    return (*parts, 0, 0)[:MAX_PIECES]


def _value_tiles(lv: int) -> tuple[int, int]:
    """(number, width) of the ≤ 256-wide column tiles a value of width lv is cut into."""
    n_tiles = triton.cdiv(lv, tuning.FLASH_MAX_LENGTH)
    return n_tiles, triton.cdiv(lv, n_tiles)


# The kernel kinds (`tuning.FLASH_SPACES`) each op runs: forward, then backward.
_KINDS = {
    "self": (("fwd",), ("delta", "bwd")),
    "cross": (("fwd",), ("delta", "bwd", "fwd")),
    "contrastive": (("cstats", "cfwd"), ("cstats", "cbwd")),
}


def refusal(call: Call) -> str | None:
    """Why these kernels cannot run `call` (None: they can): CUDA (or the interpreter), fp16 or
    bf16 (fp32 under the interpreter only), L ≤ 256, and every kernel the call runs has a config
    that fits the GPU's shared memory: the facts the kernels' prunes check at launch."""
    reason = tuning.fp32_refusal(call.dtype) or LIMITS.refusal(call)
    if reason or call.op not in _KINDS:
        return reason
    forward, backward = _KINDS[call.op]
    lk = sum(pieces(call.length))
    lv = sum(pieces(_value_tiles(call.value_length)[1])) if call.op == "cross" else 0
    device = torch.device(call.device)
    for kind in forward + (backward if call.grad else ()):
        reason = tuning.flash_refusal(kind, call.dtype, device, lk, lv)
        if reason:
            return reason
    return None


def _check_length(length: int) -> None:
    if length > tuning.FLASH_MAX_LENGTH:
        raise ValueError(
            f"fgattn's flash-shaped Triton kernels keep a whole row of q (L = H·W) in one program "
            f"and take L <= {tuning.FLASH_MAX_LENGTH}, got L = {length}; use "
            f"backend='triton_tiled' (or 'auto') there"
        )


# ----------------------------------------------------------------------------------------------
# Kernels: channel attention


@flash_autotune("fwd", ["C", "L", "LV", "IS_SELF"], tma=True)
@triton.jit
def _fwd_kernel(
    Q, K, V, Out, STATS,
    C, L, LV, TV, scale,
    sqb, sqc, sql, skb, skc, skl, svb, svc, svl, sob, soc, sol,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
    V0: tl.constexpr, V1: tl.constexpr, V2: tl.constexpr,
    IS_SELF: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr, USE_TMA: tl.constexpr,
):  # fmt: skip
    # grid: (row blocks of q, column tiles of out (width TV), batch). q and k come zero-padded to
    # L = K0 + K1 + K2 columns and each column tile of v to V0 + V1 + V2 (`aligned`): rows start
    # 16-byte aligned, which the pipelined (cp.async / TMA) loads need. IS_SELF: k = v = q, one
    # tile load serves the logits and the product. USE_TMA: k and v tiles are streamed through
    # on-device TMA descriptors of this batch's rows (one per piece), else masked pointer loads.
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    Q += b * sqb
    K += b * skb
    V += b * svb
    Out += b * sob
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d0 = pid_d * TV  # this tile's first column of out; of the padded v: pid_d · (V0 + V1 + V2)
    d_end = tl.minimum(d0 + TV, LV)
    dv0 = pid_d * (V0 + V1 + V2)
    dv_end = dv0 + V0 + V1 + V2

    # q resident for the whole sweep, as up to three power-of-two pieces of L
    q0, q1, q2 = load_pieces(Q, offs_m, C, 0, L, sqc, sql, K0, K1, K2)
    kd0, kd1, kd2 = K, K, K  # descriptors of k and v (only where USE_TMA)
    vd0, vd1, vd2 = V, V, V
    if USE_TMA:
        kd0, kd1, kd2 = descriptors(K, C, L, skc, BLOCK_N, K0, K1, K2)
        if not IS_SELF:
            vd0, vd1, vd2 = descriptors(V, C, dv_end, svc, BLOCK_N, V0, V1, V2)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc0, acc1, acc2 = zeros_pieces(BLOCK_M, V0, V1, V2)

    for n0 in tl.range(0, C, BLOCK_N, num_stages=STAGES):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        # -- logits s = scale · q kᵀ in fp32, the sign applied before the running max
        k0, k1, k2 = load_streamed(K, kd0, kd1, kd2, n0, offs_n, C, 0, L, skc, skl,
                               K0, K1, K2, USE_TMA)  # fmt: skip
        s = dot_t(q0, q1, q2, k0, k1, k2, K1, K2, PRECISION)
        s = tl.where(offs_n[None, :] < C, s * scale, float("-inf"))
        # -- online softmax
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
        # -- acc = alpha · acc + p v, piece by piece of the value tile
        if IS_SELF:
            v0, v1, v2 = k0, k1, k2
        else:
            v0, v1, v2 = load_streamed(V, vd0, vd1, vd2, n0, offs_n, C, dv0, dv_end, svc, svl,
                                   V0, V1, V2, USE_TMA)  # fmt: skip
        p = p.to(v0.dtype)
        acc0 = tl.dot(p, v0, acc0 * alpha[:, None], input_precision=PRECISION)
        if V1 > 0:
            acc1 = tl.dot(p, v1, acc1 * alpha[:, None], input_precision=PRECISION)
        if V2 > 0:
            acc2 = tl.dot(p, v2, acc2 * alpha[:, None], input_precision=PRECISION)

    # -- epilogue: normalise, store; the first column tile stores the row statistics
    # (each piece divided just before its store: three divided accumulators at once cost registers)
    store_rows(Out, acc0 / l_i[:, None], offs_m, C, d0, V0, d_end, soc, sol)
    if V1 > 0:
        store_rows(Out, acc1 / l_i[:, None], offs_m, C, d0 + V0, V1, d_end, soc, sol)
    if V2 > 0:
        store_rows(Out, acc2 / l_i[:, None], offs_m, C, d0 + V0 + V1, V2, d_end, soc, sol)
    if pid_d == 0:
        tl.store(STATS + b * 2 * C + offs_m, m_i, mask=offs_m < C)
        tl.store(STATS + b * 2 * C + C + offs_m, tl.log(l_i), mask=offs_m < C)


@flash_autotune("delta", ["C", "L"])
@triton.jit
def _bwd_delta_self_kernel(
    X, DO, STATS, BST,
    C, L, scale,
    sxb, sxc, sxl, sdb, sdc, sdl,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    # grid: (row blocks m, batch); x and do padded as in _bwd_self_kernel. Rows m of x and do
    # resident; x_n streamed. Writes BST (B, 3, C)
    # = [max, log Σ + log r, δ / r] with r_i = Σ_j p_ij and δ_i = Σ_j p_ij dp_ij from the
    # recomputed p and dp (see `tiled._bwd_delta_kernel` for why not do · o).
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    X += b * sxb
    DO += b * sdb
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_i, lo = row_stats(STATS + b * 2 * C, offs_m, C)
    x0, x1, x2 = load_pieces(X, offs_m, C, 0, L, sxc, sxl, K0, K1, K2)
    do0, do1, do2 = load_pieces(DO, offs_m, C, 0, L, sdc, sdl, K0, K1, K2)
    num = tl.zeros((BLOCK_M,), dtype=tl.float32)
    r = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in tl.range(0, C, BLOCK_N, num_stages=STAGES):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        xn0, xn1, xn2 = load_pieces(X, offs_n, C, 0, L, sxc, sxl, K0, K1, K2)
        s = dot_t(x0, x1, x2, xn0, xn1, xn2, K1, K2, PRECISION) * scale
        p = probs(s, m_i[:, None], lo[:, None], offs_n[None, :] < C)
        dp = dot_t(do0, do1, do2, xn0, xn1, xn2, K1, K2, PRECISION)
        num += tl.sum(p * dp, 1)
        r += tl.sum(p, 1)
    store_backward_stats(BST + b * 3 * C, offs_m, C, m_i, lo, num, r)


@flash_autotune("bwd", ["C", "L"])
@triton.jit
def _bwd_self_kernel(
    X, DO, BST, DX,
    C, L, L_OUT, scale,
    sxb, sxc, sxl, sdb, sdc, sdl, sgb, sgc, sgl,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    # grid: (row blocks n of dX, batch); x and do padded to L = K0 + K1 + K2 columns, dX is
    # (B, C, L_OUT). BLOCK_M rows n resident (x_n, do_n, the dX_n accumulator);
    # BLOCK_N rows m streamed. In the [n, m] layout, with s symmetric:
    #   st = s_mn = s_nm,  pt = p_mn (rows m's stats),  p = p_nm (rows n's stats)
    #   dpt = x_n · do_m = dp_mn,  dp = do_n · x_m = dp_nm
    #   dX_n += scale (pt ∘ (dpt − δ_m) + p ∘ (dp − δ_n)) x_m + pt do_m
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    X += b * sxb
    DO += b * sdb
    DX += b * sgb
    BST += b * 3 * C
    offs_n = pid_n * BLOCK_M + tl.arange(0, BLOCK_M)
    m_n, lo_n, delta_n = backward_stats(BST, offs_n, C)
    x0, x1, x2 = load_pieces(X, offs_n, C, 0, L, sxc, sxl, K0, K1, K2)
    do0, do1, do2 = load_pieces(DO, offs_n, C, 0, L, sdc, sdl, K0, K1, K2)
    acc0, acc1, acc2 = zeros_pieces(BLOCK_M, K0, K1, K2)

    for m0 in tl.range(0, C, BLOCK_N, num_stages=STAGES):
        offs_m = m0 + tl.arange(0, BLOCK_N)
        m_m, lo_m, delta_m = backward_stats(BST, offs_m, C)
        xm0, xm1, xm2 = load_pieces(X, offs_m, C, 0, L, sxc, sxl, K0, K1, K2)
        dom0, dom1, dom2 = load_pieces(DO, offs_m, C, 0, L, sdc, sdl, K0, K1, K2)
        # -- both orientations of the softmax from one (symmetric) logit tile
        st = dot_t(x0, x1, x2, xm0, xm1, xm2, K1, K2, PRECISION) * scale
        valid = (offs_n[:, None] < C) & (offs_m[None, :] < C)  # padding: exp(0 − lse) = inf
        pt = probs(st, m_m[None, :], lo_m[None, :], valid)
        p = probs(st, m_n[:, None], lo_n[:, None], valid)
        # -- dP in both orientations, then scale · (dS_mn + dS_nm)
        dpt = dot_t(x0, x1, x2, dom0, dom1, dom2, K1, K2, PRECISION)
        dp = dot_t(do0, do1, do2, xm0, xm1, xm2, K1, K2, PRECISION)
        ds = ((pt * (dpt - delta_m[None, :]) + p * (dp - delta_n[:, None])) * scale).to(xm0.dtype)
        pt = pt.to(dom0.dtype)
        # -- dX_n += ds x_m + pt do_m, piece by piece
        acc0, acc1, acc2 = dot_pieces(ds, xm0, xm1, xm2, acc0, acc1, acc2, K1, K2, PRECISION)
        acc0, acc1, acc2 = dot_pieces(pt, dom0, dom1, dom2, acc0, acc1, acc2, K1, K2, PRECISION)

    # -- dX in its own (unpadded) width L_OUT
    store_pieces(DX, acc0, acc1, acc2, offs_n, C, 0, L_OUT, sgc, sgl, K0, K1, K2)


@triton.jit
def _tile_pieces(ptr, rows, C, t, stride_r, stride_c,
                 V0: tl.constexpr, V1: tl.constexpr, V2: tl.constexpr):  # fmt: skip
    """Column tile t of ptr (each tile zero-padded to V0 + V1 + V2, `aligned`) as its pieces."""
    return load_pieces(ptr + t * (V0 + V1 + V2) * stride_c, rows, C, 0, V0 + V1 + V2,
                       stride_r, stride_c, V0, V1, V2)  # fmt: skip


@flash_autotune("delta", ["C", "L", "N_TILES", "TV"])
@triton.jit
def _bwd_delta_cross_kernel(
    Q, K, V, DO, STATS, BST,
    C, L, N_TILES, TV, scale,
    sqb, sqc, sql, skb, skc, skl, svb, svc, svl, sdb, sdc, sdl,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
    V0: tl.constexpr, V1: tl.constexpr, V2: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    # grid: (row blocks i, batch); q, k padded to K0 + K1 + K2 columns, v and do to N_TILES
    # column tiles of V0 + V1 + V2. Writes BST (B, 3, C) = [max, log Σ + log r, δ / r] as
    # _bwd_delta_self_kernel does, dp_ij = do_i · v_j summed over the column tiles of v.
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    Q += b * sqb
    K += b * skb
    V += b * svb
    DO += b * sdb
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_i, lo = row_stats(STATS + b * 2 * C, offs_m, C)
    q0, q1, q2 = load_pieces(Q, offs_m, C, 0, L, sqc, sql, K0, K1, K2)
    num = tl.zeros((BLOCK_M,), dtype=tl.float32)
    r = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for t in range(N_TILES):
        do0, do1, do2 = _tile_pieces(DO, offs_m, C, t, sdc, sdl, V0, V1, V2)
        for n0 in tl.range(0, C, BLOCK_N, num_stages=STAGES):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            k0, k1, k2 = load_pieces(K, offs_n, C, 0, L, skc, skl, K0, K1, K2)
            v0, v1, v2 = _tile_pieces(V, offs_n, C, t, svc, svl, V0, V1, V2)
            s = dot_t(q0, q1, q2, k0, k1, k2, K1, K2, PRECISION) * scale
            p = probs(s, m_i[:, None], lo[:, None], offs_n[None, :] < C)
            dp = dot_t(do0, do1, do2, v0, v1, v2, V1, V2, PRECISION)
            num += tl.sum(p * dp, 1)
            r += tl.where(t == 0, tl.sum(p, 1), 0.0)  # Σ_j p_ij once, not once per tile
    store_backward_stats(BST + b * 3 * C, offs_m, C, m_i, lo, num, r)


@flash_autotune("bwd", ["C", "L", "N_TILES", "TV"])
@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, BST, DQ,
    C, L, L_OUT, N_TILES, TV, scale,
    sqb, sqc, sql, skb, skc, skl, svb, svc, svl, sdb, sdc, sdl, sgb, sgc, sgl,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
    V0: tl.constexpr, V1: tl.constexpr, V2: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    # grid: (row blocks i, batch). dQ_i = scale Σ_j ds_ij k_j with ds = p ∘ (dp − δ), and since
    # dp = Σ_t dp^t over the column tiles t of v, each tile adds p ∘ dp^t and the first also −p δ:
    # one accumulator over all tiles, no partial buffers. q_i and do_i (tile t) resident.
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    Q += b * sqb
    K += b * skb
    V += b * svb
    DO += b * sdb
    DQ += b * sgb
    BST += b * 3 * C
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_i, lo, delta = backward_stats(BST, offs_m, C)
    q0, q1, q2 = load_pieces(Q, offs_m, C, 0, L, sqc, sql, K0, K1, K2)
    acc0, acc1, acc2 = zeros_pieces(BLOCK_M, K0, K1, K2)
    for t in range(N_TILES):
        do0, do1, do2 = _tile_pieces(DO, offs_m, C, t, sdc, sdl, V0, V1, V2)
        delta_t = tl.where(t == 0, delta, 0.0)
        for n0 in tl.range(0, C, BLOCK_N, num_stages=STAGES):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            k0, k1, k2 = load_pieces(K, offs_n, C, 0, L, skc, skl, K0, K1, K2)
            v0, v1, v2 = _tile_pieces(V, offs_n, C, t, svc, svl, V0, V1, V2)
            # -- recompute p, then this tile's share of scale · ds
            s = dot_t(q0, q1, q2, k0, k1, k2, K1, K2, PRECISION) * scale
            valid = (offs_m[:, None] < C) & (offs_n[None, :] < C)
            p = probs(s, m_i[:, None], lo[:, None], valid)
            dp = dot_t(do0, do1, do2, v0, v1, v2, V1, V2, PRECISION)
            ds = (p * (dp - delta_t[:, None]) * scale).to(k0.dtype)
            # -- dQ_i += ds k_j, piece by piece
            acc0, acc1, acc2 = dot_pieces(ds, k0, k1, k2, acc0, acc1, acc2, K1, K2, PRECISION)
    store_pieces(DQ, acc0, acc1, acc2, offs_m, C, 0, L_OUT, sgc, sgl, K0, K1, K2)


@flash_autotune("bwd", ["C", "L", "N_TILES", "TV"])
@triton.jit
def _bwd_dk_kernel(
    Q, K, V, DO, BST, DK,
    C, L, L_OUT, N_TILES, TV, scale,
    sqb, sqc, sql, skb, skc, skl, svb, svc, svl, sdb, sdc, sdl, sgb, sgc, sgl,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
    V0: tl.constexpr, V1: tl.constexpr, V2: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    # grid: (row blocks j of k, batch). In the [j, i] layout (rows i of q streamed), with
    # st = s_ij, pt = p_ij (rows i's stats) and dpt = v_j · do_i over column tile t:
    #   dK_j = scale Σ_i pt ∘ (dpt − δ_i) q_i, δ subtracted in the first tile only (see _bwd_dq).
    # k_j, v_j (tile t) and the dK_j accumulator resident. dV has its own kernel: the two
    # accumulators together spilled (0.6-1.5 KB of stack on sm_90 bf16).
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    Q += b * sqb
    K += b * skb
    V += b * svb
    DO += b * sdb
    DK += b * sgb
    BST += b * 3 * C
    offs_n = pid_n * BLOCK_M + tl.arange(0, BLOCK_M)
    k0, k1, k2 = load_pieces(K, offs_n, C, 0, L, skc, skl, K0, K1, K2)
    acc0, acc1, acc2 = zeros_pieces(BLOCK_M, K0, K1, K2)
    for t in range(N_TILES):
        v0, v1, v2 = _tile_pieces(V, offs_n, C, t, svc, svl, V0, V1, V2)
        for m0 in tl.range(0, C, BLOCK_N, num_stages=STAGES):
            offs_m = m0 + tl.arange(0, BLOCK_N)
            m_i, lo = row_stats(BST, offs_m, C)
            delta = tl.load(BST + 2 * C + offs_m, mask=(offs_m < C) & (t == 0), other=0.0)
            q0, q1, q2 = load_pieces(Q, offs_m, C, 0, L, sqc, sql, K0, K1, K2)
            do0, do1, do2 = _tile_pieces(DO, offs_m, C, t, sdc, sdl, V0, V1, V2)
            # -- pᵀ and dpᵀ, then scale · dsᵀ
            st = dot_t(k0, k1, k2, q0, q1, q2, K1, K2, PRECISION) * scale
            valid = (offs_n[:, None] < C) & (offs_m[None, :] < C)
            pt = probs(st, m_i[None, :], lo[None, :], valid)
            dpt = dot_t(v0, v1, v2, do0, do1, do2, V1, V2, PRECISION)
            dst = (pt * (dpt - delta[None, :]) * scale).to(q0.dtype)
            # -- dK_j += dsᵀ q_i
            acc0, acc1, acc2 = dot_pieces(dst, q0, q1, q2, acc0, acc1, acc2, K1, K2, PRECISION)
    store_pieces(DK, acc0, acc1, acc2, offs_n, C, 0, L_OUT, sgc, sgl, K0, K1, K2)


@flash_autotune("fwd", ["C", "L", "N_TILES", "TV"])
@triton.jit
def _bwd_dv_kernel(
    Q, K, DO, BST, DV,
    C, L, LV, N_TILES, TV, scale,
    sqb, sqc, sql, skb, skc, skl, sdb, sdc, sdl, sgb, sgc, sgl,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
    V0: tl.constexpr, V1: tl.constexpr, V2: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    # grid: (row blocks j of v, column tiles t of v, batch): dV_j[t] = Σ_i p_ij do_i[t], the
    # forward's shape with pᵀ (rows i's stats) in place of p: k_j resident, q_i and do_i[t]
    # streamed, one (BLOCK_M x tile) accumulator.
    pid_n = tl.program_id(0)
    t = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    Q += b * sqb
    K += b * skb
    DO += b * sdb
    DV += b * sgb
    BST += b * 3 * C
    offs_n = pid_n * BLOCK_M + tl.arange(0, BLOCK_M)
    k0, k1, k2 = load_pieces(K, offs_n, C, 0, L, skc, skl, K0, K1, K2)
    acc0, acc1, acc2 = zeros_pieces(BLOCK_M, V0, V1, V2)
    for m0 in tl.range(0, C, BLOCK_N, num_stages=STAGES):
        offs_m = m0 + tl.arange(0, BLOCK_N)
        m_i, lo = row_stats(BST, offs_m, C)
        q0, q1, q2 = load_pieces(Q, offs_m, C, 0, L, sqc, sql, K0, K1, K2)
        do0, do1, do2 = _tile_pieces(DO, offs_m, C, t, sdc, sdl, V0, V1, V2)
        # -- pᵀ from rows i's statistics, then dV_j[t] += pᵀ do_i[t]
        st = dot_t(k0, k1, k2, q0, q1, q2, K1, K2, PRECISION) * scale
        valid = (offs_n[:, None] < C) & (offs_m[None, :] < C)
        pt = probs(st, m_i[None, :], lo[None, :], valid).to(do0.dtype)
        acc0, acc1, acc2 = dot_pieces(pt, do0, do1, do2, acc0, acc1, acc2, V1, V2, PRECISION)
    # -- tile t is columns t·TV .. (t+1)·TV of dV's own (unpadded) width LV
    d0 = t * TV
    d_end = tl.minimum(d0 + TV, LV)
    store_pieces(DV, acc0, acc1, acc2, offs_n, C, d0, d_end, sgc, sgl, V0, V1, V2)


# ----------------------------------------------------------------------------------------------
# Kernels: contrastive channel attention


@flash_autotune("cstats", ["C", "L"], tma=True)
@triton.jit
def _contrastive_stats_kernel(
    XA, XB, LSEA, LSEB,
    C, L, scale,
    sab, sac, sal, sbb, sbc, sbl,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr,
    USE_TMA: tl.constexpr,
):  # fmt: skip
    # grid: (row blocks m, batch). Rows m of X_A and X_B resident; both row statistics in one sweep.
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    XA += b * sab
    XB += b * sbb
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    a0, a1, a2 = load_pieces(XA, offs_m, C, 0, L, sac, sal, K0, K1, K2)
    b0, b1, b2 = load_pieces(XB, offs_m, C, 0, L, sbc, sbl, K0, K1, K2)
    ad0, ad1, ad2 = XA, XA, XA  # TMA descriptors of the streamed rows (only where USE_TMA)
    bd0, bd1, bd2 = XB, XB, XB
    if USE_TMA:
        ad0, ad1, ad2 = descriptors(XA, C, L, sac, BLOCK_N, K0, K1, K2)
        bd0, bd1, bd2 = descriptors(XB, C, L, sbc, BLOCK_N, K0, K1, K2)
    ma = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    mb = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    la = tl.zeros((BLOCK_M,), dtype=tl.float32)
    lb = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in tl.range(0, C, BLOCK_N, num_stages=STAGES):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        an0, an1, an2 = load_streamed(XA, ad0, ad1, ad2, n0, offs_n, C, 0, L, sac, sal,
                                  K0, K1, K2, USE_TMA)  # fmt: skip
        bn0, bn1, bn2 = load_streamed(XB, bd0, bd1, bd2, n0, offs_n, C, 0, L, sbc, sbl,
                                  K0, K1, K2, USE_TMA)  # fmt: skip
        # -- scaled fp32 logits of both matrices, the sign applied before the running max
        s_a = dot_t(a0, a1, a2, an0, an1, an2, K1, K2, PRECISION) * scale
        s_b = dot_t(b0, b1, b2, bn0, bn1, bn2, K1, K2, PRECISION) * scale
        s_a = tl.where(offs_n[None, :] < C, s_a, float("-inf"))
        s_b = tl.where(offs_n[None, :] < C, s_b, float("-inf"))
        # -- online (max, Σ) of both
        ma_new = tl.maximum(ma, tl.max(s_a, 1))
        mb_new = tl.maximum(mb, tl.max(s_b, 1))
        la = la * tl.exp(ma - ma_new) + tl.sum(tl.exp(s_a - ma_new[:, None]), 1)
        lb = lb * tl.exp(mb - mb_new) + tl.sum(tl.exp(s_b - mb_new[:, None]), 1)
        ma = ma_new
        mb = mb_new
    LSEA += b * 2 * C
    LSEB += b * 2 * C
    tl.store(LSEA + offs_m, ma, mask=offs_m < C)
    tl.store(LSEA + C + offs_m, tl.log(la), mask=offs_m < C)
    tl.store(LSEB + offs_m, mb, mask=offs_m < C)
    tl.store(LSEB + C + offs_m, tl.log(lb), mask=offs_m < C)


@flash_autotune("cfwd", ["C", "L"], tma=True)
@triton.jit
def _contrastive_fwd_kernel(
    XA, XB, ETA, LSEA, LSEB, Out,
    C, L, L_OUT, scale,
    sab, sac, sal, sbb, sbc, sbl, sob, soc, sol,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr,
    USE_TMA: tl.constexpr,
):  # fmt: skip
    # grid: (row blocks m, batch); X_A, X_B padded to L columns, Out (B, C, L_OUT)
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    XA += b * sab
    XB += b * sbb
    Out += b * sob
    eta = tl.load(ETA + b).to(tl.float32)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ma, la = row_stats(LSEA + b * 2 * C, offs_m, C)
    mb, lb = row_stats(LSEB + b * 2 * C, offs_m, C)
    a0, a1, a2 = load_pieces(XA, offs_m, C, 0, L, sac, sal, K0, K1, K2)
    b0, b1, b2 = load_pieces(XB, offs_m, C, 0, L, sbc, sbl, K0, K1, K2)
    ad0, ad1, ad2 = XA, XA, XA  # TMA descriptors of the streamed rows (only where USE_TMA)
    bd0, bd1, bd2 = XB, XB, XB
    if USE_TMA:
        ad0, ad1, ad2 = descriptors(XA, C, L, sac, BLOCK_N, K0, K1, K2)
        bd0, bd1, bd2 = descriptors(XB, C, L, sbc, BLOCK_N, K0, K1, K2)
    acc0, acc1, acc2 = zeros_pieces(BLOCK_M, K0, K1, K2)
    for n0 in tl.range(0, C, BLOCK_N, num_stages=STAGES):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        an0, an1, an2 = load_streamed(XA, ad0, ad1, ad2, n0, offs_n, C, 0, L, sac, sal,
                                  K0, K1, K2, USE_TMA)  # fmt: skip
        bn0, bn1, bn2 = load_streamed(XB, bd0, bd1, bd2, n0, offs_n, C, 0, L, sbc, sbl,
                                  K0, K1, K2, USE_TMA)  # fmt: skip
        # -- normalised P_A, P_B from the kept statistics; W = |P_A − η P_B|
        s_a = dot_t(a0, a1, a2, an0, an1, an2, K1, K2, PRECISION) * scale
        s_b = dot_t(b0, b1, b2, bn0, bn1, bn2, K1, K2, PRECISION) * scale
        valid = offs_n[None, :] < C  # padding columns: exp(0 − max) would overflow
        p_a = probs(s_a, ma[:, None], la[:, None], valid)
        p_b = probs(s_b, mb[:, None], lb[:, None], valid)
        w = tl.abs(p_a - eta * p_b).to(an0.dtype)
        # -- acc += W X_A,n piece by piece
        acc0, acc1, acc2 = dot_pieces(w, an0, an1, an2, acc0, acc1, acc2, K1, K2, PRECISION)
    store_pieces(Out, acc0, acc1, acc2, offs_m, C, 0, L_OUT, soc, sol, K0, K1, K2)


@flash_autotune("cstats", ["C", "L"])
@triton.jit
def _contrastive_rowsum_kernel(
    XA, XB, G, ETA, LSEA, LSEB, DELTA, EPS,
    C, L, scale,
    sab, sac, sal, sbb, sbc, sbl, sgb, sgc, sgl,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    # grid: (row blocks m, batch). Rows m of X_A, X_B and G resident.
    # δ_i = Σ_k P_A,ik G_ik D_ik and ε_i = Σ_k P_B,ik G_ik D_ik, D = G X_Aᵀ, G = sign(W).
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    XA += b * sab
    XB += b * sbb
    G += b * sgb
    eta = tl.load(ETA + b).to(tl.float32)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ma, la = row_stats(LSEA + b * 2 * C, offs_m, C)
    mb, lb = row_stats(LSEB + b * 2 * C, offs_m, C)
    a0, a1, a2 = load_pieces(XA, offs_m, C, 0, L, sac, sal, K0, K1, K2)
    b0, b1, b2 = load_pieces(XB, offs_m, C, 0, L, sbc, sbl, K0, K1, K2)
    g0, g1, g2 = load_pieces(G, offs_m, C, 0, L, sgc, sgl, K0, K1, K2)
    delta = tl.zeros((BLOCK_M,), dtype=tl.float32)
    eps = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in tl.range(0, C, BLOCK_N, num_stages=STAGES):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        an0, an1, an2 = load_pieces(XA, offs_n, C, 0, L, sac, sal, K0, K1, K2)
        bn0, bn1, bn2 = load_pieces(XB, offs_n, C, 0, L, sbc, sbl, K0, K1, K2)
        s_a = dot_t(a0, a1, a2, an0, an1, an2, K1, K2, PRECISION) * scale
        s_b = dot_t(b0, b1, b2, bn0, bn1, bn2, K1, K2, PRECISION) * scale
        d = dot_t(g0, g1, g2, an0, an1, an2, K1, K2, PRECISION)
        valid = offs_n[None, :] < C
        p_a = probs(s_a, ma[:, None], la[:, None], valid)
        p_b = probs(s_b, mb[:, None], lb[:, None], valid)
        gd = sign(p_a - eta * p_b) * d
        delta += tl.sum(p_a * gd, 1)
        eps += tl.sum(p_b * gd, 1)
    tl.store(DELTA + b * C + offs_m, delta, mask=offs_m < C)
    tl.store(EPS + b * C + offs_m, eps, mask=offs_m < C)


@flash_autotune("cbwd", ["C", "L", "SIDE_B"])
@triton.jit
def _contrastive_bwd_kernel(
    XA, XB, G, ETA, LSEA, LSEB, DELTA, EPS, DX,
    C, L, L_OUT, scale,
    sab, sac, sal, sbb, sbc, sbl, sgb, sgc, sgl, sdb, sdc, sdl,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, PRECISION: tl.constexpr,
    SIDE_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    # grid: (row blocks n of DX, batch); launched twice: DX = dA (SIDE_B false), then dB. Rows n
    # of X_A, X_B, G resident with one accumulator; rows m streamed. All tiles [n, m]: "mn" terms
    # use rows m's statistics, "nm" terms rows n's; the logits are symmetric, so one product per
    # matrix gives both.
    #   dA_n += |W_mn| g_m + scale (dS_A,mn + dS_A,nm) a_m,   dB_n += −η scale (...) b_m
    # One accumulator per pass, not two: two (BLOCK_M x L) fp32 tiles spilled on sm_80/sm_90.
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    XA += b * sab
    XB += b * sbb
    G += b * sgb
    DX += b * sdb
    eta = tl.load(ETA + b).to(tl.float32)
    offs_n = pid_n * BLOCK_M + tl.arange(0, BLOCK_M)
    ma_n, la_n = row_stats(LSEA + b * 2 * C, offs_n, C)
    mb_n, lb_n = row_stats(LSEB + b * 2 * C, offs_n, C)
    delta_n = tl.load(DELTA + b * C + offs_n, mask=offs_n < C, other=0.0)
    eps_n = tl.load(EPS + b * C + offs_n, mask=offs_n < C, other=0.0)
    a0, a1, a2 = load_pieces(XA, offs_n, C, 0, L, sac, sal, K0, K1, K2)
    b0, b1, b2 = load_pieces(XB, offs_n, C, 0, L, sbc, sbl, K0, K1, K2)
    g0, g1, g2 = load_pieces(G, offs_n, C, 0, L, sgc, sgl, K0, K1, K2)
    acc0, acc1, acc2 = zeros_pieces(BLOCK_M, K0, K1, K2)

    for m0 in tl.range(0, C, BLOCK_N, num_stages=STAGES):
        offs_m = m0 + tl.arange(0, BLOCK_N)
        ma_m, la_m = row_stats(LSEA + b * 2 * C, offs_m, C)
        mb_m, lb_m = row_stats(LSEB + b * 2 * C, offs_m, C)
        am0, am1, am2 = load_pieces(XA, offs_m, C, 0, L, sac, sal, K0, K1, K2)
        bm0, bm1, bm2 = load_pieces(XB, offs_m, C, 0, L, sbc, sbl, K0, K1, K2)
        gm0, gm1, gm2 = load_pieces(G, offs_m, C, 0, L, sgc, sgl, K0, K1, K2)
        # -- symmetric logits, and D in both orientations
        s_a = dot_t(a0, a1, a2, am0, am1, am2, K1, K2, PRECISION) * scale
        s_b = dot_t(b0, b1, b2, bm0, bm1, bm2, K1, K2, PRECISION) * scale
        d_mn = dot_t(a0, a1, a2, gm0, gm1, gm2, K1, K2, PRECISION)  # g_m · a_n
        d_nm = dot_t(g0, g1, g2, am0, am1, am2, K1, K2, PRECISION)  # g_n · a_m
        valid = (offs_n[:, None] < C) & (offs_m[None, :] < C)  # padding: exp(0 − lse) = inf
        # -- rows m's softmaxes ("mn") and rows n's ("nm")
        pa_mn = probs(s_a, ma_m[None, :], la_m[None, :], valid)
        pb_mn = probs(s_b, mb_m[None, :], lb_m[None, :], valid)
        w_mn = pa_mn - eta * pb_mn
        gd_mn = sign(w_mn) * d_mn
        pa_nm = probs(s_a, ma_n[:, None], la_n[:, None], valid)
        pb_nm = probs(s_b, mb_n[:, None], lb_n[:, None], valid)
        gd_nm = sign(pa_nm - eta * pb_nm) * d_nm
        if SIDE_B:  # -- dB_n += ds_b b_m
            eps_m = tl.load(EPS + b * C + offs_m, mask=offs_m < C, other=0.0)
            ds = pb_mn * (gd_mn - eps_m[None, :]) + pb_nm * (gd_nm - eps_n[:, None])
            ds = (ds * (-eta * scale)).to(bm0.dtype)
            acc0, acc1, acc2 = dot_pieces(ds, bm0, bm1, bm2, acc0, acc1, acc2, K1, K2, PRECISION)
        else:  # -- dA_n += |W|ᵀ-side g_m + ds_a a_m
            delta_m = tl.load(DELTA + b * C + offs_m, mask=offs_m < C, other=0.0)
            ds = pa_mn * (gd_mn - delta_m[None, :]) + pa_nm * (gd_nm - delta_n[:, None])
            ds = (ds * scale).to(am0.dtype)
            abs_w = tl.abs(w_mn).to(gm0.dtype)
            acc0, acc1, acc2 = dot_pieces(abs_w, gm0, gm1, gm2, acc0, acc1, acc2, K1, K2, PRECISION)
            acc0, acc1, acc2 = dot_pieces(ds, am0, am1, am2, acc0, acc1, acc2, K1, K2, PRECISION)

    store_pieces(DX, acc0, acc1, acc2, offs_n, C, 0, L_OUT, sdc, sdl, K0, K1, K2)


# ----------------------------------------------------------------------------------------------
# Launchers (plain functions on real tensors)


@launcher
def _forward(q, k, v, scale: float, tf32: bool, is_self: bool = False):
    bsz, c, length = q.shape
    lv = v.shape[2]
    _check_length(length)
    n_tiles, tv = (1, lv) if is_self else _value_tiles(lv)  # column tiles of v, ≤ 256 wide
    kp = pieces(length)
    vp = kp if is_self else pieces(tv)
    q = aligned(q, 1, length, sum(kp))
    k = q if is_self else aligned(k, 1, length, sum(kp))
    v = q if is_self else aligned(v, n_tiles, tv, sum(vp))
    out = torch.empty((bsz, c, lv), device=v.device, dtype=v.dtype)
    stats = torch.empty((bsz, 2, c), device=q.device, dtype=torch.float32)  # [max, log Σ]

    def grid(meta):
        return (triton.cdiv(c, meta["BLOCK_M"]), n_tiles, bsz)

    launch(
        _fwd_kernel, grid, q, k, v, out, stats, c, sum(kp), lv, tv, scale,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        K0=kp[0], K1=kp[1], K2=kp[2], V0=vp[0], V1=vp[1], V2=vp[2],
        IS_SELF=is_self, PRECISION=precision(q, tf32),
    )  # fmt: skip
    return out, stats


def _rows_grid(c: int, bsz: int):
    return lambda meta: (triton.cdiv(c, meta["BLOCK_M"]), bsz)


@launcher
def _backward_self(do, x, stats, scale: float, tf32: bool, needs: list[bool]):
    bsz, c, length = x.shape
    kp = pieces(length)
    prec = precision(x, tf32)
    dx = torch.empty((bsz, c, length), device=x.device, dtype=x.dtype)
    x, do = aligned(x, 1, length, sum(kp)), aligned(do, 1, length, sum(kp))
    bst = torch.empty((bsz, 3, c), device=x.device, dtype=torch.float32)
    _bwd_delta_self_kernel[_rows_grid(c, bsz)](
        x, do, stats, bst, c, sum(kp), scale, *x.stride(), *do.stride(),
        K0=kp[0], K1=kp[1], K2=kp[2], PRECISION=prec,
    )  # fmt: skip
    _bwd_self_kernel[_rows_grid(c, bsz)](
        x, do, bst, dx, c, sum(kp), length, scale, *x.stride(), *do.stride(), *dx.stride(),
        K0=kp[0], K1=kp[1], K2=kp[2], PRECISION=prec,
    )  # fmt: skip
    return dx


@launcher
def _backward_cross(do, q, k, v, stats, scale: float, tf32: bool, needs: list[bool]):
    bsz, c, length = q.shape
    lv = v.shape[2]
    n_tiles, tv = _value_tiles(lv)  # column tiles of v and do, as in the forward
    kp, vp = pieces(length), pieces(tv)
    prec = precision(q, tf32)
    dq, dk, dv = gradient_buffers((q, k, v), needs)
    q, k = (aligned(x, 1, length, sum(kp)) for x in (q, k))
    v, do = (aligned(x, n_tiles, tv, sum(vp)) for x in (v, do))
    bst = torch.empty((bsz, 3, c), device=q.device, dtype=torch.float32)
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
    shapes = {"K0": kp[0], "K1": kp[1], "K2": kp[2], "V0": vp[0], "V1": vp[1], "V2": vp[2]}
    grid = _rows_grid(c, bsz)
    _bwd_delta_cross_kernel[grid](
        q, k, v, do, stats, bst, c, sum(kp), n_tiles, tv, scale, *strides,
        **shapes, PRECISION=prec,
    )  # fmt: skip
    if needs[0]:
        _bwd_dq_kernel[grid](
            q, k, v, do, bst, dq, c, sum(kp), length, n_tiles, tv, scale, *strides, *dq.stride(),
            **shapes, PRECISION=prec,
        )  # fmt: skip
    if needs[1]:
        _bwd_dk_kernel[grid](
            q, k, v, do, bst, dk, c, sum(kp), length, n_tiles, tv, scale, *strides, *dk.stride(),
            **shapes, PRECISION=prec,
        )  # fmt: skip
    if needs[2]:
        _bwd_dv_kernel[lambda meta: (triton.cdiv(c, meta["BLOCK_M"]), n_tiles, bsz)](
            q, k, do, bst, dv, c, sum(kp), lv, n_tiles, tv, scale,
            *q.stride(), *k.stride(), *do.stride(), *dv.stride(), **shapes, PRECISION=prec,
        )  # fmt: skip
    return dq, dk, dv


@launcher
def _contrastive_forward(x_a, x_b, eta, scale: float, tf32: bool):
    bsz, c, length = x_a.shape
    _check_length(length)
    kp = pieces(length)
    out = torch.empty((bsz, c, length), device=x_a.device, dtype=x_a.dtype)
    a, b = aligned(x_a, 1, length, sum(kp)), aligned(x_b, 1, length, sum(kp))
    eta32 = eta.float().contiguous()
    lse_a = torch.empty((bsz, 2, c), device=x_a.device, dtype=torch.float32)  # [max, log Σ]
    lse_b = torch.empty_like(lse_a)
    pieces_kw = dict(K0=kp[0], K1=kp[1], K2=kp[2], PRECISION=precision(x_a, tf32))
    launch(
        _contrastive_stats_kernel, _rows_grid(c, bsz),
        a, b, lse_a, lse_b, c, sum(kp), scale, *a.stride(), *b.stride(), **pieces_kw,
    )  # fmt: skip
    launch(
        _contrastive_fwd_kernel, _rows_grid(c, bsz),
        a, b, eta32, lse_a, lse_b, out, c, sum(kp), length, scale,
        *a.stride(), *b.stride(), *out.stride(), **pieces_kw,
    )  # fmt: skip
    return out, lse_a, lse_b


@launcher
def _contrastive_backward(g, x_a, x_b, eta, lse_a, lse_b, scale: float, tf32: bool, needs):
    bsz, c, length = x_a.shape
    kp = pieces(length)
    da, db, _ = gradient_buffers((x_a, x_b, eta), needs)
    a, b, gp = (aligned(t, 1, length, sum(kp)) for t in (x_a, x_b, g))
    eta32 = eta.float().contiguous()
    delta = torch.empty((bsz, c), device=x_a.device, dtype=torch.float32)
    eps = torch.empty_like(delta)
    pieces_kw = dict(K0=kp[0], K1=kp[1], K2=kp[2], PRECISION=precision(x_a, tf32))
    _contrastive_rowsum_kernel[_rows_grid(c, bsz)](
        a, b, gp, eta32, lse_a, lse_b, delta, eps, c, sum(kp), scale,
        *a.stride(), *b.stride(), *gp.stride(), **pieces_kw,
    )  # fmt: skip
    for dx, side_b, need in ((da, False, needs[0]), (db, True, needs[1])):  # one pass each
        if need:
            _contrastive_bwd_kernel[_rows_grid(c, bsz)](
                a, b, gp, eta32, lse_a, lse_b, delta, eps, dx, c, sum(kp), length, scale,
                *a.stride(), *b.stride(), *gp.stride(), *dx.stride(), **pieces_kw,
                SIDE_B=side_b,
            )  # fmt: skip
    deta = (-eps.sum(dim=1)).to(eta.dtype)  # dη = −Σ_i ε_i
    return da, db, deta


# ----------------------------------------------------------------------------------------------
# Ops (schema, fake and autograd: `custom_op_pair`) and entry points


def _forward_self(x, scale: float, tf32: bool):
    return _forward(x, x, x, scale, tf32, True)


triton_flash_cross_fwd, triton_flash_cross_bwd = custom_op_pair(
    "triton_flash_cross", ("q", "k", "v"), _forward, _backward_cross, value=2
)
triton_flash_self_fwd, triton_flash_self_bwd = custom_op_pair(
    "triton_flash_self", ("x",), _forward_self, _backward_self
)
triton_flash_contrastive_fwd, triton_flash_contrastive_bwd = custom_op_pair(
    "triton_flash_contrastive",
    ("x_a", "x_b", "eta"),
    _contrastive_forward,
    _contrastive_backward,
    stats=2,
)


def self_attention(x: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scale · x xᵀ) x on (B, C, L), L ≤ 256, with the tied backward."""
    _check_length(x.shape[2])
    return triton_flash_self_fwd(x, scale, tf32())[0]


def cross_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """softmax(scale · q kᵀ) v on (B, C, L) q, k (L ≤ 256) and (B, C, Lv) v; v's dtype."""
    _check_length(q.shape[2])
    return triton_flash_cross_fwd(*one_dtype(q, k, v), scale, tf32())[0].to(v.dtype)


def contrastive_attention(
    x_a: torch.Tensor, x_b: torch.Tensor, eta: torch.Tensor, scale: float
) -> torch.Tensor:
    """|softmax(s X_A X_Aᵀ) − η softmax(s X_B X_Bᵀ)| X_A on (B, C, L), L ≤ 256, eta (B,)."""
    _check_length(x_a.shape[2])
    a, b = one_dtype(x_a, x_b)
    return triton_flash_contrastive_fwd(a, b, eta, scale, tf32())[0].to(x_a.dtype)
