"""Byte-pair-encoding merges learned deterministically: the vocabularies of ``make pretrain``'s stand-ins.

The ``tokenizers`` trainers (BPE for CLIP, WordPiece for BERT) order their alphabet through a randomly seeded
hash map, so two processes trained on the same captions gave different token ids and even different token sets,
and every number downstream changed. Here words and pairs are visited in a fixed order and ties between equally
frequent pairs go to the smallest pair (string order), so the same captions always give the same merges.

A word is a tuple of symbols; ``prefix`` marks symbols that continue a word (``"##"`` for WordPiece, ``""`` for
CLIP's BPE, whose words instead end in a ``</w>`` symbol). Merging ``a`` and ``b`` gives ``a + b`` without
``b``'s prefix, as both trainers do.
"""

from __future__ import annotations

from collections import Counter


def learn_merges(word_counts: Counter[tuple[str, ...]], budget: int, prefix: str = "") -> list[tuple[str, str]]:
    """Up to ``budget`` merges, most frequent adjacent pair first (ties: the smallest pair), until no pair is left."""
    words = [list(w) for w in sorted(word_counts)]
    counts = [word_counts[tuple(w)] for w in words]
    pairs: Counter[tuple[str, str]] = Counter()
    where: dict[tuple[str, str], set[int]] = {}  # pair -> the words holding it
    for index, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pairs[pair] += counts[index]
            where.setdefault(pair, set()).add(index)
    merges: list[tuple[str, str]] = []
    while len(merges) < budget and pairs:
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merged = best[0] + best[1][len(prefix):]
        for index in sorted(where.pop(best, ())):
            word, count = words[index], counts[index]
            for pair in zip(word, word[1:]):
                pairs[pair] -= count
                if pairs[pair] <= 0:
                    del pairs[pair]
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            words[index] = out
            for pair in zip(out, out[1:]):
                pairs[pair] += count
                where.setdefault(pair, set()).add(index)
        pairs.pop(best, None)
        merges.append(best)
    return merges
