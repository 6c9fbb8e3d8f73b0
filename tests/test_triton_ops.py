"""What every Triton kernel family shares (`fgattn.ops.triton.library`): each family's ops as
`torch.library` custom ops (opcheck, fakes that check shapes, autograd that computes only the
gradients asked for), torch.compile and torch.export through them, where the kernels run.

Numbers against the fp64 reference: tests/test_conformance.py; each family's tuning:
tests/test_triton_{tiled,flash,gram}.py.
"""

from __future__ import annotations

import pytest
import torch
from _numerics import DEVICE, close, leaf, randn

pytest.importorskip("triton")

from fgattn.functional import channel_attention, contrastive_channel_attention
from fgattn.ops import dispatch, reference
from fgattn.ops.triton import flash, gram, library, tiled

FAMILIES = {"triton_tiled": tiled, "triton_flash": flash, "triton_gram": gram}
# Every (fwd, bwd) op pair a family registers (`library.custom_op_pair`): its inputs
OP_PAIRS = [
    (family, op, kind)
    for family, module in FAMILIES.items()
    for op, kind in (("cross", "cross"), ("self", "self"), ("contrastive", "contrastive"))
    if hasattr(module, f"{family}_{op}_fwd")
]
pytestmark = pytest.mark.kernels


def _inputs(kind, dtype=torch.float32, length=5):
    def t(*shape):
        return randn(*shape).to(dtype).requires_grad_()

    eta = torch.tensor([0.5, 1.1], device=DEVICE, requires_grad=True)
    return {
        "cross": (t(2, 20, length), t(2, 20, length), t(2, 20, length + 4)),
        "self": (t(2, 20, length),),
        "contrastive": (t(2, 20, length), t(2, 20, length), eta),
    }[kind]


def _ops(family, op):
    module = FAMILIES[family]
    return getattr(module, f"{family}_{op}_fwd"), getattr(module, f"{family}_{op}_bwd")


@pytest.mark.parametrize(("family", "op", "kind"), OP_PAIRS, ids=lambda v: str(v))
def test_opcheck(family, op, kind):
    # the flash-shaped kernels refuse fp32 on a GPU
    dtype = torch.bfloat16 if family == "triton_flash" and DEVICE == "cuda" else torch.float32
    fwd, bwd = _ops(family, op)
    inputs = _inputs(kind, dtype)
    torch.library.opcheck(fwd, (*inputs, -1.0, False))
    # and the backward op, with the statistics the forward produced
    with torch.no_grad():
        out, *stats = fwd(*inputs, -1.0, False)
    inputs = [x.detach() for x in inputs]
    needs = [True] * len(inputs)
    torch.library.opcheck(bwd, (torch.randn_like(out), *inputs, *stats, -1.0, False, needs))


@pytest.mark.parametrize(("family", "op", "kind"), OP_PAIRS, ids=lambda v: str(v))
def test_fakes_check_shapes(family, op, kind):
    fwd, _ = _ops(family, op)
    inputs = [x.detach() for x in _inputs(kind)]
    # one batch element short; the self op's only input without its batch axis
    inputs[-1] = inputs[-1][0] if kind == "self" else inputs[-1][:1]
    mode = torch._subclasses.fake_tensor.FakeTensorMode()
    fakes = [mode.from_tensor(x) for x in inputs]
    with mode, pytest.raises(RuntimeError, match=r"of shape|must be \(B, C, L\)"):
        fwd(*fakes, -1.0, False)


@pytest.mark.parametrize("family", ["triton_tiled", "triton_flash", "triton_gram"])
def test_only_the_gradients_asked_for_are_computed(family, monkeypatch):
    length = 300 if family == "triton_gram" else 20
    q, k, v = (randn(2, 24, n) for n in (length, length, length + 4))
    calls = []
    module = FAMILIES[family]
    for name, fn in vars(module).items():
        if name.endswith("_kernel") and hasattr(fn, "__getitem__"):
            monkeypatch.setattr(module, name, _Logged(fn, name, calls))
    bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a, **kw: calls.append("bmm") or bmm(*a, **kw))

    def backward_work(*needs_grad):
        xs = [leaf(t) if need else t for t, need in zip((q, k, v), needs_grad, strict=True)]
        out = channel_attention(*xs, backend=family)
        calls.clear()
        grads = torch.autograd.grad(out.sum(), [t for t in xs if t.requires_grad])
        return sorted(calls), grads

    only_q, (dq,) = backward_work(True, False, False)
    everything, _ = backward_work(True, True, True)
    assert len(only_q) < len(everything), (only_q, everything)
    q64 = leaf(q.double())
    (want,) = torch.autograd.grad(reference.cross_attention(q64, k, v, -1.0).sum(), q64)
    close(dq, want)


class _Logged:
    """Stands in for a kernel in its module: records each launch, then launches."""

    def __init__(self, kernel, name, calls):
        self.kernel, self.name, self.calls = kernel, name, calls

    def __getitem__(self, grid):
        self.calls.append(self.name)
        return self.kernel[grid]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_torch_compile_fullgraph(family):
    length = 300 if family == "triton_gram" else 20
    x = leaf(randn(2, 24, 4, length // 4 if family != "triton_gram" else 75))
    q, k, v = leaf(randn(2, 24, length)), leaf(randn(2, 24, length)), leaf(randn(2, 24, 40))
    eta = leaf(torch.rand(2, device=DEVICE))
    contrastive = family != "triton_gram"

    def loss(x, q, k, v, eta, backend):
        y1 = channel_attention(x, backend=backend)
        y2 = channel_attention(q, k, v, backend=backend)
        total = (y1 * y1).sum() + (y2 * y2).sum()
        if contrastive:
            y3 = contrastive_channel_attention(q, k, eta, backend=backend)
            total = total + (y3 * y3).sum()
        return total

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    inputs = (x, q, k, v, eta)
    if DEVICE == "cuda" and family == "triton_flash":  # fp32 is refused on a GPU
        inputs = tuple(leaf(t.bfloat16()) if t.dim() > 1 else t for t in inputs)
    got = torch.autograd.grad(compiled(*inputs, family), inputs, allow_unused=True)
    want = torch.autograd.grad(loss(*inputs, "reference"), inputs, allow_unused=True)
    for a, b in zip(got, want, strict=True):
        if b is not None:
            close(a, b, 1e-4 if a.dtype == torch.float32 else 3e-2)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_takes_the_reference(family, monkeypatch):
    # torch.export keeps a custom op opaque (and ONNX cannot translate it): the exported graph
    # computes the op with the reference instead, with a warning.
    class Attend(torch.nn.Module):
        def forward(self, x):
            return channel_attention(x, backend=family)

    x = randn(2, 8, 300 if family == "triton_gram" else 20)
    monkeypatch.setattr(dispatch, "_export_warned", set())
    with pytest.warns(UserWarning, match=rf"'{family}' implementation.*'reference'"):
        program = torch.export.export(Attend(), (x,))
    ops = [n for n in program.graph_module.graph.nodes if str(n.target).startswith("fgattn.")]
    assert ops == []
    close(program.module()(x), reference.self_attention(x.double(), -1.0), 1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tf32_option_runs(family):
    if DEVICE == "cuda" and family == "triton_flash":
        pytest.skip("the flash kernels refuse fp32 on a GPU, TF32 included")
    torch.backends.cuda.matmul.allow_tf32 = True
    length = 300 if family == "triton_gram" else 20
    x, q, k, v = randn(2, 24, length), randn(2, 24, length), randn(2, 24, length), randn(2, 24, 30)
    close(channel_attention(x, backend=family), reference.self_attention(x.double(), -1.0), 2e-2)
    got = channel_attention(q, k, v, backend=family)
    close(got, reference.cross_attention(q.double(), k.double(), v.double(), -1.0), 2e-2)
    assert torch.backends.cuda.matmul.allow_tf32  # a launcher that switches it restores it


def test_cpu_tensors_without_interpreter_raise(monkeypatch):
    monkeypatch.setattr(library, "interpreting", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        library.check_device(torch.zeros(1))
