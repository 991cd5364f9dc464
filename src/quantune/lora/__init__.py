"""Adapter layers (LoRA, LoHa, LoKr, DoRA), injection by config, canonical weights, merge / mix / extract."""

from quantune.lora.config import ATTENTION_TARGETS, TEXT_ENCODER_TARGETS, LoraConfig
from quantune.lora.dora import DoraModule
from quantune.lora.factored import FactoredLayer
from quantune.lora.inject import (
    add_lora,
    find_targets,
    lora_layers,
    lora_parameters,
    merge_lora,
    remove_lora,
    set_lora_multiplier,
    unmerge_lora,
)
from quantune.lora.layers import LoraLayer, LoraModule
from quantune.lora.loha import LohaModule
from quantune.lora.lokr import LokrModule
from quantune.lora.merge import extract, merge_into, mix
from quantune.lora.weights import LoraWeights, apply_lora, get_lora_weights

__all__ = [
    "ATTENTION_TARGETS",
    "TEXT_ENCODER_TARGETS",
    "DoraModule",
    "FactoredLayer",
    "LohaModule",
    "LokrModule",
    "LoraConfig",
    "LoraLayer",
    "LoraModule",
    "LoraWeights",
    "add_lora",
    "apply_lora",
    "extract",
    "find_targets",
    "get_lora_weights",
    "lora_layers",
    "lora_parameters",
    "merge_into",
    "merge_lora",
    "mix",
    "remove_lora",
    "set_lora_multiplier",
    "unmerge_lora",
]
