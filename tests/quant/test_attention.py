"""The quantized attention (quant/attention.py): with identity quantizers it computes what diffusers' own processor
computes, for every family's attentions (joint streams, RoPE, qk-norm, T5 masks); the quantized product against
SDPA for each kind of mask; and the refusal, by name, of what it does not cover."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantune.errors import QuantuneError
from quantune.families import family_of
from quantune.models import load_pipeline
from quantune.ptq import PTQConfig
from quantune.ptq.wrap import check_supported
from quantune.quant.attention import QuantAttnProcessor, attentions, quant_attentions, quantize_attention
from tests.families.conftest import MODELS, family_outputs

# what each family's attentions must exercise (processor class names found in the tiny model)
PROCESSORS = {"sd": "AttnProcessor2_0", "sdxl": "AttnProcessor2_0", "pixart": "AttnProcessor2_0",
              "sd3": "JointAttnProcessor2_0", "flux": "FluxAttnProcessor"}  # fmt: skip


def _identity() -> dict[str, nn.Module]:
    return {s: nn.Identity() for s in QuantAttnProcessor.SLOTS}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_float_path_equals_diffusers_processor(name):
    """Identity quantizers: the wrapped processor's output is diffusers' to float round-off (the product is
    quantune's explicit softmax(QK^T)V, every other step diffusers' own code)."""
    pipe = load_pipeline(MODELS[name])
    model = family_of(pipe).denoiser_of(pipe)
    reference = family_outputs(pipe)[1]
    found = attentions(model)
    assert {type(a.processor).__name__ for a in found.values()} == {PROCESSORS[name]}
    for attn in found.values():
        quantize_attention(attn, 8, _identity())
    assert set(quant_attentions(model)) == set(found)
    torch.testing.assert_close(family_outputs(pipe)[1], reference, rtol=0, atol=2e-5)  # measured <= 1.4e-6


def test_tiny_dits_cover_the_attention_features():
    """The equality test above runs on RoPE (FLUX), qk RMSNorm and the dual attention (SD3.5), joint streams
    (SD3, FLUX), single-stream FLUX blocks and T5's padding mask (PixArt)."""
    sd3 = load_pipeline(MODELS["sd3"]).transformer
    assert sd3.config.qk_norm == "rms_norm" and sd3.config.dual_attention_layers
    assert any(a.add_q_proj is not None for a in attentions(sd3).values())
    flux = load_pipeline(MODELS["flux"]).transformer
    assert flux.single_transformer_blocks and flux.transformer_blocks[0].attn.norm_q is not None
    pixart = load_pipeline(MODELS["pixart"])
    _, mask, _, _ = pixart.encode_prompt(["cat"], do_classifier_free_guidance=False, max_sequence_length=16)
    assert not bool(mask.all())  # the prompt is padded, the padding masked out


@pytest.mark.parametrize("mask", ["none", "bool", "additive", "causal"])
def test_product_matches_sdpa(mask):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    kwargs = {}
    if mask == "bool":
        kwargs["attn_mask"] = torch.rand(2, 1, 5, 7) > 0.3
        kwargs["attn_mask"][0, 0, 1] = False  # a query with every key masked: 0, as SDPA gives
    elif mask == "additive":
        kwargs["attn_mask"] = torch.randn(2, 1, 1, 7)
    elif mask == "causal":
        q, kwargs["is_causal"] = torch.randn(2, 3, 7, 8), True
    proc = QuantAttnProcessor(8, _identity())
    torch.testing.assert_close(proc.product(q, k, v, **kwargs), F.scaled_dot_product_attention(q, k, v, **kwargs))


class _TwoProducts:
    """A processor that computes two attention products per call (as PAG's do)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        q = hidden_states.unsqueeze(1)
        return F.scaled_dot_product_attention(q, q, q).squeeze(1) + F.scaled_dot_product_attention(q, q, q).squeeze(1)


def _attention():
    from diffusers.models.attention_processor import Attention

    return Attention(query_dim=16, heads=2, dim_head=8)


def test_unsupported_processors_are_refused_by_name():
    from diffusers.models.attention_processor import AttnProcessor, SlicedAttnProcessor

    attn = _attention()
    attn.set_processor(SlicedAttnProcessor(2))
    with pytest.raises(QuantuneError, match="SlicedAttnProcessor is not one the quantized attention wraps"):
        quantize_attention(attn, 8)
    with pytest.raises(QuantuneError, match="SlicedAttnProcessor.*--attn-bits none"):
        check_supported(attn, PTQConfig(method="minmax"))
    check_supported(attn, PTQConfig(method="minmax", abits=8, attn_bits=None))  # attention kept float: fine
    attn.set_processor(AttnProcessor())  # diffusers' pre-2.0 processor: the same attention, run as 2.0
    quantize_attention(attn, 8, _identity())
    assert type(attn.processor.inner).__name__ == "AttnProcessor2_0"
    unscaled = _attention()
    unscaled.scale_qk = False  # scale 1: AttnProcessor computes it, AttnProcessor2_0 would not
    unscaled.set_processor(AttnProcessor())
    with pytest.raises(QuantuneError, match="scale_qk=False"):
        quantize_attention(unscaled, 8)


def test_a_processor_with_another_attention_backend_is_refused():
    flux = load_pipeline(MODELS["flux"]).transformer
    attn = flux.transformer_blocks[0].attn
    attn.processor._attention_backend = "flash"  # what set_attention_backend("flash") sets
    with pytest.raises(QuantuneError, match="attention backend 'flash'"):
        quantize_attention(attn, 8)


def test_a_call_that_is_not_one_product_is_an_error():
    attn = _attention()
    attn.set_processor(QuantAttnProcessor(8, _identity(), inner=_TwoProducts()))
    with pytest.raises(QuantuneError, match="_TwoProducts computed 2 attention products"):
        attn(torch.randn(1, 4, 16))
