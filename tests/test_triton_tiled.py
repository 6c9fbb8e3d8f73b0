"""The "triton_tiled" kernels (`fgattn/ops/triton/tiled.py`): what is specific to the family,
its tiles by rule. Numbers against the fp64 reference at the default tiles:
tests/test_conformance.py; op registration: tests/test_triton_ops.py.

Without CUDA the kernels run in Triton's CPU interpreter (tests/conftest.py); bf16 runs on a GPU
only (the interpreter's bf16 tl.dot is unreliable).
"""

import pytest
import torch
from _numerics import DEVICE, check_against_fp64, close, leaf, randn

pytest.importorskip("triton")

from fgattn.functional import channel_attention
from fgattn.ops import reference
from fgattn.ops.triton import tiled, tuning

pytestmark = pytest.mark.kernels
SMALL_TILES = {"block_m": 16, "block_n": 16, "max_tile": 16, "max_chunk": 16}


@pytest.fixture(params=["default_tiles", "small_tiles"])
def tiles(request, monkeypatch):
    """Small tiles: several row blocks, column tiles and L chunks already at C = 40, L = 20."""
    if request.param == "small_tiles":
        monkeypatch.setattr(tuning, "TILES", dict(SMALL_TILES))
        monkeypatch.setattr(tuning, "CONTRASTIVE_BWD_TILES", {"block_m": 16, "block_n": 16,
                                                             "max_tile": 16})  # fmt: skip
    return request.param


@pytest.mark.parametrize(
    "c, length, lv, scale",
    [(40, 20, 20, -1.0), (33, 5, 10, -1.0), (64, 49, 98, 0.3), (17, 20, 45, -0.05)],
)
def test_cross_attention(tiles, c, length, lv, scale):
    check_against_fp64(
        "cross", "triton_tiled", [randn(2, c, n) for n in (length, length, lv)], scale
    )


@pytest.mark.parametrize("c, length, scale", [(40, 20, -1.0), (64, 49, -1.0), (24, 5, 0.5)])
def test_self_attention(tiles, c, length, scale):
    check_against_fp64("self", "triton_tiled", [randn(2, c, length)], scale)


@pytest.mark.parametrize(
    "c, length, scale", [(40, 20, -1.0), (40, 20, -0.05), (64, 49, 0.1), (33, 5, -0.2)]
)
def test_contrastive(tiles, c, length, scale):
    eta = torch.rand(2).to(DEVICE) * 1.5
    xs = [randn(2, c, length), randn(2, c, length), eta]
    check_against_fp64("contrastive", "triton_tiled", xs, scale)


def test_self_attention_is_explicit(monkeypatch):
    # channel_attention(x) takes the fused SCI op (one gradient for q = k = v); naming k and v,
    # even as x itself, takes the general op, whose three gradients autograd sums.
    calls = []
    for name in ("triton_tiled_self_fwd", "triton_tiled_cross_fwd"):
        orig = getattr(tiled, name)
        monkeypatch.setattr(tiled, name, lambda *a, _o=orig, _n=name: calls.append(_n) or _o(*a))
    x = randn(2, 24, 4, 5)
    check_against_fp64("self", "triton_tiled", [x])
    assert calls == ["triton_tiled_self_fwd"]
    calls.clear()
    xx = leaf(x)
    channel_attention(xx, xx, xx, backend="triton_tiled").sum().backward()
    assert calls == ["triton_tiled_cross_fwd"]


def test_detached_key_gets_no_gradient_share():
    # q and k share storage but only q is differentiable: the general path must be used.
    x = leaf(randn(2, 24, 20))
    out = channel_attention(x, x.detach(), x.detach(), backend="triton_tiled")
    g = randn(*out.shape)
    (dx,) = torch.autograd.grad(out, x, g)
    x64 = leaf(x.double())
    ref = reference.cross_attention(x64, x64.detach(), x64.detach(), -1.0)
    (rdx,) = torch.autograd.grad(ref, x64, g.double())
    close(dx, rdx)


def test_expanded_output_gradient():
    # out.sum() gives a stride-0 gradient
    q, k, v = randn(2, 30, 20), randn(2, 30, 20), randn(2, 30, 45)
    qq, kk, vv = leaf(q), leaf(k), leaf(v)
    out = channel_attention(qq, kk, vv, backend="triton_tiled").sum()
    grads = torch.autograd.grad(out, (qq, kk, vv))
    q64, k64, v64 = (leaf(t.double()) for t in (q, k, v))
    rgrads = torch.autograd.grad(
        reference.cross_attention(q64, k64, v64, -1.0).sum(), (q64, k64, v64)
    )
    for got, want in zip(grads, rgrads, strict=True):
        close(got, want)


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
    monkeypatch.setattr(tuning, "shared_memory_limit", lambda device: limit)
    x = torch.empty(0, dtype=dtype)
    assert tuning.tile(196, x) == want
    assert tuning.tile(40, x) == 64  # a narrow row is never widened
