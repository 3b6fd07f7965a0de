"""`hf` and `wds` sources: coco-mini through both gives the coco shards byte for byte; bad inputs; `limit`."""

from __future__ import annotations

import io
import json
from collections import defaultdict
from pathlib import Path

import pytest
from PIL import Image

from pipeline.data.ingest import IngestConfig, run_ingest
from pipeline.core.paths import Layout
from pipeline.core.shards import list_shards, write_tar
from pipeline.core.fileio import sha256_file
from pipeline.data.sources import SourceError, detect_format

COCO_MINI = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-mini"
needs_coco = pytest.mark.skipif(not COCO_MINI.exists(), reason="needs ../shared/data/coco-mini")
HF_SPLIT = {"train": "train", "val": "validation"}


def jpeg(colour: tuple[int, int, int], size: tuple[int, int] = (12, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def shard_digests(layout: Layout, dataset: str) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in list_shards(layout.base_dir(dataset))}


def ingest(tmp_path: Path, dataset: str, **kwargs) -> tuple[Layout, dict]:
    layout = Layout(tmp_path / "shards", tmp_path / "manifests")
    return layout, run_ingest(IngestConfig(dataset=dataset, shard_size=32, **kwargs), layout)


@pytest.fixture(scope="module")
def coco_rows() -> dict[str, list[dict]]:
    """coco-mini as HF rows per split: id, image path (as the coco reader forms it), captions in file order."""
    rows: dict[str, list[dict]] = {}
    for split, hf_split in HF_SPLIT.items():
        data = json.loads((COCO_MINI / "annotations" / f"captions_{split}2017.json").read_text())
        captions = defaultdict(list)
        for annotation in data["annotations"]:
            captions[annotation["image_id"]].append(annotation["caption"])
        rows[hf_split] = [{"id": image["id"], "image": str(COCO_MINI / f"{split}2017" / image["file_name"]),
                           "captions": captions[image["id"]]} for image in data["images"]]
    return rows


@pytest.fixture(scope="module")
def coco_shards(tmp_path_factory) -> tuple[Layout, dict[str, str]]:
    layout, _ = ingest(tmp_path_factory.mktemp("coco"), "coco", data_root=COCO_MINI, fmt="coco")
    return layout, shard_digests(layout, "coco")


@needs_coco
def test_hf_save_to_disk_list_captions_gives_the_coco_shards(coco_rows, coco_shards, tmp_path):
    import datasets

    folder = tmp_path / "coco-hf"
    datasets.DatasetDict({s: datasets.Dataset.from_list(r) for s, r in coco_rows.items()}).save_to_disk(str(folder))
    assert detect_format(folder) == "hf"
    layout, manifest = ingest(tmp_path, "cocohf", data_root=folder, fmt="hf", id_column="id", id_prefix="coco")
    assert manifest["counts"] == {"input": 159, "written": 159, "skipped": 0}
    assert shard_digests(layout, "cocohf") == coco_shards[1] and len(coco_shards[1]) == 6


@needs_coco
def test_hf_parquet_one_row_per_caption_gives_the_coco_shards(coco_rows, coco_shards, tmp_path):
    import datasets

    folder = tmp_path / "coco-parquet"
    folder.mkdir()
    for split, rows in coco_rows.items():
        # Caption-major order: one image's rows are far apart, and grouping must gather them in order.
        flat = [{"image_id": r["id"], "path": r["image"], "text": r["captions"][c]} for c in range(5) for r in rows]
        datasets.Dataset.from_list(flat).to_parquet(str(folder / f"{split}-00000-of-00001.parquet"))
    assert detect_format(folder) == "hf"
    layout, _ = ingest(tmp_path, "cocopq", data_root=folder, fmt="hf", image_column="path", caption_column="text",
                       id_column="image_id", id_prefix="coco")
    assert shard_digests(layout, "cocopq") == coco_shards[1]


@needs_coco
def test_wds_of_our_own_base_shards_gives_them_again(coco_shards, tmp_path):
    layout, digests = coco_shards
    assert detect_format(layout.base_dir("coco")) == "wds"
    again, manifest = ingest(tmp_path, "cocowds", data_root=layout.base_dir("coco"), fmt="wds")
    assert manifest["counts"]["written"] == 159
    assert shard_digests(again, "cocowds") == digests
    with pytest.raises(ValueError, match="inside the output"):  # would overwrite the shards it reads
        run_ingest(IngestConfig(dataset="coco", data_root=layout.base_dir("coco"), fmt="wds"), layout)


def test_hf_embedded_images_and_row_per_caption_grouping(tmp_path):
    import datasets

    rows = [{"image": {"bytes": jpeg((200, 0, 0)), "path": "red.jpg"}, "caption": "a red square"},
            {"image": {"bytes": jpeg((0, 0, 200)), "path": "blue.jpg"}, "caption": "a blue square"},
            {"image": {"bytes": jpeg((200, 0, 0)), "path": "red.jpg"}, "caption": "red, filled"},
            {"image": {"bytes": jpeg((0, 200, 0)), "path": "red.jpg"}, "caption": "green, though named red"}]
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    datasets.Dataset.from_list(rows, features=features).save_to_disk(str(tmp_path / "ds"))
    layout, manifest = ingest(tmp_path, "emb", data_root=tmp_path / "ds", fmt="hf")
    # Same bytes: one image; another image under the same (base) file name: a different one, with its own id.
    assert manifest["counts"] == {"input": 3, "written": 3, "skipped": 0}
    assert manifest["stats"]["captions"] == {"input": 4, "written": 4, "skipped": 0}
    samples = [json.loads(s["json"]) for tar in list_shards(layout.base_dir("emb")) for s in _read(tar)]
    by_id = {m["image_id"]: m["captions"] for m in samples}
    green = next(i for i in by_id if i.startswith("hfred-"))
    assert by_id == {"hfred": ["a red square", "red, filled"], "hfblue": ["a blue square"],
                     green: ["green, though named red"]}


def _read(tar: Path) -> list[dict]:
    from pipeline.core.shards import read_tar

    return read_tar(tar)


def test_hf_missing_column_names_it_and_the_columns_there(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"picture": "a.jpg", "label": 3}]).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(SourceError, match=r"no image column 'image'.*\['picture', 'label'\].*IMAGE_COLUMN"):
        ingest(tmp_path, "bad", data_root=tmp_path / "ds", fmt="hf")
    with pytest.raises(SourceError, match=r"no caption column 'words'.*\['picture', 'label'\].*CAPTION_COLUMN"):
        ingest(tmp_path, "bad", data_root=tmp_path / "ds", fmt="hf", image_column="picture", caption_column="words")


def test_hf_paths_that_do_not_exist_are_recorded_skips(tmp_path):
    import datasets

    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "there.jpg").write_bytes(jpeg((0, 150, 0)))
    rows = [{"file": "img/there.jpg", "captions": ["a green square", "green"]},
            {"file": "img/gone.jpg", "captions": ["a lost picture"]},
            {"file": str(tmp_path / "nowhere.jpg"), "captions": ["another"]}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "pairs.parquet"))
    _, manifest = ingest(tmp_path, "paths", data_root=tmp_path / "pairs.parquet", image_column="file")
    assert manifest["counts"] == {"input": 3, "written": 1, "skipped": 2}
    reasons = {Path(s["source"]).name: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == {"gone.jpg", "nowhere.jpg"}
    assert all(r.startswith("missing image file") for r in reasons.values())
    captions = manifest["stats"]["captions"]
    assert captions == {"input": 4, "written": 2, "skipped": 2}


def test_wds_img2dataset_failed_rows_and_missing_captions(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    def meta(key: str, status: str = "success", caption: str | None = "a photo", error_message=None) -> dict:
        return {"key": key, "status": status, "caption": caption, "url": f"http://x/{key}.jpg",
                "error_message": error_message}

    samples = [
        {"__key__": "000000000", "jpg": jpeg((9, 9, 9)), "txt": "a photo", "json": meta("000000000")},
        {"__key__": "000000001", "jpg": jpeg((9, 9, 90)), "json": meta("000000001", caption=None)},  # no caption
        {"__key__": "000000002", "jpg": jpeg((9, 90, 9)), "txt": "x", "json": meta("000000002", status="failed_to_resize",
                                                                              error_message="too small")},
        {"__key__": "000000003", "png": _png(), "txt": "a png\nwith a newline"},  # plain WebDataset sample
        {"__key__": "000000004", "txt": "no image here"},
    ]
    folder = tmp_path / "img2dataset"
    write_tar(folder / "00000.tar", samples)
    (folder / "00000_stats.json").write_text("{}")
    rows = [meta(f"00000000{i}") for i in range(5)] + [
        meta("000000005", status="failed_to_download", error_message="HTTP 404"), meta("000000006", status="failed_to_download")]
    pq.write_table(pa.Table.from_pylist(rows), folder / "00000.parquet")
    assert detect_format(folder) == "wds"
    layout, manifest = ingest(tmp_path, "i2d", data_root=folder)
    assert manifest["counts"] == {"input": 7, "written": 2, "skipped": 5}
    reasons = sorted(s["reason"] for s in manifest["skipped"])
    assert reasons == ["img2dataset status 'failed_to_download'", "img2dataset status 'failed_to_download': HTTP 404",
                       "img2dataset status 'failed_to_resize': too small", "no caption", "no image member (jpg/jpeg/png/webp)"]
    written = {json.loads(s["json"])["image_id"]: json.loads(s["json"]) for t in list_shards(layout.base_dir("i2d"))
               for s in _read(t)}
    assert set(written) == {"wds000000000", "wds000000003"}
    assert written["wds000000003"]["captions"] == ["a png with a newline"]
    assert written["wds000000000"]["source"] == "http://x/000000000.jpg"


def test_wds_one_bad_json_member_is_a_skip_not_the_end_of_the_ingest(tmp_path):
    samples = [
        {"__key__": "a", "jpg": jpeg((9, 9, 9)), "txt": "a photo"},
        {"__key__": "b", "jpg": jpeg((9, 9, 90)), "json": b'{"caption": "caf\xe9"}'},  # not UTF-8
        {"__key__": "c", "jpg": jpeg((9, 90, 9)), "json": b"[" * 100_000},  # nested too deep
        {"__key__": "d", "jpg": jpeg((90, 9, 9)), "txt": "another photo"},
    ]
    write_tar(tmp_path / "in" / "00000.tar", samples)
    _, manifest = ingest(tmp_path, "bad", data_root=tmp_path / "in")
    assert manifest["counts"] == {"input": 4, "written": 2, "skipped": 2}
    assert [s["source"] for s in manifest["skipped"]] == [f"{tmp_path / 'in' / '00000.tar'}#{k}" for k in "bc"]
    assert all(s["reason"].startswith("malformed json member") for s in manifest["skipped"])


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (9, 7), (1, 200, 3)).save(buffer, format="PNG")
    return buffer.getvalue()


@needs_coco
@pytest.mark.parametrize("fmt", ["coco", "hf"])
def test_limit_takes_the_first_images_and_a_new_limit_redoes_the_plan(fmt, coco_rows, tmp_path):
    import datasets

    root = COCO_MINI
    if fmt == "hf":
        root = tmp_path / "coco-hf"
        datasets.DatasetDict({s: datasets.Dataset.from_list(r) for s, r in coco_rows.items()}).save_to_disk(str(root))
    options = dict(data_root=root, fmt=fmt, id_column="id" if fmt == "hf" else None)
    layout, manifest = ingest(tmp_path, "lim", limit=10, **options)
    assert manifest["counts"]["input"] == 10 and manifest["config"]["limit"] == 10
    first = [f"coco{r['id']}" if fmt == "coco" else f"hf{r['id']}" for r in coco_rows["train"][:10]]
    ids = [json.loads(s["json"])["image_id"] for t in list_shards(layout.base_dir("lim")) for s in _read(t)]
    assert sorted(ids) == sorted(first)
    _, manifest = ingest(tmp_path, "lim", limit=90, **options)
    assert manifest["counts"]["input"] == 90 and manifest["stats"]["splits"] == {"train": 80, "val": 10}


def test_hf_hub_id_not_in_the_cache_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty cache
    with pytest.raises(SourceError, match=r"no-such-user/no-such-dataset.*local HF cache \(offline\)"):
        ingest(tmp_path, "hub", data_root=Path("no-such-user/no-such-dataset"), fmt="hf")


def test_cli_ingest_hf_with_limit(tmp_path, monkeypatch):
    import datasets
    from typer.testing import CliRunner

    from pipeline.commands.cli import app

    rows = [{"img": {"bytes": jpeg((10 * i, 0, 0)), "path": f"p{i}.jpg"}, "text": f"picture {i}"} for i in range(6)]
    features = datasets.Features({"img": datasets.Image(), "text": datasets.Value("string")})
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(tmp_path / "data.parquet"))
    monkeypatch.setenv("MAT_SHARDS_DIR", str(tmp_path / "shards"))
    monkeypatch.setenv("MAT_MANIFESTS_DIR", str(tmp_path / "manifests"))
    env = {"MAT_FORMAT": "hf", "MAT_DATA_ROOT": str(tmp_path / "data.parquet"), "MAT_IMAGE_COLUMN": "img", "MAT_CAPTION_COLUMN": "text",
           "MAT_LIMIT": "4"}
    result = CliRunner().invoke(app, ["ingest", "--dataset", "tiny"], env=env)
    assert result.exit_code == 0, result.output
    assert "4 written, 0 skipped of 4 input" in result.output
    fallback = CliRunner().invoke(app, ["ingest", "--dataset", "tiny"], env={**env, "MAT_CAPTION_COLUMN": "caption_en"})
    assert fallback.exit_code == 0 and "4 written" in fallback.output  # 'text' is a fallback caption column
    missing = CliRunner().invoke(app, ["ingest", "--dataset", "tiny"], env={**env, "MAT_IMAGE_COLUMN": "picture"})
    assert missing.exit_code == 2 and "no image column 'picture'" in missing.output and "['img', 'text']" in missing.output
