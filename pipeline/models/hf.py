"""CLIP and masked-LM loading: any Hugging Face id or local directory, small presets, offline tokenizers.

A model directory is a plain Hugging Face directory (``save_pretrained`` of the model, its tokenizer and, for
CLIP, a ``CLIPImageProcessor``), so ``CLIPModel.from_pretrained(dir)`` works on it outside this project too.

Real runs name a hub id or a local copy of one, e.g. ``openai/clip-vit-base-patch16`` (ViT-B/16, the MAT
paper's model) and ``bert-base-uncased`` (the masked LM of BERT-Attack / Co-Attack / SGA). The presets below
are random-init configurations: ``tiny`` for tests, ``small`` for the CPU demo (``make pretrain`` trains them).

Pixels handed to a :class:`CLIPBundle` are always in [0, 1]; the mean/std normalisation happens inside
:meth:`CLIPBundle.encode_images`, so attacks perturb and clip in pixel space and differentiate through it.
:meth:`CLIPBundle.preprocess` is :func:`pipeline.core.images.model_pixels`, the preprocessing training uses too.

transformers 4.50+ and 5.x: ``get_image_features`` / ``get_text_features`` return the projected tensor in 4.x
and an output object holding it as ``pooler_output`` in 5.x; :func:`projected` accepts both (the same numbers:
4.50.0, 4.57.6 and 5.24 give bit-identical embeddings, training losses and attacks on the same model dir;
loading keeps the global RNG untouched, which 4.x's loading otherwise advances).
Only :func:`train_tokenizers` (tokenizers from an empty vocabulary: ``make pretrain``, the tests' tiny models)
needs 5.x (the ``pretrain`` extra): 4.x's ``CLIPTokenizer`` / ``BertTokenizer`` require vocab and merges files.
"""

from __future__ import annotations

import contextlib
import logging
import string
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    BertTokenizer,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPTokenizer,
    PreTrainedTokenizerBase,
)
from tokenizers.pre_tokenizers import ByteLevel
from transformers import __version__ as TRANSFORMERS_VERSION

from pipeline.models.errors import ModelNotFoundError, check_local
from pipeline.models.vocab import learn_merges
from pipeline.models.base import ImageTextModel
from pipeline.core.ledger import own_tree

log = logging.getLogger(__name__)

# OpenAI CLIP's normalisation constants (also CLIPImageProcessor's defaults).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: Random-init CLIP configurations. Real runs pass a hub id / local dir to :func:`load_clip` instead,
#: e.g. "openai/clip-vit-base-patch16" (ViT-B/16, 224 px, as in the MAT paper).
CLIP_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {  # tests: seconds on CPU
        "vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       patch_size=8, image_size=32),
        "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=32),
        "projection_dim": 32,
    },
    "small": {  # CPU demo: ~3.5 train steps/s at batch 128 in bf16 on 2 cores (FIELD-NOTES)
        "vision": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                       patch_size=8, image_size=64),
        "text": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=32),
        "projection_dim": 128,
    },
}

#: Random-init BERT masked-LM configurations (the attacks' candidate generator). Real runs: "bert-base-uncased".
MLM_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=64),
    "small": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=64),
}


# ------------------------------------------------------------------------------------------ tokenizers


def train_tokenizers(captions: Iterable[str], vocab_size: int) -> tuple[CLIPTokenizer, BertTokenizer]:
    """Train a CLIP byte-level BPE and a BERT WordPiece tokenizer on ``captions``, offline.

    ``vocab_size`` counts learned tokens (merges / words); the base alphabets come on top (256 byte symbols
    for CLIP, a-z, digits and punctuation with their ``##`` forms for BERT, so unseen words split into pieces
    instead of becoming [UNK]). Both lower-case. With ``vocab_size`` above the number of distinct caption
    words, every caption word becomes one token.
    """
    if vocab_size < 16:
        raise ValueError(f"vocab_size must be >= 16, got {vocab_size}")
    if int(TRANSFORMERS_VERSION.split(".")[0]) < 5:
        # 4.x tokenizer classes cannot start from an empty vocabulary (they need vocab/merges files).
        raise RuntimeError(f"training tokenizers from scratch (make pretrain, the test suite's tiny models) needs "
                           f"transformers>=5; installed: {TRANSFORMERS_VERSION} (the 'pretrain' extra brings 5). Loading, "
                           f"training and evaluating saved or hub models works with 4.50 and later.")
    captions = list(captions)
    # The merges are learned by learn_merges, not by the tokenizers trainers, whose alphabet order (a randomly
    # seeded hash map) made every `make pretrain` a different vocabulary. Words are cut as each tokenizer cuts them.
    clip_words = _word_counts(CLIPTokenizer(), captions)
    clip_vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    _extend(clip_vocab, sorted(ByteLevel.alphabet()))
    clip_symbols = Counter({(*w[:-1], w[-1] + "</w>"): n for w, n in clip_words.items()})
    _extend(clip_vocab, sorted({w[-1] for w in clip_symbols}))
    clip_merges = learn_merges(clip_symbols, max(0, vocab_size + 258 - len(clip_vocab)))
    _extend(clip_vocab, [a + b for a, b in clip_merges])
    clip_tok = CLIPTokenizer(vocab=clip_vocab, merges=clip_merges)

    alphabet = list(string.ascii_lowercase + string.digits + string.punctuation)
    bert_words = _word_counts(BertTokenizer(), captions)
    bert_vocab = {token: i for i, token in enumerate(("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"))}
    seen = sorted({c for w in bert_words for c in w} - set(alphabet))
    _extend(bert_vocab, alphabet + seen + [f"##{c}" for c in alphabet + seen])
    bert_symbols = Counter({(w[0], *(f"##{c}" for c in w[1:])): n for w, n in bert_words.items()})
    bert_merges = learn_merges(bert_symbols, max(0, vocab_size + 2 * len(alphabet) + 5 - len(bert_vocab)), "##")
    _extend(bert_vocab, [a + b.removeprefix("##") for a, b in bert_merges])
    bert_tok = BertTokenizer(vocab=bert_vocab)
    return clip_tok, bert_tok


def _word_counts(tokenizer: PreTrainedTokenizerBase, captions: list[str]) -> Counter[str]:
    """How often each word occurs, words as the tokenizer's normaliser and pre-tokeniser cut them."""
    backend = tokenizer.backend_tokenizer
    return Counter(piece for text in captions
                   for piece, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text)))


def _extend(vocab: dict[str, int], tokens: Iterable[str]) -> None:
    for token in tokens:
        vocab.setdefault(token, len(vocab))


def _set_max_length(tokenizer: PreTrainedTokenizerBase, max_positions: int) -> None:
    if tokenizer.model_max_length is None or tokenizer.model_max_length > max_positions:
        tokenizer.model_max_length = max_positions


# ---------------------------------------------------------------------------------------------- bundles


def projected(output: torch.Tensor | Any) -> torch.Tensor:
    """The projected embeddings from ``CLIPModel.get_image_features`` / ``get_text_features`` of either major.

    transformers 4.x returns the tensor ``visual_projection(vision_model(...).pooler_output)`` (resp.
    ``text_projection``); 5.x computes the same projection but returns the tower's output object with
    ``pooler_output`` replaced by it.
    """
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if not isinstance(pooled, torch.Tensor):
        raise TypeError(f"get_*_features returned {type(output).__name__} without a pooler_output tensor")
    return pooled


@dataclass
class CLIPBundle(ImageTextModel):
    """A CLIPModel with its tokenizer and pixel normalisation; all image inputs are [0, 1] pixels."""

    family = "clip"
    image_prefixes = ("vision_model.", "visual_projection.")

    model: CLIPModel
    tokenizer: PreTrainedTokenizerBase
    image_size: int
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    _stats: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def max_length(self) -> int:
        return min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)

    @property
    def logit_scale(self) -> torch.Tensor:
        """exp(logit_scale): the temperature-inverse that multiplies cosine similarities (a live parameter)."""
        return self.model.logit_scale.exp()

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.projection_dim)

    @property
    def edit_frame(self) -> tuple[int, int] | None:
        tok = self.tokenizer
        return (tok.bos_token_id, tok.eos_token_id) if tok.is_fast else None

    def image_features(self, pixels01: torch.Tensor) -> torch.Tensor:
        """Projected image embeddings before L2 normalisation, [B, D]."""
        pixels = self.normalize(pixels01.to(self.device))
        return projected(self.model.get_image_features(pixel_values=pixels))

    def text_features(self, texts: list[str] | dict[str, torch.Tensor]) -> torch.Tensor:
        """Projected text embeddings before L2 normalisation, [N, D]."""
        batch = self._features(texts)
        return projected(self.model.get_text_features(input_ids=batch["input_ids"],
                                                      attention_mask=batch["attention_mask"]))

    def image_processor(self) -> CLIPImageProcessor:
        size = self.image_size
        return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                  image_mean=list(self.mean), image_std=list(self.std))

    def save(self, directory: str | Path) -> Path:
        directory = own_tree(Path(directory))  # refuses a folder of someone else's
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        self.image_processor().save_pretrained(directory)
        return directory


@dataclass
class MLMBundle:
    """A BERT-style masked LM and its (WordPiece) tokenizer: the candidate generator of BERT-Attack."""

    model: BertForMaskedLM
    tokenizer: PreTrainedTokenizerBase

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> MLMBundle:
        self.model.to(device)
        return self

    def save(self, directory: str | Path) -> Path:
        directory = own_tree(Path(directory))  # refuses a folder of someone else's
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        return directory


# ------------------------------------------------------------------------------------------- building


def _preset(presets: dict[str, Any], name: str) -> Any:
    if name not in presets:
        raise ValueError(f"unknown preset {name!r}; valid: {sorted(presets)}")
    return presets[name]


def build_clip(preset: str, tokenizer: PreTrainedTokenizerBase, image_size: int | None = None) -> CLIPBundle:
    """A randomly initialised CLIPModel from ``CLIP_PRESETS[preset]`` sized to ``tokenizer``'s vocabulary."""
    spec = _preset(CLIP_PRESETS, preset)
    vision = dict(spec["vision"])
    if image_size is not None:
        if image_size % vision["patch_size"]:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {vision['patch_size']}")
        vision["image_size"] = image_size
    text = dict(spec["text"], vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if text["eos_token_id"] == 2:
        # transformers treats eos id 2 as the legacy OpenAI layout (pool at argmax id); our vocabularies differ.
        raise ValueError("tokenizer eos_token_id must not be 2 for a newly built CLIP text model")
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=spec["projection_dim"])
    _set_max_length(tokenizer, text["max_position_embeddings"])
    return CLIPBundle(model=CLIPModel(config).eval(), tokenizer=tokenizer, image_size=vision["image_size"])


def build_mlm(preset: str, tokenizer: PreTrainedTokenizerBase) -> MLMBundle:
    """A randomly initialised BertForMaskedLM from ``MLM_PRESETS[preset]``."""
    spec = dict(_preset(MLM_PRESETS, preset), vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    _set_max_length(tokenizer, spec["max_position_embeddings"])
    return MLMBundle(model=BertForMaskedLM(BertConfig(**spec)).eval(), tokenizer=tokenizer)


# -------------------------------------------------------------------------------------------- loading


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _how_to_provide(name: str) -> str:
    return (f"model {name!r} not found: pass a local directory written by save_pretrained, put the model in the "
            f"Hugging Face cache (HF_HOME) on a machine with hub access, or for the demo run `make pretrain` "
            f"to train the small stand-in models")


@contextlib.contextmanager
def _loading(name: str) -> Iterator[dict[str, Any]]:
    """Resolve how to load ``name``; turn any 'not found' into :class:`ModelNotFoundError`.

    The global CPU RNG is left as it was: transformers 4.x draws from it while loading (5.x does not), which
    would shift every later random draw of a seeded run."""
    looks_local = check_local(name)
    kwargs = {"local_files_only": looks_local or _hub_offline()}
    try:
        with torch.random.fork_rng(devices=[]):
            yield kwargs
    except OSError as err:  # transformers raises OSError (or a subclass) for anything missing
        raise ModelNotFoundError(f"{_how_to_provide(name)} ({err.__class__.__name__}: {err})") from err


def load_clip(name_or_dir: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> CLIPBundle:
    """Load a CLIP bundle from a local directory or a hub id (offline-safe). Raises ModelNotFoundError."""
    name = str(name_or_dir)
    with _loading(name) as kw:
        model = CLIPModel.from_pretrained(name, **kw)
        if dtype is not None:  # a cast, not from_pretrained(dtype=): that keyword is torch_dtype before 4.56
            model = model.to(dtype)
        tokenizer = AutoTokenizer.from_pretrained(name, **kw)
        try:
            proc = CLIPImageProcessor.from_pretrained(name, **kw)
            crop = proc.crop_size
            image_size = int(crop["height"]) if isinstance(crop, dict) else int(getattr(crop, "height", crop))
            mean, std = tuple(proc.image_mean), tuple(proc.image_std)
        except OSError:
            log.warning("no image processor for %s: using the config's image size and OpenAI CLIP mean/std", name)
            image_size, mean, std = model.config.vision_config.image_size, CLIP_MEAN, CLIP_STD
    _set_max_length(tokenizer, model.config.text_config.max_position_embeddings)
    bundle = CLIPBundle(model=model.eval(), tokenizer=tokenizer, image_size=image_size, mean=mean, std=std)
    return bundle.to(device)


def load_mlm(name_or_dir: str, device: str | torch.device = "cpu") -> MLMBundle:
    """Load a masked-LM bundle (e.g. bert-base-uncased or a `make pretrain` directory). Raises ModelNotFoundError."""
    name = str(name_or_dir)
    with _loading(name) as kw:
        model = BertForMaskedLM.from_pretrained(name, **kw)
        tokenizer = AutoTokenizer.from_pretrained(name, **kw)
    _set_max_length(tokenizer, model.config.max_position_embeddings)
    return MLMBundle(model=model.eval(), tokenizer=tokenizer).to(device)
