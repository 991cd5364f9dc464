"""One variant of each measuring table, in process on zoo:tiny: the rows hold real, consistent figures.

(The benchmark itself runs every variant in its own process; `quantune bench --quick` runs outside the suite.)
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from quantune.bench import files, inference, training


def test_training_rows_quantune_and_peft_agree_on_trainables():
    ours = training.run_variant("lora", 32, "zoo:tiny", 16, 2, 1, 1)
    peer = training.run_variant("diffusers+peft lora", 32, "zoo:tiny", 16, 2, 1, 1)
    assert ours["status"] == peer["status"] == "ok"
    assert ours["trainable"] == peer["trainable"] > 0  # same targets, same rank: same LoRA
    assert (
        ours["it_s"] == pytest.approx(1 / ours["step_s"])
        and ours["step_mb"] == ours["peak_mb"] - ours["before_steps_mb"]
    )


def test_training_table_ratios_and_a_missing_peer(monkeypatch):
    """The ratios are against the peft row of the same setting; a peer that cannot be imported gives its row."""
    import builtins

    real_import = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name.startswith("bitsandbytes"):
            raise ModuleNotFoundError("No module named 'bitsandbytes'", name="bitsandbytes")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    row = training.run_variant("peft+bnb nf4 qlora", 32, "zoo:tiny", 16, 2, 1, 1)
    assert row["status"] == "not installed (bitsandbytes)" and "step_s" not in row
    fake = {"lora": {"step_s": 1.0, "peak_mb": 300.0}, "diffusers+peft lora": {"step_s": 2.0, "peak_mb": 600.0}}

    def child(module, args):
        variant = args[1]
        return {"variant": variant, "status": "ok", **fake.get(variant, {"step_s": 4.0, "peak_mb": 900.0})}

    monkeypatch.setattr(training, "run_child", child)
    monkeypatch.setattr(training, "settings", lambda quick: [("zoo:tiny", 16, 2)])
    rows = {r["variant"]: r for r in training.table(quick=True).rows}
    assert rows["lora"]["time_vs_peft"] == 0.5 and rows["lora"]["memory_vs_peft"] == 0.5
    assert rows["full"]["time_vs_peft"] == 2.0 and rows["diffusers+peft lora"]["time_vs_peft"] == 1.0


def test_training_row_quantized_base():
    row = training.run_variant("intlora-mul", 4, "zoo:tiny", 16, 2, 1, 1)
    assert row["status"] == "ok" and row["weights"] == "W4A8" and row["trainable"] > 0


def test_inference_rows_sqnr_against_fp32(tmp_path):
    ref = str(tmp_path / "fp32.pt")
    fp32 = inference.run_variant("fp32", "zoo:tiny", "denoiser", 16, 2, 1, ref)
    ours = inference.run_variant("quantune W8A8", "zoo:tiny", "denoiser", 16, 2, 1, ref)
    assert 15 < ours["sqnr_db"] < 100 and ours["median_ms"] > 0 and fp32["median_ms"] > 0
    from quantune.quant.quantize import quant_layers

    # the integer kernels were prepared on the device the row ran on (CPU here), not left on the float path
    bm = inference.build("zoo:tiny")
    inference.quantune_int(bm.unet, [inference.denoiser_kwargs(bm, 2, 16, seed=1)], 8, 8)
    kernels = [layer.kernel for layer in quant_layers(bm.unet).values()]
    assert kernels and sum(k is not None for k in kernels) > len(kernels) // 2
    assert all(k.device == torch.device("cpu") for k in kernels if k is not None)


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


@pytest.mark.parametrize("model", ["zoo:tiny-pixart", "zoo:tiny-sd3", "zoo:tiny-flux"])
def test_transformer_rows_quantune_and_peft_agree_on_trainables(model):
    """Random text inputs of the family's shapes drive one training step of each; LoRA on the same targets."""
    ours = training.run_variant("lora", 32, model, 32, 1, 1, 1)
    peer = training.run_variant("diffusers+peft lora", 32, model, 32, 1, 1, 1)
    assert ours["status"] == peer["status"] == "ok"
    assert ours["trainable"] == peer["trainable"] > 0


def test_transformer_table_continues_an_interrupted_run(monkeypatch, tmp_path):
    """An interrupted run keeps the rows it measured (OUT/.dit_training.rows.jsonl) and the next measures only the
    rest, a failed row again; `quantune bench` accepts the folder; the partial file goes once the table is written."""
    from quantune.bench import dit_training
    from quantune.bench.report import finish_table, run_bench
    from quantune.errors import QuantuneError

    calls, stop_at, fail = [], {"n": 3}, {"intlora-shift"}

    def child(module, args, timeout=None):
        if len(calls) == stop_at["n"]:
            raise KeyboardInterrupt
        calls.append(args[1])
        if args[1] in fail:
            raise QuantuneError("benchmark child failed: killed")
        return {"model": args[3], "res": 32, "batch": 1, "variant": args[1], "status": "ok", "step_s": 1.0,
                "peak_mb": 100.0}  # fmt: skip

    monkeypatch.setattr(dit_training, "run_child", child)
    monkeypatch.setattr(dit_training, "settings", lambda quick: [("zoo:tiny-flux", 32, 1)])
    with pytest.raises(KeyboardInterrupt):
        dit_training.rows(True, tmp_path)
    partial = tmp_path / ".dit_training.rows.jsonl"
    assert len(partial.read_text().splitlines()) == 3
    seen = []
    monkeypatch.setattr("quantune.bench.report.run_tables", lambda names, out, quick: seen.append(names))
    monkeypatch.setattr("quantune.bench.report.write_report", lambda out: out / "report.md")
    run_bench(tmp_path, quick=True, only=["dit_training"])  # a folder holding only the partial rows is accepted
    assert seen == [["dit_training"]]
    calls.clear()
    stop_at["n"] = 99
    dit_training.rows(True, tmp_path)
    assert calls == [v for v, _ in dit_training.VARIANTS[3:]]  # the first three were kept
    calls.clear()
    fail.clear()
    table = dit_training.table(True, tmp_path)
    assert calls == ["intlora-shift"]  # the failed row, measured again
    assert {r["status"] for r in table.rows} == {"ok"}
    finish_table(table, tmp_path, True)
    assert not partial.exists() and (tmp_path / "dit_training.json").exists()


def test_transformer_table_stops_starting_rows_after_its_deadline(monkeypatch, tmp_path):
    """QUANTUNE_BENCH_UNTIL passed: no row starts, the table is written with the rows marked as not measured, and
    the partial rows file stays for the next run."""
    from quantune.bench import dit_training
    from quantune.bench.report import finish_table

    (tmp_path / ".dit_training.rows.jsonl").write_text(
        '{"model": "zoo:tiny-flux", "res": 32, "batch": 1, "variant": "lora", "bits": 32, "status": "ok", '
        '"step_s": 1.0, "peak_mb": 100.0}\n'
    )
    monkeypatch.setattr(dit_training, "run_child", lambda *a, **k: pytest.fail("no row may start"))
    monkeypatch.setattr(dit_training, "settings", lambda quick: [("zoo:tiny-flux", 32, 1)])
    monkeypatch.setenv(dit_training.UNTIL, "0")
    table = dit_training.table(True, tmp_path)
    status = {r["variant"]: r["status"] for r in table.rows}
    assert status.pop("lora") == "ok" and set(status.values()) == {dit_training.NOT_MEASURED}
    finish_table(table, tmp_path, True)
    assert (tmp_path / ".dit_training.rows.jsonl").exists() and (tmp_path / "dit_training.md").exists()


def test_ptq_quality_row_takes_any_pipeline(tmp_path):
    """quality_ptq's one run (quantize, save, reload, sample) on a diffusion transformer."""
    from quantune.bench import quality_ptq

    s = quality_ptq.Settings(n=2, steps=2, calib_samples=2, iters=2, model="zoo:tiny-pixart")
    stats = quality_ptq.run_one(s, "eda-dm", "W4A8", tmp_path)
    assert len(list(tmp_path.glob("*.png"))) == 2
    assert 0 < stats["unet_mb"] < stats["fp32_unet_mb"]


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="OpenVINO is not installed")
def test_inference_row_on_openvino(tmp_path):
    ref = str(tmp_path / "fp32.pt")
    inference.run_variant("fp32", "zoo:tiny", "denoiser", 16, 2, 1, ref)
    row = inference.run_variant("quantune W8A8 (openvino)", "zoo:tiny", "denoiser", 16, 2, 1, ref)
    assert row["status"] == "ok" and 15 < row["sqnr_db"] < 100 and row["prepare_s"] > 0


NO_NNCF = importlib.util.find_spec("nncf") is None or importlib.util.find_spec("openvino") is None


@pytest.mark.skipif(NO_NNCF, reason="NNCF (a benchmark peer) or OpenVINO is not installed")
@pytest.mark.parametrize("variant", ["openvino INT8 (nncf)", "openvino INT4 weight-only (nncf)"])
def test_inference_row_of_the_openvino_peers(tmp_path, variant):
    """The OpenVINO peers of the inference table: NNCF's INT8 quantization and INT4 weight compression run, and
    stay close to the float model."""
    ref = str(tmp_path / "fp32.pt")
    inference.run_variant("fp32", "zoo:tiny", "denoiser", 16, 2, 1, ref)
    row = inference.run_variant(variant, "zoo:tiny", "denoiser", 16, 2, 1, ref)
    assert row["status"] == "ok" and 10 < row["sqnr_db"] < 100, row


@pytest.mark.skipif(NO_NNCF, reason="NNCF (a benchmark peer) or OpenVINO is not installed")
def test_openvino_int4_peer_holds_4_bit_weights():
    """The INT4 peer's IR holds u4 weight constants for every MatMul (the last one too: all_layers)."""
    import openvino as ov

    from quantune.bench.openvino_peer import _compress

    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64)).eval()
    ir = _compress(ov.convert_model(model, example_input=torch.randn(2, 64)), "int4", model, [])
    u4 = [op for op in ir.get_ops() if op.get_type_name() == "Constant" and op.get_element_type() == ov.Type.u4]
    assert [tuple(op.get_output_shape(0)) for op in u4].count((64, 64)) == 2  # both weights, as 4-bit codes


@pytest.mark.skipif(NO_NNCF, reason="NNCF (a benchmark peer) or OpenVINO is not installed")
def test_ptq_quality_nncf_row(tmp_path):
    """quality_ptq's NNCF run: nncf.quantize of the float UNet on quantune's calibration set, sampled in the
    pipeline through OpenVINO."""
    from quantune.bench import quality_ptq

    s = quality_ptq.Settings(n=2, steps=2, calib_samples=2, iters=2, model="zoo:tiny")
    stats = quality_ptq.run_one(s, "nncf smoothquant", "W8A8", tmp_path)
    assert len(list(tmp_path.glob("*.png"))) == 2 and stats["fp32_unet_mb"] > 0


def test_ptq_quality_table_resumes_from_its_cells(tmp_path, monkeypatch):
    """quality_ptq's table on a tiny transformer: every cell in its own process, written to the cell cache; a
    second run reads every cell back and runs nothing."""
    from quantune.bench import quality_ptq

    s = quality_ptq.Settings(n=2, steps=2, calib_samples=2, iters=2, model="zoo:tiny-flux", seeds=2)
    monkeypatch.setattr(quality_ptq, "settings", lambda quick: s)
    monkeypatch.setattr(quality_ptq, "variants", lambda denoiser, bits: {"minmax": None, "eda-dm": None})
    monkeypatch.setattr(quality_ptq, "BITS", {"W8A8": (8, 8)})
    first = quality_ptq.table(False, tmp_path)
    assert [r["method"] for r in first.rows] == ["-", "minmax", "eda-dm"] and first.rows[1]["seeds"] == 2
    assert 0 <= first.rows[1]["p_psnr"] <= 1 and "p_psnr" not in first.rows[2]
    assert len(list((tmp_path / "cells" / "quality_ptq_tiny_flux").glob("*.json"))) == 4

    def no_child(*args, **kwargs):
        raise AssertionError("a cached cell ran again")

    monkeypatch.setattr(quality_ptq, "run_child", no_child)
    again = quality_ptq.table(False, tmp_path)
    assert again.rows[1]["psnr_db_ms"] == first.rows[1]["psnr_db_ms"]
    assert (tmp_path / first.images[0]).exists()
