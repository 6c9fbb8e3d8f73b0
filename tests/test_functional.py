"""fgattn.functional against the papers' equations written out independently, plus numerics."""

import pytest
import torch
from torch.autograd import gradcheck

from fgattn.functional import (
    channel_attention,
    channel_attention_weights,
    contrastive_channel_attention,
)


def softmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """exp(z_ij) / Σ_k exp(z_ik), written out, with the row max subtracted (float64)."""
    z = logits.double()
    e = torch.exp(z - z.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def attention_by_equation(q, k, v, scale):
    """CIN eq. 1–2 / PCA-Net eq. 1–2: W_ij = exp(s (q kᵀ)_ij) / Σ_k exp(s (q kᵀ)_ik), Y = W v."""
    b, c = q.shape[:2]
    q, k, v = (t.reshape(b, c, -1).double() for t in (q, k, v))
    w = softmax_rows(scale * torch.einsum("bil,bjl->bij", q, k))
    return torch.einsum("bij,bjl->bil", w, v)


def contrastive_by_equation(xa, xb, eta, scale):
    """CIN eq. 5–6: |W_A − η W_B| X_A."""
    b, c = xa.shape[:2]
    xa, xb = xa.reshape(b, c, -1).double(), xb.reshape(b, c, -1).double()
    wa = softmax_rows(scale * torch.einsum("bil,bjl->bij", xa, xa))
    wb = softmax_rows(scale * torch.einsum("bil,bjl->bij", xb, xb))
    return torch.einsum("bij,bjl->bil", (wa - eta.double().view(-1, 1, 1) * wb).abs(), xa)


@pytest.mark.parametrize("scale", [-1.0, -0.05, 0.3])
def test_channel_attention_matches_equation(scale):
    q, k = torch.randn(2, 6, 7), torch.randn(2, 6, 7)
    v = torch.randn(2, 6, 11)  # wider than q
    out = channel_attention(q, k, v, scale=scale)
    assert out.shape == v.shape and out.dtype == v.dtype
    torch.testing.assert_close(
        out.double(), attention_by_equation(q, k, v, scale), atol=1e-5, rtol=1e-5
    )


def test_self_attention_defaults_and_4d():
    x = torch.randn(3, 5, 4, 6)
    out = channel_attention(x)  # k = q, v = k, scale = -1
    assert out.shape == x.shape
    ref = attention_by_equation(x, x, x, -1.0).reshape(x.shape)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_v_defaults_to_k():
    q, k = torch.randn(2, 4, 9), torch.randn(2, 4, 9)
    torch.testing.assert_close(channel_attention(q, k), channel_attention(q, k, k))


def test_4d_wide_value_keeps_its_layout():
    q = torch.randn(2, 4, 3, 3)
    v = torch.randn(2, 4, 3, 6)
    out = channel_attention(q, q, v)
    assert out.shape == v.shape
    ref = attention_by_equation(q, q, v, -1.0).reshape(v.shape)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_weights_are_row_stochastic_and_match_equation():
    q, k = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    w = channel_attention_weights(q, k, scale=-0.5)
    assert w.shape == (2, 5, 5) and w.dtype == torch.float32
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 5))
    ref = softmax_rows(-0.5 * torch.einsum("bil,bjl->bij", q.double(), k.double()))
    torch.testing.assert_close(w.double(), ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("eta_shape", [(3,), (3, 1)])
def test_contrastive_matches_equation(eta_shape):
    xa, xb = torch.randn(3, 6, 2, 4), torch.randn(3, 6, 2, 4)
    eta = torch.randn(eta_shape)
    out = contrastive_channel_attention(xa, xb, eta, scale=-0.2)
    assert out.shape == xa.shape
    ref = contrastive_by_equation(xa, xb, eta.reshape(-1), -0.2).reshape(xa.shape)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_gradcheck_channel_attention():
    q = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 4, 7, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda q, k, v: channel_attention(q, k, v, scale=-0.7), (q, k, v))
    assert gradcheck(lambda x: channel_attention(x, scale=-0.7), (q,))


def test_gradcheck_contrastive():
    xa = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    xb = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    eta = torch.tensor([0.3, 1.7], dtype=torch.float64, requires_grad=True)
    assert gradcheck(
        lambda a, b, e: contrastive_channel_attention(a, b, e, scale=-0.4), (xa, xb, eta)
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_large_logits_stay_finite(dtype):
    # Post-ReLU features with |x| ≈ 30 and L = 196: logits near 1e5, beyond fp16's range.
    x = (20 + 10 * torch.rand(2, 16, 14, 14)).to(dtype)
    assert (x.float().flatten(2) @ x.float().flatten(2).transpose(1, 2)).min() > 6.6e4
    out = channel_attention(x)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    ref = channel_attention(x.float())
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=1e-2)
    cco = contrastive_channel_attention(x, x.flip(0), torch.tensor([0.5, 2.0], dtype=dtype))
    assert cco.dtype == dtype and torch.isfinite(cco).all()


def test_autocast_computes_logits_in_fp32():
    x = torch.rand(2, 16, 49) * 30
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = channel_attention(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, channel_attention(x), atol=1e-5, rtol=1e-5)


def test_dead_channels_zero_input_and_tiny_shapes():
    x = torch.randn(2, 6, 10)
    x[:, 2] = 0  # dead channel
    out = channel_attention(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(
        out.double(), attention_by_equation(x, x, x, -1.0), atol=1e-5, rtol=1e-5
    )
    zero = torch.zeros(1, 4, 3)  # W uniform -> every row is the channel mean (zero)
    assert torch.equal(channel_attention(zero), zero)
    one_channel = torch.randn(2, 1, 5)  # W = [[1]] -> Y = X
    torch.testing.assert_close(channel_attention(one_channel), one_channel)
    one_position = torch.randn(2, 5, 1)
    torch.testing.assert_close(
        channel_attention(one_position).double(),
        attention_by_equation(one_position, one_position, one_position, -1.0),
    )


def test_non_contiguous_and_channels_last():
    base = torch.randn(2, 7, 6, 5)
    x = base.transpose(2, 3)  # non-contiguous (2, 7, 5, 6)
    assert not x.is_contiguous()
    torch.testing.assert_close(channel_attention(x), channel_attention(x.contiguous()))
    cl = base.contiguous(memory_format=torch.channels_last)
    out = channel_attention(cl)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, channel_attention(base))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (
            lambda: channel_attention(torch.randn(4, 5)),
            r"q must have shape .*got 2-D shape \(4, 5\)",
        ),
        (
            lambda: channel_attention(torch.randn(2, 4, 5), torch.randn(2, 3, 5)),
            r"k must match q.*\(2, 3, 5\)",
        ),
        (
            lambda: channel_attention(torch.randn(2, 4, 5), torch.randn(1, 4, 5)),
            r"k must match q.*\(1, 4, 5\)",
        ),
        (
            lambda: channel_attention(torch.randn(2, 4, 5), torch.randn(2, 4, 6)),
            r"k must match q.*length",
        ),
        (
            lambda: channel_attention(torch.randn(2, 4, 5), v=torch.randn(2, 3, 9)),
            r"v must match q.*channels",
        ),
        (
            lambda: channel_attention(torch.ones(2, 4, 5, dtype=torch.int64)),
            r"q must be a floating-point.*int64",
        ),
        (
            lambda: channel_attention(torch.randn(2, 4, 5), scale=float("nan")),
            r"scale must be a finite float.*nan",
        ),
        (
            lambda: contrastive_channel_attention(
                torch.randn(2, 4, 5), torch.randn(2, 4, 5), torch.ones(3)
            ),
            r"eta must have shape \(2,\) or \(2, 1\).*\(3,\)",
        ),
        (
            lambda: contrastive_channel_attention(
                torch.randn(2, 4, 5), torch.randn(2, 4, 6), torch.ones(2)
            ),
            r"x_b must match x_a",
        ),
        (
            lambda: channel_attention(torch.randn(2, 4, 5), backend="fast"),
            r"backend must be one of",
        ),
        (  # before: uninitialised memory came back
            lambda: channel_attention(torch.randn(2, 4, 5), torch.randn(2, 4, 5, device="meta")),
            r"k must be on the device of q \(cpu\), got device meta",
        ),
        (
            lambda: channel_attention(
                torch.randn(2, 4, 5), torch.randn(2, 4, 5), torch.randn(2, 4, 5, device="meta")
            ),
            r"v must be on the device of q",
        ),
        (
            lambda: contrastive_channel_attention(
                torch.randn(2, 4, 5), torch.randn(2, 4, 5), torch.ones(2, device="meta")
            ),
            r"eta must be on the device of x_a",
        ),
    ],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: channel_attention(torch.randn(2, 4, 5), scale=torch.tensor(1.0)), "scale"),
        (lambda: channel_attention(torch.randn(2, 4, 5), scale="-1"), "scale"),
        (lambda: channel_attention(torch.randn(2, 4, 5), backend=3), "backend must be a str"),
    ],
)
def test_wrong_types_raise_type_error(call, match):
    with pytest.raises(TypeError, match=match):
        call()


def test_compile_fullgraph():
    fn = torch.compile(
        lambda q, v, a, b, e: (
            channel_attention(q, q, v),
            contrastive_channel_attention(a, b, e),
        ),
        fullgraph=True,
        backend="aot_eager",
    )
    q, v = torch.randn(2, 4, 6), torch.randn(2, 4, 12)
    a, b, e = torch.randn(2, 4, 6), torch.randn(2, 4, 6), torch.rand(2)
    out, cco = fn(q, v, a, b, e)
    torch.testing.assert_close(out, channel_attention(q, q, v))
    torch.testing.assert_close(cco, contrastive_channel_attention(a, b, e))
