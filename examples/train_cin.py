"""Train CIN (Gao et al., AAAI 2020) with fgattn: ``fgattn-train --arch cin``.

Out of the box (no download, CPU is fine): the built-in synthetic fine-grained dataset with timm's
small ResNet-10-T (``resnet10t``, random init) at 64 px for 15 epochs, which learns within
minutes::

    python examples/train_cin.py

Paper recipe (ImageNet-pretrained ResNet-50, SGD lr 0.001 ×0.5 every 20 epochs, momentum 0.9,
weight decay 2e-4, batches of 4 classes × 5 images (10 pairs), 100 epochs, 448-px crops of 512-px
resizes), the defaults once a real dataset is named::

    python examples/train_cin.py --dataset cub --data-root data/cub
    torchrun --nproc_per_node 4 examples/train_cin.py --dataset cars --data-root data --amp bf16

Options: ``--help`` (each flag with the value the run will use); a YAML file or a packaged recipe
via ``--config``; continue a run with ``--resume RUN/last.pth``. The loop is `fgattn.train.engine`.
"""

import sys

from fgattn.cli.train import main

if __name__ == "__main__":
    sys.exit(main(arch="cin"))
