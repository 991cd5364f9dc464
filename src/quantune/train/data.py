"""The trainer's data: datasets from the config, prior-preservation class images, and a resumable sample stream.

The stream is a pure function of (seed, position): sample p of the run is permutation_{epoch}[p % N] with
epoch = p // N and the permutation drawn from a generator seeded with seed + epoch. Resuming at a position
therefore reproduces the rest of the run exactly, and with W processes rank k takes the k-th slice of each global
batch, so the ranks see disjoint samples and the union is the single-process batch.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from quantune.data import ImageCaptionDataset, class_folder, dreambooth_folder, image_folder, openmoji_dataset
from quantune.data import to_tensor as image_to_tensor
from quantune.families import family_of
from quantune.io import atomic_path

logger = logging.getLogger(__name__)


def build_datasets(cfg, output_dir: Path, pipe=None) -> tuple[ImageCaptionDataset, ImageCaptionDataset | None]:
    """(training set, class set for prior preservation or None)."""
    d = cfg.data
    if d.source == "openmoji":
        train = openmoji_dataset(size=d.resolution, subset=d.subset)
    elif d.source == "folder":
        train = image_folder(d.path, caption_column=d.caption_column)
    else:
        train = dreambooth_folder(d.path, d.instance_prompt)
    classes = None
    if d.num_class_images > 0:
        class_dir = Path(d.class_dir or output_dir / "class_images")
        ensure_class_images(pipe, class_dir, d.class_prompt, d.num_class_images, d.resolution, cfg.train.seed)
        classes = class_folder(class_dir, d.class_prompt)
    return train, classes


@torch.no_grad()
def ensure_class_images(pipe, folder: Path, prompt: str, count: int, size: int, seed: int, steps: int = 20) -> None:
    """Generate the missing class images with the base model (DreamBooth prior preservation); cached on disk."""
    folder.mkdir(parents=True, exist_ok=True)
    have = sorted(folder.glob("class_*.png"))
    for i in range(len(have), count):
        image = pipe(
            prompt,
            num_inference_steps=steps,
            height=size,
            width=size,
            generator=torch.Generator().manual_seed(seed * 100_003 + i),
            **family_of(pipe).call_kwargs(pipe),
        ).images[0]
        with atomic_path(folder / f"class_{i:05d}.png") as tmp:
            image.save(tmp, format="PNG")
    if count > len(have):
        logger.info("generated %d class images for prior preservation in %s", count - len(have), folder)


def stream_indices(n: int, seed: int, start: int, count: int) -> list[int]:
    """Indices of samples start..start+count-1 of the seeded, epoch-reshuffled stream over n items."""
    out, perm_epoch, perm = [], None, None
    for p in range(start, start + count):
        epoch = p // n
        if epoch != perm_epoch:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919 * epoch)).tolist()
            perm_epoch = epoch
        out.append(perm[p % n])
    return out


class Batcher:
    """Turns stream indices into pixel tensors and captions (with random flips and an optional latent cache)."""

    def __init__(self, dataset: ImageCaptionDataset, resolution: int, random_flip: bool = False) -> None:
        self.dataset = dataset
        self.resolution = resolution
        self.random_flip = random_flip
        self.latent_cache: dict[int, torch.Tensor] = {}  # index -> latent_dist parameters [2C, h, w]

    def pixels(self, indices: list[int], generator: torch.Generator) -> torch.Tensor:
        batch = torch.stack([image_to_tensor(self.dataset[i]["image"], self.resolution) for i in indices])
        if self.random_flip:
            flip = torch.rand(len(indices), generator=generator) < 0.5
            batch[flip] = batch[flip].flip(-1)
        return batch  # [B, 3, H, W] in [-1, 1]

    def captions(self, indices: list[int]) -> list[str]:
        return [self.dataset.captions[i] for i in indices]
