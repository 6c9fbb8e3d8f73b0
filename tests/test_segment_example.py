"""examples/segment_danet.py: DualAttentionHead on a timm backbone learns synthetic masks."""

import torch
from _scripts import load_script


def load_example():
    return load_script("examples/segment_danet.py")


def test_synthetic_masks_are_the_shapes_drawn():
    example = load_example()
    images, masks = example.synthetic_batch(4, 32, torch.Generator().manual_seed(0))
    assert images.shape == (4, 3, 32, 32) and masks.shape == (4, 32, 32)
    assert set(masks.unique().tolist()) == {0, 1, 2}
    # Each class has its own colour (plus noise): the mean red channel orders them.
    red = [images[:, 0][masks == k].mean().item() for k in range(3)]
    assert red[1] > 0.7 and red[0] < 0.35 and red[2] < 0.35


def test_mean_iou():
    example = load_example()
    masks = torch.tensor([[[0, 1], [2, 2]]])
    perfect = torch.nn.functional.one_hot(masks, 3).permute(0, 3, 1, 2).float()
    assert example.mean_iou(perfect, masks, 3) == 1.0
    background = torch.zeros(1, 3, 2, 2)
    background[:, 0] = 1  # all background: IoU 1/4 for class 0, 0 for the others
    assert abs(example.mean_iou(background, masks, 3) - 1 / 12) < 1e-6


def test_trains_a_few_steps_and_the_loss_falls(capsys):
    # 16 tiny steps keep this test short; the held-out mIoU needs about 40 steps at 64 px to rise
    # above the all-background prediction, so only its range is checked here.
    history = load_example().main(
        ["--steps", "16", "--image-size", "48", "--batch-size", "4", "--log-every", "5"]
    )
    assert [h["step"] for h in history] == [1, 5, 10, 15, 16]
    assert history[-1]["loss"] < 0.6 * history[0]["loss"]
    assert all(0.0 <= h["miou"] <= 1.0 for h in history)
    assert "held-out mIoU" in capsys.readouterr().out


def test_takes_the_stride_8_stage_of_any_timm_backbone():
    example = load_example()
    for name, channels in (("resnet10t", 128), ("convnext_atto", 80)):
        model = example.Segmenter(name, 3).eval()
        assert model.backbone.feature_info.reduction() == [8]
        assert model.head.in_channels == channels
        assert model(torch.randn(1, 3, 40, 48)).shape == (1, 3, 40, 48)
