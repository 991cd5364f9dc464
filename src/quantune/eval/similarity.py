"""Subject similarity: how much generated images look like the instance images (DreamBooth fidelity).

The DreamBooth / OFT / IntLoRA protocol's DINO and CLIP-I scores are the mean pairwise cosine similarity between
image embeddings of generated and real subject images:

    sim = mean_{i, j} cos(f(generated_i), f(instance_j))

computed here with the same feature networks as FID (quantune's OpenMoji network offline by default, or a local
CLIP folder, which gives CLIP-I).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from quantune.errors import QuantuneError
from quantune.eval.fid import feature_extractor, to_batch


@torch.no_grad()
def similarity_per_image(generated, instance, feature: str | Path | nn.Module = "openmoji") -> list[float]:
    """For each generated image, its mean cosine similarity to the instance images (their mean is the score)."""
    if not len(generated) or not len(instance):
        raise QuantuneError("subject similarity needs at least one generated and one instance image")
    gen, ref = to_batch(generated), to_batch(instance)
    net = feature_extractor(feature)
    a = F.normalize(net(gen).float(), dim=-1)
    b = F.normalize(net(ref).float(), dim=-1)
    return (a @ b.T).mean(dim=1).tolist()


def subject_similarity(generated, instance, feature: str | Path | nn.Module = "openmoji") -> float:
    """Mean pairwise cosine similarity of the feature embeddings (PIL lists or [N, 3, H, W] tensors in [0, 1])."""
    rows = similarity_per_image(generated, instance, feature)
    return sum(rows) / len(rows)
