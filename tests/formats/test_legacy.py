"""The import-only legacy readers: cloneofsimo/lora (.pt positional list and safetensors "unet:{i}:up/down") and
lora_wrapper (torch checkpoint of CompVis names). Files are built here exactly as the original repositories write
them, then read with `read_lora` and checked against a hand-made merge of the same factors into a fresh zoo:tiny.

Also: pickles are opened with weights_only=True (a pickle that would run code is refused and runs nothing), and a
truncated file is a one-line QuantuneError.
"""

from __future__ import annotations

import json
import pickle

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from quantune.errors import QuantuneError
from quantune.formats import read_lora
from quantune.formats.legacy import ldm_to_diffusers_path
from quantune.lora.layers import LoraLayer
from quantune.lora.weights import apply_lora
from quantune.models import build_tiny
from tests.conftest import pipe_outputs

ATOL = 1e-5  # fp32 forward passes; LoRA path (x A^T B^T) vs merged weight (W + B A) differ only by rounding, O(1e-7)

UNET_TARGETS = {"CrossAttention", "Attention", "GEGLU"}  # cloneofsimo's UNET_DEFAULT_TARGET_REPLACE
TEXT_TARGETS = {"CLIPAttention"}  # cloneofsimo's TEXT_ENCODER_DEFAULT_TARGET_REPLACE

Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
GEGLU = "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj"
TE_Q_SUFFIX = "encoder.layers.0.self_attn.q_proj"


# --- helpers -------------------------------------------------------------------------------------------------------


def cloneofsimo_walk(model: nn.Module, targets: set[str]) -> list[tuple[str, nn.Linear]]:
    """cloneofsimo's `_find_modules_v2(model, targets, search_class=[nn.Linear])`, written out here: every module of
    `model.modules()` whose class name is a target, then each nn.Linear in that ancestor's `named_modules()`."""
    names = {id(m): n for n, m in model.named_modules()}
    found = []
    for ancestor in model.modules():
        if ancestor.__class__.__name__ in targets:
            for sub, module in ancestor.named_modules():
                if isinstance(module, nn.Linear):
                    found.append((f"{names[id(ancestor)]}.{sub}", module))
    return found


def random_pairs(modules, r: int, seed: int, dtype=torch.float16, std: float = 0.15) -> list[tuple]:
    """(up [out, r], down [r, in]) per Linear, non-zero so the LoRA changes outputs."""
    g = torch.Generator().manual_seed(seed)
    return [
        (
            (torch.randn(m.out_features, r, generator=g) * std).to(dtype),
            (torch.randn(r, m.in_features, generator=g) * std).to(dtype),
        )
        for _, m in modules
    ]


@torch.no_grad()
def add_delta(model: nn.Module, path: str, delta: torch.Tensor) -> None:
    """The reference: fold a weight delta into a fresh model's layer by hand."""
    w = model.get_submodule(path).weight
    w += delta.reshape(w.shape).to(w.dtype)


def te_path(pipe, suffix: str = TE_Q_SUFFIX) -> str:
    """The text encoder's own name for a CLIP module: "text_model.encoder..." in transformers 4, "encoder..." in 5
    (read_lora renames keys to the model's own spelling)."""
    names = [n for n, _ in pipe.text_encoder.named_modules() if n in (suffix, f"text_model.{suffix}")]
    assert len(names) == 1
    return names[0]


def assert_outputs_equal(a, b) -> None:
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, atol=ATOL, rtol=0)


def assert_changes(pipe_out, base_out) -> None:
    """The LoRA really does something (the comparison with the merge is not vacuous)."""
    assert (pipe_out[1] - base_out[1]).abs().max() > 1e-2


class MakesMarker:
    """A pickle payload that would run code on load: it opens (creates) a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# --- cloneofsimo -----------------------------------------------------------------------------------------------------


def test_cloneofsimo_pt_list_unet(tmp_path):
    base = build_tiny()
    walk = cloneofsimo_walk(base.unet, UNET_TARGETS)
    # 4 transformer blocks (down 0, mid, up 1 x2) x (attn1: 4 + attn2: 4 + GEGLU proj: 1)
    assert len(walk) == 36
    pairs = random_pairs(walk, r=4, seed=0)
    path = tmp_path / "lora.pt"
    torch.save([t for pair in pairs for t in pair], path)  # save_lora_weight: [up0, down0, up1, down1, ...] fp16

    weights, fmt, _ = read_lora(path, base)
    assert fmt == "cloneofsimo"
    assert list(weights) == [f"unet.{name}" for name, _ in walk]
    assert list(weights)[0] == f"unet.{Q}"
    assert f"unet.{GEGLU}" in weights
    assert not any(k.endswith("ff.net.2") for k in weights)  # FeedForward's out Linear is not under GEGLU
    for (up, down), mod in zip(pairs, weights.values(), strict=True):
        assert torch.equal(mod.up, up) and torch.equal(mod.down, down)
        assert mod.alpha == 4.0 and mod.scale == 1.0 and not mod.soft

    base_out = pipe_outputs(base)
    wrapped = build_tiny()
    apply_lora(wrapped, weights)
    merged = build_tiny()
    for (name, _), (up, down) in zip(walk, pairs, strict=True):
        add_delta(merged.unet, name, up.float() @ down.float())  # cloneofsimo's weight_apply_lora, alpha 1
    out = pipe_outputs(wrapped)
    assert_changes(out, base_out)
    assert_outputs_equal(out, pipe_outputs(merged))


def test_cloneofsimo_pt_list_text_encoder(tmp_path):
    base = build_tiny()
    walk = cloneofsimo_walk(base.text_encoder, TEXT_TARGETS)
    assert len(walk) == 8  # 2 layers x (k, v, q, out): CLIPAttention defines k_proj first
    assert walk[0][0] == te_path(base, "encoder.layers.0.self_attn.k_proj")
    pairs = random_pairs(walk, r=2, seed=1, std=0.3)
    path = tmp_path / "lora.text_encoder.pt"
    torch.save([t for pair in pairs for t in pair], path)

    weights, fmt, _ = read_lora(path, base, component="text_encoder")
    assert fmt == "cloneofsimo"
    assert list(weights) == [f"text_encoder.{name}" for name, _ in walk]
    assert torch.equal(weights[f"text_encoder.{te_path(base)}"].up, pairs[2][0])  # q_proj is the third module
    assert all(m.alpha == 2.0 for m in weights.values())

    base_te = pipe_outputs(base)[0]
    wrapped = build_tiny()
    apply_lora(wrapped, weights)
    merged = build_tiny()
    for (name, _), (up, down) in zip(walk, pairs, strict=True):
        add_delta(merged.text_encoder, name, up.float() @ down.float())
    out = pipe_outputs(wrapped)
    assert (out[0] - base_te).abs().max() > 1e-2
    assert_outputs_equal(out, pipe_outputs(merged))


def _safeloras(tmp_path, base, unet_targets=UNET_TARGETS, drop_last_unet=False):
    """A file as save_safeloras writes it: "{name}:{i}:up/down", metadata {name: json targets, "{name}:{i}:rank"}."""
    tensors, metadata, walks = {}, {}, {}
    for name, model, targets, r, seed in (
        ("unet", base.unet, unet_targets, 4, 2),
        ("text_encoder", base.text_encoder, TEXT_TARGETS, 2, 3),
    ):
        walk = cloneofsimo_walk(model, targets)
        pairs = random_pairs(walk, r, seed, dtype=torch.float32)  # save_safeloras keeps the training dtype
        if drop_last_unet and name == "unet":
            walk, pairs = walk[:-1], pairs[:-1]
        metadata[name] = json.dumps(sorted(targets))
        for i, (up, down) in enumerate(pairs):
            metadata[f"{name}:{i}:rank"] = str(r)
            tensors[f"{name}:{i}:up"] = up
            tensors[f"{name}:{i}:down"] = down
        walks[name] = (walk, pairs)
    path = tmp_path / "lora.safetensors"
    save_file(tensors, str(path), metadata)
    return path, walks


def test_cloneofsimo_safetensors(tmp_path):
    base = build_tiny()
    path, walks = _safeloras(tmp_path, base)
    weights, fmt, meta = read_lora(path, base)
    assert fmt == "cloneofsimo"
    assert json.loads(meta["unet"]) == sorted(UNET_TARGETS) and meta["unet:0:rank"] == "4"
    expected = [f"{c}.{name}" for c in ("text_encoder", "unet") for name, _ in walks[c][0]]
    assert sorted(weights) == sorted(expected)
    assert f"unet.{Q}" in weights and f"unet.{GEGLU}" in weights and f"text_encoder.{te_path(base)}" in weights
    for key, mod in weights.items():
        assert mod.alpha == (4.0 if key.startswith("unet.") else 2.0)

    base_out = pipe_outputs(base)
    wrapped = build_tiny()
    apply_lora(wrapped, weights)
    merged = build_tiny()
    for component in ("unet", "text_encoder"):
        walk, pairs = walks[component]
        for (name, _), (up, down) in zip(walk, pairs, strict=True):
            add_delta(getattr(merged, component), name, up @ down)
    out = pipe_outputs(wrapped)
    assert_changes(out, base_out)
    assert (out[0] - base_out[0]).abs().max() > 1e-2
    assert_outputs_equal(out, pipe_outputs(merged))


def test_cloneofsimo_safetensors_targets_come_from_metadata(tmp_path):
    """A file trained on {"Attention"} only (no GEGLU) is walked with those classes, not the defaults."""
    base = build_tiny()
    path, walks = _safeloras(tmp_path, base, unet_targets={"Attention"})
    weights, _, _ = read_lora(path, base)
    unet_keys = [k for k in weights if k.startswith("unet.")]
    assert len(unet_keys) == 32 == len(walks["unet"][0])
    assert f"unet.{Q}" in weights and f"unet.{GEGLU}" not in weights


def test_cloneofsimo_safetensors_count_mismatch(tmp_path):
    base = build_tiny()
    path, _ = _safeloras(tmp_path, base, drop_last_unet=True)
    with pytest.raises(QuantuneError, match="another model") as e:
        read_lora(path, base)
    assert "35 unet modules" in str(e.value) and "finds 36" in str(e.value)


def test_cloneofsimo_pt_count_mismatch(tmp_path):
    base = build_tiny()
    walk = cloneofsimo_walk(base.unet, UNET_TARGETS)[:-1]
    path = tmp_path / "lora.pt"
    torch.save([t for pair in random_pairs(walk, 4, 0) for t in pair], path)
    with pytest.raises(QuantuneError, match="another model"):
        read_lora(path, base)


def test_cloneofsimo_pt_odd_list_is_refused(tmp_path):
    path = tmp_path / "lora.pt"
    torch.save([torch.zeros(32, 4), torch.zeros(4, 32), torch.zeros(32, 4)], path)
    with pytest.raises(QuantuneError, match=r"\[up0, down0"):
        read_lora(path, build_tiny())


# --- a model is required ---------------------------------------------------------------------------------------------


def _wrapper_linear_ckpt():
    g = torch.Generator().manual_seed(5)
    return {
        f"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.{k}": v
        for k, v in (("lora_A", torch.randn(2, 32, generator=g)), ("lora_B", torch.randn(32, 2, generator=g)))
    } | {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_scale": torch.tensor(0.5)}


@pytest.mark.parametrize("kind", ["cloneofsimo-pt", "cloneofsimo-safetensors", "lora_wrapper"])
def test_positional_and_compvis_files_need_a_model(tmp_path, kind):
    if kind == "cloneofsimo-pt":
        path = tmp_path / "lora.pt"
        torch.save([torch.zeros(32, 4, dtype=torch.float16), torch.zeros(4, 32, dtype=torch.float16)], path)
    elif kind == "cloneofsimo-safetensors":
        path = tmp_path / "lora.safetensors"
        save_file({"unet:0:up": torch.zeros(32, 4), "unet:0:down": torch.zeros(4, 32)}, str(path), {"unet": "[]"})
    else:
        path = tmp_path / "lora_wrapper.ckpt"
        torch.save(_wrapper_linear_ckpt(), path)
    with pytest.raises(QuantuneError, match="--model"):
        read_lora(path)


# --- lora_wrapper ----------------------------------------------------------------------------------------------------


def test_ldm_names_map_onto_tiny_unet():
    """CompVis paths for zoo:tiny (layers_per_block=1: input_blocks 1 = down 0, 2 = its downsampler, 3 = down 1;
    output_blocks 0-1 = up 0, 2-3 = up 1) name real diffusers modules of the same kind and size."""
    unet = build_tiny().unet
    assert unet.config.layers_per_block == 1
    table = {
        "input_blocks.1.0.in_layers.2": ("down_blocks.0.resnets.0.conv1", (32, 32, 3, 3)),
        "input_blocks.1.0.emb_layers.1": ("down_blocks.0.resnets.0.time_emb_proj", (32, 128)),
        "input_blocks.1.1.proj_in": ("down_blocks.0.attentions.0.proj_in", (32, 32, 1, 1)),
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q": (Q, (32, 32)),
        "input_blocks.3.0.skip_connection": ("down_blocks.1.resnets.0.conv_shortcut", (64, 32, 1, 1)),
        "input_blocks.3.0.out_layers.3": ("down_blocks.1.resnets.0.conv2", (64, 64, 3, 3)),
        "middle_block.0.in_layers.2": ("mid_block.resnets.0.conv1", (64, 64, 3, 3)),
        "middle_block.1.transformer_blocks.0.attn2.to_k": (
            "mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
            (64, 32),
        ),
        "middle_block.2.out_layers.3": ("mid_block.resnets.1.conv2", (64, 64, 3, 3)),
        # CompVis output block 0 takes h (64) + skip of input_blocks.3 (64); block 1 takes 64 + input_blocks.2 (32)
        "output_blocks.0.0.skip_connection": ("up_blocks.0.resnets.0.conv_shortcut", (64, 128, 1, 1)),
        "output_blocks.1.0.in_layers.2": ("up_blocks.0.resnets.1.conv1", (64, 96, 3, 3)),
        "output_blocks.2.0.emb_layers.1": ("up_blocks.1.resnets.0.time_emb_proj", (32, 128)),
        "output_blocks.2.1.proj_out": ("up_blocks.1.attentions.0.proj_out", (32, 32, 1, 1)),
        "output_blocks.3.1.transformer_blocks.0.ff.net.2": (
            "up_blocks.1.attentions.1.transformer_blocks.0.ff.net.2",
            (32, 128),
        ),
    }
    for ldm, (diffusers_path, shape) in table.items():
        assert ldm_to_diffusers_path(ldm, layers_per_block=1) == diffusers_path
        assert tuple(unet.get_submodule(diffusers_path).weight.shape) == shape
    assert ldm_to_diffusers_path("input_blocks.2.0.op", layers_per_block=1) == "down_blocks.0.downsamplers.0.conv"
    assert ldm_to_diffusers_path("output_blocks.1.1.conv", layers_per_block=1) == "up_blocks.0.upsamplers.0.conv"
    for name in ("down_blocks.0.downsamplers.0.conv", "up_blocks.0.upsamplers.0.conv"):
        assert isinstance(unet.get_submodule(name), torch.nn.Conv2d)
    assert ldm_to_diffusers_path("input_blocks.0.0") == "conv_in" and ldm_to_diffusers_path("out.2") == "conv_out"
    for unmapped in ("input_blocks.2.0.in_layers.2", "input_blocks.1.0.in_layers.0", "label_emb.0.0"):
        with pytest.raises(QuantuneError):
            ldm_to_diffusers_path(unmapped, layers_per_block=1)


def test_ldm_names_sd1_layout():
    """The Stable Diffusion 1.x layout (layers_per_block=2), as in diffusers' original-checkpoint converter."""
    assert ldm_to_diffusers_path("input_blocks.2.1.proj_in") == "down_blocks.0.attentions.1.proj_in"
    assert ldm_to_diffusers_path("input_blocks.4.1.proj_in") == "down_blocks.1.attentions.0.proj_in"
    assert ldm_to_diffusers_path("input_blocks.11.0.in_layers.2") == "down_blocks.3.resnets.1.conv1"
    assert ldm_to_diffusers_path("output_blocks.2.0.out_layers.3") == "up_blocks.0.resnets.2.conv2"
    assert ldm_to_diffusers_path("output_blocks.11.1.proj_out") == "up_blocks.3.attentions.2.proj_out"
    assert ldm_to_diffusers_path("input_blocks.3.0.op") == "down_blocks.0.downsamplers.0.conv"
    assert ldm_to_diffusers_path("output_blocks.5.2.conv") == "up_blocks.1.upsamplers.0.conv"
    with pytest.raises(QuantuneError, match="downsampler"):
        ldm_to_diffusers_path("input_blocks.3.0.in_layers.2")


def _wrapper_ckpt():
    """lora_wrapper checkpoint: Linear to_q (r=2, scale 0.5), 1x1 conv proj_in as matrices (r=3, scale 2.0) and
    the text encoder's q_proj (r=2, scale 1.5)."""
    g = torch.Generator().manual_seed(7)
    sd = _wrapper_linear_ckpt()
    proj_in = "model.diffusion_model.input_blocks.1.1.proj_in"
    sd[f"{proj_in}.lora_A"] = torch.randn(3, 32, generator=g) * 0.2  # [r, C_in]
    sd[f"{proj_in}.lora_B"] = torch.randn(32, 3, generator=g) * 0.2  # [C_out, r]
    sd[f"{proj_in}.lora_scale"] = torch.tensor(2.0)
    te = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj"
    sd[f"{te}.lora_A"] = torch.randn(2, 32, generator=g) * 0.3
    sd[f"{te}.lora_B"] = torch.randn(32, 2, generator=g) * 0.3
    sd[f"{te}.lora_scale"] = torch.tensor(1.5)
    return sd


def wrapper_expected(pipe) -> dict:
    """CompVis module -> (canonical key, lora_scale, rank) for `_wrapper_ckpt`."""
    return {
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q": (f"unet.{Q}", 0.5, 2),
        "model.diffusion_model.input_blocks.1.1.proj_in": ("unet.down_blocks.0.attentions.0.proj_in", 2.0, 3),
        "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj": (
            f"text_encoder.{te_path(pipe)}",
            1.5,
            2,
        ),
    }


@pytest.mark.parametrize("wrapped_in_state_dict", [False, True])
def test_lora_wrapper_checkpoint(tmp_path, wrapped_in_state_dict):
    sd = _wrapper_ckpt()
    path = tmp_path / "lora_wrapper.ckpt"
    torch.save({"state_dict": sd, "epoch": 3} if wrapped_in_state_dict else sd, path)
    base = build_tiny()
    weights, fmt, _ = read_lora(path, base)
    assert fmt == "lora_wrapper"
    expected = wrapper_expected(base)
    assert sorted(weights) == sorted(key for key, _, _ in expected.values())
    for module, (key, scale, r) in expected.items():
        mod = weights[key]
        assert mod.rank == r and mod.alpha == pytest.approx(scale * r) and not mod.soft
        assert torch.equal(mod.down.flatten(1), sd[f"{module}.lora_A"])
        assert torch.equal(mod.up.flatten(1), sd[f"{module}.lora_B"])
    proj_in = weights["unet.down_blocks.0.attentions.0.proj_in"]
    assert proj_in.down.shape == (3, 32, 1, 1) and proj_in.up.shape == (32, 3, 1, 1)  # the conv's 4-d shapes

    base_out = pipe_outputs(base)
    wrapped = build_tiny()
    apply_lora(wrapped, weights)
    merged = build_tiny()
    for module, (key, scale, _) in expected.items():
        component, _, path_in = key.partition(".")
        # lora_wrapper's forward: W + lora_scale * lora_B @ lora_A (a 1x1 conv viewed as the same matrix)
        add_delta(getattr(merged, component), path_in, scale * sd[f"{module}.lora_B"] @ sd[f"{module}.lora_A"])
    out = pipe_outputs(wrapped)
    assert_changes(out, base_out)
    assert (out[0] - base_out[0]).abs().max() > 1e-2
    assert_outputs_equal(out, pipe_outputs(merged))


def test_lora_wrapper_soft_conv(tmp_path):
    """ConvSoftWrapper on a 3x3 resnet conv1 (stride 1, padding 1): lora_B is the C_in -> r conv applied first,
    lora_A the r -> C_out conv; output = base(x) + lora_scale * lora_A(lora_B(x))."""
    g = torch.Generator().manual_seed(11)
    m = "model.diffusion_model.input_blocks.1.0.in_layers.2"
    conv_b = torch.randn(4, 32, 3, 3, generator=g) * 0.1  # lora_B.weight: Conv2d(32 -> 4, 3x3)
    conv_a = torch.randn(32, 4, 3, 3, generator=g) * 0.1  # lora_A.weight: Conv2d(4 -> 32, 3x3)
    path = tmp_path / "soft.pt"
    torch.save(
        {f"{m}.lora_B.weight": conv_b, f"{m}.lora_A.weight": conv_a, f"{m}.lora_scale": torch.tensor(0.25)}, path
    )

    pipe = build_tiny()
    weights, fmt, _ = read_lora(path, pipe)
    assert fmt == "lora_wrapper"
    assert list(weights) == ["unet.down_blocks.0.resnets.0.conv1"]
    mod = weights["unet.down_blocks.0.resnets.0.conv1"]
    assert mod.soft and mod.rank == 4 and mod.alpha == pytest.approx(1.0)
    assert torch.equal(mod.down, conv_b) and torch.equal(mod.up, conv_a)

    base = pipe.unet.down_blocks[0].resnets[0].conv1
    w, b = base.weight.detach().clone(), base.bias.detach().clone()
    apply_lora(pipe, weights)
    layer = pipe.unet.down_blocks[0].resnets[0].conv1
    assert isinstance(layer, LoraLayer) and layer.soft
    x = torch.randn(2, 32, 16, 16, generator=g)
    with torch.no_grad():
        got = layer(x)
    base_y = F.conv2d(x, w, b, padding=1)
    expected = base_y + 0.25 * F.conv2d(F.conv2d(x, conv_b, padding=1), conv_a, padding=1)
    assert (expected - base_y).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    with pytest.raises(QuantuneError, match="soft"):
        mod.delta()  # a soft conv cannot be merged


@pytest.mark.parametrize(
    "missing",
    [
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_B",
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_A",
        "input_blocks.1.0.in_layers.2.lora_A.weight",  # soft conv: the r -> C_out conv
        "input_blocks.1.0.in_layers.2.lora_B.weight",  # soft conv: the C_in -> r conv
    ],
)
def test_lora_wrapper_incomplete(tmp_path, missing):
    """Either half of a pair missing is an error, never a silently dropped module (the others still read)."""
    sd = _wrapper_ckpt()
    soft = "model.diffusion_model.input_blocks.1.0.in_layers.2"
    sd[f"{soft}.lora_B.weight"], sd[f"{soft}.lora_A.weight"] = torch.zeros(4, 32, 3, 3), torch.zeros(32, 4, 3, 3)
    del sd[f"model.diffusion_model.{missing}"]
    torch.save(sd, tmp_path / "half.ckpt")
    with pytest.raises(QuantuneError, match="incomplete"):
        read_lora(tmp_path / "half.ckpt", build_tiny())


def test_lora_wrapper_foreign_checkpoint(tmp_path):
    torch.save({"model.diffusion_model.out.2.weight": torch.zeros(4, 32, 3, 3)}, tmp_path / "plain.ckpt")
    with pytest.raises(QuantuneError, match="unknown LoRA pickle"):
        read_lora(tmp_path / "plain.ckpt", build_tiny())


# --- unsafe and broken pickles ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_pickle_that_runs_code_is_refused(tmp_path, writer):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    payload = [MakesMarker(marker), torch.zeros(2)]
    if writer == "torch.save":
        torch.save(payload, evil)
    else:
        with open(evil, "wb") as f:
            pickle.dump(payload, f, protocol=2)
    with pytest.raises(QuantuneError, match="refused") as e:
        read_lora(evil, build_tiny())
    assert "\n" not in str(e.value)
    assert not marker.exists()
    # the payload is live: an unsafe load (done here on purpose, it only creates the marker) runs it
    if writer == "torch.save":
        torch.load(evil, weights_only=False)
    else:
        with open(evil, "rb") as f:
            pickle.load(f)
    assert marker.exists()


def test_cli_refuses_code_pickle(tmp_path, capsys):
    from quantune.cli import main

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save([MakesMarker(marker)], evil)
    rc = main(["lora", "inspect", str(evil), "--model", "zoo:tiny"])
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "refused" in lines[0]
    assert "Traceback" not in err
    assert not marker.exists()


@pytest.mark.parametrize("layout", ["zip", "legacy-pickle", "safetensors"])
def test_truncated_file_is_an_error(tmp_path, layout):
    tensors = [torch.randn(32, 4).half(), torch.randn(4, 32).half()]
    if layout == "safetensors":
        full = tmp_path / "full.safetensors"
        save_file({"unet:0:up": tensors[0], "unet:0:down": tensors[1]}, str(full), {"unet": '["Attention"]'})
    else:
        full = tmp_path / "full.pt"
        torch.save(tensors, full, _use_new_zipfile_serialization=layout == "zip")
    data = full.read_bytes()
    cut = tmp_path / f"cut{full.suffix}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(QuantuneError) as e:
        read_lora(cut, build_tiny())
    msg = str(e.value)
    assert "truncated" in msg and "refused" not in msg and "\n" not in msg
