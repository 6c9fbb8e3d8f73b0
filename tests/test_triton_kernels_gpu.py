"""Fused Triton kernels on a CUDA GPU at real sizes, all dtypes. Skipped without CUDA.

Tolerances are relative to the largest magnitude of the expected tensor: fp32 1e-4 (exact fp32
products), TF32 5e-3, fp16 1e-2, bf16 3e-2 — p and ds enter the tensor cores in the input dtype,
as in flash attention. The expected values come from the reference on the same (rounded) inputs in
fp64 (fp32 kernels) or fp32 (half-precision kernels).
"""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

triton = pytest.importorskip("triton")

from fgattn import functional as F  # noqa: E402
from fgattn.ops import reference  # noqa: E402

TOL = {"fp32": 1e-4, "tf32": 5e-3, "fp16": 1e-2, "bf16": 3e-2}
DTYPE = {
    "fp32": torch.float32,
    "tf32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


@pytest.fixture
def tf32_mode(request):
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = request.param == "tf32"
    yield request.param
    torch.backends.cuda.matmul.allow_tf32 = old


def make(shape, mode, scale=1.0, relu=False):
    x = torch.randn(*shape, device="cuda") * scale
    return (x.relu() if relu else x).to(DTYPE[mode])


def close(actual, expected, mode):
    tol = TOL[mode]
    atol = tol * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=tol)


def run(fused, ref, inputs, mode):
    """Output and all gradients of fused (triton) vs ref (reference on upcast inputs)."""
    ref_dtype = torch.float64 if mode == "fp32" else torch.float32
    xs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fused(*xs)
    assert out.dtype == inputs[0].dtype or out.dtype == inputs[-1].dtype
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, xs, g)
    rs = [t.detach().to(ref_dtype).requires_grad_() for t in inputs]
    with torch.backends.cuda.matmul.flags(allow_tf32=False):
        rout = ref(*rs)
        rgrads = torch.autograd.grad(rout, rs, g.to(ref_dtype))
    close(out, rout, mode)
    for a, b in zip(grads, rgrads, strict=True):
        assert a.dtype == b.dtype or a.dtype in (torch.float16, torch.bfloat16, torch.float32)
        close(a, b, mode)


MODES = ["fp32", "tf32", "fp16", "bf16"]


@pytest.mark.parametrize("tf32_mode", MODES, indirect=True)
@pytest.mark.parametrize("shape", [(8, 2048, 196), (4, 512, 49), (2, 512, 784)])
def test_self_attention(tf32_mode, shape):
    x = make(shape, tf32_mode, relu=True)
    x[:, ::7] = 0  # dead channels
    run(
        lambda x: F.channel_attention(x, backend="triton"),
        lambda x: reference.channel_attention(x, x, x, -1.0),
        [x],
        tf32_mode,
    )


@pytest.mark.parametrize("tf32_mode", MODES, indirect=True)
@pytest.mark.parametrize("b, c, length, lv", [(4, 2048, 196, 392), (8, 512, 49, 98)])
def test_cross_attention_wide_value(tf32_mode, b, c, length, lv):
    q, k, v = make((b, c, length), tf32_mode), make((b, c, length), tf32_mode)
    v = make((b, c, lv), tf32_mode)
    run(
        lambda q, k, v: F.channel_attention(q, k, v, backend="triton"),
        lambda q, k, v: reference.channel_attention(q, k, v, -1.0),
        [q, k, v],
        tf32_mode,
    )


@pytest.mark.parametrize("tf32_mode", MODES, indirect=True)
@pytest.mark.parametrize("shape", [(8, 2048, 196), (4, 512, 49)])
def test_contrastive(tf32_mode, shape):
    a, b = make(shape, tf32_mode, relu=True), make(shape, tf32_mode, relu=True)
    a[:, 3::11] = 0
    eta = torch.rand(shape[0], device="cuda") * 1.5
    run(
        lambda a, b, e: F.contrastive_channel_attention(a, b, e, backend="triton"),
        lambda a, b, e: reference.contrastive_channel_attention(a, b, e, -1.0),
        [a, b, eta],
        tf32_mode,
    )


@pytest.mark.parametrize("tf32_mode", ["fp32", "fp16", "bf16"], indirect=True)
def test_non_contiguous_channels_last(tf32_mode):
    x = make((4, 512, 14, 14), tf32_mode, relu=True).contiguous(memory_format=torch.channels_last)
    out = F.channel_attention(x, backend="triton")
    assert out.is_contiguous(memory_format=torch.channels_last)
    run(
        lambda x: F.channel_attention(x, backend="triton"),
        lambda x: reference.channel_attention(
            x.flatten(2), x.flatten(2), x.flatten(2), -1.0
        ).reshape(x.shape),
        [x],
        tf32_mode,
    )


@pytest.mark.parametrize("tf32_mode", ["fp16", "bf16"], indirect=True)
def test_large_magnitudes_half(tf32_mode):
    # |x| ≈ 30 post-ReLU: fp16 logits would reach ~1e5 and overflow; ours are fp32.
    x = make((4, 2048, 196), tf32_mode, scale=30.0, relu=True)
    out = F.channel_attention(x, backend="triton")
    assert torch.isfinite(out).all()
    run(
        lambda x: F.channel_attention(x, backend="triton"),
        lambda x: reference.channel_attention(x, x, x, -1.0),
        [x],
        tf32_mode,
    )


def test_autocast_keeps_fp32_logits():
    x = torch.randn(4, 512, 196, device="cuda").relu()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = F.channel_attention(x, backend="triton")
    with torch.backends.cuda.matmul.flags(allow_tf32=False):
        ref = reference.channel_attention(x.double(), x.double(), x.double(), -1.0)
    close(out, ref, "tf32")


def test_auto_picks_triton_on_cuda(monkeypatch):
    from fgattn import backend

    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    assert backend.resolve("auto", torch.device("cuda")) in ("triton", "cuda")


def test_never_materialises_the_channel_matrix():
    b, c, length = 8, 2048, 196
    x = torch.randn(b, c, length, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    F.channel_attention(x, backend="triton").float().sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < b * c * c * 4 / 8, extra  # one fp32 C x C matrix would be 134 MB


def test_torch_compile_inductor_fullgraph():
    x = torch.randn(2, 512, 196, device="cuda", requires_grad=True)
    eta = torch.rand(2, device="cuda", requires_grad=True)

    def f(x, eta, backend):
        y = F.channel_attention(x.relu(), backend=backend)
        z = F.contrastive_channel_attention(x, x.flip(0), eta, backend=backend)
        return (y * y).mean() + (z * z).mean()

    compiled = torch.compile(f, fullgraph=True)
    got = torch.autograd.grad(compiled(x, eta, "triton"), (x, eta))
    with torch.backends.cuda.matmul.flags(allow_tf32=False):
        want = torch.autograd.grad(f(x, eta, "torch"), (x, eta))
    for a, b in zip(got, want, strict=True):
        close(a, b, "fp32")
