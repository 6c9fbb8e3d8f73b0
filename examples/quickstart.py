"""SCI and CoAttention inside a timm model: one training step on random data.

    python examples/quickstart.py

Runs on CPU in seconds; on a GPU the attention runs through fgattn's fused kernels with no change.
"""

import timm
import torch
from einops import reduce
from torch import nn

from fgattn import SCI, CoAttention


def main() -> None:
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # Any timm model: num_classes=0 and global_pool="" leave the last (B, C, H, W) feature map.
    backbone = timm.create_model("resnet18", pretrained=False, num_classes=0, global_pool="")
    channels = backbone.num_features
    sci = SCI(channels)  # CIN eq. 1–3
    co_attention = CoAttention()  # PCA-Net eq. 1–2
    head = nn.Linear(channels, 10)
    model = nn.ModuleDict(dict(backbone=backbone, sci=sci, head=head)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    # A PCA-Net style batch: image i + 4 is a same-class partner of image i.
    images = torch.randn(8, 3, 112, 112, device=device)
    labels = torch.arange(4, device=device).repeat(2)

    features = backbone(images)  # (8, 512, 4, 4)
    z = sci(features)  # Z = φ(W X) + X, same shape
    fw = co_attention(z)  # [F_W1; F_W2] of the 4 pairs, same shape
    logits = head(reduce(z, "b c h w -> b c", "mean"))
    logits_co = head(reduce(fw, "b c h w -> b c", "mean"))
    loss = nn.functional.cross_entropy(logits, labels) + nn.functional.cross_entropy(
        logits_co, labels
    )
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    shapes = [tuple(t.shape) for t in (features, z, fw)]
    print("features {} -> SCI {} -> co-attention {}".format(*shapes))
    print(f"one training step on {device}: loss {loss.item():.4f}")


if __name__ == "__main__":
    main()
