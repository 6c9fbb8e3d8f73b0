"""TMA loads in the flash-shaped forward kernels (`flash._fwd_kernel`, the contrastive
`_contrastive_stats_kernel` / `_contrastive_fwd_kernel`): each config of their autotune space
comes twice, streaming k / v tiles through masked pointer loads (cp.async once pipelined) or
through on-device tensor descriptors (`USE_TMA`, TMA on sm_90). Checked here:
- the config space and its prune: TMA configs only on an NVIDIA target of compute capability
  ≥ 9.0 with Triton ≥ 3.5, never in the backward kernels;
- the allocator the descriptors need is set for fgattn's launch only;
- the TMA path's numbers: bitwise those of the pointer path under the interpreter (same tiles,
  same arithmetic, zeros past the last row either way), and against the fp64 reference, forward
  and gradients, at several tiles, with partial row blocks and B > 1 (a descriptor reaching past
  row C must read zeros, not the next batch's rows).
Without CUDA the kernels run in Triton's interpreter, which supports tensor descriptors from
Triton 3.4 on; `tuning.INTERPRETER_TMA` picks the load path of its configs. On a GPU the autotune
space is cut to one load path instead. That the TMA configs compile to TMA copies on sm_90 is
`benchmarks/kernel_resources.py`'s job (benchmarks/README.md); it needs no GPU but minutes of CPU.
"""

import contextvars
import os

import pytest
import torch
from _kernels import forget_tuning, interpreter_configs
from _numerics import DEVICE, close, leaf, randn

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402

from fgattn.functional import channel_attention, contrastive_channel_attention  # noqa: E402
from fgattn.ops import reference  # noqa: E402
from fgattn.ops.triton import flash, library, tuning  # noqa: E402

INTERPRETED = DEVICE == "cpu"
TMA_KERNELS = (flash._fwd_kernel, flash._contrastive_stats_kernel, flash._contrastive_fwd_kernel)
OTHER_KERNELS = (
    flash._bwd_delta_self_kernel,
    flash._bwd_self_kernel,
    flash._bwd_delta_cross_kernel,
    flash._bwd_dq_kernel,
    flash._bwd_dk_kernel,
    flash._bwd_dv_kernel,
    flash._contrastive_rowsum_kernel,
    flash._contrastive_bwd_kernel,
)
needs_kernels = pytest.mark.kernels


def _forget_tuning():
    forget_tuning(flash)


@pytest.fixture(params=[False, True], ids=["pointers", "tma"])
def use_tma(request, monkeypatch):
    """Run the forward kernels with one load path: the interpreter's one config, or on a GPU the
    autotune space cut to that path (TMA skipped where this GPU / Triton has no TMA configs)."""
    tma = request.param
    if tma and not INTERPRETED and not tuning.tma_available():
        pytest.skip("no TMA configs on this GPU / Triton (sm_90+ and Triton >= 3.5)")
    monkeypatch.setattr(tuning, "INTERPRETER_TMA", tma)
    for kernel in TMA_KERNELS:
        only = [cfg for cfg in kernel.configs if cfg.kwargs["USE_TMA"] == tma]
        monkeypatch.setattr(kernel, "configs", only)
    _forget_tuning()
    yield tma
    _forget_tuning()


@pytest.fixture(params=[(16, 16), (32, 16), (16, 64)], ids=lambda t: f"tiles{t[0]}x{t[1]}")
def tiles(request, monkeypatch):
    """The interpreter's config: resident rows x streamed rows (partial blocks at C = 40)."""
    bm, bn = request.param
    with interpreter_configs(monkeypatch, flash, "flash", {"BLOCK_M": bm, "BLOCK_N": bn}):
        yield request.param


def assert_loaded_with(tma, kernels):
    for kernel in kernels:
        assert kernel.best_config.kwargs["USE_TMA"] is tma, kernel.best_config


# ---------------------------------------------------------------------------------------------
# Config space and prune


class _Target:
    """A Triton driver that only names a target (no GPU needed), for the prune's target check."""

    def __init__(self, backend, arch):
        self.target = GPUTarget(backend, arch, 32)

    def get_current_target(self):
        return self.target


@pytest.fixture
def target(monkeypatch):
    """Pretend to launch for `target(backend, arch)`: off the interpreter, any shared memory."""
    attr = "_active" if hasattr(driver, "_active") else "active"  # Triton >= 3.5 / 3.4
    monkeypatch.setattr(tuning, "interpreting", lambda: False)
    monkeypatch.setattr(tuning, "shared_memory_limit", lambda device: None)

    def set_target(backend, arch):
        monkeypatch.setattr(driver, attr, _Target(backend, arch))

    return set_target


def _kept(kernel, length=196, dtype=torch.bfloat16):
    kp = flash.pieces(length)
    kwargs = dict(K0=kp[0], K1=kp[1], K2=kp[2], V0=kp[0], V1=kp[1], V2=kp[2], IS_SELF=True)
    x = torch.empty(0, dtype=dtype)
    return kernel.early_config_prune(kernel.configs, {"X": x}, **kwargs)


def test_every_tile_config_comes_with_both_loads():
    spaces = [tuning.FLASH_SPACES[kind] for kind in ("fwd", "cstats", "cfwd")]
    for kernel, space in zip(TMA_KERNELS, spaces, strict=True):
        pairs = [
            (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
            for c in kernel.configs
        ]
        assert sorted(pairs) == sorted(space * 2)
        for tma in (False, True):
            assert len([c for c in kernel.configs if c.kwargs["USE_TMA"] is tma]) == len(space)
    for kernel in OTHER_KERNELS:  # the backward streams through pointers only
        assert all("USE_TMA" not in c.kwargs for c in kernel.configs)


@pytest.mark.parametrize(
    ("backend", "arch", "new_triton", "want"),
    [
        ("cuda", 90, True, True),  # H100 / H200
        ("cuda", 100, True, True),  # Blackwell has TMA too
        ("cuda", 80, True, False),  # A100: cp.async only
        ("cuda", 89, True, False),
        ("cuda", 90, False, False),  # Triton 3.4: no allocator scoped to a launch
        ("hip", "gfx942", True, False),
    ],
)
def test_tma_configs_kept_only_where_they_can_run(target, monkeypatch, backend, arch, new_triton,
                                                  want):  # fmt: skip
    target(backend, arch)
    monkeypatch.setattr(tuning, "TMA_TRITON", new_triton)
    assert tuning.tma_available() is want
    for kernel in TMA_KERNELS:
        kept = _kept(kernel)
        loads = {c.kwargs["USE_TMA"] for c in kept}
        assert loads == ({False, True} if want else {False})
        # the same tiles either way: TMA adds a load path, the shared-memory prune is unchanged
        tiles = {tma: {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                       for c in kept if c.kwargs["USE_TMA"] is tma} for tma in loads}  # fmt: skip
        assert all(tiles[tma] == tiles[False] for tma in loads)


@pytest.mark.parametrize("tma", [False, True])
def test_interpreter_runs_its_configs_with_the_load_path_asked(monkeypatch, tma):
    monkeypatch.setattr(tuning, "interpreting", lambda: True)
    monkeypatch.setattr(tuning, "INTERPRETER_TMA", tma)
    (tiles,) = tuning.INTERPRETER["flash"]
    for kernel in TMA_KERNELS:
        (config,) = kernel.early_config_prune(kernel.configs, {}, K0=16, K1=0, K2=0)
        assert config.kwargs["USE_TMA"] is tma
        assert {k: config.kwargs[k] for k in tiles} == tiles


# ---------------------------------------------------------------------------------------------
# The allocator and the alignment the descriptors need


def _allocator_now():
    """Triton's allocator as a launch now would see it (a ContextVar from Triton 3.5 on)."""
    from triton.runtime import _allocation

    current = _allocation._allocator
    return current.get() if isinstance(current, contextvars.ContextVar) else current


class _Probe:
    """Stands in for a kernel: `probe[grid](...)` records Triton's allocator at launch time."""

    def __init__(self):
        self.seen = []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.seen.append(_allocator_now())
            return "ran"

        return run


def test_launch_sets_the_allocator_for_its_own_launch_only():
    def user_code():
        mine = lambda size, alignment, stream: torch.empty(size, dtype=torch.int8)  # noqa: E731
        triton.set_allocator(mine)
        probe = _Probe()
        assert tuning.launch(probe, (1,), 1, x=2) == "ran"
        return mine, probe.seen[0], _allocator_now()

    # a copy of this context, so that the user's allocator set here does not leak into the suite
    mine, during, after = contextvars.copy_context().run(user_code)
    if tuning.TMA_TRITON:
        assert during is tuning._scratch
    else:  # Triton 3.4: a global allocator; launch sets none (and no TMA config runs on a GPU)
        assert during is mine
    assert after is mine  # the user's allocator is back (and was never replaced outside)


def test_scratch_allocator_gives_what_triton_asks():
    if not torch.cuda.is_available():
        pytest.skip("allocates on the GPU")
    buf = tuning._scratch(384, 128, None)
    assert buf.numel() == 384 and buf.data_ptr() % 128 == 0 and buf.is_cuda


def test_aligned_copies_a_base_that_is_not_16_byte_aligned():
    # a TMA descriptor's base must be 16-byte aligned: a view 4 bytes into its storage is copied
    storage = torch.randn(2 * 3 * 16 + 1)
    x = storage[1:].view(2, 3, 16)
    assert x.is_contiguous() and x.data_ptr() % 16 == 4
    y = library.aligned(x, 1, 16, 16)
    assert y.data_ptr() % 16 == 0 and torch.equal(y, x)
    aligned = torch.randn(2, 3, 16)
    assert library.aligned(aligned, 1, 16, 16) is aligned  # no copy where none is needed


# ---------------------------------------------------------------------------------------------
# Numerics: the TMA path against the pointer path and against the reference


def _self(x):
    return flash._forward(x, x, x, -1.0, False, True)


def _cross(q, k, v):
    return flash._forward(q, k, v, 0.3, False)


def _contrastive(a, b, eta):
    return flash._contrastive_forward(a, b, eta, -0.2, False)


CASES = {  # name: (launcher, inputs, kernels it runs)
    "self": (_self, lambda: (randn(2, 40, 49),), (flash._fwd_kernel,)),
    "self-196": (_self, lambda: (randn(2, 19, 196, scale=0.3),), (flash._fwd_kernel,)),
    # lv = 300: two column tiles of v, each 150 wide, padded to 128 + 32
    "cross": (
        _cross,
        lambda: (randn(2, 40, 20), randn(2, 40, 20), randn(2, 40, 300)),
        (flash._fwd_kernel,),
    ),
    "contrastive": (
        _contrastive,
        lambda: (randn(2, 40, 36), randn(2, 40, 36), torch.tensor([0.4, 1.3], device=DEVICE)),
        (flash._contrastive_stats_kernel, flash._contrastive_fwd_kernel),
    ),
}


@needs_kernels
@pytest.mark.parametrize("case", sorted(CASES))
def test_tma_loads_give_the_pointer_loads_bits(tiles, monkeypatch, case):
    if not INTERPRETED:
        pytest.skip("on a GPU the two load paths may be tuned to different tiles")
    launcher, make, kernels = CASES[case]
    inputs = make()
    results = {}
    for tma in (False, True):
        monkeypatch.setattr(tuning, "INTERPRETER_TMA", tma)
        _forget_tuning()
        results[tma] = launcher(*inputs)
        assert_loaded_with(tma, kernels)
    for pointer, tma in zip(results[False], results[True], strict=True):
        assert torch.equal(pointer, tma)  # outputs and row statistics
    assert results[True][0].abs().max() > 0


@needs_kernels
@pytest.mark.filterwarnings("ignore:.*(NaN|invalid value):RuntimeWarning")  # batch 1 is NaN
def test_rows_past_c_are_zeros_not_the_next_batch(use_tma, tiles):
    # L = 48 = 32 + 16: x is passed without a padding copy, so batch 1's rows follow batch 0's
    # in memory. A tile reaching past row C = 40 must not read them: NaN there would reach batch
    # 0's output through 0 · NaN in p v, although p is 0 for those columns.
    x = randn(2, 40, 48)
    x[1] = float("nan")
    assert library.aligned(x, 1, 48, 48) is x
    out, _ = _self(x)
    assert_loaded_with(use_tma, [flash._fwd_kernel])
    assert torch.isfinite(out[0]).all()
    close(out[0], reference.self_attention(x[:1].double(), -1.0)[0], 2e-5)


def check(inputs, scale, tol=2e-5):
    """Output and every input gradient of backend "triton_flash" against the fp64 reference; self
    attention when `inputs` is one tensor."""
    xs = [leaf(t) for t in inputs]
    out = channel_attention(*xs, scale=scale, backend="triton_flash")
    g = randn(*out.shape)
    grads = torch.autograd.grad(out, xs, g)
    xs64 = [leaf(t.double()) for t in inputs]
    qkv = xs64 * 3 if len(xs64) == 1 else xs64
    ref = reference.cross_attention(*qkv, scale)
    close(out, ref, tol)
    for got, want in zip(grads, torch.autograd.grad(ref, xs64, g.double()), strict=True):
        close(got, want, tol)


@needs_kernels
@pytest.mark.parametrize(
    ("b", "c", "length", "scale"), [(2, 40, 20, -1.0), (3, 33, 49, -1.0), (1, 19, 196, -0.05)]
)
def test_self_attention(use_tma, tiles, b, c, length, scale):
    check([randn(b, c, length)], scale)
    assert_loaded_with(use_tma, [flash._fwd_kernel])


@needs_kernels
@pytest.mark.parametrize(("c", "length", "lv"), [(40, 20, 40), (17, 49, 300)])
def test_cross_attention(use_tma, c, length, lv):
    check([randn(2, c, length), randn(2, c, length), randn(2, c, lv)], -1.0)
    assert_loaded_with(use_tma, [flash._fwd_kernel])


@needs_kernels
def test_contrastive(use_tma, tiles):
    a, b = leaf(randn(2, 40, 20)), leaf(randn(2, 40, 20))
    eta = leaf(torch.tensor([0.5, 1.2], device=DEVICE))
    out = contrastive_channel_attention(a, b, eta, backend="triton_flash")
    g = randn(*out.shape)
    grads = torch.autograd.grad(out, (a, b, eta), g)
    assert_loaded_with(use_tma, [flash._contrastive_stats_kernel, flash._contrastive_fwd_kernel])
    xs64 = [leaf(t.detach().double()) for t in (a, b, eta)]
    ref = reference.contrastive_attention(*xs64, -1.0)
    close(out, ref, 2e-5)
    for got, want in zip(grads, torch.autograd.grad(ref, xs64, g.double()), strict=True):
        close(got, want, 2e-5)


@needs_kernels
@pytest.mark.parametrize("magnitude", [1e2, 1e3])
def test_large_logits_stay_finite(use_tma, magnitude):
    # post-ReLU features: logits (scale -1) reach -magnitude² · L, up to ~1e6 here; the sign is
    # applied in fp32 before the running max, whichever way the tiles arrived
    x = randn(2, 24, 20, scale=magnitude).relu()
    x[:, ::5] = 0  # dead channels: rows of zero logits beside rows of -1e6
    out, stats = _self(x)
    assert_loaded_with(use_tma, [flash._fwd_kernel])
    assert torch.isfinite(out).all() and torch.isfinite(stats).all()
    ref = reference.self_attention(x.double(), -1.0)
    close(out, ref, 1e-5)


@needs_kernels
@pytest.mark.parametrize(
    ("dtype", "tol"),
    [
        (torch.float16, 1e-2),
        pytest.param(
            torch.bfloat16,
            3e-2,
            marks=pytest.mark.skipif(
                INTERPRETED, reason="the Triton interpreter's bf16 tl.dot is unreliable"
            ),
        ),
    ],
)
def test_half_precision(use_tma, dtype, tol):
    # TMA copies the input dtype's bytes as they are; p enters the product in that dtype
    check([randn(2, 40, 49, dtype=dtype).relu()], -1.0, tol=tol)
    assert_loaded_with(use_tma, [flash._fwd_kernel])


# ---------------------------------------------------------------------------------------------
# Compiled for sm_90 (no GPU): a TMA config gets TMA copies, its pointer twin cp.async

COMPILE = """
import json, sys
sys.path.insert(0, "benchmarks")
import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from kernel_resources import StubDriver
from fgattn.ops.triton import flash, library

driver.set_active(StubDriver(GPUTarget("cuda", 90, 32)))
kp = flash.pieces(196)
x = library.aligned(torch.randn(2, 256, 196).bfloat16(), 1, 196, sum(kp))
out, stats = torch.empty(2, 256, 196).bfloat16(), torch.empty(2, 2, 256)
result = {}
for tma in (False, True):
    compiled = flash._fwd_kernel.fn.warmup(
        x, x, x, out, stats, 256, sum(kp), 196, 196, -1.0,
        *x.stride(), *x.stride(), *x.stride(), *out.stride(),
        K0=kp[0], K1=kp[1], K2=kp[2], V0=kp[0], V1=kp[1], V2=kp[2], IS_SELF=True,
        PRECISION="ieee", BLOCK_M=64, BLOCK_N=64, STAGES=2, USE_TMA=tma,
        num_warps=4, num_stages=2, grid=(4, 1, 2),
    )
    ptx, ttgir = compiled.asm["ptx"], compiled.asm["ttgir"]
    result[str(tma)] = {
        "bulk_tensor": "cp.async.bulk.tensor" in ptx,
        "tma_copy_in_ttgir": "async_tma_copy_global_to_local" in ttgir,
        "cp_async": "cp.async.cg" in ptx or "cp.async.ca" in ptx,
        "wgmma": "wgmma.mma_async" in ptx,
        "scratch": compiled.metadata.global_scratch_size,
    }
print(json.dumps(result))
"""


def test_tma_config_compiles_to_tma_copies_on_sm90():
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("Triton's NVIDIA backend has no ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", COMPILE], cwd=root, env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    pointers, tma = got["False"], got["True"]
    assert tma["bulk_tensor"] and tma["tma_copy_in_ttgir"] and tma["wgmma"]
    assert tma["scratch"] > 0  # three 128-byte descriptors (196 = 128 + 64 + 16), per program
    assert pointers["cp_async"] and pointers["wgmma"]
    assert not pointers["bulk_tensor"] and pointers["scratch"] == 0
