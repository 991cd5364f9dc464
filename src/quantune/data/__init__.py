"""Image-caption datasets for training: OpenMoji emoji (offline, CC BY-SA 4.0) and folders of your own images.

Every source returns an `ImageCaptionDataset` whose items are `{"image": PIL.Image (RGB), "caption": str,
"id": str}`; `to_tensor(image, size)` gives the trainer's [3, size, size] tensor in [-1, 1].
"""

from quantune.data.folders import (
    IMAGE_EXTENSIONS,
    ImageCaptionDataset,
    class_folder,
    dreambooth_folder,
    image_folder,
    load_rgb,
    to_tensor,
)
from quantune.data.openmoji import OPENMOJI_ATTRIBUTION, OpenMojiGlyph, openmoji_dataset, openmoji_glyphs

__all__ = [
    "IMAGE_EXTENSIONS",
    "OPENMOJI_ATTRIBUTION",
    "ImageCaptionDataset",
    "OpenMojiGlyph",
    "class_folder",
    "dreambooth_folder",
    "image_folder",
    "load_rgb",
    "openmoji_dataset",
    "openmoji_glyphs",
    "to_tensor",
]
