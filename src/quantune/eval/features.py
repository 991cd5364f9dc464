"""The OpenMoji feature network: quantune's offline stand-in for Inception in FID (Heusel et al. 2017).

FID needs an image embedding in which distances mean something. Inception-v3 cannot be downloaded here, so quantune
trains a small CNN to tell the 1,463 named OpenMoji glyphs apart (identity classification, with random shifts,
scales and colour jitter as augmentation) and uses its 128-d pooled penultimate activations as the embedding.
It is trained once (`python -m quantune.eval.features`, about a minute on a CPU) and shipped as
models/assets/features/openmoji_features.safetensors. FIDs computed with it are comparable with each other, not
with Inception FIDs from papers.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from quantune.assets import FEATURES_FILE
from quantune.data import openmoji_dataset, to_tensor
from quantune.errors import QuantuneError
from quantune.io import load_safetensors, save_safetensors

logger = logging.getLogger(__name__)
WEIGHTS = FEATURES_FILE


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class EmojiFeatureNet(nn.Module):
    """Images [N, 3, H, W] float in [0, 1] (any size; resized to 32 px) -> features [N, 128]."""

    num_features = 128

    def __init__(self, num_classes: int = 1463, size: int = 32) -> None:
        super().__init__()
        self.size = size
        self.body = nn.Sequential(_block(3, 32), nn.MaxPool2d(2), _block(32, 64), nn.MaxPool2d(2), _block(64, 128))
        self.head = nn.Linear(128, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        x = (x - 0.5) / 0.5
        return self.body(x).mean(dim=(2, 3))  # [N, 128]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def load_feature_net(path: str | Path | None = None) -> EmojiFeatureNet:
    """The shipped (or a given) OpenMoji feature network, in eval mode."""

    path = Path(path) if path else WEIGHTS
    if not path.is_file():
        raise QuantuneError(f"no feature network at {path}: train it with `python -m quantune.eval.features`")
    state, meta = load_safetensors(path)
    net = EmojiFeatureNet(num_classes=int(meta.get("num_classes", 1463)))
    net.load_state_dict({k: v.float() for k, v in state.items()})
    return net.eval().requires_grad_(False)


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random scale (0.85-1.1), shift (+-3 px at 32 px) and brightness/contrast jitter; white fill outside."""
    n = x.shape[0]
    scale = 0.85 + 0.25 * torch.rand(n, generator=g)
    shift = (torch.rand(n, 2, generator=g) - 0.5) * 0.2
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = 1 / scale, 1 / scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x - 1.0, grid, align_corners=False, padding_mode="zeros") + 1.0  # white = 1 outside
    gain = 0.8 + 0.4 * torch.rand(n, 1, 1, 1, generator=g)
    bias = (torch.rand(n, 1, 1, 1, generator=g) - 0.5) * 0.2
    return ((out - 0.5) * gain + 0.5 + bias).clamp(0, 1)


def train_feature_net(epochs: int = 40, batch: int = 128, seed: int = 0, out: Path = WEIGHTS) -> dict:
    data = openmoji_dataset(size=32)
    x = torch.stack([(to_tensor(data[i]["image"], 32) + 1) / 2 for i in range(len(data))])  # [N, 3, 32, 32] in [0, 1]
    y = torch.arange(len(data))
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = EmojiFeatureNet(num_classes=len(data))
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=5e-4)
    steps = epochs * ((len(data) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    start = time.time()
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(data), generator=g)
        for i in range(0, len(data), batch):
            idx = perm[i : i + batch]
            logits = net.head(net.features(_augment(x[idx], g)))
            loss = F.cross_entropy(logits, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    with torch.no_grad():
        clean = (net.head(net.features(x)).argmax(1) == y).float().mean().item()
        shifted = (net.head(net.features(_augment(x, g))).argmax(1) == y).float().mean().item()
    report = {
        "classes": len(data),
        "epochs": epochs,
        "seconds": round(time.time() - start, 1),
        "top1_clean": round(clean, 4),
        "top1_augmented": round(shifted, 4),
    }
    meta = {"num_classes": str(len(data)), "report": json.dumps(report)}
    save_safetensors({k: v.half() if v.is_floating_point() else v for k, v in net.state_dict().items()}, out, meta)
    return report


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    print(train_feature_net())
