"""LyCORIS adapters (LoHa, LoKr) and DoRA on any of them: the forward against a delta computed by hand here, merge
exactness, integer bases (QDoRA), and the real libraries: the `lycoris-lora` package applies quantune's tensors
with its own modules and quantune reads LyCORIS-made ones; peft loads quantune's peft exports and quantune reads
peft's own LoHa / LoKr / DoRA adapters, with equal outputs. A new type is covered by adding it to TYPES."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantune.errors import QuantuneError
from quantune.formats import read_lora, write_lora
from quantune.lora import LoraConfig, add_lora, apply_lora, get_lora_weights, lora_layers, merge_into, mix
from quantune.lora.inject import merge_lora, remove_lora, set_lora_multiplier, unmerge_lora
from quantune.quant.layers import from_float

TYPES = {  # id -> LoraConfig fields (layer sizes below make every LoKr layout occur)
    "loha": dict(type="loha", r=4),
    "loha-tucker": dict(type="loha", r=4, use_tucker=True),
    "lokr": dict(type="lokr", r=2),
    "lokr-full": dict(type="lokr", r=8),
    "lokr-both": dict(type="lokr", r=1, decompose_both=True, factor=4),
    "lokr-f16": dict(type="lokr", r=1, factor=16),  # a factor above sqrt(dim): peft orders the pair otherwise
    "lokr-tucker": dict(type="lokr", r=2, use_tucker=True),
    "dora": dict(type="dora", r=4),
    "loha-dora": dict(type="loha", r=4, dora=True),
    "lokr-dora": dict(type="lokr", r=2, dora=True),
}
PEFT_TYPES = [
    "loha",
    "loha-tucker",
    "lokr",
    "lokr-full",
    "lokr-both",
    "lokr-tucker",
    "dora",
]  # peft has the others not


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 48)
        self.conv = nn.Conv2d(32, 48, 3, padding=1)
        self.point = nn.Conv2d(32, 48, 1)

    def forward(self, x, z):
        return self.lin(x), self.conv(z), self.point(z)


INPUTS = (torch.randn(3, 64, generator=torch.Generator().manual_seed(1)),
          torch.randn(2, 32, 5, 5, generator=torch.Generator().manual_seed(2)))  # fmt: skip


def _adapted(kind: str, seed: int = 0) -> Net:
    torch.manual_seed(seed)
    net = Net()
    add_lora(net, LoraConfig(alpha=3.0, targets=["lin", "conv", "point"], seed=seed, **TYPES[kind]))
    _perturb(net, seed)
    return net


def _unadapted(kind: str):
    """A Net whose adapters were taken out again, the outputs it gave with them, and their canonical weights."""
    net = _adapted(kind)
    with torch.no_grad():
        expected = net(*INPUTS)
    weights = get_lora_weights(net)
    remove_lora(net)
    return net, expected, weights


def _perturb(model: nn.Module, seed: int) -> None:
    """Move every adapter tensor (factors, DoRA's magnitude) away from its start, so the update is not zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "base_layer" not in name and any(s in name for s in ("lora", "hada", "lokr", "magnitude", "factors")):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


def _hand_update(layer, weight: torch.Tensor) -> torch.Tensor:
    """W' - W from the layer's canonical tensors, by formulas written out here (not the library's)."""
    mod = layer.to_module()
    inner = getattr(mod, "inner", mod)
    t = {k: v.double() for k, v in inner.kohya_tensors().items()}
    w = weight.double()
    if inner.kind == "lora":
        dw = (t["lora_up.weight"].flatten(1) @ t["lora_down.weight"].flatten(1)) * inner.alpha / inner.rank
    elif inner.kind == "loha":
        dw = (
            _tucker_or_product(t, "hada_w1_a", "hada_w1_b", "hada_t1")
            * _tucker_or_product(t, "hada_w2_a", "hada_w2_b", "hada_t2")
            * (inner.alpha / inner.rank)
        )
    else:
        dw = _kron_blocks(t) * inner.scale
    dw = dw.reshape(w.shape)
    if mod.kind != "dora":
        return dw
    new = w + dw
    m = mod.magnitude.double()
    if m.shape[1] == 1:  # per output row
        norm = new.flatten(1).norm(dim=1).reshape(m.shape)
    else:  # per input column
        norm = new.transpose(0, 1).flatten(1).norm(dim=1).reshape(m.shape)
    return m * new / norm - w


def _tucker_or_product(t: dict, a: str, b: str, core: str) -> torch.Tensor:
    if core not in t:
        return t[a] @ t[b]
    k = t[core]  # [r, r, kh, kw]: at each kernel position, W_a^T K W_b
    out = torch.stack([t[a].T @ k[:, :, i, j] @ t[b] for i in range(k.shape[2]) for j in range(k.shape[3])], -1)
    return out.reshape(t[a].shape[1], t[b].shape[1], k.shape[2], k.shape[3])


def _kron_blocks(t: dict) -> torch.Tensor:
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    elif "lokr_t2" in t:
        w2 = _tucker_or_product({"a": t["lokr_w2_a"], "b": t["lokr_w2_b"], "t": t["lokr_t2"]}, "a", "b", "t")
    else:
        w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
    w2 = w2.flatten(1)
    rows = [torch.cat([w1[i, j] * w2 for j in range(w1.shape[1])], dim=1) for i in range(w1.shape[0])]
    return torch.cat(rows, dim=0)


def _reference(net: Net, updates: dict) -> tuple:
    x, z = INPUTS
    lin, conv, point = (lora_layers(net)[n].base_layer for n in ("lin", "conv", "point"))
    return (F.linear(x, lin.weight + updates["lin"].float(), lin.bias),
            F.conv2d(z, conv.weight + updates["conv"].float(), conv.bias, padding=1),
            F.conv2d(z, point.weight + updates["point"].float(), point.bias))  # fmt: skip


def _assert_outputs(a, b, atol=1e-4):
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, atol=atol, rtol=0)


@pytest.mark.parametrize("kind", TYPES)
def test_forward_is_the_base_plus_the_hand_computed_update(kind):
    net = _adapted(kind)
    base = tuple(layer.base_layer(x) for layer, x in zip(lora_layers(net).values(), (*INPUTS, INPUTS[1])))
    updates = {n: _hand_update(layer, layer.base_layer.weight.detach()) for n, layer in lora_layers(net).items()}
    with torch.no_grad():
        out = net(*INPUTS)
    _assert_outputs(out, _reference(net, updates))
    assert all((o - b).abs().max() > 1e-2 for o, b in zip(out, base))  # the adapters change every output


@pytest.mark.parametrize("kind", TYPES)
def test_merge_is_exact_and_unmerge_restores_the_base(kind):
    net = _adapted(kind)
    before = {n: m.base_layer.weight.detach().clone() for n, m in lora_layers(net).items()}
    with torch.no_grad():
        set_lora_multiplier(net, 0.6)
        expected = net(*INPUTS)
        merge_lora(net)
        _assert_outputs(net(*INPUTS), expected)
        unmerge_lora(net)
    for name, layer in lora_layers(net).items():
        torch.testing.assert_close(layer.base_layer.weight, before[name], atol=1e-6, rtol=0)
    updates = {n: 0.6 * _hand_update(layer, before[n]) for n, layer in lora_layers(net).items()}
    _assert_outputs(expected, _reference(net, updates))  # a strength scales W' - W (ComfyUI's convention)


@pytest.mark.parametrize("kind", TYPES)
def test_file_modules_merge_into_float_and_integer_models(kind):
    weights = {f"unet.{k.split('.', 1)[1]}": m for k, m in get_lora_weights(_adapted(kind)).items()}
    torch.manual_seed(0)
    float_net = Net()  # the base weights _adapted had (seed 0)
    int_net = nn.Module()
    for name in ("lin", "conv", "point"):
        int_net.add_module(name, from_float(copy.deepcopy(getattr(float_net, name)), 8))
    merged = copy.deepcopy(float_net)
    assert merge_into(merged, [(weights, 1.0)]) == 3
    for name in ("lin", "conv", "point"):
        w = getattr(float_net, name).weight.detach()
        torch.testing.assert_close(getattr(merged, name).weight - w, weights[f"unet.{name}"].delta_for(w).float(),
                                   atol=1e-5, rtol=0)  # fmt: skip
    int_merged = copy.deepcopy(int_net)
    assert merge_into(int_merged, [(weights, 1.0)]) == 3  # re-quantized at the layer's own bits
    for name in ("lin", "conv", "point"):
        base, merged_layer = getattr(int_net, name), getattr(int_merged, name)
        want = base.dequantize() + weights[f"unet.{name}"].delta_for(base.dequantize())
        step = merged_layer.scale.max()  # within half a quantization step per entry
        assert (merged_layer.dequantize() - want).abs().max() <= step / 2 + 1e-5
    apply_lora(int_net, weights)  # QDoRA / a LoHa on integer weights: the update on the dequantized weight
    for name, layer in lora_layers(int_net).items():
        assert layer.quantized_base
        x = INPUTS[0] if name == "lin" else INPUTS[1]
        w = layer.base_layer.dequantize()
        want = layer.base_layer(x) + _apply(layer.base_layer, x, _hand_update(layer, w).float())
        torch.testing.assert_close(layer(x), want, atol=1e-4, rtol=0)


def _apply(base, x, w):
    return F.linear(x, w) if w.dim() == 2 else F.conv2d(x, w, None, base.stride, base.padding)


@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("fmt", ["quantune", "kohya", "comfyui", "peft", "diffusers"])
def test_every_format_round_trips_or_refuses_by_name(kind, fmt, tiny, tmp_path):
    targets = r".*(attn1\.to_q|attn2\.to_v|proj_in|resnets\.0\.conv1)"
    add_lora(tiny.unet, LoraConfig(alpha=3.0, targets=targets, seed=0, **TYPES[kind]))
    _perturb(tiny.unet, 0)
    weights = get_lora_weights(tiny)
    writable = fmt in ("quantune", "kohya", "comfyui") or (fmt == "peft" and kind in PEFT_TYPES) or (
        fmt == "diffusers" and kind == "dora")  # fmt: skip
    if not writable:
        with pytest.raises(QuantuneError, match="write kohya|peft has no|DoRA is LoRA"):
            write_lora(weights, tmp_path / "out", fmt, pipe=tiny)
        return
    path = write_lora(weights, tmp_path / "out", fmt, pipe=tiny)
    back, _, _ = read_lora(path, tiny)
    assert set(back) == set(weights)
    for key, mod in weights.items():
        w = tiny.unet.get_submodule(key.split(".", 1)[1]).base_layer.weight.detach()
        assert back[key].kind == mod.kind
        torch.testing.assert_close(back[key].delta_for(w), mod.delta_for(w), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", [k for k in TYPES if k != "lokr-tucker"])  # LyCORIS 4.1.3 misreads its own
def test_lycoris_package_applies_quantune_modules(kind):  # Tucker LoKr: its loader takes the rank from lokr_w2_a
    lycoris = pytest.importorskip("lycoris")
    net, expected, weights = _unadapted(kind)
    sd = {f"lycoris_{k.split('.', 1)[1]}.{s}": t for k, m in weights.items() for s, t in m.kohya_tensors().items()}
    network, _ = lycoris.create_lycoris_from_weights(1.0, None, net, weights_sd=sd)
    network.apply_to()
    assert len(network.loras) == 3
    with torch.no_grad():
        _assert_outputs(net(*INPUTS), expected)


LYCORIS_MADE = [
    ("loha", {}),
    ("lokr", {"factor": 4}),
    ("lokr", {"decompose_both": True}),
    ("locon", {"dora_wd": True}),
    ("loha", {"dora_wd": True}),
    ("locon", {"dora_wd": True, "wd_on_output": False}),
]  # fmt: skip  (older files: the norm per column)


@pytest.mark.parametrize(("algo", "options"), LYCORIS_MADE)
def test_quantune_reads_lycoris_made_modules(algo, options):
    lycoris = pytest.importorskip("lycoris")
    torch.manual_seed(0)
    net = Net()
    network = lycoris.create_lycoris(net, 1.0, linear_dim=4, linear_alpha=2.0, conv_dim=4, conv_alpha=2.0,
                                     algo=algo, **options)  # fmt: skip
    network.apply_to()
    _perturb(network, 1)
    with torch.no_grad():
        expected = net(*INPUTS)
    sd = network.state_dict()
    network.restore()
    from quantune.lora.adapter import group_by_module, module_from_kohya

    weights = {f"unet.{k.removeprefix('lycoris_')}": module_from_kohya(t, k) for k, t in group_by_module(sd).items()}
    assert sorted(weights) == ["unet.conv", "unet.lin", "unet.point"]
    apply_lora(net, weights)
    with torch.no_grad():
        _assert_outputs(net(*INPUTS), expected)


@pytest.mark.parametrize("kind", PEFT_TYPES)
def test_peft_loads_quantune_peft_exports(kind, tmp_path):
    peft = pytest.importorskip("peft")
    net, expected, weights = _unadapted(kind)
    write_lora(weights, tmp_path / "p", "peft")
    model = peft.PeftModel.from_pretrained(net, str(tmp_path / "p" / "unet"))
    with torch.no_grad():
        _assert_outputs(model(*INPUTS), expected)


def _peft_configs():
    peft = pytest.importorskip("peft")
    targets = ["lin", "conv", "point"]
    return {
        "loha": peft.LoHaConfig(r=4, alpha=3, target_modules=targets),
        "loha-tucker": peft.LoHaConfig(r=4, alpha=3, target_modules=targets, use_effective_conv2d=True),
        "lokr-full": peft.LoKrConfig(r=4, alpha=3, target_modules=targets),
        "lokr-both": peft.LoKrConfig(r=1, alpha=3, target_modules=targets, decompose_both=True, decompose_factor=4),
        "lokr-f16": peft.LoKrConfig(r=1, alpha=3, target_modules=targets, decompose_factor=16),
        "lokr-tucker": peft.LoKrConfig(r=2, alpha=3, target_modules=targets, use_effective_conv2d=True),
        "dora": peft.LoraConfig(r=4, lora_alpha=3, target_modules=targets, use_dora=True),
    }


@pytest.mark.parametrize("name", ["loha", "loha-tucker", "lokr-full", "lokr-both", "lokr-f16", "lokr-tucker", "dora"])
def test_quantune_reads_peft_adapters(name, tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    net = Net()
    model = peft.get_peft_model(copy.deepcopy(net), _peft_configs()[name])
    _perturb(model, 1)
    with torch.no_grad():
        expected = model(*INPUTS)
    model.save_pretrained(str(tmp_path / "a"))
    weights, fmt, _ = read_lora(tmp_path / "a")
    assert fmt == "peft" and len(weights) == 3
    apply_lora(net, weights)
    with torch.no_grad():
        _assert_outputs(net(*INPUTS), expected)


def test_diffusers_loader_reads_a_dora_export(tiny, tmp_path):
    from tests.conftest import pipe_outputs

    add_lora(tiny.unet, LoraConfig(type="dora", r=4, alpha=2.0, targets=["to_q", "to_v"], seed=0))
    _perturb(tiny.unet, 0)
    expected = pipe_outputs(tiny)[1]
    path = write_lora(get_lora_weights(tiny), tmp_path / "d", "diffusers")
    remove_lora(tiny.unet)
    tiny.load_lora_weights(str(path))
    torch.testing.assert_close(pipe_outputs(tiny)[1], expected, atol=1e-4, rtol=0)


def test_refusals_name_the_type_and_the_way_out():
    loha = get_lora_weights(_adapted("loha"))
    dora = get_lora_weights(_adapted("dora"))
    with pytest.raises(QuantuneError, match="use --mode svd"):
        mix([(loha, 1.0), (loha, 0.5)], "concat")
    mixed, report = mix([(loha, 1.0), (loha, -0.5)], "svd", rank=64)  # LoHa deltas re-factored as a LoRA
    torch.testing.assert_close(mixed["unet.lin"].delta(), 0.5 * loha["unet.lin"].delta(), atol=1e-4, rtol=0)
    with pytest.raises(QuantuneError, match="depends on the base weight"):
        mix([(dora, 1.0)], "svd", rank=4)
    broken = dict(loha["unet.lin"].kohya_tensors())
    broken["hada_w2_b"] = broken["hada_w2_b"][:, :5]
    from quantune.lora.adapter import module_from_kohya

    with pytest.raises(QuantuneError, match="contradict"):
        module_from_kohya(broken, "lin")


@pytest.mark.parametrize(("algo", "options"), [("loha", {}), ("lokr", {"factor": 4}), ("locon", {"dora_wd": True})])
def test_quantune_reads_a_lycoris_kohya_file(algo, options, tmp_path):
    """A file LyCORIS's kohya network writes (lora_unet_ / lora_te_ names, UNet attention, resnets and CLIP), read
    and applied by quantune to a fresh model: the same UNet and text-encoder outputs."""
    kohya = pytest.importorskip("lycoris.kohya")
    from quantune.models import build_tiny
    from tests.conftest import pipe_outputs

    tiny = build_tiny()
    preset = tmp_path / "preset.toml"  # LyCORIS 4.1.3's "full" preset names time_embedding.linear_1 twice on a
    preset.write_text('unet_target_module = ["Transformer2DModel", "ResnetBlock2D"]\nunet_target_name = []\n')
    network = kohya.create_network(
        1.0,
        4,
        2.0,
        tiny.vae,
        tiny.text_encoder,
        tiny.unet,
        algo=algo,
        conv_dim=4,
        conv_alpha=2.0,
        preset=str(preset),
        **options,
    )  # fmt: skip  (diffusers UNet)
    network.apply_to(tiny.text_encoder, tiny.unet, apply_text_encoder=True, apply_unet=True)
    _perturb(network, 1)
    expected = pipe_outputs(tiny)
    network.save_weights(str(tmp_path / "lycoris.safetensors"), None, {"ss_network_module": "lycoris.kohya"})
    fresh = build_tiny()
    weights, fmt, _ = read_lora(tmp_path / "lycoris.safetensors", fresh)
    assert fmt == "kohya" and {k.split(".")[0] for k in weights} == {"unet", "text_encoder"}
    assert any(len(fresh.unet.get_submodule(k[5:]).weight.shape) == 4 for k in weights if k.startswith("unet."))
    apply_lora(fresh, weights)
    for got, want in zip(pipe_outputs(fresh), expected):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
