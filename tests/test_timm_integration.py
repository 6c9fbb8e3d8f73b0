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
