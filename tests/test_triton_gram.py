"""The "triton_gram" kernels (`fgattn/ops/triton/gram.py`, L > 256): what is specific to the
family, its config spaces and their prune (`tuning.gram_prune`), batch chunks, the partial-result
buffers whose reduction must not depend on the autotuner's choice, its tiles under the
interpreter, and where the dispatcher offers it. Numbers against the fp64 reference:
tests/test_conformance.py; op registration: tests/test_triton_ops.py.

Without CUDA the kernels run in Triton's CPU interpreter, where the autotuner is pruned to the
configs in `tuning.INTERPRETER["gram"]`; the `tiles` fixture runs cases with several. The kernels
take any L, so the numerics run at small L through the module's entry points.
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from _kernels import autotuners, interpreter_configs
from _numerics import DEVICE, close, leaf, randn

pytest.importorskip("triton")

from fgattn import backends
from fgattn.functional import channel_attention
from fgattn.ops import benchmark, reference
from fgattn.ops.call import Call, describe
from fgattn.ops.rules import LAST_RESORT, RULES, rule_for
from fgattn.ops.triton import gram, tiled, tuning

ROOT = Path(__file__).resolve().parents[1]
INTERPRETED = DEVICE == "cpu"


@pytest.fixture(params=[(16, 16), (32, 16), (16, 64)], ids=lambda t: f"tiles{t[0]}x{t[0]}k{t[1]}")
def tiles(request, monkeypatch):
    """The interpreter's config: square BLOCK_M = BLOCK_N tiles, BLOCK_K (several blocks and a
    masked tail at C = 40, L = 49)."""
    block, k = request.param
    config = {"BLOCK_M": block, "BLOCK_N": block, "BLOCK_K": k}
    with interpreter_configs(monkeypatch, gram, "gram", config):
        yield request.param


def gram_attention(*xs, scale=-1.0):
    """The Gram kernels' op: self attention for one tensor, else cross attention."""
    if len(xs) == 1:
        return gram.self_attention(xs[0], scale)
    return gram.cross_attention(*xs, scale)


def check(inputs, scale=-1.0, tol=2e-5, fn=gram_attention, qkv=None):
    """Output and every input gradient of `fn` against the reference on the same (rounded)
    inputs in fp64; self attention when `inputs` is one tensor, else `qkv(*inputs)` (default:
    the inputs themselves) gives the reference's q, k, v."""
    xs = [leaf(t) for t in inputs]
    out = fn(*xs, scale=scale)
    assert out.dtype == inputs[-1].dtype and out.shape == inputs[-1].shape[:2] + out.shape[2:]
    g = torch.randn(out.shape, dtype=torch.float64).to(out.dtype).to(DEVICE)
    grads = torch.autograd.grad(out, xs, g)
    xs64 = [leaf(t.double()) for t in inputs]
    args = xs64 * 3 if len(xs64) == 1 else qkv(*xs64) if qkv else xs64
    ref = reference.cross_attention(*args, scale)
    rgrads = torch.autograd.grad(ref, xs64, g.double())
    close(out, ref, tol)
    for got, want in zip(grads, rgrads, strict=True):
        assert got.dtype == inputs[0].dtype and got.shape == want.shape
        close(got, want, tol)


# ---------------------------------------------------------------------------------------------
# Pruning and chunking


def _prune(kind, limit, dtype, monkeypatch):
    monkeypatch.setattr(tuning, "interpreting", lambda: False)
    monkeypatch.setattr(tuning, "shared_memory_limit", lambda device: limit)
    x = torch.empty(0, dtype=dtype)
    kept = tuning.gram_prune(kind)(tuning.gram_configs(kind), {tuning.GRAM_OPERAND[kind]: x})
    needs = [
        tuning.gram_estimate(kind, *(c.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")),
                             c.num_warps, c.kwargs["STAGES"], x.element_size())
        for c in kept
    ]  # fmt: skip
    return kept, needs


@pytest.mark.parametrize("kind", list(tuning.GRAM_SPACES))
@pytest.mark.parametrize("limit", [227 * 1024, 163 * 1024, 99 * 1024])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_prune_keeps_configs_that_fit(kind, limit, dtype, monkeypatch):
    kept, needs = _prune(kind, limit, dtype, monkeypatch)
    assert kept
    for smem, words in needs:
        assert smem <= limit and words <= tuning.REGISTER_BUDGET
    if kind in ("gram", "sym_bwd"):  # symmetric pairing: the transpose of a tile is a tile
        assert all(c.kwargs["BLOCK_M"] == c.kwargs["BLOCK_N"] for c in kept)
    if limit >= 163 * 1024 and dtype == torch.bfloat16:  # 64-row tiles: wgmma on sm_90
        assert any(c.kwargs["BLOCK_M"] >= 64 for c in kept)


def test_prune_drops_what_the_device_cannot_hold(monkeypatch):
    wide, _ = _prune("gram", 227 * 1024, torch.float32, monkeypatch)
    narrow, _ = _prune("gram", 99 * 1024, torch.float32, monkeypatch)
    assert len(narrow) < len(wide)
    with pytest.raises(tuning.DoesNotFit, match=r"this GPU allows 8 KiB.*'triton_tiled'"):
        _prune("sym_bwd", 8 * 1024, torch.float32, monkeypatch)


def test_interpreter_runs_its_configs(monkeypatch):
    monkeypatch.setattr(tuning, "interpreting", lambda: True)
    (config,) = tuning.gram_prune("gram")(tuning.gram_configs("gram"), {})
    (tiles,) = tuning.INTERPRETER["gram"]
    assert {k: config.kwargs[k] for k in tiles} == tiles


def test_temporaries_stay_within_the_chunk_budget():
    # B = 32, C = 2048: the fp32 S of the forward (16 MiB per element) and the [G | Pᵀ] of the
    # backward (bf16: 16 MiB; fp32: 32 MiB) in chunks of at most 64 MiB, not 512 MiB or more
    c = 2048
    for item in (c * c * 4, 2 * c * c * 2, 2 * c * c * 4):
        n = gram._chunk(32, item)
        assert 1 <= n < 32 and n * item <= gram.CHUNK_BYTES
    assert gram._chunk(3, 10**12) == 1  # larger than the budget: one element at a time
    assert gram._chunk(32, 1) == 32 // gram.MIN_CHUNKS  # small C: still in chunks
    assert gram._chunk(3, 1) == 1


# ---------------------------------------------------------------------------------------------
# Autotuning never changes a result


@pytest.mark.kernels
@pytest.mark.parametrize("op", ["self", "cross"])
def test_the_first_call_of_a_shape_is_right_whichever_block_width_wins(op, monkeypatch):
    # The partial-result buffers have a slot per 16 columns. The autotuner runs every config: a
    # 16-wide one writes three slots of a row at C = 40, a 32-wide one two. When the wider one
    # runs first and wins (its result is the one kept), the buffer must not keep the narrower
    # one's third slot: before, its row sums counted those columns twice on the first call of
    # every new shape (forward statistics, and δ in both backward passes).
    if not INTERPRETED:
        pytest.skip("the interpreter's configs; on a GPU the autotuner times its own")
    wide = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16}
    narrow = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}
    xs = (
        [randn(2, 40, 20)]
        if op == "self"
        else [randn(2, 40, 20), randn(2, 40, 20), randn(2, 40, 9)]
    )
    with interpreter_configs(monkeypatch, gram, "gram", wide, narrow):
        check(xs)  # the first call of this shape: every kernel tunes
        for kernel in autotuners(gram):
            if kernel.cache:  # the kernels this op ran, tuned: the wider config won
                assert {k: kernel.best_config.kwargs[k] for k in wide} == wide, kernel
        check(xs)  # and a cached call


# ---------------------------------------------------------------------------------------------
# Numerics at several tiles


@pytest.mark.kernels
@pytest.mark.parametrize(
    ("b", "c", "length", "scale"),
    [(2, 40, 20, -1.0), (3, 33, 49, -1.0), (2, 24, 5, 0.5), (1, 19, 100, -0.05)],
)
def test_self_attention(tiles, b, c, length, scale):
    check([randn(b, c, length)], scale)


@pytest.mark.kernels
@pytest.mark.parametrize(
    ("c", "length", "lv", "scale"),
    [(40, 20, 40, -1.0), (33, 5, 10, 0.3), (17, 49, 98, -1.0), (24, 20, 7, -1.0)],
)
def test_cross_attention(tiles, c, length, lv, scale):
    check([randn(2, c, length), randn(2, c, length), randn(2, c, lv)], scale)


@pytest.mark.kernels
def test_co_attention_shares_q_and_k():
    # PCA-Net: q = k = X_A, v = [X_A | X_B] (2L wide); dq and dk land in the same tensor
    x, v = randn(2, 33, 49), randn(2, 33, 98)

    def co(x, v, scale):
        return gram_attention(x, x, v, scale=scale)

    check([x, v], fn=co, qkv=lambda x, v: (x, x, v))


@pytest.mark.kernels
@pytest.mark.parametrize("op", ["self", "cross"])
def test_batch_chunks_smaller_than_the_batch(op, monkeypatch):
    # two chunks of two and one of one (S is 24·24·4 bytes per element)
    monkeypatch.setattr(gram, "MIN_CHUNKS", 1)
    monkeypatch.setattr(gram, "CHUNK_BYTES", 2 * 24 * 24 * 4)
    xs = [randn(5, 24, 20)] if op == "self" else [randn(5, 24, 20), randn(5, 24, 20)]
    check(xs if op == "self" else [*xs, randn(5, 24, 40)])
    monkeypatch.setattr(gram, "CHUNK_BYTES", 1)  # one element at a time
    check([randn(3, 24, 20)])


@pytest.mark.kernels
def test_same_statistics_as_the_tiled_kernels():
    # The row statistics [max, log Σ] have triton_tiled's format and values.
    x = randn(2, 40, 49)
    out, stats = gram.triton_gram_self_fwd(x, -1.0, False)
    out1, stats1 = tiled.triton_tiled_self_fwd(x, -1.0, False)
    close(out, out1, 1e-5)
    close(stats, stats1, 1e-5)


# ---------------------------------------------------------------------------------------------
# Where the dispatcher offers it


@pytest.mark.kernels
def test_dispatch_by_name_at_long_rows():
    x = randn(2, 8, 300)
    q, k, v = randn(2, 8, 300), randn(2, 8, 300), randn(2, 8, 600)
    by_name = lambda *xs, scale: channel_attention(*xs, scale=scale, backend="triton_gram")  # noqa: E731
    check([x], fn=by_name)
    check([q, k, v], fn=by_name)
    assert "triton_gram" in benchmark.candidates(describe("self", x))


def test_short_rows_and_contrastive_are_not_its_to_run():
    x = randn(2, 8, 256)
    with pytest.raises(ValueError, match=r"backend 'triton_gram' cannot run .*L >= 257"):
        channel_attention(x, backend="triton_gram")
    assert "triton_gram" not in benchmark.candidates(describe("self", x))
    long = randn(2, 8, 300)
    eta = torch.rand(2, device=DEVICE)
    assert "triton_gram" not in benchmark.candidates(describe("contrastive", long, long, eta))


def test_no_rule_prefers_it_until_a_gpu_run_does():
    assert all("triton_gram" not in rule.prefer for rule in RULES)
    assert "triton_gram" not in LAST_RESORT
    call = Call("self", "cuda", "cuda:0", (9, 0), torch.bfloat16, 32, 2048, 784, 784, True)
    assert rule_for(call).prefer[0] != "triton_gram"


@pytest.mark.kernels
def test_benchmark_mode_times_it_beside_the_others(monkeypatch):
    timed = []

    def fake(impl, call, repeat=5, scale=-1.0):
        timed.append(impl.name)
        return 0.5 if impl.name == "triton_gram" else 1.0

    monkeypatch.setattr(benchmark, "time_call", fake)
    backends.benchmark = True
    x = randn(2, 8, 300)
    assert backends.resolve("self", x) == "triton_gram"
    assert {"reference", "triton_tiled", "triton_gram"} <= set(timed)
    with backends.use_backend("triton_gram"):  # and a user can set it globally
        backends.benchmark = False
        assert backends.resolve("self", x) == "triton_gram"


def test_compiles_for_sm90():
    # The interpreter never runs Triton's NVIDIA pipeline: compile each kernel's first pruned
    # config for sm_90 in bf16 at L = 400 through benchmarks/kernel_resources.py (no GPU needed,
    # ptxas ships with Triton): within the shared memory, no spills, wgmma. Every kept config and
    # sm_80 / fp32: benchmarks/README.md.
    triton = pytest.importorskip("triton")
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip(f"Triton's NVIDIA backend has no ptxas at {ptxas}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])  # this fgattn
    out = Path(tempfile.mkdtemp()) / "resources.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "kernel_resources.py"), "--arch", "90",
           "--dtype", "bf16", "--length", "400", "--channels", "256", "--batch", "2",
           "--workload", "gram", "--first-config", "--json", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = json.loads(out.read_text())["records"]
    kernels = {f"triton_gram.{k.fn.__name__}" for k in autotuners(gram)}
    assert {r["kernel"] for r in records} == kernels
    for r in records:
        assert r["smem_ok"] and r["local_bytes"] == r["stack_bytes"] == 0, r
        assert r["mma"] == "wgmma", r
