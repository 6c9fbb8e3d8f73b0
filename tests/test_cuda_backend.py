"""The CUDA C++ backend (fgattn/csrc, fgattn.ops.cuda_backend) against the PyTorch reference.

Two implementations of the same ops are tested with the same cases:
  - "emu": the kernel bodies of fgattn/csrc/kernels.cuh compiled for the CPU (cpu_emulation.cpp:
    each block run by 256 threads with a barrier for __syncthreads) as library fgattn_cuda_emu.
    Runs wherever a C++ compiler and ninja exist; checks the index math, masking, shared-memory
    phases, backward derivations and the Python fake/autograd registrations without a GPU.
  - "cuda": the real extension (JIT-built on first use if needed) on a GPU; skipped without CUDA.
The emulation computes in fp32 on the CPU exactly as the kernels do, but it cannot catch what only
the GPU does (races the barrier hides, launch limits, nvcc code generation): the "cuda" cases are
the ones that matter and need a GPU run.
"""

from __future__ import annotations

import pytest
import torch

from fgattn import backend as fb
from fgattn import functional as F
from fgattn.ops import cuda_backend as cb
from fgattn.ops import reference

HAS_CUDA = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

# max|got − ref| / max|ref| allowed; bf16/fp16 inputs, fp32 math: the error is the output rounding
# (and, in the backward, δ computed from the rounded output).
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


# ----------------------------------------------------------------------------------------------
# Implementations under test


@pytest.fixture(scope="session")
def emu_ops(tmp_path_factory):
    from torch.utils.cpp_extension import is_ninja_available, load

    if not is_ninja_available():
        pytest.skip("the CPU emulation is built with torch.utils.cpp_extension, which needs ninja")

    load(
        name="fgattn_cuda_emu",
        sources=[str(cb.CSRC / "cpu_emulation.cpp")],
        extra_cflags=["-O2", "-Wall"],
        build_directory=str(tmp_path_factory.mktemp("fgattn_cuda_emu")),
        is_python_module=False,
    )
    cb._register("fgattn_cuda_emu")
    return torch.ops.fgattn_cuda_emu


@pytest.fixture(scope="session")
def cuda_ops():
    if not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    if not cb.AVAILABLE:
        pytest.fail(
            f"CUDA GPU present but the cuda backend is unavailable: {cb.UNAVAILABLE_REASON}"
        )
    cb._ensure_loaded()  # may JIT-build (minutes) on the first run
    return torch.ops.fgattn_cuda


@pytest.fixture(params=["emu", pytest.param("cuda", marks=needs_gpu)])
def impl(request):
    """(ops namespace, device) of the implementation under test."""
    if request.param == "emu":
        return request.getfixturevalue("emu_ops"), "cpu"
    return request.getfixturevalue("cuda_ops"), "cuda"


def _close(got, want, dtype: torch.dtype, what: str, tol: float | None = None, floor=1e-6):
    assert got.shape == want.shape, what
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err = (got.double() - want.double()).abs().max().item()
    scale = max(want.double().abs().max().item(), floor)
    tol = TOL[dtype] if tol is None else tol
    assert err / scale <= tol, f"{what}: relative max error {err / scale:.2e} ({dtype})"


def _leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().requires_grad_()


def _check_attention(ops, q, k, v, scale, dtype, same=False, tol=None, floor=1e-6, tf32=False):
    """Output and every gradient of the op against the reference (fp32 reference for low dtypes
    gets the same low-precision inputs)."""
    inputs = (q,) if same else (q, k, v)
    got_in = [_leaf(t) for t in inputs]
    ref_in = [_leaf(t) for t in inputs]
    qkv_got = got_in * 3 if same else got_in
    qkv_ref = ref_in * 3 if same else ref_in
    out = cb.apply_channel_attention(ops, *qkv_got, scale, tf32)
    want = reference.channel_attention(*qkv_ref, scale)
    assert out.dtype == v.dtype
    _close(out, want, dtype, "out", tol, floor)
    grad = torch.randn_like(want)
    got_g = torch.autograd.grad(out, got_in, grad)
    want_g = torch.autograd.grad(want, ref_in, grad)
    names = ("dx",) if same else ("dq", "dk", "dv")
    for name, g, w in zip(names, got_g, want_g, strict=True):
        _close(g, w, dtype, name, tol, floor)


def _check_contrastive(ops, x_a, x_b, eta, scale, dtype, tol=None, tf32=False):
    got_in = [_leaf(t) for t in (x_a, x_b, eta)]
    ref_in = [_leaf(t) for t in (x_a, x_b, eta)]
    out = cb.apply_contrastive(ops, *got_in, scale, tf32)
    want = reference.contrastive_channel_attention(*ref_in, scale)
    assert out.dtype == x_a.dtype
    _close(out, want, dtype, "out", tol)
    grad = torch.randn_like(want)
    got_g = torch.autograd.grad(out, got_in, grad)
    want_g = torch.autograd.grad(want, ref_in, grad)
    for name, g, w in zip(("dx_a", "dx_b", "deta"), got_g, want_g, strict=True):
        _close(g, w, dtype, name, tol)


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# C = 70: two row blocks and a masked tail; L = 20: a 16-wide chunk plus a masked tail.
SHAPES = [(2, 70, 20), (1, 5, 3), (2, 64, 16), (1, 130, 33)]


# ----------------------------------------------------------------------------------------------
# Correctness (emulation always, GPU when present)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_attention_matches_reference(impl, dtype, shape):
    ops, dev = impl
    b, c, length = shape
    q, k, v = (torch.randn(b, c, length, device=dev).to(dtype) for _ in range(3))
    _check_attention(ops, q, k, v, -0.5, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_wide_v(impl, dtype):
    # PCA-Net: v = [F1 | F2] is wider than q, k; Lv = 150 spans three masked column tiles.
    ops, dev = impl
    q, k = (torch.randn(2, 70, 20, device=dev).to(dtype) for _ in range(2))
    v = torch.randn(2, 70, 150, device=dev).to(dtype)
    _check_attention(ops, q, k, v, -0.3, dtype)
    _check_attention(ops, q, k, v[:, :, :7], -0.3, dtype)  # and narrower than L


def test_attention_many_column_tiles(impl):
    # L, Lv > 256: several column tiles per grid row in every kernel (forward 256 columns per
    # block, dq 256, dk/dv 128), the last ones partly masked.
    ops, dev = impl
    q, k = (torch.randn(1, 70, 300, device=dev) / 4 for _ in range(2))
    v = torch.randn(1, 70, 530, device=dev)
    _check_attention(ops, q, k, v, -0.3, torch.float32)
    _check_attention(ops, q.bfloat16(), k.bfloat16(), v.bfloat16(), -0.3, torch.bfloat16)
    eta = torch.rand(1, device=dev)
    _check_contrastive(ops, q, k, eta, -0.3, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_self_attention_one_tensor(impl, dtype):
    # SCI: q = k = v = X, one tensor; its gradient sums the three paths.
    ops, dev = impl
    x = torch.randn(2, 70, 20, device=dev).relu().to(dtype)
    _check_attention(ops, x, x, x, -1.0 / 20, dtype, same=True)


def test_fp32_tf32_tensor_cores(impl):
    # fp32 on the TF32 path (allow_tf32): inputs and P rounded to 10 mantissa bits.
    ops, dev = impl
    q, k = (torch.randn(2, 70, 20, device=dev) for _ in range(2))
    v = torch.randn(2, 70, 150, device=dev)
    _check_attention(ops, q, k, v, -0.3, torch.float32, tol=5e-3, tf32=True)
    _check_attention(ops, q, q, q, -0.3, torch.float32, same=True, tol=5e-3, tf32=True)
    eta = torch.rand(2, device=dev)
    # The contrastive backward amplifies it (dS ∘ sign(W), cancellations in G∘D − δ).
    _check_contrastive(ops, q, k, eta, -0.3, torch.float32, tol=2e-2, tf32=True)


def test_attention_non_contiguous(impl):
    ops, dev = impl
    q = torch.randn(2, 20, 70, device=dev).transpose(1, 2)  # (B, C, L) with stride(2) = C
    k = torch.randn(2, 70, 40, device=dev)[:, :, ::2]  # stride(2) = 2
    v = torch.randn(70, 2, 33, device=dev).transpose(0, 1)  # batch stride smaller than C's
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    _check_attention(ops, q, k, v, -0.5, torch.float32)


def test_attention_dead_channels_and_large_magnitudes(impl):
    # Post-ReLU features with |x| ≈ 30 give logits near −1e4 with scale −1: the row max must be
    # taken after scaling; all-zero (dead) channels give a uniform row.
    ops, dev = impl
    x = (30 * torch.randn(2, 70, 20, device=dev)).relu()
    x[:, ::7] = 0
    _check_attention(ops, x, x, x, -1.0, torch.float32, same=True)
    # Logits of size 1e4 carry an fp32 rounding of ~1e-3 that depends on the summation order,
    # so any two correct implementations differ by ~1e-4 relative in p and the gradients; with
    # one-hot rows dq is exactly 0 in the reference and rounding noise (dp − δ) here: compare
    # against gradients of order 1 (floor), the size of dv for a unit output gradient.
    q, k = (30 * torch.randn(2, 70, 20, device=dev) for _ in range(2))
    _check_attention(ops, q, k, x, -1.0, torch.float32, tol=1e-2, floor=1.0)
    _check_attention(ops, q, k, x, 1.0, torch.float32, tol=1e-2, floor=1.0)  # positive scale


def test_attention_mixed_dtypes_promote(impl):
    ops, dev = impl
    q = torch.randn(1, 9, 5, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, 9, 5, device=dev)
    v = torch.randn(1, 9, 6, device=dev, dtype=torch.float16)
    out = cb.apply_channel_attention(ops, q, k, v, -1.0)
    assert out.dtype == torch.float16
    _close(out, reference.channel_attention(q, k, v, -1.0), torch.float16, "out")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_contrastive_matches_reference(impl, dtype, shape):
    ops, dev = impl
    b, c, length = shape
    x_a, x_b = (torch.randn(b, c, length, device=dev).to(dtype) for _ in range(2))
    eta = torch.rand(b, device=dev)
    _check_contrastive(ops, x_a, x_b, eta, -0.5, dtype)


def test_contrastive_dead_channels_non_contiguous(impl):
    ops, dev = impl
    x_a = torch.randn(2, 20, 70, device=dev).relu().transpose(1, 2)
    x_b = torch.randn(2, 70, 20, device=dev).relu()
    x_a[:, ::5] = 0
    x_b[:, 1::6] = 0
    eta = torch.tensor([0.3, 1.7], device=dev)
    _check_contrastive(ops, x_a, x_b, eta, -0.2, torch.float32)


def test_contrastive_large_magnitudes_forward(impl):
    # Forward only: with near one-hot softmaxes many W entries sit at 0, where sign(W) (the
    # gradient) legitimately depends on the last rounding bit.
    ops, dev = impl
    x_a, x_b = ((30 * torch.randn(2, 70, 20, device=dev)).relu() for _ in range(2))
    eta = torch.tensor([0.5, 2.0], device=dev)
    out = cb.apply_contrastive(ops, x_a, x_b, eta, -1.0)
    want = reference.contrastive_channel_attention(x_a, x_b, eta, -1.0)
    _close(out, want, torch.float32, "out")


def test_lse_is_saved(impl):
    ops, dev = impl
    q, k, v = (torch.randn(2, 70, 20, device=dev) for _ in range(3))
    _, lse = ops.channel_attention_fwd(q, k, v, -0.5, False)
    want = torch.logsumexp(-0.5 * q @ k.transpose(1, 2), dim=-1)
    torch.testing.assert_close(lse, want, rtol=1e-5, atol=1e-5)


def test_opcheck(impl):
    ops, dev = impl
    q, k = (torch.randn(2, 9, 5, device=dev, requires_grad=True) for _ in range(2))
    v = torch.randn(2, 9, 7, device=dev, requires_grad=True)
    torch.library.opcheck(ops.channel_attention_fwd.default, (q, k, v, -1.0, False))
    x_a, x_b = (torch.randn(2, 9, 5, device=dev, requires_grad=True) for _ in range(2))
    eta = torch.rand(2, device=dev, requires_grad=True)
    torch.library.opcheck(
        ops.contrastive_channel_attention_fwd.default, (x_a, x_b, eta, -1.0, False)
    )


def test_fake_shapes(impl):
    ops, _ = impl
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(3, 10, 6, dtype=torch.bfloat16)
        v = torch.empty(3, 10, 13, dtype=torch.bfloat16)
        out, lse = ops.channel_attention_fwd(q, q, v, -1.0, False)
        assert out.shape == (3, 10, 13) and out.dtype == torch.bfloat16
        assert lse.shape == (3, 10) and lse.dtype == torch.float32
        grads = ops.channel_attention_bwd(out, q, q, v, out, lse, -1.0, False)
        assert [g.shape for g in grads] == [q.shape, q.shape, v.shape]
        eta = torch.empty(3)
        out, lse_a, lse_b = ops.contrastive_channel_attention_fwd(q, q, eta, -1.0, False)
        assert out.shape == q.shape and lse_a.shape == lse_b.shape == (3, 10)


def test_compile(impl):
    ops, dev = impl
    q, k, v = (torch.randn(2, 70, 20, device=dev, requires_grad=True) for _ in range(3))

    def f(q, k, v):
        return cb.apply_channel_attention(ops, q, k, v, -0.5).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    want = torch.autograd.grad(f(q, k, v), (q, k, v))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def test_kernel_checks(impl):
    ops, dev = impl
    q = torch.randn(2, 9, 5, device=dev)
    with pytest.raises(RuntimeError, match="one dtype per call"):
        ops.channel_attention_fwd(q, q.double(), q, -1.0, False)
    with pytest.raises(RuntimeError, match="k must have q's length"):
        ops.channel_attention_fwd(q, q[:, :, :4], q, -1.0, False)
    with pytest.raises(RuntimeError, match="eta must be"):
        ops.contrastive_channel_attention_fwd(q, q, torch.rand(3, device=dev), -1.0, False)


# ----------------------------------------------------------------------------------------------
# Through the public API on the GPU (backend="cuda", auto)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_functional_backend_cuda(cuda_ops, dtype):
    x = torch.randn(2, 70, 7, 5, device="cuda").relu().to(dtype)  # (B, C, H, W)
    got = F.channel_attention(x, backend="cuda")
    _close(got, F.channel_attention(x, backend="torch"), dtype, "sci")
    f1, f2 = (torch.randn(2, 70, 20, device="cuda").to(dtype) for _ in range(2))
    v = torch.cat([f1, f2], dim=2)
    got = F.channel_attention(f1, f2, v, backend="cuda")
    _close(got, F.channel_attention(f1, f2, v, backend="torch"), dtype, "co-attention")
    eta = torch.rand(2, device="cuda")
    got = F.contrastive_channel_attention(f1, f2, eta, backend="cuda")
    _close(got, F.contrastive_channel_attention(f1, f2, eta, backend="torch"), dtype, "cca")
    # float64 and empty inputs go to the reference.
    xd = x.double()
    assert F.channel_attention(xd, backend="cuda").dtype == torch.float64


@needs_gpu
def test_functional_compile_cuda(cuda_ops):
    x = torch.randn(2, 70, 20, device="cuda", requires_grad=True)

    def f(x):
        return F.channel_attention(x, backend="cuda").sum()

    got = torch.autograd.grad(torch.compile(f, fullgraph=True)(x), x)[0]
    want = torch.autograd.grad(F.channel_attention(x, backend="torch").sum(), x)[0]
    _close(got, want, torch.float32, "dx")


@needs_gpu
def test_auto_takes_built_cuda_after_triton(cuda_ops, monkeypatch):
    # Triton leads `auto` until the extension is measured faster (fgattn.backend._AUTO_ORDER_CUDA).
    monkeypatch.delenv(fb.ENV_VAR, raising=False)
    assert cb.ready()
    monkeypatch.setitem(fb._loaded, "triton", None)
    assert fb.resolve("auto", torch.device("cuda")) == "cuda"


# ----------------------------------------------------------------------------------------------
# Without the extension / without a GPU (run on every machine)


def test_module_imports_and_reports():
    assert isinstance(cb.AVAILABLE, bool)
    assert isinstance(cb.UNAVAILABLE_REASON, str)
    assert cb.AVAILABLE or cb.UNAVAILABLE_REASON
    if not HAS_CUDA:
        assert not cb.AVAILABLE
        assert "CUDA" in cb.UNAVAILABLE_REASON
        assert not cb.ready()


@pytest.mark.skipif(HAS_CUDA, reason="CPU-only behaviour")
def test_auto_never_picks_cuda_on_cpu(monkeypatch):
    monkeypatch.delenv(fb.ENV_VAR, raising=False)
    assert fb.resolve("auto", torch.device("cpu")) == "torch"
    assert not fb.is_available("cuda")
    with pytest.raises(RuntimeError, match=r"'cuda' is not available.*CUDA"):
        F.channel_attention(torch.randn(1, 4, 3), backend="cuda")
    with pytest.raises(RuntimeError, match="'cuda' is not available"):
        F.contrastive_channel_attention(
            torch.randn(1, 4, 3), torch.randn(1, 4, 3), torch.rand(1), backend="cuda"
        )


def test_auto_skips_unbuilt_backend(monkeypatch):
    """`auto` must not take a backend whose ready() is False (it would JIT-compile for minutes)."""

    class Unbuilt:
        AVAILABLE = True

        @staticmethod
        def ready():
            return False

    monkeypatch.delenv(fb.ENV_VAR, raising=False)
    monkeypatch.setitem(fb._loaded, "cuda", Unbuilt)
    monkeypatch.setitem(fb._loaded, "triton", None)
    assert fb.resolve("auto", torch.device("cuda")) == "torch"
    monkeypatch.setattr(Unbuilt, "ready", staticmethod(lambda: True))
    assert fb.resolve("auto", torch.device("cuda")) == "cuda"
    assert fb.resolve("cuda", torch.device("cuda")) == "cuda"  # explicit: no ready() needed


def test_cpu_tensors_rejected_by_module():
    x = torch.randn(1, 4, 3)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        cb.channel_attention(x, x, x, -1.0)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        cb.contrastive_channel_attention(x, x, torch.rand(1), -1.0)


def test_build_check_skips_without_nvcc(monkeypatch, capsys):
    monkeypatch.setattr(cb, "cuda_home", lambda: None)
    assert cb.build_check() == 0
    assert "SKIPPED" in capsys.readouterr().out


def test_cache_dir_names_source_hash(monkeypatch, tmp_path):
    monkeypatch.setenv("FGATTN_CUDA_CACHE", str(tmp_path))
    path = cb.cache_dir()
    assert path.is_relative_to(tmp_path) and path.name == cb._jit_name()
    assert not cb._jit_built()


def test_kernel_sources_are_package_data():
    for name in cb.SOURCES + cb.HEADERS:
        assert (cb.CSRC / name).is_file(), name


def test_parse_resource_usage():
    """The build check's per-kernel report, from (abridged) real cuobjdump output."""
    text = """
Fatbin elf code:
================
arch = sm_90
code version = [1,8]

Resource usage:
 Common:
  GLOBAL:28 CONSTANT[4]:224
 Function _ZN6fgattn13co_bwd_kernelIN3c108BFloat16ELb1EEEvNS_8CoParamsIT_EE:
  REG:206 STACK:0 SHARED:37888 LOCAL:0 CONSTANT[0]:576 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _ZN6fgattn13ca_fwd_kernelIfLb0EEEvNS_8CaParamsIT_EE:
  REG:236 STACK:0 SHARED:44544 LOCAL:16 CONSTANT[0]:576 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    lines = cb.describe_kernels(cb.usage_records(text))
    assert len(lines) == 2
    assert lines[0].split()[:4] == ["sm_90", "co_bwd_kernel", "bf16", "wmma-tf32"]
    assert "regs 206" in lines[0] and "smem  37.0 KiB" in lines[0] and "spill 0 B" in lines[0]
    assert lines[1].split()[:4] == ["sm_90", "ca_fwd_kernel", "fp32", "fma"]
    assert "spill 16 B" in lines[1]
