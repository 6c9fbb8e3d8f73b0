"""What ``pip install fgattn`` gives: the built wheel, installed in a fresh virtual environment,
trains through its console script.

The environment borrows this interpreter's site-packages (torch, timm) through a ``.pth`` file, so
nothing is downloaded; fgattn itself comes only from the wheel (checked).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

from fgattn.train import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("fgattn", "setup.cfg", "pyproject.toml", "README.md", "LICENSE")
HANG_TIMEOUT_S = 1800  # bounds a hang of a subprocess, not its speed (minutes on a loaded machine)


def _build_wheel(tmp_path: Path) -> Path:
    """The wheel of a clean copy of the sources (an in-tree build/ could hold stale files)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, src / name)
    dist = tmp_path / "dist"
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
           "-w", str(dist), str(src)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = dist.glob("fgattn-*.whl")
    return wheel


def _fresh_venv(path: Path) -> Path:
    """A virtual environment without fgattn that sees this interpreter's packages; its bin/."""
    venv.create(path, with_pip=False, symlinks=os.name != "nt")
    bindir = path / ("Scripts" if os.name == "nt" else "bin")
    python = bindir / ("python.exe" if os.name == "nt" else "python")
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    borrowed = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(site, "borrowed-site-packages.pth").write_text("\n".join(sorted(borrowed)) + "\n")
    return bindir


def test_wheel_installs_and_trains_through_the_console_script(tmp_path):
    wheel = _build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    recipes = sorted(n for n in names if n.startswith("fgattn/recipes/"))
    assert recipes == [f"fgattn/recipes/{a}-{d}.yaml" for a in ("cin", "pcanet")
                       for d in ("aircraft", "cars", "cub")]  # fmt: skip
    assert "fgattn/cli/train.py" in names and "fgattn/train/__main__.py" in names
    shipped = {n.split("/")[0] for n in names}
    assert shipped == {"fgattn", wheel.name.split("-py")[0] + ".dist-info"}, shipped  # no tests/
    assert not [n for n in names if n.endswith((".cpp", ".cu", ".so"))]
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
    for line in ("fgattn-train = fgattn.cli.train:main", "fgattn-eval = fgattn.cli.evaluate:main"):
        assert line in scripts

    bindir = _fresh_venv(tmp_path / "venv")
    python = bindir / "python"
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
               "--no-index", "-q", str(wheel)]  # fmt: skip
    proc = subprocess.run(install, capture_output=True, text=True, timeout=HANG_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    where = subprocess.run(
        [str(python), "-c", "import fgattn; print(fgattn.__file__)"],
        capture_output=True, text=True, env=env, cwd=tmp_path, check=True,
    ).stdout  # fmt: skip
    assert Path(where.strip()).is_relative_to(tmp_path / "venv"), where  # the wheel's fgattn

    run = tmp_path / "runs"
    cmd = [str(bindir / "fgattn-train"), "--arch", "pcanet", "--backbone", "test_resnet",
           "--image-size", "32", "--resize", "36", "--synthetic-classes", "3",
           "--synthetic-train-per-class", "4", "--synthetic-test-per-class", "2",
           "--batch-size", "2", "--workers", "0", "--epochs", "1", "--max-steps-per-epoch", "2",
           "--no-plots", "--no-progress", "--no-pretrained",
           "--output", str(run), "--name", "w"]  # fmt: skip
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=HANG_TIMEOUT_S
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "epoch 1 |" in proc.stdout and "random init (--no-pretrained)" in proc.stdout
    ckpt = load_checkpoint(run / "w" / "last.pth")  # verifies the stored SHA-256
    assert (ckpt["epoch"], ckpt["config"]["arch"], len(ckpt["classes"])) == (1, "pcanet", 3)

    # A packaged recipe resolves in the installed package; a user mistake is one line, exit 2.
    proc = subprocess.run(
        [str(bindir / "fgattn-train"), "--recipe", "pcanet-cub", "--data-root", str(tmp_path)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=HANG_TIMEOUT_S,
    )  # fmt: skip
    assert proc.returncode == 2
    assert (
        proc.stderr.startswith("fgattn-train: error: CUB-200-2011") and proc.stderr.count("\n") == 1
    ), proc.stderr
