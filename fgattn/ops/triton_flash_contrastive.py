"""Contrastive channel attention |P_A − η P_B| X_A (CIN eq. 5) in the FlashAttention-2 shape.

The same op and backward as `triton_contrastive` (see its docstring for the formulas), with the
kernels of `triton_flash`: a program keeps its rows of X_A and X_B (and of dOut in the backward)
resident over the whole sweep as power-of-two pieces of L ≤ 256, streams the other rows through a
pipelined loop, and both softmaxes are handled in the same pass:
  1. `_lse_kernel`: the row (max, log Σ) of P_A and of P_B in one sweep (2 tile products per step);
  2. `_fwd_kernel`: |P_A − η P_B| X_A from the recomputed, normalised P_A and P_B (3 per step);
  3. `_bwd_rowsum_kernel`: δ_i = Σ_k P_A,ik G_ik D_ik and ε_i = Σ_k P_B,ik G_ik D_ik (3 per step);
  4. `_bwd_kernel`, launched twice: rows n of dX_A, then of dX_B, from the symmetric logits, both
     orientations of the softmax from one tile per matrix (6 and 5 per step), no atomics. Two
     passes because two (rows x L) fp32 accumulators in one program spilled registers.
The |·| between the softmax and the product rules out the online-softmax rescaling, hence the
separate statistics pass. Row statistics (B, 2, C) as in `triton_contrastive`. Kernels 1 and 2
stream rows through masked pointer loads or TMA descriptors, as the autotuner picks (`USE_TMA`,
see `triton_flash`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_common import check_device, device_guard, fused_op, one_dtype, precision, probs
from .triton_contrastive import _sign
from .triton_flash import (
    _aligned,
    _check_length,
    _descriptors,
    _dot_t,
    _pieces,
    _store_rows,
    _streamed,
    autotune,
    launch,
    pieces,
)

# (BLOCK_M resident rows, BLOCK_N streamed rows, num_warps, num_stages); see triton_flash. SPACE:
# the statistics and row sums, whose products feed no other product; (64, 16, ...) keeps 64-row
# tiles on sm_80 at L = 256 (its 32-row ones spilled 16-48 B).
SPACE = [(64, 64, 8, 2), (64, 32, 8, 2), (64, 32, 8, 3), (128, 32, 8, 2), (64, 32, 4, 2),
         (64, 16, 8, 2), (32, 32, 4, 1), (32, 16, 4, 1)]  # fmt: skip
# The forward: 16 rows a warp, as triton_flash.FWD_SPACE; on sm_80 4-warp steps of 32 rows spilled
# 8 B, 1-stage ones 16 B. The backward: as triton_flash.BWD_SPACE (16-row steps, `_suits`).
FWD_SPACE = [(128, 32, 8, 2), (128, 16, 8, 2), (128, 16, 8, 3), (64, 16, 4, 2), (64, 16, 4, 3)]
BWD_SPACE = [(128, 16, 8, 2), (128, 16, 8, 3), (64, 16, 4, 2), (64, 16, 4, 3), (32, 16, 2, 2)]


@triton.jit
def _stats(S, b, offs, C):
    """(max, log Σ) of rows `offs` of one batch's (2, C) row statistics."""
    S += b * 2 * C
    return (
        tl.load(S + offs, mask=offs < C, other=0.0),
        tl.load(S + C + offs, mask=offs < C, other=0.0),
    )


@autotune(SPACE, ["C", "L"], "cstats", tma=True)
@triton.jit
def _lse_kernel(
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
    a0, a1, a2 = _pieces(XA, offs_m, C, L, sac, sal, K0, K1, K2)
    b0, b1, b2 = _pieces(XB, offs_m, C, L, sbc, sbl, K0, K1, K2)
    ad0, ad1, ad2 = XA, XA, XA  # TMA descriptors of the streamed rows (only where USE_TMA)
    bd0, bd1, bd2 = XB, XB, XB
    if USE_TMA:
        ad0, ad1, ad2 = _descriptors(XA, C, L, sac, BLOCK_N, K0, K1, K2)
        bd0, bd1, bd2 = _descriptors(XB, C, L, sbc, BLOCK_N, K0, K1, K2)
    ma = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    mb = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    la = tl.zeros((BLOCK_M,), dtype=tl.float32)
    lb = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in tl.range(0, C, BLOCK_N, num_stages=STAGES):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        an0, an1, an2 = _streamed(XA, ad0, ad1, ad2, n0, offs_n, C, 0, L, sac, sal,
                                  K0, K1, K2, USE_TMA)  # fmt: skip
        bn0, bn1, bn2 = _streamed(XB, bd0, bd1, bd2, n0, offs_n, C, 0, L, sbc, sbl,
                                  K0, K1, K2, USE_TMA)  # fmt: skip
        # -- scaled fp32 logits of both matrices, the sign applied before the running max
        s_a = _dot_t(a0, a1, a2, an0, an1, an2, K1, K2, PRECISION) * scale
        s_b = _dot_t(b0, b1, b2, bn0, bn1, bn2, K1, K2, PRECISION) * scale
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


@autotune(FWD_SPACE, ["C", "L"], "cfwd", tma=True)
@triton.jit
def _fwd_kernel(
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
    ma, la = _stats(LSEA, b, offs_m, C)
    mb, lb = _stats(LSEB, b, offs_m, C)
    a0, a1, a2 = _pieces(XA, offs_m, C, L, sac, sal, K0, K1, K2)
    b0, b1, b2 = _pieces(XB, offs_m, C, L, sbc, sbl, K0, K1, K2)
    ad0, ad1, ad2 = XA, XA, XA  # TMA descriptors of the streamed rows (only where USE_TMA)
    bd0, bd1, bd2 = XB, XB, XB
    if USE_TMA:
        ad0, ad1, ad2 = _descriptors(XA, C, L, sac, BLOCK_N, K0, K1, K2)
        bd0, bd1, bd2 = _descriptors(XB, C, L, sbc, BLOCK_N, K0, K1, K2)
    acc0 = tl.zeros((BLOCK_M, K0), dtype=tl.float32)
    if K1 > 0:
        acc1 = tl.zeros((BLOCK_M, K1), dtype=tl.float32)
    if K2 > 0:
        acc2 = tl.zeros((BLOCK_M, K2), dtype=tl.float32)
    for n0 in tl.range(0, C, BLOCK_N, num_stages=STAGES):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        an0, an1, an2 = _streamed(XA, ad0, ad1, ad2, n0, offs_n, C, 0, L, sac, sal,
                                  K0, K1, K2, USE_TMA)  # fmt: skip
        bn0, bn1, bn2 = _streamed(XB, bd0, bd1, bd2, n0, offs_n, C, 0, L, sbc, sbl,
                                  K0, K1, K2, USE_TMA)  # fmt: skip
        # -- normalised P_A, P_B from the kept statistics; W = |P_A − η P_B|
        s_a = _dot_t(a0, a1, a2, an0, an1, an2, K1, K2, PRECISION) * scale
        s_b = _dot_t(b0, b1, b2, bn0, bn1, bn2, K1, K2, PRECISION) * scale
        valid = offs_n[None, :] < C  # padding columns: exp(0 − max) would overflow
        p_a = probs(s_a, ma[:, None], la[:, None], valid)
        p_b = probs(s_b, mb[:, None], lb[:, None], valid)
        w = tl.abs(p_a - eta * p_b).to(an0.dtype)
        # -- acc += W X_A,n piece by piece
        acc0 = tl.dot(w, an0, acc0, input_precision=PRECISION)
        if K1 > 0:
            acc1 = tl.dot(w, an1, acc1, input_precision=PRECISION)
        if K2 > 0:
            acc2 = tl.dot(w, an2, acc2, input_precision=PRECISION)
    _store_rows(Out, acc0, offs_m, C, 0, K0, L_OUT, soc, sol)
    if K1 > 0:
        _store_rows(Out, acc1, offs_m, C, K0, K1, L_OUT, soc, sol)
    if K2 > 0:
        _store_rows(Out, acc2, offs_m, C, K0 + K1, K2, L_OUT, soc, sol)


@autotune(SPACE, ["C", "L"], "cstats")
@triton.jit
def _bwd_rowsum_kernel(
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
    ma, la = _stats(LSEA, b, offs_m, C)
    mb, lb = _stats(LSEB, b, offs_m, C)
    a0, a1, a2 = _pieces(XA, offs_m, C, L, sac, sal, K0, K1, K2)
    b0, b1, b2 = _pieces(XB, offs_m, C, L, sbc, sbl, K0, K1, K2)
    g0, g1, g2 = _pieces(G, offs_m, C, L, sgc, sgl, K0, K1, K2)
    delta = tl.zeros((BLOCK_M,), dtype=tl.float32)
    eps = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in tl.range(0, C, BLOCK_N, num_stages=STAGES):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        an0, an1, an2 = _pieces(XA, offs_n, C, L, sac, sal, K0, K1, K2)
        bn0, bn1, bn2 = _pieces(XB, offs_n, C, L, sbc, sbl, K0, K1, K2)
        s_a = _dot_t(a0, a1, a2, an0, an1, an2, K1, K2, PRECISION) * scale
        s_b = _dot_t(b0, b1, b2, bn0, bn1, bn2, K1, K2, PRECISION) * scale
        d = _dot_t(g0, g1, g2, an0, an1, an2, K1, K2, PRECISION)
        valid = offs_n[None, :] < C
        p_a = probs(s_a, ma[:, None], la[:, None], valid)
        p_b = probs(s_b, mb[:, None], lb[:, None], valid)
        gd = _sign(p_a - eta * p_b) * d
        delta += tl.sum(p_a * gd, 1)
        eps += tl.sum(p_b * gd, 1)
    tl.store(DELTA + b * C + offs_m, delta, mask=offs_m < C)
    tl.store(EPS + b * C + offs_m, eps, mask=offs_m < C)


@autotune(BWD_SPACE, ["C", "L", "SIDE_B"], "cbwd")
@triton.jit
def _bwd_kernel(
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
    ma_n, la_n = _stats(LSEA, b, offs_n, C)
    mb_n, lb_n = _stats(LSEB, b, offs_n, C)
    delta_n = tl.load(DELTA + b * C + offs_n, mask=offs_n < C, other=0.0)
    eps_n = tl.load(EPS + b * C + offs_n, mask=offs_n < C, other=0.0)
    a0, a1, a2 = _pieces(XA, offs_n, C, L, sac, sal, K0, K1, K2)
    b0, b1, b2 = _pieces(XB, offs_n, C, L, sbc, sbl, K0, K1, K2)
    g0, g1, g2 = _pieces(G, offs_n, C, L, sgc, sgl, K0, K1, K2)
    acc0 = tl.zeros((BLOCK_M, K0), dtype=tl.float32)
    if K1 > 0:
        acc1 = tl.zeros((BLOCK_M, K1), dtype=tl.float32)
    if K2 > 0:
        acc2 = tl.zeros((BLOCK_M, K2), dtype=tl.float32)

    for m0 in tl.range(0, C, BLOCK_N, num_stages=STAGES):
        offs_m = m0 + tl.arange(0, BLOCK_N)
        ma_m, la_m = _stats(LSEA, b, offs_m, C)
        mb_m, lb_m = _stats(LSEB, b, offs_m, C)
        am0, am1, am2 = _pieces(XA, offs_m, C, L, sac, sal, K0, K1, K2)
        bm0, bm1, bm2 = _pieces(XB, offs_m, C, L, sbc, sbl, K0, K1, K2)
        gm0, gm1, gm2 = _pieces(G, offs_m, C, L, sgc, sgl, K0, K1, K2)
        # -- symmetric logits, and D in both orientations
        s_a = _dot_t(a0, a1, a2, am0, am1, am2, K1, K2, PRECISION) * scale
        s_b = _dot_t(b0, b1, b2, bm0, bm1, bm2, K1, K2, PRECISION) * scale
        d_mn = _dot_t(a0, a1, a2, gm0, gm1, gm2, K1, K2, PRECISION)  # g_m · a_n
        d_nm = _dot_t(g0, g1, g2, am0, am1, am2, K1, K2, PRECISION)  # g_n · a_m
        valid = (offs_n[:, None] < C) & (offs_m[None, :] < C)  # padding: exp(0 − lse) = inf
        # -- rows m's softmaxes ("mn") and rows n's ("nm")
        pa_mn = probs(s_a, ma_m[None, :], la_m[None, :], valid)
        pb_mn = probs(s_b, mb_m[None, :], lb_m[None, :], valid)
        w_mn = pa_mn - eta * pb_mn
        gd_mn = _sign(w_mn) * d_mn
        pa_nm = probs(s_a, ma_n[:, None], la_n[:, None], valid)
        pb_nm = probs(s_b, mb_n[:, None], lb_n[:, None], valid)
        gd_nm = _sign(pa_nm - eta * pb_nm) * d_nm
        if SIDE_B:  # -- dB_n += ds_b b_m
            eps_m = tl.load(EPS + b * C + offs_m, mask=offs_m < C, other=0.0)
            ds = pb_mn * (gd_mn - eps_m[None, :]) + pb_nm * (gd_nm - eps_n[:, None])
            ds = (ds * (-eta * scale)).to(bm0.dtype)
            acc0 = tl.dot(ds, bm0, acc0, input_precision=PRECISION)
            if K1 > 0:
                acc1 = tl.dot(ds, bm1, acc1, input_precision=PRECISION)
            if K2 > 0:
                acc2 = tl.dot(ds, bm2, acc2, input_precision=PRECISION)
        else:  # -- dA_n += |W|ᵀ-side g_m + ds_a a_m
            delta_m = tl.load(DELTA + b * C + offs_m, mask=offs_m < C, other=0.0)
            ds = pa_mn * (gd_mn - delta_m[None, :]) + pa_nm * (gd_nm - delta_n[:, None])
            ds = (ds * scale).to(am0.dtype)
            abs_w = tl.abs(w_mn).to(gm0.dtype)
            acc0 = tl.dot(abs_w, gm0, acc0, input_precision=PRECISION)
            acc0 = tl.dot(ds, am0, acc0, input_precision=PRECISION)
            if K1 > 0:
                acc1 = tl.dot(abs_w, gm1, acc1, input_precision=PRECISION)
                acc1 = tl.dot(ds, am1, acc1, input_precision=PRECISION)
            if K2 > 0:
                acc2 = tl.dot(abs_w, gm2, acc2, input_precision=PRECISION)
                acc2 = tl.dot(ds, am2, acc2, input_precision=PRECISION)

    _store_rows(DX, acc0, offs_n, C, 0, K0, L_OUT, sdc, sdl)
    if K1 > 0:
        _store_rows(DX, acc1, offs_n, C, K0, K1, L_OUT, sdc, sdl)
    if K2 > 0:
        _store_rows(DX, acc2, offs_n, C, K0 + K1, K2, L_OUT, sdc, sdl)


# ----------------------------------------------------------------------------------------------
# Launchers


def _grid(c: int, bsz: int):
    return lambda meta: (triton.cdiv(c, meta["BLOCK_M"]), bsz)


def _forward_unguarded(x_a, x_b, eta, scale: float, tf32: bool):
    check_device(x_a, x_b, eta)
    bsz, c, length = x_a.shape
    _check_length(length)
    kp = pieces(length)
    prec = precision(x_a, tf32)
    out = torch.empty((bsz, c, length), device=x_a.device, dtype=x_a.dtype)
    a, b = _aligned(x_a, 1, length, sum(kp)), _aligned(x_b, 1, length, sum(kp))
    eta32 = eta.float().contiguous()
    lse_a = torch.empty((bsz, 2, c), device=x_a.device, dtype=torch.float32)  # [max, log Σ]
    lse_b = torch.empty_like(lse_a)
    pieces_kw = dict(K0=kp[0], K1=kp[1], K2=kp[2], PRECISION=prec)
    launch(
        _lse_kernel, _grid(c, bsz),
        a, b, lse_a, lse_b, c, sum(kp), scale, *a.stride(), *b.stride(), **pieces_kw,
    )  # fmt: skip
    launch(
        _fwd_kernel, _grid(c, bsz),
        a, b, eta32, lse_a, lse_b, out, c, sum(kp), length, scale,
        *a.stride(), *b.stride(), *out.stride(), **pieces_kw,
    )  # fmt: skip
    return out, lse_a, lse_b


def _forward(x_a, x_b, eta, scale: float, tf32: bool):
    with device_guard(x_a):
        return _forward_unguarded(x_a, x_b, eta, scale, tf32)


def _backward_unguarded(g, x_a, x_b, eta, lse_a, lse_b, scale: float, tf32: bool):
    check_device(g, x_a, x_b, eta)
    bsz, c, length = x_a.shape
    kp = pieces(length)
    da, db = torch.empty_like(x_a), torch.empty_like(x_b)
    a, b, gp = (_aligned(t, 1, length, sum(kp)) for t in (x_a, x_b, g))
    eta32 = eta.float().contiguous()
    delta = torch.empty((bsz, c), device=x_a.device, dtype=torch.float32)
    eps = torch.empty_like(delta)
    pieces_kw = dict(K0=kp[0], K1=kp[1], K2=kp[2], PRECISION=precision(x_a, tf32))
    _bwd_rowsum_kernel[_grid(c, bsz)](
        a, b, gp, eta32, lse_a, lse_b, delta, eps, c, sum(kp), scale,
        *a.stride(), *b.stride(), *gp.stride(), **pieces_kw,
    )  # fmt: skip
    for dx, side_b in ((da, False), (db, True)):  # one accumulator per pass (see _bwd_kernel)
        _bwd_kernel[_grid(c, bsz)](
            a, b, gp, eta32, lse_a, lse_b, delta, eps, dx, c, sum(kp), length, scale,
            *a.stride(), *b.stride(), *gp.stride(), *dx.stride(), **pieces_kw, SIDE_B=side_b,
        )  # fmt: skip
    deta = (-eps.sum(dim=1)).to(eta.dtype)  # dη = −Σ_i ε_i
    return da, db, deta


def _backward(g, x_a, x_b, eta, lse_a, lse_b, scale: float, tf32: bool):
    with device_guard(x_a):
        return _backward_unguarded(g, x_a, x_b, eta, lse_a, lse_b, scale, tf32)


# ----------------------------------------------------------------------------------------------
# Custom ops (`fused_op`: schema, fake and autograd) and entry point

flash_contrastive_channel_attention_fwd, flash_contrastive_channel_attention_bwd = fused_op(
    "flash_contrastive_channel_attention", ("x_a", "x_b", "eta"), _forward, _backward, stats=2
)


def contrastive_channel_attention(
    x_a: torch.Tensor, x_b: torch.Tensor, eta: torch.Tensor, scale: float, tf32: bool = False
) -> torch.Tensor:
    """|softmax(s X_A X_Aᵀ) − η softmax(s X_B X_Bᵀ)| X_A on (B, C, L), L ≤ 256, eta (B,)."""
    _check_length(x_a.shape[2])
    x_a2, x_b2 = one_dtype(x_a, x_b)
    return flash_contrastive_channel_attention_fwd(x_a2, x_b2, eta, scale, tf32)[0].to(x_a.dtype)
