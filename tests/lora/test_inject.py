"""LoraConfig validation and targeting (regex, names, suffixes, exclusions, patterns); add/remove restores exactly."""

from __future__ import annotations

import pytest
import torch

from quantune.errors import QuantuneError
from quantune.lora import (
    TEXT_ENCODER_TARGETS,
    LoraConfig,
    LoraLayer,
    add_lora,
    find_targets,
    lora_layers,
    lora_parameters,
    remove_lora,
)
from tests.conftest import pipe_outputs, randomize_lora


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(r=0), "positive integer"),
        (dict(alpha=-1.0), "alpha"),
        (dict(dropout=1.0), "dropout"),
        (dict(init="xavier"), "init"),
        (dict(conv_mode="medium"), "conv_mode"),
        (dict(targets="("), "regex"),
        (dict(rank_pattern={"to_q": 0}), "rank_pattern"),
        (dict(targets=[]), "empty"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(QuantuneError, match=match):
        LoraConfig(**kwargs)


def test_default_targets_attention_of_the_unet(tiny):
    names = find_targets(tiny.unet, LoraConfig())
    assert names and all(n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or n.endswith("to_out.0") for n in names)
    # 4 projections x 2 attentions (attn1, attn2) x 4 transformer blocks in zoo:tiny
    assert len(names) == 32


def test_regex_list_suffix_and_exclude(tiny):
    by_regex = find_targets(tiny.unet, LoraConfig(targets=r"down_blocks\.0\..*attn1\.to_q"))
    assert by_regex == ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    full = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"
    assert find_targets(tiny.unet, LoraConfig(targets=[full])) == [full]
    no_attn2 = find_targets(tiny.unet, LoraConfig(targets=["to_k"], exclude=r".*attn2.*"))
    assert no_attn2 and all("attn1" in n for n in no_attn2)
    convs = find_targets(tiny.unet, LoraConfig(targets=["conv1", "conv2"]))
    assert all(isinstance(tiny.unet.get_submodule(n), torch.nn.Conv2d) for n in convs)


def test_no_match_lists_close_names(tiny):
    with pytest.raises(QuantuneError, match="to_q") as e:
        find_targets(tiny.unet, LoraConfig(targets=["to_qq"]))
    assert "\n" not in str(e.value)
    with pytest.raises(QuantuneError, match="LayerNorm"):
        find_targets(tiny.unet, LoraConfig(targets=["norm1"]))


def test_rank_alpha_patterns_and_rslora(tiny):
    cfg = LoraConfig(r=4, alpha=8.0, rank_pattern={"attn2.to_k": 2}, alpha_pattern={"to_v": 1.0}, use_rslora=True)
    add_lora(tiny.unet, cfg)
    layers = lora_layers(tiny.unet)
    k2 = next(v for n, v in layers.items() if n.endswith("attn2.to_k"))
    v1 = next(v for n, v in layers.items() if n.endswith("attn1.to_v"))
    q1 = next(v for n, v in layers.items() if n.endswith("attn1.to_q"))
    assert k2.r == 2 and float(k2.scale) == pytest.approx(8.0 / 2**0.5)
    assert v1.r == 4 and float(v1.scale) == pytest.approx(1.0 / 2.0)
    assert float(q1.scale) == pytest.approx(8.0 / 2.0)


def test_add_freezes_base_and_trains_lora_only(tiny):
    add_lora(tiny.unet, LoraConfig(r=2, trainable_scale=True))
    trainable = {id(p) for p in tiny.unet.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in lora_parameters(tiny.unet)}
    assert len(lora_parameters(tiny.unet)) == 32 * 3  # A, B and the scale per layer


def test_remove_restores_the_module_tree_exactly(tiny):
    originals = {n: m for n, m in tiny.unet.named_modules()}
    state = {k: v.clone() for k, v in tiny.unet.state_dict().items()}
    add_lora(tiny.unet, LoraConfig(r=4, targets=r".*(to_q|to_v|conv1)"))
    randomize_lora(tiny.unet)
    for layer in lora_layers(tiny.unet).values():
        layer.merge()
    assert remove_lora(tiny.unet) > 0
    assert not lora_layers(tiny.unet)
    after = dict(tiny.unet.named_modules())
    assert list(after) == list(originals) and all(after[n] is originals[n] for n in originals)
    for k, v in tiny.unet.state_dict().items():
        torch.testing.assert_close(v, state[k], atol=1e-6, rtol=0)


def test_remove_with_merge_bakes_the_update(lora_pipe):
    before = pipe_outputs(lora_pipe)
    remove_lora(lora_pipe.unet, merge=True)
    remove_lora(lora_pipe.text_encoder, merge=True)
    assert not any(isinstance(m, LoraLayer) for m in lora_pipe.unet.modules())
    after = pipe_outputs(lora_pipe)
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_text_encoder_targets(tiny):
    names = add_lora(tiny.text_encoder, LoraConfig(r=2, targets=TEXT_ENCODER_TARGETS))
    assert len(names) == 4 * tiny.text_encoder.config.num_hidden_layers
    assert all(".self_attn." in n for n in names)
