"""Fused Triton kernels against the PyTorch reference: outputs and every gradient.

Without CUDA the kernels run in Triton's CPU interpreter, which must be switched on before the
kernels are defined: this module sets TRITON_INTERPRET=1 before importing them. If another test
module imported them earlier without it, the whole file is re-run in a fresh interpreter process
(one test) and the in-process tests skip. With CUDA (compiled kernels) the same tests run on GPU.
fp32 only: the interpreter's bf16 tl.dot is unreliable (bf16/fp16 are in test_triton_kernels_gpu).
"""

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
from fgattn.ops import _triton_common, reference
from fgattn.ops import triton_channel_attention as tca
from fgattn.ops import triton_contrastive as tcc
from fgattn.ops import triton_flash as tfa
from fgattn.ops import triton_flash_contrastive as tfc
from fgattn.ops import triton_gram as tg

INTERPRETED = isinstance(tca._fwd_kernel, InterpretedFunction)
RERUN = not INTERPRETED and not torch.cuda.is_available()
DEVICE = "cpu" if INTERPRETED else "cuda"


@pytest.fixture(autouse=True)
def _kernels_runnable(request):
    if RERUN and request.node.name != "test_rerun_in_fresh_interpreter_process":
        pytest.skip("kernels were compiled before TRITON_INTERPRET was set: ran in a subprocess")


SMALL_TILES = {"block_m": 16, "block_n": 16, "max_tile": 16, "max_chunk": 16}


@pytest.fixture(params=["default_tiles", "small_tiles"])
def tiles(request, monkeypatch):
    """Small tiles: several row blocks, column tiles and L chunks already at C = 40, L = 20."""
    if request.param == "small_tiles":
        monkeypatch.setattr(_triton_common, "TILES", dict(SMALL_TILES))
        monkeypatch.setattr(tca, "TILES", _triton_common.TILES)
        monkeypatch.setattr(tcc, "TILES", _triton_common.TILES)
        monkeypatch.setattr(tcc, "BWD_TILES", {"block_m": 16, "block_n": 16, "max_tile": 16})
    return request.param


def check_attention(q, k, v, scale, fused_fn=None, tol=2e-5):
    """Output and gradients of the fused op (via the triton backend) against fp64 reference."""
    self_attention = k is None
    if self_attention:
        x = leaf(q)
        out = (fused_fn or (lambda x: channel_attention(x, scale=scale, backend="triton")))(x)
        g = randn(*out.shape)
        (dx,) = torch.autograd.grad(out, x, g)
        x64 = leaf(q.double())
        x3 = x64.flatten(2)
        ref = reference.channel_attention(x3, x3, x3, scale).reshape(x64.shape)
        (rdx,) = torch.autograd.grad(ref, x64, g.double())
        close(out, ref, tol)
        close(dx, rdx, tol)
        return
    q, k, v = leaf(q), leaf(k), leaf(v)
    out = channel_attention(q, k, v, scale=scale, backend="triton")
    assert out.shape == v.shape and out.dtype == v.dtype
    g = randn(*out.shape)
    grads = torch.autograd.grad(out, (q, k, v), g)
    q64, k64, v64 = (leaf(t.double()) for t in (q, k, v))
    ref = reference.channel_attention(q64, k64, v64, scale)
    rgrads = torch.autograd.grad(ref, (q64, k64, v64), g.double())
    close(out, ref, tol)
    for got, want in zip(grads, rgrads, strict=True):
        close(got, want, tol)


def check_contrastive(x_a, x_b, eta, scale, tol=2e-5):
    a, b, e = leaf(x_a), leaf(x_b), leaf(eta)
    out = contrastive_channel_attention(a, b, e, scale=scale, backend="triton")
    assert out.shape == a.shape and out.dtype == a.dtype
    g = randn(*out.shape)
    grads = torch.autograd.grad(out, (a, b, e), g)
    a64, b64, e64 = (leaf(t.double()) for t in (x_a, x_b, eta))
    ref = reference.contrastive_channel_attention(a64, b64, e64, scale)
    rgrads = torch.autograd.grad(ref, (a64, b64, e64), g.double())
    close(out, ref, tol)
    for got, want in zip(grads, rgrads, strict=True):
        close(got, want, tol)


# ---------------------------------------------------------------------------------------------
# Channel attention


@pytest.mark.parametrize(
    "c, length, lv, scale",
    [(40, 20, 20, -1.0), (33, 5, 10, -1.0), (64, 49, 98, 0.3), (17, 20, 45, -0.05)],
)
def test_cross_attention(tiles, c, length, lv, scale):
    check_attention(randn(2, c, length), randn(2, c, length), randn(2, c, lv), scale)


@pytest.mark.parametrize("c, length, scale", [(40, 20, -1.0), (64, 49, -1.0), (24, 5, 0.5)])
def test_self_attention(tiles, c, length, scale):
    check_attention(randn(2, c, length), None, None, scale)


def test_self_attention_is_explicit(monkeypatch):
    # channel_attention(x) takes the fused SCI op (one gradient for q = k = v); naming k and v,
    # even as x itself, takes the general op, whose three gradients autograd sums.
    calls = []
    for name in ("self_channel_attention_fwd", "channel_attention_fwd"):
        orig = getattr(tca, name)
        monkeypatch.setattr(tca, name, lambda *a, _o=orig, _n=name: calls.append(_n) or _o(*a))
    x = randn(2, 24, 4, 5)
    check_attention(x, None, None, -1.0)
    assert calls == ["self_channel_attention_fwd"]
    calls.clear()
    xx = leaf(x)
    channel_attention(xx, xx, xx, backend="triton").sum().backward()
    assert calls == ["channel_attention_fwd"]


def test_detached_key_gets_no_gradient_share():
    # q and k share storage but only q is differentiable: the general path must be used.
    x = leaf(randn(2, 24, 20))
    out = channel_attention(x, x.detach(), x.detach(), backend="triton")
    g = randn(*out.shape)
    (dx,) = torch.autograd.grad(out, x, g)
    x64 = leaf(x.double())
    ref = reference.channel_attention(x64, x64.detach(), x64.detach(), -1.0)
    (rdx,) = torch.autograd.grad(ref, x64, g.double())
    close(dx, rdx)


def test_non_contiguous_inputs_and_expanded_grad():
    base = randn(2, 30, 40)
    q = randn(2, 20, 30).transpose(1, 2)  # (2, 30, 20), channel stride 1
    k = base[:, :, ::2]  # L stride 2
    v = randn(2, 30, 50)[:, :, 3:48]  # offset view, Lv = 45
    check_attention(q, k, v, -1.0)
    # out.sum() gives a stride-0 gradient
    qq, kk, vv = leaf(q), leaf(k), leaf(v)
    grads = torch.autograd.grad(channel_attention(qq, kk, vv, backend="triton").sum(), (qq, kk, vv))
    q64, k64, v64 = (leaf(t.double()) for t in (q, k, v))
    rgrads = torch.autograd.grad(
        reference.channel_attention(q64, k64, v64, -1.0).sum(), (q64, k64, v64)
    )
    for got, want in zip(grads, rgrads, strict=True):
        close(got, want)
    check_attention(randn(2, 20, 30).transpose(1, 2), None, None, -1.0)


def test_dead_channels():
    # Post-ReLU maps with all-zero channels: zero logits are the row max under scale −1.
    x = randn(2, 40, 20).relu()
    x[:, ::3] = 0
    check_attention(x, None, None, -1.0)
    q, k = x.clone(), randn(2, 40, 20).relu()
    k[:, 5:9] = 0
    check_attention(q, k, randn(2, 40, 40), -1.0)
    check_attention(torch.zeros(1, 16, 5, device=DEVICE), None, None, -1.0)


def test_large_post_relu_magnitudes():
    # |x| ≈ 30, L = 49: logits near −1e4, where fp32 itself is coarse (ulp ≈ 1e-3): the kernels
    # must be about as accurate as the fp32 reference (both measured against fp64). Before the
    # lse was kept as a (max, log Σ) pair and δ recomputed, the fused gradients were 30x worse.
    x = randn(2, 32, 49, scale=30.0).relu()
    x[:, ::5] = 0
    q, k, v = x, randn(2, 32, 49, scale=30.0).relu(), randn(2, 32, 98, scale=30.0)
    cases = [
        (
            lambda x: channel_attention(x, backend="triton"),
            lambda x: reference.channel_attention(x, x, x, -1.0),
            (x,),
        ),
        (
            lambda q, k, v: channel_attention(q, k, v, backend="triton"),
            lambda q, k, v: reference.channel_attention(q, k, v, -1.0),
            (q, k, v),
        ),
        (
            lambda a, b, e: contrastive_channel_attention(a, b, e, backend="triton"),
            lambda a, b, e: reference.contrastive_channel_attention(a, b, e, -1.0),
            (q, k, torch.tensor([0.5, 1.2], device=DEVICE)),
        ),
    ]
    for fused, ref, inputs in cases:
        # Triton 3.8's interpreter lands at up to 1.2e-6 of the largest output or gradient here;
        # 3.9 at the fp32 reference's own error.
        assert_as_accurate_as_fp32(fused, ref, inputs)


# ---------------------------------------------------------------------------------------------
# Contrastive channel attention


@pytest.mark.parametrize(
    "c, length, scale", [(40, 20, -1.0), (40, 20, -0.05), (64, 49, 0.1), (33, 5, -0.2)]
)
def test_contrastive(tiles, c, length, scale):
    check_contrastive(
        randn(2, c, length), randn(2, c, length), torch.rand(2).to(DEVICE) * 1.5, scale
    )


def test_contrastive_identical_inputs_give_zero_and_zero_gradients():
    # η = 1, X_B = X_A: W = 0 exactly, and d|u|/du at 0 is 0 as in PyTorch.
    x = randn(2, 24, 20)
    check_contrastive(x, x.clone(), torch.ones(2, device=DEVICE), -1.0)
    a, b, e = leaf(x), leaf(x.clone()), leaf(torch.ones(2, device=DEVICE))
    out = contrastive_channel_attention(a, b, e, backend="triton")
    assert out.abs().max() == 0
    for grad in torch.autograd.grad(out, (a, b, e), randn(*out.shape)):
        assert grad.abs().max() == 0


def test_contrastive_dead_channels_non_contiguous_and_eta_b1():
    a = randn(2, 20, 36).transpose(1, 2).relu()  # (2, 36, 20), non-contiguous
    b = randn(2, 36, 40)[:, :, ::2].relu()
    a[:, :4] = 0
    b[:, 10:12] = 0
    check_contrastive(a, b, torch.tensor([0.3, 1.2], device=DEVICE), -1.0)
    e = leaf(torch.tensor([[0.5], [2.0]], device=DEVICE))
    out = contrastive_channel_attention(a, b, e, backend="triton")
    ref = reference.contrastive_channel_attention(a.double(), b.double(), e.double().view(-1), -1.0)
    close(out, ref)
    (de,) = torch.autograd.grad(out.sum(), e)
    assert de.shape == e.shape


def test_reference_contrastive_gradcheck_float64():
    # The ground truth the kernels are compared to is itself right, η included.
    a = torch.randn(2, 6, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 6, 5, dtype=torch.float64, requires_grad=True)
    eta = torch.tensor([0.4, 1.3], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, e: reference.contrastive_channel_attention(a, b, e, -0.5), (a, b, eta)
    )


# ---------------------------------------------------------------------------------------------
# Registration: opcheck, torch.compile, dispatch


# Every (fwd, bwd) op pair registered by `_triton_common.fused_op`: module, op name, inputs.
OP_PAIRS = {
    "attention": (tca, "channel_attention", "attention"),
    "self": (tca, "self_channel_attention", "self"),
    "contrastive": (tcc, "contrastive_channel_attention", "contrastive"),
    "flash_attention": (tfa, "flash_channel_attention", "attention"),
    "flash_self": (tfa, "flash_self_channel_attention", "self"),
    "flash_contrastive": (tfc, "flash_contrastive_channel_attention", "contrastive"),
    "gram_attention": (tg, "gram_channel_attention", "attention"),
    "gram_self": (tg, "gram_self_channel_attention", "self"),
}


def _op_inputs(kind, dtype=torch.float32):
    def t(*shape):
        return randn(*shape).to(dtype).requires_grad_()

    eta = torch.tensor([0.5, 1.1], device=DEVICE, requires_grad=True)
    return {
        "attention": (t(2, 20, 5), t(2, 20, 5), t(2, 20, 9)),
        "self": (t(2, 20, 5),),
        "contrastive": (t(2, 20, 5), t(2, 20, 5), eta),
    }[kind]


@pytest.mark.parametrize("name", list(OP_PAIRS))
def test_opcheck(name):
    module, op, kind = OP_PAIRS[name]
    # the flash-shaped kernels refuse fp32 on a GPU (tests/test_triton_flash.py asserts that)
    dtype = torch.bfloat16 if module in (tfa, tfc) and not INTERPRETED else torch.float32
    fwd, bwd = getattr(module, f"{op}_fwd"), getattr(module, f"{op}_bwd")
    inputs = _op_inputs(kind, dtype)
    torch.library.opcheck(fwd, (*inputs, -1.0, False))
    # and the backward op, with the statistics the forward produced
    with torch.no_grad():
        out, *stats = fwd(*inputs, -1.0, False)
    inputs = [x.detach() for x in inputs]
    torch.library.opcheck(bwd, (torch.randn_like(out), *inputs, *stats, -1.0, False))


def test_torch_compile_fullgraph():
    x = leaf(randn(2, 24, 4, 5))
    q, k, v = leaf(randn(2, 24, 20)), leaf(randn(2, 24, 20)), leaf(randn(2, 24, 40))
    eta = leaf(torch.rand(2, device=DEVICE))

    def loss(x, q, k, v, eta, backend):
        y1 = channel_attention(x, backend=backend)
        y2 = channel_attention(q, k, v, backend=backend)
        y3 = contrastive_channel_attention(q, k, eta, backend=backend)
        return (y1 * y1).sum() + (y2 * y2).sum() + (y3 * y3).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    inputs = (x, q, k, v, eta)
    got = torch.autograd.grad(compiled(*inputs, "triton"), inputs)
    want = torch.autograd.grad(loss(*inputs, "reference"), inputs)
    for a, b in zip(got, want, strict=True):
        close(a, b, 1e-4)


def test_auto_never_picks_triton_for_cpu_but_the_setting_can():
    x = randn(2, 8, 5)
    assert backends.resolve("self", x) != "triton"
    with backends.use_backend("triton"):  # the interpreter makes CPU tensors runnable
        assert backends.resolve("self", x) == "triton"


def test_float64_is_refused_by_name_and_falls_back_from_the_setting():
    x = torch.randn(2, 8, 5, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match=r"backend 'triton' cannot run .*float64"):
        channel_attention(x, backend="triton")
    with backends.use_backend("triton"), pytest.warns(UserWarning, match="falling back"):
        out = channel_attention(x)
    torch.testing.assert_close(out, reference.channel_attention(x, x, x, -1.0))


def test_cpu_tensors_without_interpreter_raise(monkeypatch):
    monkeypatch.setattr(_triton_common, "interpreting", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        _triton_common.check_device(torch.zeros(1))


@pytest.mark.parametrize(
    ("limit", "dtype", "want"),
    [
        (None, torch.float32, 256),  # off the GPU: no limit
        (227 * 1024, torch.float32, 256),  # sm_90
        (163 * 1024, torch.float32, 256),  # sm_80
        (99 * 1024, torch.float32, 128),  # sm_86 / sm_89
        (99 * 1024, torch.bfloat16, 256),
        (64 * 1024, torch.float16, 128),  # sm_75
        (64 * 1024, torch.float32, 64),
    ],
)
def test_tile_shrinks_to_fit_shared_memory(monkeypatch, limit, dtype, want):
    monkeypatch.setattr(_triton_common, "shared_memory_limit", lambda x: limit)
    x = torch.empty(0, dtype=dtype)
    assert _triton_common.tile(196, x) == want
    assert _triton_common.tile(40, x) == 64  # a narrow row is never widened


def test_tf32_option_runs():
    torch.backends.cuda.matmul.allow_tf32 = True
    x = randn(2, 24, 20)
    check_attention(x, None, None, -1.0, tol=2e-2)


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
