"""Every implementation of every op against the fp64 reference, through `fgattn.functional`.

Parametrised over implementation × op × dtype (× row length), for every combination the
implementation says it runs on this machine (`Implementation.supports`): on CPU the reference,
SDPA's CPU kernel and the Triton kernels through Triton's interpreter; on a GPU every
implementation. Checked: the output and every input gradient (padding edge lengths, PCA-Net's
2L-wide v, odd widths), large logits, NaN, non-contiguous and channels_last inputs, dead channels,
any scale; and that a combination an implementation does not run is never offered for it.
"""

from __future__ import annotations

import math

import pytest
import torch
from _numerics import (
    DEVICE,
    TOL,
    assert_as_accurate_as_fp32,
    check_against_fp64,
    close,
    leaf,
    run,
)

from fgattn.ops import benchmark, registry
from fgattn.ops.call import OPS, Call

CUDA = DEVICE == "cuda"
CAPABILITY = torch.cuda.get_device_capability() if CUDA else (0, 0)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TRITON = ("triton_tiled", "triton_flash", "triton_gram")
# Row lengths L per implementation: SDPA pads L to a multiple of 8, the flash kernels hold rows as
# power-of-two pieces of 16 (196 = 128 + 64 + 16), the Gram kernels are offered for L > 256.
LENGTHS = {
    "triton_flash": (1, 7, 17, 49, 196, 256),
    "triton_gram": (257, 300),
}
DEFAULT_LENGTHS = (1, 7, 8, 9, 17, 49)
WIDE = {"triton_gram": 300}  # a length each implementation is offered, for the cases below


def call(impl: str, op: str, dtype: torch.dtype, length: int, batch: int = 2) -> Call:
    lv = 2 * length if op == "cross" else length
    device = "cuda:0" if CUDA else "cpu"
    return Call(op, device.split(":")[0], device, CAPABILITY, dtype, batch, 24, length, lv, True)


def _runs(impl: str, op: str, dtype: torch.dtype, length: int) -> bool:
    return registry.IMPLEMENTATIONS[impl].supports(call(impl, op, dtype, length))


def _checked_here(impl: str, dtype: torch.dtype) -> bool:
    """bf16 Triton kernels are checked on a GPU only: the interpreter's bf16 tl.dot is unreliable
    (fp16 goes through the same code paths)."""
    return CUDA or impl not in TRITON or dtype != torch.bfloat16


def _cases(lengths: bool):
    cases = []
    for impl in registry.IMPLEMENTATIONS:
        for op in OPS:
            for dname, dtype in DTYPES.items():
                widths = LENGTHS.get(impl, DEFAULT_LENGTHS) if lengths else (WIDE.get(impl, 49),)
                for length in widths:
                    if _runs(impl, op, dtype, length) and _checked_here(impl, dtype):
                        args = (impl, op, dtype, length) if lengths else (impl, op, dtype)
                        name = "-".join([impl, op, dname] + ([f"L{length}"] if lengths else []))
                        cases.append(pytest.param(*args, id=name))
    return cases


def inputs(op, b, c, length, dtype, magnitude=1.0, lv=None):
    """Post-ReLU x (the kind SCI sees) and a signed k, drawn in fp64 and rounded to dtype; cross:
    v = [x | k] as PCA-Net's co-attention passes it, or lv wide; contrastive: eta of both signs."""
    x = (torch.randn(b, c, length, dtype=torch.float64) * magnitude).relu()
    k = torch.randn(b, c, length, dtype=torch.float64) * magnitude
    if op == "self":
        xs = [x]
    elif op == "cross":
        xs = [x, k, torch.cat([x, k], 2) if lv is None else torch.randn(b, c, lv).double()]
    else:
        xs = [x, k.relu(), torch.tensor([0.7, -0.3, 1.2, 0.1][:b], dtype=torch.float64)]
    return [t.to(dtype).to(DEVICE) for t in xs]


# ---------------------------------------------------------------------------------------------
# Forward and every gradient


@pytest.mark.kernels
@pytest.mark.parametrize(("impl", "op", "dtype", "length"), _cases(lengths=True))
def test_matches_fp64_reference(impl, op, dtype, length):
    check_against_fp64(op, impl, inputs(op, 2, 24, length, dtype))
    if op == "cross":  # v of another width than [q | k], odd C, B = 3
        check_against_fp64(op, impl, inputs(op, 3, 19, length, dtype, lv=length + 5))


@pytest.mark.kernels
@pytest.mark.parametrize(("impl", "op", "dtype"), _cases(lengths=False))
@pytest.mark.parametrize("scale", [-1 / 49, 0.0, 0.5])
def test_any_scale(impl, op, dtype, scale):
    check_against_fp64(op, impl, inputs(op, 2, 16, WIDE.get(impl, 49), dtype), scale=scale)


@pytest.mark.kernels
@pytest.mark.parametrize(("impl", "op", "dtype"), _cases(lengths=False))
def test_large_logits(impl, op, dtype):
    # |x| ≈ 30 gives logits near −1e5 at L = 196 (−2.7e5 at 300), where fp32 itself is coarse and
    # fp16 overflows: every path keeps the logits in fp32, so in fp32 it must be about as accurate
    # as the fp32 reference (both against fp64), in half precision finite and close to it.
    xs = inputs(op, 2, 32, WIDE.get(impl, 196), dtype, magnitude=30.0)
    xs[0][:, ::5] = 0  # dead channels: rows of zero logits beside rows of −1e4
    if dtype == torch.float32:
        assert_as_accurate_as_fp32(
            lambda *t: run(op, impl, *t), lambda *t: run(op, "reference", *t), xs
        )
        return
    leaves = [leaf(t) for t in xs]
    out = run(op, impl, *leaves)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, g)
    leaves32 = [leaf(t.float()) for t in xs]
    ref = run(op, "reference", *leaves32)
    want = [ref, *torch.autograd.grad(ref, leaves32, g.float())]
    assert torch.isfinite(out).all() and all(torch.isfinite(d).all() for d in grads)
    # self attention: each tensor within the dtype's tolerance of its own largest value; cross and
    # contrastive: of the op's largest output or gradient (some of their gradients are small: SDPA's
    # fp16 cross backward at torch 2.8 missed 1e-2 of its own largest value by 1e-3)
    scale = max(1.0, *(w.abs().max().item() for w in want))
    for got, expected in zip([out, *grads], want, strict=True):
        if op == "self":
            close(got, expected, TOL[dtype])
        else:
            atol = TOL[dtype] * scale
            torch.testing.assert_close(got.double(), expected.double(), atol=atol, rtol=TOL[dtype])


@pytest.mark.kernels
@pytest.mark.parametrize(("impl", "op", "dtype"), _cases(lengths=False))
@pytest.mark.filterwarnings("ignore:.*(NaN|invalid value):RuntimeWarning")
def test_nan_propagates(impl, op, dtype):
    # A NaN anywhere in an input is a NaN wherever the reference has one, forward and backward:
    # never a finite number where the equation gives none.
    length = WIDE.get(impl, 49)
    for i in range(len(inputs(op, 2, 1, 1, dtype))):
        xs = inputs(op, 2, 24, length, dtype)
        xs[i][(0, 3, 1) if xs[i].dim() == 3 else 0] = math.nan
        got, want = _with_grads(op, impl, xs), _with_grads(op, "reference", xs)
        for name, a, b in zip(("out", "grad 0", "grad 1", "grad 2"), got, want, strict=False):
            lost = torch.isfinite(a) & ~torch.isfinite(b.to(a.device))
            assert not lost.any(), f"NaN in input {i}: {name} finite at {lost.nonzero()[:4]}"


def _with_grads(op, impl, xs):
    leaves = [leaf(t) for t in xs]
    out = run(op, impl, *leaves)
    return [out, *torch.autograd.grad(out, leaves, torch.ones_like(out))]


# ---------------------------------------------------------------------------------------------
# Layouts and dead channels


@pytest.mark.kernels
@pytest.mark.parametrize(("impl", "op", "dtype"), _cases(lengths=False))
def test_non_contiguous_inputs(impl, op, dtype):
    length = WIDE.get(impl, 20)
    xs = inputs(op, 2, 30, length, dtype)
    xs[0] = xs[0].transpose(1, 2).contiguous().transpose(1, 2)  # channel stride 1
    if op != "self":
        xs[1] = torch.cat([xs[1], xs[1]], 2)[:, :, ::2]  # L stride 2
    if op == "cross":
        xs[2] = torch.cat([xs[2], xs[2]], 2)[:, :, 3 : 3 + xs[2].shape[2]]  # an offset view
    assert not any(t.is_contiguous() for t in xs[:2])
    check_against_fp64(op, impl, xs)


@pytest.mark.kernels
@pytest.mark.parametrize(("impl", "op", "dtype"), _cases(lengths=False))
def test_channels_last_maps(impl, op, dtype):
    # (B, C, H, W) feature maps in channels_last come back in channels_last, with the same values
    h = 3 if impl != "triton_gram" else 20
    xs = [t.unflatten(2, (h, t.shape[2] // h)) for t in inputs(op, 2, 12, h * 15, dtype)[:2]]
    if op == "contrastive":
        xs.append(torch.tensor([0.7, -0.3], device=DEVICE))
    elif op == "cross":
        xs.append(xs[0] * 2)
    cl = [t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t for t in xs]
    out = run(op, impl, *cl)
    assert out.is_contiguous(memory_format=torch.channels_last)
    ref = run(op, "reference", *[t.double() for t in xs])
    close(out, ref, TOL[dtype])


@pytest.mark.kernels
@pytest.mark.parametrize(("impl", "op", "dtype"), _cases(lengths=False))
def test_dead_channels(impl, op, dtype):
    # Post-ReLU maps with all-zero channels: zero logits are the row max under scale −1.
    xs = inputs(op, 2, 40, WIDE.get(impl, 20), dtype)
    xs[0][:, ::3] = 0
    if op != "self":
        xs[1][:, 5:9] = 0
    check_against_fp64(op, impl, xs)
    zeros = [torch.zeros_like(t) if t.dim() == 3 else t for t in xs]
    check_against_fp64(op, impl, zeros)


# ---------------------------------------------------------------------------------------------
# What an implementation does not run, it is never offered


def _refused():
    cases = []
    for impl in registry.IMPLEMENTATIONS:
        for op in OPS:
            for dname, dtype in (*DTYPES.items(), ("fp64", torch.float64)):
                for length in (49, 300):
                    if not _runs(impl, op, dtype, length):
                        cases.append(pytest.param(impl, op, dtype, length, id=f"{impl}-{op}-"
                                                  f"{dname}-L{length}"))  # fmt: skip
    return cases


@pytest.mark.parametrize(("impl", "op", "dtype", "length"), _refused())
def test_refused_calls_are_never_offered(impl, op, dtype, length):
    xs = inputs(op, 2, 24, length, dtype)
    assert impl not in benchmark.candidates(call(impl, op, dtype, length))
    with pytest.raises(ValueError, match=rf"backend '{impl}' cannot run {op} attention"):
        run(op, impl, *[leaf(t) for t in xs])


@pytest.mark.parametrize("op", OPS)
def test_only_the_reference_runs_empty_inputs(op):
    xs = inputs(op, 2, 8, 5, torch.float32)
    empty = [t[:0] for t in xs]
    for impl in registry.IMPLEMENTATIONS:
        if impl != "reference":
            assert not registry.IMPLEMENTATIONS[impl].supports(call(impl, op, torch.float32, 5, 0))
    assert run(op, None, *empty).shape == empty[-1 if op == "cross" else 0].shape


@pytest.mark.kernels
@pytest.mark.parametrize(("impl", "op", "dtype"), _cases(lengths=False))
def test_double_backward_is_the_reference_or_a_clear_error(impl, op, dtype):
    # Only the reference has a second derivative: the others say so, in fgattn's words, when the
    # gradient is built to be differentiated (create_graph=True).
    leaves = [leaf(t) for t in inputs(op, 2, 16, WIDE.get(impl, 9), dtype)]
    out = run(op, impl, *leaves)
    if impl == "reference":
        grads = torch.autograd.grad(out.square().sum(), leaves, create_graph=True)
        sum(g.sum() for g in grads).backward()
        assert all(t.grad is not None for t in leaves)
        return
    with pytest.raises(RuntimeError, match=r"fgattn: .*no second derivative.*'reference'"):
        grads = torch.autograd.grad(out.square().sum(), leaves, create_graph=True)
        sum(g.sum() for g in grads).backward()
