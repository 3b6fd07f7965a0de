"""BERT-Attack: ``reference`` against a brute-force transcription of the reference algorithm, ``fast`` against an
unoptimised (string re-tokenising) implementation of its own rules, both on the tiny CLIP and masked LM."""

from __future__ import annotations

import itertools
import re
import string

import pytest
import torch
import torch.nn.functional as F

from pipeline.attacks import BERTAttack, build_attack, image_similarity_goal, text_drift_goal
from pipeline.attacks.text_parts import FILTER_WORDS, STOP_WORDS, Caption, TokenEditor
from pipeline.models.hf import build_clip, train_tokenizers

WORD = re.compile(r"[A-Za-z0-9]+(?:'[A-Za-z]+)?")


@pytest.fixture(scope="module")
def clip(tiny_captions):
    """A tiny CLIP whose tokeniser knows every character as a word of its own.

    The shared tiny CLIP maps end-of-word forms it never saw ("l" alone, "[") to its end-of-text id, where CLIP
    pools: a candidate holding one cuts the caption short for CLIP and ties every later edit exactly, and float
    noise (batch composition) then decides exact ties.
    """
    torch.manual_seed(0)
    alphabet = " ".join(string.ascii_lowercase + string.digits + string.punctuation)
    clip_tok, _ = train_tokenizers([*tiny_captions, *[alphabet] * 3], vocab_size=300)
    return build_clip("tiny", clip_tok)


MULTI_PIECE = ["a red triangles on a plain background", "the squares is purplish with a checkered pattern",
               "the triangles"]  # "triangles" -> triangle ##s, "purplish" -> purp ##l ##is ##h in the tiny vocab


def _captions(tiny_captions: list[str], n: int) -> list[str]:
    return [tiny_captions[(7 * i) % len(tiny_captions)] for i in range(n)]


def _image_goal(clip, n: int, seed: int = 0):
    images = torch.rand(n, 3, clip.image_size, clip.image_size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return clip.encode_images(images).float()


def _mlm_topk(mlm, text: str, word_index: int, k: int) -> tuple[list[str], list[float]]:
    """The masked LM's top-k tokens (and logits) at a one-piece word of the unmasked caption."""
    enc = mlm.tokenizer(text, return_offsets_mapping=True, return_tensors="pt")
    start, end = list(WORD.finditer(text))[word_index].span()
    pos = [j for j, (a, b) in enumerate(enc.pop("offset_mapping")[0].tolist()) if b > a and a >= start and b <= end]
    assert len(pos) == 1
    with torch.no_grad():
        scores, ids = mlm.model(**enc).logits[0, pos[0]].topk(k)
    return mlm.tokenizer.convert_ids_to_tokens(ids.tolist()), scores.tolist()


# ------------------------------------------------------------------------------------------ reference


@torch.no_grad()
def _brute_reference(clip, mlm, text: str, image_emb: torch.Tensor, *, n_words=1, k=10, threshold=0.3,
                     max_length=30, skip_cls=False) -> tuple[str, list[tuple[int, str, str]]]:
    """The Co-Attack / SGA text attack on one caption, transcribed loop by loop, one text at a time."""
    tok = mlm.tokenizer

    def albef_ids(s: str) -> list[int]:  # ALBEF's BertTokenizer: [CLS] and the pieces, no [SEP]
        return [tok.cls_token_id] + tok(s, add_special_tokens=False)["input_ids"][:max_length - 1]

    def embed(s: str) -> torch.Tensor:  # the reference CLIP wrapper: BERT ids decoded, then CLIP-tokenised
        d = tok.decode(albef_ids(s), clean_up_tokenization_spaces=True)
        return clip.encode_texts([d.replace("[PAD]", "").replace("[CLS]", "").replace("[SEP]", "").strip()])[0]

    words = text.split(" ")
    row = albef_ids(text)
    row = torch.tensor([row + [tok.pad_token_id] * (max_length - len(row))])
    scores, ids = mlm.model(input_ids=row, attention_mask=(row != tok.pad_token_id).long()).logits[0].topk(k)
    origin = embed(text)
    importance = [F.kl_div(embed(" ".join(words[:j] + ["[UNK]"] + words[j + 1:])).log_softmax(-1),
                           origin.softmax(-1), reduction="sum").item() for j in range(len(words))]
    keys, index = [], 0
    for w in words:
        keys.append((index, index + len(tok.tokenize(w))))
        index = keys[-1][1]
    final, changes = list(words), []
    for j in sorted(range(len(words)), key=lambda j: importance[j], reverse=True):
        if len(changes) >= n_words:
            break
        if words[j] in FILTER_WORDS or keys[j][0] > max_length - 2:
            continue
        a, b = (keys[j][0] + 1, keys[j][1] + 1) if skip_cls else keys[j]
        if b - a == 1:
            cands = [tok.convert_ids_to_tokens(int(t)) for t, s in zip(ids[a], scores[a]) if s >= threshold]
        else:
            combos = list(itertools.product(*ids[a:b, :4][:12].tolist()))[:24]
            ppl = []
            for combo in combos:
                logits = mlm.model(input_ids=torch.tensor([combo])).logits[0]
                ppl.append(F.cross_entropy(logits, torch.tensor(combo)).exp().item())
            ranked = [combos[c] for c in sorted(range(len(combos)), key=lambda c: ppl[c])]
            cands = [" ".join(tok.convert_ids_to_tokens(list(c))).replace(" ##", "") for c in ranked]
        cands = [c for c in cands if c != words[j] and "##" not in c and c not in FILTER_WORDS]
        options = [" ".join(final)] + [" ".join(final[:j] + [c] + final[j + 1:]) for c in cands]
        sims = [-(embed(o) @ image_emb).item() for o in options]
        best = max(range(len(options)), key=lambda o: (sims[o], -o))  # first maximum
        if best:
            final[j] = cands[best - 1]
            changes.append((j, words[j], cands[best - 1]))
    return " ".join(final), changes


@pytest.mark.parametrize("skip_cls", [False, True])
@pytest.mark.parametrize("n_words", [1, 2])
def test_reference_equals_a_brute_force_transcription(clip, tiny_mlm, tiny_captions, skip_cls, n_words):
    texts = _captions(tiny_captions, 5) + MULTI_PIECE
    image_emb = _image_goal(clip, len(texts))
    attack = BERTAttack(n_words=n_words, skip_cls=skip_cls)
    result = attack(clip, tiny_mlm, texts, image_similarity_goal(image_emb))
    for i, text in enumerate(texts):
        expected, changes = _brute_reference(clip, tiny_mlm, text, image_emb[i], n_words=n_words,
                                             skip_cls=skip_cls)
        assert result.texts[i] == expected
        assert [(c.word_index, c.original, c.replacement) for c in result.changes[i]] == changes
    attacked = {c.original for per in result.changes for c in per}
    assert attacked & {"triangles", "squares", "purplish"}, "a multi-piece word was attacked"


def test_reference_keeps_the_original_when_no_candidate_helps(clip, tiny_mlm, tiny_captions):
    texts = _captions(tiny_captions, 4) + MULTI_PIECE
    with torch.no_grad():
        own = clip.encode_texts(texts).float()
    stay = image_similarity_goal(-own)  # the goal prefers each caption's own embedding: no edit can raise it
    kept = BERTAttack(mlm_threshold=None)(clip, tiny_mlm, texts, stay)
    assert kept.texts == texts and not any(kept.changes)
    forced = BERTAttack(variant="fast", mlm_threshold=None)(clip, tiny_mlm, texts, stay)
    assert all(len(c) == 1 for c in forced.changes[:4])  # fast replaces anyway


def test_reference_never_attacks_filter_words(clip, tiny_mlm, tiny_captions):
    texts = _captions(tiny_captions, 8)
    result = BERTAttack(n_words=3, mlm_threshold=None)(clip, tiny_mlm, texts,
                                                       image_similarity_goal(_image_goal(clip, len(texts))))
    assert any(result.changes)
    for text, changes in zip(texts, result.changes):
        for change in changes:
            assert text.split(" ")[change.word_index] == change.original
            assert change.original not in FILTER_WORDS and change.replacement not in FILTER_WORDS


def test_filter_words_are_the_reference_list():
    # the reference's list holds 293 entries of which 292 distinct ("-" appears three times)
    assert len(FILTER_WORDS) == 292 and {"a the", "～", "hundred", "should've", "b"} <= FILTER_WORDS
    assert "shape" not in FILTER_WORDS and "very" not in FILTER_WORDS


# ----------------------------------------------------------------------------------------------- fast


@torch.no_grad()
def _unoptimised_fast(clip, mlm, text: str, image_emb: torch.Tensor, *, n_words=1, k=10,
                      threshold=None) -> tuple[str, list[tuple[int, str, str]]]:
    """The fast variant's rules on one caption with strings re-tokenised for every score."""
    caption = Caption.parse(text)

    def score(strings: list[str]) -> list[float]:
        return (-(clip.encode_texts(strings) @ image_emb)).tolist()

    candidates = {}
    for p, word in enumerate(caption.words):
        enc = mlm.tokenizer(text, return_offsets_mapping=True)
        start, end = caption.spans[p]
        pos = [j for j, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a >= start and b <= end]
        if len(pos) != 1 or word.lower() in STOP_WORDS:
            continue
        tokens, logits = _mlm_topk(mlm, text, p, k)
        ok = [t for t, s in zip(tokens, logits) if t.isalnum() and t.lower() != word.lower()
              and t.lower() not in STOP_WORDS and (threshold is None or s >= threshold)]
        if ok:
            candidates[p] = list(dict.fromkeys(ok))
    removed = score([caption.with_word(p, "") for p in candidates]) if candidates else []
    order = [p for _, p in sorted(zip(removed, candidates), key=lambda sp: -sp[0])]
    words, changes = list(caption.words), []
    for p in order[:n_words]:
        options = [caption.with_word(p, w, words) for w in candidates[p]]
        sims = score(options)
        best = max(range(len(options)), key=lambda o: (sims[o], -o))
        changes.append((p, caption.words[p], candidates[p][best]))
        words[p] = candidates[p][best]
    return caption.render(words), changes


SPACING = ["A Red star on a PLAIN background", "  the circle   is green ", "a purple circle", "red"]
TRICKY = ["A Red star, on a plain background!", "the blue circle's edge is red-ish (2 of 3)",
          "green,square,striped", "a 'red' 3d star on a plain background", "a purple circle", "x"]


@pytest.mark.parametrize("n_words", [1, 2])
def test_fast_equals_its_unoptimised_path(clip, tiny_mlm, tiny_captions, n_words):
    texts = _captions(tiny_captions, 6) + SPACING + TRICKY
    image_emb = _image_goal(clip, len(texts), seed=3)
    result = BERTAttack(variant="fast", n_words=n_words, mlm_threshold=None, batch_size=5)(
        clip, tiny_mlm, texts, image_similarity_goal(image_emb))
    for i, text in enumerate(texts):
        expected, changes = _unoptimised_fast(clip, tiny_mlm, text, image_emb[i], n_words=n_words)
        assert result.texts[i] == expected
        assert [(c.word_index, c.original, c.replacement) for c in result.changes[i]] == changes


def test_token_editor_equals_tokenising_the_edited_string(clip, tiny_captions):
    texts = _captions(tiny_captions, 3) + TRICKY + ["x,red,y and caf\u00e9s", "it'd be a 'dog"]
    captions = [Caption.parse(t) for t in texts]
    editor = TokenEditor(clip, captions)
    editor.prepare(["blue", "triangle", "a1"])
    spliced = 0
    for i, caption in enumerate(captions):
        for p in range(len(caption.words)):
            for word in ("", "blue", "triangle", "a1"):
                ids = editor.edit(i, p, word, None)
                if ids is not None:
                    spliced += 1
                    expected = clip.tokenizer(caption.with_word(p, word), truncation=True,
                                                   max_length=clip.max_length)["input_ids"]
                    assert ids == expected, (caption.text, p, word)
    assert spliced > 50


@pytest.mark.parametrize("n_words", [1, 2])
def test_fast_changes_n_words_with_mlm_candidates_never_stop_words(clip, tiny_mlm, tiny_captions, n_words):
    texts = _captions(tiny_captions, 4)
    attack = BERTAttack(variant="fast", n_words=n_words, mlm_threshold=None)
    result = attack(clip, tiny_mlm, texts, image_similarity_goal(_image_goal(clip, len(texts))))
    for clean, adv, changes in zip(texts, result.texts, result.changes):
        before, after = clean.split(), adv.split()
        diff = [i for i, (a, b) in enumerate(zip(before, after)) if a != b]
        assert len(before) == len(after) and len(diff) == n_words == len(changes)
        for change in changes:
            assert before[change.word_index] == change.original and after[change.word_index] == change.replacement
            assert change.replacement not in STOP_WORDS and change.original not in STOP_WORDS
            assert change.replacement in _mlm_topk(tiny_mlm, clean, change.word_index, 10)[0]


def test_fast_mlm_threshold_filters_on_the_raw_logit(clip, tiny_mlm, tiny_captions):
    texts = _captions(tiny_captions, 4)
    goal = image_similarity_goal(_image_goal(clip, len(texts)))
    _, logits = _mlm_topk(tiny_mlm, texts[0], 1, 10)
    threshold = sorted(logits)[5]  # keeps at most the top half of each word's candidates
    result = BERTAttack(variant="fast", mlm_threshold=threshold)(clip, tiny_mlm, texts, goal)
    assert any(result.changes)
    for text, changes in zip(texts, result.changes):
        for change in changes:
            tokens, scores = _mlm_topk(tiny_mlm, text, change.word_index, 10)
            assert scores[tokens.index(change.replacement)] >= threshold
    for variant in ("fast", "reference"):  # every tiny-caption word is one piece: the threshold filters them all
        unreachable = BERTAttack(variant=variant, mlm_threshold=1e9)(clip, tiny_mlm, texts, goal)
        assert unreachable.texts == texts and not any(unreachable.changes)


# ---------------------------------------------------------------------------------------------- both


@pytest.mark.parametrize("variant", ["reference", "fast"])
def test_attack_lowers_image_text_similarity(clip, tiny_mlm, tiny_captions, variant):
    texts = _captions(tiny_captions, 8)
    image_emb = _image_goal(clip, len(texts), seed=1)
    # The reference's CLIP wrapper drops [SEP] / [CLS] / [PAD] from what it scores, so those candidates "help" it
    # while the returned text keeps them; leave them out to measure the text as returned.
    stops = FILTER_WORDS | {"[SEP]", "[CLS]", "[PAD]"} if variant == "reference" else None
    adv = BERTAttack(variant=variant, mlm_threshold=None, stop_words=stops)(clip, tiny_mlm, texts,
                                                                             image_similarity_goal(image_emb)).texts
    with torch.no_grad():
        clean_sim = (clip.encode_texts(texts) * image_emb).sum(-1)
        adv_sim = (clip.encode_texts(adv) * image_emb).sum(-1)
    assert adv_sim.mean() < clean_sim.mean()
    if variant == "reference":  # an edit is kept only if it lowers the similarity
        assert (adv_sim <= clean_sim + 1e-6).all()


@pytest.mark.parametrize("variant", ["reference", "fast"])
def test_batched_attack_equals_per_sample_loop(clip, tiny_mlm, tiny_captions, variant):
    texts = _captions(tiny_captions, 4) + MULTI_PIECE[:1]
    texts[1] = "A Red star, on a plain background!"  # padding differs
    image_emb = _image_goal(clip, len(texts))
    attack = BERTAttack(variant=variant, n_words=2, mlm_threshold=None, batch_size=7)
    batched = attack(clip, tiny_mlm, texts, image_similarity_goal(image_emb))
    for i, text in enumerate(texts):
        single = attack(clip, tiny_mlm, [text], image_similarity_goal(image_emb[i:i + 1]))
        assert single.texts[0] == batched.texts[i] and single.changes[0] == batched.changes[i]
    if variant == "fast":  # regex words: casing and punctuation around them survive
        assert re.fullmatch(r"A \w+ \w+, on a \w+ \w+!", batched.texts[1])


@pytest.mark.parametrize("variant", ["reference", "fast"])
def test_synonym_constraint_keeps_only_wordnet_synonyms(clip, tiny_mlm, variant):
    from pipeline.augment.wordnet import availability, load_wordnet

    if not availability()[0]:
        pytest.skip(availability()[1])
    wn = load_wordnet()
    texts = ["a green circle on a plain background", "the star is green with a striped pattern"]
    with torch.no_grad():
        goal = text_drift_goal(clip.encode_texts(texts).float())  # any edit raises it
    options = dict(variant=variant, top_k=len(tiny_mlm.tokenizer), mlm_threshold=None)  # every token a candidate
    bound = build_attack("bert", constraint="synonyms", **options).text
    free = build_attack("bert", **options).text

    def synonyms(word: str) -> set[str]:
        return {lemma.name().lower() for s in wn.synsets(word) for lemma in s.lemmas()}

    kept = bound(clip, tiny_mlm, texts, goal).changes
    assert all(len(c) == 1 for c in kept)  # the tiny vocabulary has one WordNet synonym of "green": "k"
    assert all(c.replacement in synonyms(c.original) for per in kept for c in per)
    assert any(c.replacement not in synonyms(c.original) for per in free(clip, tiny_mlm, texts, goal).changes
               for c in per)


@pytest.mark.parametrize("option, value", [("variant", "slow"), ("constraint", "antonyms"), ("max_length", 2)])
def test_bad_options_raise(option, value):
    with pytest.raises(ValueError, match=option):
        BERTAttack(**{option: value})


def test_variant_reaches_every_text_attack_through_build_attack():
    assert build_attack("bert").text.variant == "reference"  # the evaluation default
    for name in ("bert", "coattack", "sga"):
        assert build_attack(name, variant="fast").text.variant == "fast"


def test_reference_masked_lm_reads_cls_and_pieces_without_sep(clip, tiny_mlm, tiny_captions):
    # ALBEF's tokenizer (SGA models/tokenization_bert.py) builds "[CLS] X" for one sentence: the masked LM never
    # sees [SEP], so its logits, and the candidates, are those of that input.
    seen = []
    forward = tiny_mlm.model.forward

    def record(*args, **kwargs):
        seen.append(kwargs["input_ids"].clone())
        return forward(*args, **kwargs)

    tok = tiny_mlm.tokenizer
    long = " ".join(tiny_captions[:6])  # more pieces than max_length
    texts = [tiny_captions[0], long]
    tiny_mlm.model.forward = record
    try:
        BERTAttack(max_length=12)(clip, tiny_mlm, texts, image_similarity_goal(_image_goal(clip, 2)))
    finally:
        tiny_mlm.model.forward = forward
    ids = seen[0]
    assert ids.shape == (2, 12) and (ids[:, 0] == tok.cls_token_id).all() and not (ids == tok.sep_token_id).any()
    pieces = tok(texts, add_special_tokens=False)["input_ids"]
    assert ids[1, 1:].tolist() == pieces[1][:11]  # 11 pieces fit beside [CLS]
    assert ids[0, 1:1 + len(pieces[0])].tolist() == pieces[0] and (ids[0, 1 + len(pieces[0]):] == tok.pad_token_id).all()


def test_training_text_attack_takes_the_reference_decisions(clip, tiny_mlm, tiny_captions):
    # MAT trains with BERT-Attack as the paper does: its default text attack is the evaluation's reference one,
    # and on a batch it makes the reference's decisions (word, replacement, original kept, multi-piece words).
    from pipeline.attacks import build_attack
    from pipeline.train.config import TrainConfig
    from pipeline.train.modes import build_mode

    mode = build_mode(TrainConfig(mode="mat"), clip, tiny_mlm)
    assert mode.text_attack == build_attack("bert").text
    texts = _captions(tiny_captions, 6) + MULTI_PIECE
    images = torch.rand(len(texts), 3, clip.image_size, clip.image_size, generator=torch.Generator().manual_seed(3))
    trained = mode._attack_texts(texts, images)
    with torch.no_grad():
        image_emb = clip.encode_images(images).float()
    expected = [_brute_reference(clip, tiny_mlm, t, image_emb[i]) for i, t in enumerate(texts)]
    assert trained == [e for e, _ in expected]
    attacked = {c[1] for _, changes in expected for c in changes}
    assert attacked & {"triangles", "squares", "purplish"}, "a multi-piece word was attacked"
