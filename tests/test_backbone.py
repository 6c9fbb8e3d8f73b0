"""TimmBackbone: timm models as last-feature-map extractors (CPU, timm's tiny test models)."""

from __future__ import annotations

import pytest
import timm
import torch
from einops import rearrange
from torch import nn

import fgattn
from fgattn.backbone import TimmBackbone, resolve_backbone

# A two-stage Swin small enough for CPU tests; any input multiple of 32 px works.
SWIN = ("swin_tiny_patch4_window7_224", dict(embed_dim=16, depths=(1, 1), num_heads=(1, 2)))
SWIN[1]["window_size"] = 4
BACKBONES = {
    "test_resnet": ("test_resnet", {}),
    "test_convnext": ("test_convnext", {}),
    "test_efficientnet": ("test_efficientnet", {}),
    "test_vit": ("test_vit", {}),
    "swin": SWIN,
}


def _backbone(key: str, **kwargs) -> TimmBackbone:
    name, base = BACKBONES[key]
    torch.manual_seed(0)
    return TimmBackbone(name, **dict(base, **kwargs))


def _reference_map(bb: TimmBackbone, x: torch.Tensor) -> torch.Tensor:
    """The model's own forward_features, brought to NCHW by hand (prefix tokens dropped)."""
    f = bb.model.forward_features(x)
    if f.dim() == 4 and f.shape[-1] == bb.out_channels and f.shape[1] != bb.out_channels:
        return rearrange(f, "b h w c -> b c h w")  # Swin: NHWC
    if f.dim() == 3:  # ViT: (B, prefix + h·w, C)
        tokens = f[:, bb.model.num_prefix_tokens :]
        h, w = x.shape[2] // bb.reduction, x.shape[3] // bb.reduction
        return rearrange(tokens, "b (h w) c -> b c h w", h=h, w=w)
    return f


@pytest.mark.parametrize("key", list(BACKBONES))
def test_last_map_nchw_matches_model_features(key):
    bb = _backbone(key).eval()
    x = torch.randn(2, 3, 64, 64)
    out = bb(x)
    assert out.shape == (2, bb.out_channels, 64 // bb.reduction, 64 // bb.reduction)
    assert out.is_contiguous() or out.is_contiguous(memory_format=torch.channels_last)
    # Same numbers as the model's own final features (final norm included).
    torch.testing.assert_close(out, _reference_map(bb, x))


def test_vit_prefix_tokens_removed_and_other_input_sizes():
    # Class token + 2 register tokens: 3 prefix tokens to drop.
    bb = _backbone("test_vit", reg_tokens=2).eval()
    assert bb.model.num_prefix_tokens == 3
    assert bb.reduction == 16
    for size in (64, 96, 128):
        x = torch.randn(1, 3, size, size)
        out = bb(x)
        assert out.shape == (1, bb.out_channels, size // 16, size // 16)
        torch.testing.assert_close(out, _reference_map(bb, x))


def test_fixed_size_models_get_dynamic_size_unless_pinned():
    # timm marks ViT and Swin fixed-size; the adapter asks for dynamic_img_size.
    bb = TimmBackbone(SWIN[0], **SWIN[1])
    assert bb.model.dynamic_img_size
    assert bb(torch.randn(1, 3, 96, 96)).shape[-2:] == (12, 12)
    pinned = TimmBackbone("test_vit", img_size=64)
    assert pinned.model.patch_embed.img_size == (64, 64)
    # A model without dynamic-size support is still built (at its own size).
    cnn = TimmBackbone("test_resnet")
    assert cnn(torch.randn(1, 3, 96, 96)).shape == (1, 96, 3, 3)


def test_out_channels_and_reduction_are_timm_feature_info():
    bb = _backbone("test_convnext")
    model = timm.create_model("test_convnext", features_only=True, out_indices=(-1,))
    assert bb.out_channels == model.feature_info.channels()[-1]
    assert bb.reduction == model.feature_info.reduction()[-1]


def test_norm_flag_controls_final_norm():
    with_norm = _backbone("test_vit").eval()
    without = _backbone("test_vit", norm=False).eval()
    without.load_state_dict(with_norm.state_dict(), strict=False)
    x = torch.randn(1, 3, 64, 64)
    normed = with_norm.model.norm(rearrange(without(x), "b c h w -> b h w c"))
    torch.testing.assert_close(with_norm(x), rearrange(normed, "b h w c -> b c h w"))
    assert not torch.allclose(with_norm(x), without(x))


@pytest.mark.parametrize("key", ["test_resnet", "test_vit"])
def test_grad_checkpointing_passes_through(key):
    bb = _backbone(key).train()
    x = torch.randn(2, 3, 64, 64)
    bb(x).square().mean().backward()
    grads = [p.grad.clone() for p in bb.parameters()]
    bb.zero_grad()

    bb.set_grad_checkpointing(True)
    assert bb.model.grad_checkpointing
    block = bb.model.blocks[0] if key == "test_vit" else bb.model.layer1[0]
    # First leaf of the first block: non-reentrant checkpointing stops recomputing early, so
    # only the block's first layers are sure to run again in backward.
    first = next(m for m in block.modules() if not list(m.children()))
    calls = []
    handle = first.register_forward_hook(lambda *_: calls.append(1))
    bb(x).square().mean().backward()
    handle.remove()
    assert len(calls) == 2  # recomputed in backward: the checkpoint is in effect
    for g, p in zip(grads, bb.parameters(), strict=True):
        torch.testing.assert_close(p.grad, g)


def test_pretrained_from_local_file(tmp_path):
    torch.manual_seed(1)
    source = timm.create_model("test_resnet")
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    bb = TimmBackbone("test_resnet", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    for name, tensor in bb.model.state_dict().items():
        torch.testing.assert_close(tensor, source.state_dict()[name], msg=name)


def test_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="features_only"):
        TimmBackbone("test_resnet", features_only=True)
    bb = _backbone("test_resnet")
    monkeypatch.setattr(bb.body, "forward", lambda x: [torch.zeros(x.shape[0], 5, 8)])
    with pytest.raises(ValueError, match=r"no single spatial feature map.*\(2, 5, 8\)"):
        bb(torch.randn(2, 3, 64, 64))
    with pytest.raises(ValueError, match="'anything' is not a timm model name"):
        TimmBackbone("anything")
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: nn.Linear(2, 2))
    with pytest.raises(ValueError, match="forward_intermediates"):
        TimmBackbone("test_resnet")


def test_resolve_backbone():
    bb = resolve_backbone("test_resnet")
    assert isinstance(bb, TimmBackbone)
    assert resolve_backbone(bb) is bb
    with pytest.raises(ValueError, match="out_channels"):
        resolve_backbone(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()))
    with pytest.raises(ValueError, match="pretrained"):
        resolve_backbone(bb, pretrained=True)
    with pytest.raises(ValueError, match=r"timm model name or an nn\.Module"):
        resolve_backbone(42)


def test_exported_from_package():
    assert fgattn.TimmBackbone is TimmBackbone
    assert "TimmBackbone" in fgattn.__all__
