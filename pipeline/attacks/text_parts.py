"""Pieces of BERT-Attack (:mod:`pipeline.attacks.bert_attack`): word lists, caption editing, CLIP token editing,
and the reference code's candidate expansion for words the masked LM splits into several pieces.

* :data:`FILTER_WORDS`: the stop list of the reference code, as data (a list of English words). It is the
  ``filter_words`` list of LinyangLee/BERT-Attack (``bertattack.py``) extended with punctuation, ``"a the"``,
  ``"some"`` and ``"b"`` in Co-Attack (``attack/bert_attack.py``) and SGA (``attacker.py``), which match each
  other word for word.
* :class:`Caption`: a caption as regex words with character spans, re-rendered with one word replaced or removed
  (the ``fast`` variant's view of a caption; ``reference`` splits on single spaces as the reference code does).
* :class:`TokenEditor`: the CLIP token ids of a caption with one word's ids replaced or removed, equal to
  tokenising the edited string (checked by ``tests/test_bert_attack.py``) wherever the word's CLIP tokens are
  exactly its own; other edits fall back to tokenising the string.
* :func:`piece_combinations`: the reference's ``get_bpe_substitues``: the top 4 tokens at each of the first 12
  pieces, combined in order, the first 24 combinations ranked by the masked LM's perplexity of them.
* :func:`mlm_view` / :func:`view_embed`: a text as the reference CLIP wrappers' ``inference_text`` sees it
  (masked-LM ids truncated to ``max_length``, decoded back, special tokens removed), and its CLIP embedding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import itertools
import re
from dataclasses import dataclass, field

from pipeline.core.lazy import lazy_module
from pipeline.attacks.base import embed_texts

torch = lazy_module("torch")  # imported on first use: the CLI reads these settings without torch

if TYPE_CHECKING:  # type hints only: importing transformers here would slow every command's start
    from pipeline.models.hf import CLIPBundle, MLMBundle


FILTER_WORDS: frozenset[str] = frozenset("""
a about above across after afterwards again against ain all almost alone along already also although am among
amongst an and another any anyhow anyone anything anyway anywhere are aren aren't around as at back been before
beforehand behind being below beside besides between beyond both but by can cannot could couldn couldn't d didn
didn't doesn doesn't don don't down due during either else elsewhere empty enough even ever everyone everything
everywhere except first for former formerly from hadn hadn't hasn hasn't haven haven't he hence her here
hereafter hereby herein hereupon hers herself him himself his how however hundred i if in indeed into is isn
isn't it it's its itself just latter latterly least ll may me meanwhile mightn mightn't mine more moreover most
mostly must mustn mustn't my myself namely needn needn't neither never nevertheless next no nobody none noone
nor not nothing now nowhere o of off on once one only onto or other others otherwise our ours ourselves out over
per please s same shan shan't she she's should've shouldn shouldn't somehow something sometime somewhere such t
than that that'll the their theirs them themselves then thence there thereafter thereby therefore therein
thereupon these they this those through throughout thru thus to too toward towards under unless until up upon
used ve was wasn wasn't we were weren weren't what whatever when whence whenever where whereafter whereas whereby
wherein whereupon wherever whether which while whither who whoever whole whom whose why with within without won
won't would wouldn wouldn't y yet you you'd you'll you're you've your yours yourself yourselves
. - / ? some " , b & ! @ % ^ * ( ) + = < > | : ; ～ ·
""".split()) | {"a the"}

# The fast variant's own list (kept so its outputs do not change): function words whose swap changes little
# meaning (articles, pronouns, prepositions, conjunctions, auxiliaries, quantifiers).
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
MAX_PIECES, PIECE_TOP, MAX_COMBINATIONS = 12, 4, 24  # the reference's bounds in get_bpe_substitues


@dataclass
class Caption:
    """A caption split into words (with character spans) that can be re-rendered with replacements."""

    text: str
    spans: list[tuple[int, int]]
    words: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str) -> Caption:
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

    def separable(self, index: int, removed: bool) -> bool:
        """Whether CLIP's pre-tokeniser cuts the text at both ends of word ``index`` whatever replaces it.

        Letters or digits on either side would join the new word; an apostrophe before it can start a
        contraction ("'s", "'d", ...). Removing the word joins its neighbours: safe when one of them is a space
        or the text's end.
        """
        start, end = self.spans[index]
        before = self.text[start - 1] if start else " "
        after = self.text[end] if end < len(self.text) else " "
        if before.isalnum() or before == "'" or after.isalnum():
            return False
        return not removed or before.isspace() or after.isspace()


class TokenEditor:
    """CLIP token ids of captions with one word's ids replaced (or removed), instead of re-tokenising strings.

    Exact where :meth:`Caption.separable` holds, the tokeniser is a fast one (character offsets) that adds
    exactly BOS/EOS, the word's tokens cover exactly its characters and the new word is ASCII; any other edit is
    tokenised as a string. Truncation follows the tokeniser's: the first ``max_length - 2`` content tokens.
    """

    def __init__(self, clip: CLIPBundle, captions: list[Caption]):
        self.clip, self.captions = clip, captions
        tok = clip.tokenizer
        self._word_ids: dict[str, list[int]] = {}
        self._ids: list[list[int] | None] = [None] * len(captions)
        self._tokens: list[list[tuple[int, int] | None]] = [[None] * len(c.words) for c in captions]
        # (first, last) special ids of a fast HF tokenizer; None (open_clip's tokenizer): always re-tokenise
        self._frame = clip.edit_frame
        if self._frame is None:
            return
        enc = tok([c.text for c in captions], add_special_tokens=True, return_offsets_mapping=True)
        for i, (ids, offsets) in enumerate(zip(enc["input_ids"], enc["offset_mapping"])):
            if len(ids) < 2 or ids[0] != self._frame[0] or ids[-1] != self._frame[1]:
                continue
            self._ids[i] = ids[1:-1]
            inner = offsets[1:-1]
            first = 0
            for p, (start, end) in enumerate(captions[i].spans):  # offsets ascend: one pass over the tokens
                while first < len(inner) and inner[first][1] <= start:
                    first += 1
                last = first
                while last < len(inner) and inner[last][0] < end:
                    last += 1
                if last > first and inner[first][0] >= start and inner[last - 1][1] <= end:
                    self._tokens[i][p] = (first, last)

    def prepare(self, words: list[str]) -> None:
        """Tokenise the replacement words about to be used (one batched call for the new ones)."""
        new = sorted({w for w in words if w and w.isascii() and w not in self._word_ids})
        if new and self._frame is not None:
            ids = self.clip.tokenizer(new, add_special_tokens=False)["input_ids"]
            self._word_ids.update(zip(new, ids))

    def edit(self, i: int, index: int, word: str, words: list[str] | None) -> list[int] | None:
        """Ids of caption ``i`` (with ``words`` as its current words) with word ``index`` set to ``word``;
        None where only tokenising the string is exact."""
        caption = self.captions[i]
        current = caption.words if words is None else words
        changed = [p for p, (a, b) in enumerate(zip(caption.words, current)) if a != b] + [index]
        if self._ids[i] is None or (word and word not in self._word_ids) \
                or any(self._tokens[i][p] is None or not caption.separable(p, removed=(p == index and not word))
                       for p in changed):
            return None
        out, last = [], 0
        for p in sorted(set(changed)):
            start, end = self._tokens[i][p]
            new = word if p == index else current[p]
            out += self._ids[i][last:start] + (self._word_ids[new] if new else [])
            last = end
        out += self._ids[i][last:]
        return [self._frame[0], *out[:self.clip.max_length - 2], self._frame[1]]


def embed_ids(clip: CLIPBundle, ids: list[list[int]], batch_size: int) -> torch.Tensor:
    """L2-normalised CLIP text embeddings [N, D] of token id lists, in chunks of similar length (less padding)."""
    order = sorted(range(len(ids)), key=lambda j: len(ids[j]))
    pad = clip.pad_token_id
    chunks = []
    for s in range(0, len(ids), batch_size):
        rows = [ids[j] for j in order[s:s + batch_size]]
        width = max(map(len, rows))
        input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=clip.device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=clip.device)
        chunks.append(clip.encode_texts({"input_ids": input_ids, "attention_mask": mask}).float())
    emb = torch.cat(chunks)
    out = torch.empty_like(emb)
    out[torch.tensor(order, device=emb.device)] = emb
    return out


def piece_combinations(mlm: MLMBundle, top_ids: torch.Tensor) -> list[str]:
    """Candidate words for a word of several pieces: ``top_ids`` [L, k] are the masked LM's top tokens at its
    pieces. The reference's expansion: pieces and tokens cut to [:12, :4], every combination in order (first
    piece slowest), the first 24 kept, ranked by the masked LM's perplexity of the combination alone."""
    rows = top_ids[:MAX_PIECES, :PIECE_TOP].tolist()
    combos = torch.tensor(list(itertools.islice(itertools.product(*rows), MAX_COMBINATIONS)), device=mlm.device)
    logits = mlm.model(input_ids=combos).logits.float()  # no special tokens and no mask, as the reference
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), combos.flatten(), reduction="none").view(combos.shape)
    ranking = torch.sort(nll.mean(-1).exp(), stable=True).indices.tolist()
    # the reference's convert_tokens_to_string: pieces joined, "##" continuations glued to the previous piece
    return [" ".join(mlm.tokenizer.convert_ids_to_tokens(combos[j].tolist())).replace(" ##", "").strip()
            for j in ranking]


def reference_ids(tok, texts: list[str], max_length: int) -> list[list[int]]:
    """The masked LM's ids as the reference's tokenizer (ALBEF's BertTokenizer, SGA ``models/tokenization_bert.py``)
    makes them for one sentence: ``[CLS]`` then the pieces, no ``[SEP]``, ``max_length`` ids at most."""
    pieces = tok(texts, add_special_tokens=False, truncation=True, max_length=max_length - 1)["input_ids"]
    return [[tok.cls_token_id, *row] for row in pieces]


def mlm_view(mlm: MLMBundle, texts: list[str], max_length: int) -> list[str]:
    """``texts`` as the reference CLIP wrappers' ``inference_text`` sees them (Co-Attack ``models/clip/model.py``,
    SGA ``models/clip_model/model.py``): the masked LM's ids (:func:`reference_ids`) decoded back to a string
    with [PAD] / [CLS] / [SEP] removed."""
    tok = mlm.tokenizer
    decoded = tok.batch_decode(reference_ids(tok, texts, max_length), clean_up_tokenization_spaces=True)
    for special in (s for s in (tok.pad_token, tok.cls_token, tok.sep_token) if s):
        decoded = [d.replace(special, "") for d in decoded]
    return [d.strip() for d in decoded]


def view_embed(clip: CLIPBundle, mlm: MLMBundle, texts: list[str], max_length: int,
               batch_size: int = 512) -> torch.Tensor:
    """L2-normalised CLIP embeddings [N, D] of :func:`mlm_view` of ``texts``."""
    return embed_texts(clip, mlm_view(mlm, texts, max_length), batch_size)
