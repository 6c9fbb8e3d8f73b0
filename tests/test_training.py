"""End-to-end training: both scripts, every dataset layout, DDP, resume, signals, evaluation.

All runs use the real fgattn models on timm's tiny ``test_resnet`` at 64 px for one short epoch.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from _fgvc_trees import KINDS, make_tree
from _scripts import load_script

from fgattn.train import TrainConfig, load_checkpoint, main, resolve_config, save_atomic
from fgattn.train import engine as E
from fgattn.train import logging as L
from fgattn.train.rundir import RunFolderError

ROOT = Path(__file__).resolve().parents[1]
HANG_TIMEOUT_S = 1800  # bounds a hang of a subprocess, not its speed (minutes on a loaded machine)
EXAMPLES = ROOT / "examples"
TINY = [
    "--backbone", "test_resnet", "--image-size", "64", "--resize", "72",
    "--synthetic-classes", "4", "--synthetic-train-per-class", "6",
    "--synthetic-test-per-class", "3", "--batch-size", "4", "--pk-classes", "2",
    "--pk-images", "3", "--eval-batch-size", "8", "--workers", "0", "--epochs", "1",
    "--no-progress", "--no-plots", "--lr", "0.01", "--no-pretrained",
]  # fmt: skip


def _example(name: str):
    return load_script(f"examples/{name}.py")


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _weights_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _confusion(run: Path) -> torch.Tensor:
    """The run's confusion.csv as a (K, K) tensor (rows true class, columns predicted)."""
    rows = list(csv.reader((run / "confusion.csv").read_text().splitlines()))[1:]
    return torch.tensor([[int(v) for v in row[1:]] for row in rows])


def _history(ckpt: dict) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "epoch_time_s"} for row in ckpt["history"]]


# ----------------------------------------------------------------------------- scripts
@pytest.mark.parametrize("arch", ["pcanet", "cin"])
def test_script_runs_one_epoch_on_synthetic(tmp_path, arch):
    """The example script itself, as a user runs it (with tiny settings)."""
    cmd = [sys.executable, str(EXAMPLES / f"train_{arch}.py"), *TINY, "--plots",
           "--output", str(tmp_path), "--name", "run"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=HANG_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("epoch 1 |")]
    assert line.startswith("epoch 1 | test_top1 ") and len(line) < 120, line
    last_line = proc.stdout.strip().splitlines()[-1]  # what the run did, where it is
    assert re.fullmatch(
        rf"finished 1 epoch: best test top-1 \d+\.\d\d % \(epoch 1, best\.pth\); run folder "
        rf"{re.escape(str(run))}: summary\.csv, last\.pth, best\.pth, .*confusion\.csv.*",
        last_line,
    ), last_line
    rows = (run / "summary.csv").read_text().splitlines()
    assert len(rows) == 2
    header = rows[0].split(",")
    extra = "train_loss_cont" if arch == "cin" else "train_loss_center"
    assert {"train_loss", "train_loss_cls", extra, "test_top1", "test_top5"} <= set(header)
    ckpt = torch.load(run / "last.pth", weights_only=True)  # loads safely
    assert ckpt["epoch"] == 1 and ckpt["step"] == 0 and ckpt["config"]["arch"] == arch
    assert torch.load(run / "best.pth", weights_only=True)["model"].keys() == ckpt["model"].keys()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["backbone"] == "test_resnet" and saved["dataset"] == "synthetic"
    if importlib.util.find_spec("matplotlib") is not None:
        for name in ("loss.png", "accuracy.png", "confusion_worst.png"):
            assert (run / name).stat().st_size > 0, name
    if arch == "cin":  # positive pairs exist, so the contrastive term is live (not ≡ 0)
        row = dict(zip(header, rows[1].split(","), strict=True))
        assert float(row["train_loss_cont"]) > 0


@pytest.mark.parametrize("kind", KINDS)
def test_one_epoch_on_each_official_layout(tmp_path, kind):
    root = make_tree(kind, tmp_path / "data", num_classes=4, train=6, test=3, size=80)
    arch = "pcanet" if kind in ("cub", "cars") else "cin"
    extra = ["--crop-banner"] if kind == "aircraft" else []
    result = main(arch, [*TINY, "--dataset", kind, "--data-root", str(root), *extra,
                         "--output", str(tmp_path), "--name", kind])  # fmt: skip
    assert result["status"] == "finished"
    ckpt = load_checkpoint(tmp_path / kind / "last.pth")
    assert ckpt["classes"] == E.build_dataset(TrainConfig(**ckpt["config"]), "test").classes
    assert ckpt["model"]["fc.weight"].shape[0] == 4
    assert 0 <= result["test_top1"] <= 100 and result["test_top5"] == 100.0  # 4 classes < 5


def test_amp_channels_last_ema_and_eval_every(tmp_path):
    result = main("pcanet", [*TINY, "--amp", "bf16", "--channels-last", "--ema",
                             "--ema-decay", "0.5", "--epochs", "2", "--eval-every", "2",
                             "--max-steps-per-epoch", "2",
                             "--output", str(tmp_path), "--name", "amp"])  # fmt: skip
    ckpt = load_checkpoint(tmp_path / "amp" / "last.pth")
    assert ckpt["ema"] is not None and "ema_test_top1" in result
    assert "test_top1" not in ckpt["history"][0] and "test_top1" in ckpt["history"][1]


# ----------------------------------------------------------------------------- config
def test_config_precedence_yaml_and_flags(tmp_path):
    cfg = resolve_config("cin", [])
    assert (cfg.dataset, cfg.backbone, cfg.image_size) == ("synthetic", "resnet10t", 64)
    paper = resolve_config("cin", ["--dataset", "cub", "--data-root", "/x"])
    assert (paper.lr, paper.lr_step, paper.lr_gamma, paper.weight_decay) == (0.001, 20, 0.5, 2e-4)
    assert (paper.pk_classes, paper.pk_images, paper.epochs, paper.image_size) == (4, 5, 100, 448)
    assert (paper.backbone, paper.pretrained) == ("resnet50", True)
    pca = resolve_config("pcanet", ["--dataset", "cars", "--data-root", "/x"])
    assert (pca.lr, pca.lr_step, pca.lr_gamma, pca.weight_decay, pca.batch_size, pca.epochs) == (
        0.01, 2, 0.9, 1e-5, 16, 180)  # fmt: skip
    for arch in ("pcanet", "cin"):  # the packaged recipes spell out exactly the paper recipes
        for kind, root in (("cub", "data/cub"), ("cars", "data"), ("aircraft", "data")):
            from_yaml = resolve_config(None, ["--recipe", f"{arch}-{kind}"])
            by_name = resolve_config(arch, ["--config", f"{arch}-{kind}"])
            flags = resolve_config(arch, ["--dataset", kind, "--data-root", root,
                                          "--workers", "8"])  # fmt: skip
            assert from_yaml == by_name
            assert from_yaml.to_dict() == {**flags.to_dict(),
                                           "model_kwargs": from_yaml.model_kwargs}  # fmt: skip
    path = tmp_path / "c.yaml"
    path.write_text("dataset: cub\ndata_root: /y\nlr: 0.5\nepochs: 3\nmodel_kwargs: {alpha: 1}\n")
    cfg = resolve_config("cin", ["--config", str(path), "--epochs", "7"])
    assert (cfg.lr, cfg.epochs, cfg.data_root, cfg.model_kwargs) == (0.5, 7, "/y", {"alpha": 1})
    assert cfg.image_size == 448  # a YAML naming a real dataset gets the paper settings
    path.write_text("learning_rate: 0.1\n")
    with pytest.raises(ValueError, match="learning_rate"):
        resolve_config("cin", ["--config", str(path)])
    with pytest.raises(ValueError, match="--data-root must name the folder"):
        resolve_config("cin", ["--dataset", "cub"])
    with pytest.raises(SystemExit):
        resolve_config("cin", ["--dataset", "imagenet"])


def test_missing_dataset_error_reaches_the_user(tmp_path):
    with pytest.raises(FileNotFoundError, match="CUB-200-2011"):
        main("pcanet", [*TINY, "--dataset", "cub", "--data-root", str(tmp_path),
                        "--output", str(tmp_path), "--name", "x"])  # fmt: skip


# ----------------------------------------------------------------------------- resume
def test_resume_is_exact_at_epoch_and_mid_epoch(tmp_path, monkeypatch):
    common = [*TINY, "--epochs", "2", "--output", str(tmp_path)]
    main("cin", [*common, "--name", "full"])
    full = load_checkpoint(tmp_path / "full" / "last.pth")

    main("cin", [*common, "--epochs", "1", "--name", "split"])  # stop after epoch 1
    main("cin", ["--resume", str(tmp_path / "split" / "last.pth"), "--epochs", "2"])
    split = load_checkpoint(tmp_path / "split" / "last.pth")
    assert _weights_equal(full["model"], split["model"])
    assert _history(full) == _history(split)

    # A stop request (SIGTERM) after step 2 of epoch 2: saves mid-epoch, then resumes exactly.
    calls = {"n": 0}
    steps = 4 * 6 // (2 * 3)  # 24 synthetic images, batches of P × K = 2 × 3

    def agreed(self, device):
        calls["n"] += 1  # one call per step and one at the end of each epoch
        return calls["n"] == steps + 1 + 2  # after step 2 of epoch 2

    monkeypatch.setattr(E._StopFlag, "agreed", agreed)
    result = main("cin", [*common, "--name", "mid"])
    assert result["status"] == "interrupted"
    mid = load_checkpoint(tmp_path / "mid" / "last.pth")
    assert (mid["epoch"], mid["step"]) == (1, 2)
    monkeypatch.undo()
    result = main("cin", ["--resume", str(tmp_path / "mid" / "last.pth")])
    assert result["status"] == "finished"
    mid = load_checkpoint(tmp_path / "mid" / "last.pth")
    assert _weights_equal(full["model"], mid["model"])
    assert _weights_equal(full["optimizer"]["state"][0], mid["optimizer"]["state"][0])
    assert _history(full) == _history(mid)


def test_sigterm_saves_and_exits_cleanly_sigkill_resumes(tmp_path):
    cmd = [sys.executable, str(EXAMPLES / "train_pcanet.py"), *TINY, "--epochs", "40",
           "--output", str(tmp_path), "--name", "sig"]  # fmt: skip
    last = tmp_path / "sig" / "last.pth"

    def start_and_wait_for_checkpoint(*extra):
        proc = subprocess.Popen(
            [*cmd, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env()
        )
        deadline = time.time() + HANG_TIMEOUT_S
        while not last.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert last.exists(), proc.communicate()[1][-3000:]
        return proc

    proc = start_and_wait_for_checkpoint()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=HANG_TIMEOUT_S)
    assert proc.returncode == 0, err[-3000:]
    assert b"stop requested" in out
    ckpt = torch.load(last, weights_only=True)
    assert 1 <= ckpt["epoch"] < 40 and len(ckpt["history"]) == ckpt["epoch"]

    last.unlink()
    proc = start_and_wait_for_checkpoint("--overwrite")  # a new run in the same folder
    proc.kill()  # SIGKILL: no chance to save; the atomic last.pth must still be loadable
    proc.communicate(timeout=HANG_TIMEOUT_S)
    assert proc.returncode == -signal.SIGKILL
    ckpt = torch.load(last, weights_only=True)
    resumed_from = ckpt["epoch"]
    result = main("pcanet", ["--resume", str(last), "--epochs", str(resumed_from + 1)])
    assert result["status"] == "finished" and result["epoch"] == resumed_from + 1
    assert len(load_checkpoint(last)["history"]) == resumed_from + 1


def test_atomic_save_keeps_old_file_when_a_save_fails(tmp_path):
    path = tmp_path / "ck.pth"
    save_atomic({"model": {"w": torch.ones(2)}}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_atomic({"model": {"w": torch.zeros(2)}, "bad": Unpicklable()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["model"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pth"]  # no temp file left behind


def test_resume_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.pth"):
        main("cin", ["--resume", str(tmp_path / "nope.pth")])
    torch.save({"weights": torch.ones(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not an fgattn training checkpoint"):
        main("cin", ["--resume", str(tmp_path / "other.pth")])


def test_run_folders_are_never_mixed_or_silently_replaced(tmp_path):
    args = [*TINY, "--max-steps-per-epoch", "1", "--output", str(tmp_path), "--name", "r"]
    main("cin", args)
    last = tmp_path / "r" / "last.pth"
    before = last.read_bytes()
    with pytest.raises(RunFolderError, match=r"already holds a run .*--resume .*--overwrite"):
        main("cin", args)
    assert last.read_bytes() == before  # the earlier run is untouched
    main("cin", [*args, "--overwrite", "--epochs", "2"])  # replaced, as asked
    assert load_checkpoint(last)["epoch"] == 2
    with pytest.raises(ValueError, match=r"holds weights only \(best.pth does\); resume from"):
        main("cin", ["--resume", str(tmp_path / "r" / "best.pth")])
    with pytest.raises(ValueError, match="--epochs 1 is below the 2 epochs"):
        main("cin", ["--resume", str(last), "--epochs", "1"])


def test_a_resumed_run_never_writes_over_another_run(tmp_path):
    """--resume X --name Z into run Z's folder, or a copy of X's checkpoint inside run Y's folder:
    refused, naming the run that owns the folder; nothing of it changes."""
    args = [*TINY, "--max-steps-per-epoch", "1", "--output", str(tmp_path)]
    main("cin", [*args, "--name", "a"])
    main("cin", [*args, "--name", "b"])
    b = tmp_path / "b"
    before = {name: (b / name).read_bytes() for name in ("last.pth", "summary.csv")}
    a_last = str(tmp_path / "a" / "last.pth")
    with pytest.raises(RunFolderError, match=r"belongs to run 'b' .* checkpoint of run 'a'"):
        main(None, ["--resume", a_last, "--name", "b", "--epochs", "2"])
    (b / "copied.pth").write_bytes((tmp_path / "a" / "last.pth").read_bytes())
    with pytest.raises(RunFolderError, match=r"belongs to run 'b' .* checkpoint of run 'a'"):
        main(None, ["--resume", str(b / "copied.pth"), "--epochs", "2"])
    assert {name: (b / name).read_bytes() for name in before} == before
    # into a new name, the resumed run is a branch of a in its own folder
    result = main(None, ["--resume", a_last, "--name", "a2", "--epochs", "2"])
    assert result["status"] == "finished" and Path(result["run_dir"]).name == "a2"
    assert load_checkpoint(tmp_path / "a" / "last.pth")["epoch"] == 1
    branch = load_checkpoint(tmp_path / "a2" / "last.pth")
    assert branch["run_id"] != load_checkpoint(tmp_path / "a" / "last.pth")["run_id"]
    with pytest.raises(RunFolderError, match=r"belongs to run 'a' .* checkpoint of run 'a2'"):
        main(None, ["--resume", str(tmp_path / "a2" / "last.pth"), "--name", "a", "--epochs", "3"])


def test_overwrite_keeps_the_old_run_until_the_first_checkpoint(tmp_path, monkeypatch, capsys):
    args = [*TINY, "--max-steps-per-epoch", "1", "--output", str(tmp_path), "--name", "r"]
    main("cin", args)
    run = tmp_path / "r"
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"}

    def broken_step(*a, **k):
        raise FloatingPointError("fails at step 0")

    with monkeypatch.context() as m:
        m.setattr(E, "train_step", broken_step)
        with pytest.raises(FloatingPointError):
            main("cin", [*args, "--overwrite", "--lr", "0.02"])
    out = capsys.readouterr().out
    assert "are kept in" in out and "the previous run's files are back" in out
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"}
    assert after == before  # config.yaml included: nothing of the old run was lost
    main("cin", [*args, "--overwrite", "--lr", "0.02"])
    out = capsys.readouterr().out
    assert "removed the previous run's files (config.yaml, summary.csv, last.pth" in out
    assert load_checkpoint(run / "last.pth")["config"]["lr"] == 0.02
    assert not (run / ".previous-run").exists()


def test_resume_of_a_finished_run_and_epoch_numbers(tmp_path, capsys):
    args = [*TINY, "--max-steps-per-epoch", "2", "--output", str(tmp_path), "--name", "f"]
    main("cin", args)
    last = tmp_path / "f" / "last.pth"
    with pytest.raises(ValueError, match=r"has finished its 1 epochs .*--epochs above 1"):
        main(None, ["--resume", str(last)])
    capsys.readouterr()
    result = main(None, ["--resume", "auto", "--name", "f", "--output", str(tmp_path)])
    assert result["status"] == "finished" and "nothing to do" in capsys.readouterr().out
    main(None, ["--resume", str(last), "--epochs", "2"])
    out = capsys.readouterr().out
    assert "resumed after epoch 1 of 2" in out and "epoch 2 |" in out


def test_non_finite_weights_are_never_saved(tmp_path, monkeypatch):
    """A step that leaves a weight NaN (a finite loss, so train_step cannot tell) stops the run
    before any checkpoint holds it."""
    args = [*TINY, "--max-steps-per-epoch", "1", "--output", str(tmp_path), "--name", "n"]
    main("pcanet", args)
    before = (tmp_path / "n" / "last.pth").read_bytes()
    step = E.train_step

    def poisoning_step(cfg, state, *a, **k):
        out = step(cfg, state, *a, **k)
        with torch.no_grad():
            state.model.fc.weight[0, 0] = float("nan")
        return out

    monkeypatch.setattr(E, "train_step", poisoning_step)
    with pytest.raises(FloatingPointError, match=r"not finite after epoch 2 .*first fc.weight"):
        main(None, ["--resume", str(tmp_path / "n" / "last.pth"), "--epochs", "2"])
    assert (tmp_path / "n" / "last.pth").read_bytes() == before
    with pytest.raises(FloatingPointError, match="not finite"):
        main("pcanet", [*args, "--name", "fresh"])
    assert not (tmp_path / "fresh").exists()  # nothing was saved: the failed start is removed


def test_checkpoints_know_their_classes(tmp_path, capsys):
    """fgattn-eval and --resume on a dataset with the same number of other classes are errors;
    one lacking a class is evaluated by name."""
    from fgattn.cli import evaluate as cli_evaluate

    root = make_tree("imagefolder", tmp_path / "data", num_classes=4, train=4, test=2, size=64)
    data = ["--dataset", "imagefolder", "--data-root", str(root), "--max-steps-per-epoch", "1"]
    main("pcanet", [*TINY, *data, "--output", str(tmp_path), "--name", "r"])
    other = tmp_path / "other"
    for split in ("train", "test"):
        for c in range(4):
            (other / split).mkdir(parents=True, exist_ok=True)
            (root / split / f"class_{c}").rename(other / split / f"kind_{c}")
    best = str(tmp_path / "r" / "best.pth")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli_evaluate.main([best, "--data-root", str(other)], prog="fgattn-eval")
    err = capsys.readouterr().err
    assert "4 of them not among the 4 classes of checkpoint" in err and "'kind_0'" in err
    with pytest.raises(ValueError, match=r"trained on 4 classes, the dataset has 4 classes that"):
        main(None, ["--resume", str(tmp_path / "r" / "last.pth"), "--data-root", str(other),
                    "--epochs", "2"])  # fmt: skip
    for split in ("train", "test"):  # back, without class_3's test images
        for c in range(4):
            (other / split / f"kind_{c}").rename(root / split / f"class_{c}")
    shutil.rmtree(root / "test" / "class_3")
    metrics = cli_evaluate.run([best])
    assert metrics["count"] == 6
    assert "no images of 1 of the checkpoint's 4 classes" in capsys.readouterr().err


def test_first_hour_details(tmp_path, monkeypatch, capsys):
    """Output that is not a terminal gets progress lines (not tqdm's carriage returns piling
    into one line); checkpoints get the run's file mode; CIN with one image per class warns."""
    monkeypatch.setattr(E.LineProgress, "every_s", 0.0)  # a line per step
    old_umask = os.umask(0o022)
    try:
        args = [*TINY, "--progress", "--max-steps-per-epoch", "2", "--output", str(tmp_path)]
        main("cin", [*args, "--pk-images", "1", "--pk-classes", "2", "--name", "k1"])
    finally:
        os.umask(old_umask)
    out, err = capsys.readouterr()
    assert "warning: --pk-images 1 gives no positive pairs" in out
    steps = [line for line in out.splitlines() if line.startswith("epoch 1/1: step ")]
    line = r"epoch 1/1: step [12]/2 \(\d+ %\) \| loss=\S+ acc=\S+ \| \S+ steps/s"
    assert len(steps) == 2 and all(re.fullmatch(line, step) for step in steps), steps
    assert "\r" not in out + err
    for name in ("last.pth", "best.pth", "summary.csv", "config.yaml"):
        assert (tmp_path / "k1" / name).stat().st_mode & 0o777 == 0o644, name


def test_plots_skipped_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(L, "_warned_matplotlib", False)
    assert L.write_plots([{"epoch": 1, "train_loss": 1.0, "test_top1": 5.0}], tmp_path) is False
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert not list(tmp_path.glob("*.png"))


# ----------------------------------------------------------------------------- DDP
def test_two_process_ddp_matches_single_process_evaluation(tmp_path):
    """torchrun, 2 CPU processes (gloo): training runs, and the distributed test metrics (sharded,
    15 images: no even split) equal a single-process evaluation of the same weights."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(EXAMPLES / "train_cin.py"), *TINY,
           "--synthetic-test-per-class", "3", "--synthetic-classes", "5", "--pk-classes", "2",
           "--output", str(tmp_path), "--name", "ddp"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=HANG_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "world size 2" in proc.stdout
    ckpt = load_checkpoint(tmp_path / "ddp" / "last.pth")
    assert len(ckpt["rng"]) == 2  # both ranks' RNG states, for exact resume
    logged = ckpt["history"][-1]
    single = _example("evaluate").run([str(tmp_path / "ddp" / "last.pth"), "--device", "cpu"])
    assert single["count"] == 15
    assert single["top1"] == pytest.approx(logged["test_top1"], abs=1e-9)
    assert single["top5"] == pytest.approx(logged["test_top5"], abs=1e-9)
    assert logged["test_count"] == 15  # every test image once: no padding, no duplicates
    # The confusion matrix is summed over the ranks: every test image once, top-1 on its diagonal.
    counts = _confusion(tmp_path / "ddp")
    assert counts.sum() == 15 and counts.trace() == round(logged["test_top1"] * 15 / 100)
    # Same weights and buffers (rank 0's are broadcast before evaluating): same loss up to the
    # order of the float64 sums.
    assert single["loss"] == pytest.approx(logged["test_loss"], rel=1e-6)


# ----------------------------------------------------------------------------- evaluate / vis
@pytest.mark.parametrize("arch", ["pcanet", "cin"])
def test_evaluate_and_visualize(tmp_path, arch):
    main(arch, [*TINY, "--output", str(tmp_path), "--name", "r"])
    best = tmp_path / "r" / "best.pth"
    evaluate = _example("evaluate")
    plain = evaluate.run([str(best), "--json", str(tmp_path / "m.json")])
    flip = evaluate.run([str(best), "--flip"])
    assert plain["count"] == flip["count"] == 12
    assert plain["loss"] != flip["loss"]  # the mirrored view changes the averaged logits
    logged = load_checkpoint(tmp_path / "r" / "last.pth")["history"][-1]
    assert plain["top1"] == pytest.approx(logged["test_top1"])
    with pytest.raises(ValueError, match="EMA"):
        evaluate.run([str(best), "--ema"])
    counts = _confusion(tmp_path / "r")
    assert counts.sum() == 12 and counts.trace() == round(logged["test_top1"] * 12 / 100)
    if importlib.util.find_spec("matplotlib") is None:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        files = _example("visualize").run([str(best), "--out", str(tmp_path / "vis"),
                                            "--num-pairs", "2"])  # fmt: skip
    names = ["pair0.png", "pair0_sci_weights.png", "pair1.png", "pair1_sci_weights.png"]
    assert [f.name for f in files] == (names if arch == "cin" else names[::2])
    # One figure per pair: 2 rows (the images) x 5 columns (image, energy, Grad-CAM, 2 maps),
    # each panel at least 448 px.
    width, height = struct.unpack(">II", files[0].read_bytes()[16:24])
    assert width >= 5 * 448 and height >= 2 * 448
