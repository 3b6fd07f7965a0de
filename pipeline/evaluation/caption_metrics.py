"""Caption metrics as the COCO caption evaluation computes them (pycocoevalcap 1.2, the ``captioning`` extra):
BLEU-4, METEOR, ROUGE-L and CIDEr(-D) of one generated caption per image against all its reference captions,
after PTB tokenisation (lower case, punctuation removed), reported x 100 as BLIP and SGA report them.

* Tokenisation: pycocoevalcap's ``PTBTokenizer`` (Stanford CoreNLP 3.4.1 through ``java``) when a ``java`` is on
  the PATH; otherwise :func:`ptb_tokenize`, a pure-Python equivalent of what that tokenizer does to captions (a
  test checks the two agree on a fixture of caption punctuation, contractions, brackets and numbers, where java
  exists; rarer cases, such as abbreviations other than dotted initials, may differ).
* BLEU-4, ROUGE-L, CIDEr: pycocoevalcap's pure-Python scorers. CIDEr is CIDEr-D (clipped n-gram counts, a
  Gaussian length penalty, x 10) with document frequencies from the evaluated images' references, so an image's
  score depends on the other images in the set.
* METEOR: pycocoevalcap's ``meteor-1.5.jar`` (java; one process per scorer, about 20 s to load its paraphrase
  table); without java, or turned off, it is None and a note says why.
* SPICE: not computed. pycocoevalcap's SPICE needs the Stanford CoreNLP 3.6.0 jars, which its
  ``spice/get_stanford_models.py`` downloads from nlp.stanford.edu on first use (they are not in the pip package,
  nor on a package registry); offline it cannot run. None, with that note.
"""

from __future__ import annotations

import re
import shutil
from typing import Any

METRICS = ("bleu4", "meteor", "rouge_l", "cider", "spice")
# pycocoevalcap/tokenizer/ptbtokenizer.py PUNCTUATIONS: the tokens removed after tokenising (its bracket names are
# upper case, but CoreNLP run with -lowerCase writes -lrb- etc., which therefore stay: so do ours).
PUNCTUATIONS = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"}
SPICE_NOTE = ("SPICE not computed: pycocoevalcap's SPICE needs the Stanford CoreNLP 3.6.0 jars, which "
              "spice/get_stanford_models.py downloads from nlp.stanford.edu on first use (not in the pip package)")
METEOR_NOTE = "METEOR not computed: it runs pycocoevalcap's meteor-1.5.jar, and no java is on the PATH"
PYTHON_TOKENIZER_NOTE = "captions tokenised by the pure-Python PTB equivalent (no java for Stanford's PTBTokenizer)"

_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_SPLIT_ALWAYS = re.compile(r"\.\.\.|--|[;!?`]")
_COMMA_OR_COLON = re.compile(r"(?<!\d)[,:]|[,:](?!\d)")  # 1,000 and 5:30 stay whole
_CONTRACTION = re.compile(r"(n't|'s|'re|'ve|'d|'ll|'m)$")
_INITIALS = re.compile(r"([a-z]\.)+")  # u.s. p.m.: PTB keeps their final period


def java_available() -> bool:
    return shutil.which("java") is not None


def ptb_tokenize(text: str) -> str:
    """A caption as pycocoevalcap's PTBTokenizer (CoreNLP, ``-lowerCase``) plus its punctuation filter leaves it:
    lower case, punctuation split off and removed, contractions split (``isn't`` -> ``is n't``, ``man's`` ->
    ``man 's``), brackets named (``-lrb-``), tokens joined by single spaces."""
    text = text.lower().replace("\n", " ").replace('"', " '' ")
    for bracket, name in _BRACKETS.items():
        text = text.replace(bracket, f" {name} ")
    text = _COMMA_OR_COLON.sub(lambda m: f" {m.group(0)} ", _SPLIT_ALWAYS.sub(lambda m: f" {m.group(0)} ", text))
    tokens: list[str] = []
    for word in text.split():
        tokens += _split_word(word)
    return " ".join(t for t in tokens if t not in PUNCTUATIONS)


def _split_word(word: str) -> list[str]:
    lead, tail = [], []
    while len(word) > 1 and word[0] == "'" and not _CONTRACTION.fullmatch(word):
        lead.append("'")
        word = word[1:]
    while len(word) > 1 and word[-1] in ".'" and not _INITIALS.fullmatch(word):
        tail.insert(0, word[-1])
        word = word[:-1]
    match = _CONTRACTION.search(word)
    if match and match.start() > 0:
        return lead + [word[:match.start()], match.group(0)] + tail
    return lead + [word] + tail


def tokenize(captions: dict[int, list[str]], java: bool) -> dict[int, list[str]]:
    """{image: [caption]} tokenised by Stanford's PTBTokenizer (java) or :func:`ptb_tokenize`."""
    if java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})
    return {k: [ptb_tokenize(c) for c in v] for k, v in captions.items()}


class CaptionScorer:
    """Scores candidate captions against fixed references (tokenised once): ``references[i]`` are image i's."""

    def __init__(self, references: list[list[str]], java: bool | None = None, meteor: bool = True):
        if not references or any(not refs for refs in references):
            raise ValueError("every image needs at least one reference caption")
        self.java = java_available() if java is None else java
        self.meteor = meteor and self.java
        self._meteor = None  # one METEOR process for every score() call: it loads its paraphrase table (~20 s)
        self.references = tokenize(dict(enumerate(references)), self.java)
        self.notes = [SPICE_NOTE] + ([] if self.java else [METEOR_NOTE, PYTHON_TOKENIZER_NOTE])
        if self.java and not meteor:
            self.notes.append("METEOR not computed: turned off (CAPTION_METEOR=0)")

    def score(self, candidates: list[str]) -> dict[str, Any]:
        """Corpus metrics x 100 (``bleu4``, ``meteor``, ``rouge_l``, ``cider``; ``spice`` None) and ``per_image``:
        each image's sentence-level scores x 100 (CIDEr-D's with the set's document frequencies)."""
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge

        if len(candidates) != len(self.references):
            raise ValueError(f"{len(candidates)} candidate captions for {len(self.references)} images")
        # an empty caption tokenises to "", which the scorers take; PTBTokenizer needs a line for it
        res = tokenize({i: [c if c.strip() else "."] for i, c in enumerate(candidates)}, self.java)
        gts = self.references
        bleu, bleu_per = Bleu(4).compute_score(gts, res, verbose=0)
        rouge, rouge_per = Rouge().compute_score(gts, res)
        cider, cider_per = Cider().compute_score(gts, res)
        out: dict[str, Any] = {"bleu4": 100 * bleu[3], "meteor": None, "rouge_l": 100 * float(rouge),
                               "cider": 100 * float(cider), "spice": None}
        per_image = {"bleu4": [100 * s for s in bleu_per[3]], "rouge_l": [100 * float(s) for s in rouge_per],
                     "cider": [100 * float(s) for s in cider_per]}
        if self.meteor:
            from pycocoevalcap.meteor.meteor import Meteor

            self._meteor = self._meteor or Meteor()
            meteor, meteor_per = self._meteor.compute_score(gts, res)
            out["meteor"], per_image["meteor"] = 100 * meteor, [100 * s for s in meteor_per]
        out["per_image"] = {k: [round(v, 4) for v in values] for k, values in per_image.items()}
        return out
