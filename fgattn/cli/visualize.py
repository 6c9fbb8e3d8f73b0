"""``fgattn-visualize``: what a trained CIN / PCA-Net looks at, as figures for a paper.

    fgattn-visualize runs/<run>/best.pth --out vis/ --num-pairs 4

For each same-class pair of test images it writes ``pair<i>.png``, one row per image: the image,
then maps drawn over the dimmed image (bilinearly upsampled from the h × w feature map), each
with its colour bar:

- ‖X‖: the energy of the backbone's last feature map per position;
- Grad-CAM of the true class (Selvaraju et al. 2017; for CIN through SCI);
- CIN: SCI as the change it makes, cos(φ(W X), X) per position (Z = φ(W X) + X, eq. 1–3: +1
  reinforces X, −1 suppresses it), and CCI as what the partner does not cancel,
  ‖W_AB X_A‖ / ‖W_A X_A‖ with W_AB = |W_A − η W_B| (eq. 5); plus ``pair<i>_sci_weights.png``,
  SCI's C × C matrix W of the first image: channels sorted by energy, log scale, one entry per
  pixel, and which channels Y = W X reads from;
- PCA-Net: the co-attention map A = max_c F_W (F_W = W F, eq. 1–3) and the erase mask of eq. 4
  (the threshold used in evaluation).

Why SCI and CCI are not drawn as the channel mean of |Y| or |Z′ − X| (their maps then look like
Grad-CAM's): on post-ReLU features many channel pairs do not overlap (X Xᵀ = 0), so each row of
W = softmax(−X Xᵀ) spreads almost uniformly over the channels that do not overlap it, mostly weak
ones, and W X is close to a scaled sum of channels. Its channel mean, min-max normalised, is the
feature energy map again (measured: spatial correlation 0.97, CIN on the synthetic set, 5×5
maps). And with η ≈ 1, |W_A − η W_B| is small, so Z′ − Z ≈ −φ(W X) (cosine −0.99): CCI's change
is SCI's change negated. The maps above divide out the shared energy and show what each module
adds.

Needs matplotlib: ``pip install "fgattn[plots]"``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import reduce
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from .. import functional, models, plots
from . import UserErrors

EPS = 1e-6  # relative floor of ‖X‖ in the relative-change maps (positions with no activation)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"wanted an int >= 1, got {text!r}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="fgattn-visualize",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("checkpoint", help="best.pth or last.pth of a training run")
    p.add_argument("--out", default="vis", help="folder for the PNG files (default: vis)")
    p.add_argument("--num-pairs", type=_positive_int, default=4,
                   help="same-class test pairs to draw (default: 4)")  # fmt: skip
    p.add_argument("--data-root", help="the dataset's folder, if not the checkpoint's")
    p.add_argument("--seed", type=int, default=0, help="which pairs are drawn (default: 0)")
    p.add_argument("--top-channels", type=_positive_int, default=32,
                   help="CIN: channels in the SCI matrix's zoomed panel (default: 32)")  # fmt: skip
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p.parse_args(argv)


def load_run(checkpoint: str, data_root: str | None = None):
    """(model in eval mode, class names, test set) of a training checkpoint, on the CPU."""
    from ..train import TrainConfig, build_model, load_checkpoint, load_weights
    from .evaluate import checkpoint_test_split

    ckpt = load_checkpoint(checkpoint)
    values = dict(ckpt["config"])
    if data_root:
        values["data_root"] = data_root
    cfg = TrainConfig(**{**values, "pretrained": False})
    model = build_model(cfg, len(ckpt["classes"]))
    load_weights(model, ckpt["model"], f"checkpoint {checkpoint}")
    return (
        model.eval(),
        list(ckpt["classes"]),
        checkpoint_test_split(cfg, ckpt["classes"], checkpoint),
    )


def draw_pairs(targets: torch.Tensor, num_pairs: int, seed: int) -> list[tuple[int, int]]:
    """``num_pairs`` random (a, b) index pairs of test images of the same class (b = a only when
    a's class has a single test image)."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(num_pairs):
        a = int(torch.randint(len(targets), (), generator=g))
        same = (targets == targets[a]).nonzero().flatten()
        same = same[same != a] if len(same) > 1 else same
        pairs.append((a, int(same[torch.randint(len(same), (), generator=g)])))
    return pairs


def denormalize(x: torch.Tensor) -> np.ndarray:
    """A normalised (3, H, W) image -> (H, W, 3) array in [0, 1]."""
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    return (x * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def grad_cam(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017) on the backbone's last map: (B, 3, H, W) -> (B, h, w)."""
    feats = model.backbone(x).detach().requires_grad_(True)
    z = model.sci(feats) if isinstance(model, models.CIN) else feats
    score = model.forward_head(z).gather(1, target[:, None]).sum()
    (grad,) = torch.autograd.grad(score, feats)
    weights = reduce(grad, "b c h w -> b c 1 1", "mean")
    return (weights * feats).sum(1).relu().detach()


def relative_change(delta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """‖delta‖ / ‖x‖ over channels per position: (B, C, h, w) -> (B, h, w)."""
    norm = x.norm(dim=1)
    return delta.norm(dim=1) / norm.clamp_min(EPS * float(norm.max()) + 1e-12)


@torch.no_grad()
def cin_maps(model: models.CIN, f: torch.Tensor) -> tuple[list[plots.MapColumn], dict[str, Any]]:
    """SCI's and CCI's columns for a pair of feature maps f = [X_A; X_B], and SCI's W of X_A.

    SCI: cos(φ(W X), X) per position, whether the added term reinforces (+1) or suppresses (−1)
    the features there. CCI: ‖W_AB X_A‖ / ‖W_A X_A‖, the share of each image's self interaction
    that its partner's does not cancel (with η ≈ 1 and W_A ≈ W_B it is small everywhere).
    """
    z, y = model.sci(f, return_interaction=True)
    scale = model.sci.effective_scale(f)
    eta, gamma = model.cci.weights(y[:1], y[1:])
    y_ab = torch.cat([
        functional.contrastive_channel_attention(f[:1], f[1:], eta, scale=scale),
        functional.contrastive_channel_attention(f[1:], f[:1], gamma, scale=scale),
    ])  # fmt: skip
    change = z - f  # φ(W X)
    sci = F.cosine_similarity(change, f, dim=1)
    gain = relative_change(change, f).flatten(1).mean(1)
    cci = relative_change(y_ab, y)
    columns = [
        plots.MapColumn(
            "SCI: direction of its change (eq. 1–3)\ncos(φ(W X), X), Z = φ(W X) + X",
            list(sci.numpy()), kind="signed", limits=(-1.0, 1.0),
            label="cos(φ(W X), X): + reinforces X, − suppresses X",
            notes=[f"mean ‖φ(W X)‖ / ‖X‖ = {float(g):.2f}" for g in gain],
        ),
        plots.MapColumn(
            "CCI: what the partner does not cancel (eq. 5)\n‖W_AB X_A‖ / ‖W_A X_A‖, "
            "W_AB = |W_A − η W_B|",
            list(cci.numpy()), label="‖W_AB X_A‖₂ / ‖W_A X_A‖₂ per position",
            notes=[f"η = {float(eta[0]):.3g} (A given B)",
                   f"γ = {float(gamma[0]):.3g} (B given A)"],
        ),
    ]  # fmt: skip
    x = f[0].flatten(1).double()
    log_w = torch.log_softmax(scale * x @ x.T, dim=-1)  # log W (eq. 2), tiny entries finite
    energy = x.pow(2).sum(1)
    return columns, {"log_weights": log_w.numpy(), "energy": energy.numpy(), "scale": scale}


@torch.no_grad()
def pcanet_maps(model: models.PCANet, f: torch.Tensor, size: tuple[int, int]):
    """Co-attention and erase columns for a pair of feature maps f = [F_A; F_B]."""
    fw = model.co_attention(f)
    co = model.co_attention
    w = f"softmax({co.scale:g} · F_A F_Bᵀ)" if co.shared_weights else "softmax(scale · F F′ᵀ)"
    residual = " + F" if co.residual else ""
    attention = model.erase.attention_map(fw)  # eval: deterministic ("sampled" draws anyway)
    mask = model.erase.mask(fw, size)[:, 0]
    theta = model.erase.thresholds(1, f.device).item()
    kept = mask.flatten(1).mean(1)
    return [
        plots.MapColumn(
            f"co-attention map (eq. 1–3)\nA = max_c F_W, F_W = {w} F{residual}",
            list(attention.numpy()), label="A (before the min-max normalisation of eq. 4)",
        ),
        plots.MapColumn(
            f"erase mask (eq. 4): A > θ = {theta:.2g} erased\n(shaded, cyan outline)",
            list(mask.numpy()), kind="mask",
            notes=[f"{100 * (1 - float(k)):.0f} % of the image erased" for k in kept],
        ),
    ]  # fmt: skip


def pair_figures(model, classes, x: torch.Tensor, y: torch.Tensor, top: int):
    """(pair figure, SCI matrix figure or None) for a same-class pair x (2, 3, H, W)."""
    with torch.no_grad():
        probs = model(x).softmax(1)
        f = model.backbone(x)
    conf, pred = probs.max(1)
    rows = [f"{'AB'[i]}: {classes[int(y[i])]}\npredicted {classes[int(pred[i])]} "
            f"({100 * float(conf[i]):.0f} %)" for i in range(2)]  # fmt: skip
    h, w = f.shape[2:]
    columns = [
        plots.MapColumn("feature energy ‖X‖₂\n(backbone's last map, per position)",
                        list(f.norm(dim=1).numpy()), label="‖X‖₂"),
        plots.MapColumn("Grad-CAM of the true class\nReLU(Σ_c mean(∂y/∂X_c) X_c)",
                        list(grad_cam(model, x, y).numpy()), label="Grad-CAM"),
    ]  # fmt: skip
    matrix = None
    if isinstance(model, models.CIN):
        extra, sci = cin_maps(model, f)
        name = "CIN"
        matrix = plots.channel_matrix_figure(
            sci["log_weights"], sci["energy"], top=top,
            title=f"SCI's channel attention W of image A ({classes[int(y[0])]}), "
                  f"scale {sci['scale']:g}, X of {f.shape[1]} channels × {h}×{w}",
        )  # fmt: skip
    else:
        extra, name = pcanet_maps(model, f, tuple(x.shape[2:])), "PCA-Net"
    images = [denormalize(x[i]) for i in range(2)]
    title = f"{name}: a same-class test pair; maps from the {h}×{w} feature map, upsampled"
    return plots.pair_figure(images, rows, columns + extra, title=title), matrix


def run(argv: list[str] | None = None) -> list[Path]:
    """Write the figures as ``argv`` says; returns the paths written. Raises errors."""
    args = parse_args(argv)
    plots.require_matplotlib()
    model, classes, test_set = load_run(args.checkpoint, args.data_root)
    targets = torch.tensor(test_set.targets)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i, (a, b) in enumerate(draw_pairs(targets, args.num_pairs, args.seed)):
        x = torch.stack([test_set[a][0], test_set[b][0]])
        pair, matrix = pair_figures(model, classes, x, targets[[a, b]], args.top_channels)
        written.append(plots.save(pair, out_dir / f"pair{i}.png"))
        if matrix is not None:
            written.append(plots.save(matrix, out_dir / f"pair{i}_sci_weights.png"))
    names = ", ".join(p.name for p in written)
    print(f"wrote {len(written)} PNG files to {out_dir}: {names}", flush=True)
    return written


def main(argv: list[str] | None = None) -> int:
    """``fgattn-visualize``: `run`, with user errors (no matplotlib, a bad checkpoint or data
    root) as one line and exit status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    with UserErrors(argv, "fgattn-visualize"):
        run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
