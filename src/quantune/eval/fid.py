"""FID (Heusel et al. 2017): the Frechet distance between Gaussians fitted to two sets of image features,

    FID = ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)),

computed by torchmetrics' FrechetInceptionDistance with a custom feature extractor: quantune's OpenMoji feature
network by default (eval/features.py), or a CLIP vision tower from a local folder (never downloaded).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from transformers import CLIPModel, CLIPVisionModelWithProjection

from quantune.errors import QuantuneError
from quantune.eval.features import load_feature_net
from quantune.eval.local import load_complete

logger = logging.getLogger(__name__)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def projected(out) -> torch.Tensor:
    """CLIP's projected embedding: a tensor (transformers 4) or the output's pooler_output (transformers 5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def processor_pixels(x: torch.Tensor, size: int, mean, std, resize: int | None = None) -> torch.Tensor:
    """What CLIP's / DINOv2's image processors do to a batch in [0, 1]: resize the shortest edge to `resize`
    (bicubic, antialiased; CLIP: = size, DINOv2: 256 for a 224 crop), centre-crop size x size, normalise."""
    h, w = x.shape[-2:]
    scale = (resize or size) / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(x.float(), size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top : top + size, left : left + size]
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


class ClipFeatures(nn.Module):
    """CLIP image embeddings from a local folder holding a full CLIPModel or a CLIPVisionModelWithProjection."""

    def __init__(self, folder: str | Path) -> None:
        super().__init__()

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise QuantuneError(f"no CLIP model in {folder} (no config.json): give a local folder, nothing is fetched")
        full = json.loads((folder / "config.json").read_text()).get("model_type") == "clip"

        self.model = load_complete(CLIPModel if full else CLIPVisionModelWithProjection, folder, "CLIP")
        vision = self.model.config.vision_config if full else self.model.config
        self.size, self.num_features, self.full = vision.image_size, self.model.config.projection_dim, full

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixels = processor_pixels(x, self.size, CLIP_MEAN, CLIP_STD)
        if self.full:
            return projected(self.model.get_image_features(pixel_values=pixels))
        return self.model(pixel_values=pixels).image_embeds


def feature_extractor(feature: str | Path | nn.Module = "openmoji") -> nn.Module:
    if isinstance(feature, nn.Module):
        return feature
    if feature == "openmoji":
        return load_feature_net()
    path = Path(feature)
    if not path.exists():
        raise QuantuneError(f"feature network {feature!r} not found: use 'openmoji' or a local CLIP folder")
    if path.is_dir():
        return ClipFeatures(path)

    return load_feature_net(path)


def to_batch(images) -> torch.Tensor:
    """PIL images, or a tensor [N, 3, H, W] in [0, 1], -> float tensor [N, 3, H, W] in [0, 1]."""
    if isinstance(images, torch.Tensor):
        return images.float()
    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]
    if len({a.shape for a in arrays}) > 1:
        size = arrays[0].shape[:2]
        arrays = [
            np.asarray(Image.fromarray((a * 255).astype(np.uint8)).resize(size[::-1]), np.float32) / 255.0
            for a in arrays
        ]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


@torch.no_grad()
def fid(generated, reference, feature: str | Path | nn.Module = "openmoji", batch: int = 256) -> float:
    """FID between two image sets (PIL lists or [N, 3, H, W] tensors in [0, 1]); each needs at least 2 images."""

    net = feature_extractor(feature)
    gen, ref = to_batch(generated), to_batch(reference)
    if len(gen) < 2 or len(ref) < 2:
        raise QuantuneError("FID needs at least 2 generated and 2 reference images")
    dims = net(gen[:1]).shape[-1]
    if min(len(gen), len(ref)) <= dims:
        logger.warning("FID from %d / %d images with %d feature dimensions: the covariances are rank-deficient, so "
                       "the figure is biased upwards and comparable only at the same numbers of images",
                       len(gen), len(ref), dims)  # fmt: skip
    metric = FrechetInceptionDistance(feature=net, normalize=True)
    for i in range(0, len(ref), batch):
        metric.update(ref[i : i + batch], real=True)
    for i in range(0, len(gen), batch):
        metric.update(gen[i : i + batch], real=False)
    return max(0.0, float(metric.compute()))  # a distance: round-off can leave -1e-12 for identical sets
