"""The fine-tuning table by the IntLoRA reference's protocol: its plan, its summaries, and one run of each kind of
model on zoo:tiny (in process, tiny settings, the integer models reloaded on the torch backend)."""

from __future__ import annotations

import math

import pytest

from quantune.bench import finetune_runs as fr
from quantune.bench import quality_finetune as qf
from quantune.errors import QuantuneError

TINY = fr.Protocol("zoo:tiny", steps=4, n=2, n_subject=2, sample_steps=2, calib_samples=2, iters=2)


def test_protocol_plan_and_a_stated_subset(monkeypatch):
    full = qf.protocol(quick=False)
    runs = qf.plan(full)
    assert len(runs) == 3 * 4 * 3 * (1 + 2 * len(qf.RUNS))  # lr x subject x seed x (LoRA + 5 runs per bits)
    assert len({qf.key_of(r) for r in runs}) == len(runs)
    assert "subset" not in qf.caption(full)
    monkeypatch.setenv(qf.SETTINGS_VARIABLE, "lrs=2e-4,subjects=2,seeds=3,workers=2")
    p = qf.protocol(quick=False)
    assert (p.lr_list(), p.subjects, p.workers, len(qf.plan(p))) == ([2e-4], 2, 2, 2 * 3 * 11)
    assert "a stated subset: lrs 2e-4 of 2e-4 1e-3 6e-5, subjects 2 of 4" in qf.caption(p)
    assert p.shared() == full.shared()  # the subset reuses the full protocol's cells
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
    rows = {r["model"]: r for r in qf.summarize(TINY, done)}
    mul, q = rows["IntLoRA-MUL"], rows["QLoRA + per-channel L2.4"]
    assert mul["units"] == q["units"] == 3 and "p" not in mul
    assert math.isclose(mul["subject_similarity"], 0.85) and math.isclose(q["best_similarity"], 0.7833, abs_tol=1e-4)
    assert math.isclose(mul["zero_share"], 0.3) and math.isnan(q["zero_share"])
    assert q["p"] == pytest.approx(0.25, abs=0.02)  # 3 units, all one sign: 2 of 8 sign patterns as extreme
    qf.write_layers(tmp_path / "layers.csv", done)
    lines = (tmp_path / "layers.csv").read_text().splitlines()
    assert len(lines) == 3 and lines[2].endswith(",3,0.4,0.5,0")  # layer b: the mean over the 3 units


@pytest.fixture
def torch_reload(monkeypatch):
    from quantune.models import load_pipeline
    from quantune.models.integer import save_integer_pipeline

    monkeypatch.setattr(
        fr, "_reload", lambda pipe, f: load_pipeline(str(save_integer_pipeline(pipe, f)), backend="torch")
    )


def test_intlora_run_merges_into_its_training_weights(tmp_path, torch_reload):
    row = fr.run_one(TINY, "intlora-mul", "W4A8", "none", 1e-3, 0, 0, tmp_path)
    ((label, model),) = row["models"].items()
    assert label == "IntLoRA-MUL" and model["merge_error"] < 1e-5  # the integer merge is the training weight
    assert 0 <= model["subject_similarity"] <= 1 and model["best"]["step"] in range(1, TINY.steps + 1)
    assert model["best"]["subject_similarity"] >= model["subject_similarity"]  # the final state is a candidate
    diag = list(row["layers"].values())
    assert len(diag) == 32 and all(0 < d["zero_share"] < 0.5 and 0 < d["aux_ratio"] < 2 for d in diag)  # W4
    assert len(list((tmp_path / "grid" / label).glob("*.png"))) == TINY.n_subject


def test_qlora_run_scores_each_requantization(tmp_path, torch_reload, monkeypatch):
    monkeypatch.setattr(fr, "QLORA_MERGES", {k: v for k, v in fr.QLORA_MERGES.items() if v})  # EDA-DM: the PTQ tests
    row = fr.run_one(TINY, "qlora", "W8A8", "none", 1e-3, 1, 0, tmp_path)
    assert list(row["models"]) == list(fr.QLORA_MERGES)
    errors = [m["merge_error"] for m in row["models"].values()]
    assert all(0 < e < math.inf for e in errors)  # re-quantization loses part of the update
    assert all(m["best"] is not None for m in row["models"].values()) and "layers" not in row
