"""Tiny random generative checkpoints built offline from configs, for tests, benchmarks and `make tiny-models`.

Both are saved with `save_pretrained`, so the stages load them through the very `from_pretrained` path a real
checkpoint takes. The InternVL one follows the shape of transformers' own InternVL model tests (Qwen2 text model,
small ViT, pixel-shuffle 0.5); the Stable Diffusion one follows diffusers' `get_dummy_components` (UNet and VAE with
block_out_channels (4, 8), a 2-layer CLIP text encoder). Tokenizers are trained here with `tokenizers`, no download.
Outputs are random text / noise images: these models test plumbing, not quality.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from pipeline.core.ledger import own_tree

logger = logging.getLogger(__name__)

_WORDS = (
    "a an the man woman child dog cat horse bird car bus train plane boat bike table chair bed sofa street road "
    "field beach kitchen room park snow water grass tree sky red blue green white black yellow small large two "
    "three people group sitting standing riding walking holding eating playing looking next to near on in with of "
    "at under over front back top side photo picture view image and is are"
).split()

# Chat template in InternVL's layout (<|im_start|>role ... <|im_end|>, an image becomes <IMG_CONTEXT>).
INTERNVL_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<IMG_CONTEXT>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_INTERNVL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
_TILE = 32  # tiny ViT input side; patch 4 -> 64 patches -> 16 image tokens after pixel shuffle 0.5


def _corpus() -> list[str]:
    from pipeline.augment.captioning import DEFAULT_PROMPT

    return [" ".join(_WORDS[i : i + 8]) for i in range(0, len(_WORDS), 3)] * 4 + [DEFAULT_PROMPT]


def _internvl_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # no full byte alphabet: the vocabulary is the corpus' characters and merges, so random sampling gives words
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=_INTERNVL_SPECIALS)
    tok.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=1024,
        padding_side="left",
        # named tokens the InternVL processor reads (tokenizer.start_image_token, ..._id)
        extra_special_tokens={
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
    )


def build_tiny_internvl(out_dir: str | Path, seed: int = 0) -> Path:
    """Save a tiny random InternVL (-hf layout: model + InternVLProcessor with chat template) to `out_dir`."""
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVideoProcessor,
    )

    out = own_tree(Path(out_dir))  # refuses a folder of someone else's
    tokenizer = _internvl_tokenizer()
    size = {"height": _TILE, "width": _TILE}
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size=size, crop_to_patches=True, max_patches=6),
        tokenizer=tokenizer,
        video_processor=InternVLVideoProcessor(size=size),
        image_seq_length=16,
        chat_template=INTERNVL_CHAT_TEMPLATE,
    )
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    config = InternVLConfig(
        text_config=dict(
            model_type="qwen2", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
            tie_word_embeddings=True, bos_token_id=pad, eos_token_id=eos, pad_token_id=pad,
        ),
        vision_config=dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            image_size=[_TILE, _TILE], patch_size=[4, 4],
        ),
        image_token_id=tokenizer.context_image_token_id,
        image_seq_length=16,
        downsample_ratio=0.5,
    )
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = pad
    model.generation_config.eos_token_id = eos
    model.save_pretrained(out)
    processor.save_pretrained(out)
    logger.info("tiny InternVL (%d parameters) saved to %s", sum(p.numel() for p in model.parameters()), out)
    return out


def _clip_tokenizer(max_length: int):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    tok = Tokenizer(models.BPE(unk_token="<|endoftext|>", end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|startoftext|>", "<|endoftext|>"], end_of_word_suffix="</w>",
        initial_alphabet=list("abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'-"),
    )
    tok.train_from_iterator(_corpus(), trainer)
    bpe = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in bpe["merges"]]
    # model_max_length must be finite: diffusers pads prompts to it (OverflowError otherwise)
    return CLIPTokenizer(vocab=bpe["vocab"], merges=merges, model_max_length=max_length)


def _tiny_safety_checker(flag_everything: bool):
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    tower = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)
    config = CLIPConfig(
        text_config=dict(tower, vocab_size=99),
        vision_config=dict(tower, image_size=32, patch_size=8),
        projection_dim=32,
    )
    checker = StableDiffusionSafetyChecker(config).eval()
    if flag_everything:
        # score = cos(image, concept) - weight; weight -2 puts every score above 0 (for tests of the nsfw path)
        with torch.no_grad():
            checker.concept_embeds_weights.fill_(-2.0)
    extractor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return checker, extractor


def build_tiny_sd(
    out_dir: str | Path, seed: int = 0, safety_checker: bool = True, flag_everything: bool = False
) -> Path:
    """Save a tiny random Stable Diffusion pipeline (default scheduler DPM-Solver++) to `out_dir`."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    out = own_tree(Path(out_dir))  # refuses a folder of someone else's
    tokenizer = _clip_tokenizer(max_length=77)  # CLIP's prompt length
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=2,
    )
    vae = AutoencoderKL(
        block_out_channels=[4, 8], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=2,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer), hidden_size=32,
            intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=77,
        )
    )
    checker, extractor = _tiny_safety_checker(flag_everything) if safety_checker else (None, None)
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        scheduler=DPMSolverMultistepScheduler(), safety_checker=checker, feature_extractor=extractor,
        requires_safety_checker=safety_checker,
    )
    pipe.save_pretrained(out)
    logger.info("tiny Stable Diffusion pipeline saved to %s", out)
    return out


def main() -> None:
    """`python -m pipeline.augment.tiny_models OUT_DIR`: write OUT_DIR/tiny-internvl and OUT_DIR/tiny-sd."""
    import sys

    root = Path(sys.argv[1] if len(sys.argv) > 1 else "models")
    logging.basicConfig(level=logging.INFO)
    print(build_tiny_internvl(root / "tiny-internvl"))
    print(build_tiny_sd(root / "tiny-sd"))


if __name__ == "__main__":
    main()
