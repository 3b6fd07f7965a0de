"""Training modes: each builds its (adversarial) batch and its loss, one class per mode, registered in
`MODES` (pipeline/train/registry.py, with what each needs).

All attacks are the evaluation's own (`pipeline.attacks`): PGD perturbs [0, 1] pixels and the bundle normalises
inside the model call; BERT-Attack replaces words with masked-LM candidates, batched over the whole batch.

- ft:      clean symmetric InfoNCE (both towers trained).
- tecoa:   PGD on images maximising InfoNCE against the clean texts; InfoNCE on (adv image, text); vision tower
           trained (Mao et al. 2023 keep the text side fixed).
- fare:    PGD maximising ||f(x_adv) - f0(x)||^2 with f0 the frozen original vision tower; the loss minimises
           it (Schlarmann et al. 2024; unsupervised, vision tower trained).
- mat:     text then image (order configurable): BERT-Attack lowers each caption's similarity to its image,
           then PGD maximises InfoNCE against the adversarial texts; InfoNCE on the adversarial pairs.
           `joint` attacks both from the clean inputs (the paper's open question on simultaneous updates).
- matplus: mat on one-to-many augmented pairs (the loader draws them; STAGES chooses the stages).

References and deliberate differences (the inner PGD is the cheap training one of `TrainAttackConfig.image` unless
changed: eps 2/255, 2 signed steps of 1/255 from a uniform [-eps, eps] start, the evaluation's budget):
- tecoa vs cvlab-columbia/ZSRobust4FoundationModel `finetuning.py`: the reference trains the vision tower on
  ImageNet class prompts with cross-entropy over image -> class-text logits, attack and loss alike (README
  example: eps 1/255, 2 steps of 1/255). Captions have no classes, so the in-batch captions play the classes and
  the loss is CLIP's symmetric InfoNCE (it adds the text -> image direction); the eps is the evaluation's.
- fare vs chs20/RobustVLM `train/adversarial_training_clip.py` (`--loss l2 --inner_loss l2`): same loss (squared
  L2 of unnormalised embeddings against the frozen original, summed over dimensions, batch mean) and the same
  trained part (the vision tower with its projection); the reference's PGD takes 10 steps of 1/255 with
  momentum 0.9 (eps 2/255 or 4/255), ours 2 plain signed steps, for training cost.
- mat / matplus (Waseda et al., arXiv 2405.18770): the paper's latest abstract names its code,
  CyberAgentAILab/multimodal-adversarial-training, which could not be read here; the order, the BERT-Attack goal
  and the InfoNCE on the adversarial pairs follow the paper's description. That code would settle the order, the
  text attack's variant, the inner PGD's steps and eps, the loss and the pairing of 1:N / N:1 pairs
  (docs/evaluation.md, "MAT's public code").
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.attacks import image_similarity_goal
from pipeline.train.config import TrainConfig
from pipeline.train.losses import ClipLoss, FareLoss, info_nce, itm_pairs
from pipeline.train.registry import MODES

if TYPE_CHECKING:  # type hints only: importing transformers here would slow every command's start
    from pipeline.models.hf import CLIPBundle, MLMBundle

Batch = dict[str, Any]
Terms = dict[str, torch.Tensor]


class DualEncoder(nn.Module):
    """The trainable module DDP wraps: [0, 1] pixels / token ids -> L2-normalised features and the scale."""

    def __init__(self, bundle: CLIPBundle):
        super().__init__()
        self.model = bundle.model
        self.bundle = bundle

    def forward(
        self, pixels01: torch.Tensor | None = None, tokens: dict[str, torch.Tensor] | None = None, raw: bool = False,
        itm: bool = False,
    ) -> dict[str, torch.Tensor]:
        out = {"logit_scale": self.bundle.logit_scale}
        if itm:  # BLIP: the image tokens serve both the contrastive features and the matching head
            image_tokens = self.bundle.image_tokens(pixels01)
            out["image"] = F.normalize(self.bundle.project_image_tokens(image_tokens), dim=-1)
            out["text"] = self.bundle.encode_texts(tokens)
            images, texts, out["itm_labels"] = itm_pairs(out["image"].detach(), out["text"].detach(),
                                                         out["logit_scale"].detach())
            pairs = {key: value[texts] for key, value in tokens.items()}
            out["itm_logits"] = self.bundle.itm_logits(image_tokens[images], pairs)
            return out
        if pixels01 is not None:
            out["image"] = self.bundle.image_features(pixels01) if raw else self.bundle.encode_images(pixels01)
        if tokens is not None:
            out["text"] = self.bundle.encode_texts(tokens)
        return out


class Mode:
    """Base: `__call__(net, batch)` returns the loss terms; `timings` holds the last step's attack seconds."""

    name: ClassVar[str]
    trains_text: ClassVar[bool] = True

    def __init__(self, cfg: TrainConfig, clip: CLIPBundle, mlm: MLMBundle | None = None):
        self.cfg = cfg
        self.clip = clip
        self.mlm = mlm
        self.clip_loss = ClipLoss()
        self.timings: dict[str, float] = {}
        self.clock: Callable[[], float] = time.perf_counter  # the benchmark swaps in time.process_time

    def prepare(self, model: nn.Module) -> None:
        """Freeze what this mode does not train (before DDP wraps the model)."""
        if not self.trains_text:
            for name, param in model.named_parameters():
                if not name.startswith(self.clip.image_prefixes):
                    param.requires_grad_(False)

    def __call__(self, net: nn.Module, batch: Batch) -> Terms:
        raise NotImplementedError

    def _timed(self, key: str, fn: Callable[[], Any]) -> Any:
        start = self.clock()
        result = fn()
        self.timings[key] = self.clock() - start
        return result

    def _pgd(self, images: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        attack = self.cfg.attack.image
        return self._timed("image_attack", lambda: attack(images, loss_fn).detach())

    def _contrastive(self, net: nn.Module, images: torch.Tensor, texts: list[str]) -> Terms:
        """The pair losses of `cfg.losses` on (images, texts): InfoNCE, and BLIP's ITM with hard negatives."""
        itm = "itm" in self.cfg.losses
        out = net(pixels01=images, tokens=self.clip.tokenize(texts), itm=itm)
        text = out["text"] if self.trains_text else out["text"].detach()
        terms = self.clip_loss(out["image"], text, out["logit_scale"])
        if itm:
            terms["itm"] = F.cross_entropy(out["itm_logits"].float(), out["itm_labels"])
        return terms

    def _text_features(self, texts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            return self.clip.encode_texts(texts)


class FineTune(Mode):
    name = "ft"

    def __call__(self, net: nn.Module, batch: Batch) -> Terms:
        self.timings = {}
        return self._contrastive(net, batch["images"], batch["texts"])


class TeCoA(Mode):
    name = "tecoa"
    trains_text = False

    def __call__(self, net: nn.Module, batch: Batch) -> Terms:
        self.timings = {}
        texts = self._text_features(batch["texts"])
        scale = self.clip.logit_scale.detach()
        adv = self._pgd(batch["images"], lambda x: info_nce(self.clip.encode_images(x), texts, scale))
        return self._contrastive(net, adv, batch["texts"])


class Fare(Mode):
    name = "fare"
    trains_text = False

    def __init__(self, cfg: TrainConfig, clip: CLIPBundle, mlm: MLMBundle | None = None):
        super().__init__(cfg, clip, mlm)
        self.reference = copy.copy(clip)
        self.reference.model = copy.deepcopy(clip.model).requires_grad_(False).eval()
        self.fare_loss = FareLoss()

    def __call__(self, net: nn.Module, batch: Batch) -> Terms:
        self.timings = {}
        images = batch["images"]
        with torch.no_grad():
            target = self.reference.image_features(images)

        def distance(x: torch.Tensor) -> torch.Tensor:
            return (self.clip.image_features(x).float() - target.float()).pow(2).sum(-1).mean()

        adv = self._pgd(images, distance)
        return self.fare_loss(net(pixels01=adv, raw=True)["image"], target)


class MAT(Mode):
    """Multimodal adversarial training (Waseda et al.): BERT-Attack on texts and PGD on images."""

    name = "mat"

    def __init__(self, cfg: TrainConfig, clip: CLIPBundle, mlm: MLMBundle | None = None):
        super().__init__(cfg, clip, mlm)
        if mlm is None:
            raise ValueError(f"mode {self.name!r} needs a masked LM for BERT-Attack (MLM=<dir or id>)")
        self.text_attack = cfg.attack.text

    def _attack_texts(self, texts: list[str], images: torch.Tensor) -> list[str]:
        """Each caption's words replaced to lower its cosine to its (clean or adversarial) image."""
        def attack() -> list[str]:
            with torch.no_grad():
                goal = image_similarity_goal(self.clip.encode_images(images).float())
            return self.text_attack(self.clip, self.mlm, texts, goal).texts

        return self._timed("text_attack", attack)

    def _attack_images(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        features = self._text_features(texts)
        scale = self.clip.logit_scale.detach()
        return self._pgd(images, lambda x: info_nce(self.clip.encode_images(x), features, scale))

    def __call__(self, net: nn.Module, batch: Batch) -> Terms:
        self.timings = {}
        images, texts = batch["images"], batch["texts"]
        order = self.cfg.attack.order
        if order == "text-first":
            adv_texts = self._attack_texts(texts, images)
            adv_images = self._attack_images(images, adv_texts)
        elif order == "image-first":
            adv_images = self._attack_images(images, texts)
            adv_texts = self._attack_texts(texts, adv_images)
        else:  # joint: both perturbations computed from the clean pair
            adv_texts = self._attack_texts(texts, images)
            adv_images = self._attack_images(images, texts)
        return self._contrastive(net, adv_images, adv_texts)


class MATPlus(MAT):
    """MAT on one-to-many augmented data: identical step, the loader draws pairs from the chosen stages."""

    name = "matplus"  # its needs and default stages are declared in pipeline/train/registry.py


def build_mode(cfg: TrainConfig, clip: CLIPBundle, mlm: MLMBundle | None = None) -> Mode:
    if "itm" in cfg.losses and not clip.has_itm:
        raise ValueError(f"losses={','.join(cfg.losses)}: the ITM loss needs an image-text matching head, which "
                         f"{clip.family} models have not (a BLIP retrieval model has one)")
    return MODES.load(cfg.mode)(cfg, clip, mlm)
