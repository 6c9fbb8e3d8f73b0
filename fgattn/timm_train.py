"""Run timm's train.py with CIN and PCA-Net trained the paper's way.

    python -m fgattn.timm_train path/to/pytorch-image-models/train.py --model cin_resnet50 ...

timm's train.py is a script in timm's repository (not in the pip package); it builds its training
task as ``ClassificationTask(model=..., criterion=...)``. This module imports fgattn (which
registers ``cin_*`` and ``pcanet_*`` in timm), loads the given train.py as the module ``train``,
replaces its ``ClassificationTask`` by `fgattn.models.task.task_for` (the paired task for CIN and
PCA-Net, timm's own task for every other model) and runs its ``main()`` with the remaining
arguments. Nothing else in train.py changes.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

PROG = "python -m fgattn.timm_train"


def _fail(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        if not argv:
            raise SystemExit(2)
        return
    path = Path(argv[0])
    if path.suffix != ".py" or not path.is_file():
        _fail(f"the first argument must be timm's train.py, got {argv[0]!r} (not a .py file)")

    import fgattn  # noqa: F401  (registers the models in timm)
    from fgattn.models.task import task_for

    spec = importlib.util.spec_from_file_location("train", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["train"] = module
    spec.loader.exec_module(module)
    if not hasattr(module, "ClassificationTask") or not hasattr(module, "main"):
        _fail(
            f"{path} does not build timm.task.ClassificationTask in a main() (timm's train.py "
            f"does from timm 1.0.23 on); build fgattn.models.PairedClassificationTask in it "
            f"instead of ClassificationTask"
        )
    module.ClassificationTask = task_for
    sys.argv = [str(path), *argv[1:]]
    module.main()


if __name__ == "__main__":
    main()
