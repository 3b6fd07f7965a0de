"""stats and filter over stage shards whose per-variant scores are planted here (no model needed)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.curate.filters import FilterConfig, filter_path, find_filter, load_filter, run_filter
from pipeline.core.paths import Layout
from pipeline.core.shards import read_stats, sample_key, shard_name, write_stats, write_tar
from pipeline.core.fileio import sha256_file
from pipeline.curate.stats import read_stage_scores, run_stats

DATASET = "toy"
PERCENTILES = {"image": list(np.linspace(0.0, 2.0, 101)), "text": list(np.linspace(0.0, 4.0, 101))}
FD = {"eda": {"fd_image": None, "fd_text": 0.125}, "randaug": {"fd_image": 0.5, "fd_text": None}}


def _manifest(stage: str, written: int, variants: int | None, shard_dir, features=None) -> dict:
    stats = {"variants": variants, "variant_skips": 1} if variants is not None else {}
    if features:
        stats["features"] = features
    return {"dataset": DATASET, "stage": stage, "counts": {"input": written, "written": written, "skipped": 0},
            "config": {"scorer": {"name": "toy-clip", "reference_shift_percentiles": PERCENTILES}}, "shards": [{"path": str(shard_dir)}], "stats": stats}


@pytest.fixture()
def scored(tmp_path) -> tuple[Layout, dict[str, list[dict]]]:
    """Two stages over 2 shards x 5 keys: eda (text, 2 variants per key), randaug (image, 0-2 per key)."""
    layout = Layout(shards_dir=tmp_path / "shards", manifests_dir=tmp_path / "manifests")
    rng = np.random.default_rng(0)
    planted: dict[str, list[dict]] = {"eda": [], "randaug": []}
    for stage in ("eda", "randaug"):
        for shard in range(2):
            samples = []
            for index in range(5):
                key = sample_key("train", shard, index)
                count = 2 if stage == "eda" else index % 3
                variants = []
                for v in range(count):
                    scores = {"alignment": float(rng.uniform(-0.2, 0.9)), "src_sim": float(rng.uniform(0.3, 1.0)),
                              "shift": float(rng.uniform(0.5, 3.0))}
                    body = {"text": f"caption {v}"} if stage == "eda" else {"file": f"v{v}.jpg"}
                    variants.append({"caption_index": 0, "seed": v, "op": "x", **body, **scores})
                    planted[stage].append({"key": key, "index": v, **scores})
                record = {"key": key, "stage": stage, "variants": variants, "skipped": []}
                sample = {"__key__": key, "json": record}
                sample.update({f"v{v}.jpg": b"\xff\xd8jpeg" for v in range(count) if stage == "randaug"})
                samples.append(sample)
            tar = layout.stage_dir(DATASET, stage) / shard_name("train", shard)
            write_stats(tar, {"sha256": write_tar(tar, samples), "samples": 5})
        manifest = _manifest(stage, 10, len(planted[stage]), layout.stage_dir(DATASET, stage), FD[stage])
        layout.manifest_path(DATASET, stage).parent.mkdir(parents=True, exist_ok=True)
        layout.manifest_path(DATASET, stage).write_text(json.dumps(manifest))
    layout.manifest_path(DATASET, "base").write_text(json.dumps(_manifest("base", 10, None, layout.base_dir(DATASET))))
    return layout, planted


def test_stats_table_matches_planted_scores(scored) -> None:
    layout, planted = scored
    result = run_stats(DATASET, layout)
    rows = {row["stage"]: row for row in result["rows"]}
    assert list(rows) == ["base", "eda", "randaug"]
    for stage, modality in (("eda", "text"), ("randaug", "image")):
        alignment = np.array([p["alignment"] for p in planted[stage]])
        row = rows[stage]
        assert row["modality"] == modality and row["variants"] == len(planted[stage])
        assert row["alignment_mean"] == pytest.approx(alignment.mean())
        assert row["alignment_p10"] == pytest.approx(np.quantile(alignment, 0.1))
        assert row["alignment_p90"] == pytest.approx(np.quantile(alignment, 0.9))
        assert row["diversity_mean"] == pytest.approx(np.mean([1 - p["src_sim"] for p in planted[stage]]))
        assert row["fd_image"] == FD[stage]["fd_image"] and row["fd_text"] == FD[stage]["fd_text"]
    assert rows["randaug"]["with_variants"] == 6  # index % 3 > 0 for 3 of 5 keys per shard
    assert "alignment_mean" not in rows["base"]
    out = layout.dataset_manifests(DATASET)
    assert json.loads((out / "stats.json").read_text())["rows"][1]["stage"] == "eda"
    markdown = (out / "stats.md").read_text()
    assert "| eda | text |" in markdown and "FD text" in markdown and "![frechet](plots/frechet.png)" in markdown
    for name in ("alignment_hist", "alignment_vs_diversity", "frechet"):
        assert (out / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # stats.json and filters are not mistaken for manifests on a second run
    run_filter(DATASET, FilterConfig(name="f", top_fraction=0.5), layout)
    assert [row["stage"] for row in run_stats(DATASET, layout)["rows"]] == ["base", "eda", "randaug"]


def test_threshold_filter_keeps_exactly_the_passing_variants(scored) -> None:
    layout, planted = scored
    shas = {p: sha256_file(p) for p in layout.shards_dir.rglob("*.tar")}
    result = run_filter(DATASET, FilterConfig(name="strict", min_alignment=0.3, max_shift=2.0), layout)
    keep = load_filter(filter_path(layout, DATASET, "strict"))
    for stage, variants in planted.items():
        expected = [p["alignment"] >= 0.3 and p["shift"] <= 2.0 for p in variants]
        assert [keep.keeps(stage, p["key"], p["index"]) for p in variants] == expected
        assert result["stages"][stage]["kept"] == sum(expected)
        assert result["stages"][stage]["dropped"] == len(variants) - sum(expected)
    assert keep.keeps("i2t-human", "any_key", 0)  # a stage the filter does not name keeps everything
    assert {p: sha256_file(p) for p in layout.shards_dir.rglob("*.tar")} == shas  # shards never rewritten


def test_shift_percentile_uses_the_originals_own_shift_per_modality(scored) -> None:
    layout, planted = scored
    result = run_filter(DATASET, FilterConfig(name="p", shift_percentile=50), layout)
    keep = load_filter(filter_path(layout, DATASET, "p"))
    for stage, limit in (("eda", 2.0), ("randaug", 1.0)):  # medians of the text / image reference tables
        assert result["stages"][stage]["shift_limit"] == pytest.approx(limit)
        assert [keep.keeps(stage, p["key"], p["index"]) for p in planted[stage]] == [
            p["shift"] <= limit for p in planted[stage]]


def test_top_fraction_per_stage_and_global(scored) -> None:
    layout, planted = scored
    per_stage = run_filter(DATASET, FilterConfig(name="top", top_fraction=0.3), layout)
    for stage, variants in planted.items():
        count = math.ceil(0.3 * len(variants))
        assert per_stage["stages"][stage]["kept"] == count
        best = sorted(variants, key=lambda p: -p["alignment"])[:count]
        kept = load_filter(find_filter("top", DATASET, layout))
        assert all(kept.keeps(stage, p["key"], p["index"]) for p in best)
    pooled = run_filter(DATASET, FilterConfig(name="top-global", top_fraction=0.3, scope="global"), layout)
    everything = [(stage, p) for stage, variants in planted.items() for p in variants]
    threshold = sorted((p["alignment"] for _, p in everything), reverse=True)[math.ceil(0.3 * len(everything)) - 1]
    for stage in planted:
        expected = sum(p["alignment"] >= threshold for p in planted[stage])
        assert pooled["stages"][stage]["kept"] == expected


def test_filter_refuses_bad_configs_and_unscored_stages(scored) -> None:
    layout, _ = scored
    for kwargs, message in ((dict(), "at least one"), (dict(top_fraction=0.0), "top_fraction"),
                            (dict(min_alignment=2.0), "min_alignment"), (dict(max_shift=1, scope="x"), "scope")):
        with pytest.raises(ValueError, match=message):
            FilterConfig(name="f", **kwargs)
    with pytest.raises(ValueError, match="no manifest"):
        run_filter(DATASET, FilterConfig(name="f", max_shift=1.0, stages=("t2i-sd",)), layout)
    unscored = [{"__key__": "k", "json": {"key": "k", "variants": [{"text": "t", "op": "x"}], "skipped": []}}]
    for tar in layout.stage_dir(DATASET, "eda").glob("*.tar"):  # as a stage without scores writes them
        write_stats(tar, {**read_stats(tar), "sha256": write_tar(tar, unscored)})
    assert not read_stage_scores("eda", layout.stage_dir(DATASET, "eda")).scored
    with pytest.raises(ValueError, match="no scores"):
        run_filter(DATASET, FilterConfig(name="f", max_shift=1.0), layout)


def test_cli_stats_and_filter(scored, monkeypatch) -> None:
    from pipeline.commands.cli import app

    layout, planted = scored
    env = {"MAT_SHARDS_DIR": str(layout.shards_dir), "MAT_MANIFESTS_DIR": str(layout.manifests_dir), "MAT_DATASET": DATASET}
    runner = CliRunner()
    out = runner.invoke(app, ["stats"], env=env)
    assert out.exit_code == 0, out.output
    assert "| randaug | image |" in out.output and "frechet.png" in out.output
    out = runner.invoke(app, ["filter"], env={**env, "MAT_FILTER": "cli", "MAT_TOP_FRACTION": "0.5", "MAT_FILTER_STAGES": "eda"})
    assert out.exit_code == 0, out.output
    assert f"eda: kept {len(planted['eda']) // 2} of {len(planted['eda'])}" in out.output
    assert set(json.loads(filter_path(layout, DATASET, "cli").read_text())["stages"]) == {"eda"}
    out = runner.invoke(app, ["filter"], env={**env, "MAT_FILTER": "bad"})
    assert out.exit_code != 0 and "at least one" in out.output


def test_filter_command_takes_a_config_file_and_set(scored, tmp_path) -> None:
    from pipeline.commands.cli import app

    layout, _ = scored
    (tmp_path / "filter.yaml").write_text("name: from-file\ntop_fraction: 0.9\nstages: [eda]\n")
    argv = ["--shards-dir", str(layout.shards_dir), "--manifests-dir", str(layout.manifests_dir), "filter",
            "--dataset", DATASET, "--config", str(tmp_path / "filter.yaml"), "--set", "top_fraction=0.5"]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    written = json.loads(filter_path(layout, DATASET, "from-file").read_text())
    assert written["config"]["top_fraction"] == 0.5 and list(written["stages"]) == ["eda"]
    # the file alone would be refused (no threshold): --set gives it
    (tmp_path / "bare.yaml").write_text("name: bare\n")
    assert CliRunner().invoke(app, argv[:7] + ["--config", str(tmp_path / "bare.yaml")]).exit_code == 2
    result = CliRunner().invoke(app, argv[:7] + ["--config", str(tmp_path / "bare.yaml"), "--set", "max_shift=5"])
    assert result.exit_code == 0, result.output


def test_frechet_figure_has_a_panel_per_modality_and_shows_zeros_and_gaps() -> None:
    """Image and text distances on panels of their own (own y scales), each bar's value written, a distance of
    0 drawn and written (i2t-human's text: the other human captions), n/a where a stage has no distance."""
    from pipeline.core.figures import NA, pyplot
    from pipeline.curate.stats import frechet_figure

    fd = {"base": (None, None), "i2t-human": (None, 0.0), "eda": (None, 0.0213), "randaug": (0.352, None),
          "t2i-sd": (1.91, None)}
    rows = [{"stage": stage, "fd_image": image, "fd_text": text} for stage, (image, text) in fd.items()]
    fig = frechet_figure(rows)
    try:
        image, text = fig.axes
        assert "image" in image.get_ylabel() and "text" in text.get_ylabel()
        assert not image.get_shared_y_axes().joined(image, text)
        assert image.get_ylim()[1] > 1.91 and text.get_ylim()[1] < 0.1  # each on its own scale
        for ax in (image, text):
            assert [t.get_text() for t in ax.get_xticklabels()] == ["i2t-human", "eda", "randaug", "t2i-sd"]
        assert [t.get_text() for t in image.texts] == [NA, NA, "0.3520", "1.9100"]
        assert [t.get_text() for t in text.texts] == ["0.0000", "0.0213", NA, NA]
        assert [p.get_height() for p in text.patches] == [0.0213]  # the zero is no bar of height 0 ...
        zero = [c.get_segments()[0] for c in text.collections if len(c.get_segments()) == 1]
        assert zero and np.allclose(zero[0][:, 1], 0) and np.allclose(zero[0][:, 0], [-0.3, 0.3])  # a line at 0
    finally:
        pyplot().close(fig)
