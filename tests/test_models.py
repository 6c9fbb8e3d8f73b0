"""CIN and PCA-Net assembled on timm's tiny test models (CPU, 64 px)."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from einops import reduce

import fgattn
from fgattn.models import CIN, PCANet, create_model

SWIN_KW = dict(embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4)
BACKBONES = {
    "test_resnet": ("test_resnet", {}),
    "test_convnext": ("test_convnext", {}),
    "test_efficientnet": ("test_efficientnet", {}),
    "test_vit": ("test_vit", {}),
    "swin": ("swin_tiny_patch4_window7_224", SWIN_KW),
}
K = 5
# Pairs (i, i + 2): (0, 0) is a positive pair, (1, 2) a negative one.
TARGET = torch.tensor([0, 1, 0, 2])


def _model(arch: str, key: str = "test_resnet", **kwargs):
    name, base = BACKBONES[key]
    if arch == "pcanet":
        kwargs.setdefault("bilinear_dim", 16)  # 256-d bilinear vectors keep the tests light
        kwargs.setdefault("mismatched_pairs", "ignore")  # TARGET's pair (1, 2) is for CIN
    torch.manual_seed(0)
    return create_model(arch, backbone=name, num_classes=K, **dict(base, **kwargs))


def _images(n: int = 4, size: int = 64) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def _grad_norm(loss: torch.Tensor, params) -> float:
    params = [p for p in params if p.requires_grad]
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return sum(float(g.abs().sum()) for g in grads if g is not None)


# Both models on every backbone family


@pytest.mark.parametrize("arch", ["cin", "pcanet"])
@pytest.mark.parametrize("key", list(BACKBONES))
def test_train_and_eval_forward_backward(arch, key):
    model = _model(arch, key).train()
    x = _images()
    out = model(x, TARGET)
    assert out["logits"].shape == (4, K)
    assert out["loss"].dim() == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    first = next(p for p in model.backbone.parameters())
    assert first.grad is not None and first.grad.abs().sum() > 0
    assert model.fc.weight.grad.abs().sum() > 0

    model.eval()
    logits = model(x)
    assert logits.shape == (4, K)
    torch.testing.assert_close(logits, model.forward_head(model.forward_features(x)))
    # Without a target a training-mode model also returns plain logits, and says what does not
    # train (tests/test_timm_integration.py tests the warning).
    with pytest.warns(fgattn.models.NoTargetWarning):
        assert model.train()(x).shape == (4, K)


@pytest.mark.parametrize("arch", ["cin", "pcanet"])
def test_odd_batch_raises(arch):
    model = _model(arch).train()
    with pytest.raises(ValueError, match=r"x must be a paired batch.*\(3, 3, 64, 64\)"):
        model(_images(3), torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match=r"target must have shape \(4,\)"):
        model(_images(4), torch.tensor([0, 1]))
    # Eval takes any batch.
    assert model.eval()(_images(3)).shape == (3, K)


# CIN


def test_cin_losses_follow_eq_9():
    model = _model("cin").train()
    out = model(_images(), TARGET)
    assert set(out) >= {"loss", "logits", "loss_cls", "loss_cont", "embeddings"}
    assert out["embeddings"].shape == (4, 512)
    assert out["pair_labels"].tolist() == [True, False]
    torch.testing.assert_close(out["loss"], out["loss_cls"] + 2.0 * out["loss_cont"])
    torch.testing.assert_close(out["loss_cls"], F.cross_entropy(out["logits"], TARGET))
    # The contrastive term is the paper's, on the CCI embeddings and pair labels.
    emb_a, emb_b = out["embeddings"].chunk(2)
    d = (emb_a - emb_b).norm(dim=1)
    expected = torch.stack([d[0] ** 2, (0.5 - d[1]).clamp_min(0) ** 2]).mean()
    torch.testing.assert_close(out["loss_cont"], expected)


def test_cin_contrastive_loss_nonzero_on_positive_pairs_and_trains_psi_and_h():
    # All pairs positive: the Hawkeye bug (no positive pairs, loss ≡ 0) cannot hide here.
    model = _model("cin").train()
    out = model(_images(), torch.tensor([3, 1, 3, 1]))
    assert out["pair_labels"].all()
    assert out["loss_cont"] > 0
    assert _grad_norm(out["loss_cont"], model.cci.psi.parameters()) > 0
    assert _grad_norm(out["loss_cont"], model.embed.parameters()) > 0
    assert _grad_norm(out["loss"], model.cci.psi.parameters()) > 0
    # φ is shared by SCI and CCI, and both losses reach it.
    assert model.cci.phi is model.sci.phi
    assert _grad_norm(out["loss_cls"], model.sci.phi.parameters()) > 0
    assert _grad_norm(out["loss_cont"], model.sci.phi.parameters()) > 0


def test_cin_eval_is_single_image_sci_path(monkeypatch):
    model = _model("cin").eval()
    monkeypatch.setattr(model.cci, "forward", lambda *a, **k: pytest.fail("CCI ran at inference"))
    x = _images()
    z = model.sci(model.backbone(x))
    expected = model.fc(reduce(z, "b c h w -> b c", "mean"))
    torch.testing.assert_close(model(x), expected)


def test_cin_options():
    model = _model("cin", alpha=0.5, margin=1.0, label_smoothing=0.1, cci_cls_loss=True).train()
    out = model(_images(), TARGET)
    assert model.contrastive.margin == 1.0
    smoothed = F.cross_entropy(out["logits"], TARGET, label_smoothing=0.1)
    torch.testing.assert_close(out["loss_cls"], smoothed)
    assert out["logits_cci"].shape == (4, K)
    total = out["loss_cls"] + out["loss_cls_cci"] + 0.5 * out["loss_cont"]
    torch.testing.assert_close(out["loss"], total)
    assert _model("cin", embed_dim=32).train()(_images(), TARGET)["embeddings"].shape == (4, 32)
    hawkeye = _model("cin", length_normalized=True)
    assert hawkeye.sci.length_normalized and hawkeye.cci.length_normalized


# PCA-Net


def test_pcanet_losses_follow_eq_6():
    model = _model("pcanet").train()
    out = model(_images(), TARGET)
    keys = {"loss", "logits", "logits_w", "logits_e", "loss_cls", "loss_center", "erase_mask"}
    assert set(out) >= keys | {"loss_cls_o", "loss_cls_w", "loss_cls_e"}
    branch = out["loss_cls_o"] + out["loss_cls_w"] + out["loss_cls_e"]
    torch.testing.assert_close(out["loss_cls"], branch)
    torch.testing.assert_close(out["loss"], branch + 1.0 * out["loss_center"])
    torch.testing.assert_close(out["loss_cls_o"], F.cross_entropy(out["logits"], TARGET))
    mask = out["erase_mask"]
    assert mask.shape == (4, 1, 64, 64)
    assert (mask == 0).any() and (mask == 1).any()  # something erased, something kept
    assert model.num_features == 16 * 16


def test_pcanet_backward_through_every_branch():
    model = _model("pcanet").train()
    out = model(_images(), TARGET)
    backbone = list(model.backbone.parameters())
    for name in ("loss_cls_o", "loss_cls_w", "loss_cls_e", "loss_center"):
        assert _grad_norm(out[name], backbone) > 0, name
        assert _grad_norm(out[name], model.head.parameters()) > 0, name
    # The co-attended branch depends on the partner: its gradient reaches the partner's image.
    x = _images().requires_grad_()
    (g_w,) = torch.autograd.grad(model(x, TARGET)["logits_w"][0].sum(), x)
    assert g_w[2].abs().sum() > 0  # logits of image 0 depend on its partner, image 2


def test_pcanet_center_loss_on_original_features():
    model = _model("pcanet", center_loss_weight=0.5).train()
    before = model.center_loss.centers.clone()
    out = model(_images(), TARGET)
    torch.testing.assert_close(out["loss"], out["loss_cls"] + 0.5 * out["loss_center"])
    moved = (model.center_loss.centers - before).abs().sum(dim=1) > 0
    assert moved.tolist() == [True, True, True, False, False]  # classes 0, 1, 2 updated


def test_pcanet_eval_has_no_co_attention_or_erase(monkeypatch):
    model = _model("pcanet").eval()
    monkeypatch.setattr(model.co_attention, "forward", lambda *a: pytest.fail("co-attention"))
    monkeypatch.setattr(model.erase, "forward", lambda *a: pytest.fail("erase"))
    x = _images()
    expected = model.fc(model.head(model.backbone(x)))
    torch.testing.assert_close(model(x), expected)


def test_pcanet_official_variant_options():
    model = _model(
        "pcanet",
        pooling="attention",
        num_attention_maps=4,
        shared_weights=False,
        co_attention_residual=True,
        erase_threshold=(0.2, 0.5),
        erase_mode="sampled",
        erase_normalize="max",
        coattend_erased=True,
        branch_reduction="mean",
        feature_scale=100.0,
    ).train()
    assert model.num_features == 4 * 16
    out = model(_images(), TARGET)
    assert out["logits_we"].shape == (4, K)
    ces = [out[f"loss_cls_{b}"] for b in ("o", "w", "e", "we")]
    torch.testing.assert_close(out["loss_cls"], torch.stack(ces).mean())
    out["loss"].backward()
    assert model.head.attention.conv.weight.grad.abs().sum() > 0
    # The classifier sees the scaled vector, the centre loss the unit-norm one.
    feats = model.forward_head(model.forward_features(_images()), pre_logits=True)
    torch.testing.assert_close(feats.norm(dim=1), torch.full((4,), 100.0))
    with pytest.raises(ValueError, match="branch_reduction"):
        _model("pcanet", branch_reduction="max")
    with pytest.raises(ValueError, match="pooling"):
        _model("pcanet", pooling="gap")


def test_pcanet_unreduced_bilinear_is_c_squared():
    model = _model("pcanet", bilinear_dim=None)
    assert model.num_features == model.backbone.out_channels**2
    assert model.eval()(_images(2)).shape == (2, K)


# timm interface, registry, create_model


@pytest.mark.parametrize("arch", ["cin", "pcanet"])
def test_timm_interface(arch):
    model = _model(arch, drop_rate=0.25).eval()
    x = _images(2)
    feats = model.forward_features(x)
    assert feats.shape[:2] == (2, model.backbone.out_channels)
    pre = model.forward_head(feats, pre_logits=True)
    assert pre.shape == (2, model.num_features)
    assert model.get_classifier() is model.fc and model.fc.out_features == K
    assert model.head_drop.p == 0.25
    model.reset_classifier(7)
    assert model(x).shape == (2, 7) and model.num_classes == 7
    if arch == "pcanet":
        assert model.center_loss.centers.shape == (7, model.num_features)
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)
    model.set_grad_checkpointing(True)
    assert model.backbone.model.grad_checkpointing
    cfg = timm.data.resolve_data_config({}, model=model)
    assert cfg["input_size"] == (3, 448, 448) and cfg["crop_pct"] == pytest.approx(448 / 512)


def test_grad_checkpointing_gives_same_gradients():
    model = _model("cin").train()
    model(_images(), TARGET)["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(_images(), TARGET)["loss"].backward()
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], msg=n)


@pytest.mark.parametrize("name", ["cin_resnet50", "pcanet_resnet50"])
def test_registered_in_timm(name):
    assert timm.is_model(name) and timm.is_model(name.replace("50", "101"))
    model = timm.create_model(name, num_classes=3)
    assert model.backbone.name == "resnet50.tv_in1k" and model.backbone.out_channels == 2048
    assert model.pretrained_cfg["architecture"] == name
    cfg = timm.data.resolve_data_config({}, model=model)
    assert cfg["input_size"] == (3, 448, 448)
    assert cfg["crop_pct"] == pytest.approx(448 / 512)
    assert cfg["mean"] == timm.data.IMAGENET_DEFAULT_MEAN
    assert model.num_features == (2048 if name.startswith("cin") else 256 * 256)
    assert model.eval()(_images(1, 64)).shape == (1, 3)


def test_registered_pretrained_backbone_from_local_file(tmp_path):
    torch.manual_seed(3)
    source = timm.create_model("test_resnet")
    path = tmp_path / "backbone.pth"
    torch.save(source.state_dict(), path)
    for name in ("cin_resnet50", "pcanet_resnet50"):
        model = timm.create_model(
            name,
            pretrained=True,
            backbone="test_resnet",
            num_classes=K,
            pretrained_cfg_overlay=dict(file=str(path)),
        )
        for key, tensor in model.backbone.model.state_dict().items():
            torch.testing.assert_close(tensor, source.state_dict()[key], msg=key)


def test_create_model_and_backbone_arguments():
    assert fgattn.create_model is create_model
    model = create_model("cin", backbone="test_vit", num_classes=K, img_size=64)
    assert isinstance(model, CIN)
    assert model.backbone.model.patch_embed.img_size == (64, 64)  # img_size reached timm
    assert model.pretrained_cfg["input_size"] == (3, 64, 64)
    assert model.pretrained_cfg["mean"] == model.backbone.pretrained_cfg["mean"] == (0.5,) * 3
    registered = timm.create_model("cin_resnet50", backbone="test_vit", num_classes=K, img_size=64)
    assert registered.pretrained_cfg["input_size"] == (3, 64, 64)
    assert registered.pretrained_cfg["mean"] == (0.5,) * 3  # the overriding backbone's
    via_timm = create_model("pcanet_resnet50", backbone="test_resnet", num_classes=K)
    assert isinstance(via_timm, PCANet) and via_timm.backbone.name == "test_resnet"
    ready = fgattn.TimmBackbone("test_convnext")
    assert PCANet(ready, num_classes=K, bilinear_dim=8).backbone is ready
    with pytest.raises(ValueError, match="arch must be one of"):
        create_model("api_net", backbone="test_resnet")
    with pytest.raises(ValueError, match="out_channels"):
        CIN(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), num_classes=K)


# compile and checkpoints


@pytest.mark.parametrize("arch", ["cin", "pcanet"])
def test_compile_matches_eager(arch):
    model = _model(arch).train()
    x = _images()
    state = {k: v.clone() for k, v in model.state_dict().items()}  # to undo BN / centre updates
    torch.manual_seed(5)
    eager = model(x, TARGET)["loss"]
    # Training graph (forward and backward) traced by dynamo + AOTAutograd.
    compiled = torch.compile(model, backend="aot_eager")
    torch.manual_seed(5)
    model.load_state_dict(state)
    out = compiled(x, TARGET)
    out["loss"].backward()
    assert model.fc.weight.grad.abs().sum() > 0
    torch.testing.assert_close(out["loss"], eager, rtol=1e-4, atol=1e-4)
    # Inference as one graph, code-generated by inductor for CIN.
    model.eval()
    backend = "inductor" if arch == "cin" else "aot_eager"
    logits = torch.compile(model, fullgraph=True, backend=backend)(x)
    torch.testing.assert_close(logits, model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["cin", "pcanet"])
def test_checkpoint_round_trip(arch, tmp_path):
    model = _model(arch).train()
    model(_images(), TARGET)["loss"].backward()  # move BN statistics and centres off their init
    path = tmp_path / "model.pth"
    torch.save(model.state_dict(), path)
    fresh = _model(arch)
    fresh.load_state_dict(torch.load(path, weights_only=True))
    torch.testing.assert_close(fresh.eval()(_images()), model.eval()(_images()))
    if arch == "pcanet":
        torch.testing.assert_close(fresh.center_loss.centers, model.center_loss.centers)
        assert model.center_loss.centers.abs().sum() > 0
    # Through timm: a registered name with the same backbone loads the same checkpoint.
    name = f"{arch}_resnet50"
    extra = dict(bilinear_dim=16) if arch == "pcanet" else {}
    via_timm = timm.create_model(
        name, backbone="test_resnet", num_classes=K, checkpoint_path=str(path), **extra
    )
    torch.testing.assert_close(via_timm.eval()(_images()), model(_images()))


def test_cin_training_step_compiles_for_a_second_input_size():
    # ResNet-10t's 512 channels: eager `auto` runs SDPA's CPU kernel there, which inductor could
    # not compile with a backward at a second input size (CIN trained at 224 then 448 px broke);
    # under compile on the CPU the reference runs instead.
    model = create_model("cin", backbone="resnet10t", num_classes=K).train()
    compiled = torch.compile(model, fullgraph=True)
    for size in (64, 96):
        x = _images(size=size)
        out = compiled(x, TARGET)
        out["loss"].backward()
        assert torch.isfinite(out["loss"]) and model.fc.weight.grad.abs().sum() > 0
        model.zero_grad(set_to_none=True)
