"""The fine-tuning table by the IntLoRA reference's protocol: its plan, its summaries, and one run of each kind of
model on zoo:tiny (in process, tiny settings)."""

from __future__ import annotations

import math

import pytest

from quantune.bench import finetune_runs as fr
from quantune.bench import quality_finetune as qf
from quantune.errors import QuantuneError

TINY = fr.Protocol("zoo:tiny", steps=4, n=2, n_subject=2, sample_steps=2, calib_samples=2, iters=2)


def test_protocol_plan_and_a_stated_subset(monkeypatch):
    monkeypatch.delenv(qf.SETTINGS_VARIABLE, raising=False)
    monkeypatch.delenv(qf.MODEL_VARIABLE, raising=False)
    full = qf.protocol(quick=False)
    runs = qf.plan(full)
    assert len(runs) == 3 * 4 * 3 * (1 + 2 * len(qf.RUNS))  # lr x subject x seed x (LoRA + 5 runs per bits)
    assert len({qf.key_of(r) for r in runs}) == len(runs)
    assert "subset" not in qf.caption(full)
    monkeypatch.setenv(qf.SETTINGS_VARIABLE, "lrs=2e-4,subjects=2,seeds=3,workers=2")
    p = qf.protocol(quick=False)
    assert (p.lr_list(), p.subjects, p.workers, len(qf.plan(p))) == ([2e-4], 2, 2, 2 * 3 * 11)
    assert "a stated subset: lrs 2e-4 of 2e-4 1e-3 6e-5, subjects 2 of 4" in qf.caption(p)
    assert p.cell_settings() == full.cell_settings()  # the subset reuses the full protocol's cells
    assert fr.SUBJECTS[0] in str(full.cell_settings()) and len(full.cell_settings()["recipe"]) == 16
    for bad in ({"lrs": "fast"}, {"lrs": "-1"}, {"bits": "W3A3"}, {"subjects": 5}, {"seeds": 0}, {"calib_samples": 4}):
        with pytest.raises(QuantuneError):
            fr.Protocol(**bad)


def _row(similarity: float, layers: dict | None = None) -> dict:
    return {"train_s": 1.0, "layers": layers,
            "models": {"IntLoRA-MUL" if layers else "QLoRA + per-channel L2.4": {
                "subject_similarity": similarity, "glyph_top1": 0.5, "fid_vs_openmoji": 9.0, "merge_error": 0.0,
                "best": {"subject_similarity": similarity + 0.1, "step": 2}}}}  # fmt: skip


def test_summary_pairs_units_against_intlora_mul(tmp_path):
    layer = {"zero_share": 0.2, "aux_ratio": 0.5, "u_clipped": 0.0}
    done = {}
    for unit, (ours, theirs) in enumerate([(0.9, 0.7), (0.8, 0.75), (0.85, 0.6)]):
        done[("intlora-mul", "W4A8", "none", 1e-3, unit, 0)] = _row(
            ours, {"a": layer, "b": layer | {"zero_share": 0.4}}
        )
        done[("qlora", "W4A8", "none", 1e-3, unit, 0)] = _row(theirs)
    rows = {r["model"]: r for r in qf.summarize(TINY, done, {"per_subject": [0.5, 0.6, 0.7, 0.8]})}
    mul, q = rows["IntLoRA-MUL"], rows["QLoRA + per-channel L2.4"]
    assert mul["units"] == q["units"] == 3 and "p" not in mul
    assert math.isclose(mul["subject_similarity"], 0.85) and math.isclose(q["best_similarity"], 0.7833, abs_tol=1e-4)
    assert math.isclose(mul["subject_gain"], 0.85 - 0.6)  # against each unit's subject before fine-tuning
    assert math.isclose(mul["zero_share"], 0.3) and math.isnan(q["zero_share"])
    assert q["p"] == pytest.approx(0.25, abs=0.02)  # 3 units, all one sign: 2 of 8 sign patterns as extreme
    qf.write_layers(tmp_path / "layers.csv", done)
    lines = (tmp_path / "layers.csv").read_text().splitlines()
    assert len(lines) == 3 and lines[2].endswith(",3,0.4,0.5,0")  # layer b: the mean over the 3 units


def test_intlora_run_merges_into_its_training_weights(tmp_path):
    row = fr.run_one(TINY, "intlora-mul", "W4A8", "none", 1e-3, 0, 0, tmp_path / "run")
    ((label, model),) = row["models"].items()
    assert label == "IntLoRA-MUL" and model["merge_error"] < 1e-5  # the reloaded integer model is the trained one
    assert 0 <= model["subject_similarity"] <= 1 and model["best"]["step"] in range(1, TINY.steps + 1)
    diag = list(row["layers"].values())
    assert len(diag) == 32 and all(0 < d["zero_share"] < 0.5 and 0 < d["aux_ratio"] < 2 for d in diag)  # W4
    assert len(list((tmp_path / "run" / "grid" / label).glob("*.png"))) == TINY.n_subject


def test_qlora_run_scores_each_requantization(tmp_path, monkeypatch):
    monkeypatch.setattr(fr, "QLORA_MERGES", {k: v for k, v in fr.QLORA_MERGES.items() if v})  # EDA-DM: the PTQ tests
    row = fr.run_one(TINY, "qlora", "W4A8", "none", 1e-3, 1, 0, tmp_path / "run")
    per_tensor, per_channel = (row["models"][k] for k in fr.QLORA_MERGES)
    assert 0 < per_channel["merge_error"] < per_tensor["merge_error"]  # one scale per row loses less of B A
    assert per_channel["best"]["step"] in range(1, TINY.steps + 1) and "layers" not in row


@pytest.mark.parametrize("zero_fix", ["none", "midrise"])
@pytest.mark.parametrize("mode", ["mul", "shift"])
def test_intlora_diagnostics(mode, zero_fix):
    import torch

    from quantune.quant.config import WeightQuant
    from quantune.quant.intlora import IntLoraConfig, IntLoraLayer

    base = torch.nn.Linear(48, 32)
    cfg = IntLoraConfig(mode=mode, weight=WeightQuant(bits=4), r=4, zero_fix=zero_fix)
    layer = IntLoraLayer(base, "x", cfg, torch.Generator().manual_seed(0))
    d = layer.diagnostics()
    assert d["zero_share"] == pytest.approx(layer.zero_fraction()) and (d["zero_share"] == 0) == (zero_fix != "none")
    assert 0.05 < d["aux_ratio"] < 1.5 and d["u_clipped"] < 0.05  # B = 0: U's own range (L2.4 clips outliers)
    with torch.no_grad():
        layer.lora_B.fill_(50.0)  # an update far outside U's range
    assert layer.diagnostics()["u_clipped"] > (0.5 if mode == "mul" else -1)
