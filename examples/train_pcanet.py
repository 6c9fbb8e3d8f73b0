"""Train PCA-Net (Zhang et al., ICME 2021) with fgattn: ``fgattn-train --arch pcanet``.

Out of the box (no download, CPU is fine): the built-in synthetic fine-grained dataset with timm's
small ResNet-10-T (``resnet10t``, random init) at 64 px for 6 epochs, which learns within
minutes::

    python examples/train_pcanet.py

Paper recipe (ImageNet-pretrained ResNet-50, SGD lr 0.01 ×0.9 every 2 epochs, momentum 0.9,
weight decay 1e-5, 16 images + 16 same-class partners, 180 epochs, 448-px crops of 512-px
resizes), the defaults once a real dataset is named::

    python examples/train_pcanet.py --dataset cub --data-root data/cub
    torchrun --nproc_per_node 4 examples/train_pcanet.py --dataset cars --data-root data --amp bf16

Options: ``--help`` (each flag with the value the run will use); a YAML file or a packaged recipe
via ``--config``; continue a run with ``--resume RUN/last.pth``. The loop is `fgattn.train.engine`.
"""

import sys

from fgattn.cli.train import main

if __name__ == "__main__":
    sys.exit(main(arch="pcanet"))
