"""Channel attention in the FlashAttention-2 shape, in Triton (the "triton_fa" implementation).

softmax(scale · q kᵀ) v with q, k: (B, C, L), v: (B, C, Lv), the softmax over the C channels
(flash attention's sequence) and L its head dim. Unlike `triton_channel_attention`, which reloads
q for every column block, a program keeps its BLOCK_M rows of q for the whole sweep and streams
BLOCK_N-row tiles of k and v through a software-pipelined loop (`tl.range(num_stages=...)`), as in
Triton's tutorial 06-fused-attention. This needs the whole row of q in one program, so L ≤ 256
(`MAX_LENGTH`); longer rows stay with `triton_channel_attention`.

Rows wider than a power of two are held as up to three power-of-two pieces (`pieces`): L = 196 is
128 + 64 + 16 = 208 columns, not 256, and every product over L is the sum of the pieces' products.
A value wider than 256 (PCA-Net's v = [F1 | F2], Lv = 2L) is split into equal column tiles, one per
program along the grid's second axis.

Tiles, warps and pipeline depth are autotuned per (C, L, Lv, dtype) on the user's GPU at first call,
over `FWD_SPACE` / `DELTA_SPACE` / `BWD_SPACE` pruned by an estimate of shared memory and registers
(`fits`, which also picks per GPU generation); under the Triton interpreter the prune keeps only
`INTERPRETER_TILES`. fp32 inputs (exact or TF32) are refused on GPUs (`DoesNotFit`): every
backward config spilled registers (benchmarks/README.md). The forward kernels' configs come
twice, streaming k / v through masked pointer loads (cp.async) or through on-device TMA
descriptors (`USE_TMA`, kept only on sm_90+ with Triton ≥ 3.5, `tma_available`); their launches
set Triton's allocator for the descriptors' scratch for that launch only (`launch`).

Numerics as in `triton_channel_attention`: fp32 logits scaled (sign included) before any running
max, fp32 softmax statistics kept as the pair (max, log Σ), and the backward's δ_i = Σ_j p_ij dp_ij
recomputed rather than taken from the stored output. Self attention (q = k = v = X) has a tied
backward: the program owning rows n of dX keeps X_n, dO_n and one fp32 accumulator, and gets the
q, k and v sides of the gradient from one recomputed (symmetric) logit tile per step:
    dX_n = Σ_m scale (dS_nm + dS_mn) x_m + P_mn do_m,   dS = P ∘ (dP − δ),  dP = dO Xᵀ,
five tile products per (n, m) block, no atomics and no second dQ pass. The cross-attention
backward (v up to any width, in ≤ 256-wide column tiles t) takes four sweeps of the same shape:
δ (`_bwd_delta_cross_kernel`), dQ_i (q_i resident), dK_j (k_j resident) and dV_j[t] (k_j
resident, one program per tile). dP = Σ_t dO[t] V[t]ᵀ sums over the tiles, and so does
dS = P ∘ (dP − δ) when the first tile alone subtracts δ: dQ and dK keep one accumulator over
all tiles, with no partial buffers.
"""

from __future__ import annotations

import contextvars

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import _triton_common
from ._triton_common import check_device, device_guard, fused_op, one_dtype, precision, probs

MAX_LENGTH = 256  # widest row of q a program keeps resident (FA3's largest head dim)
MAX_PIECES = 3

# Config space: (BLOCK_M, BLOCK_N, num_warps, num_stages). BLOCK_M rows stay resident, BLOCK_N rows
# stream. `fits` drops what would not fit the device's shared memory or spill registers.
# A kernel whose logits feed a second tl.dot gets Triton's [num_warps, 1] warp layout (16 rows a
# warp), so BLOCK_M = 16 · num_warps: fewer rows hold every row twice (both warpgroups compute the
# same logits), as (64, 128, 8 warps) did. The 32-row configs are for GPUs with little shared
# memory per block (sm_75's 64 KiB).
FWD_SPACE = [
    (128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 3), (128, 128, 8, 2),
    (64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 3), (64, 32, 4, 2),
    (32, 32, 2, 1), (32, 16, 2, 1),
]  # fmt: skip
# The tied backward streams 16 rows at a time (32 and 64 spilled). Which rows and warps suit which
# GPU: `_suits` (compiled in benchmarks/README.md, third session).
BWD_SPACE = [(128, 16, 8, 2), (128, 16, 8, 3), (64, 16, 4, 2), (64, 16, 4, 3), (32, 16, 2, 2)]
DELTA_SPACE = [
    (64, 64, 8, 2), (64, 32, 8, 2), (64, 32, 4, 2), (128, 32, 8, 2), (64, 32, 8, 1),
    (32, 32, 4, 2), (32, 16, 4, 1), (16, 16, 4, 1),
]  # fmt: skip
# The one config the interpreter runs (tests shrink or widen it to reach other code paths), and
# whether it loads the streamed tiles through tensor descriptors (the kernels with a USE_TMA axis).
INTERPRETER_TILES = {"BLOCK_M": 16, "BLOCK_N": 16}
INTERPRETER_TMA = False
# Triton keeps the allocator on-device descriptors need in a ContextVar from 3.5 on (a module
# global in 3.4), so `launch` can set one for its own launch only: TMA configs from 3.5 on.
TMA_TRITON = tuple(int(part) for part in triton.__version__.split(".")[:2]) >= (3, 5)
# fp32 words per thread the estimate may fill, calibrated on the compiled backward kernels: at
# L = 196 (208 columns) their spill-free configs estimate ≤ 184, at L = 256 those spilling 8 B 208.
REGISTER_BUDGET = 184


def pieces(width: int) -> tuple[int, int, int]:
    """Power-of-two widths (each ≥ 16, then zeros) whose sum is the smallest multiple of 16 ≥
    `width` that needs at most three of them: 196 -> (128, 64, 16), 49 -> (64, 0, 0)."""
    total = max(16, triton.cdiv(width, 16) * 16)
    while (total // 16).bit_count() > MAX_PIECES:
        total += 16
    parts = [16 << i for i in reversed(range((total // 16).bit_length())) if (total // 16) >> i & 1]
    return (*parts, 0, 0)[:MAX_PIECES]


def _configs(space, tma: bool = False):
    """A triton.Config per (BLOCK_M, BLOCK_N, num_warps, num_stages) of `space`; with `tma`, each
    twice: streamed tiles loaded through masked pointers (cp.async) and through on-device TMA
    descriptors (USE_TMA), for the autotuner to choose between on the user's GPU."""
    loads = [{"USE_TMA": False}, {"USE_TMA": True}] if tma else [{}]
    return [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "STAGES": st, **load}, num_warps=w, num_stages=st
        )
        for bm, bn, w, st in space
        for load in loads
    ]


def autotune(space, key: list[str], kind: str, tma: bool = False):
    """`triton.autotune` over the (BLOCK_M, BLOCK_N, warps, stages) `space`, keyed on `key`,
    pruned by `fits(kind)`; with `tma` (a kernel with a `USE_TMA` constexpr) each config also with
    TMA loads, kept only where `tma_available` (see `_with_tma`)."""
    prune = _with_tma(fits(kind)) if tma else fits(kind)
    return _triton_common.autotuned(_configs(space, tma), key, prune)


def tma_available() -> bool:
    """Whether a launch now may load through on-device TMA descriptors
    (`tl.make_tensor_descriptor`): under the interpreter wherever Triton has them (3.4 on); on a
    GPU with Triton ≥ 3.5 (`TMA_TRITON`) when the target of Triton's active driver is an NVIDIA
    GPU of compute capability ≥ 9.0 (Hopper's TMA unit; earlier GPUs keep cp.async)."""
    if _triton_common.interpreting():
        return hasattr(tl, "make_tensor_descriptor")
    if not TMA_TRITON:
        return False
    target = triton.runtime.driver.active.get_current_target()
    return target.backend == "cuda" and target.arch >= 90


def _with_tma(prune):
    """`prune` for a kernel whose configs have a USE_TMA axis: the TMA configs dropped first where
    not `tma_available()`; under the interpreter `prune`'s one config, loading through descriptors
    if `INTERPRETER_TMA` (and the interpreter has them)."""

    def pruned(configs, named_args, **kwargs):
        if _triton_common.interpreting():
            use = INTERPRETER_TMA and tma_available()
            return [
                triton.Config(
                    dict(cfg.kwargs, USE_TMA=use),
                    num_warps=cfg.num_warps,
                    num_stages=cfg.num_stages,
                )
                for cfg in prune(configs, named_args, **kwargs)
            ]
        if not tma_available():
            configs = [cfg for cfg in configs if not cfg.kwargs["USE_TMA"]]
        return prune(configs, named_args, **kwargs)

    return pruned


def _scratch(size: int, alignment: int, stream):
    """Triton's allocator for the global scratch on-device descriptors are written to (128 bytes
    each per program): torch's caching allocator on the current GPU (aligned to ≥ 512 bytes)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def launch(kernel, grid, *args, **kwargs):
    """kernel[grid](*args, **kwargs) with `_scratch` as Triton's allocator for this launch (and the
    autotuning it may start) only: `triton.set_allocator` is called in a copy of the current
    context (Triton ≥ 3.5 keeps the allocator in a ContextVar), so an allocator the user set
    elsewhere is neither replaced nor needed, and none is left set. On Triton 3.4, where
    set_allocator would be global, nothing is set and `tma_available` keeps the TMA configs out."""
    if not TMA_TRITON:
        return kernel[grid](*args, **kwargs)

    def run():
        triton.set_allocator(_scratch)
        return kernel[grid](*args, **kwargs)

    return contextvars.copy_context().run(run)


class DoesNotFit(RuntimeError):
    """No config of a kernel suits the GPU and dtype (raised by the prune, at launch): none fits
    its shared memory, or the inputs are fp32 (see `fits`)."""


def target_arch(x: torch.Tensor) -> int | None:
    """x's GPU as 10 · major + minor compute capability (80 for an A100, 90 for an H100); None
    off the GPU. `benchmarks/kernel_resources.py` replaces it to compile for other GPUs."""
    if x.device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(x.device)
    return 10 * major + minor


def estimate(
    kind: str, bm: int, bn: int, warps: int, stages: int, lk: int, lv: int, size: int,
    tf32: bool = False,
):  # fmt: skip
    """(shared bytes, fp32 words per thread) a config needs, from its tiles (bm rows resident,
    bn rows streamed, rows lk wide; lv: the value tile's width, 0 where v is k).

    "fwd": q staged once, k and v tiles per pipeline stage, p converted to a dot operand through
    shared memory; in registers the (bm x lv) fp32 accumulator and two (bm x bn) fp32 tiles (s, p).
    "bwd" (self attention): x, do resident, two streamed tiles per stage, ds and pt converted; the
    (bm x lk) accumulator and five (bm x bn) tiles. "delta" (its δ pass): x, do resident, x
    streamed, three tiles, no accumulator. The contrastive kernels: "cstats" (statistics, row
    sums) up to three resident and two streamed tiles, one converted, one accumulator, four
    (bm x bn) tiles (an over-count: they have no accumulator); "cfwd" (the forward) two resident,
    two streamed, |W| converted, one accumulator, four tiles; "cbwd" (one pass of dX_A or dX_B)
    three resident and streamed, |W| and ds converted, one accumulator and ten tiles.
    TF32 gets a 25 % margin on shared memory: compiled for sm_80/sm_90 at L = 49, 196 and 256
    (benchmarks/kernel_resources.py), fp16/bf16 and exact fp32 configs measured at most 1.0x the
    estimate, TF32 ones up to 1.21x without the margin (`fits` now refuses fp32; kept for a TF32
    space that compiles spill-free). The register side is calibrated on the backward kernels in
    bf16 (`REGISTER_BUDGET`).
    """
    resident, streamed, converted, accumulators, tiles = {
        "fwd": (1, 1, 1, 1, 2),
        "bwd": (2, 2, 2, 1, 5),
        "delta": (2, 1, 0, 0, 3),
        "cstats": (3, 2, 1, 1, 4),
        "cfwd": (2, 2, 1, 1, 4),
        "cbwd": (3, 3, 2, 1, 10),
    }[kind]
    operands = resident * bm * lk + stages * bn * (streamed * lk + lv) + converted * bm * bn
    words = (accumulators * bm * (lv or lk) + tiles * bm * bn) / (32 * warps)
    return operands * size * (1.25 if tf32 else 1.0), words


def _suits(kind: str, cfg, arch: int | None) -> bool:
    """Whether a config of a kernel with chained products (a product feeding another) suits the
    GPU's matrix instructions, as compiled (bf16, L = 49, 196 and 256): with mma.sync (sm_80/86/
    89) 8-warp tiles spilled 8 B-4 KB; on sm_90 (wgmma) the backward's 128-row, 8-warp tiles
    stayed spill-free where its 64-row, 4-warp ones spilled 32-190 B."""
    if arch is None or kind not in ("fwd", "bwd", "cbwd", "cfwd"):
        return True
    if arch < 90:
        return cfg.num_warps <= 4
    return kind in ("fwd", "cfwd") or cfg.kwargs["BLOCK_M"] >= 128


def fits(kind: str):
    """An early_config_prune for `kind` (see `estimate`). fp32 inputs are refused with
    `DoesNotFit`, exact or TF32: every backward config compiled spilled registers (exact fp32's
    tl.dot runs on the FMA units with whole rows of L in registers: 2-17 KB; TF32: 0.4-1.2 KB).
    Otherwise: the configs whose shared memory fits the device's (any, off the GPU) and that
    `_suits` its GPU; of those, the ones within `REGISTER_BUDGET`, only the ≥ 64-row ones where
    any is; where none is, the one needing the fewest registers (of those, the widest on sm_90,
    the narrowest with mma.sync). `DoesNotFit` where no config fits the shared memory. Under
    TRITON_INTERPRET the one config `INTERPRETER_TILES` (fp32 included: the tests' reference)."""

    def prune(configs, named_args, **kwargs):
        if _triton_common.interpreting():
            return [triton.Config(dict(INTERPRETER_TILES, STAGES=1), num_warps=4, num_stages=1)]
        x = next(t for t in named_args.values() if isinstance(t, torch.Tensor))
        if x.element_size() == 4:
            raise DoesNotFit(
                "fgattn's flash-shaped Triton kernels do not run fp32 inputs (exact or TF32): "
                "every backward config spilled registers. Use backend='triton' (or 'auto'), or "
                "pass bf16/fp16 inputs"
            )
        lk = kwargs["K0"] + kwargs["K1"] + kwargs["K2"]
        is_self = kwargs.get("IS_SELF", "V0" not in kwargs)  # the cross backward: v's pieces
        lv = 0 if is_self else kwargs["V0"] + kwargs["V1"] + kwargs["V2"]
        limit = _triton_common.shared_memory_limit(x)
        arch = target_arch(x)

        def need(cfg):
            bm, bn, st = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["STAGES"]
            return estimate(kind, bm, bn, cfg.num_warps, st, lk, lv, x.element_size())

        room = [cfg for cfg in configs if limit is None or need(cfg)[0] <= limit]
        if not room:
            smallest = min(need(cfg)[0] for cfg in configs)
            raise DoesNotFit(
                f"fgattn's flash-shaped Triton kernels need at least {smallest / 1024:.0f} KiB "
                f"of shared memory per block for rows of {lk} {x.dtype} values; this GPU allows "
                f"{limit / 1024:.0f} KiB. Use backend='triton' (or 'auto') for this call"
            )
        suited = [cfg for cfg in room if _suits(kind, cfg, arch)] or room
        kept = [cfg for cfg in suited if need(cfg)[1] <= REGISTER_BUDGET]
        # 64-row tiles get Hopper's warpgroup MMA; narrower ones only where nothing else fits
        wide = [cfg for cfg in kept if cfg.kwargs["BLOCK_M"] >= 64]
        if wide or kept:
            return wide or kept
        # None within the budget (the contrastive backward at L = 256, which spilled 168-176 B
        # at 64 rows): on sm_90 the widest, keeping wgmma; with mma.sync the narrowest (32 rows,
        # 2 warps compiled spill-free there).
        rows = -1 if arch is None or arch >= 90 else 1
        return [min(suited, key=lambda cfg: (need(cfg)[1], rows * cfg.kwargs["BLOCK_M"]))]

    return prune


# ----------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _rows(ptr, rows, R, col0, W: tl.constexpr, END, stride_r, stride_c):
    """ptr[rows, col0 : col0 + W] (W a power of two), zero where rows ≥ R or columns ≥ END."""
    cols = col0 + tl.arange(0, W)
    return tl.load(
        ptr + rows[:, None] * stride_r + cols[None, :] * stride_c,
        mask=(rows[:, None] < R) & (cols[None, :] < END),
        other=0.0,
    )


@triton.jit
def _store_rows(ptr, val, rows, R, col0, W: tl.constexpr, END, stride_r, stride_c):
    cols = col0 + tl.arange(0, W)
    tl.store(
        ptr + rows[:, None] * stride_r + cols[None, :] * stride_c,
        val.to(ptr.dtype.element_ty),
        mask=(rows[:, None] < R) & (cols[None, :] < END),
    )


@triton.jit
def _dot_t(a0, a1, a2, b0, b1, b2, K1: tl.constexpr, K2: tl.constexpr, PRECISION: tl.constexpr):
    """Σ_i a_i b_iᵀ in fp32 over the pieces of L (a_i, b_i: rows x piece i; absent ones skipped)."""
    acc = tl.dot(a0, tl.trans(b0), input_precision=PRECISION)
    if K1 > 0:
        acc = tl.dot(a1, tl.trans(b1), acc, input_precision=PRECISION)
    if K2 > 0:
        acc = tl.dot(a2, tl.trans(b2), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _pieces(ptr, rows, C, L, stride_r, stride_c,
            K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr):  # fmt: skip
    """ptr[rows, :L] as three pieces (an absent piece repeats the first and is never used)."""
    t0 = _rows(ptr, rows, C, 0, K0, L, stride_r, stride_c)
    t1 = t0
    t2 = t0
    if K1 > 0:
        t1 = _rows(ptr, rows, C, K0, K1, L, stride_r, stride_c)
    if K2 > 0:
        t2 = _rows(ptr, rows, C, K0 + K1, K2, L, stride_r, stride_c)
    return t0, t1, t2


@triton.jit
def _descriptors(ptr, R, END, stride_r, ROWS: tl.constexpr,
                 K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr):  # fmt: skip
    """On-device TMA descriptors of ptr[:R, :END] (contiguous rows `stride_r` apart, base and rows
    16-byte aligned) for (ROWS x K_i) blocks, one per piece (an absent piece repeats the first).
    A block reaching past row R reads zeros there, as `_rows`' mask does."""
    d0 = tl.make_tensor_descriptor(ptr, [R, END], [stride_r, 1], [ROWS, K0])
    d1 = d0
    d2 = d0
    if K1 > 0:
        d1 = tl.make_tensor_descriptor(ptr, [R, END], [stride_r, 1], [ROWS, K1])
    if K2 > 0:
        d2 = tl.make_tensor_descriptor(ptr, [R, END], [stride_r, 1], [ROWS, K2])
    return d0, d1, d2


@triton.jit
def _tma_pieces(d0, d1, d2, row0, col0, K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr):
    """Rows row0 : row0 + ROWS, columns col0 : col0 + K0 + K1 + K2 as three pieces, loaded
    through `_descriptors` (an absent piece repeats the first and is never used)."""
    t0 = d0.load([row0, col0])
    t1 = t0
    t2 = t0
    if K1 > 0:
        t1 = d1.load([row0, col0 + K0])
    if K2 > 0:
        t2 = d2.load([row0, col0 + K0 + K1])
    return t0, t1, t2


@triton.jit
def _streamed(ptr, d0, d1, d2, row0, rows, R, col0, END, stride_r, stride_c,
              K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
              USE_TMA: tl.constexpr):  # fmt: skip
    """ptr[rows, col0 : col0 + K0 + K1 + K2] (rows = row0 + arange) as three pieces, zero past row R
    and column END: through the descriptors d_i if USE_TMA, else masked pointer loads."""
    if USE_TMA:
        t0, t1, t2 = _tma_pieces(d0, d1, d2, row0, col0, K0, K1, K2)
    else:
        t0 = _rows(ptr, rows, R, col0, K0, END, stride_r, stride_c)
        t1 = t0
        t2 = t0
        if K1 > 0:
            t1 = _rows(ptr, rows, R, col0 + K0, K1, END, stride_r, stride_c)
        if K2 > 0:
            t2 = _rows(ptr, rows, R, col0 + K0 + K1, K2, END, stride_r, stride_c)
    return t0, t1, t2


@autotune(FWD_SPACE, ["C", "L", "LV", "IS_SELF"], "fwd", tma=True)
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
    # L = K0 + K1 + K2 columns and each column tile of v to V0 + V1 + V2 (`_aligned`): rows start
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
    q0, q1, q2 = _pieces(Q, offs_m, C, L, sqc, sql, K0, K1, K2)
    kd0, kd1, kd2 = K, K, K  # descriptors of k and v (only where USE_TMA)
    vd0, vd1, vd2 = V, V, V
    if USE_TMA:
        kd0, kd1, kd2 = _descriptors(K, C, L, skc, BLOCK_N, K0, K1, K2)
        if not IS_SELF:
            vd0, vd1, vd2 = _descriptors(V, C, dv_end, svc, BLOCK_N, V0, V1, V2)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc0 = tl.zeros((BLOCK_M, V0), dtype=tl.float32)
    if V1 > 0:
        acc1 = tl.zeros((BLOCK_M, V1), dtype=tl.float32)
    if V2 > 0:
        acc2 = tl.zeros((BLOCK_M, V2), dtype=tl.float32)

    for n0 in tl.range(0, C, BLOCK_N, num_stages=STAGES):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        # -- logits s = scale · q kᵀ in fp32, the sign applied before the running max
        k0, k1, k2 = _streamed(K, kd0, kd1, kd2, n0, offs_n, C, 0, L, skc, skl,
                               K0, K1, K2, USE_TMA)  # fmt: skip
        s = _dot_t(q0, q1, q2, k0, k1, k2, K1, K2, PRECISION)
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
            v0, v1, v2 = _streamed(V, vd0, vd1, vd2, n0, offs_n, C, dv0, dv_end, svc, svl,
                                   V0, V1, V2, USE_TMA)  # fmt: skip
        p = p.to(v0.dtype)
        acc0 = tl.dot(p, v0, acc0 * alpha[:, None], input_precision=PRECISION)
        if V1 > 0:
            acc1 = tl.dot(p, v1, acc1 * alpha[:, None], input_precision=PRECISION)
        if V2 > 0:
            acc2 = tl.dot(p, v2, acc2 * alpha[:, None], input_precision=PRECISION)

    # -- epilogue: normalise, store; the first column tile stores the row statistics
    _store_rows(Out, acc0 / l_i[:, None], offs_m, C, d0, V0, d_end, soc, sol)
    if V1 > 0:
        _store_rows(Out, acc1 / l_i[:, None], offs_m, C, d0 + V0, V1, d_end, soc, sol)
    if V2 > 0:
        _store_rows(Out, acc2 / l_i[:, None], offs_m, C, d0 + V0 + V1, V2, d_end, soc, sol)
    if pid_d == 0:
        tl.store(STATS + b * 2 * C + offs_m, m_i, mask=offs_m < C)
        tl.store(STATS + b * 2 * C + C + offs_m, tl.log(l_i), mask=offs_m < C)


@autotune(DELTA_SPACE, ["C", "L"], "delta")
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
    # recomputed p and dp (see triton_channel_attention._bwd_delta_kernel for why not do · o).
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    X += b * sxb
    DO += b * sdb
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_i = tl.load(STATS + b * 2 * C + offs_m, mask=offs_m < C, other=0.0)
    lo = tl.load(STATS + b * 2 * C + C + offs_m, mask=offs_m < C, other=0.0)
    x0, x1, x2 = _pieces(X, offs_m, C, L, sxc, sxl, K0, K1, K2)
    do0, do1, do2 = _pieces(DO, offs_m, C, L, sdc, sdl, K0, K1, K2)
    num = tl.zeros((BLOCK_M,), dtype=tl.float32)
    r = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in tl.range(0, C, BLOCK_N, num_stages=STAGES):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        xn0, xn1, xn2 = _pieces(X, offs_n, C, L, sxc, sxl, K0, K1, K2)
        s = _dot_t(x0, x1, x2, xn0, xn1, xn2, K1, K2, PRECISION) * scale
        p = probs(s, m_i[:, None], lo[:, None], offs_n[None, :] < C)
        dp = _dot_t(do0, do1, do2, xn0, xn1, xn2, K1, K2, PRECISION)
        num += tl.sum(p * dp, 1)
        r += tl.sum(p, 1)
    BST += b * 3 * C
    tl.store(BST + offs_m, m_i, mask=offs_m < C)
    tl.store(BST + C + offs_m, lo + tl.log(r), mask=offs_m < C)
    tl.store(BST + 2 * C + offs_m, num / r, mask=offs_m < C)


@autotune(BWD_SPACE, ["C", "L"], "bwd")
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
    m_n = tl.load(BST + offs_n, mask=offs_n < C, other=0.0)
    lo_n = tl.load(BST + C + offs_n, mask=offs_n < C, other=0.0)
    delta_n = tl.load(BST + 2 * C + offs_n, mask=offs_n < C, other=0.0)
    x0, x1, x2 = _pieces(X, offs_n, C, L, sxc, sxl, K0, K1, K2)
    do0, do1, do2 = _pieces(DO, offs_n, C, L, sdc, sdl, K0, K1, K2)
    acc0 = tl.zeros((BLOCK_M, K0), dtype=tl.float32)
    if K1 > 0:
        acc1 = tl.zeros((BLOCK_M, K1), dtype=tl.float32)
    if K2 > 0:
        acc2 = tl.zeros((BLOCK_M, K2), dtype=tl.float32)

    for m0 in tl.range(0, C, BLOCK_N, num_stages=STAGES):
        offs_m = m0 + tl.arange(0, BLOCK_N)
        m_m = tl.load(BST + offs_m, mask=offs_m < C, other=0.0)
        lo_m = tl.load(BST + C + offs_m, mask=offs_m < C, other=0.0)
        delta_m = tl.load(BST + 2 * C + offs_m, mask=offs_m < C, other=0.0)
        xm0, xm1, xm2 = _pieces(X, offs_m, C, L, sxc, sxl, K0, K1, K2)
        dom0, dom1, dom2 = _pieces(DO, offs_m, C, L, sdc, sdl, K0, K1, K2)
        # -- both orientations of the softmax from one (symmetric) logit tile
        st = _dot_t(x0, x1, x2, xm0, xm1, xm2, K1, K2, PRECISION) * scale
        valid = (offs_n[:, None] < C) & (offs_m[None, :] < C)  # padding: exp(0 − lse) = inf
        pt = probs(st, m_m[None, :], lo_m[None, :], valid)
        p = probs(st, m_n[:, None], lo_n[:, None], valid)
        # -- dP in both orientations, then scale · (dS_mn + dS_nm)
        dpt = _dot_t(x0, x1, x2, dom0, dom1, dom2, K1, K2, PRECISION)
        dp = _dot_t(do0, do1, do2, xm0, xm1, xm2, K1, K2, PRECISION)
        ds = ((pt * (dpt - delta_m[None, :]) + p * (dp - delta_n[:, None])) * scale).to(xm0.dtype)
        pt = pt.to(dom0.dtype)
        # -- dX_n += ds x_m + pt do_m, piece by piece
        acc0 = tl.dot(ds, xm0, acc0, input_precision=PRECISION)
        acc0 = tl.dot(pt, dom0, acc0, input_precision=PRECISION)
        if K1 > 0:
            acc1 = tl.dot(ds, xm1, acc1, input_precision=PRECISION)
            acc1 = tl.dot(pt, dom1, acc1, input_precision=PRECISION)
        if K2 > 0:
            acc2 = tl.dot(ds, xm2, acc2, input_precision=PRECISION)
            acc2 = tl.dot(pt, dom2, acc2, input_precision=PRECISION)

    # -- dX in its own (unpadded) width L_OUT
    _store_rows(DX, acc0, offs_n, C, 0, K0, L_OUT, sgc, sgl)
    if K1 > 0:
        _store_rows(DX, acc1, offs_n, C, K0, K1, L_OUT, sgc, sgl)
    if K2 > 0:
        _store_rows(DX, acc2, offs_n, C, K0 + K1, K2, L_OUT, sgc, sgl)


@triton.jit
def _tile_pieces(ptr, rows, C, t, stride_r, stride_c,
                 V0: tl.constexpr, V1: tl.constexpr, V2: tl.constexpr):  # fmt: skip
    """Column tile t of ptr (each tile zero-padded to V0 + V1 + V2, `_aligned`) as its pieces."""
    return _pieces(ptr + t * (V0 + V1 + V2) * stride_c, rows, C, V0 + V1 + V2, stride_r, stride_c,
                   V0, V1, V2)  # fmt: skip


@autotune(DELTA_SPACE, ["C", "L", "N_TILES", "TV"], "delta")
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
    m_i = tl.load(STATS + b * 2 * C + offs_m, mask=offs_m < C, other=0.0)
    lo = tl.load(STATS + b * 2 * C + C + offs_m, mask=offs_m < C, other=0.0)
    q0, q1, q2 = _pieces(Q, offs_m, C, L, sqc, sql, K0, K1, K2)
    num = tl.zeros((BLOCK_M,), dtype=tl.float32)
    r = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for t in range(N_TILES):
        do0, do1, do2 = _tile_pieces(DO, offs_m, C, t, sdc, sdl, V0, V1, V2)
        for n0 in tl.range(0, C, BLOCK_N, num_stages=STAGES):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            k0, k1, k2 = _pieces(K, offs_n, C, L, skc, skl, K0, K1, K2)
            v0, v1, v2 = _tile_pieces(V, offs_n, C, t, svc, svl, V0, V1, V2)
            s = _dot_t(q0, q1, q2, k0, k1, k2, K1, K2, PRECISION) * scale
            p = probs(s, m_i[:, None], lo[:, None], offs_n[None, :] < C)
            dp = _dot_t(do0, do1, do2, v0, v1, v2, V1, V2, PRECISION)
            num += tl.sum(p * dp, 1)
            r += tl.where(t == 0, tl.sum(p, 1), 0.0)  # Σ_j p_ij once, not once per tile
    BST += b * 3 * C
    tl.store(BST + offs_m, m_i, mask=offs_m < C)
    tl.store(BST + C + offs_m, lo + tl.log(r), mask=offs_m < C)
    tl.store(BST + 2 * C + offs_m, num / r, mask=offs_m < C)


@autotune(BWD_SPACE, ["C", "L", "N_TILES", "TV"], "bwd")
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
    m_i = tl.load(BST + offs_m, mask=offs_m < C, other=0.0)
    lo = tl.load(BST + C + offs_m, mask=offs_m < C, other=0.0)
    delta = tl.load(BST + 2 * C + offs_m, mask=offs_m < C, other=0.0)
    q0, q1, q2 = _pieces(Q, offs_m, C, L, sqc, sql, K0, K1, K2)
    acc0 = tl.zeros((BLOCK_M, K0), dtype=tl.float32)
    if K1 > 0:
        acc1 = tl.zeros((BLOCK_M, K1), dtype=tl.float32)
    if K2 > 0:
        acc2 = tl.zeros((BLOCK_M, K2), dtype=tl.float32)
    for t in range(N_TILES):
        do0, do1, do2 = _tile_pieces(DO, offs_m, C, t, sdc, sdl, V0, V1, V2)
        delta_t = tl.where(t == 0, delta, 0.0)
        for n0 in tl.range(0, C, BLOCK_N, num_stages=STAGES):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            k0, k1, k2 = _pieces(K, offs_n, C, L, skc, skl, K0, K1, K2)
            v0, v1, v2 = _tile_pieces(V, offs_n, C, t, svc, svl, V0, V1, V2)
            # -- recompute p, then this tile's share of scale · ds
            s = _dot_t(q0, q1, q2, k0, k1, k2, K1, K2, PRECISION) * scale
            valid = (offs_m[:, None] < C) & (offs_n[None, :] < C)
            p = probs(s, m_i[:, None], lo[:, None], valid)
            dp = _dot_t(do0, do1, do2, v0, v1, v2, V1, V2, PRECISION)
            ds = (p * (dp - delta_t[:, None]) * scale).to(k0.dtype)
            # -- dQ_i += ds k_j, piece by piece
            acc0 = tl.dot(ds, k0, acc0, input_precision=PRECISION)
            if K1 > 0:
                acc1 = tl.dot(ds, k1, acc1, input_precision=PRECISION)
            if K2 > 0:
                acc2 = tl.dot(ds, k2, acc2, input_precision=PRECISION)
    _store_rows(DQ, acc0, offs_m, C, 0, K0, L_OUT, sgc, sgl)
    if K1 > 0:
        _store_rows(DQ, acc1, offs_m, C, K0, K1, L_OUT, sgc, sgl)
    if K2 > 0:
        _store_rows(DQ, acc2, offs_m, C, K0 + K1, K2, L_OUT, sgc, sgl)


@autotune(BWD_SPACE, ["C", "L", "N_TILES", "TV"], "bwd")
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
    k0, k1, k2 = _pieces(K, offs_n, C, L, skc, skl, K0, K1, K2)
    acc0 = tl.zeros((BLOCK_M, K0), dtype=tl.float32)
    if K1 > 0:
        acc1 = tl.zeros((BLOCK_M, K1), dtype=tl.float32)
    if K2 > 0:
        acc2 = tl.zeros((BLOCK_M, K2), dtype=tl.float32)
    for t in range(N_TILES):
        v0, v1, v2 = _tile_pieces(V, offs_n, C, t, svc, svl, V0, V1, V2)
        for m0 in tl.range(0, C, BLOCK_N, num_stages=STAGES):
            offs_m = m0 + tl.arange(0, BLOCK_N)
            m_i = tl.load(BST + offs_m, mask=offs_m < C, other=0.0)
            lo = tl.load(BST + C + offs_m, mask=offs_m < C, other=0.0)
            delta = tl.load(BST + 2 * C + offs_m, mask=(offs_m < C) & (t == 0), other=0.0)
            q0, q1, q2 = _pieces(Q, offs_m, C, L, sqc, sql, K0, K1, K2)
            do0, do1, do2 = _tile_pieces(DO, offs_m, C, t, sdc, sdl, V0, V1, V2)
            # -- pᵀ and dpᵀ, then scale · dsᵀ
            st = _dot_t(k0, k1, k2, q0, q1, q2, K1, K2, PRECISION) * scale
            valid = (offs_n[:, None] < C) & (offs_m[None, :] < C)
            pt = probs(st, m_i[None, :], lo[None, :], valid)
            dpt = _dot_t(v0, v1, v2, do0, do1, do2, V1, V2, PRECISION)
            dst = (pt * (dpt - delta[None, :]) * scale).to(q0.dtype)
            # -- dK_j += dsᵀ q_i
            acc0 = tl.dot(dst, q0, acc0, input_precision=PRECISION)
            if K1 > 0:
                acc1 = tl.dot(dst, q1, acc1, input_precision=PRECISION)
            if K2 > 0:
                acc2 = tl.dot(dst, q2, acc2, input_precision=PRECISION)
    _store_rows(DK, acc0, offs_n, C, 0, K0, L_OUT, sgc, sgl)
    if K1 > 0:
        _store_rows(DK, acc1, offs_n, C, K0, K1, L_OUT, sgc, sgl)
    if K2 > 0:
        _store_rows(DK, acc2, offs_n, C, K0 + K1, K2, L_OUT, sgc, sgl)


@autotune(FWD_SPACE, ["C", "L", "N_TILES", "TV"], "fwd")
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
    k0, k1, k2 = _pieces(K, offs_n, C, L, skc, skl, K0, K1, K2)
    acc0 = tl.zeros((BLOCK_M, V0), dtype=tl.float32)
    if V1 > 0:
        acc1 = tl.zeros((BLOCK_M, V1), dtype=tl.float32)
    if V2 > 0:
        acc2 = tl.zeros((BLOCK_M, V2), dtype=tl.float32)
    for m0 in tl.range(0, C, BLOCK_N, num_stages=STAGES):
        offs_m = m0 + tl.arange(0, BLOCK_N)
        m_i = tl.load(BST + offs_m, mask=offs_m < C, other=0.0)
        lo = tl.load(BST + C + offs_m, mask=offs_m < C, other=0.0)
        q0, q1, q2 = _pieces(Q, offs_m, C, L, sqc, sql, K0, K1, K2)
        do0, do1, do2 = _tile_pieces(DO, offs_m, C, t, sdc, sdl, V0, V1, V2)
        # -- pᵀ from rows i's statistics, then dV_j[t] += pᵀ do_i[t]
        st = _dot_t(k0, k1, k2, q0, q1, q2, K1, K2, PRECISION) * scale
        valid = (offs_n[:, None] < C) & (offs_m[None, :] < C)
        pt = probs(st, m_i[None, :], lo[None, :], valid).to(do0.dtype)
        acc0 = tl.dot(pt, do0, acc0, input_precision=PRECISION)
        if V1 > 0:
            acc1 = tl.dot(pt, do1, acc1, input_precision=PRECISION)
        if V2 > 0:
            acc2 = tl.dot(pt, do2, acc2, input_precision=PRECISION)
    # -- tile t is columns t·TV .. (t+1)·TV of dV's own (unpadded) width LV
    d0 = t * TV
    d_end = tl.minimum(d0 + TV, LV)
    _store_rows(DV, acc0, offs_n, C, d0, V0, d_end, sgc, sgl)
    if V1 > 0:
        _store_rows(DV, acc1, offs_n, C, d0 + V0, V1, d_end, sgc, sgl)
    if V2 > 0:
        _store_rows(DV, acc2, offs_n, C, d0 + V0 + V1, V2, d_end, sgc, sgl)


# ----------------------------------------------------------------------------------------------
# Launchers (plain functions on real tensors)


def _check_length(length: int) -> None:
    if length > MAX_LENGTH:
        raise ValueError(
            f"fgattn's flash-shaped Triton kernels keep a whole row of q (L = H·W) in one program "
            f"and take L <= {MAX_LENGTH}, got L = {length}; use backend='triton' (or 'auto') there"
        )


def _aligned(x: torch.Tensor, tiles: int, tile: int, width: int) -> torch.Tensor:
    """x (B, C, ≤ tiles·tile) as (B, C, tiles·width): each `tile`-wide column tile zero-padded to
    `width` (a multiple of 16), contiguous, so every row starts 16-byte aligned. No copy where x
    already is that."""
    length = x.shape[2]
    if tiles == 1 and length == width and x.is_contiguous() and x.data_ptr() % 16 == 0:
        return x
    x = F.pad(x, (0, tiles * tile - length)).unflatten(2, (tiles, tile))
    return F.pad(x, (0, width - tile)).flatten(2).contiguous()


def _forward_unguarded(q, k, v, scale: float, tf32: bool, is_self: bool):
    check_device(q, k, v)
    bsz, c, length = q.shape
    lv = v.shape[2]
    _check_length(length)
    n_tiles = 1 if is_self else triton.cdiv(lv, MAX_LENGTH)  # column tiles of v, ≤ 256 wide
    tv = triton.cdiv(lv, n_tiles)
    kp = pieces(length)
    vp = kp if is_self else pieces(tv)
    q = _aligned(q, 1, length, sum(kp))
    k = q if is_self else _aligned(k, 1, length, sum(kp))
    v = q if is_self else _aligned(v, n_tiles, tv, sum(vp))
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


def _forward(q, k, v, scale: float, tf32: bool, is_self: bool = False):
    with device_guard(q):
        return _forward_unguarded(q, k, v, scale, tf32, is_self)


def _backward_self_unguarded(do, x, stats, scale: float, tf32: bool):
    check_device(do, x)
    bsz, c, length = x.shape
    kp = pieces(length)
    prec = precision(x, tf32)
    dx = torch.empty((bsz, c, length), device=x.device, dtype=x.dtype)
    x, do = _aligned(x, 1, length, sum(kp)), _aligned(do, 1, length, sum(kp))
    bst = torch.empty((bsz, 3, c), device=x.device, dtype=torch.float32)

    def grid(meta):
        return (triton.cdiv(c, meta["BLOCK_M"]), bsz)

    _bwd_delta_self_kernel[grid](
        x, do, stats, bst, c, sum(kp), scale, *x.stride(), *do.stride(),
        K0=kp[0], K1=kp[1], K2=kp[2], PRECISION=prec,
    )  # fmt: skip
    _bwd_self_kernel[grid](
        x, do, bst, dx, c, sum(kp), length, scale, *x.stride(), *do.stride(), *dx.stride(),
        K0=kp[0], K1=kp[1], K2=kp[2], PRECISION=prec,
    )  # fmt: skip
    return dx


def _backward_self(do, x, stats, scale: float, tf32: bool):
    with device_guard(x):
        return _backward_self_unguarded(do, x, stats, scale, tf32)


def _backward_cross_unguarded(do, q, k, v, stats, scale: float, tf32: bool):
    check_device(do, q, k, v)
    bsz, c, length = q.shape
    lv = v.shape[2]
    n_tiles = triton.cdiv(lv, MAX_LENGTH)  # column tiles of v and do, as in the forward
    tv = triton.cdiv(lv, n_tiles)
    kp, vp = pieces(length), pieces(tv)
    prec = precision(q, tf32)
    dq, dk, dv = (torch.empty(x.shape, device=x.device, dtype=x.dtype) for x in (q, k, v))
    q, k = (_aligned(x, 1, length, sum(kp)) for x in (q, k))
    v, do = (_aligned(x, n_tiles, tv, sum(vp)) for x in (v, do))
    bst = torch.empty((bsz, 3, c), device=q.device, dtype=torch.float32)
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
    shapes = {"K0": kp[0], "K1": kp[1], "K2": kp[2], "V0": vp[0], "V1": vp[1], "V2": vp[2]}

    def grid(meta):
        return (triton.cdiv(c, meta["BLOCK_M"]), bsz)

    _bwd_delta_cross_kernel[grid](
        q, k, v, do, stats, bst, c, sum(kp), n_tiles, tv, scale, *strides,
        **shapes, PRECISION=prec,
    )  # fmt: skip
    _bwd_dq_kernel[grid](
        q, k, v, do, bst, dq, c, sum(kp), length, n_tiles, tv, scale, *strides, *dq.stride(),
        **shapes, PRECISION=prec,
    )  # fmt: skip
    _bwd_dk_kernel[grid](
        q, k, v, do, bst, dk, c, sum(kp), length, n_tiles, tv, scale, *strides, *dk.stride(),
        **shapes, PRECISION=prec,
    )  # fmt: skip
    _bwd_dv_kernel[lambda meta: (triton.cdiv(c, meta["BLOCK_M"]), n_tiles, bsz)](
        q, k, do, bst, dv, c, sum(kp), lv, n_tiles, tv, scale,
        *q.stride(), *k.stride(), *do.stride(), *dv.stride(), **shapes, PRECISION=prec,
    )  # fmt: skip
    return dq, dk, dv


def _backward_cross(do, q, k, v, stats, scale: float, tf32: bool):
    with device_guard(q):
        return _backward_cross_unguarded(do, q, k, v, stats, scale, tf32)


# ----------------------------------------------------------------------------------------------
# Custom ops (`fused_op`: schema, fake and autograd) and entry points


def _forward_self(x, scale: float, tf32: bool):
    return _forward(x, x, x, scale, tf32, is_self=True)


flash_channel_attention_fwd, flash_channel_attention_bwd = fused_op(
    "flash_channel_attention", ("q", "k", "v"), _forward, _backward_cross, value=2
)
flash_self_channel_attention_fwd, flash_self_channel_attention_bwd = fused_op(
    "flash_self_channel_attention", ("x",), _forward_self, _backward_self
)


def self_attention(x: torch.Tensor, scale: float, tf32: bool = False) -> torch.Tensor:
    """softmax(scale · x xᵀ) x on (B, C, L), L ≤ 256, with the tied backward."""
    _check_length(x.shape[2])
    return flash_self_channel_attention_fwd(x, scale, tf32)[0]


def channel_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, tf32: bool = False
) -> torch.Tensor:
    """softmax(scale · q kᵀ) v on (B, C, L) q, k (L ≤ 256) and (B, C, Lv) v; v's dtype."""
    _check_length(q.shape[2])
    return flash_channel_attention_fwd(*one_dtype(q, k, v), scale, tf32)[0].to(v.dtype)
