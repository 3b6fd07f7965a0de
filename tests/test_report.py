"""report.py: evaluation JSONs -> report.json records, Markdown table, PNG chart."""

from __future__ import annotations

import json

import pytest

from pipeline.core.paths import Layout
from pipeline.evaluation.report import METRICS, build_report


def _eval(name: str, mode: str, r1: dict[str, float]) -> dict:
    metrics = {}
    for i, (attack, value) in enumerate(r1.items()):
        metrics[attack] = {"tr_r1": value, "tr_r5": value + 10, "tr_r10": value + 20, "ir_r1": value / 2,
                           "ir_r5": value / 2 + 10, "ir_r10": value / 2 + 20, "tr_asr": 10.0 * i,
                           "ir_asr": 5.0 * i, "seconds": 1.0}
    return {"name": name, "mode": mode, "checkpoint": f"runs/{name}", "dataset": "toy", "split": "test",
            "n_images": 10, "n_texts": 50, "attack_options": {}, "metrics": metrics}


@pytest.fixture()
def layout(tmp_path) -> Layout:
    layout = Layout(manifests_dir=tmp_path / "manifests")
    evals = layout.dataset_manifests("toy") / "evals"
    evals.mkdir(parents=True)
    # written out of order on purpose; two evaluations share the mode "ft"
    for ev in (_eval("mat-run", "mat", {"clean": 40.0, "sga": 12.0, "pgd": 20.0}),
               _eval("ft-a", "ft", {"clean": 50.0, "pgd": 3.0, "sga": 1.0}),
               _eval("ft-b", "ft", {"clean": 48.0, "pgd": 4.0, "sga": 2.0}),
               _eval("base", "pretrained", {"clean": 30.0, "pgd": 0.5, "sga": 0.0})):
        (evals / f"{ev['name']}.json").write_text(json.dumps(ev))
    return layout


def test_report_json_records_cover_every_eval_and_attack(layout):
    result = build_report("toy", layout)
    records = json.loads(result["paths"]["json"].read_text())
    assert len(records) == 4 * 3
    assert all(set(METRICS) | {"mode", "attack", "name"} <= set(r) for r in records)
    by_key = {(r["name"], r["attack"]): r for r in records}
    assert by_key[("mat-run", "pgd")]["tr_r1"] == 20.0 and by_key[("mat-run", "pgd")]["ir_r1"] == 10.0
    assert {r["attack"] for r in records} == {"clean", "pgd", "sga"}
    # rows ordered pretrained, ft..., mat; attacks clean first
    assert [r["name"] for r in records][::3] == ["base", "ft-a", "ft-b", "mat-run"]
    assert [r["attack"] for r in records[:3]] == ["clean", "pgd", "sga"]


def test_markdown_table_rows_and_columns(layout):
    markdown = build_report("toy", layout)["markdown"]
    table = [line for line in markdown.splitlines() if line.startswith("|")]
    header = table[0]
    assert header.split("|")[2:8] == [" Clean TR ", " Clean IR ", " PGD TR ", " PGD IR ", " SGA TR ", " SGA IR "]
    rows = {line.split("|")[1].strip(): line for line in table[2:6]}
    # a mode used once is labelled by its name in the paper, duplicated modes by the evaluation name
    assert set(rows) == {"pretrained", "ft-a", "ft-b", "MAT"}
    assert rows["MAT"].split("|")[2:8] == [" 40.0 ", " 20.0 ", " 20.0 ", " 10.0 ", " 12.0 ", " 6.0 "]


def test_chart_is_a_png(layout):
    png = build_report("toy", layout)["paths"]["png"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_no_evals_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="make eval"):
        build_report("none", Layout(manifests_dir=tmp_path))


def test_transfer_rows_are_marked_and_the_resize_stated(tmp_path):
    layout = Layout(manifests_dir=tmp_path / "manifests")
    evals = layout.dataset_manifests("toy") / "evals"
    evals.mkdir(parents=True)
    white = _eval("target", "pretrained", {"clean": 40.0, "pgd": 5.0})
    transfer = dict(_eval("target-from-src", "transfer", {"clean": 40.0, "pgd": 30.0}), attack_setting="transfer",
                    attack_source="models/src", transfer_resize="adversarial images resized 224 -> 384 px (bicubic, antialiased)")
    for ev in (white, transfer):
        (evals / f"{ev['name']}.json").write_text(json.dumps(ev))
    result = build_report("toy", layout)
    settings = {(r["name"], r["attack"]): r["setting"] for r in result["records"]}
    assert settings[("target", "pgd")] == "white-box" and settings[("target-from-src", "pgd")] == "transfer"
    assert settings[("target-from-src", "clean")] == "clean"
    assert "| transfer (transfer from models/src) |" in result["markdown"]
    assert "| pretrained (white-box) |" in result["markdown"] and "224 -> 384 px" in result["markdown"]


def test_asr_at_r5_and_r10_reach_the_json_and_the_tables(tmp_path):
    layout = Layout(manifests_dir=tmp_path / "manifests")
    evals = layout.dataset_manifests("toy") / "evals"
    evals.mkdir(parents=True)
    new = _eval("new", "mat", {"clean": 40.0, "sga": 12.0})
    new["metrics"]["sga"].update(tr_asr_r5=31.0, tr_asr_r10=21.0, ir_asr_r5=32.0, ir_asr_r10=22.0)
    old = _eval("old", "ft", {"clean": 40.0, "sga": 12.0})  # written before the ASR at R@5 / R@10 existed
    for ev in (new, old):
        (evals / f"{ev['name']}.json").write_text(json.dumps(ev))
    result = build_report("toy", layout)
    by_key = {(r["name"], r["attack"]): r for r in json.loads(result["paths"]["json"].read_text())}
    assert (by_key[("new", "sga")]["tr_asr_r5"], by_key[("new", "sga")]["ir_asr_r10"]) == (31.0, 22.0)
    assert by_key[("old", "sga")]["tr_asr_r10"] is None
    rows = [line.split("|")[1:-1] for line in result["markdown"].splitlines() if line.startswith("| MAT ")]
    cells = [[c.strip() for c in row[1:]] for row in rows]
    assert ["31.0", "32.0"] in cells and ["21.0", "22.0"] in cells
    assert ["–", "–"] in [[c.strip() for c in line.split("|")[2:4]] for line in result["markdown"].splitlines()
                          if line.startswith("| FT ")]
