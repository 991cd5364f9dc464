"""The LyCORIS types and DoRA in every family's files: each writable format round-trips the denoiser's adapter
(the update per module to 1e-5), and where a format cannot hold it (diffusers: LoHa / LoKr; kohya and ComfyUI: a
type other than LoRA on the modules a transformer's checkpoint fuses; PixArt: no kohya names) it is one error line."""

from __future__ import annotations

import pytest
import torch

from quantune.errors import QuantuneError
from quantune.families import family_of
from quantune.formats import WRITABLE, read_lora, write_lora
from quantune.lora import LoraConfig, add_lora, get_lora_weights
from quantune.models import load_pipeline
from tests.lora.test_lycoris import _perturb

KINDS = {"loha+dora": {"type": "loha", "dora": True}, "lokr": {"type": "lokr", "r": 2}}


@pytest.mark.parametrize("kind", KINDS)
def test_adapter_types_round_trip_or_refuse_in_every_format(family_ref, kind, tmp_path):
    pipe = load_pipeline(family_ref)
    family = family_of(pipe)
    denoiser = family.denoiser_of(pipe)
    add_lora(denoiser, LoraConfig(alpha=2.0, targets=list(family.denoiser_targets), seed=0, **KINDS[kind]))
    _perturb(denoiser, 0)
    weights = get_lora_weights(pipe)
    written = []
    for fmt in WRITABLE:
        try:
            path = write_lora(weights, tmp_path / fmt, fmt, pipe=pipe)
        except QuantuneError as e:
            assert str(e).count("\n") == 0 and ("write" in str(e) or "names" in str(e)), (fmt, str(e))
            continue
        written.append(fmt)
        back, _, _ = read_lora(path, pipe)
        assert set(back) == set(weights), fmt
        for key, mod in weights.items():
            w = denoiser.get_submodule(key.split(".", 1)[1]).base_layer.weight.detach()
            torch.testing.assert_close(back[key].delta_for(w), mod.delta_for(w), atol=1e-5, rtol=0, msg=fmt)
    unet = family.denoiser == "unet"  # a transformer's kohya / ComfyUI names fuse q / k / v (PixArt: no kohya ones)
    expected = {"quantune", *(["kohya", "comfyui"] if unet else []), *(["peft"] if kind == "lokr" else [])}
    assert set(written) == expected  # peft's DoRA is LoRA's; diffusers loads LoRA and DoRA only
