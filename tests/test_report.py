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
    # a mode used once is labelled by its name in the paper, duplicated modes by that name and the evaluation's
    assert set(rows) == {"pretrained", "FT (ft-a)", "FT (ft-b)", "MAT"}
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


def _csv(path) -> list[dict[str, str]]:
    import csv

    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _with_ranks(ev: dict, seed: int) -> dict:
    """Per-query ranks behind each attack's R@1 (2 captions per image), as evaluate writes them."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ev = dict(ev, n_images=40, n_texts=80, captions_per_image=[2] * 40)
    for m in ev["metrics"].values():
        tr, ir = np.where(rng.random(40) < 0.5, 0, 9), np.where(rng.random(80) < 0.3, 0, 9)
        m.update(tr_r1=100 * float((tr == 0).mean()), ir_r1=100 * float((ir == 0).mean()),
                 per_query={"tr_rank": tr.tolist(), "ir_rank": ir.tolist()})
    return ev


def test_report_csv_holds_the_json_numbers_under_clip_benchmark_columns(layout):
    """report.csv: one row per record, our keys under CLIP_benchmark's names (text_retrieval = TR, image → captions),
    the numbers the JSON holds, a null as an empty field; written through the ledger like the JSON."""
    from pipeline.core.ledger import is_recorded, remove_own_below
    from pipeline.evaluation.columns import METRIC_COLUMNS

    evals = layout.evals_dir("toy")
    (evals / "mat-run.json").write_text(json.dumps(_with_ranks(json.loads((evals / "mat-run.json").read_text()), 1)))
    result = build_report("toy", layout)
    records, rows = json.loads(result["paths"]["json"].read_text()), _csv(result["paths"]["csv"])
    assert METRIC_COLUMNS["tr_r1"] == "text_retrieval_recall@1" and METRIC_COLUMNS["ir_r10"] == "image_retrieval_recall@10"
    assert {"text_retrieval_recall@1", "image_retrieval_recall@1", "text_retrieval_recall@1_ci_low",
            "image_retrieval_asr@1", "text_retrieval_asr@10"} <= set(rows[0]) and "tr_r1" not in rows[0]
    assert len(rows) == len(records) == 12
    for record, row in zip(records, rows):
        assert (row["name"], row["attack"], row["label"]) == (record["name"], record["attack"], record["label"])
        for key, name in METRIC_COLUMNS.items():
            if key in record:
                assert row[name] == ("" if record[key] is None else str(record[key])), (key, record["name"])
                assert record[key] is None or float(row[name]) == record[key]
        for key in ("tr_r1_low", "ir_r1_high"):
            got = row[METRIC_COLUMNS[key[:5]] + ("_ci_low" if key.endswith("low") else "_ci_high")]
            assert got == ("" if record[key] is None else str(record[key]))
    ranked = [r for r in records if r["name"] == "mat-run"]
    assert all(r["tr_r1_low"] <= r["tr_r1"] <= r["tr_r1_high"] and r["ir_r1_low"] < r["ir_r1_high"] for r in ranked)
    assert all(r["tr_r1_low"] is None for r in records if r["name"] != "mat-run")  # no per-query ranks: no interval
    assert is_recorded(result["paths"]["csv"])
    removed, _ = remove_own_below(layout.dataset_manifests("toy"))
    assert result["paths"]["csv"] in removed and not result["paths"]["csv"].exists()


def test_report_csv_never_replaces_a_file_it_did_not_write(layout):
    from pipeline.core.ledger import ForeignFileError

    mine = layout.dataset_manifests("toy") / "report.csv"
    mine.write_text("my own table\n")
    with pytest.raises(ForeignFileError, match="report.csv"):
        build_report("toy", layout)
    assert mine.read_text() == "my own table\n"


def test_report_figure_labels_marks_missing_and_zero_and_draws_intervals(layout):
    """Every bar is named by the registry's label of its mode (and the evaluation's name where modes repeat, never
    the bare name beside a bare label); an attack an evaluation did not run is marked n/a on both panels; a zero
    R@1 is drawn and written; evaluations with per-query ranks get error bars."""
    from matplotlib.collections import LineCollection
    from matplotlib.container import ErrorbarContainer

    from pipeline.core.figures import NA, pyplot
    from pipeline.evaluation.report import MODE_LABELS, report_figure

    evals = layout.evals_dir("toy")
    mat = _with_ranks(json.loads((evals / "mat-run.json").read_text()), 1)
    del mat["metrics"]["pgd"]
    (evals / "mat-run.json").write_text(json.dumps(mat))
    records = build_report("toy", layout)["records"]
    fig = report_figure(records)
    try:
        legend = [t.get_text() for t in fig.legends[0].get_texts()]
        assert legend == ["pretrained", "FT (ft-a)", "FT (ft-b)", "MAT"]
        assert all(label.split(" (")[0] in MODE_LABELS.values() for label in legend)
        for ax in fig.axes:
            texts = [t.get_text() for t in ax.texts]
            assert texts.count(NA) == 1  # MAT under PGD
            assert "0" in texts  # the pretrained model's SGA TR R@1 is 0.0 (IR: 0.0 / 2)
            assert [c for c in ax.collections if isinstance(c, LineCollection)
                    and all(max(abs(seg[:, 1])) == 0 for seg in c.get_segments())]  # drawn at 0, not a gap
            bars_drawn = [e for e in ax.containers if isinstance(e, ErrorbarContainer)]
            assert len(bars_drawn) == 1 and len(bars_drawn[0].lines[2][0].get_segments()) == 2  # MAT: clean, SGA
        assert fig.axes[0].get_title().startswith("Text retrieval") and fig.axes[1].get_title().startswith("Image")
    finally:
        pyplot().close(fig)
