"""What the Triton kernel tests share: inputs drawn in fp64, leaves, and comparisons against the
fp64 reference."""

from __future__ import annotations

import torch

from fgattn.functional import channel_attention, contrastive_channel_attention

# The kernels run on the GPU where there is one, else in Triton's CPU interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# How close to the fp64 reference (relative to the largest value) each input dtype must come.
TOL = {torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def randn(*shape, scale=1.0, dtype=torch.float32):
    """Normal samples drawn in fp64 (the same values at every dtype), scaled, on DEVICE."""
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype).to(DEVICE)


def leaf(t):
    return t.detach().clone().requires_grad_()


def close(actual, expected, tol=2e-5):
    """Relative to the expected tensor's largest magnitude (softmax outputs vary in scale)."""
    expected = expected.to(actual.device)
    atol = tol * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=tol)


def assert_as_accurate_as_fp32(fused, ref, inputs):
    """Where fp32 itself is coarse (logits of 1e4-1e6), the fused op's output and every input
    gradient must be about as accurate as the fp32 reference's, both against the fp64 reference:
    error ≤ 20 × the fp32 reference's + 1e-5 × the op's largest output or gradient. The floor is
    not each one's own size: some gradients are ~0 (cross dK ~1e-26, the contrastive dX_B pure
    fp32 noise), and logits rounded at ~1e-3 move a one-hot softmax by ~1e-6 of that scale."""
    g = randn(*ref(*inputs).shape)
    results = []
    for fn, cast in ((fused, torch.float32), (ref, torch.float32), (ref, torch.float64)):
        xs = [leaf(t.to(cast)) for t in inputs]
        out = fn(*xs)
        results.append([out, *torch.autograd.grad(out, xs, g.to(cast))])
    errors = [
        ((a.double() - c).abs().max().item(), (b.double() - c).abs().max().item(), c.abs().max())
        for a, b, c in zip(*results, strict=True)
    ]
    floor = max(size.item() for _, _, size in errors)
    for err, err_ref32, size in errors:
        assert err <= 20 * err_ref32 + 1e-5 * floor, (err, err_ref32, size)


def run(op, backend, *xs, scale=-1.0):
    """fgattn.functional's op ("self", "cross" or "contrastive") run by `backend`."""
    if op == "contrastive":
        return contrastive_channel_attention(*xs, scale=scale, backend=backend)
    return channel_attention(*xs, scale=scale, backend=backend)


def check_against_fp64(op, impl, xs, scale=-1.0, tol=None):
    """Output and every input gradient of `impl` against the reference on the same (rounded)
    inputs in fp64, within `tol` (default: the inputs' dtype's `TOL`)."""
    tol = tol or TOL[xs[0].dtype]
    leaves = [leaf(t) for t in xs]
    out = run(op, impl, *leaves, scale=scale)
    assert out.dtype == xs[0].dtype and out.shape == xs[-1 if op == "cross" else 0].shape
    g = torch.randn(out.shape, dtype=torch.float64).to(out.dtype).to(DEVICE)
    grads = torch.autograd.grad(out, leaves, g)
    leaves64 = [leaf(t.double()) for t in xs]
    ref = run(op, "reference", *leaves64, scale=scale)
    close(out, ref, tol)
    for got, want in zip(grads, torch.autograd.grad(ref, leaves64, g.double()), strict=True):
        assert got.dtype == want.dtype or got.dtype in TOL
        close(got, want, tol)
