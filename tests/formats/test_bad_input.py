"""Bad input: one clear QuantuneError line, and nothing half-written."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from quantune.errors import QuantuneError
from quantune.formats import detect_format, read_lora, write_lora
from quantune.io import atomic_path
from quantune.lora import apply_lora, get_lora_weights


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg and "Traceback" not in msg
    return msg


def test_missing_file(tmp_path):
    with pytest.raises(QuantuneError, match="no such file") as e:
        read_lora(tmp_path / "nope.safetensors")
    _one_line(e)


def test_truncated_and_non_safetensors(lora_pipe, tmp_path):
    good = write_lora(get_lora_weights(lora_pipe), tmp_path / "good.safetensors", "quantune")
    data = good.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(QuantuneError, match="truncated") as e:
        read_lora(tmp_path / "cut.safetensors")
    _one_line(e)
    (tmp_path / "text.safetensors").write_text("hello, not a tensor file")
    with pytest.raises(QuantuneError, match="not a readable safetensors"):
        read_lora(tmp_path / "text.safetensors")


def test_unknown_format(tmp_path):
    save_file({"some.weight": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(QuantuneError, match="unknown LoRA format") as e:
        detect_format(tmp_path / "x.safetensors")
    _one_line(e)
    torch.save({"a": torch.zeros(1)}, tmp_path / "x.pt")
    with pytest.raises(QuantuneError, match="unknown LoRA pickle"):
        detect_format(tmp_path / "x.pt")
    with pytest.raises(QuantuneError, match="cannot write format"):
        write_lora({"unet.x": None}, tmp_path / "y", "onnx")


def test_shapes_that_do_not_fit(lora_pipe, tmp_path):
    from quantune.models import build_tiny

    tiny = build_tiny()
    w = get_lora_weights(lora_pipe)
    key = next(k for k in w if k.endswith("attn1.to_q"))
    w[key].down = torch.zeros(4, 7)
    path = write_lora(w, tmp_path / "bad.safetensors", "quantune")
    weights, _, _ = read_lora(path, tiny)
    with pytest.raises(QuantuneError, match="do not fit") as e:
        apply_lora(tiny, weights)
    _one_line(e)
    assert not any(type(m).__name__ == "LoraLayer" for m in tiny.unet.modules())  # all-or-nothing


def test_unknown_module(tiny):
    w = {"unet.no.such.module": get_lora_weights_stub()}
    with pytest.raises(QuantuneError, match="another model"):
        apply_lora(tiny, w)


def get_lora_weights_stub():
    from quantune.lora import LoraModule

    return LoraModule(torch.zeros(2, 4), torch.zeros(4, 2), 2.0)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.safetensors"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_soft_conv_cannot_be_exported_to_foreign_formats(tiny, tmp_path):
    from quantune.lora import LoraConfig, add_lora

    add_lora(tiny.unet, LoraConfig(r=2, targets=["conv1"], conv_mode="soft"))
    w = get_lora_weights(tiny)
    for fmt in ("diffusers", "peft", "kohya"):
        with pytest.raises(QuantuneError, match="soft"):
            write_lora(w, tmp_path / f"{fmt}.safetensors", fmt)
    assert not any(p.name.endswith(".safetensors") for p in tmp_path.rglob("*"))
    back, _, _ = read_lora(write_lora(w, tmp_path / "q.safetensors", "quantune"), tiny)
    assert all(m.soft for m in back.values())
