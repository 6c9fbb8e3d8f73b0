"""Bad input gets a clear error at the earliest point, and NaN never reaches saved state.

The table keeps the cases of a fault-injection probe of the public API (issue 13): each row is a
call, the exception it must raise and a fragment of the message.
"""

import warnings

import pytest
import torch

import fgattn
from fgattn import CenterLoss, ContrastiveLoss
from fgattn import functional as F

x = torch.randn(2, 4, 5)
emb = torch.randn(3, 8)

BAD = [
    # constructors: arguments are checked before anything is built
    (lambda: CenterLoss(0, 8), ValueError, "num_classes must be an int >= 1, got 0"),
    (lambda: CenterLoss(10, 8, alpha="0.5"), TypeError, "alpha must be a float, got str"),
    (lambda: CenterLoss(10, 8, alpha=float("nan")), ValueError, "alpha must be a finite float"),
    (lambda: CenterLoss(10, 8, alpha=1.5), ValueError, r"alpha must be a finite float in \[0, 1\]"),
    (lambda: CenterLoss(2.5, 8), TypeError, "num_classes must be an int, got float"),
    (lambda: CenterLoss(10, 8, update="ema"), ValueError, "update must be one of"),
    (lambda: ContrastiveLoss(margin=float("nan")), ValueError, "margin must be a finite float"),
    (
        lambda: ContrastiveLoss(margin=0),
        ValueError,
        r"margin must be a finite float in \(0, 10000\]",
    ),
    (lambda: ContrastiveLoss(margin=1e200), ValueError, r"in \(0, 10000\], got 1e\+200"),
    # forward: tensors are checked before they are used
    (
        lambda: CenterLoss(3, 8)(emb, torch.tensor([0, 1, -1])),
        ValueError,
        r"in \[0, 3\), got \[-1\]",
    ),
    (lambda: CenterLoss(3, 8)(emb, torch.tensor([0, 1, 3])), ValueError, r"in \[0, 3\), got \[3\]"),
    (
        lambda: CenterLoss(3, 8)(emb, [0, 1, 2]),
        TypeError,
        "labels must be a torch.Tensor, got list",
    ),
    (lambda: CenterLoss(3, 8)(emb, torch.zeros(3)), ValueError, "labels must be integer"),
    (
        lambda: ContrastiveLoss()(emb, emb, torch.tensor([3, 0, 7])),
        ValueError,
        r"same must be bool or 0/1.*\[0, 3, 7\]",
    ),
    (
        lambda: ContrastiveLoss()(emb, emb, torch.tensor([0.3, 1.0, 0.0])),
        ValueError,
        "same must be bool or 0/1",
    ),
    (lambda: F.channel_attention(x, scale=float("inf")), ValueError, "scale must be a finite"),
    (lambda: F.channel_attention(x, scale="-1"), TypeError, "scale must be a Python float"),
    (lambda: F.channel_attention(x.tolist()), TypeError, "q must be a torch.Tensor, got list"),
    (lambda: F.channel_attention(x, backend="bogus"), ValueError, "backend must be one of"),
    (lambda: fgattn.backends.set_backend("cuda"), ValueError, "backend must be one of"),
]


@pytest.mark.parametrize(("call", "error", "match"), BAD)
def test_bad_input_is_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_nan_batch_leaves_center_loss_centres_unchanged():
    loss = CenterLoss(3, 8, alpha=0.5)
    labels = torch.tensor([0, 1, 2])
    loss(torch.randn(3, 8), labels)
    before = loss.centers.clone()
    bad = torch.randn(3, 8)
    bad[1, 4] = float("nan")
    with pytest.warns(UserWarning, match="centres were left unchanged"):
        value = loss(bad, labels)
    assert not torch.isfinite(value)  # the batch's loss says it was bad
    torch.testing.assert_close(loss.centers, before)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clean = loss(torch.randn(3, 8), labels)  # the next clean batch is unaffected
    assert torch.isfinite(clean) and torch.isfinite(loss.centers).all()


def test_inf_batch_leaves_center_loss_centres_unchanged():
    loss = CenterLoss(2, 4)
    before = loss.centers.clone()
    with pytest.warns(UserWarning):
        loss(torch.full((2, 4), float("inf")), torch.tensor([0, 1]))
    torch.testing.assert_close(loss.centers, before)


def test_valid_contrastive_labels_still_work():
    a, b = torch.randn(3, 8), torch.randn(3, 8)
    as_bool = ContrastiveLoss()(a, b, torch.tensor([True, False, True]))
    as_int = ContrastiveLoss()(a, b, torch.tensor([1, 0, 1]))
    as_float = ContrastiveLoss()(a, b, torch.tensor([1.0, 0.0, 1.0]))
    torch.testing.assert_close(as_bool, as_int)
    torch.testing.assert_close(as_bool, as_float)


# ---------------------------------------------------------------------------------------------
# Layers and models

LAYERS_BAD = [
    (lambda: fgattn.SCI(0), ValueError, "channels must be an int >= 1, got 0"),
    (lambda: fgattn.SCI(4, kernel_size=2), ValueError, "kernel_size must be odd"),
    (lambda: fgattn.SCI(4, scale=float("nan")), ValueError, "scale must be a finite float"),
    (lambda: fgattn.SCI(4, length_normalized="yes"), TypeError, "length_normalized must be a bool"),
    (lambda: fgattn.SCI(4.0), TypeError, "channels must be an int"),
    (lambda: fgattn.CCI(4, phi="conv"), TypeError, "phi must be an nn.Module"),
    (lambda: fgattn.CoAttention(scale=float("inf")), ValueError, "scale must be a finite float"),
    (lambda: fgattn.CoAttention(residual=1), TypeError, "residual must be a bool"),
    (lambda: fgattn.AttentionErase(threshold="0.3"), TypeError, "threshold must be a float"),
    (
        lambda: fgattn.AttentionErase(threshold=1.5),
        ValueError,
        r"threshold must be a float in \[0, 1\]",
    ),
    (lambda: fgattn.AttentionErase(mode="avg"), ValueError, "mode must be one of"),
    (
        lambda: fgattn.BilinearPooling(eps=-1),
        ValueError,
        r"eps must be a finite float in \[0, 1\]",
    ),
    # nonsense values that gave inf / NaN outputs
    (lambda: fgattn.SCI(8, scale=1e308), ValueError, r"scale must be a finite float in \[-10000"),
    (lambda: fgattn.SCI(10**9), ValueError, r"channels must be an int in \[1, 65536\]"),
    (lambda: fgattn.BilinearPooling(eps=1e308), ValueError, r"eps must be .* got 1e\+308"),
    (lambda: fgattn.BilinearAttentionPooling(scale=1e308), ValueError, r"scale must be .*10000"),
    (lambda: fgattn.ChannelAttentionModule(gamma_init=1e308), ValueError, "gamma_init must be"),
    (lambda: fgattn.CoAttention(scale=-1e5), ValueError, r"scale must be .*got -100000"),
    (lambda: fgattn.TimmBackbone(None), TypeError, "name must be a str, a timm model name"),
    (
        lambda: fgattn.BilinearAttentionPooling(scale=float("nan")),
        ValueError,
        "scale must be a finite",
    ),
    (
        lambda: fgattn.CCI(4)(
            torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.randn(2, 4, 9)
        ),
        ValueError,
        r"y_a \(the SCI interaction Y\) must have x_a's shape",
    ),
]


@pytest.mark.parametrize(("call", "error", "match"), LAYERS_BAD)
def test_bad_layer_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("arch", ["cin", "pcanet"])
def test_negative_num_classes_is_an_error(arch):
    with pytest.raises(ValueError, match="num_classes must be an int >= 0, got -1"):
        fgattn.create_model(arch, backbone="resnet10t", num_classes=-1)


def test_attention_erase_never_guesses_from_nan_features():
    erase = fgattn.AttentionErase()
    images, fw = torch.rand(2, 3, 16, 16), torch.rand(2, 8, 4, 4)
    fw[0, 2, 1, 1] = float("nan")
    erased, mask = erase(images, fw)
    assert torch.isnan(mask[0]).all() and torch.isnan(erased[0]).all()  # no finite wrong answer
    assert torch.isfinite(mask[1]).all() and (mask[1] == 0).any()  # the clean image is erased


# ---------------------------------------------------------------------------------------------
# Tensors: dtype, rank, empty maps, devices, a φ that changes the shape

img = torch.rand(2, 8, 3, 3)
TENSORS_BAD = [
    (lambda: fgattn.SCI(8)(img.double()), "x has dtype torch.float64, the SCI's weights"),
    (lambda: fgattn.SCI(8)(img.to(torch.uint8)), "x must be a floating-point tensor"),
    (lambda: fgattn.SCI(8)(img[:, :, 0, 0]), r"x must have shape \(B, C, H, W\), got shape \(2,"),
    (lambda: fgattn.SCI(8)(torch.rand(2, 8, 0, 3)), r"C, H, W >= 1\), got shape \(2, 8, 0, 3\)"),
    (lambda: fgattn.ChannelAttentionModule()(torch.rand(2, 8, 3, 0)), "C, H, W >= 1"),
    (lambda: fgattn.BilinearPooling()(torch.rand(2, 4, 0, 3)), "C, H, W >= 1"),
    (lambda: fgattn.PositionAttentionModule(8)(torch.rand(2, 8, 0, 3)), "C, H, W >= 1"),
    (lambda: fgattn.DualAttentionHead(32, 3)(torch.rand(2, 32, 4, 4).double()), "x has dtype"),
    (lambda: fgattn.SCI(8).to("meta")(img), "x is on device cpu, the SCI's weights on meta"),
    (lambda: fgattn.CCI(8)(img, img.to("meta")), r"x_b must be on the device of x_a \(cpu\)"),
    (lambda: fgattn.CoAttention()(img, img.to("meta")), "f2 must be on the device of f1"),
    (lambda: fgattn.CCI(8, phi=torch.nn.Conv2d(8, 8, 3))(torch.rand(4, 8, 5, 5)),
     r"phi must keep the shape of its input .* maps \(2, 8, 5, 5\) to \(2, 8, 3, 3\)"),
    (lambda: CenterLoss(3, 8).to("meta")(emb, torch.tensor([0, 1, 2])),
     r"features must be on the device of CenterLoss.centers \(meta\)"),
]  # fmt: skip


@pytest.mark.parametrize(("call", "match"), TENSORS_BAD)
def test_bad_tensors_are_caught_by_fgattn(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_an_empty_batch_still_works():
    assert fgattn.SCI(8)(torch.rand(0, 8, 3, 3)).shape == (0, 8, 3, 3)


def test_half_precision_under_autocast_is_not_a_dtype_error():
    sci = fgattn.SCI(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert sci(img.bfloat16()).shape == img.shape


MODELS_BAD = [
    ("cin", dict(alpha=float("nan")), ValueError, "alpha must be a finite float in \\[0, 10000\\]"),
    ("cin", dict(embed_dim=0), ValueError, "embed_dim must be an int >= 1, got 0"),
    ("cin", dict(embed_dim=-1), ValueError, "embed_dim must be an int >= 1, got -1"),
    ("cin", dict(label_smoothing=-1), ValueError, "label_smoothing must be a finite float in"),
    ("cin", dict(global_pool="nope"), ValueError, "global_pool must be one of"),
    ("cin", dict(global_pool="catavgmax"), ValueError, "global_pool must be one of"),
    ("cin", dict(cci_cls_loss="no"), TypeError, "cci_cls_loss must be a bool, got str 'no'"),
    ("cin", dict(drop_rate=2.0), ValueError, "drop_rate must be a finite float in \\[0, 1\\]"),
    ("cin", dict(scale=1e308), ValueError, "scale must be a finite float"),
    ("pcanet", dict(center_loss_weight=float("nan")), ValueError, "center_loss_weight must be"),
    ("pcanet", dict(center_loss_weight="nan"), TypeError, "center_loss_weight must be a float"),
    ("pcanet", dict(feature_scale=float("inf")), ValueError, "feature_scale must be a finite"),
    ("pcanet", dict(coattend_erased="no"), TypeError, "coattend_erased must be a bool"),
    ("pcanet", dict(bilinear_dim=0), ValueError, "bilinear_dim must be an int >= 1, got 0"),
    ("pcanet", dict(pooling="attention", num_attention_maps=0), ValueError,
     "num_attention_maps must be an int >= 1"),
    ("pcanet", dict(label_smoothing=2), ValueError, "label_smoothing must be a finite float in"),
    ("pcanet", dict(co_attention_residual="yes"), TypeError, "co_attention_residual must be a"),
    ("pcanet", dict(co_attention_scale="-1"), TypeError, "co_attention_scale must be a float"),
    ("pcanet", dict(center_alpha=2), ValueError, "center_alpha must be a finite float in"),
    ("pcanet", dict(erase_threshold=2), ValueError, "erase_threshold must be a float in"),
    ("pcanet", dict(erase_mode="avg"), ValueError, "erase_mode must be one of"),
    ("pcanet", dict(shared_weights=1), TypeError, "shared_weights must be a bool"),
]  # fmt: skip


@pytest.mark.parametrize(("arch", "kwargs", "error", "match"), MODELS_BAD)
def test_bad_model_arguments_name_themselves(arch, kwargs, error, match):
    with pytest.raises(error, match=match):
        fgattn.create_model(arch, backbone="test_resnet", num_classes=4, **kwargs)


@pytest.mark.parametrize("arch", ["cin", "pcanet"])
def test_a_model_without_classifier_does_not_train(arch):
    model = fgattn.create_model(arch, backbone="test_resnet", num_classes=0).train()
    with pytest.raises(ValueError, match=r"num_classes=0\) has no classifier"):
        model(torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 0, 1]))


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (torch.rand(2, 3, 32, 32, dtype=torch.float64), "x has dtype torch.float64"),
        (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "x must be a floating-point tensor"),
        (torch.rand(2, 3), r"x must have shape \(B, C, H, W\)"),
        (torch.rand(2, 1, 32, 32), "x must have 3 channels"),
    ],
)
def test_models_reject_bad_images(x, match):
    model = fgattn.create_model("cin", backbone="test_resnet", num_classes=4).eval()
    with pytest.raises(ValueError, match=match):
        model(x)
