"""Visualise what a trained CIN / PCA-Net looks at, as PNG files.

    python examples/visualize.py runs/<run>/best.pth --out vis/ --num-pairs 4

For each same-class pair of test images it writes ``pair<i>.png``, one row per image:

- PCA-Net: image | Grad-CAM of the true class (as PCA-Net's Fig. 3) | co-attention map (channel
  mean of F_W, PCA-Net eq. 1–2) | erase mask of eq. 3–4 (erased region darkened).
- CIN: image | Grad-CAM | SCI interaction map (channel mean of |Y| = |W X|, CIN eq. 1–2) |
  CCI map of the pair (channel mean of |Z' − X|, eq. 5–6); plus ``pair<i>_sci_weights.png``,
  the C × C SCI attention matrix W of the first image.

Heat maps are upsampled to the image and drawn with a blue-to-red colour ramp; no plotting
library is needed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import reduce
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.io import write_png
from torchvision.utils import make_grid

import fgattn
from fgattn.train import TrainConfig, build_dataset, build_model, load_checkpoint


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("checkpoint", help="last.pth or best.pth of a training run")
    p.add_argument("--out", default="vis", help="folder for the PNG files")
    p.add_argument("--num-pairs", type=int, default=4, help="same-class test pairs to draw")
    p.add_argument("--data-root", help="override the checkpoint's data root")
    p.add_argument("--seed", type=int, default=0, help="which pairs are drawn")
    return p.parse_args(argv)


def heat(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(h, w) map -> (3, H, W) colour image in [0, 1]: min-max normalised, blue (low) to red."""
    m = F.interpolate(m[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]
    m = (m - m.min()) / (m.max() - m.min()).clamp_min(1e-12)
    return torch.stack([m, 1 - (2 * m - 1).abs(), 1 - m])


def overlay(image: torch.Tensor, m: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    return (1 - alpha) * image + alpha * heat(m, tuple(image.shape[1:]))


def denormalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    return (x * std + mean).clamp(0, 1)


def grad_cam(model, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017) on the backbone's last map: (B, 3, H, W) -> (B, h, w)."""
    feats = model.backbone(x).detach().requires_grad_(True)
    z = model.sci(feats) if isinstance(model, fgattn.models.CIN) else feats
    logits = model.forward_head(z)
    score = logits.gather(1, target[:, None]).sum()
    (grad,) = torch.autograd.grad(score, feats)
    weights = reduce(grad, "b c h w -> b c 1 1", "mean")
    return (weights * feats).sum(1).relu().detach()


@torch.no_grad()
def part_maps(model, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Model-specific maps for a pair batch x = [a; b] (2, 3, H, W)."""
    f = model.backbone(x)
    if isinstance(model, fgattn.models.PCANet):
        fw = model.co_attention(f)  # (2, C, h, w)
        mask = model.erase.mask(fw, tuple(x.shape[2:]))  # eval: mid threshold, deterministic
        return {"co-attention": reduce(fw, "b c h w -> b h w", "mean"), "erase": mask[:, 0]}
    _, y = model.sci(f, return_interaction=True)
    z_a, z_b, _, _ = model.cci(f[:1], f[1:])
    cci = torch.cat([z_a - f[:1], z_b - f[1:]]).abs()
    weights = fgattn.functional.channel_attention_weights(
        f[:1].float(), scale=model.sci.effective_scale(f)
    )
    return {
        "sci": reduce(y.abs(), "b c h w -> b h w", "mean"),
        "cci": reduce(cci, "b c h w -> b h w", "mean"),
        "sci_weights": weights[0],
    }


def main(argv=None) -> list[Path]:
    args = parse_args(argv)
    ckpt = load_checkpoint(args.checkpoint)
    values = dict(ckpt["config"])
    if args.data_root:
        values["data_root"] = args.data_root
    cfg = TrainConfig(**{**values, "pretrained": False})
    model = build_model(cfg, len(ckpt["classes"]))
    model.load_state_dict(ckpt["model"])
    model.eval()
    test_set = build_dataset(cfg, "test")
    targets = torch.tensor(test_set.targets)
    g = torch.Generator().manual_seed(args.seed)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(args.num_pairs):
        a = int(torch.randint(len(test_set), (), generator=g))
        same = (targets == targets[a]).nonzero().flatten()
        same = same[same != a] if len(same) > 1 else same
        b = int(same[torch.randint(len(same), (), generator=g)])
        x = torch.stack([test_set[a][0], test_set[b][0]])
        y = targets[[a, b]]
        cam = grad_cam(model, x, y)
        maps = part_maps(model, x)
        rows = []
        for j in range(2):
            image = denormalize(x[j])
            row = [image, overlay(image, cam[j])]
            if "erase" in maps:
                erased = image * (0.25 + 0.75 * maps["erase"][j])  # darken the erased region
                row += [overlay(image, maps["co-attention"][j]), erased]
            else:
                row += [overlay(image, maps["sci"][j]), overlay(image, maps["cci"][j])]
            rows += row
        grid = make_grid(torch.stack(rows), nrow=4, padding=2, pad_value=1.0)
        path = out_dir / f"pair{i}.png"
        write_png((grid * 255).round().to(torch.uint8), str(path))
        written.append(path)
        if "sci_weights" in maps:
            w = heat(maps["sci_weights"], (256, 256))
            path = out_dir / f"pair{i}_sci_weights.png"
            write_png((w * 255).round().to(torch.uint8), str(path))
            written.append(path)
    names = ", ".join(p.name for p in written)
    print(f"wrote {len(written)} PNG files to {out_dir}: {names}", flush=True)
    return written


if __name__ == "__main__":
    main(sys.argv[1:])
