"""The layers against the papers' equations written out in the tests."""

import pytest
import torch
import torch.nn.functional as F
from test_functional import attention_by_equation, contrastive_by_equation, softmax_rows
from torch import nn

import fgattn
from fgattn import CCI, SCI, AttentionErase, BilinearAttentionPooling, BilinearPooling, CoAttention


def flat(x):
    return x.reshape(x.shape[0], x.shape[1], -1)


# ---------------------------------------------------------------- SCI (CIN eq. 1–3)
def test_sci_matches_equations_1_to_3():
    sci = SCI(6).double()
    x = torch.randn(2, 6, 4, 5, dtype=torch.float64)
    z, y = sci(x, return_interaction=True)
    y_ref = attention_by_equation(x, x, x, -1.0).reshape(x.shape)  # eq. 1–2
    torch.testing.assert_close(y, y_ref)
    z_ref = F.conv2d(y_ref, sci.phi.weight, sci.phi.bias, padding=1) + x  # eq. 3
    torch.testing.assert_close(z, z_ref)
    torch.testing.assert_close(sci(x), z)


def test_sci_length_normalized_is_hawkeye_scale():
    sci = SCI(4, length_normalized=True).double()
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    _, y = sci(x, return_interaction=True)
    torch.testing.assert_close(y, attention_by_equation(x, x, x, -1.0 / 9).reshape(x.shape))


def test_sci_wrong_channels():
    with pytest.raises(ValueError, match=r"x must have 8 channels, got shape \(1, 4, 3, 3\)"):
        SCI(8)(torch.randn(1, 4, 3, 3))
    with pytest.raises(
        ValueError, match=r"x must have shape \(B, C, H, W\), got shape \(4, 3, 3\)"
    ):
        SCI(4)(torch.randn(4, 3, 3))


# ---------------------------------------------------------------- CCI (CIN eq. 5–6)
def test_cci_matches_equations_5_and_6():
    cci = CCI(5).double()
    xa, xb = (
        torch.randn(3, 5, 2, 3, dtype=torch.float64),
        torch.randn(3, 5, 2, 3, dtype=torch.float64),
    )
    za, zb, eta, gamma = cci(xa, xb)
    ya = attention_by_equation(xa, xa, xa, -1.0)
    yb = attention_by_equation(xb, xb, xb, -1.0)
    eta_ref = cci.psi(torch.cat([ya.mean(-1), yb.mean(-1)], 1)).squeeze(1)  # η = ψ([Y_A, Y_B])
    gamma_ref = cci.psi(torch.cat([yb.mean(-1), ya.mean(-1)], 1)).squeeze(1)
    torch.testing.assert_close(eta, eta_ref)
    torch.testing.assert_close(gamma, gamma_ref)
    y_ab = contrastive_by_equation(xa, xb, eta_ref, -1.0).reshape(xa.shape)  # |W_A − η W_B| X_A
    y_ba = contrastive_by_equation(xb, xa, gamma_ref, -1.0).reshape(xb.shape)
    phi = cci.phi
    torch.testing.assert_close(za, phi(y_ab) + xa)
    torch.testing.assert_close(zb, phi(y_ba) + xb)  # + X_B: the paper's "+ X_A" is a typo


def test_cci_halves_of_one_batch_form_the_pairs_and_share_phi():
    sci = SCI(4)
    cci = CCI(4, phi=sci.phi)
    assert cci.phi is sci.phi
    x = torch.randn(4, 4, 3, 3)
    za, zb, _, _ = cci(x)
    za2, zb2, _, _ = cci(x[:2], x[2:])
    torch.testing.assert_close(za, za2)
    torch.testing.assert_close(zb, zb2)
    with pytest.raises(ValueError, match=r"even number.*got batch size 3"):
        cci(torch.randn(3, 4, 3, 3))
    with pytest.raises(ValueError, match=r"x_b must have x_a's shape"):
        cci(torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 2))


def test_cci_any_input_size():
    cci = CCI(4)
    for size in (3, 7, 14):
        za, _, _, _ = cci(torch.randn(2, 4, size, size), torch.randn(2, 4, size, size))
        assert za.shape == (2, 4, size, size)


def test_cci_contrastive_loss_is_nonzero_and_trains_psi():
    """With positive pairs in the batch the loss must not vanish (Hawkeye's does) and ψ learns."""
    torch.manual_seed(1)
    channels, r = 8, 16
    cci = CCI(channels, scale=-0.05)
    h = nn.Linear(channels * 16, r)
    loss_fn = fgattn.ContrastiveLoss(margin=0.5)
    x = torch.rand(6, channels, 4, 4)
    labels = torch.tensor([0, 1, 2, 0, 1, 3])  # pairs (i, i+3): positive, positive, negative
    za, zb, _, _ = cci(x)
    same = labels[:3] == labels[3:]
    assert same.any()
    loss = loss_fn(h(za.flatten(1)), h(zb.flatten(1)), same)
    assert loss.item() > 0
    loss.backward()
    assert cci.psi.weight.grad is not None and cci.psi.weight.grad.abs().sum() > 0
    assert h.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- CoAttention (PCA-Net eq. 1–2)
def test_co_attention_matches_equations_1_and_2():
    f1, f2 = torch.randn(2, 5, 3, 4), torch.randn(2, 5, 3, 4)
    fw1, fw2 = CoAttention()(f1, f2)
    w = softmax_rows(-torch.einsum("bil,bjl->bij", flat(f1).double(), flat(f2).double()))
    torch.testing.assert_close(
        fw1.double(), (w @ flat(f1).double()).reshape(f1.shape), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        fw2.double(), (w @ flat(f2).double()).reshape(f2.shape), atol=1e-5, rtol=1e-5
    )


def test_co_attention_official_variant_and_residual():
    f1, f2 = torch.randn(2, 5, 3, 4), torch.randn(2, 5, 3, 4)
    fw1, fw2 = CoAttention(shared_weights=False, residual=True)(f1, f2)
    ref1 = attention_by_equation(f1, f2, f1, -1.0).reshape(f1.shape) + f1
    ref2 = attention_by_equation(f2, f1, f2, -1.0).reshape(f2.shape) + f2  # softmax(−F2 F1ᵀ) F2
    torch.testing.assert_close(fw1.double(), ref1.double(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fw2.double(), ref2.double(), atol=1e-5, rtol=1e-5)


def test_co_attention_single_batch_and_errors():
    layer = CoAttention()
    f = torch.randn(4, 3, 2, 2)
    out = layer(f)
    assert out.shape == f.shape
    fw1, fw2 = layer(f[:2], f[2:])
    torch.testing.assert_close(out, torch.cat([fw1, fw2]))
    with pytest.raises(ValueError, match=r"f must hold an even number.*got batch size 3"):
        layer(torch.randn(3, 3, 2, 2))
    with pytest.raises(ValueError, match=r"f2 must have f1's shape \(2, 3, 2, 2\).*\(2, 4, 2, 2\)"):
        layer(torch.randn(2, 3, 2, 2), torch.randn(2, 4, 2, 2))


# ---------------------------------------------------------------- AttentionErase (PCA-Net eq. 3–5)
def test_attention_erase_matches_equations_3_to_5():
    fw = torch.rand(2, 4, 3, 3)
    images = torch.randn(2, 3, 12, 12)
    erased, mask = AttentionErase(threshold=0.6)(images, fw)
    a = fw.amax(dim=1, keepdim=True)  # eq. 3
    lo, hi = a.amin((2, 3), keepdim=True), a.amax((2, 3), keepdim=True)
    a = F.interpolate((a - lo) / (hi - lo), size=(12, 12), mode="bilinear", align_corners=False)
    mask_ref = (a <= 0.6).float()  # eq. 4: 0 where A > θ
    assert torch.equal(mask, mask_ref)
    assert torch.equal(erased, images * mask_ref)  # eq. 5
    assert 0 < mask.mean() < 1


def test_attention_erase_erases_the_peak_and_passes_gradient_to_images():
    fw = torch.zeros(1, 2, 4, 4)
    fw[0, 1, 0, 0] = 5.0  # the most salient spot: top-left
    images = torch.ones(1, 3, 16, 16, requires_grad=True)
    erased, mask = AttentionErase(threshold=0.5)(images, fw)
    assert mask[0, 0, 0, 0] == 0 and mask[0, 0, -1, -1] == 1
    erased.sum().backward()
    assert torch.equal(images.grad, mask.expand_as(images))


def test_attention_erase_top_channel_and_official_normalisation():
    fw = torch.zeros(1, 3, 4, 4)
    fw[0, 0, 0, 0] = 9.0  # channel 0: the largest single value
    fw[0, 2] = 1.0
    fw[0, 2, 3, 3] = 3.0  # channel 2: the largest mean
    _, m_max = AttentionErase(mode="max")(torch.ones(1, 3, 4, 4), fw)
    _, m_top = AttentionErase(mode="top_channel")(torch.ones(1, 3, 4, 4), fw)
    assert m_max[0, 0, 0, 0] == 0 and m_max[0, 0, 3, 3] == 1
    assert m_top[0, 0, 3, 3] == 0 and m_top[0, 0, 0, 0] == 1
    # "max" normalisation (official θ × max): channel 2 is 1/3 of its max everywhere but the peak.
    _, m_off = AttentionErase(threshold=0.3, mode="top_channel", normalize="max")(
        torch.ones(1, 3, 4, 4), fw
    )
    assert m_off.sum() == 0  # every pixel is ≥ 1/3 > 0.3 of the max


def test_attention_erase_sampled_mode_follows_sqrt_mean_activation():
    fw = torch.zeros(1, 3, 2, 2)
    fw[0, 0, 0, 0] = 4.0  # mean 1 -> weight sqrt(1) = 1
    fw[0, 2, 1, 1] = 36.0  # mean 9 -> weight sqrt(9) = 3; channel 1 is dead: weight 0
    layer = AttentionErase(mode="sampled")
    g = torch.Generator().manual_seed(0)
    picked = [layer.attention_map(fw, g)[0].sum().item() for _ in range(400)]  # 4, 0 or 36
    assert picked.count(0.0) == 0
    assert 0.65 < picked.count(36.0) / len(picked) < 0.85  # expected 3 / (1 + 3)


def test_attention_erase_seeded_draws_are_reproducible():
    fw, images = torch.rand(4, 6, 3, 3), torch.randn(4, 3, 9, 9)
    a = AttentionErase((0.2, 0.5), mode="sampled", seed=7)
    b = AttentionErase((0.2, 0.5), mode="sampled", seed=7)
    assert all(torch.equal(a(images, fw)[1], b(images, fw)[1]) for _ in range(3))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    torch.testing.assert_close(a(images, fw, generator=g1)[1], b(images, fw, generator=g2)[1])
    theta = a.thresholds(1000, torch.device("cpu"), torch.Generator().manual_seed(0)).flatten()
    assert theta.min() >= 0.2 and theta.max() <= 0.5 and theta.std() > 0.05
    a.eval()
    assert torch.all(a.thresholds(5, torch.device("cpu")) == 0.35)  # eval: midpoint


@pytest.mark.parametrize("threshold", [-0.1, 1.5, (0.6, 0.2), (0.1, 1.2)])
def test_attention_erase_rejects_bad_threshold(threshold):
    with pytest.raises(ValueError, match="threshold"):
        AttentionErase(threshold=threshold)


def test_attention_erase_rejects_mismatched_batch():
    with pytest.raises(ValueError, match=r"fw must have one feature map per image"):
        AttentionErase()(torch.randn(2, 3, 8, 8), torch.randn(3, 4, 2, 2))


# ---------------------------------------------------------------- pooling
def test_bilinear_pooling_matches_bcnn():
    x = torch.randn(2, 3, 4, 5)
    out = BilinearPooling(eps=0.0)(x)
    b = torch.einsum("bil,bjl->bij", flat(x), flat(x)).flatten(1) / 20
    b = torch.sign(b) * b.abs().sqrt()
    torch.testing.assert_close(out, b / b.norm(dim=1, keepdim=True))
    assert out.shape == (2, 9)
    y = torch.randn(2, 4, 4, 5)
    assert BilinearPooling()(x, y).shape == (2, 12)
    with pytest.raises(ValueError, match=r"y must match x in batch and spatial size"):
        BilinearPooling()(x, torch.randn(2, 4, 3, 5))


def test_bilinear_attention_pooling_matches_wsdan():
    f, a = torch.randn(2, 5, 4, 4), torch.rand(2, 3, 4, 4)
    out = BilinearAttentionPooling(eps=0.0, scale=100.0)(f, a)
    p = torch.einsum("bmhw,bchw->bmc", a, f).flatten(1) / 16
    p = torch.sign(p) * p.abs().sqrt()
    torch.testing.assert_close(out, 100 * p / p.norm(dim=1, keepdim=True))
    assert BilinearAttentionPooling()(f, torch.rand(2, 3, 2, 2)).shape == (2, 15)


# ---------------------------------------------------------------- every layer
_IMAGES = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def _layer_cases():
    return [
        ("SCI", lambda: SCI(4), lambda x: (x,)),
        ("CCI", lambda: CCI(4), lambda x: (x,)),
        ("CoAttention", lambda: CoAttention(), lambda x: (x,)),
        ("AttentionErase", lambda: AttentionErase(0.5), lambda x: (_IMAGES, x)),
        ("BilinearPooling", lambda: BilinearPooling(), lambda x: (x,)),
        ("BilinearAttentionPooling", lambda: BilinearAttentionPooling(), lambda x: (x, x[:, :2])),
    ]


def _as_list(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


@pytest.mark.parametrize(
    ("name", "make", "args"), _layer_cases(), ids=[c[0] for c in _layer_cases()]
)
def test_layer_channels_last_state_dict_and_compile(name, make, args):
    layer = make().eval()
    x = torch.rand(4, 4, 5, 5)
    expected = _as_list(layer(*args(x)))
    # channels_last input gives the same numbers
    cl = [_as_list(layer(*args(x.contiguous(memory_format=torch.channels_last))))]
    for got, want in zip(cl[0], expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # state_dict round trip
    clone = make().eval()
    clone.load_state_dict(layer.state_dict())
    for got, want in zip(_as_list(clone(*args(x))), expected, strict=True):
        torch.testing.assert_close(got, want)
    # torch.compile traces the whole layer without graph breaks
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    for got, want in zip(_as_list(compiled(*args(x))), expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_sci_compiles_with_inductor_and_backpropagates():
    sci = SCI(4)
    x = torch.rand(2, 4, 5, 5, requires_grad=True)
    out = torch.compile(sci, fullgraph=True)(x)
    torch.testing.assert_close(out, sci(x), atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and sci.phi.weight.grad is not None


@pytest.mark.parametrize(
    ("make", "dynamic"),
    [
        (lambda: SCI(4), None),
        (lambda: SCI(4), True),
        (lambda: CCI(4), None),
        (lambda: SCI(512), None),
        (lambda: CCI(512), None),
    ],
    ids=["sci-automatic-dynamic", "sci-dynamic", "cci-automatic-dynamic", "sci-512", "cci-512"],
)
def test_layer_with_conv_compiles_for_a_second_spatial_size(make, dynamic):
    # φ(Y) with Y a reshaped bmm output: on CPU, inductor's channels_last layout for the conv once
    # failed to order Y's symbolic strides (pytorch/pytorch#185510) at the second size. From
    # C = 512 eager `auto` runs SDPA's CPU kernel, whose saved views failed the same way: under
    # compile on the CPU a call with a backward takes the reference.
    layer = make()
    compiled = torch.compile(layer, fullgraph=True, dynamic=dynamic)
    c = layer.channels
    for shape in [(2, c, 5, 5), (2, c, 6, 7)]:
        x = torch.rand(shape, requires_grad=True)
        got = _as_list(compiled(x))
        sum(t.sum() for t in got).backward()
        got_grads = [x.grad] + [p.grad for p in layer.parameters()]
        x.grad = None
        layer.zero_grad(set_to_none=True)
        want = _as_list(layer(x))
        sum(t.sum() for t in want).backward()
        want_grads = [x.grad] + [p.grad for p in layer.parameters()]
        layer.zero_grad(set_to_none=True)
        for g, w in zip(got + got_grads, want + want_grads, strict=True):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", fgattn.__all__)
def test_public_names_import_with_docstrings(name):
    obj = getattr(fgattn, name)
    assert obj.__doc__ and len(obj.__doc__.strip()) > 20
