"""BERT-Attack on CLIP captions, batched over the whole batch.

Li et al., "BERT-ATTACK: Adversarial Attack Against BERT Using BERT" (EMNLP 2020), in the form Co-Attack
(Zhang et al. 2022) and SGA (Lu et al. 2023) use against vision-language models:

1. word importance: each word is removed in turn and the goal is scored on every such variant (all variants of
   the whole batch go through the CLIP text encoder in a few chunked forwards); the word whose removal helps the
   attacker most is the most important;
2. candidates: the masked LM reads the *unmasked* caption once and proposes its top-k (default 10) tokens at
   each word's position; sub-word pieces (``##x``), non-words, stop words and the original word are dropped;
3. the ``n_words`` (default 1) most important words that have candidates are replaced one after another, each by
   the candidate that maximises the goal (all candidates of the batch scored in chunked forwards).

Goal: a callable ``goal(text_emb [N, D] L2-normalised, owner [N] long) -> score [N]``, higher = more
adversarial, where ``owner`` indexes the attacked texts. :func:`image_similarity_goal` (lower the cosine to the
paired image; the default use, and SGA's guidance) and :func:`text_drift_goal` (move away from the clean
caption embedding; Co-Attack's text loss) are provided; MAT or others may pass their own.

MLM-score threshold (``mlm_threshold``, default 0.3): in the Co-Attack and SGA code a candidate is kept only if
its masked-LM *raw logit* (the top-k values of the logits, not a probability) at that position is at least the
threshold; 0 there disables the filter (``None`` here). With bert-base-uncased the top-10 logits are usually far
above 0.3, so the filter rarely prunes anything; it matters only for weak masked LMs.

Deliberate differences from the reference code, for speed and for a well-defined result:
- importance uses the goal itself (the original BERT-Attack principle) and removes the word (tokenizer-agnostic)
  instead of scoring KL drift of an ``[UNK]`` substitution;
- a word the masked LM splits into several pieces is skipped (the reference expands piece combinations);
- the best candidate always replaces the word (the reference may keep the original when no candidate helps), so
  exactly ``n_words`` words change whenever that many words have candidates.

Shapes: texts list[str] (N) -> :class:`TextAttackResult` with N texts and, per text, the changes made.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pipeline.attacks.base import MultimodalAttack, check_positive, embed_texts, kl_drift
from pipeline.models import CLIPBundle, MLMBundle

TextGoal = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# English function words never attacked nor used as replacements (articles, pronouns, prepositions,
# conjunctions, auxiliaries, quantifiers): swapping them changes little meaning and yields ungrammatical text.
STOP_WORDS: frozenset[str] = frozenset("""
a an the this that these those some any each every all both either neither no none other another such same
i me my mine myself we us our ours you your yours he him his she her hers it its itself they them their theirs
who whom whose which what whatever whoever where when why how there here then than thus
am is are was were be been being do does did doing done have has had having
can could may might must shall should will would ought
and or nor but if so because although though while whereas unless until since whether yet
of in on at by for from to into onto upon with within without about above below over under across along around
among between beyond through throughout toward towards behind before after during near off out up down per via
not only just also too very more most less least much many few several enough even ever never again already
s t d ll m re ve don didn doesn isn aren wasn weren hasn haven hadn won wouldn shouldn couldn
""".split())

_WORD = re.compile(r"[A-Za-z0-9]+(?:'[A-Za-z]+)?")


def image_similarity_goal(image_emb: torch.Tensor) -> TextGoal:
    """Lower each text's cosine similarity to its image. ``image_emb``: [N, D] L2-normalised, one row per text."""
    return lambda emb, owner: -(emb * image_emb[owner].to(emb.dtype)).sum(-1)


def text_drift_goal(clean_text_emb: torch.Tensor) -> TextGoal:
    """Move each text away from its clean embedding (KL of the softmaxed embeddings), as Co-Attack's text loss."""
    return lambda emb, owner: kl_drift(emb, clean_text_emb[owner], reduction="none").sum(-1)


@dataclass(frozen=True)
class WordChange:
    word_index: int
    original: str
    replacement: str


@dataclass
class TextAttackResult:
    texts: list[str]
    changes: list[list[WordChange]]


@dataclass
class _Caption:
    """A caption split into words (with character spans) that can be re-rendered with replacements."""

    text: str
    spans: list[tuple[int, int]]
    words: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str) -> _Caption:
        matches = list(_WORD.finditer(text))
        return cls(text, [m.span() for m in matches], [m.group() for m in matches])

    def render(self, words: list[str]) -> str:
        out, last = [], 0
        for (start, end), word in zip(self.spans, words):
            out += [self.text[last:start], word]
            last = end
        out.append(self.text[last:])
        text = "".join(out)
        return re.sub(r"\s{2,}", " ", text).strip() if "" in words else text  # tidy up after a removed word

    def with_word(self, index: int, word: str, words: list[str] | None = None) -> str:
        words = list(self.words if words is None else words)
        words[index] = word
        return self.render(words)


@dataclass(frozen=True)
class BERTAttack:
    n_words: int = 1
    top_k: int = 10
    mlm_threshold: float | None = 0.3
    batch_size: int = 512  # texts per CLIP text-encoder forward
    stop_words: frozenset[str] = field(default=STOP_WORDS, repr=False)

    def __post_init__(self) -> None:
        check_positive("n_words", self.n_words)
        check_positive("top_k", self.top_k)
        check_positive("batch_size", self.batch_size)

    @torch.no_grad()
    def __call__(self, clip: CLIPBundle, mlm: MLMBundle, texts: list[str], goal: TextGoal) -> TextAttackResult:
        captions = [_Caption.parse(t) for t in texts]
        candidates = self._candidates(mlm, texts, captions)  # per text: {word index: [replacement words]}

        # 1. Importance: score every caption with one eligible word removed.
        variants = [(i, p, c.with_word(p, "")) for i, c in enumerate(captions) for p in candidates[i]]
        scores = self._score(clip, [v[2] for v in variants], [v[0] for v in variants], goal)
        order: list[list[int]] = [[] for _ in texts]
        for (i, p, _), _s in sorted(zip(variants, scores.tolist()), key=lambda vs: -vs[1]):
            order[i].append(p)  # sorted() is stable: ties keep word order

        # 2. Greedy replacement, one word per round, all candidates of the batch scored together.
        words = [list(c.words) for c in captions]
        changes: list[list[WordChange]] = [[] for _ in texts]
        for step in range(self.n_words):
            trials = [(i, order[i][step], w) for i in range(len(texts)) if step < len(order[i])
                      for w in candidates[i][order[i][step]]]
            if not trials:
                break
            trial_texts = [captions[i].with_word(p, w, words[i]) for i, p, w in trials]
            trial_scores = self._score(clip, trial_texts, [t[0] for t in trials], goal).tolist()
            best: dict[int, tuple[float, int, str]] = {}
            for (i, p, w), s in zip(trials, trial_scores):
                if i not in best or s > best[i][0]:
                    best[i] = (s, p, w)
            for i, (_, p, w) in best.items():
                changes[i].append(WordChange(p, captions[i].words[p], w))
                words[i][p] = w
        return TextAttackResult([c.render(w) for c, w in zip(captions, words)], changes)

    def _candidates(self, mlm: MLMBundle, texts: list[str], captions: list[_Caption]) -> list[dict[int, list[str]]]:
        """Masked-LM top-k replacement words for every single-piece, non-stop word of every caption."""
        enc = mlm.tokenizer(texts, padding=True, truncation=True, return_offsets_mapping=True, return_tensors="pt")
        offsets = enc.pop("offset_mapping").tolist()
        logits = mlm.model(input_ids=enc["input_ids"].to(mlm.device),
                           attention_mask=enc["attention_mask"].to(mlm.device)).logits
        top_scores, top_ids = logits.float().topk(self.top_k, dim=-1)
        top_scores, top_ids = top_scores.cpu(), top_ids.cpu()
        out: list[dict[int, list[str]]] = []
        for i, caption in enumerate(captions):
            per_word: dict[int, list[str]] = {}
            for p, ((start, end), word) in enumerate(zip(caption.spans, caption.words)):
                pieces = [j for j, (a, b) in enumerate(offsets[i]) if b > a and a >= start and b <= end]
                if len(pieces) != 1 or word.lower() in self.stop_words:
                    continue
                tokens = mlm.tokenizer.convert_ids_to_tokens(top_ids[i, pieces[0]].tolist())
                words = list(dict.fromkeys(
                    tok for tok, s in zip(tokens, top_scores[i, pieces[0]].tolist())
                    if self._is_replacement(tok, word) and (self.mlm_threshold is None or s >= self.mlm_threshold)))
                if words:
                    per_word[p] = words
            out.append(per_word)
        return out

    def _is_replacement(self, token: str, word: str) -> bool:
        return token.isalnum() and token.lower() != word.lower() and token.lower() not in self.stop_words

    def _score(self, clip: CLIPBundle, texts: list[str], owner: list[int], goal: TextGoal) -> torch.Tensor:
        if not texts:
            return torch.empty(0)
        emb = embed_texts(clip, texts, self.batch_size)
        return goal(emb, torch.tensor(owner, device=emb.device)).float().cpu()


@dataclass(frozen=True)
class BERTTextAttack(MultimodalAttack):
    """Evaluation-level BERT-Attack: each caption moves away from its clean image; images untouched."""

    text: BERTAttack = BERTAttack()

    def forward(self, clip: CLIPBundle, mlm: MLMBundle | None, images01: torch.Tensor, texts: list[str],
                txt2img: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
        if mlm is None:
            raise ValueError("BERT-Attack needs a masked LM (mlm bundle)")
        with torch.no_grad():
            image_emb = clip.encode_images(images01).float()
        return images01, self.text(clip, mlm, texts, image_similarity_goal(image_emb[txt2img])).texts
