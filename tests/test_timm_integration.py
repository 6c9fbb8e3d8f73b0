"""CIN and PCA-Net as timm citizens: timm's training task, features_only, hub round trips."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from timm.data import create_dataset, create_loader
from timm.loss import LabelSmoothingCrossEntropy
from timm.optim import create_optimizer_v2
from timm.task import ClassificationTask

import fgattn  # noqa: F401  (registers the models)
from fgattn.models import (
    NoTargetWarning,
    PairedClassificationTask,
    PairingWarning,
    create_model,
    pair_by_label,
)
from fgattn.models.task import task_for

K = 4
REPO = Path(__file__).resolve().parents[1]


def _model(arch: str, **kwargs):
    if arch == "pcanet":
        kwargs.setdefault("bilinear_dim", 8)
    kwargs.setdefault("num_classes", K)
    torch.manual_seed(0)
    return create_model(f"{arch}_resnet50", backbone="test_resnet", **kwargs)


def _images(n: int = 4, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def _image_folder(root: Path, classes: int = K, per_class: int = 4, size: int = 40) -> Path:
    """A tiny ImageFolder tree of random RGB images, one folder per class."""
    g = torch.Generator().manual_seed(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8)
            Image.fromarray(pixels.numpy()).save(root / f"class{c}" / f"{i}.png")
    return root


# Never silent: a training forward without a target warns once


@pytest.mark.parametrize("arch", ["cin", "pcanet"])
def test_training_forward_without_target_warns_once(arch):
    model = _model(arch).train()
    with pytest.warns(NoTargetWarning, match="trains as a plain classifier") as record:
        logits = model(_images())
    assert logits.shape == (4, K)
    message = str(record[0].message)
    what = "CCI, its ψ" if arch == "cin" else "co-attention, attention erase"
    assert what in message and "PairedClassificationTask" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(_images())  # once per model
        model.eval()(_images())  # eval: nothing to say
        model.train()(_images(), torch.tensor([0, 1, 0, 1]))  # the paired training


def test_compiled_training_forward_without_target_warns():
    model = _model("cin").train()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with pytest.warns(NoTargetWarning):
        compiled(_images())


def test_timm_classification_task_trains_a_plain_classifier_and_says_so():
    model = _model("cin")
    task = ClassificationTask(model, verbose=False)
    with pytest.warns(NoTargetWarning):
        result = task(_images(), torch.tensor([0, 1, 0, 1]))
    result["loss"].backward()
    assert model.cci.psi.weight.grad is None  # CCI never ran


# Pairs from the batch's labels


def test_pair_by_label_puts_same_class_pairs_first():
    target = torch.tensor([3, 1, 3, 2, 1, 3, 0, 3])
    order, same = pair_by_label(target)
    assert sorted(order.tolist()) == list(range(8))
    a, b = target[order].chunk(2)
    assert same == 3 and (a[:same] == b[:same]).all() and (a[same:] != b[same:]).all()
    assert pair_by_label(torch.tensor([0, 1, 2, 3]))[1] == 0
    with pytest.raises(ValueError, match="even batch"):
        pair_by_label(torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="mixup"):
        pair_by_label(torch.rand(4, K))


@pytest.mark.parametrize("arch", ["cin", "pcanet"])
def test_paired_task_trains_the_paper_losses(arch):
    model = _model(arch)
    criterion = LabelSmoothingCrossEntropy(smoothing=0.1)
    task = PairedClassificationTask(model, criterion=criterion, verbose=False)
    x, target = _images(8), torch.tensor([0, 1, 2, 0, 1, 2, 3, 3])  # 4 same-class pairs
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no NoTargetWarning, no PairingWarning
        result = task(x, target)
    assert int(result["same_class_pairs"]) == 4
    assert result["output"].shape == (8, K)
    result["loss"].backward()
    if arch == "cin":
        assert result["loss_cont"] > 0 and model.cci.psi.weight.grad.abs().sum() > 0
        assert model.embed.weight.grad.abs().sum() > 0
    else:
        assert {"loss_cls_w", "loss_cls_e", "loss_center"} <= set(result)
        assert model.center_loss.centers.abs().sum() > 0
    # The task's criterion is the classification loss (label smoothing here).
    order, _ = pair_by_label(target)
    out = model(x[order], target[order], criterion=criterion)
    expected = criterion(out["logits"], target[order])
    if arch == "cin":
        torch.testing.assert_close(out["loss_cls"], expected)
    else:
        torch.testing.assert_close(out["loss_cls_o"], expected)


def test_paired_task_output_is_in_batch_order():
    model = _model("cin")
    task = PairedClassificationTask(model, verbose=False)
    x, target = _images(8), torch.tensor([0, 1, 2, 0, 1, 2, 3, 3])
    result = task(x, target)
    # BatchNorm in training mode normalises over the batch whatever its order, and the
    # single-image logits depend on nothing else: the same images in batch order agree.
    order, _ = pair_by_label(target)
    logits = model(x[order], target[order])["logits"]
    torch.testing.assert_close(result["output"][order], logits)


def test_paired_task_warns_with_the_count_when_few_pairs_share_a_class():
    task = PairedClassificationTask(_model("cin", num_classes=7), verbose=False)
    with pytest.warns(PairingWarning, match=r"only 1 of the 4 pairs in this batch of 8"):
        task(_images(8), torch.tensor([0, 0, 1, 2, 3, 4, 5, 6]))
    with pytest.raises(TypeError, match="CIN or PCANet"):
        PairedClassificationTask(timm.create_model("test_resnet", num_classes=K))
    assert type(task_for(timm.create_model("test_resnet"), verbose=False)) is ClassificationTask


@pytest.mark.parametrize("arch", ["cin", "pcanet"])
def test_timm_training_step_on_a_synthetic_image_folder(arch, tmp_path):
    """timm's own pieces as train.py assembles them: dataset, loader, optimizer, task step."""
    dataset = create_dataset("", root=str(_image_folder(tmp_path / "train")), split="train")
    loader = create_loader(
        dataset, input_size=(3, 32, 32), batch_size=8, is_training=True, use_prefetcher=False
    )
    model = _model(arch)
    task = task_for(model=model, criterion=torch.nn.CrossEntropyLoss(), verbose=False)
    assert isinstance(task, PairedClassificationTask)
    optimizer = create_optimizer_v2(task.get_trainable_module(), "sgd", lr=0.05)
    paired = model.cci.psi if arch == "cin" else model.head.reduce.conv
    before = paired.weight.detach().clone()
    task.get_trainable_module().train()
    steps = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PairingWarning)  # shuffled batches: few pairs
        warnings.simplefilter("error", NoTargetWarning)
        for images, target in loader:
            result = task(images, target)
            optimizer.zero_grad()
            result["loss"].backward()
            optimizer.step()
            steps += 1
    assert steps == 2 and torch.isfinite(result["loss"])
    assert not torch.equal(paired.weight, before)
    assert ("loss_cont" if arch == "cin" else "loss_center") in result


# python -m fgattn.timm_train: timm's train.py with the paired task


FAKE_TRAIN_PY = '''
"""Stands in for timm's train.py: builds its task as timm's script does and runs one step."""
import argparse
import json

import timm
import torch
from timm.task import ClassificationTask


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model")
    parser.add_argument("--out")
    args = parser.parse_args()
    model = timm.create_model(args.model, backbone="test_resnet", num_classes=4, bilinear_dim=8)
    task = ClassificationTask(model=model, criterion=torch.nn.CrossEntropyLoss(), verbose=False)
    torch.manual_seed(0)
    result = task(torch.randn(8, 3, 32, 32), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]))
    result["loss"].backward()
    with open(args.out, "w") as f:
        json.dump(dict(task=type(task).__name__, keys=sorted(result)), f)


if __name__ == "__main__":
    main()
'''


def test_timm_train_launcher_swaps_in_the_paired_task(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(FAKE_TRAIN_PY)
    out = tmp_path / "result.json"
    args = [sys.executable, "-m", "fgattn.timm_train", str(script)]
    run = subprocess.run(
        [*args, "--model", "pcanet_resnet50", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())
    assert result["task"] == "PairedClassificationTask"
    assert "loss_center" in result["keys"]
    bad = subprocess.run([*args[:-1], "train.txt"], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "python -m fgattn.timm_train: error: the first argument must be timm's train.py, got "
        "'train.txt' (not a .py file)"
    ]


# features_only, forward_intermediates, unpooled features


@pytest.mark.parametrize("arch", ["cin", "pcanet"])
def test_features_only_gives_the_backbone_stages(arch):
    features = _model(arch, features_only=True).eval()
    reference = timm.create_model("test_resnet", features_only=True).eval()
    model = features.model  # the CIN / PCANet inside timm's FeatureGetterNet
    reference.load_state_dict(model.backbone.model.state_dict(), strict=False)
    assert features.feature_info.channels() == reference.feature_info.channels()
    assert features.feature_info.reduction() == reference.feature_info.reduction()
    x = _images(2)
    maps, expected = features(x), reference(x)
    assert len(maps) == 5
    for got, want in zip(maps[:-1], expected[:-1], strict=True):
        torch.testing.assert_close(got, want)
    # The last stage is what the model's head sees: after SCI for CIN.
    torch.testing.assert_close(maps[-1], model.forward_features(x))
    if arch == "cin":
        torch.testing.assert_close(maps[-1], model.sci(expected[-1]))
        assert features.feature_info.module_name()[-1] == "sci"
    else:
        torch.testing.assert_close(maps[-1], expected[-1])
    some = _model(arch, features_only=True, out_indices=(1, -1)).eval()
    assert [m.shape[1] for m in some(x)] == [reference.feature_info.channels()[i] for i in (1, 4)]
    with pytest.raises(ValueError, match="feature_cls must be 'getter'"):
        _model(arch, features_only=True, feature_cls="hook")
    via_factory = create_model(arch, backbone="test_resnet", features_only=True, out_indices=2)
    assert len(via_factory.eval()(x)) == 2


@pytest.mark.parametrize("arch", ["cin", "pcanet"])
def test_forward_intermediates(arch):
    model = _model(arch).eval()
    x = _images(2)
    final, maps = model.forward_intermediates(x)
    torch.testing.assert_close(final, model.forward_features(x))
    assert len(maps) == len(model.feature_info) == 5
    torch.testing.assert_close(maps[-1], final)
    early = model.forward_intermediates(x, indices=[1], intermediates_only=True, stop_early=True)
    torch.testing.assert_close(early[0], maps[1])
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NHWC")


@pytest.mark.parametrize("arch", ["cin", "pcanet"])
def test_no_classifier_and_no_pooling_gives_the_unpooled_map(arch):
    with pytest.warns(FutureWarning, match="unpooled map"):
        model = _model(arch, num_classes=0, global_pool="").eval()
    x = _images(2)
    out = model(x)
    torch.testing.assert_close(out, model.forward_features(x))
    assert out.dim() == 4 and out.shape[1] == model.backbone.out_channels
    with pytest.raises(ValueError, match=r"global_pool='' \(no pooling\) needs num_classes=0"):
        _model(arch, global_pool="")
    pooled = _model(arch).eval()
    with pytest.warns(FutureWarning):
        pooled.reset_classifier(0, "")
    assert pooled(x).dim() == 4
    pooled.reset_classifier(K, "avg" if arch == "cin" else "bilinear")
    assert pooled(x).shape == (2, K)
    if arch == "pcanet":  # fgattn 0.1.0 took '' to mean bilinear: that keeps working, deprecated
        with pytest.warns(DeprecationWarning, match="keeps bilinear pooling"):
            pooled.reset_classifier(K, "")
        assert pooled(x).shape == (2, K)
        with pytest.raises(ValueError, match="global_pool must be one of"):
            _model(arch, global_pool="avg")


# Whole-model weights round trip the timm way


def _trained(arch: str) -> torch.nn.Module:
    """A model whose weights, BatchNorm statistics and class centres moved off their init."""
    model = _model(arch).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(_images(), torch.tensor([0, 1, 0, 1]))["loss"].backward()
    optimizer.step()
    return model.eval()


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("arch", ["cin", "pcanet"])
def test_save_for_hf_and_local_dir_restore_the_whole_model(arch, tmp_path, caplog):
    model = _trained(arch)
    timm.models.save_for_hf(model, tmp_path, safe_serialization=True)
    assert (tmp_path / "model.safetensors").is_file()
    with caplog.at_level("INFO", logger="fgattn.models"):
        restored = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    assert "loaded the whole model" in caplog.text
    _assert_same_state(restored, model)
    x = _images(2)
    torch.testing.assert_close(restored(x), model(x), rtol=0, atol=0)
    # The same file through pretrained_cfg_overlay, and into a model for other classes.
    file = str(tmp_path / "model.safetensors")
    again = _model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=file)).eval()
    _assert_same_state(again, model)
    caplog.clear()
    with caplog.at_level("INFO", logger="fgattn.models"):
        other = _model(arch, num_classes=7, pretrained=True, pretrained_cfg_overlay=dict(file=file))
    assert "new classifier for 7 classes" in caplog.text
    _assert_same_state(other.backbone, model.backbone)
    assert other.fc.out_features == 7


@pytest.mark.parametrize("arch", ["cin", "pcanet"])
def test_checkpoint_path_restores_the_whole_model(arch, tmp_path):
    import safetensors.torch

    model = _trained(arch)
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_model(model, str(path))
    restored = _model(arch, checkpoint_path=str(path)).eval()
    _assert_same_state(restored, model)


@pytest.mark.parametrize("arch", ["cin", "pcanet"])
def test_a_backbone_file_loads_into_the_backbone(arch, tmp_path, caplog):
    import safetensors.torch

    torch.manual_seed(3)
    source = timm.create_model("test_resnet")
    path = tmp_path / "backbone.safetensors"
    safetensors.torch.save_file(source.state_dict(), str(path))
    with caplog.at_level("INFO", logger="fgattn.models"):
        model = _model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert "loaded the backbone's weights" in caplog.text
    for key, tensor in model.backbone.model.state_dict().items():
        torch.testing.assert_close(tensor, source.state_dict()[key], msg=key)
    # timm's checkpoint_path= loads with model.load_state_dict(strict=True): a backbone's state
    # dict goes to the backbone, with a warning that says so.
    fresh = _model(arch)
    head = fresh.fc.weight.detach().clone()
    with pytest.warns(UserWarning, match=r"holds a backbone .* loaded it into the backbone"):
        loaded = _model(arch, checkpoint_path=str(path))
    for key, tensor in loaded.backbone.model.state_dict().items():
        torch.testing.assert_close(tensor, source.state_dict()[key], msg=key)
    torch.testing.assert_close(loaded.fc.weight, head)  # the rest keeps its weights
    partial = {k: v for k, v in source.state_dict().items() if not k.startswith("layer4")}
    with pytest.raises(RuntimeError, match=r"Missing key.*backbone\.body\.model\.layer4"):
        fresh.load_state_dict(partial)  # the backbone's own keys stay strict


def test_cin_state_dict_holds_the_shared_phi_once():
    model = _trained("cin")
    state = model.state_dict()
    assert "sci.phi.weight" in state and not any(k.startswith("cci.phi.") for k in state)
    assert model.cci.phi is model.sci.phi
    # fgattn 0.1.0's state dicts (both names) and files keeping only CCI's name still load.
    both = dict(state, **{"cci.phi." + k[8:]: v for k, v in state.items() if "sci.phi." in k})
    alias_only = {k.replace("sci.phi.", "cci.phi."): v for k, v in state.items()}
    for variant in (both, alias_only):
        fresh = _model("cin")
        fresh.load_state_dict(variant)
        _assert_same_state(fresh.eval(), model)
    both["cci.phi.bias"] = both["cci.phi.bias"] + 1
    with pytest.raises(ValueError, match="different values"):
        _model("cin").load_state_dict(both)


def test_timm_ema_averages_the_shared_phi_once():
    """timm's ModelEmaV3 lerps every state_dict entry: with φ under two names it was averaged
    twice a step; held once it is averaged as every other weight."""
    from timm.utils import ModelEmaV3

    model = _model("cin")
    ema = ModelEmaV3(model, decay=0.5)
    before = ema.module.sci.phi.weight.detach().clone()
    with torch.no_grad():
        model.sci.phi.weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.module.sci.phi.weight, before + 0.5)
