"""EDA: Easy Data Augmentation (Wei & Zou, EMNLP 2019) of captions, through nlpaug, fully offline.

Four operations, each changing about ``alpha`` of the words (at least one; nlpaug's rule ceil(alpha * tokens)):
synonym replacement with WordNet (nlpaug ``SynonymAug``), random swap and random deletion (nlpaug
``RandomWordAug``), and random insertion of a WordNet synonym of a word of the caption (``WordNetInsertion``
below: nlpaug's ``RandomWordAug(action="insert")`` raises NotImplementedError and its other inserters need
embeddings or a language model). Variant j of caption c uses ``ops[j % len(ops)]``, so the default four
variants are one of each operation, as in the EDA paper's generator.

WordNet and the POS tagger SynonymAug needs are prepared offline by ``make setup`` (pipeline/augment/wordnet.py:
Debian's WordNet 3.0 and Lingua::EN::Tagger lexicon, or without root WordNet 3.0 from npm and textblob's Brill
lexicon; the same WordNet synonyms, different taggers, so the manifest records which and the settings fingerprint
says when it is not the Debian pair); ``nltk.download`` is made to fail loudly.
nlpaug has no seed argument: Python's global RNG is seeded per variant from
``seed_for(key, c * variants_per_caption + j)`` (numpy's too for an augmenter marked ``uses_numpy``; none of
nlpaug's word augmenters used here draws from numpy, which a test checks). That exact seeding has a floor of
about 6 us a variant on a Sapphire Rapids core (``random.seed``'s Mersenne Twister initialisation, then the
624-word twist of the first draw), some 10 % of an nlpaug call; the rest of the stage's work per caption is a
regex match and a hash copy per variant.

A variant that equals its caption (nothing to swap, no WordNet synonym, ...) or an earlier variant of the same
caption is recorded in ``skipped`` with the reason, never emitted.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, Protocol

import numpy as np

from pipeline.augment import wordnet
from pipeline.core.config import check_choices, check_positive, check_range
from pipeline.augment.stage import BaseSample, SampleResult, Stage, StageContext, Variant

log = logging.getLogger(__name__)

# Words are runs of letters/digits joined by inner apostrophes or hyphens ("man's", "black-and-white");
# every other non-space character is a token of its own. Unicode-aware.
_WORD = r"[^\W_]+(?:['’\-][^\W_]+)*"
_TOKEN = re.compile(_WORD + r"|[^\w\s]|_")
_SPACE_BEFORE = re.compile(r"\s+([.,!?;:%)\]}])")
_SPACE_AFTER = re.compile(r"([(\[{])\s+")
# A caption already in detokenized form: words joined by one space, with closing punctuation only right after
# a word ("fruit, carrots."), which is how detokenize writes it.
_CLOSING = r"[.,!?;:%)\]}]"
_PLAIN = re.compile(rf"({_WORD}(?:{_CLOSING}* {_WORD})*)({_CLOSING}*)")
_AUXILIARIES = frozenset("be am is are was were been being have has had having do does did".split())


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text)


def detokenize(tokens: Sequence[str]) -> str:
    return _SPACE_AFTER.sub(r"\1", _SPACE_BEFORE.sub(r"\1", " ".join(t for t in tokens if t))).strip()


def is_word(token: str) -> bool:
    # A token of _TOKEN is a word exactly when it starts with a letter or digit.
    return token[:1].isalnum()


class CaptionParts(NamedTuple):
    words: int                  # number of word tokens
    body: str                   # the caption up to its last word, detokenized: what the operations act on
    original: str               # the whole caption, detokenized
    tail: str | None            # original after body, when appending it to an output reproduces detokenize
    closing: tuple[str, ...]    # the tokens after the last word


def split_caption(caption: str) -> CaptionParts:
    """The caption cut before its closing punctuation. Captions already in detokenized form (most) take a
    single regex match instead of tokenize + two detokenize calls; the result is the same (a test checks)."""
    text = caption.strip()  # detokenize strips too
    plain = _PLAIN.fullmatch(text)
    if plain:  # every separator holds exactly one space, so the words are the spaces + 1
        return CaptionParts(plain[1].count(" ") + 1, plain[1], text, plain[2], tuple(plain[2]))
    tokens = tokenize(caption)
    words = [i for i, t in enumerate(tokens) if is_word(t)]
    end = words[-1] + 1 if words else 0
    body, original = detokenize(tokens[:end]), detokenize(tokens)
    tail = original[len(body):] if original.startswith(body) else None
    return CaptionParts(len(words), body, original, tail, tuple(tokens[end:]))


class TextAugmenter(Protocol):
    action: str  # nlpaug's name of the method that does one augmentation: str -> str

    def augment(self, data: str) -> list[str]: ...


class WordNetInsertion:
    """EDA random insertion: insert a random WordNet synonym of a random content word at a random position,
    ceil(aug_p * tokens) times (at least once). Same calling convention as nlpaug augmenters."""

    def __init__(self, wordnet: Any, aug_p: float, stopwords: frozenset[str]):
        self.wordnet, self.aug_p, self.stopwords = wordnet, aug_p, stopwords
        self._cache: dict[str, list[str]] = {}  # caption vocabularies are small: look each word up once

    def synonyms(self, word: str) -> list[str]:
        low = word.lower()
        if low not in self._cache:
            self._cache[low] = self._lookup(low)
        return self._cache[low]

    def _lookup(self, low: str) -> list[str]:
        same = {low, (self.wordnet.morphy(low) or low)}
        names = {lemma.name() for synset in self.wordnet.synsets(low) for lemma in synset.lemmas()}
        # Sorted: set order depends on the hash seed, and the output must not.
        return sorted(n.replace("_", " ").lower() for n in names if n.lower() not in same)

    action = "insert"

    def augment(self, data: str) -> list[str]:
        return [self.insert(data)]

    def insert(self, data: str) -> str:
        tokens = tokenize(data)
        choices = {t for t in tokens if is_word(t) and t.lower() not in self.stopwords}
        pool = [(t, syns) for t in sorted(choices) if (syns := self.synonyms(t))]
        if not pool:
            return data
        # Insert only among the words, before any closing punctuation.
        end = max(i for i, t in enumerate(tokens) if is_word(t)) + 1
        for _ in range(max(1, math.ceil(self.aug_p * len(tokens)))):
            _, syns = random.choice(pool)
            position = random.randint(0, end)
            tokens.insert(position, random.choice(syns))
            end += 1
        return detokenize(tokens)


# op name -> (builder of its augmenter, reason recorded when it leaves the caption unchanged)
def _synonym(stage: EDAStage) -> TextAugmenter:
    import nlpaug.augmenter.word as naw

    aug = naw.SynonymAug(aug_src="wordnet", aug_p=stage.config.alpha, aug_min=1, aug_max=None,
                         stopwords=stage.stopwords, tokenizer=tokenize, reverse_tokenizer=detokenize)
    aug.model.pos_tag = stage.tagger.tag  # instead of nltk.pos_tag, whose model we cannot download
    return aug


def _random_word(action: str) -> Callable[[EDAStage], TextAugmenter]:
    def build(stage: EDAStage) -> TextAugmenter:
        import nlpaug.augmenter.word as naw

        return naw.RandomWordAug(action=action, aug_p=stage.config.alpha, aug_min=1, aug_max=None,
                                 tokenizer=tokenize, reverse_tokenizer=detokenize)
    return build


def _insert(stage: EDAStage) -> TextAugmenter:
    return WordNetInsertion(stage.wordnet, stage.config.alpha, stage.stopwords)


@dataclass(frozen=True)
class Op:
    build: Callable[[EDAStage], TextAugmenter]
    min_words: int   # captions with fewer words are skipped with reason "fewer than N words"
    unchanged: str   # reason recorded when the augmenter returns the caption unchanged
    uses_numpy: bool = False  # whether it draws from numpy's global RNG (then seeded per variant too)


OPS: dict[str, Op] = {
    "synonym": Op(_synonym, 1, "no WordNet synonym for the chosen words"),
    "insert": Op(_insert, 1, "no WordNet synonym for any word"),
    "swap": Op(_random_word("swap"), 2, "unchanged by swap"),
    "delete": Op(_random_word("delete"), 2, "unchanged by delete"),
}


_TAGGERS = {
    "lingua": "bigram HMM (Viterbi) over the Lingua::EN::Tagger lexicon",
    "brill": "Brill's rules over textblob's English lexicon (textblob's find_tags)",
}


class KeySeeds:
    """``Stage.seed_for(key, v)`` for the variants of one key, cheaper: the SHA-256 of the parts that repeat
    (dataset, stage name, key) is computed once and copied per variant; the hashed bytes are exactly
    ``pipeline.core.seeding.derive_seed``'s (a test compares the two)."""

    def __init__(self, stage: Stage, key: str):
        self._hash = hashlib.sha256(f"{stage.context.dataset}\x1f{stage.name}\x1f{key}\x1f".encode())
        self._suffix = f"\x1f{stage.context.seed}".encode()

    def __call__(self, variant: int) -> int:
        h = self._hash.copy()
        h.update(b"%d%s" % (variant, self._suffix))
        return int.from_bytes(h.digest()[:8], "big") >> 1


class _Slot(NamedTuple):
    """What variant j of every caption runs, resolved once in setup so the per-variant loop does no lookups."""

    op: str                        # "eda:<op>", as recorded
    action: Callable[[str], str]   # the augmenter's action method (what augment(text) runs once)
    min_words: int
    too_short: str                 # skip reason for captions with fewer than min_words words
    unchanged: str
    uses_numpy: bool


class EDAStage(Stage):
    name: ClassVar[str] = "eda"
    modality: ClassVar[str] = "text"

    @dataclass(frozen=True)
    class Config:
        batch_size: int = 64
        variants_per_caption: int = 4
        alpha: float = 0.1
        ops: tuple[str, ...] = ("synonym", "insert", "swap", "delete")
        primary_only: bool = False  # augment only the primary caption of each image
        max_words: int = 200        # longer captions are skipped (CLIP reads 77 tokens anyway)

        def __post_init__(self) -> None:
            check_positive(self, "batch_size", "variants_per_caption", "alpha", "max_words")
            check_range("alpha", self.alpha, 0.0, 1.0)
            if not self.ops:
                raise ValueError("ops: give at least one operation")
            check_choices("ops", self.ops, sorted(OPS))

    def __init__(self, config: EDAStage.Config, context: StageContext):
        super().__init__(config, context)
        self.augmenters: dict[str, TextAugmenter] = {}

    @classmethod
    def availability(cls, config: Any = None) -> tuple[bool, str]:
        return wordnet.availability()

    @classmethod
    def resource_settings(cls, config: Any = None) -> dict[str, Any]:
        return wordnet.resource_settings()

    def setup(self) -> None:
        self.wordnet = wordnet.load_wordnet()
        self.tagger = wordnet.load_tagger()
        words = self.tagger.function_words | _AUXILIARIES
        self.stopwords = frozenset(words | {w.capitalize() for w in words})
        self.augmenters = {op: OPS[op].build(self) for op in dict.fromkeys(self.config.ops)}
        # The action method itself, without augment()'s per-call validation and retry wrapper: same output for
        # the same RNG state, less overhead.
        ops = [self.config.ops[j % len(self.config.ops)] for j in range(self.config.variants_per_caption)]
        self._slots = tuple(_Slot(f"eda:{op}", getattr(self.augmenters[op], self.augmenters[op].action),
                                  OPS[op].min_words, f"fewer than {OPS[op].min_words} words", OPS[op].unchanged,
                                  OPS[op].uses_numpy) for op in ops)

    def describe(self) -> dict[str, Any]:
        return {
            "nlpaug": importlib.metadata.version("nlpaug"),
            "nltk": importlib.metadata.version("nltk"),
            "text_data": wordnet.resources(),  # route, WordNet version and source, tagger lexicon and source
            "wordnet": wordnet.resources()["wordnet"].get("version", "unknown"),
            "pos_tagger": _TAGGERS[wordnet.resources()["tagger"]["kind"]],
            "stopwords": "closed-class words of the tagger's lexicon + forms of be/have/do",
            "insert": "WordNetInsertion (EDA random insertion; nlpaug has none)",
        }

    def augment_batch(self, samples: list[BaseSample]) -> list[SampleResult]:
        if not self.augmenters:
            self.setup()
        return [self.augment_sample(s) for s in samples]

    def augment_sample(self, sample: BaseSample) -> SampleResult:
        result = SampleResult()
        primary = int(sample.meta.get("primary", 0))
        indices = [primary] if self.config.primary_only else range(len(sample.captions))
        seeds = KeySeeds(self, sample.key)
        for c in indices:
            self._augment_caption(seeds, c, sample.captions[c], result)
        return result

    def _augment_caption(self, seeds: KeySeeds, c: int, caption: str, result: SampleResult) -> None:
        # Closing punctuation stays at the end: the operations act on the words before it.
        words, body, original, tail, closing = split_caption(caption)
        reason = ("empty caption" if not caption.strip() else "no words (punctuation only)" if not words
                  else f"caption too long: over max_words={self.config.max_words}"
                  if words > self.config.max_words else None)
        seen = {original}
        first = c * len(self._slots)
        for j, (op, action, min_words, too_short, unchanged, uses_numpy) in enumerate(self._slots):
            why = reason or (too_short if words < min_words else None)
            if why is None:
                seed = seeds(first + j)
                random.seed(seed)
                if uses_numpy:
                    np.random.seed(seed % 2**32)
                text = action(body)
                text = text + tail if tail is not None else detokenize([text, *closing])
                why = unchanged if text == original else "duplicate of an earlier variant" if text in seen else None
            if why is not None:
                result.skipped.append({"caption_index": c, "variant": j, "op": op, "reason": why})
                continue
            seen.add(text)
            result.variants.append(Variant(seed=seed, op=op, caption_index=c, text=text))
