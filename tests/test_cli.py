"""The training and evaluation commands as a user meets them: --help, recipes, one-line errors,
run folders of failed starts, pretrained weights offline, PCA-Net's pair check."""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import huggingface_hub
import pytest
import timm
import torch

from fgattn import TimmBackbone
from fgattn.cli import evaluate as cli_evaluate
from fgattn.cli import train as cli_train
from fgattn.models import PCANet
from fgattn.train import TrainConfig, load_checkpoint, resolve_config, save_atomic
from fgattn.train import engine as E
from fgattn.train.config import HELP, RECIPES, SYNTHETIC_PRESETS, recipe_names

ROOT = Path(__file__).resolve().parents[1]
HANG_TIMEOUT_S = 1800  # bounds a hang of a subprocess, not its speed (minutes on a loaded machine)
TINY = [
    "--backbone", "test_resnet", "--image-size", "32", "--resize", "36",
    "--synthetic-classes", "4", "--synthetic-train-per-class", "4",
    "--synthetic-test-per-class", "2", "--batch-size", "4", "--pk-classes", "2",
    "--pk-images", "2", "--eval-batch-size", "8", "--workers", "0", "--epochs", "1",
    "--no-progress", "--no-plots", "--no-pretrained",
]  # fmt: skip


def _help(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        resolve_config(None, [*argv, "--help"], prog="fgattn-train")
    assert exit_info.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines


def _user_error(capsys, main, argv: list[str]) -> str:
    """The one stderr line of a command that fails with a user error (exit status 2)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv, prog="fgattn-x")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fgattn-x: error: "), err
    assert "Traceback" not in err[0]
    return err[0]


# ----------------------------------------------------------------------------- --help
def test_every_option_has_a_one_line_help():
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(HELP) == names
    assert all(text and "\n" not in text for text in HELP.values())


def test_help_shows_the_values_the_run_will_use(capsys):
    quick = _help(capsys, [])
    preset = SYNTHETIC_PRESETS["pcanet"]
    assert "synthetic quick-start preset" in quick
    for flag, value in (
        ("--backbone STR", "resnet10t"),
        ("--epochs INT", preset["epochs"]),
        ("--image-size INT", preset["image_size"]),
        ("--lr FLOAT", preset["lr"]),
    ):
        assert f"{flag} " in quick and f"[{value}]" in quick.split(flag)[1].split("--")[0]
    assert "learning rate" in quick and "(recipe:" not in quick  # a description, not just a value
    cub = _help(capsys, ["--dataset", "cub"])
    assert "paper recipe on cub" in cub
    for flag, value in (
        ("--backbone STR", "resnet50"),
        ("--epochs INT", RECIPES["pcanet"]["epochs"]),
        ("--image-size INT", 448),
        ("--pretrained, --no-pretrained", True),
    ):
        assert f"[{value}]" in cub.split(flag)[1].split("--")[0], flag
    cin = _help(capsys, ["--recipe", "cin-cub"])
    assert "Train CIN" in cin and "[0.001]" in cin.split("--lr FLOAT")[1].split("--")[0]


def test_a_script_of_one_arch_does_not_offer_arch(capsys):
    with pytest.raises(SystemExit):
        resolve_config("cin", ["--help"], prog="train_cin.py")
    text = capsys.readouterr().out
    assert (
        "usage: train_cin.py [--recipe NAME]" in text and "--arch" not in text.split("examples:")[0]
    )
    assert resolve_config("cin", ["--arch", "cin"]).arch == "cin"  # still accepted


def test_abbreviated_flags_are_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        resolve_config("pcanet", ["--epoch", "1"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --epoch 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_evaluate.run(["x.pth", "--fl"])


# ----------------------------------------------------------------------------- recipes
def test_packaged_recipes_and_arch_selection():
    assert recipe_names() == sorted(f"{a}-{d}" for a in ("cin", "pcanet")
                                    for d in ("aircraft", "cars", "cub"))  # fmt: skip
    cfg = resolve_config(None, ["--recipe", "cin-aircraft", "--data-root", "/d", "--epochs", "3"])
    assert (cfg.arch, cfg.dataset, cfg.data_root, cfg.epochs, cfg.lr) == ("cin", "aircraft", "/d",
                                                                           3, 0.001)  # fmt: skip
    assert resolve_config(None, []).arch == "pcanet"
    assert resolve_config(None, ["--arch", "cin"]).backbone == "resnet10t"
    with pytest.raises(ValueError, match=r"for arch 'pcanet', this run trains 'cin'"):
        resolve_config(None, ["--arch", "cin", "--recipe", "pcanet-cub"])
    with pytest.raises(ValueError, match=r"this script trains 'pcanet'; run fgattn-train --arch"):
        resolve_config("pcanet", ["--arch", "cin"])
    with pytest.raises(FileNotFoundError, match="packaged recipes: cin-aircraft"):
        resolve_config(None, ["--recipe", "cin_cub"])
    with pytest.raises(ValueError, match=r"pretrained is False: add --pretrained"):
        resolve_config(None, ["--pretrained-file", "w.pth"])


# ----------------------------------------------------------------------------- errors
def test_user_errors_are_one_line_and_leave_no_run_folder(tmp_path, capsys):
    out = tmp_path / "runs"
    common = [*TINY, "--output", str(out)]
    line = _user_error(capsys, cli_train.main,
                       [*common, "--dataset", "cub", "--data-root", str(tmp_path)])  # fmt: skip
    assert "CUB-200-2011" in line and "images.txt" in line
    line = _user_error(capsys, cli_train.main, [*common, "--backbone", "resnet_nope"])
    assert "'resnet_nope' is not a timm model name" in line
    line = _user_error(capsys, cli_train.main, [*common, "--model-kwargs", "pooling=max"])
    assert "pooling must be one of" in line
    line = _user_error(capsys, cli_train.main, ["--resume", str(tmp_path / "nope.pth")])
    assert "--resume checkpoint file not found" in line
    assert not out.exists()  # data and model are built before the run folder
    with pytest.raises(FileNotFoundError, match="CUB-200-2011"):  # --debug: the exception itself
        cli_train.main([*common, "--dataset", "cub", "--data-root", str(tmp_path), "--debug"])
    _user_error(capsys, cli_evaluate.main, [str(tmp_path / "nope.pth")])


BAD_FLAGS = [
    (["--lr", "inf"], r"--lr must be a finite float in \(0, inf\), got inf"),
    (["--lr", "nan"], "--lr must be a finite float"),
    (["--lr", "0"], r"--lr must be a finite float in \(0, inf\), got 0"),
    (["--max-steps-per-epoch", "-1"], "--max-steps-per-epoch must be an int >= 1, got -1"),
    (["--weight-decay", "-1"], r"--weight-decay must be a finite float in \[0, inf\)"),
    (["--lr-gamma", "-1"], r"--lr-gamma must be a finite float in \(0, 1\], got -1"),
    (["--ema-decay", "2"], r"--ema-decay must be a finite float in \[0, 1\], got 2"),
    (["--grad-clip", "-1"], r"--grad-clip must be a finite float in \(0, inf\), got -1"),
    (["--momentum", "1.5"], r"--momentum must be a finite float in \[0, 1\]"),
    (["--hflip", "2"], r"--hflip must be a finite float in \[0, 1\]"),
    (["--seed", "-1"], "--seed must be an int >= 0, got -1"),
    (["--eval-batch-size", "0"], "--eval-batch-size must be an int >= 1, got 0"),
    (["--synthetic-test-per-class", "0"], "--synthetic-test-per-class must be an int >= 1"),
    (["--resize", "20", "--image-size", "32"], r"--resize must be >= --image-size \(32\)"),
    (["--device", "gpu"], "--device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    (["--model-kwargs", "center_loss_weight=nan"], "center_loss_weight must be a float, got str"),
    (["--model-kwargs", "embed_dim=0", "--arch", "cin"], "embed_dim must be an int >= 1, got 0"),
    (["--arch", "cin", "--pk-classes", "3", "--pk-images", "3"],
     r"--pk-classes 3 x --pk-images 3 = 9 images per batch must be even"),
]  # fmt: skip


@pytest.mark.parametrize(("flags", "message"), BAD_FLAGS)
def test_out_of_range_flags_are_one_line_errors(capsys, tmp_path, flags, message):
    line = _user_error(capsys, cli_train.main, [*TINY, "--output", str(tmp_path), *flags])
    assert re.search(message, line), line
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_out_of_range_yaml_values_name_the_option(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: .inf\n")
    with pytest.raises(ValueError, match=r"--lr must be a finite float in \(0, inf\), got inf"):
        resolve_config(None, ["--config", str(path)])
    path.write_text("max_steps_per_epoch: -1\n")
    with pytest.raises(ValueError, match="--max-steps-per-epoch must be an int >= 1"):
        resolve_config(None, ["--config", str(path)])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A finished one-step PCA-Net run (bilinear_dim 8): its folder."""
    out = tmp_path_factory.mktemp("runs")
    E.main("pcanet", [*TINY, "--max-steps-per-epoch", "1", "--model-kwargs", "bilinear_dim=8",
                      "--output", str(out), "--name", "r"])  # fmt: skip
    return out / "r"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_device_cuda_without_a_gpu_is_one_line(capsys, tmp_path, tiny_run):
    line = _user_error(capsys, cli_train.main,
                       [*TINY, "--device", "cuda", "--output", str(tmp_path)])  # fmt: skip
    assert "--device cuda: this machine has no CUDA GPU" in line and "--device cpu" in line
    assert not list(tmp_path.iterdir())
    line = _user_error(capsys, cli_evaluate.main, [str(tiny_run / "best.pth"), "--device", "cuda"])
    assert "--device cuda: this machine has no CUDA GPU" in line


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--backbone", "resnet18"], "trained with backbone 'test_resnet', this command asks for "
         "'resnet18'; drop --backbone"),
        (["--model-kwargs", "bilinear_dim=16"], "trained with model_kwargs {'bilinear_dim': 8}, "
         "this command asks for {'bilinear_dim': 16}; drop --model-kwargs"),
        (["--synthetic-classes", "5"], "trained on 4 classes, the dataset has 5 classes"),
    ],
)  # fmt: skip
def test_resume_with_another_model_is_one_line(capsys, tiny_run, flags, fragment):
    argv = ["--resume", str(tiny_run / "last.pth"), "--epochs", "2", *flags]
    line = _user_error(capsys, cli_train.main, argv)
    assert fragment in line, line
    assert load_checkpoint(tiny_run / "last.pth")["epoch"] == 1


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"backbone": "resnet10t"}, "tensors of other shapes (first backbone.body.model.conv1"),
        ({"arch": "cin", "model_kwargs": {}}, "missing tensors (first sci.phi.weight)"),
        ({"model_kwargs": {"bilinear_dim": 16}}, "first head.reduce.conv.weight: checkpoint "
         "(8, 96, 1, 1), model (16, 96, 1, 1)"),
    ],
)  # fmt: skip
def test_evaluating_a_checkpoint_that_does_not_fit_is_one_line(capsys, tmp_path, tiny_run,
                                                               change, fragment):  # fmt: skip
    ckpt = load_checkpoint(tiny_run / "best.pth")
    ckpt["config"].update(change)  # weights of one model under another model's config
    save_atomic(ckpt, tmp_path / "odd.pth")
    line = _user_error(capsys, cli_evaluate.main, [str(tmp_path / "odd.pth")])
    assert f"checkpoint {tmp_path / 'odd.pth'} does not fit the model built from its config" in line
    assert fragment in line, line


def test_a_bad_backend_variable_is_one_line(capsys, monkeypatch):
    monkeypatch.setenv("FGATTN_BACKEND", "cuda")
    line = _user_error(capsys, cli_train.main, ["--help"])
    assert "$FGATTN_BACKEND must be one of" in line and "got 'cuda'" in line


@pytest.mark.parametrize(
    ("variable", "value"), [("FGATTN_BACKEND", "cuda"), ("FGATTN_BENCHMARK", "x")]
)
def test_a_bad_variable_is_one_line_from_a_fresh_process(variable, value):
    # the variable is read when fgattn is imported, before any CLI code runs
    env = dict(os.environ, **{variable: value})
    proc = subprocess.run(
        [sys.executable, "-m", "fgattn.train", "--help"],
        env=env, capture_output=True, text=True, timeout=HANG_TIMEOUT_S,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert ": error: " in line and f"${variable}" in line, line


def test_failed_first_epoch_removes_the_folder_and_keeps_the_traceback(tmp_path, monkeypatch):
    def broken_step(*args, **kwargs):
        raise ValueError("a bug in the training step")

    monkeypatch.setattr(E, "train_step", broken_step)
    # After the run started, a ValueError is not the user's: it propagates, not one line.
    with pytest.raises(ValueError, match="a bug in the training step"):
        cli_train.main([*TINY, "--output", str(tmp_path), "--name", "r"])
    assert not (tmp_path / "r").exists()
    (tmp_path / "mine").mkdir()  # a folder that existed before the run is left alone
    with pytest.raises(ValueError):
        cli_train.main([*TINY, "--output", str(tmp_path), "--name", "mine"])
    assert (tmp_path / "mine" / "config.yaml").exists()


def test_resume_from_best_and_arch_of_the_checkpoint(tmp_path, capsys):
    assert cli_train.main([*TINY, "--arch", "cin", "--output", str(tmp_path), "--name", "r"]) == 0
    banner = capsys.readouterr().out
    assert "cin on synthetic (4 classes) | backbone test_resnet, random init (--no-pretrained)" in (
        banner
    )
    line = _user_error(capsys, cli_train.main, ["--resume", str(tmp_path / "r" / "best.pth")])
    assert "holds weights only (best.pth does); resume from" in line
    assert "fgattn-train-1" not in line
    last = str(tmp_path / "r" / "last.pth")
    line = _user_error(capsys, cli_train.main, ["--resume", last, "--arch", "pcanet"])
    assert "trained with arch 'cin'" in line
    # Without --arch the checkpoint's architecture continues.
    result = E.main(None, ["--resume", str(tmp_path / "r" / "last.pth"), "--epochs", "2"])
    assert result["status"] == "finished"
    assert load_checkpoint(tmp_path / "r" / "last.pth")["config"]["arch"] == "cin"


# ----------------------------------------------------------------------------- pretrained
def _unreachable_hub(monkeypatch) -> None:
    """No weights cached, no connection; a download attempt (timm's retries, about a minute)
    fails the test instead of timing it."""
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)

    def unreachable(*args, **kwargs):
        raise OSError("Name or service not known")

    def download(*args, **kwargs):
        raise AssertionError("a download was attempted: timm would retry it for a minute")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr(timm.models._hub, "hf_hub_download", download)
    monkeypatch.setattr(timm.models._builder, "download_url_to_file", download, raising=False)


def test_unreachable_pretrained_weights_fail_fast_with_the_fix(monkeypatch, tmp_path):
    _unreachable_hub(monkeypatch)
    with pytest.raises(ConnectionError, match=r"huggingface.co cannot be reached") as err:
        TimmBackbone("resnet10t", pretrained=True)
    assert "pretrained_cfg_overlay=dict(file='/path/to/resnet10t.safetensors')" in str(err.value)
    assert "--no-pretrained" in str(err.value)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConnectionError, match="HF_HUB_OFFLINE is set"):
        TimmBackbone("convnext_tiny", pretrained=True)
    with pytest.raises(FileNotFoundError, match="pretrained_cfg_overlay file not found"):
        TimmBackbone("resnet10t", pretrained=True,
                     pretrained_cfg_overlay=dict(file=str(tmp_path / "no.pth")))  # fmt: skip


def test_pretrained_file_flag_loads_local_weights(tmp_path, capsys):
    import timm

    torch.manual_seed(3)
    weights = timm.create_model("test_resnet").state_dict()
    torch.save(weights, tmp_path / "w.pth")
    args = [*TINY, "--pretrained", "--pretrained-file", str(tmp_path / "w.pth"),
            "--max-steps-per-epoch", "1", "--lr", "1e-12",
            "--weight-decay", "0", "--output", str(tmp_path), "--name", "p"]  # fmt: skip
    cli_train.main(args)
    assert f"ImageNet weights from {tmp_path / 'w.pth'} (--pretrained)" in capsys.readouterr().out
    model = load_checkpoint(tmp_path / "p" / "last.pth")["model"]
    conv = "backbone.body.model.conv1.0.weight"  # unchanged by a 1e-12 step
    torch.testing.assert_close(model[conv], weights["conv1.0.weight"])


def _readme_block(heading: str) -> str:
    """The first ```python block under the README heading ``heading``."""
    section = (ROOT / "README.md").read_text().split(f"\n## {heading}\n", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_readmes_first_snippet_fails_fast_offline(monkeypatch):
    """The first code a newcomer runs: offline, an error with the fix, no minute of retries."""
    _unreachable_hub(monkeypatch)
    code = _readme_block("Example: SCI in a timm ResNet-50")
    with pytest.raises(ConnectionError, match="pretrained_cfg_overlay"):
        exec(compile(code, "README.md", "exec"), {})


def test_readmes_first_snippet_runs(monkeypatch):
    code = _readme_block("Example: SCI in a timm ResNet-50").replace(
        "pretrained=True", "pretrained=False"
    )
    code = code.replace("448, 448", "64, 64")
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["z"].shape == (2, 2048, 2, 2) and namespace["logits"].shape == (2, 200)


# ----------------------------------------------------------------------------- PCA-Net pairs
def test_pcanet_warns_once_on_pairs_of_different_labels():
    x = torch.randn(4, 3, 32, 32)
    same, mixed = torch.tensor([0, 1, 0, 1]), torch.tensor([0, 1, 1, 1])
    model = PCANet("test_resnet", num_classes=3, bilinear_dim=8).train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(x, same)
        assert not caught
        model(x, mixed)
        model(x, mixed)
    assert len(caught) == 1 and "1 of the 2 pairs in this batch have different labels" in str(
        caught[0].message
    )
    strict = PCANet("test_resnet", num_classes=3, bilinear_dim=8, mismatched_pairs="error")
    with pytest.raises(ValueError, match="different labels"):
        strict.train()(x, mixed)
    with pytest.raises(ValueError, match="mismatched_pairs must be one of"):
        PCANet("test_resnet", num_classes=3, mismatched_pairs="never")


def test_python_dash_m_fgattn_train(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fgattn.train", "--epoch", "1"],
        capture_output=True, text=True, cwd=ROOT, timeout=HANG_TIMEOUT_S,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "python -m fgattn.train: error: unrecognized arguments: --epoch 1" in proc.stderr
