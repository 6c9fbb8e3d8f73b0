"""The Gram-GEMM Triton kernels (`fgattn/ops/triton_gram.py`, backend "triton_gram", L > 256)
against the PyTorch reference: outputs and every gradient of self and cross attention, fp32 and
fp16, large logits, odd C and L, batch chunks smaller than B, several tile configs; config pruning,
registration and dispatch (opcheck of the two op pairs: tests/test_triton_kernels.py, OP_PAIRS).

Without CUDA the kernels run in Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1
before Triton is imported), where the autotuner is pruned to one config, `INTERPRETER_TILES`; the
`tiles` fixture runs each case with more than one. The kernels take any L, so the numerics run at
small L through the module's entry points; dispatch (L ≥ 257 only) is checked at L = 300. If the
kernels were compiled before the interpreter was on, the file re-runs itself in a fresh process.
bf16 runs on a GPU only (the interpreter's bf16 tl.dot is unreliable).
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from _numerics import assert_as_accurate_as_fp32, close, leaf, randn

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from triton.runtime.interpreter import InterpretedFunction

from fgattn import backends
from fgattn.functional import channel_attention
from fgattn.ops import _triton_common, dispatch, reference
from fgattn.ops import triton_gram as tg
from fgattn.ops.triton_flash import REGISTER_BUDGET, DoesNotFit

ROOT = Path(__file__).resolve().parents[1]
INTERPRETED = isinstance(tg._gram_kernel.fn, InterpretedFunction)
RERUN = not INTERPRETED and not torch.cuda.is_available()
DEVICE = "cpu" if INTERPRETED else "cuda"
KERNELS = (
    tg._gram_kernel,
    tg._pv_kernel,
    tg._bwd_delta_kernel,
    tg._bwd_ds_kernel,
    tg._bwd_cross_delta_kernel,
    tg._bwd_cross_ds_kernel,
)


@pytest.fixture(autouse=True)
def _kernels_runnable(request):
    if RERUN and request.node.name != "test_rerun_in_fresh_interpreter_process":
        pytest.skip("kernels were compiled before TRITON_INTERPRET was set: ran in a subprocess")


def _forget_tuning():
    for kernel in KERNELS:
        kernel.cache.clear()


@pytest.fixture(params=[(16, 16), (32, 16), (16, 64)], ids=lambda t: f"tiles{t[0]}x{t[0]}k{t[1]}")
def tiles(request, monkeypatch):
    """The interpreter's one config: square BLOCK_M = BLOCK_N tiles, BLOCK_K (several blocks and
    a masked tail at C = 40, L = 49)."""
    block, k = request.param
    monkeypatch.setattr(tg, "INTERPRETER_TILES", {"BLOCK_M": block, "BLOCK_N": block, "BLOCK_K": k})
    _forget_tuning()
    yield request.param
    _forget_tuning()


def gram(*xs, scale=-1.0):
    """The Gram kernels' op: self attention for one tensor, else cross attention."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    if len(xs) == 1:
        return tg.self_attention(xs[0], scale, tf32)
    return tg.channel_attention(*xs, scale, tf32)


def check(inputs, scale=-1.0, tol=2e-5, fn=gram, qkv=None):
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
    ref = reference.channel_attention(*args, scale)
    rgrads = torch.autograd.grad(ref, xs64, g.double())
    close(out, ref, tol)
    for got, want in zip(grads, rgrads, strict=True):
        assert got.dtype == inputs[0].dtype and got.shape == want.shape
        close(got, want, tol)


# ---------------------------------------------------------------------------------------------
# Pruning and chunking

SPACES = {
    "gram": tg.GRAM_SPACE,
    "pv": tg.PV_SPACE,
    "bwd": tg.BWD_SPACE,
    "cbwd": tg.CROSS_BWD_SPACE,
}


def _prune(kind, limit, dtype, monkeypatch):
    monkeypatch.setattr(_triton_common, "interpreting", lambda: False)
    monkeypatch.setattr(_triton_common, "shared_memory_limit", lambda x: limit)
    x = torch.empty(0, dtype=dtype)
    kept = tg.fits(kind)(tg._configs(SPACES[kind]), {tg.OPERAND[kind]: x})
    needs = [
        tg.estimate(kind, *(c.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")),
                    c.num_warps, c.kwargs["STAGES"], x.element_size())
        for c in kept
    ]  # fmt: skip
    return kept, needs


@pytest.mark.parametrize("kind", SPACES)
@pytest.mark.parametrize("limit", [227 * 1024, 163 * 1024, 99 * 1024])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_prune_keeps_configs_that_fit(kind, limit, dtype, monkeypatch):
    kept, needs = _prune(kind, limit, dtype, monkeypatch)
    assert kept
    for smem, words in needs:
        assert smem <= limit and words <= REGISTER_BUDGET
    if kind in ("gram", "bwd"):  # symmetric pairing: the transpose of a tile is a tile
        assert all(c.kwargs["BLOCK_M"] == c.kwargs["BLOCK_N"] for c in kept)
    if limit >= 163 * 1024 and dtype == torch.bfloat16:  # 64-row tiles: wgmma on sm_90
        assert any(c.kwargs["BLOCK_M"] >= 64 for c in kept)


def test_prune_drops_what_the_device_cannot_hold(monkeypatch):
    wide, _ = _prune("gram", 227 * 1024, torch.float32, monkeypatch)
    narrow, _ = _prune("gram", 99 * 1024, torch.float32, monkeypatch)
    assert len(narrow) < len(wide)
    with pytest.raises(DoesNotFit, match=r"this GPU allows 8 KiB.*backend='triton'"):
        _prune("bwd", 8 * 1024, torch.float32, monkeypatch)


def test_interpreter_runs_one_config(monkeypatch):
    monkeypatch.setattr(_triton_common, "interpreting", lambda: True)
    (config,) = tg.fits("gram")(tg._configs(tg.GRAM_SPACE), {})
    assert {k: config.kwargs[k] for k in tg.INTERPRETER_TILES} == tg.INTERPRETER_TILES


def test_temporaries_stay_within_the_chunk_budget():
    # B = 32, C = 2048: the fp32 S of the forward (16 MiB per element) and the [G | Pᵀ] of the
    # backward (bf16: 16 MiB; fp32: 32 MiB) in chunks of at most 64 MiB, not 512 MiB or more
    c = 2048
    for item in (c * c * 4, 2 * c * c * 2, 2 * c * c * 4):
        n = tg._chunk(32, item)
        assert 1 <= n < 32 and n * item <= tg.CHUNK_BYTES
    assert tg._chunk(3, 10**12) == 1  # larger than the budget: one element at a time
    assert tg._chunk(32, 1) == 32 // tg.MIN_CHUNKS  # small C: still in chunks
    assert tg._chunk(3, 1) == 1


# ---------------------------------------------------------------------------------------------
# Numerics against the reference


@pytest.mark.parametrize(
    ("b", "c", "length", "scale"),
    [(2, 40, 20, -1.0), (3, 33, 49, -1.0), (2, 24, 5, 0.5), (1, 19, 100, -0.05)],
)
def test_self_attention(tiles, b, c, length, scale):
    check([randn(b, c, length)], scale)


@pytest.mark.parametrize(
    ("c", "length", "lv", "scale"),
    [(40, 20, 40, -1.0), (33, 5, 10, 0.3), (17, 49, 98, -1.0), (24, 20, 7, -1.0)],
)
def test_cross_attention(tiles, c, length, lv, scale):
    check([randn(2, c, length), randn(2, c, length), randn(2, c, lv)], scale)


def test_co_attention_shares_q_and_k():
    # PCA-Net: q = k = X_A, v = [X_A | X_B] (2L wide); dq and dk land in the same tensor
    x, v = randn(2, 33, 49), randn(2, 33, 98)

    def co(x, v, scale):
        return gram(x, x, v, scale=scale)

    check([x, v], fn=co, qkv=lambda x, v: (x, x, v))


@pytest.mark.parametrize("op", ["self", "cross"])
def test_batch_chunks_smaller_than_the_batch(op, monkeypatch):
    # two chunks of two and one of one (S is 24·24·4 bytes per element)
    monkeypatch.setattr(tg, "MIN_CHUNKS", 1)
    monkeypatch.setattr(tg, "CHUNK_BYTES", 2 * 24 * 24 * 4)
    xs = [randn(5, 24, 20)] if op == "self" else [randn(5, 24, 20), randn(5, 24, 20)]
    check(xs if op == "self" else [*xs, randn(5, 24, 40)])
    monkeypatch.setattr(tg, "CHUNK_BYTES", 1)  # one element at a time
    check([randn(3, 24, 20)])


def test_non_contiguous_inputs():
    x = randn(2, 20, 30).transpose(1, 2)  # (2, 30, 20), channel stride 1
    check([x])
    k = randn(2, 30, 40)[:, :, ::2]  # L stride 2
    v = randn(2, 30, 50)[:, :, 3:48]  # offset view, Lv = 45
    check([x, k, v])


def test_dead_channels():
    # Post-ReLU maps with all-zero channels: zero logits are the row max under scale −1.
    x = randn(2, 40, 20).relu()
    x[:, ::3] = 0
    check([x])
    check([torch.zeros(1, 16, 5, device=DEVICE)])


@pytest.mark.parametrize(
    ("dtype", "tol"),
    [
        (torch.float16, 1e-2),
        pytest.param(
            torch.bfloat16,
            3e-2,
            marks=pytest.mark.skipif(
                DEVICE == "cpu", reason="the Triton interpreter's bf16 tl.dot is unreliable"
            ),
        ),
    ],
)
def test_half_precision(dtype, tol):
    # p, G and Pᵀ enter the products in the input dtype, as in flash attention; logits, softmax
    # statistics and accumulators stay fp32.
    x = randn(2, 40, 49, dtype=dtype).relu()
    check([x], tol=tol)
    q, k, v = randn(2, 40, 20, dtype=dtype), randn(2, 40, 20, dtype=dtype), randn(2, 40, 40)
    check([q, k, v.to(dtype)], tol=tol)


def test_tf32_option_runs():
    torch.backends.cuda.matmul.allow_tf32 = True
    check([randn(2, 24, 20)], tol=2e-2)
    check([randn(2, 24, 20), randn(2, 24, 20), randn(2, 24, 30)], tol=2e-2)
    assert torch.backends.cuda.matmul.allow_tf32  # the backward's cuBLAS call restores it


@pytest.mark.parametrize("magnitude", [30.0, 150.0])
def test_large_logits(magnitude):
    # |x| ≈ 30 gives logits near −1e4, |x| ≈ 150 near −1e5 to −5e5 (L = 49), where fp32 itself is
    # coarse: the kernels must be about as accurate as the fp32 reference (both against fp64).
    x = randn(2, 32, 49, scale=magnitude).relu()
    x[:, ::5] = 0
    q, k, v = x, randn(2, 32, 49, scale=magnitude).relu(), randn(2, 32, 98, scale=magnitude)
    cases = [
        (gram, lambda x: reference.channel_attention(x, x, x, -1.0), (x,)),
        (gram, lambda q, k, v: reference.channel_attention(q, k, v, -1.0), (q, k, v)),
    ]
    for fused, ref, inputs in cases:
        assert_as_accurate_as_fp32(fused, ref, inputs)


def test_same_statistics_as_the_fused_kernels():
    # The row statistics [max, log Σ] have triton_channel_attention's format and values.
    from fgattn.ops import triton_channel_attention as tca

    x = randn(2, 40, 49)
    out, stats = tg.gram_self_channel_attention_fwd(x, -1.0, False)
    out1, stats1 = tca.self_channel_attention_fwd(x, -1.0, False)
    close(out, out1, 1e-5)
    close(stats, stats1, 1e-5)


# ---------------------------------------------------------------------------------------------
# Registration and dispatch


def test_dispatch_by_name_at_long_rows():
    x = randn(2, 8, 300)
    q, k, v = randn(2, 8, 300), randn(2, 8, 300), randn(2, 8, 600)
    check([x], fn=lambda *xs, scale: channel_attention(*xs, scale=scale, backend="triton_gram"))
    check(
        [q, k, v], fn=lambda *xs, scale: channel_attention(*xs, scale=scale, backend="triton_gram")
    )
    assert "triton_gram" in dispatch.candidates(dispatch.describe("self", x))


def test_short_rows_and_contrastive_are_not_its_to_run():
    x = randn(2, 8, 256)
    with pytest.raises(ValueError, match=r"backend 'triton_gram' cannot run .*L >= 257"):
        channel_attention(x, backend="triton_gram")
    assert "triton_gram" not in dispatch.candidates(dispatch.describe("self", x))
    long = randn(2, 8, 300)
    eta = torch.rand(2, device=DEVICE)
    assert "triton_gram" not in dispatch.candidates(
        dispatch.describe("contrastive", long, long, eta)
    )


def test_no_rule_prefers_it_until_a_gpu_run_does():
    assert all("triton_gram" not in rule.prefer for rule in dispatch.RULES)
    assert "triton_gram" not in dispatch.LAST_RESORT
    call = dispatch.Call("self", "cuda", "cuda:0", (9, 0), torch.bfloat16, 32, 2048, 784, 784, True)
    assert dispatch.rule_for(call).prefer[0] != "triton_gram"


def test_benchmark_mode_times_it_beside_the_others(monkeypatch):
    timed = []

    def fake(impl, call, repeat=5, scale=-1.0):
        timed.append(impl.name)
        return 0.5 if impl.name == "triton_gram" else 1.0

    monkeypatch.setattr(dispatch, "time_call", fake)
    old = backends.get_benchmark()
    backends.benchmark = True
    try:
        dispatch.clear_benchmark_cache()
        x = randn(2, 8, 300)
        assert backends.resolve("self", x) == "triton_gram"
        assert {"reference", "triton", "triton_gram"} <= set(timed)
        with backends.use_backend("triton_gram"):  # and a user can set it globally
            backends.benchmark = False
            assert backends.resolve("self", x) == "triton_gram"
    finally:
        backends.benchmark = old
        dispatch.clear_benchmark_cache()


def test_torch_compile_fullgraph():
    x = leaf(randn(2, 16, 300))
    q, k, v = leaf(randn(2, 16, 300)), leaf(randn(2, 16, 300)), leaf(randn(2, 16, 40))

    def loss(x, q, k, v, backend):
        y1 = channel_attention(x, backend=backend)
        y2 = channel_attention(q, k, v, backend=backend)
        return (y1 * y1).sum() + (y2 * y2).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    inputs = (x, q, k, v)
    got = torch.autograd.grad(compiled(*inputs, "triton_gram"), inputs)
    want = torch.autograd.grad(loss(*inputs, "reference"), inputs)
    for a, b in zip(got, want, strict=True):
        close(a, b, 1e-4)


def test_export_takes_the_reference(monkeypatch):
    # torch.export keeps a custom op opaque (and ONNX cannot translate it): the exported graph
    # computes the op with the reference instead, with a warning, as for the other Triton kernels.
    class Attend(torch.nn.Module):
        def forward(self, x):
            return channel_attention(x, backend="triton_gram")

    x = randn(2, 8, 300)
    monkeypatch.setattr(dispatch, "_export_warned", set())
    with pytest.warns(UserWarning, match=r"'triton_gram' implementation.*'reference'"):
        program = torch.export.export(Attend(), (x,))
    ops = [n for n in program.graph_module.graph.nodes if str(n.target).startswith("fgattn.")]
    assert ops == []
    close(program.module()(x), reference.self_attention(x.double(), -1.0), 1e-5)


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
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = json.loads(out.read_text())["records"]
    assert {r["kernel"] for r in records} == {f"triton_gram.{k.fn.__name__}" for k in KERNELS}
    for r in records:
        assert r["smem_ok"] and r["local_bytes"] == r["stack_bytes"] == 0, r
        assert r["mma"] == "wgmma", r


def test_rerun_in_fresh_interpreter_process():
    if not RERUN:
        pytest.skip("kernels run in this process (interpreter active or CUDA present)")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
