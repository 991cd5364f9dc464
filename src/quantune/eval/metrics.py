"""Image metrics beyond FID, as the DreamBooth / IntLoRA protocol and the PTQ papers use them.

- CLIP-T (prompt fidelity): cos(E_img(x_i), E_txt(p_i)) per generated image and its prompt, averaged; a CLIPModel
  from a local folder.
- CLIP-I and DINO (subject fidelity): mean pairwise cos(f(generated_i), f(instance_j)) (eval/similarity.py) with
  CLIP's image embedding or a DINO / DINOv2 ViT's CLS token (the DreamBooth paper's DINO score); local folders.
- PSNR and SSIM of each image against its pair (the same prompt and seed from a reference model): torchmetrics.
- LPIPS: torchmetrics' LPIPS loads torchvision backbones and their weights; without both locally it is an error.
Nothing is downloaded: a missing folder is an error naming the fix.
Written by hand only where no library gives the protocol's number; the networks and SSIM/PSNR are transformers'
and torchmetrics'.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from quantune.errors import QuantuneError
from quantune.eval.fid import CLIP_MEAN, CLIP_STD, processor_pixels, projected, to_batch
from quantune.eval.local import load_complete, local_folder

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class DinoFeatures(nn.Module):
    """The CLS token of a DINO / DINOv2 ViT (transformers AutoModel) from a local folder."""

    def __init__(self, folder: str | Path) -> None:
        super().__init__()
        from transformers import AutoModel

        self.model = load_complete(AutoModel, local_folder(folder, "DINO", "--dino"), "DINO")
        size = int(getattr(self.model.config, "image_size", 224))
        self.size = 224 if self.model.config.model_type == "dinov2" and size > 224 else size  # DINOv2's eval crop

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        resize = round(self.size * 256 / 224)  # DINO / DINOv2 processors: shortest edge 256, centre crop 224
        out = self.model(pixel_values=processor_pixels(x, self.size, IMAGENET_MEAN, IMAGENET_STD, resize))
        return out.last_hidden_state[:, 0]


@torch.no_grad()
def clip_t(images, prompts: list[str], folder: str | Path | None, batch: int = 64) -> list[float]:
    """Per-image cosine similarity between CLIP's image and text embeddings (the prompt each image was made from)."""
    from transformers import CLIPModel, CLIPTokenizer

    path = local_folder(folder, "CLIP-T", "--clip")
    if len(images) != len(prompts):
        raise QuantuneError(f"CLIP-T pairs images with prompts: {len(images)} images, {len(prompts)} prompts")
    model = load_complete(CLIPModel, path, "CLIP")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        fix = "CLIP-T needs a full CLIPModel folder with its tokenizer"
        raise QuantuneError(f"no CLIP tokenizer in {path} ({type(e).__name__}): {fix}") from None

    x = to_batch(images)
    scores = []
    for i in range(0, len(x), batch):
        pixels = processor_pixels(x[i : i + batch], model.config.vision_config.image_size, CLIP_MEAN, CLIP_STD)
        tokens = tokenizer(prompts[i : i + batch], padding=True, truncation=True, return_tensors="pt")
        img = F.normalize(projected(model.get_image_features(pixel_values=pixels)), dim=-1)
        txt = F.normalize(projected(model.get_text_features(**tokens)), dim=-1)
        scores += (img * txt).sum(-1).tolist()
    return scores


def paired(images, references) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = to_batch(images), to_batch(references)
    if x.shape != y.shape:
        raise QuantuneError(f"PSNR / SSIM pair images one to one: {tuple(x.shape)} against {tuple(y.shape)}")
    return x, y


def psnr(images, references) -> list[float]:
    """Per-pair PSNR in dB (images in [0, 1]; identical pairs are capped at 99 dB)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    x, y = paired(images, references)
    values = [peak_signal_noise_ratio(x[i : i + 1], y[i : i + 1], data_range=1.0) for i in range(len(x))]
    return [min(99.0, float(v)) for v in values]


def ssim(images, references) -> list[float]:
    """Per-pair SSIM (Gaussian window 11, sigma 1.5: torchmetrics' defaults, as in Wang et al. 2004)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    x, y = paired(images, references)
    values = structural_similarity_index_measure(x, y, data_range=1.0, reduction="none")
    return [float(v) for v in values]


def lpips(images, references) -> list[float]:
    """LPIPS (AlexNet) of each pair, when torchvision and the LPIPS weights are installed locally."""
    x, y = paired(images, references)
    alexnet = Path(torch.hub.get_dir()) / "checkpoints" / "alexnet-owt-7be5be79.pth"
    if not alexnet.is_file():  # torchvision would fetch it from the network
        raise QuantuneError(
            f"LPIPS needs torchvision's AlexNet weights at {alexnet} (nothing is downloaded): put them there or leave "
            "lpips out of --metrics"
        )
    try:
        from torchmetrics.functional.image import learned_perceptual_image_patch_similarity

        a, b = x * 2 - 1, y * 2 - 1
        return [
            float(learned_perceptual_image_patch_similarity(a[i : i + 1], b[i : i + 1], net_type="alex"))
            for i in range(len(x))
        ]
    except (ImportError, ModuleNotFoundError, OSError) as e:
        raise QuantuneError(
            f"LPIPS is unavailable here ({type(e).__name__}): it needs torchvision and its AlexNet + LPIPS weights "
            "installed locally; leave lpips out of --metrics"
        ) from None
