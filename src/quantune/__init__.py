"""quantune: fine-tune and compress diffusion models (LoRA, IntLoRA, EDA-DM PTQ, integer inference)."""

from quantune.api import load_lora, save_lora
from quantune.errors import QuantuneError
from quantune.lora import LoraConfig, add_lora, remove_lora
from quantune.models import load_pipeline

__version__ = "0.1.0"
__all__ = ["LoraConfig", "QuantuneError", "add_lora", "load_lora", "load_pipeline", "remove_lora", "save_lora"]
