"""The benchmark report: tables written as CSV / Markdown / PNG / JSON, the report joining them, the README section."""

from __future__ import annotations

import csv
import dataclasses
import json

import pytest

from quantune.bench.common import Plot, Table, write_table
from quantune.bench.report import BEGIN, END, finish_table, readme_section, run_bench, update_readme, write_report
from quantune.errors import QuantuneError


def _table(name="training", rows=None) -> Table:
    rows = rows or [{"variant": "a", "ms": 2.0}, {"variant": "peer", "ms": 4.0, "extra": "x"}, {"variant": "gone"}]
    return Table(name, "A table", {"variant": "{variant}", "ms": "{ms:.1f}"}, rows, Plot("{variant}", {"ms": "ms"}),
                 notes=["a note"])  # fmt: skip


def test_markdown_marks_missing_figures():
    md = _table().markdown().splitlines()
    assert md[0] == "| variant | ms |"
    assert md[2:] == ["| a | 2.0 |", "| peer | 4.0 |", "| gone | - |"]  # a peer that did not run: "-"


def test_write_table_files(tmp_path):
    md = write_table(_table(), tmp_path)
    assert md.read_text().startswith("### A table")
    assert "![training](training.png)" in md.read_text() and "- a note" in md.read_text()
    with open(tmp_path / "training.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["variant"] for r in rows] == ["a", "peer", "gone"] and rows[1]["extra"] == "x"  # union of fields
    png = (tmp_path / "training.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    data = json.loads((tmp_path / "training.json").read_text())
    assert data["rows"][0]["ms"] == 2.0 and "commit" in data["machine"]


def test_bad_tables(tmp_path):
    with pytest.raises(QuantuneError, match="table name"):
        Table("no spaces", "t", {})
    with pytest.raises(QuantuneError, match="no rows"):
        write_table(Table("empty", "t", {"a": "{a}"}), tmp_path)
    with pytest.raises(QuantuneError, match="unknown table"):
        run_bench(tmp_path, only=["speed"])
    with pytest.raises(QuantuneError, match="no benchmark tables"):
        write_report(tmp_path)


def test_report_and_readme(tmp_path):
    out = tmp_path / "bench"
    finish_table(_table(), out, quick=True)
    finish_table([_table("files_adapters"), _table("files_models")], out, quick=True)
    costs = json.loads((out / "costs.json").read_text())
    assert set(costs) == {"training", "files"} and costs["files"]["quick"] is True
    finish_table(dataclasses.replace(_table(), earlier={"cells": 3, "timed_cells": 2, "seconds": 600.0}), out, True)
    assert json.loads((out / "costs.json").read_text())["training"]["earlier"]["cells"] == 3
    report = write_report(out).read_text()
    assert "+ 3 cells of earlier runs (10.0 min, 2 of them timed)" in report  # a resumed table's cost
    assert report.startswith("# quantune benchmark report (quick run)")
    assert report.index("files_adapters.png") < report.index("files_models.png")  # tables in TABLES order
    assert report.index("training.png") < report.index("files_adapters.png")
    html = (out / "report.html").read_text()
    assert "<table>" in html and 'src="training.png"' in html
    section = readme_section(out, "docs/bench")
    assert "](docs/bench/training.png)" in section and "#### A table" in section
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{BEGIN}\nold\n{END}\n\nafter\n")
    update_readme(readme, out, "docs/bench")
    text = readme.read_text()
    assert "old" not in text and "docs/bench/training.png" in text and text.endswith(f"{END}\n\nafter\n")
    readme.write_text("no markers")
    with pytest.raises(QuantuneError, match="markers"):
        update_readme(readme, out, "docs/bench")


def test_bench_cli_report_only_and_errors(tmp_path, capsys):
    from quantune.cli import main

    out = tmp_path / "bench"
    finish_table(_table(), out, quick=False)
    readme = tmp_path / "README.md"
    readme.write_text(f"{BEGIN}\n{END}\n")
    assert main(["bench", "--report-only", "--out", str(out), "--readme", str(readme)]) == 0
    assert (out / "report.md").read_text().startswith("# quantune benchmark report (full run)")
    assert "](bench/training.png)" in readme.read_text()  # linked relative to the README
    assert main(["bench", "--only", "speed", "--out", str(tmp_path / "x")]) == 2
    assert "unknown table" in capsys.readouterr().err and not (tmp_path / "x").exists()
