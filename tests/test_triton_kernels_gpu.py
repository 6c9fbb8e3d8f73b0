"""The "triton_tiled" kernels (auto's Triton path) at real sizes in every dtype on a CUDA GPU; on
small sizes through Triton's CPU interpreter elsewhere, so that a mistake in this module cannot
wait for a GPU to show. Every implementation at small sizes: tests/test_conformance.py.

Tolerances are relative to the largest magnitude of the expected tensor: fp32 1e-4 (exact fp32
products), TF32 5e-3, fp16 1e-2, bf16 3e-2 — p and ds enter the tensor cores in the input dtype,
as in flash attention. The expected values come from the reference on the same (rounded) inputs in
fp64 (fp32 kernels) or fp32 (half-precision kernels). The interpreter runs fp32, "tf32" (the same
products there) and fp16; its bf16 tl.dot is unreliable.
"""

import contextlib

import pytest
import torch

pytest.importorskip("triton")

from fgattn import backends
from fgattn.functional import channel_attention, contrastive_channel_attention
from fgattn.ops import reference

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
pytestmark = pytest.mark.kernels
gpu_only = pytest.mark.skipif(not ON_GPU, reason="measures or compiles for a CUDA GPU")

TOL = {"fp32": 1e-4, "tf32": 5e-3, "fp16": 1e-2, "bf16": 3e-2}
DTYPE = {
    "fp32": torch.float32,
    "tf32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
MODES = ["fp32", "tf32", "fp16", "bf16"] if ON_GPU else ["fp32", "tf32", "fp16"]


def sizes(gpu, cpu):
    """Real sizes on the GPU, small ones for the interpreter."""
    return gpu if ON_GPU else cpu


@contextlib.contextmanager
def matmul_tf32(enabled: bool):
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


@pytest.fixture
def tf32_mode(request):
    with matmul_tf32(request.param == "tf32"):
        yield request.param


def make(shape, mode, scale=1.0, relu=False):
    x = torch.randn(*shape, device=DEVICE) * scale
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
    with matmul_tf32(False):
        rout = ref(*rs)
        rgrads = torch.autograd.grad(rout, rs, g.to(ref_dtype))
    close(out, rout, mode)
    for a, b in zip(grads, rgrads, strict=True):
        assert a.dtype == b.dtype or a.dtype in (torch.float16, torch.bfloat16, torch.float32)
        close(a, b, mode)


@pytest.mark.parametrize("tf32_mode", MODES, indirect=True)
@pytest.mark.parametrize(
    "shape", sizes([(8, 2048, 196), (4, 512, 49), (2, 512, 784)], [(2, 48, 20), (2, 24, 49)])
)
def test_self_attention(tf32_mode, shape):
    x = make(shape, tf32_mode, relu=True)
    x[:, ::7] = 0  # dead channels
    run(
        lambda x: channel_attention(x, backend="triton_tiled"),
        lambda x: reference.self_attention(x, -1.0),
        [x],
        tf32_mode,
    )


@pytest.mark.parametrize("tf32_mode", MODES, indirect=True)
@pytest.mark.parametrize(
    "b, c, length, lv", sizes([(4, 2048, 196, 392), (8, 512, 49, 98)], [(2, 40, 20, 40)])
)
def test_cross_attention_wide_value(tf32_mode, b, c, length, lv):
    q, k = make((b, c, length), tf32_mode), make((b, c, length), tf32_mode)
    v = make((b, c, lv), tf32_mode)
    run(
        lambda q, k, v: channel_attention(q, k, v, backend="triton_tiled"),
        lambda q, k, v: reference.cross_attention(q, k, v, -1.0),
        [q, k, v],
        tf32_mode,
    )


@pytest.mark.parametrize("tf32_mode", MODES, indirect=True)
@pytest.mark.parametrize("shape", sizes([(8, 2048, 196), (4, 512, 49)], [(2, 40, 20)]))
def test_contrastive(tf32_mode, shape):
    a, b = make(shape, tf32_mode, relu=True), make(shape, tf32_mode, relu=True)
    a[:, 3::11] = 0
    eta = torch.rand(shape[0], device=DEVICE) * 1.5
    if tf32_mode != "fp32":
        # |W_A − η W_B| has a kink where W_A = η W_B: rounded products put an element on either
        # side and flip its gradient's sign. A negative η keeps W_A − η W_B > 0, away from it;
        # exact fp32 keeps testing the kink.
        eta = -0.5 - eta
    run(
        lambda a, b, e: contrastive_channel_attention(a, b, e, backend="triton_tiled"),
        lambda a, b, e: reference.contrastive_attention(a, b, e, -1.0),
        [a, b, eta],
        tf32_mode,
    )


@pytest.mark.parametrize("tf32_mode", [m for m in MODES if m != "tf32"], indirect=True)
def test_non_contiguous_channels_last(tf32_mode):
    shape = sizes((4, 512, 14, 14), (2, 24, 5, 4))
    x = make(shape, tf32_mode, relu=True).contiguous(memory_format=torch.channels_last)
    out = channel_attention(x, backend="triton_tiled")
    assert out.is_contiguous(memory_format=torch.channels_last)
    run(
        lambda x: channel_attention(x, backend="triton_tiled"),
        lambda x: reference.self_attention(x.flatten(2), -1.0).reshape(x.shape),
        [x],
        tf32_mode,
    )


@pytest.mark.parametrize("tf32_mode", [m for m in MODES if m in ("fp16", "bf16")], indirect=True)
def test_large_magnitudes_half(tf32_mode):
    # |x| ≈ 30 post-ReLU: fp16 logits would reach ~1e5 and overflow; ours are fp32.
    x = make(sizes((4, 2048, 196), (2, 32, 49)), tf32_mode, scale=30.0, relu=True)
    out = channel_attention(x, backend="triton_tiled")
    assert torch.isfinite(out).all()
    run(
        lambda x: channel_attention(x, backend="triton_tiled"),
        lambda x: reference.self_attention(x, -1.0),
        [x],
        tf32_mode,
    )


def test_autocast_keeps_fp32_logits():
    x = torch.randn(*sizes((4, 512, 196), (2, 32, 20)), device=DEVICE).relu()
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = channel_attention(x, backend="triton_tiled")
    with matmul_tf32(False):
        ref = reference.self_attention(x.double(), -1.0)
    close(out, ref, "tf32")


@gpu_only
def test_auto_picks_a_fused_path_on_cuda():
    x = torch.randn(32, 2048, 196, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    major, _ = torch.cuda.get_device_capability()
    assert backends.resolve("self", x) == ("sdpa_cudnn" if major >= 9 else "sdpa_flash")
    long = torch.randn(2, 512, 784, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    assert backends.resolve("self", long) == "triton_tiled"


@gpu_only
def test_never_materialises_the_channel_matrix():
    b, c, length = 8, 2048, 196
    x = torch.randn(b, c, length, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(x)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    channel_attention(x, backend="triton_tiled").backward(g)
    torch.cuda.synchronize()
    # Beyond the output and x's gradient (x's size each), only per-row statistics: far below one
    # fp32 C x C matrix per batch (134 MB here).
    extra = torch.cuda.max_memory_allocated() - base - 2 * x.nbytes
    assert extra < b * c * c * 4 / 8, extra


def test_torch_compile_fullgraph():
    x = torch.randn(*sizes((2, 512, 196), (2, 24, 20)), device=DEVICE, requires_grad=True)
    eta = torch.rand(2, device=DEVICE, requires_grad=True)

    def f(x, eta, backend):
        y = channel_attention(x.relu(), backend=backend)
        z = contrastive_channel_attention(x, x.flip(0), eta, backend=backend)
        return (y * y).mean() + (z * z).mean()

    compiled = torch.compile(f, fullgraph=True, backend="inductor" if ON_GPU else "aot_eager")
    got = torch.autograd.grad(compiled(x, eta, "triton_tiled"), (x, eta))
    with matmul_tf32(False):
        want = torch.autograd.grad(f(x, eta, "reference"), (x, eta))
    for a, b in zip(got, want, strict=True):
        close(a, b, "fp32")
