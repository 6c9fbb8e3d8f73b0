"""The FlashAttention-2-shaped Triton kernels (`fgattn/ops/triton_flash.py` and
`triton_flash_contrastive.py`, backend "triton_fa") against the PyTorch reference: outputs and
every gradient, fp32 / fp16 / bf16, large logits, odd C and L, B > 1, several tile configs; their
config pruning, registration and dispatch.

Without CUDA the kernels run in Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1
before Triton is imported), where the autotuner is pruned to one config, `INTERPRETER_TILES`; the
`tiles` fixture runs each case with more than one. If the kernels were compiled before the
interpreter was on, the file re-runs itself in a fresh process, as test_triton_kernels.py does.
bf16 runs on a GPU only (the interpreter's bf16 tl.dot is unreliable).
"""

import functools
import os
import subprocess
import sys

import pytest
import torch
from _numerics import assert_as_accurate_as_fp32, close, leaf, randn

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from triton.runtime.interpreter import InterpretedFunction

from fgattn import backends
from fgattn.functional import channel_attention, contrastive_channel_attention
from fgattn.ops import _triton_common, dispatch, reference
from fgattn.ops import triton_flash as tfa
from fgattn.ops import triton_flash_contrastive as tfc

INTERPRETED = isinstance(tfa._fwd_kernel.fn, InterpretedFunction)
RERUN = not INTERPRETED and not torch.cuda.is_available()
DEVICE = "cpu" if INTERPRETED else "cuda"
KERNELS = (
    tfa._fwd_kernel,
    tfa._bwd_delta_self_kernel,
    tfa._bwd_self_kernel,
    tfc._lse_kernel,
    tfc._fwd_kernel,
    tfc._bwd_rowsum_kernel,
    tfc._bwd_kernel,
)


@pytest.fixture(autouse=True)
def _kernels_runnable(request):
    if RERUN and request.node.name != "test_rerun_in_fresh_interpreter_process":
        pytest.skip("kernels were compiled before TRITON_INTERPRET was set: ran in a subprocess")


def _forget_tuning():
    for kernel in KERNELS:
        kernel.cache.clear()


@pytest.fixture(params=[(16, 16), (32, 16), (16, 64)], ids=lambda t: f"tiles{t[0]}x{t[1]}")
def tiles(request, monkeypatch):
    """The interpreter's one config: resident rows x streamed rows (several blocks at C = 40)."""
    bm, bn = request.param
    monkeypatch.setattr(tfa, "INTERPRETER_TILES", {"BLOCK_M": bm, "BLOCK_N": bn})
    _forget_tuning()
    yield request.param
    _forget_tuning()


def refused_on_gpu(inputs, call):
    """On a GPU, fp32 (exact or TF32) is refused by name (`fits`): assert that and skip the rest
    of the test, whose numerics the interpreter checks. Nothing where the kernels run `inputs`."""
    fp32 = all(t.dtype == torch.float32 for t in inputs if t.is_floating_point())
    if INTERPRETED or not fp32:
        return
    with pytest.raises(tfa.DoesNotFit, match="do not run fp32 inputs"):
        call()
    pytest.skip("fp32 is refused on GPUs (asserted); the interpreter checks its numerics")


def check(inputs, scale=-1.0, tol=2e-5):
    """Output and every input gradient of backend "triton_fa" against the reference on the same
    (rounded) inputs in fp64; self attention when `inputs` is one tensor."""
    refused_on_gpu(inputs, lambda: channel_attention(*inputs, scale=scale, backend="triton_fa"))
    xs = [leaf(t) for t in inputs]
    out = channel_attention(*xs, scale=scale, backend="triton_fa")
    assert out.dtype == inputs[-1].dtype and out.shape == inputs[-1].shape[:2] + out.shape[2:]
    g = torch.randn(out.shape, dtype=torch.float64).to(out.dtype).to(DEVICE)
    grads = torch.autograd.grad(out, xs, g)
    xs64 = [leaf(t.double()) for t in inputs]
    qkv = xs64 * 3 if len(xs64) == 1 else xs64
    ref = reference.channel_attention(*qkv, scale)
    rgrads = torch.autograd.grad(ref, xs64, g.double())
    close(out, ref, tol)
    for got, want in zip(grads, rgrads, strict=True):
        assert got.dtype == want.dtype or got.dtype == inputs[0].dtype
        close(got, want, tol)


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
    got = tfa.pieces(width)
    assert got == want
    assert sum(got) >= width and sum(got) % 16 == 0


# name: (the estimate's kind, the config space)
SPACES = {
    "fwd": ("fwd", tfa.FWD_SPACE),
    "bwd": ("bwd", tfa.BWD_SPACE),
    "delta": ("delta", tfa.DELTA_SPACE),
    "cstats": ("cstats", tfc.SPACE),
    "cfwd": ("cfwd", tfc.FWD_SPACE),
    "cbwd": ("cbwd", tfc.BWD_SPACE),
}


def _prune(name, limit, dtype, width, monkeypatch, is_self=True, arch=None, tf32=False):
    """What `fits` keeps of a space on a GPU with `limit` bytes of shared memory and compute
    capability `arch`, and their estimates."""
    kind, space = SPACES[name]
    monkeypatch.setattr(_triton_common, "interpreting", lambda: False)
    monkeypatch.setattr(_triton_common, "shared_memory_limit", lambda x: limit)
    monkeypatch.setattr(tfa, "target_arch", lambda x: arch)
    kp = tfa.pieces(width)
    kwargs = dict(K0=kp[0], K1=kp[1], K2=kp[2], V0=kp[0], V1=kp[1], V2=kp[2], IS_SELF=is_self)
    kwargs["PRECISION"] = "tf32" if tf32 else "ieee"
    x = torch.empty(0, dtype=dtype)
    kept = tfa.fits(kind)(tfa._configs(space), {"X": x}, **kwargs)
    estimates = [
        tfa.estimate(kind, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps,
                     c.kwargs["STAGES"], sum(kp), 0 if is_self else sum(kp), x.element_size())
        for c in kept
    ]  # fmt: skip
    return kept, estimates


GPUS = {"sm_90": (227 * 1024, 90), "sm_80": (163 * 1024, 80), "sm_86": (99 * 1024, 86)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gpu", list(GPUS))
@pytest.mark.parametrize("kind", list(SPACES))
def test_prune_keeps_configs_that_fit(kind, gpu, dtype, monkeypatch):
    limit, arch = GPUS[gpu]
    kept, estimates = _prune(kind, limit, dtype, 196, monkeypatch, kind != "fwd", arch)
    assert kept
    for smem, words in estimates:
        assert smem <= limit and words <= tfa.REGISTER_BUDGET
    if limit >= 163 * 1024:  # wgmma needs 64-row tiles on sm_90
        assert all(c.kwargs["BLOCK_M"] >= 64 for c in kept)


@pytest.mark.parametrize("space", [tfa.FWD_SPACE, tfa.BWD_SPACE, tfc.FWD_SPACE, tfc.BWD_SPACE])
def test_chained_dots_get_16_rows_a_warp(space):
    # Triton lays out a tl.dot whose result feeds another as [num_warps, 1] warps of 16 rows:
    # fewer rows than 16 per warp would be held (and multiplied) twice
    for bm, _, warps, _ in space:
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
    assert len(at_196) == 2 and max(words for _, words in estimates) <= tfa.REGISTER_BUDGET
    for arch, limit, rows in ((90, 227 * 1024, 64), (80, 163 * 1024, 32)):
        kept, ((_, words),) = _prune("cbwd", limit, torch.bfloat16, 256, monkeypatch, True, arch)
        assert words > tfa.REGISTER_BUDGET  # none within: one config, the fewest registers
        assert [c.kwargs["BLOCK_M"] for c in kept] == [rows]


@pytest.mark.parametrize("tf32", [False, True])
@pytest.mark.parametrize("kind", list(SPACES))
def test_fp32_is_refused(kind, tf32, monkeypatch):
    with pytest.raises(tfa.DoesNotFit, match=r"fp32 inputs \(exact or TF32\).*backend='triton'"):
        _prune(kind, 227 * 1024, torch.float32, 196, monkeypatch, arch=90, tf32=tf32)


def test_prune_refuses_what_cannot_fit(monkeypatch):
    # 64 KiB (sm_75), bf16 contrastive backward: three resident and three streamed rows of 208
    # values do not fit at all: a clear error, not "out of resources" at launch
    with pytest.raises(tfa.DoesNotFit, match=r"this GPU allows 64 KiB.*backend='triton'"):
        _prune("cbwd", 64 * 1024, torch.bfloat16, 196, monkeypatch, arch=75)


def test_tf32_estimate_has_a_margin():
    # TF32 compilations staged up to 1.21x the plain estimate's shared memory (benchmarks/README)
    plain = tfa.estimate("bwd", 64, 32, 8, 2, 208, 0, 4)
    assert tfa.estimate("bwd", 64, 32, 8, 2, 208, 0, 4, tf32=True) == (1.25 * plain[0], plain[1])


def test_prune_drops_what_the_device_cannot_hold(monkeypatch):
    wide, _ = _prune("fwd", 227 * 1024, torch.bfloat16, 196, monkeypatch, is_self=False)
    narrow, _ = _prune("fwd", 99 * 1024, torch.bfloat16, 196, monkeypatch, is_self=False)
    assert len(narrow) < len(wide)
    assert {128} <= {c.kwargs["BLOCK_M"] for c in wide}


def test_interpreter_runs_one_config(monkeypatch):
    monkeypatch.setattr(_triton_common, "interpreting", lambda: True)
    (config,) = tfa.fits("fwd")(tfa._configs(tfa.FWD_SPACE), {}, K0=16, K1=0, K2=0)
    assert {k: config.kwargs[k] for k in tfa.INTERPRETER_TILES} == tfa.INTERPRETER_TILES


# ---------------------------------------------------------------------------------------------
# Numerics against the reference


@pytest.mark.parametrize(
    ("b", "c", "length", "scale"),
    [(2, 40, 20, -1.0), (3, 33, 49, -1.0), (2, 24, 5, 0.5), (1, 19, 196, -0.05)],
)
def test_self_attention(tiles, b, c, length, scale):
    check([randn(b, c, length)], scale)


@pytest.mark.parametrize(
    ("c", "length", "lv", "scale"),
    [(40, 20, 40, -1.0), (33, 5, 10, 0.3), (17, 49, 300, -1.0), (24, 20, 7, -1.0)],
)
def test_cross_attention(tiles, c, length, lv, scale):
    # lv = 300: two column tiles of v, each 150 wide, padded to 128 + 32
    check([randn(2, c, length), randn(2, c, length), randn(2, c, lv)], scale)


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
    # p and ds enter the products in the input dtype, as in flash attention; logits, softmax
    # statistics and accumulators stay fp32.
    x = randn(2, 40, 49, dtype=dtype).relu()
    check([x], tol=tol)
    q, k, v = randn(2, 40, 20, dtype=dtype), randn(2, 40, 20, dtype=dtype), randn(2, 40, 40)
    check([q, k, v.to(dtype)], tol=tol)


def test_tf32_option_runs():
    torch.backends.cuda.matmul.allow_tf32 = True
    check([randn(2, 24, 20)], tol=2e-2)


@pytest.mark.parametrize("magnitude", [30.0, 150.0])
def test_large_logits(magnitude):
    # |x| ≈ 30 gives logits near −1e4, |x| ≈ 150 near −5e5 (L = 49), where fp32 itself is coarse:
    # the kernels must be about as accurate as the fp32 reference (both against fp64).
    x = randn(2, 32, 49, scale=magnitude).relu()
    x[:, ::5] = 0
    q, k, v = x, randn(2, 32, 49, scale=magnitude).relu(), randn(2, 32, 98, scale=magnitude)
    cases = [
        (
            lambda x: channel_attention(x, backend="triton_fa"),
            lambda x: reference.channel_attention(x, x, x, -1.0),
            (x,),
        ),
        (
            lambda q, k, v: channel_attention(q, k, v, backend="triton_fa"),
            lambda q, k, v: reference.channel_attention(q, k, v, -1.0),
            (q, k, v),
        ),
    ]
    for fused, ref, inputs in cases:
        refused_on_gpu(inputs, functools.partial(fused, *inputs))
        assert_as_accurate_as_fp32(fused, ref, inputs)


def test_agrees_with_the_fused_kernels():
    # Same row statistics format as triton_channel_attention (its cross backward is reused).
    from fgattn.ops import triton_channel_attention as tca

    x = randn(2, 40, 49)
    refused_on_gpu([x], lambda: tfa.flash_self_channel_attention_fwd(x, -1.0, False))
    out, stats = tfa.flash_self_channel_attention_fwd(x, -1.0, False)
    out1, stats1 = tca.self_channel_attention_fwd(x, -1.0, False)
    close(out, out1, 1e-5)
    close(stats, stats1, 1e-5)


# ---------------------------------------------------------------------------------------------
# Contrastive |P_A − η P_B| X_A


def check_contrastive(x_a, x_b, eta, scale=-1.0, tol=2e-5):
    refused_on_gpu(
        (x_a, x_b),
        lambda: contrastive_channel_attention(x_a, x_b, eta, scale=scale, backend="triton_fa"),
    )
    xs = [leaf(x_a), leaf(x_b), leaf(eta)]
    out = contrastive_channel_attention(*xs, scale=scale, backend="triton_fa")
    assert out.shape == x_a.shape and out.dtype == x_a.dtype
    g = torch.randn(out.shape, dtype=torch.float64).to(out.dtype).to(DEVICE)
    grads = torch.autograd.grad(out, xs, g)
    xs64 = [leaf(t.double()) for t in (x_a, x_b, eta)]
    ref = reference.contrastive_channel_attention(*xs64, scale)
    rgrads = torch.autograd.grad(ref, xs64, g.double())
    close(out, ref, tol)
    for got, want in zip(grads, rgrads, strict=True):
        close(got, want, tol)


@pytest.mark.parametrize(
    ("b", "c", "length", "scale"),
    [(2, 40, 20, -1.0), (2, 40, 20, -0.05), (3, 33, 49, 0.1), (2, 17, 5, -0.2), (1, 20, 196, -0.1)],
)
def test_contrastive(tiles, b, c, length, scale):
    eta = torch.rand(b, dtype=torch.float64).float().to(DEVICE) * 1.5
    check_contrastive(randn(b, c, length), randn(b, c, length), eta, scale)


def test_contrastive_identical_inputs_give_zero_and_zero_gradients():
    # η = 1, X_B = X_A: W = 0 exactly, and d|u|/du at 0 is 0 as in PyTorch.
    x = randn(2, 24, 20)
    a, b, e = leaf(x), leaf(x.clone()), leaf(torch.ones(2, device=DEVICE))
    refused_on_gpu([x], lambda: contrastive_channel_attention(a, b, e, backend="triton_fa"))
    out = contrastive_channel_attention(a, b, e, backend="triton_fa")
    assert out.abs().max() == 0
    for grad in torch.autograd.grad(out, (a, b, e), randn(*out.shape)):
        assert grad.abs().max() == 0


def test_contrastive_dead_channels_non_contiguous_half():
    a = randn(2, 20, 36).transpose(1, 2).relu()  # (2, 36, 20), non-contiguous
    b = randn(2, 36, 40)[:, :, ::2].relu()
    a[:, :4] = 0
    b[:, 10:12] = 0
    eta = torch.tensor([0.3, 1.2], device=DEVICE)
    check_contrastive(a, b, eta)
    check_contrastive(a.half(), b.half(), eta, tol=1e-2)


@pytest.mark.parametrize("magnitude", [30.0, 150.0])
def test_contrastive_large_logits(magnitude):
    a = randn(2, 32, 49, scale=magnitude).relu()
    a[:, ::5] = 0
    b = randn(2, 32, 49, scale=magnitude).relu()
    eta = torch.tensor([0.5, 1.2], device=DEVICE)

    def fused(a, b, e):
        return contrastive_channel_attention(a, b, e, backend="triton_fa")

    refused_on_gpu([a, b, eta], lambda: fused(a, b, eta))
    # the dX_B and dη here are ~0 (pure fp32 noise): the floor is the op's largest output/gradient
    assert_as_accurate_as_fp32(
        fused, lambda a, b, e: reference.contrastive_channel_attention(a, b, e, -1.0), (a, b, eta)
    )


# ---------------------------------------------------------------------------------------------
# Registration and dispatch


def test_torch_compile_fullgraph():
    x = leaf(randn(2, 24, 4, 5))
    q, k, v = leaf(randn(2, 24, 20)), leaf(randn(2, 24, 20)), leaf(randn(2, 24, 40))

    eta = leaf(torch.rand(2, device=DEVICE))
    refused_on_gpu([q], lambda: channel_attention(q, backend="triton_fa"))

    def loss(x, q, k, v, eta, backend):
        y1 = channel_attention(x, backend=backend)
        y2 = channel_attention(q, k, v, backend=backend)
        y3 = contrastive_channel_attention(q, k, eta, backend=backend)
        return (y1 * y1).sum() + (y2 * y2).sum() + (y3 * y3).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    inputs = (x, q, k, v, eta)
    got = torch.autograd.grad(compiled(*inputs, "triton_fa"), inputs)
    want = torch.autograd.grad(loss(*inputs, "reference"), inputs)
    for a, b in zip(got, want, strict=True):
        close(a, b, 1e-4)


def test_long_rows_are_refused_by_name_and_not_candidates():
    x = randn(2, 8, 257)
    with pytest.raises(ValueError, match=r"backend 'triton_fa' cannot run .*L <= 256"):
        channel_attention(x, backend="triton_fa")
    assert "triton_fa" not in dispatch.candidates(dispatch.describe("self", x))
    with pytest.raises(ValueError, match=r"L <= 256, got L = 257"):
        tfa.self_attention(x, -1.0)


def test_no_rule_prefers_it_until_a_gpu_run_does():
    # Not yet timed on a GPU: `auto` takes it only in benchmark mode.
    assert all("triton_fa" not in rule.prefer for rule in dispatch.RULES)
    assert "triton_fa" not in dispatch.LAST_RESORT
    call = dispatch.Call("self", "cuda", "cuda:0", (9, 0), torch.bfloat16, 32, 2048, 196, 196, True)
    assert dispatch.IMPLEMENTATIONS["triton_fa"].ops == ("self", "cross", "contrastive")
    assert dispatch.rule_for(call).prefer[0] != "triton_fa"


def test_benchmark_mode_times_it_beside_the_others(monkeypatch):
    timed = []

    def fake(impl, call, repeat=5, scale=-1.0):
        timed.append(impl.name)
        return 0.5 if impl.name == "triton_fa" else 1.0

    monkeypatch.setattr(dispatch, "time_call", fake)
    old = backends.get_benchmark()
    backends.benchmark = True
    try:
        dispatch.clear_benchmark_cache()
        x = randn(2, 8, 5)
        assert backends.resolve("self", x) == "triton_fa"
        assert {"reference", "triton", "triton_fa"} <= set(timed)
        with backends.use_backend("triton_fa"):  # and a user can set it globally
            backends.benchmark = False
            assert backends.resolve("self", x) == "triton_fa"
    finally:
        backends.benchmark = old
        dispatch.clear_benchmark_cache()


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
