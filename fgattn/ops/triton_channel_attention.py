"""Fused channel attention softmax(scale · q kᵀ) v over the channel axis, in Triton.

q, k: (B, C, L); v: (B, C, Lv) with any Lv (CoAttention passes [F1 | F2]). Flash-attention with
C channels as the sequence and L as the head dim: the C x C matrix is never written. The forward
keeps the per-row log-sum-exp; the backward recomputes the probabilities from it.

Numerics: logits and softmax in fp32, the row max taken AFTER scaling (the scale is negative by
default, so a max of the raw scores would be the wrong end); tl.dot accumulates in fp32; fp16/bf16
feed the tensor cores in their own dtype (p and ds are cast to it, as flash attention does); fp32
uses exact fp32 unless TF32 is enabled (`torch.backends.cuda.matmul.allow_tf32`).

Self attention (q = k = v = X, SCI) has its own op: the logits are symmetric, so one backward
program owning rows n of dX gets dq, dk and dv from one recomputed logit tile:
    dX_n = scale · Σ_m (ds_nm + ds_mn) x_m + Σ_m p_mn do_m,
    ds = p ∘ (do xᵀ − δ),  δ = rowsum(do ∘ o),
which takes 5 tile products per (m, n) block instead of 7 and writes one gradient instead of three.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_common import (
    TILES,
    check_device,
    chunk,
    dot_rows,
    load_tile,
    precision,
    store_tile,
    tile,
    warps,
)

# ----------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _fwd_kernel(
    Q, K, V, Out, LSE,
    C, L, LV, scale,
    sqb, sqc, sql, skb, skc, skl, svb, svc, svl, sob, soc, sol,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    # grid: (row blocks of q, column tiles of v, batch)
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    Q += b * sqb
    K += b * skb
    V += b * svb
    Out += b * sob
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = pid_d * BLOCK_DV + tl.arange(0, BLOCK_DV)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    for n0 in range(0, C, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        s = dot_rows(Q, K, offs_m, offs_n, C, L, sqc, sql, skc, skl,
                     BLOCK_M, BLOCK_N, BLOCK_K, PRECISION) * scale  # fmt: skip
        s = tl.where(offs_n[None, :] < C, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # max of the SCALED logits
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = load_tile(V, offs_n, offs_d, C, LV, svc, svl)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    store_tile(Out, acc / l_i[:, None], offs_m, offs_d, C, LV, soc, sol)
    # Every column tile computes the same statistics; the first one writes them.
    if pid_d == 0:
        tl.store(LSE + b * C + offs_m, m_i + tl.log(l_i), mask=offs_m < C)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    C, L, LV, scale,
    sqb, sqc, sql, skb, skc, skl, svb, svc, svl, sdb, sdc, sdl, sgb, sgc, sgl,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_KV: tl.constexpr, BLOCK_DL: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    # grid: (row blocks of dq, column tiles of dq over L, batch); dq = scale · ds k
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    Q += b * sqb
    K += b * skb
    V += b * svb
    DO += b * sdb
    DQ += b * sgb
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = pid_d * BLOCK_DL + tl.arange(0, BLOCK_DL)
    lse = tl.load(LSE + b * C + offs_m, mask=offs_m < C, other=0.0)
    delta = tl.load(DELTA + b * C + offs_m, mask=offs_m < C, other=0.0)

    acc = tl.zeros((BLOCK_M, BLOCK_DL), dtype=tl.float32)
    for n0 in range(0, C, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        s = dot_rows(Q, K, offs_m, offs_n, C, L, sqc, sql, skc, skl,
                     BLOCK_M, BLOCK_N, BLOCK_K, PRECISION) * scale  # fmt: skip
        p = tl.where(offs_n[None, :] < C, tl.exp(s - lse[:, None]), 0.0)
        dp = dot_rows(DO, V, offs_m, offs_n, C, LV, sdc, sdl, svc, svl,
                      BLOCK_M, BLOCK_N, BLOCK_KV, PRECISION)  # fmt: skip
        ds = p * (dp - delta[:, None])
        k = load_tile(K, offs_n, offs_d, C, L, skc, skl)
        acc = tl.dot(ds.to(k.dtype), k, acc, input_precision=PRECISION)
    store_tile(DQ, acc * scale, offs_m, offs_d, C, L, sgc, sgl)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    C, L, LV, scale,
    sqb, sqc, sql, skb, skc, skl, svb, svc, svl, sdb, sdc, sdl,
    skgb, skgc, skgl, svgb, svgc, svgl,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_KV: tl.constexpr, BLOCK_DL: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    # grid: (row blocks n of dk/dv, column tile j, batch); tile j of dv (if j < #dv tiles) and of
    # dk (if j < #dk tiles) from one recomputed pᵀ. Works in the transposed [n, m] layout so no
    # tile needs a register transpose: sᵀ = k_n q_mᵀ, dv_n = Σ_m pᵀ do_m, dk_n = scale Σ_m dsᵀ q_m.
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    Q += b * sqb
    K += b * skb
    V += b * svb
    DO += b * sdb
    DK += b * skgb
    DV += b * svgb
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_dl = pid_d * BLOCK_DL + tl.arange(0, BLOCK_DL)
    offs_dv = pid_d * BLOCK_DV + tl.arange(0, BLOCK_DV)
    want_dk = pid_d * BLOCK_DL < L
    want_dv = pid_d * BLOCK_DV < LV

    acc_dk = tl.zeros((BLOCK_N, BLOCK_DL), dtype=tl.float32)
    acc_dv = tl.zeros((BLOCK_N, BLOCK_DV), dtype=tl.float32)
    for m0 in range(0, C, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        lse = tl.load(LSE + b * C + offs_m, mask=offs_m < C, other=0.0)
        st = dot_rows(K, Q, offs_n, offs_m, C, L, skc, skl, sqc, sql,
                      BLOCK_N, BLOCK_M, BLOCK_K, PRECISION) * scale  # fmt: skip
        pt = tl.where(offs_m[None, :] < C, tl.exp(st - lse[None, :]), 0.0)
        if want_dv:
            do = load_tile(DO, offs_m, offs_dv, C, LV, sdc, sdl)
            acc_dv = tl.dot(pt.to(do.dtype), do, acc_dv, input_precision=PRECISION)
        if want_dk:
            delta = tl.load(DELTA + b * C + offs_m, mask=offs_m < C, other=0.0)
            dpt = dot_rows(V, DO, offs_n, offs_m, C, LV, svc, svl, sdc, sdl,
                           BLOCK_N, BLOCK_M, BLOCK_KV, PRECISION)  # fmt: skip
            dst = pt * (dpt - delta[None, :])
            q = load_tile(Q, offs_m, offs_dl, C, L, sqc, sql)
            acc_dk = tl.dot(dst.to(q.dtype), q, acc_dk, input_precision=PRECISION)
    store_tile(DK, acc_dk * scale, offs_n, offs_dl, C, L, skgc, skgl)
    store_tile(DV, acc_dv, offs_n, offs_dv, C, LV, svgc, svgl)


@triton.jit
def _bwd_self_kernel(
    X, DO, LSE, DELTA, DX,
    C, L, scale,
    sxb, sxc, sxl, sdb, sdc, sdl, sgb, sgc, sgl,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_DL: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    # q = k = v = X. Program owns rows n of dX (one column tile). In the [n, m] layout:
    #   st[n, m] = s_mn = s_nm (symmetric logits, computed once)
    #   pt[n, m] = p_mn = exp(s_mn − lse_m)        p_nm = exp(s_nm − lse_n)
    #   dpt[n, m] = do_m · x_n = dp_mn             dp_nm = do_n · x_m
    #   dX_n = scale Σ_m (ds_mn + ds_nm) x_m + Σ_m p_mn do_m
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    X += b * sxb
    DO += b * sdb
    DX += b * sgb
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = pid_d * BLOCK_DL + tl.arange(0, BLOCK_DL)
    lse_n = tl.load(LSE + b * C + offs_n, mask=offs_n < C, other=0.0)
    delta_n = tl.load(DELTA + b * C + offs_n, mask=offs_n < C, other=0.0)

    acc = tl.zeros((BLOCK_N, BLOCK_DL), dtype=tl.float32)
    for m0 in range(0, C, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        valid_m = offs_m[None, :] < C
        lse_m = tl.load(LSE + b * C + offs_m, mask=offs_m < C, other=0.0)
        delta_m = tl.load(DELTA + b * C + offs_m, mask=offs_m < C, other=0.0)
        st = dot_rows(X, X, offs_n, offs_m, C, L, sxc, sxl, sxc, sxl,
                      BLOCK_N, BLOCK_M, BLOCK_K, PRECISION) * scale  # fmt: skip
        pt = tl.where(valid_m, tl.exp(st - lse_m[None, :]), 0.0)
        p = tl.where(valid_m, tl.exp(st - lse_n[:, None]), 0.0)
        dpt = dot_rows(X, DO, offs_n, offs_m, C, L, sxc, sxl, sdc, sdl,
                       BLOCK_N, BLOCK_M, BLOCK_K, PRECISION)  # fmt: skip
        dp = dot_rows(DO, X, offs_n, offs_m, C, L, sdc, sdl, sxc, sxl,
                      BLOCK_N, BLOCK_M, BLOCK_K, PRECISION)  # fmt: skip
        ds = (pt * (dpt - delta_m[None, :]) + p * (dp - delta_n[:, None])) * scale
        x = load_tile(X, offs_m, offs_d, C, L, sxc, sxl)
        do = load_tile(DO, offs_m, offs_d, C, L, sdc, sdl)
        acc = tl.dot(ds.to(x.dtype), x, acc, input_precision=PRECISION)
        acc = tl.dot(pt.to(do.dtype), do, acc, input_precision=PRECISION)
    store_tile(DX, acc, offs_n, offs_d, C, L, sgc, sgl)


# ----------------------------------------------------------------------------------------------
# Launchers (plain functions on real tensors)


def _forward(q, k, v, scale: float, tf32: bool):
    check_device(q, k, v)
    bsz, c, length = q.shape
    lv = v.shape[2]
    o = torch.empty((bsz, c, lv), device=v.device, dtype=v.dtype)
    lse = torch.empty((bsz, c), device=q.device, dtype=torch.float32)
    bm, bn, bdv = TILES["block_m"], TILES["block_n"], tile(lv)
    grid = (triton.cdiv(c, bm), triton.cdiv(lv, bdv), bsz)
    _fwd_kernel[grid](
        q, k, v, o, lse, c, length, lv, scale,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=chunk(length), BLOCK_DV=bdv,
        PRECISION=precision(q, tf32), num_warps=warps(bdv), num_stages=2,
    )  # fmt: skip
    return o, lse


def _delta(do, o):
    # δ_i = Σ_k p_ik dp_ik = do_i · o_i: one (B, C) fp32 vector, cheap next to the C x C work.
    return torch.einsum("bcl,bcl->bc", do.float(), o.float())


def _backward(do, q, k, v, o, lse, scale: float, tf32: bool):
    check_device(do, q, k, v)
    bsz, c, length = q.shape
    lv = v.shape[2]
    delta = _delta(do, o)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    bm, bn = TILES["block_m"], TILES["block_n"]
    bk, bkv, bdl, bdv = chunk(length), chunk(lv), tile(length), tile(lv)
    prec = precision(q, tf32)
    _bwd_dq_kernel[(triton.cdiv(c, bm), triton.cdiv(length, bdl), bsz)](
        q, k, v, do, lse, delta, dq, c, length, lv, scale,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_KV=bkv, BLOCK_DL=bdl,
        PRECISION=prec, num_warps=warps(bdl), num_stages=2,
    )  # fmt: skip
    n_tiles = max(triton.cdiv(length, bdl), triton.cdiv(lv, bdv))
    _bwd_dkdv_kernel[(triton.cdiv(c, bn), n_tiles, bsz)](
        q, k, v, do, lse, delta, dk, dv, c, length, lv, scale,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_KV=bkv, BLOCK_DL=bdl, BLOCK_DV=bdv,
        PRECISION=prec, num_warps=warps(bdl, bdv), num_stages=2,
    )  # fmt: skip
    return dq, dk, dv


def _backward_self(do, x, o, lse, scale: float, tf32: bool):
    check_device(do, x)
    bsz, c, length = x.shape
    delta = _delta(do, o)
    dx = torch.empty_like(x)
    bm, bn, bdl = TILES["block_m"], TILES["block_n"], tile(length)
    _bwd_self_kernel[(triton.cdiv(c, bn), triton.cdiv(length, bdl), bsz)](
        x, do, lse, delta, dx, c, length, scale,
        *x.stride(), *do.stride(), *dx.stride(),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=chunk(length), BLOCK_DL=bdl,
        PRECISION=precision(x, tf32), num_warps=warps(bdl), num_stages=2,
    )  # fmt: skip
    return dx


# ----------------------------------------------------------------------------------------------
# Custom ops: opaque to torch.compile (fake impls give shapes), differentiable via autograd.


@torch.library.custom_op("fgattn::channel_attention_fwd", mutates_args=())
def channel_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, tf32: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, C, Lv) in v's dtype, lse (B, C) fp32)."""
    return _forward(q, k, v, scale, tf32)


@channel_attention_fwd.register_fake
def _(q, k, v, scale, tf32):
    bsz, c, _ = q.shape
    return v.new_empty((bsz, c, v.shape[2])), q.new_empty((bsz, c), dtype=torch.float32)


@torch.library.custom_op("fgattn::channel_attention_bwd", mutates_args=())
def channel_attention_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    tf32: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(do, q, k, v, o, lse, scale, tf32)


@channel_attention_bwd.register_fake
def _(do, q, k, v, o, lse, scale, tf32):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    q, k, v, scale, tf32 = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.scale, ctx.tf32 = scale, tf32


def _grad(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = channel_attention_bwd(do, q, k, v, o, lse, ctx.scale, ctx.tf32)
    return dq, dk, dv, None, None


channel_attention_fwd.register_autograd(_grad, setup_context=_setup)


@torch.library.custom_op("fgattn::self_channel_attention_fwd", mutates_args=())
def self_channel_attention_fwd(
    x: torch.Tensor, scale: float, tf32: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(scale · x xᵀ) x: (out (B, C, L) in x's dtype, lse (B, C) fp32)."""
    return _forward(x, x, x, scale, tf32)


@self_channel_attention_fwd.register_fake
def _(x, scale, tf32):
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(
        x.shape[:2], dtype=torch.float32
    )


@torch.library.custom_op("fgattn::self_channel_attention_bwd", mutates_args=())
def self_channel_attention_bwd(
    do: torch.Tensor, x: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, scale: float, tf32: bool
) -> torch.Tensor:
    return _backward_self(do, x, o, lse, scale, tf32)


@self_channel_attention_bwd.register_fake
def _(do, x, o, lse, scale, tf32):
    return torch.empty_like(x)


def _setup_self(ctx, inputs, output):
    x, scale, tf32 = inputs
    o, lse = output
    ctx.save_for_backward(x, o, lse)
    ctx.scale, ctx.tf32 = scale, tf32


def _grad_self(ctx, do, _dlse):
    x, o, lse = ctx.saved_tensors
    return self_channel_attention_bwd(do, x, o, lse, ctx.scale, ctx.tf32), None, None


self_channel_attention_fwd.register_autograd(_grad_self, setup_context=_setup_self)


# ----------------------------------------------------------------------------------------------
# Entry point used by the backend


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """a and b are one tensor, or identical views of one base (functional.to_bcl makes a fresh
    view per argument of a 4-D input), so one gradient for both is exact."""
    if a is b:
        return True
    return (
        a._base is not None
        and a._base is b._base
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.storage_offset() == b.storage_offset()
    )


def channel_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, tf32: bool = False
) -> torch.Tensor:
    """softmax(scale · q kᵀ) v on (B, C, L) tensors, result in v's dtype."""
    if _same_tensor(q, k) and _same_tensor(k, v):
        return self_channel_attention_fwd(q, scale, tf32)[0]
    dtype = v.dtype
    if not (q.dtype == k.dtype == v.dtype):  # one dtype per kernel: promote, cast back after
        common = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
        q, k, v = q.to(common), k.to(common), v.to(common)
    return channel_attention_fwd(q, k, v, scale, tf32)[0].to(dtype)
