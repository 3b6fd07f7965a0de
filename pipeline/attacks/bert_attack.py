"""BERT-Attack on CLIP captions, batched over the whole batch, in two variants.

Li et al., "BERT-ATTACK: Adversarial Attack Against BERT Using BERT" (EMNLP 2020), in the form Co-Attack
(Zhang et al. 2022) and SGA (Lu et al. 2023) run it against CLIP. Goal: a callable
``goal(text_emb [N, D] L2-normalised, owner [N] long) -> score [N]``, higher = more adversarial, where ``owner``
indexes the attacked texts: :func:`image_similarity_goal` (lower the cosine to the paired image; SGA's loss, the
default use) and :func:`text_drift_goal` (move away from the clean caption embedding; Co-Attack's loss).

``variant="reference"`` (the default: what evaluation runs and MAT / MAT+ train with) follows ``TextAttacker.img_guided_attack`` of
Zoky-2020/SGA (``attacker.py``) and ``BertAttack.attack`` of adversarial-for-goodness/Co-Attack
(``attack/bert_attack.py``), which are the same algorithm, with their CLIP wrappers' text path:

1. words are the caption split on single spaces; the masked LM reads ``[CLS]`` and the caption's pieces, no
   ``[SEP]`` (ALBEF's BertTokenizer, SGA ``models/tokenization_bert.py``), ``max_length`` = 30 ids in all; CLIP
   scores a text as the wrappers' ``inference_text`` sees it: those ids decoded back to a string;
2. importance: each word in turn replaced by ``[UNK]``; score = KL(softmax(clean embedding) || softmax(masked
   embedding)) summed over the embedding (the reference's ``get_important_scores``), whatever the goal;
3. candidates: the masked LM reads the unmasked caption once; a one-piece word takes its top-k tokens while the
   raw logit is >= ``mlm_threshold`` (0.3; 0 or None: no filter); a word of several pieces takes the
   reference's piece combinations (:func:`~pipeline.attacks.text_parts.piece_combinations`: top 4 at each of the
   first 12 pieces, the first 24 combinations, ranked by the masked LM's perplexity); candidates equal to the
   word, containing ``##`` or in :data:`~pipeline.attacks.text_parts.FILTER_WORDS` are dropped;
4. words are visited by importance (filter words, and words starting beyond ``max_length - 2`` pieces,
   skipped); the current caption and every candidate are scored with the goal, and the best replaces the word
   only if it beats the current caption (ties keep it); the walk stops after ``n_words`` changes;
5. position quirk kept: the reference reads the masked LM's predictions for a word at its piece offsets counted
   *without* the leading ``[CLS]``, i.e. one position early (at the previous piece; ``[CLS]`` for the first
   word). ``skip_cls=True`` reads them at the word itself, as LinyangLee/BERT-Attack (``bertattack.py``) does.
   Also as the reference: candidates are the masked LM's raw tokens, so special tokens (``[MASK]``, ``[SEP]``)
   and punctuation outside the list can win, and punctuation or capitals glued to a word make it another word
   (the evaluation normalises captions first, as the reference's ``pre_caption``).

Same decisions, less work: a word that cannot change (a filter word, past ``max_length - 2`` pieces, or a
one-piece word without candidates) gets no importance score, since the reference visits it without effect; the
current caption's goal is computed once per change instead of at every visit. Remaining differences from the
reference: ties between equal perplexities are broken by a stable sort; scores are computed in batches
(float summation order may differ in the last bits); SGA's CLIP script sets ``max_length=77``, Co-Attack's keeps
30 (our default: the demo's masked LM has 64 positions); ``stop_words`` replaces the variant's list when given.

``variant="fast"`` (training's default before; ``--set attack.text.variant=fast``) keeps that behaviour: words are regex words; only
words with candidates are scored, by removing the word and scoring the goal; candidates are single-piece
words only, from the masked LM's top-k at the word itself, minus :data:`~pipeline.attacks.text_parts.STOP_WORDS`;
the ``n_words`` most important words are replaced one after another by their best candidate, even if it does not
raise the goal. CLIP scores edited token ids (:class:`~pipeline.attacks.text_parts.TokenEditor`) instead of
re-tokenised strings; the outputs are those of tokenising the strings (tested).

``constraint="synonyms"`` (both variants; default None, as the reference code, which has no semantic filter):
a candidate must share a WordNet synset with the word it replaces, standing in for the BERT-Attack paper's
semantic-similarity constraint (its code filters with counter-fitted word vectors, cosine >= 0.4).

Shapes: texts list[str] (N) -> :class:`TextAttackResult` with N texts and, per text, the changes made.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import bisect
import functools
from collections.abc import Callable
from dataclasses import dataclass, field

from pipeline.core.lazy import lazy_module, no_grad
from pipeline.core.config import option
from pipeline.attacks.base import MultimodalAttack, check_positive, kl_drift
from pipeline.attacks.text_parts import (FILTER_WORDS, STOP_WORDS, Caption, TokenEditor, embed_ids, piece_combinations,
                                        reference_ids, view_embed)

torch = lazy_module("torch")  # imported on first use: the CLI reads these settings without torch

if TYPE_CHECKING:  # type hints only: importing transformers here would slow every command's start
    from pipeline.models.hf import CLIPBundle, MLMBundle

TextGoal = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]
VARIANTS = ("reference", "fast")
CONSTRAINTS = (None, "synonyms")

__all__ = ["BERTAttack", "BERTTextAttack", "FILTER_WORDS", "STOP_WORDS", "TextAttackResult", "TextGoal", "WordChange",
           "image_similarity_goal", "text_drift_goal"]


def image_similarity_goal(image_emb: torch.Tensor) -> TextGoal:
    """Lower each text's cosine similarity to its image. ``image_emb``: [N, D] L2-normalised, one row per text."""
    return lambda emb, owner: -(emb * image_emb[owner].to(emb.dtype)).sum(-1)


def text_drift_goal(clean_text_emb: torch.Tensor) -> TextGoal:
    """Move each text away from its clean embedding (KL of the softmaxed embeddings), as Co-Attack's text loss."""
    return lambda emb, owner: kl_drift(emb, clean_text_emb[owner], reduction="none").sum(-1)


@functools.cache
def _synonyms(word: str) -> frozenset[str]:
    from pipeline.augment.wordnet import load_wordnet

    return frozenset(lemma.name().lower() for synset in load_wordnet().synsets(word) for lemma in synset.lemmas())


@dataclass(frozen=True)
class WordChange:
    word_index: int
    original: str
    replacement: str


@dataclass
class TextAttackResult:
    texts: list[str]
    changes: list[list[WordChange]]


@dataclass(frozen=True)
class BERTAttack:
    n_words: int = field(default=1, metadata=option("N_WORDS", "BERT-Attack: words replaced per caption."))
    top_k: int = field(default=10, metadata=option("TOP_K", "BERT-Attack: masked-LM candidates per word."))
    mlm_threshold: float | None = 0.3
    variant: str = "reference"
    max_length: int = 30  # reference: masked-LM tokens per caption (the reference's max_length)
    skip_cls: bool = False  # reference: read candidates at the word itself instead of one position early
    constraint: str | None = None
    batch_size: int = 512  # texts per CLIP text-encoder forward
    stop_words: frozenset[str] | None = field(default=None, repr=False)  # None: the variant's list

    def __post_init__(self) -> None:
        check_positive("n_words", self.n_words)
        check_positive("top_k", self.top_k)
        check_positive("batch_size", self.batch_size)
        if self.max_length < 3:
            raise ValueError(f"max_length must be >= 3, got {self.max_length!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant={self.variant!r}: choose one of {VARIANTS}")
        if self.constraint not in CONSTRAINTS:
            raise ValueError(f"constraint={self.constraint!r}: choose one of {CONSTRAINTS}")

    @property
    def stops(self) -> frozenset[str]:
        if self.stop_words is not None:
            return self.stop_words
        return FILTER_WORDS if self.variant == "reference" else STOP_WORDS

    @no_grad
    def __call__(self, clip: CLIPBundle, mlm: MLMBundle, texts: list[str], goal: TextGoal) -> TextAttackResult:
        if self.variant == "reference":
            return self._reference(clip, mlm, texts, goal)
        return self._fast(clip, mlm, texts, goal)

    def _allowed(self, word: str, candidate: str) -> bool:
        return self.constraint is None or candidate.lower() in _synonyms(word.lower())

    # ------------------------------------------------------------------------------------------ reference

    def _reference(self, clip: CLIPBundle, mlm: MLMBundle, texts: list[str], goal: TextGoal) -> TextAttackResult:
        limit = mlm.model.config.max_position_embeddings
        if self.max_length > limit:
            raise ValueError(f"max_length={self.max_length} exceeds the masked LM's {limit} positions")
        tok = mlm.tokenizer
        words = [t.split(" ") for t in texts]
        input_ids = torch.full((len(texts), self.max_length), tok.pad_token_id, dtype=torch.long)
        for i, row in enumerate(reference_ids(tok, texts, self.max_length)):
            input_ids[i, :len(row)] = torch.tensor(row)
        logits = mlm.model(input_ids=input_ids.to(mlm.device),
                           attention_mask=(input_ids != tok.pad_token_id).long().to(mlm.device)).logits.float()
        top_scores, top_ids = (t.cpu() for t in logits.topk(self.top_k, dim=-1))
        keys = [self._piece_keys(tok, ws) for ws in words]

        # Candidates of one-piece words now; a word of several pieces gets its combinations when visited (each
        # costs a masked-LM call). A word that cannot change is never visited, so it needs no importance score.
        found: dict[tuple[int, int], list[str]] = {}
        visit: list[list[int]] = []
        for i, ws in enumerate(words):
            visit.append([])
            for j, word in enumerate(ws):
                if word in self.stops or keys[i][j][0] > self.max_length - 2:
                    continue
                if keys[i][j][1] - keys[i][j][0] == 1:
                    found[i, j] = self._reference_candidates(mlm, word, keys[i][j], top_scores[i], top_ids[i])
                    if not found[i, j]:  # the reference's argmax is the original: nothing changes
                        continue
                visit[i].append(j)

        # Importance: KL drift of the clean embedding when a word becomes [UNK] (goal-independent, as the
        # reference); a stable sort keeps the reference's order among the words visited.
        clean = self._view_embed(clip, mlm, texts)
        masked = [(i, " ".join(words[i][:j] + [tok.unk_token] + words[i][j + 1:]))
                  for i in range(len(texts)) for j in visit[i]]
        if masked:
            owner = torch.tensor([i for i, _ in masked], device=clean.device)
            drift = kl_drift(self._view_embed(clip, mlm, [m for _, m in masked]), clean[owner], reduction="none")
            drift, start = drift.sum(-1).cpu().tolist(), 0
            for i in range(len(texts)):
                score = dict(zip(visit[i], drift[start:start + len(visit[i])]))
                visit[i].sort(key=lambda j: -score[j])
                start += len(visit[i])

        # The current caption's goal: the clean caption's until a word changes (the reference rescores it each visit).
        current = goal(clean, torch.arange(len(texts), device=clean.device)).float().cpu().tolist()
        final = [list(ws) for ws in words]
        changes: list[list[WordChange]] = [[] for _ in texts]
        cursor = [0] * len(texts)
        while True:
            trials: list[tuple[int, int, list[str]]] = []  # one word per caption and round, in importance order
            for i in range(len(texts)):
                while len(changes[i]) < self.n_words and cursor[i] < len(visit[i]):
                    j = visit[i][cursor[i]]
                    cursor[i] += 1
                    if (i, j) not in found:
                        found[i, j] = self._reference_candidates(mlm, words[i][j], keys[i][j], top_scores[i],
                                                                 top_ids[i])
                    if found[i, j]:
                        trials.append((i, j, found[i, j]))
                        break
            if not trials:
                break
            variants = [(i, " ".join(final[i][:j] + [c] + final[i][j + 1:])) for i, j, cands in trials for c in cands]
            emb = self._view_embed(clip, mlm, [v for _, v in variants])
            scores = goal(emb, torch.tensor([i for i, _ in variants], device=emb.device)).float().cpu().tolist()
            start, rescore = 0, []
            for i, j, cands in trials:
                mine = scores[start:start + len(cands)]
                start += len(cands)
                best = max(range(len(cands)), key=mine.__getitem__)  # the first maximum, as argmax
                if mine[best] > current[i]:  # ties keep the original (index 0 of the reference's argmax)
                    changes[i].append(WordChange(j, words[i][j], cands[best]))
                    final[i][j] = cands[best]
                    current[i] = mine[best]
                    rescore.append(i)
            if self.n_words > 1 and rescore:  # the edited caption alone, as the reference scores it next visit
                emb = self._view_embed(clip, mlm, [" ".join(final[i]) for i in rescore])
                fresh = goal(emb, torch.tensor(rescore, device=emb.device)).float().cpu().tolist()
                for i, value in zip(rescore, fresh):
                    current[i] = value
        return TextAttackResult([" ".join(ws) for ws in final], changes)

    @staticmethod
    def _piece_keys(tok, words: list[str]) -> list[tuple[int, int]]:
        """[start, end) of each word's pieces in the caption's pieces, counted without [CLS] (as the reference)."""
        keys, index = [], 0
        for word in words:
            n = len(tok.tokenize(word))
            keys.append((index, index + n))
            index += n
        return keys

    def _reference_candidates(self, mlm: MLMBundle, word: str, key: tuple[int, int], top_scores: torch.Tensor,
                              top_ids: torch.Tensor) -> list[str]:
        if word in self.stops or key[0] > self.max_length - 2:
            return []
        shift = 1 if self.skip_cls else 0
        ids, scores = top_ids[key[0] + shift:key[1] + shift], top_scores[key[0] + shift:key[1] + shift]
        if len(ids) == 1:
            found = []
            for token_id, score in zip(ids[0].tolist(), scores[0].tolist()):
                if self.mlm_threshold and score < self.mlm_threshold:
                    break
                found.append(mlm.tokenizer.convert_ids_to_tokens(token_id))
        else:
            found = piece_combinations(mlm, ids) if len(ids) else []
        return [c for c in found if c != word and "##" not in c and c not in self.stops and self._allowed(word, c)]

    def _view_embed(self, clip: CLIPBundle, mlm: MLMBundle, texts: list[str]) -> torch.Tensor:
        """CLIP embeddings of texts as the reference's CLIP wrapper sees them: masked-LM ids decoded back."""
        return view_embed(clip, mlm, texts, self.max_length, self.batch_size)

    # ----------------------------------------------------------------------------------------------- fast

    def _fast(self, clip: CLIPBundle, mlm: MLMBundle, texts: list[str], goal: TextGoal) -> TextAttackResult:
        captions = [Caption.parse(t) for t in texts]
        candidates = self._fast_candidates(mlm, texts, captions)  # per text: {word index: [replacement words]}
        editor = TokenEditor(clip, captions)
        editor.prepare([w for per in candidates for ws in per.values() for w in ws])

        # 1. Importance: score every caption with one eligible word removed.
        variants = [(i, p, "") for i, per in enumerate(candidates) for p in per]
        scores = self._score_edits(clip, editor, None, variants, goal)
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
            trial_scores = self._score_edits(clip, editor, words, trials, goal).tolist()
            best: dict[int, tuple[float, int, str]] = {}
            for (i, p, w), s in zip(trials, trial_scores):
                if i not in best or s > best[i][0]:
                    best[i] = (s, p, w)
            for i, (_, p, w) in best.items():
                changes[i].append(WordChange(p, captions[i].words[p], w))
                words[i][p] = w
        return TextAttackResult([c.render(w) for c, w in zip(captions, words)], changes)

    def _fast_candidates(self, mlm: MLMBundle, texts: list[str], captions: list[Caption]) -> list[dict[int, list[str]]]:
        """Masked-LM top-k replacement words for every single-piece, non-stop word of every caption."""
        enc = mlm.tokenizer(texts, padding=True, truncation=True, return_offsets_mapping=True, return_tensors="pt")
        offsets = enc.pop("offset_mapping").tolist()
        stops = self.stops
        targets: list[tuple[int, int, int]] = []  # (caption, word, position of its single piece)
        for i, caption in enumerate(captions):
            pieces_at = [(a, b, j) for j, (a, b) in enumerate(offsets[i]) if b > a]  # ascending offsets
            starts = [a for a, _, _ in pieces_at]
            for p, ((start, end), word) in enumerate(zip(caption.spans, caption.words)):
                if word.lower() in stops:
                    continue
                inside = [j for a, b, j in pieces_at[bisect.bisect_left(starts, start):bisect.bisect_left(starts, end)]
                          if b <= end]
                if len(inside) == 1:
                    targets.append((i, p, inside[0]))
        out: list[dict[int, list[str]]] = [{} for _ in texts]
        if not targets:
            return out
        logits = mlm.model(input_ids=enc["input_ids"].to(mlm.device),
                           attention_mask=enc["attention_mask"].to(mlm.device)).logits
        rows = logits[torch.tensor([i for i, _, _ in targets]), torch.tensor([j for _, _, j in targets])]
        top_scores, top_ids = (t.cpu() for t in rows.float().topk(self.top_k, dim=-1))  # only the rows used
        unique = top_ids.unique().tolist()
        token_of = dict(zip(unique, mlm.tokenizer.convert_ids_to_tokens(unique)))
        for (i, p, _), ids, scores in zip(targets, top_ids.tolist(), top_scores.tolist()):
            word = captions[i].words[p]
            words = list(dict.fromkeys(
                token_of[t] for t, s in zip(ids, scores)
                if (self.mlm_threshold is None or s >= self.mlm_threshold) and self._is_replacement(token_of[t], word)))
            if words:
                out[i][p] = words
        return out

    def _is_replacement(self, token: str, word: str) -> bool:
        return (token.isalnum() and token.lower() != word.lower() and token.lower() not in self.stops
                and self._allowed(word, token))

    def _score_edits(self, clip: CLIPBundle, editor: TokenEditor, words: list[list[str]] | None,
                     edits: list[tuple[int, int, str]], goal: TextGoal) -> torch.Tensor:
        """Goal of each caption ``i`` with word ``p`` set to ``w`` ("" removes it), for (i, p, w) in ``edits``."""
        if not edits:
            return torch.empty(0)
        ids = [editor.edit(i, p, w, None if words is None else words[i]) for i, p, w in edits]
        missing = [k for k, row in enumerate(ids) if row is None]
        if missing:
            strings = [editor.captions[edits[k][0]].with_word(edits[k][1], edits[k][2],
                                                              None if words is None else words[edits[k][0]])
                       for k in missing]
            for k, row in zip(missing, clip.token_ids(strings)):
                ids[k] = row
        emb = embed_ids(clip, ids, self.batch_size)
        return goal(emb, torch.tensor([e[0] for e in edits], device=emb.device)).float().cpu()


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
