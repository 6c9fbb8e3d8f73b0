"""The "triton_flash" kernels (`fgattn/ops/triton/flash.py`): what is specific to the family, its
rows as power-of-two pieces, its config spaces and their prune (`tuning.flash_prune`), its tiles
under the interpreter, and where the dispatcher offers it. Numbers against the fp64 reference:
tests/test_conformance.py; TMA loads: tests/test_triton_tma.py; op registration:
tests/test_triton_ops.py.

Without CUDA the kernels run in Triton's CPU interpreter, where the autotuner is pruned to the
configs in `tuning.INTERPRETER["flash"]`; the `tiles` fixture runs cases with several.
"""

import pytest
import torch
from _kernels import interpreter_configs
from _numerics import DEVICE, check_against_fp64, close, randn

pytest.importorskip("triton")

from fgattn import backends
from fgattn.functional import channel_attention
from fgattn.ops import benchmark, registry
from fgattn.ops.call import Call, describe
from fgattn.ops.rules import LAST_RESORT, RULES, rule_for
from fgattn.ops.triton import flash, tiled, tuning

INTERPRETED = DEVICE == "cpu"
# flash kernels refuse fp32 on a GPU: the numerics below run bf16 there
DTYPE = torch.float32 if INTERPRETED else torch.bfloat16


@pytest.fixture(params=[(16, 16), (32, 16), (16, 64)], ids=lambda t: f"tiles{t[0]}x{t[1]}")
def tiles(request, monkeypatch):
    """The interpreter's config: resident rows x streamed rows (several blocks at C = 40)."""
    bm, bn = request.param
    with interpreter_configs(monkeypatch, flash, "flash", {"BLOCK_M": bm, "BLOCK_N": bn}):
        yield request.param


def check(op, inputs, scale=-1.0):
    """`check_against_fp64` of "triton_flash", its (B, C, L) inputs in `DTYPE`."""
    inputs = [t.to(DTYPE) if t.dim() == 3 else t for t in inputs]
    check_against_fp64(op, "triton_flash", inputs, scale)


# ---------------------------------------------------------------------------------------------
# Pieces and pruning


@pytest.mark.parametrize(
    ("width", "want"),
    [
        (196, (128, 64, 16)),  # 208 columns, not 256
        (49, (64, 0, 0)),
        (5, (16, 0, 0)),
        (176, (128, 32, 16)),
        (240, (256, 0, 0)),  # 128 + 64 + 32 + 16 would be four pieces
        (256, (256, 0, 0)),
        (200, (128, 64, 16)),
    ],
)
def test_pieces(width, want):
    got = flash.pieces(width)
    assert got == want
    assert sum(got) >= width and sum(got) % 16 == 0


def _prune(kind, limit, dtype, width, monkeypatch, is_self=True, arch=None, tf32=False):
    """What `flash_prune` keeps of a kind's space on a GPU with `limit` bytes of shared memory and
    compute capability `arch`, and their estimates."""
    monkeypatch.setattr(tuning, "interpreting", lambda: False)
    monkeypatch.setattr(tuning, "shared_memory_limit", lambda device: limit)
    monkeypatch.setattr(tuning, "target_arch", lambda device: arch)
    kp = flash.pieces(width)
    kwargs = dict(K0=kp[0], K1=kp[1], K2=kp[2], V0=kp[0], V1=kp[1], V2=kp[2], IS_SELF=is_self)
    kwargs["PRECISION"] = "tf32" if tf32 else "ieee"
    x = torch.empty(0, dtype=dtype)
    kept = tuning.flash_prune(kind)(tuning.flash_configs(kind), {"X": x}, **kwargs)
    estimates = [
        tuning.flash_estimate(kind, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps,
                              c.kwargs["STAGES"], sum(kp), 0 if is_self else sum(kp),
                              x.element_size())
        for c in kept
    ]  # fmt: skip
    return kept, estimates


GPUS = {"sm_90": (227 * 1024, 90), "sm_80": (163 * 1024, 80), "sm_86": (99 * 1024, 86)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gpu", list(GPUS))
@pytest.mark.parametrize("kind", list(tuning.FLASH_SPACES))
def test_prune_keeps_configs_that_fit(kind, gpu, dtype, monkeypatch):
    limit, arch = GPUS[gpu]
    kept, estimates = _prune(kind, limit, dtype, 196, monkeypatch, kind != "fwd", arch)
    assert kept
    for smem, words in estimates:
        assert smem <= limit and words <= tuning.REGISTER_BUDGET
    if limit >= 163 * 1024:  # wgmma needs 64-row tiles on sm_90
        assert all(c.kwargs["BLOCK_M"] >= 64 for c in kept)


@pytest.mark.parametrize("kind", tuning.CHAINED)
def test_chained_dots_get_16_rows_a_warp(kind):
    # Triton lays out a tl.dot whose result feeds another as [num_warps, 1] warps of 16 rows:
    # fewer rows than 16 per warp would be held (and multiplied) twice
    for bm, _, warps, _ in tuning.FLASH_SPACES[kind]:
        assert bm == 16 * warps


@pytest.mark.parametrize("kind", ["fwd", "cfwd", "bwd", "cbwd"])
def test_chained_kernels_configs_suit_the_gpu(kind, monkeypatch):
    # compiled (bf16, L = 196 / 256): mma.sync spilled at 8 warps; wgmma spilled in the backward
    # with one warpgroup of 64 rows, not with two of 128
    ampere, _ = _prune(kind, 163 * 1024, torch.bfloat16, 196, monkeypatch, arch=80)
    assert ampere and all(c.num_warps <= 4 for c in ampere)
    hopper, _ = _prune(kind, 227 * 1024, torch.bfloat16, 196, monkeypatch, arch=90)
    assert {c.num_warps for c in hopper} == {4, 8} or kind in ("bwd", "cbwd")
    if kind in ("bwd", "cbwd"):
        assert hopper and all(c.kwargs["BLOCK_M"] == 128 and c.num_warps == 8 for c in hopper)
        anywhere, _ = _prune(kind, 227 * 1024, torch.bfloat16, 196, monkeypatch, arch=None)
        assert {c.num_warps for c in anywhere} > {4}


def test_register_budget_drops_what_spilled(monkeypatch):
    # bf16 contrastive backward: its two 128-row configs were spill-free on sm_90 at L = 196 (208
    # columns); at L = 256 those do not fit, the 64-row ones spilled 168-176 B (sm_80 and sm_90),
    # the 32-row ones 8 B on sm_90 (mma.sync) and none on sm_80
    at_196, estimates = _prune("cbwd", 227 * 1024, torch.bfloat16, 196, monkeypatch, arch=90)
    assert len(at_196) == 2 and max(words for _, words in estimates) <= tuning.REGISTER_BUDGET
    for arch, limit, rows in ((90, 227 * 1024, 64), (80, 163 * 1024, 32)):
        kept, ((_, words),) = _prune("cbwd", limit, torch.bfloat16, 256, monkeypatch, True, arch)
        assert words > tuning.REGISTER_BUDGET  # none within: one config, the fewest registers
        assert [c.kwargs["BLOCK_M"] for c in kept] == [rows]


@pytest.mark.parametrize("tf32", [False, True])
@pytest.mark.parametrize("kind", list(tuning.FLASH_SPACES))
def test_fp32_is_refused(kind, tf32, monkeypatch):
    with pytest.raises(
        tuning.DoesNotFit, match=r"fp32 inputs \(exact or TF32\).*backend='triton_tiled'"
    ):
        _prune(kind, 227 * 1024, torch.float32, 196, monkeypatch, arch=90, tf32=tf32)


def test_prune_refuses_what_cannot_fit(monkeypatch):
    # 64 KiB (sm_75), bf16 contrastive backward: three resident and three streamed rows of 208
    # values do not fit at all: a clear error, not "out of resources" at launch
    with pytest.raises(tuning.DoesNotFit, match=r"this GPU allows 64 KiB.*'triton_tiled'"):
        _prune("cbwd", 64 * 1024, torch.bfloat16, 196, monkeypatch, arch=75)


def test_what_the_prune_refuses_the_dispatcher_never_offers(monkeypatch):
    # the same fact, asked before anything launches: a call on a 64 KiB GPU at L = 196 in bf16
    monkeypatch.setattr(tuning, "shared_memory_limit", lambda device: 64 * 1024)
    call = Call("contrastive", "cuda", "cuda:0", (7, 5), torch.float16, 2, 64, 196, 196, True)
    reason = registry.IMPLEMENTATIONS["triton_flash"].why_not(call)
    assert reason is not None and "this GPU allows 64 KiB" in reason
    assert registry.IMPLEMENTATIONS["triton_flash"].supports(call._replace(length=16))


def test_tf32_estimate_has_a_margin():
    # TF32 compilations staged up to 1.21x the plain estimate's shared memory (benchmarks/README)
    plain = tuning.flash_estimate("bwd", 64, 32, 8, 2, 208, 0, 4)
    assert tuning.flash_estimate("bwd", 64, 32, 8, 2, 208, 0, 4, tf32=True) == (
        1.25 * plain[0],
        plain[1],
    )


def test_prune_drops_what_the_device_cannot_hold(monkeypatch):
    wide, _ = _prune("fwd", 227 * 1024, torch.bfloat16, 196, monkeypatch, is_self=False)
    narrow, _ = _prune("fwd", 99 * 1024, torch.bfloat16, 196, monkeypatch, is_self=False)
    assert len(narrow) < len(wide)
    assert {128} <= {c.kwargs["BLOCK_M"] for c in wide}


def test_interpreter_runs_its_configs(monkeypatch):
    monkeypatch.setattr(tuning, "interpreting", lambda: True)
    (config,) = tuning.flash_prune("fwd")(tuning.flash_configs("fwd"), {}, K0=16, K1=0, K2=0)
    (tiles,) = tuning.INTERPRETER["flash"]
    assert {k: config.kwargs[k] for k in tiles} == tiles


# ---------------------------------------------------------------------------------------------
# Numerics at several tiles


@pytest.mark.kernels
@pytest.mark.parametrize(
    ("b", "c", "length", "scale"),
    [(2, 40, 20, -1.0), (3, 33, 49, -1.0), (2, 24, 5, 0.5), (1, 19, 196, -0.05)],
)
def test_self_attention(tiles, b, c, length, scale):
    check("self", [randn(b, c, length)], scale)


@pytest.mark.kernels
@pytest.mark.parametrize(
    ("c", "length", "lv", "scale"),
    [(40, 20, 40, -1.0), (33, 5, 10, 0.3), (17, 49, 300, -1.0), (24, 20, 7, -1.0)],
)
def test_cross_attention(tiles, c, length, lv, scale):
    # lv = 300: two column tiles of v, each 150 wide, padded to 128 + 32
    check("cross", [randn(2, c, length), randn(2, c, length), randn(2, c, lv)], scale)


@pytest.mark.kernels
@pytest.mark.parametrize(
    ("b", "c", "length", "scale"),
    [(2, 40, 20, -1.0), (2, 40, 20, -0.05), (3, 33, 49, 0.1), (2, 17, 5, -0.2), (1, 20, 196, -0.1)],
)
def test_contrastive(tiles, b, c, length, scale):
    eta = torch.rand(b, dtype=torch.float64).float().to(DEVICE) * 1.5
    check("contrastive", [randn(b, c, length), randn(b, c, length), eta], scale)


@pytest.mark.kernels
def test_same_statistics_as_the_tiled_kernels():
    x = randn(2, 40, 49).to(DTYPE)
    out, stats = flash.triton_flash_self_fwd(x, -1.0, False)
    out1, stats1 = tiled.triton_tiled_self_fwd(x, -1.0, False)
    close(out, out1, 1e-5 if INTERPRETED else 1e-2)
    close(stats, stats1, 1e-5 if INTERPRETED else 1e-2)


# ---------------------------------------------------------------------------------------------
# Where the dispatcher offers it


def test_long_rows_are_refused_by_name_and_not_candidates():
    x = randn(2, 8, 257)
    with pytest.raises(ValueError, match=r"backend 'triton_flash' cannot run .*L <= 256"):
        channel_attention(x, backend="triton_flash")
    assert "triton_flash" not in benchmark.candidates(describe("self", x))
    with pytest.raises(ValueError, match=r"L <= 256, got L = 257"):
        flash.self_attention(x, -1.0)


def test_no_rule_prefers_it_until_a_gpu_run_does():
    # Not yet timed on a GPU: `auto` takes it only in benchmark mode.
    assert all("triton_flash" not in rule.prefer for rule in RULES)
    assert "triton_flash" not in LAST_RESORT
    call = Call("self", "cuda", "cuda:0", (9, 0), torch.bfloat16, 32, 2048, 196, 196, True)
    assert tuple(registry.IMPLEMENTATIONS["triton_flash"].functions) == OPS
    assert rule_for(call).prefer[0] != "triton_flash"


OPS = ("self", "cross", "contrastive")


@pytest.mark.kernels
def test_benchmark_mode_times_it_beside_the_others(monkeypatch):
    timed = []

    def fake(impl, call, repeat=5, scale=-1.0):
        timed.append(impl.name)
        return 0.5 if impl.name == "triton_flash" else 1.0

    monkeypatch.setattr(benchmark, "time_call", fake)
    backends.benchmark = True
    x = randn(2, 8, 5).to(DTYPE)
    assert backends.resolve("self", x) == "triton_flash"
    assert {"reference", "triton_tiled", "triton_flash"} <= set(timed)
    with backends.use_backend("triton_flash"):  # and a user can set it globally
        backends.benchmark = False
        assert backends.resolve("self", x) == "triton_flash"
