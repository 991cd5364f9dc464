"""One variant of each measuring table, in process on zoo:tiny: the rows hold real, consistent figures.

(The benchmark itself runs every variant in its own process; `quantune bench --quick` runs outside the suite.)
"""

from __future__ import annotations

import pytest

from quantune.bench import files, inference, training


def test_training_rows_quantune_and_peft_agree_on_trainables():
    ours = training.run_variant("lora", 32, "zoo:tiny", 16, 2, 1, 1)
    peer = training.run_variant("diffusers+peft lora", 32, "zoo:tiny", 16, 2, 1, 1)
    assert ours["status"] == peer["status"] == "ok"
    assert ours["trainable"] == peer["trainable"] > 0  # same targets, same rank: same LoRA
    assert ours["step_s"] > 0 and ours["peak_mb"] >= ours["before_steps_mb"] > 0


def test_training_row_quantized_base():
    row = training.run_variant("intlora-mul", 4, "zoo:tiny", 16, 2, 1, 1)
    assert row["status"] == "ok" and row["weights"] == "W4A8" and row["trainable"] > 0


def test_inference_rows_sqnr_against_fp32(tmp_path):
    ref = str(tmp_path / "fp32.pt")
    fp32 = inference.run_variant("fp32", "zoo:tiny", "unet", 16, 2, 1, ref)
    ours = inference.run_variant("quantune W8A8", "zoo:tiny", "unet", 16, 2, 1, ref)
    assert fp32["sqnr_db"] > 100  # the reference itself
    assert 15 < ours["sqnr_db"] < 100 and ours["median_ms"] > 0


def test_file_rows(tmp_path):
    row = files.adapter_row("zoo:tiny", 4, "fp16")
    for fmt in files.ADAPTER_FORMATS:
        assert row[fmt] > 0
    # the same tensors in the same layout: quantune's diffusers file within 10 % of diffusers' own (metadata differs)
    assert row["diffusers"] == pytest.approx(row["diffusers (peer)"], rel=0.1)
    fp32 = files.model_row("zoo:tiny", "fp32")
    w8 = files.model_row("zoo:tiny", "quantune W8A8")
    assert fp32["status"] == w8["status"] == "ok"
    assert fp32["bytes"] / w8["bytes"] > 2.5  # int8 codes + float norms / biases / scales
