"""How fgattn's Triton kernels are tiled and tuned: config spaces, resource estimates, prunes, the
autotune decorator, TMA loads, and the facts about the GPU they depend on.

- `triton_tiled` picks its tiles by rule (`TILES`, `tile`, `chunk`): no autotuning.
- `triton_flash` and `triton_gram` are autotuned per shape on the user's GPU at first call over
  the spaces `FLASH_SPACES` / `GRAM_SPACES`, pruned by an estimate of each config's shared memory
  and registers (`flash_prune`, `gram_prune`); `DoesNotFit` where no config can run.
  `flash_refusal` and `gram_refusal` state the same facts for a call before anything launches,
  so the dispatcher never offers what the prune would refuse.
- Under the Triton interpreter (``TRITON_INTERPRET=1``, the tests) the prunes keep the configs in
  `INTERPRETER` instead, and `time_config` runs each once rather than timing it.

The estimates are calibrated on compilations for sm_80/sm_90 (`benchmarks/kernel_resources.py`
compiles every kernel without a GPU; figures in benchmarks/README.md).
"""

from __future__ import annotations

import contextvars
import functools

import torch
import triton
import triton.language as tl

from .library import interpreting

# ----------------------------------------------------------------------------------------------
# The GPU


class DoesNotFit(RuntimeError):
    """No config of a kernel suits the GPU and dtype (raised by a prune, at launch)."""


@functools.cache
def _device_shared_memory(index: int) -> int:
    return torch.cuda.get_device_properties(index).shared_memory_per_block_optin


@torch.compiler.assume_constant_result
def shared_memory_limit(device: torch.device) -> int | None:
    """Shared memory one program may use on `device` (bytes); None (no limit) off the GPU."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _device_shared_memory(index)


def target_arch(device: torch.device) -> int | None:
    """The GPU as 10 · major + minor compute capability (80 for an A100, 90 for an H100); None
    off the GPU. `benchmarks/kernel_resources.py` replaces it to compile for other GPUs."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


# fp32 words per thread the register estimates may fill, calibrated on the compiled flash backward
# kernels: at L = 196 (208 columns) their spill-free configs estimate ≤ 184, at L = 256 those
# spilling 8 B 208. The Gram kernels' estimates are counted to the same budget.
REGISTER_BUDGET = 184

# ----------------------------------------------------------------------------------------------
# Autotuning

# The configs the interpreter runs, per family: tests set several (to reach other code paths, or
# to check that the autotuner's choice never changes a result).
INTERPRETER = {
    "flash": [{"BLOCK_M": 16, "BLOCK_N": 16}],
    "gram": [{"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}],
}
INTERPRETER_TMA = False  # whether the interpreter's flash configs load through TMA descriptors


def time_config(kernel_call, quantiles):
    """The autotuners' timer: Triton's own on a GPU. Under the interpreter a config is run once
    and not timed (all tie: the first config the prune kept wins)."""
    if interpreting():
        kernel_call()
        return [0.0 for _ in quantiles]
    from triton.testing import do_bench

    return do_bench(kernel_call, quantiles=quantiles)


def autotuned(configs: list, key: list[str], prune):
    """`triton.autotune` over `configs`, keyed on `key`, pruned by `prune` (an
    early_config_prune), timed by `time_config`."""
    return triton.autotune(
        configs=configs, key=key, prune_configs_by={"early_config_prune": prune},
        do_bench=time_config,
    )  # fmt: skip


def _interpreter_configs(family: str, **extra) -> list:
    return [
        triton.Config(dict(tiles, STAGES=1, **extra), num_warps=4, num_stages=1)
        for tiles in INTERPRETER[family]
    ]


def precision(x: torch.Tensor, tf32: bool) -> str:
    """tl.dot input precision: only matters for fp32 inputs (TF32 tensor cores vs exact fp32)."""
    return "tf32" if (tf32 and x.dtype == torch.float32) else "ieee"


# ----------------------------------------------------------------------------------------------
# triton_tiled: tiles by rule

# Module-level so tests can shrink them to exercise the multi-block and masked paths.
TILES = {
    "block_m": 64,  # rows of the output a program owns
    "block_n": 64,  # columns of the C x C logits a program handles per loop step
    "max_tile": 256,  # widest accumulator (output columns) a program keeps in registers
    "max_chunk": 64,  # widest slice of a reduction over L loaded per tl.dot
}
# The contrastive backward holds ~10 (block_n x block_m) fp32 tiles and two accumulators.
CONTRASTIVE_BWD_TILES = {"block_m": 32, "block_n": 32, "max_tile": 256}
# Shared memory a program stages per unit of (tile width x itemsize), measured on the largest
# kernel (the SCI backward stages two BLOCK_N x tile operands): 144 KiB at tile 256 in fp32.
SMEM_PER_TILE_BYTE = 144


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


def tile(width: int, like: torch.Tensor, max_tile: int | None = None) -> int:
    """Width of an output accumulator tile over `width` columns of tensors like `like`.

    The whole row up to `max_tile` (else the grid splits it), halved until the operand tiles fit the
    GPU's shared memory: 256 fits sm_80/sm_90 in every dtype, while sm_86/sm_89 (~99 KiB per
    block) take 128 in fp32 and sm_75 (64 KiB) less still.
    """
    cap = max_tile or TILES["max_tile"]
    limit = shared_memory_limit(like.device)
    while limit is not None and cap > 16 and SMEM_PER_TILE_BYTE * cap * like.element_size() > limit:
        cap //= 2
    return max(16, min(triton.next_power_of_2(width), cap))


def warps(*tiles: int) -> int:
    return 8 if max(tiles) >= 256 else 4


# ----------------------------------------------------------------------------------------------
# triton_flash: (BLOCK_M resident rows, BLOCK_N streamed rows, num_warps, num_stages)

FLASH_MAX_LENGTH = 256  # the widest row of q a program keeps resident (FA3's largest head dim)
# A kernel whose logits feed a second tl.dot gets Triton's [num_warps, 1] warp layout (16 rows a
# warp), so BLOCK_M = 16 · num_warps there: fewer rows hold every row twice. 32-row configs are for
# GPUs with little shared memory per block (sm_75's 64 KiB). Per kernel kind (see flash_estimate):
FLASH_SPACES = {
    "fwd": [
        (128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 3), (128, 128, 8, 2),
        (64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 3), (64, 32, 4, 2),
        (32, 32, 2, 1), (32, 16, 2, 1),
    ],
    # the δ passes: no product feeds another
    "delta": [
        (64, 64, 8, 2), (64, 32, 8, 2), (64, 32, 4, 2), (128, 32, 8, 2), (64, 32, 8, 1),
        (32, 32, 4, 2), (32, 16, 4, 1), (16, 16, 4, 1),
    ],
    # the tied backward streams 16 rows at a time (32 and 64 spilled)
    "bwd": [(128, 16, 8, 2), (128, 16, 8, 3), (64, 16, 4, 2), (64, 16, 4, 3), (32, 16, 2, 2)],
    # the contrastive statistics and row sums; (64, 16, ...) keeps 64-row tiles on sm_80 at L = 256
    "cstats": [
        (64, 64, 8, 2), (64, 32, 8, 2), (64, 32, 8, 3), (128, 32, 8, 2), (64, 32, 4, 2),
        (64, 16, 8, 2), (32, 32, 4, 1), (32, 16, 4, 1),
    ],
    # the contrastive forward: on sm_80 4-warp steps of 32 rows spilled 8 B, 1-stage ones 16 B
    "cfwd": [(128, 32, 8, 2), (128, 16, 8, 2), (128, 16, 8, 3), (64, 16, 4, 2), (64, 16, 4, 3)],
    "cbwd": [(128, 16, 8, 2), (128, 16, 8, 3), (64, 16, 4, 2), (64, 16, 4, 3), (32, 16, 2, 2)],
}  # fmt: skip
# Kinds whose logits feed a second product (their configs must suit the GPU's MMA: `_suits`).
CHAINED = ("fwd", "bwd", "cfwd", "cbwd")
# Triton keeps the allocator on-device descriptors need in a ContextVar from 3.5 on (a module
# global in 3.4), so `launch` can set one for its own launch only: TMA configs from 3.5 on.
TMA_TRITON = tuple(int(part) for part in triton.__version__.split(".")[:2]) >= (3, 5)
FP32_REFUSED = (
    "fgattn's flash-shaped Triton kernels do not run fp32 inputs (exact or TF32) on a GPU: every "
    "backward config spilled registers. Use backend='triton_tiled' (or 'auto'), or pass bf16/fp16 "
    "inputs"
)


def flash_configs(kind: str, tma: bool = False) -> list:
    """A triton.Config per (BLOCK_M, BLOCK_N, num_warps, num_stages) of `kind`'s space; with
    `tma`, each twice: streamed tiles loaded through masked pointers (cp.async) and through
    on-device TMA descriptors (USE_TMA), for the autotuner to choose between on the user's GPU."""
    loads = [{"USE_TMA": False}, {"USE_TMA": True}] if tma else [{}]
    return [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "STAGES": st, **load}, num_warps=w, num_stages=st
        )
        for bm, bn, w, st in FLASH_SPACES[kind]
        for load in loads
    ]


def flash_autotune(kind: str, key: list[str], tma: bool = False):
    """`autotuned` over `kind`'s configs, keyed on `key`, pruned by `flash_prune(kind)`; with
    `tma` (a kernel with a `USE_TMA` constexpr) each config also with TMA loads, kept only where
    `tma_available` (see `with_tma`)."""
    prune = with_tma(flash_prune(kind)) if tma else flash_prune(kind)
    return autotuned(flash_configs(kind, tma), key, prune)


def flash_estimate(
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
    TF32 gets a 25 % margin on shared memory (compiled TF32 configs staged up to 1.21x the plain
    estimate; fp16/bf16 and exact fp32 at most 1.0x). The register side is calibrated on the
    backward kernels in bf16 (`REGISTER_BUDGET`).
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


def _flash_need(kind: str, cfg, lk: int, lv: int, size: int):
    k = cfg.kwargs
    return flash_estimate(
        kind, k["BLOCK_M"], k["BLOCK_N"], cfg.num_warps, k["STAGES"], lk, lv, size
    )


def _suits(kind: str, cfg, arch: int | None) -> bool:
    """Whether a config of a kernel with chained products suits the GPU's matrix instructions, as
    compiled (bf16, L = 49, 196 and 256): with mma.sync (sm_80/86/89) 8-warp tiles spilled
    8 B-4 KB; on sm_90 (wgmma) the backward's 128-row, 8-warp tiles stayed spill-free where its
    64-row, 4-warp ones spilled 32-190 B."""
    if arch is None or kind not in CHAINED:
        return True
    if arch < 90:
        return cfg.num_warps <= 4
    return kind in ("fwd", "cfwd") or cfg.kwargs["BLOCK_M"] >= 128


def fp32_refusal(dtype: torch.dtype) -> str | None:
    """`FP32_REFUSED` for fp32 off the interpreter (the flash kernels' tests check fp32 numerics
    under it), else None."""
    return FP32_REFUSED if dtype == torch.float32 and not interpreting() else None


def flash_refusal(kind: str, dtype: torch.dtype, device: torch.device, lk: int, lv: int):
    """Why a `kind` kernel cannot run rows of `lk` (values `lv`) `dtype` elements on `device`,
    or None: fp32 inputs off the interpreter (exact or TF32: every backward config compiled
    spilled registers, exact fp32's tl.dot runs on the FMA units with whole rows of L in
    registers: 2-17 KB; TF32: 0.4-1.2 KB), or no config fitting the GPU's shared memory."""
    refusal = fp32_refusal(dtype)
    if refusal:
        return refusal
    limit = shared_memory_limit(device)
    smallest = _flash_smallest(kind, lk, lv, dtype.itemsize)
    if limit is not None and smallest > limit:
        return (
            f"fgattn's flash-shaped Triton kernels need at least {smallest / 1024:.0f} KiB of "
            f"shared memory per block for rows of {lk} {dtype} values; this GPU allows "
            f"{limit / 1024:.0f} KiB. Use backend='triton_tiled' (or 'auto') for this call"
        )
    return None


_SMALLEST: dict[tuple, float] = {}


@torch.compiler.assume_constant_result
def _flash_smallest(kind: str, lk: int, lv: int, size: int) -> float:
    """The shared memory of `kind`'s smallest config (kept per shape)."""
    key = ("flash", kind, lk, lv, size)
    if key not in _SMALLEST:
        _SMALLEST[key] = min(_flash_need(kind, cfg, lk, lv, size)[0] for cfg in flash_configs(kind))
    return _SMALLEST[key]


def flash_prune(kind: str):
    """An early_config_prune for `kind` (see `flash_estimate`): `DoesNotFit` where
    `flash_refusal` says so; else the configs whose shared memory fits the device's (any, off the
    GPU) and that `_suits` its GPU; of those, the ones within `REGISTER_BUDGET`, only the ≥ 64-row
    ones where any is; where none is, the one needing the fewest registers (of those, the widest
    on sm_90, the narrowest with mma.sync). Under the interpreter, `INTERPRETER["flash"]`."""

    def prune(configs, named_args, **kwargs):
        if interpreting():
            return _interpreter_configs("flash")
        x = next(t for t in named_args.values() if isinstance(t, torch.Tensor))
        lk = kwargs["K0"] + kwargs["K1"] + kwargs["K2"]
        is_self = kwargs.get("IS_SELF", "V0" not in kwargs)  # the cross backward: v's pieces
        lv = 0 if is_self else kwargs["V0"] + kwargs["V1"] + kwargs["V2"]
        refusal = flash_refusal(kind, x.dtype, x.device, lk, lv)
        if refusal:
            raise DoesNotFit(refusal)
        limit, arch = shared_memory_limit(x.device), target_arch(x.device)

        def need(cfg):
            return _flash_need(kind, cfg, lk, lv, x.element_size())

        room = [cfg for cfg in configs if limit is None or need(cfg)[0] <= limit]
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
# TMA loads (triton_flash's forward kernels)


def tma_available() -> bool:
    """Whether a launch now may load through on-device TMA descriptors
    (`tl.make_tensor_descriptor`): under the interpreter wherever Triton has them (3.4 on); on a
    GPU with Triton ≥ 3.5 (`TMA_TRITON`) when the target of Triton's active driver is an NVIDIA
    GPU of compute capability ≥ 9.0 (Hopper's TMA unit; earlier GPUs keep cp.async)."""
    if interpreting():
        return hasattr(tl, "make_tensor_descriptor")
    if not TMA_TRITON:
        return False
    target = triton.runtime.driver.active.get_current_target()
    return target.backend == "cuda" and target.arch >= 90


def with_tma(prune):
    """`prune` for a kernel whose configs have a USE_TMA axis: the TMA configs dropped first where
    not `tma_available()`; under the interpreter `prune`'s configs, loading through descriptors
    if `INTERPRETER_TMA` (and the interpreter has them)."""

    def pruned(configs, named_args, **kwargs):
        if interpreting():
            use = INTERPRETER_TMA and tma_available()
            return _interpreter_configs("flash", USE_TMA=use)
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


# ----------------------------------------------------------------------------------------------
# triton_gram: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)

# Square BLOCK_M x BLOCK_N tiles of S for the symmetric kernels (the transpose of a tile is a
# tile), a K-loop over L (or C, for P·V) in BLOCK_K steps. Per kernel kind (see gram_estimate):
GRAM_SPACES = {
    "gram": [
        (128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 128, 64, 8, 2), (64, 64, 64, 4, 3),
        (64, 64, 32, 4, 4), (32, 32, 32, 4, 2),
    ],
    "pv": [
        (128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 64, 64, 8, 3), (128, 64, 64, 4, 3),
        (64, 128, 64, 4, 3), (64, 64, 64, 4, 3), (32, 32, 32, 4, 2),
    ],
    # three fp32 accumulators (S, dP, dPᵀ) per tile: 128 x 128 does not fit the registers
    "sym_bwd": [
        (64, 64, 64, 4, 3), (64, 64, 32, 4, 4), (64, 64, 64, 8, 3), (128, 128, 32, 8, 2),
        (32, 32, 32, 4, 2),
    ],
    # two fp32 accumulators (S, dP), filled by two K-loops (over L, then Lv)
    "cross_bwd": [
        (128, 128, 64, 8, 3), (128, 64, 64, 8, 3), (128, 64, 32, 4, 3), (64, 128, 64, 8, 3),
        (64, 64, 64, 4, 3), (32, 32, 32, 4, 2),
    ],
}  # fmt: skip
GRAM_MIN_BLOCK = 16  # the narrowest column block: partial-result buffers have C / 16 slots
# The argument whose dtype the operand tiles have (the P·V kernel's first tensor is the fp32 S).
GRAM_OPERAND = {"gram": "Q", "pv": "V", "sym_bwd": "X", "cross_bwd": "Q"}


def gram_configs(kind: str) -> list:
    return [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "STAGES": st}, num_warps=w, num_stages=st
        )
        for bm, bn, bk, w, st in GRAM_SPACES[kind]
    ]


def gram_autotune(kind: str, key: list[str]):
    """`autotuned` over `kind`'s configs, keyed on `key`, pruned by `gram_prune(kind)`."""
    return autotuned(gram_configs(kind), key, gram_prune(kind))


def gram_estimate(kind: str, bm: int, bn: int, bk: int, warps: int, stages: int, size: int):
    """(shared bytes, fp32 words per thread) a config needs.

    Shared memory: "gram", a (bm x bk) and a (bn x bk) operand per stage and the (bm x bn) fp32
    tile staged once for the transposed store; "pv", an fp32 (bm x bk) S tile and a (bk x bn) v
    tile per stage, p converted once; "sym_bwd", four operands per stage (x and dO, rows I and J)
    and two fp32 tiles for the transposed stores; "cross_bwd", a q and a k (then dO and v)
    operand per stage. Registers: the fp32 (bm x bn) tiles live at once, counted from sm_90 bf16
    compilations at L = 784, where configs within `REGISTER_BUDGET` by this count did not spill:
    "gram" 2 (accumulator, exp), "pv" the accumulator and the (bm x bk) s tile, "sym_bwd" 4 (S,
    dP, dPᵀ accumulators, p), "cross_bwd" 2. Both overestimate: 128 x 128 tiles in bf16 took
    96 KiB (estimated 160) and 174 registers per thread in the symmetric Gram kernel.
    """
    if kind == "gram":
        smem = stages * (bm + bn) * bk * size + bm * bn * 4
        words = 2 * bm * bn
    elif kind == "pv":
        smem = stages * (bm * bk * 4 + bk * bn * size) + bm * bk * size
        words = bm * bn + bm * bk
    elif kind == "cross_bwd":
        smem = stages * (bm + bn) * bk * size
        words = 2 * bm * bn
    else:
        smem = stages * 2 * (bm + bn) * bk * size + 2 * bm * bn * 4
        words = 4 * bm * bn
    return smem, words / (32 * warps)


def _gram_need(kind: str, cfg, size: int):
    k = cfg.kwargs
    return gram_estimate(
        kind, k["BLOCK_M"], k["BLOCK_N"], k["BLOCK_K"], cfg.num_warps, k["STAGES"], size
    )


def gram_refusal(kind: str, dtype: torch.dtype, device: torch.device):
    """Why a `kind` kernel cannot run `dtype` on `device`, or None: no config fits the GPU's
    shared memory."""
    limit = shared_memory_limit(device)
    smallest = _gram_smallest(kind, dtype.itemsize)
    if limit is not None and smallest > limit:
        return (
            f"fgattn's Gram kernels need at least {smallest / 1024:.0f} KiB of shared memory per "
            f"block for {dtype}; this GPU allows {limit / 1024:.0f} KiB. Use "
            f"backend='triton_tiled' (or 'auto') for this call"
        )
    return None


@torch.compiler.assume_constant_result
def _gram_smallest(kind: str, size: int) -> float:
    """The shared memory of `kind`'s smallest config (kept per dtype size)."""
    key = ("gram", kind, size)
    if key not in _SMALLEST:
        _SMALLEST[key] = min(_gram_need(kind, cfg, size)[0] for cfg in gram_configs(kind))
    return _SMALLEST[key]


def gram_prune(kind: str):
    """An early_config_prune for `kind` (see `gram_estimate`): the configs that fit the device's
    shared memory (any, off the GPU) and `REGISTER_BUDGET`, only the ≥ 64-row ones where any fits;
    else the one needing the least shared memory; `DoesNotFit` where `gram_refusal` says so.
    Under the interpreter, `INTERPRETER["gram"]`."""

    def prune(configs, named_args, **kwargs):
        if interpreting():
            return _interpreter_configs("gram")
        x = named_args[GRAM_OPERAND[kind]]
        refusal = gram_refusal(kind, x.dtype, x.device)
        if refusal:
            raise DoesNotFit(refusal)
        limit = shared_memory_limit(x.device)

        def need(cfg):
            return _gram_need(kind, cfg, x.element_size())

        kept = [
            cfg
            for cfg in configs
            if (limit is None or need(cfg)[0] <= limit) and need(cfg)[1] <= REGISTER_BUDGET
        ]
        # 64-row tiles get Hopper's warpgroup MMA; narrower ones only where nothing else fits
        wide = [cfg for cfg in kept if cfg.kwargs["BLOCK_M"] >= 64]
        return wide or kept or [min(configs, key=lambda cfg: need(cfg)[0])]

    return prune
