"""PCA-Net's official code (PRIS-CV/PCA-Net) where it differs from the paper: each option that
reproduces it against the official formula written out line by line, in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fgattn import AttentionErase, BilinearAttentionPooling, CenterLoss
from fgattn.models import PCANET_OFFICIAL, PCANet, create_model

K = 5


def official_center_loss(features, centers, target, alpha=0.95):
    """The official utils.Center_Loss, line for line."""
    features = features.reshape(features.shape[0], -1)
    target_centers = centers[target]
    target_centers = torch.nn.functional.normalize(target_centers, dim=-1)
    center_offset = (1 - alpha) * (features.detach() - target_centers)
    distance = torch.pow(features - target_centers, 2)
    distance = torch.sum(distance, dim=-1)
    center_loss = torch.mean(distance)
    return center_loss, center_offset


def official_bilinear_pooling(feature_map1, feature_map2):
    """The official utils.Bilinear_Pooling.forward, line for line."""
    n, d1, h, w = feature_map1.size()
    feature_map1 = torch.reshape(feature_map1, (n, d1, h * w))
    n, d2, h, w = feature_map2.size()
    feature_map2 = torch.reshape(feature_map2, (n, d2, h * w))
    x = torch.bmm(feature_map1, torch.transpose(feature_map2, 1, 2)) / (h * w)
    x = torch.reshape(x, (n, d1 * d2))
    x = torch.sign(x) * torch.sqrt(torch.abs(x) + 1e-5)
    return 100 * torch.nn.functional.normalize(x)


def official_erase_weights(attention_maps, size):
    """The official attention_erase up to the channel probabilities, line for line."""
    batch_size = attention_maps.shape[0]
    attention_maps = F.interpolate(attention_maps.detach(), size=size, mode="bilinear")
    weights = F.avg_pool2d(attention_maps, size).reshape(batch_size, -1)
    weights = torch.add(torch.sqrt(weights), 1e-12)
    return torch.div(weights, torch.sum(weights, dim=1).unsqueeze(1))


def official_erase(attention_maps, input_image, indices, thresholds):
    """The official attention_erase, line for line, with its two random draws (np.random.choice
    of the channel, random.uniform(0.2, 0.5)) given as ``indices`` and ``thresholds``."""
    _, _, w, h = input_image.shape
    attention_maps = F.interpolate(attention_maps.detach(), size=(w, h), mode="bilinear")
    masks = []
    for i in range(attention_maps.shape[0]):
        attention_map = attention_maps[i].detach()
        index = int(indices[i])
        mask = attention_map[index : index + 1, :, :]
        threshold = float(thresholds[i]) * mask.max()
        mask = (mask < threshold).float()
        masks.append(mask)
    masks = torch.stack(masks)
    return input_image * masks


def _maps(b=3, m=6, h=5, w=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, m, h, w, generator=g, dtype=torch.float64).relu()


# Center loss


def test_official_center_loss_equals_the_official_code():
    torch.manual_seed(0)
    features = F.normalize(torch.randn(6, 8, dtype=torch.float64), dim=1)
    labels = torch.tensor([2, 0, 2, 1, 2, 0])  # class 2 three times, class 0 twice
    ours = CenterLoss(3, 8, alpha=0.05, formula="official").double()
    center = torch.zeros(3, 8, dtype=torch.float64)
    for step in range(3):
        x = (features + 0.1 * step).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        loss = ours(x, labels)
        ref, center_diff = official_center_loss(x_ref, center, labels)
        center[labels] += center_diff  # the official update, as in its train.py
        torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
        (grad,) = torch.autograd.grad(loss, x)
        (grad_ref,) = torch.autograd.grad(ref, x_ref)
        torch.testing.assert_close(grad, grad_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ours.centers, center, rtol=1e-12, atol=1e-12)
    assert center.abs().sum() > 0
    # The default stays Wen et al.'s ½‖x − c‖² with every sample counted.
    wen = CenterLoss(3, 8, alpha=0.05).double()
    assert not torch.allclose(
        wen(features, labels), official_center_loss(features, center, labels)[0]
    )


# Attention erase


def test_upsampled_max_channel_probabilities_equal_the_official_code():
    maps = _maps()
    erase = AttentionErase(mode="sampled", normalize="upsampled_max")
    got = erase.channel_probabilities(maps, (40, 44))
    torch.testing.assert_close(got, official_erase_weights(maps, (40, 44)), rtol=1e-12, atol=0)


def test_upsampled_max_mask_equals_the_official_code():
    maps = _maps()
    images = torch.randn(3, 3, 40, 44, dtype=torch.float64)
    erase = AttentionErase(threshold=(0.2, 0.5), mode="sampled", normalize="upsampled_max").train()
    erased, mask = erase(images, maps, generator=torch.Generator().manual_seed(7))
    # The same two draws, in the module's order: the channels, then θ ~ U(0.2, 0.5).
    g = torch.Generator().manual_seed(7)
    indices = torch.multinomial(official_erase_weights(maps, (40, 44)), 1, generator=g)
    thresholds = (0.2 + 0.3 * torch.rand(3, generator=g)).double()
    want = official_erase(maps, images, indices.squeeze(1), thresholds)
    assert erased.dtype == torch.float64
    torch.testing.assert_close(erased, want, rtol=0, atol=0)
    assert 0 < (mask == 0).double().mean() < 1  # it erased something, not everything
    # The default erases from the h×w map's max, which is not the official mask.
    before = AttentionErase(threshold=(0.2, 0.5), mode="sampled", normalize="max").train()
    _, old = before(images, maps, generator=torch.Generator().manual_seed(7))
    assert not torch.equal(old, mask)


# Bilinear attention pooling order


def test_pooling_order_cm_equals_the_official_bilinear_pooling():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 12, 6, 6, generator=g, dtype=torch.float64).relu()
    attention = _maps(2, 4, 6, 6)
    want = official_bilinear_pooling(features, attention)
    cm = BilinearAttentionPooling(scale=100.0, order="cm")(features, attention)
    torch.testing.assert_close(cm, want, rtol=1e-12, atol=1e-12)
    mc = BilinearAttentionPooling(scale=100.0)(features, attention)  # fgattn's default order
    assert not torch.equal(mc, cm)
    torch.testing.assert_close(mc.view(2, 4, 12).transpose(1, 2).reshape(2, -1), cm)


# The model's options and the preset


def _pcanet(**kwargs) -> PCANet:
    torch.manual_seed(0)
    return create_model("pcanet", backbone="test_resnet", num_classes=K, **kwargs)


@pytest.mark.parametrize("source", ["co_attended", "raw"])
@pytest.mark.parametrize("pooling", ["bilinear", "attention"])
def test_erase_source(source, pooling, monkeypatch):
    model = _pcanet(pooling=pooling, bilinear_dim=8, num_attention_maps=4, erase_source=source)
    model.train()
    seen = {}
    erase = model.erase.forward

    def spy(images, fw):
        seen["fw"] = fw
        return erase(images, fw)

    monkeypatch.setattr(model.erase, "forward", spy)
    x, target = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1])
    model(x, target)
    f_o = model.backbone(x)
    if source == "co_attended":
        want = model.co_attention(f_o)
    else:
        want = f_o if pooling == "bilinear" else model.head.attention(f_o)
    torch.testing.assert_close(seen["fw"], want)
    with pytest.raises(ValueError, match="erase_source must be one of"):
        _pcanet(erase_source="attention")


def test_official_preset_builds_and_trains_with_the_official_parts():
    model = _pcanet(**PCANET_OFFICIAL).train()
    assert model.head.pool.order == "cm" and model.num_features == 32 * 512
    assert model.erase.normalize == "upsampled_max" and model.erase.mode == "sampled"
    assert model.erase.threshold == (0.2, 0.5) and model.erase_source == "raw"
    assert model.center_loss.formula == "official" and model.center_loss.alpha == 0.05
    out = model(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1]))
    assert set(out) >= {"logits_we", "loss_center"} and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert model.head.attention.conv.weight.grad.abs().sum() > 0
    model.reset_classifier(3)
    assert model.center_loss.formula == "official"
