"""`make eval`: image-text retrieval on the test split, clean and under the attacks, one JSON per evaluation.

Protocol (the one of the Co-Attack and SGA evaluation code on CLIP):

1. the test split is read whole (or its first ``size`` images): every image with *all* its captions;
2. clean: embed every image and caption, one similarity matrix images x captions; text retrieval (TR, image ->
   captions; a hit when any of the image's captions is in the top K) and image retrieval (IR, caption -> image),
   R@1/5/10 over the full matrix;
3. each attack runs white-box against the evaluated model, batch by batch: a batch of images is attacked together
   with its own captions (``run_attack`` from :mod:`pipeline.attacks`), and every adversarial image and caption
   replaces its clean one. TR and IR are then computed on the matrix *adversarial images x adversarial captions*
   (an image-only attack leaves the captions clean, a text-only one the images), as the reference code does;
4. attack success rate (ASR): the share of queries right at R@1 on clean data that the attack makes wrong
   (TR over images, IR over captions): ``tr_asr`` / ``ir_asr``; and the same at R@5 and R@10 against the clean
   ranks, as SGA reports them: ``tr_asr_r5``, ``tr_asr_r10``, ``ir_asr_r5``, ``ir_asr_r10``.

Captions are normalised as the reference evaluations read them (:func:`normalise_caption`, their
``pre_caption`` with 30 words) before anything sees them, clean or attacked; ``normalise_captions=False``
(``--no-normalise-captions``, ``CAPTION_NORMALISE=0``) keeps them as stored. Seeds: batch ``i`` of every attack
runs with the seed ``derive_seed("eval-batch", seed, i)`` (random starts, SGA's noise), so a batch's result
depends on the settings and its index only, never on the batches before it; two seeds give two draws.

Resume: each finished batch (its adversarial embeddings) and each finished attack (its row) is stored
atomically under ``evals/partial/`` (:mod:`pipeline.evaluation.resume`), keyed by a fingerprint of everything that
changes the numbers (model and masked-LM files, the test images and captions as loaded, attacks and their
resolved options, seed, size, batch size, device, precision, caption normalisation). A rerun after a crash or a
kill skips the finished attacks and batches and gives the same JSON metrics as an uninterrupted run; the partial
files go once the JSON is written, and those of other settings under the same name when a run starts.

Several processes (``torchrun --nproc-per-node N -m pipeline eval ...``; gloo on CPU, nccl on CUDA): the batches
stay the ones of a single process (batch i: images i*B to (i+1)*B-1, with all their captions, attacked with
batch i's seed) and are dealt out whole, round-robin: rank r of W attacks batches r, r+W, r+2W, .... Each rank
stores its finished batches under names that hold its rank and W; after each attack rank 0 gathers every rank's
adversarial embeddings, puts them back in batch order and computes the row, which is therefore the single
process's (the same metrics and ``embeddings_sha256``; ``seconds`` sums the batches' times over the ranks). Rank 0
alone computes the clean row, writes the partial rows, the JSON, the saved config and the trackers; every rank
returns the record. A rerun with the same W resumes each rank's batches; batch files of another W are refused
(:func:`check_world_size`): rerun with that W, or remove them as the message says. ITM re-ranking (``itm_k``)
needs every adversarial image in one process and runs in one process only.

Memory: retrieval keeps one images x captions float32 matrix and compares it in slices
(:mod:`pipeline.evaluation.retrieval`): COCO's 5,000 x 25,010 needs about 0.7 GB, not the 2.5 GB captions x captions
matrix of a direct implementation.

Settings: :class:`EvalConfig`, saved when a run starts as ``evals/tracking/<name>/config.json`` (resolved model
dirs, device and precision under "resolved"; ``eval --config <it>`` replays it).

Output: ``MANIFESTS_DIR/<dataset>/evals/<name>.json`` with mode, checkpoint, settings and metrics per attack
(each row also holds ``embeddings_sha256``, a digest of the embeddings the metrics came from: two runs with equal
digests attacked every image and caption identically; and ``per_query``: every image's TR rank and every
caption's IR rank, capped at 10 = a miss at every K), and ``captions_per_image``: what ``make study`` bootstraps.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import time
from collections.abc import Iterable, Iterator
from datetime import timedelta
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from pipeline.attacks import ATTACKS, build_attack
from pipeline.evaluation.resume import PartialStore, fingerprint, model_stamp
from pipeline.models.device import PRECISIONS, autocast, resolve_device, resolve_precision
from pipeline.models.openclip import PREFIX as OPEN_CLIP_PREFIX
from pipeline.core.images import decode_rgb
from pipeline.evaluation.itm import check_itm, itm_retrieval_metrics
from pipeline.core.paths import NAME_MAX, Layout, as_plain_name, plain_name
from pipeline.core.schema import base_record
from pipeline.core.tracking import Tracker, check_reporters
from pipeline.evaluation.retrieval import asr_at_k, attack_success_rate, recall_at_k
from pipeline.core.seeding import derive_seed
from pipeline.core.shard_urls import expand_urls, read_url
from pipeline.core.shards import require_shards
from pipeline.core.config import check_choice, check_device, check_positive, save_config
from pipeline.core.fileio import atomic_write_json
from pipeline.core.provenance import PROVENANCE_KEY, provenance
from pipeline.evaluation.config import EvalConfig
from pipeline.train.distributed import DistEnv, barrier, broadcast_from_main, gather_to_main, init_distributed

if TYPE_CHECKING:  # type hints only: transformers loads when a model does, not with the CLI
    from pipeline.models.hf import CLIPBundle, MLMBundle

log = logging.getLogger(__name__)

CLEAN = "clean"
KS = (1, 5, 10)
MAX_WORDS = 30  # SGA's paired_dataset (max_words=30)
# Several processes: how long a rank waits in a collective for the others. A resumed rank with all its batches
# stored waits for the ranks that still attack theirs (their share of one attack), longer than torch's 10 min
# (nccl); a rank that dies ends the others through torchrun, not through this timeout.
DIST_TIMEOUT = timedelta(hours=12)
_DELETED = re.compile(r"[,.'!?\"()*#:;~]")
_SPACE_RUNS = re.compile(r"\s{2,}")


def normalise_caption(caption: str, max_words: int = MAX_WORDS) -> str:
    """A caption as the reference evaluations feed it to the model.

    Same effect as ``pre_caption`` in Zoky-2020/SGA ``dataset.py`` and adversarial-for-goodness/Co-Attack
    ``dataset/utils.py`` (SGA's ``paired_dataset`` passes ``max_words=30``): lower case; the characters
    , . ' ! ? " ( ) * # : ; ~ deleted; ``-`` and ``/`` turned into spaces and ``<person>`` into ``person``; every run
    of two or more whitespace characters turned into one space (a single tab or newline stays, as there); a
    final newline and outer spaces removed; then the first ``max_words`` space-separated words kept.
    """
    text = _DELETED.sub("", caption.lower()).replace("-", " ").replace("/", " ").replace("<person>", "person")
    text = _SPACE_RUNS.sub(" ", text).rstrip("\n").strip(" ")
    return " ".join(text.split(" ")[:max_words])


@dataclass
class TestSet:
    """Test images (uint8 [N, 3, S, S], exact: preprocessing yields k/255 values) and their captions per image."""

    keys: list[str]
    images_u8: torch.Tensor
    captions: list[list[str]]
    txt2img: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.txt2img = torch.tensor([i for i, group in enumerate(self.captions) for _ in group], dtype=torch.long)

    @property
    def images(self) -> torch.Tensor:
        """All images as float [0, 1] pixels."""
        return self.images_u8.float().div_(255.0)

    def n_batches(self, batch_size: int) -> int:
        return -(-len(self.keys) // batch_size)

    def batch(self, index: int, batch_size: int) -> tuple[torch.Tensor, list[list[str]]]:
        """(float [0, 1] pixels, captions per image) of batch ``index``: images ``index * batch_size`` on."""
        start = index * batch_size
        return self.images_u8[start:start + batch_size].float().div_(255.0), self.captions[start:start + batch_size]

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, list[list[str]]]]:
        """(float [0, 1] pixels, captions per image) of consecutive images."""
        for index in range(self.n_batches(batch_size)):
            yield self.batch(index, batch_size)


def load_test_set(base_dir: Path, split: str, clip: CLIPBundle, size: int | None = None,
                  normalise: bool = True) -> TestSet:
    """The split's images (preprocessed to the model's size) with all their captions (normalised by
    :func:`normalise_caption` unless ``normalise`` is False), in shard order."""
    shards = require_shards(base_dir, split)
    return load_test_urls([str(s) for s in shards], clip, size, normalise)


def load_test_urls(urls: list[str], clip: CLIPBundle, size: int | None = None, normalise: bool = True) -> TestSet:
    """:func:`load_test_set` from shard URLs (local paths, ``pipe:`` commands; see pipeline/core/shard_urls.py)."""
    keys, images, captions = [], [], []
    for url in urls:
        for sample in read_url(url):
            record = base_record(sample)
            if not record.captions:
                continue
            keys.append(sample["__key__"])
            images.append(decode_rgb(sample["jpg"]))
            captions.append([normalise_caption(c) if normalise else c for c in record.captions])
            if size is not None and len(keys) >= size:
                break
        if size is not None and len(keys) >= size:
            break
    return TestSet(keys, clip.preprocess(images).mul_(255.0).round_().to(torch.uint8), captions)


def _run_config(run: Path) -> dict[str, Any]:
    """A training run's saved config.json ({} when it has none or it is not one)."""
    config = run / "config.json"
    try:
        saved = json.loads(config.read_text()) if config.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}
    return saved if isinstance(saved, dict) and "mode" in saved else {}


def resolve_checkpoint(checkpoint: str) -> tuple[str, str, str]:
    """(CLIP dir or spec, model name, default mode) of a training run dir (or its clip/), a CLIP dir, a hub id or
    an open_clip spec. The model name is a plain name saying which model: the run's folder name; for a folder
    named clip, the folder above and clip (MODELS_DIR/synth/clip: ``synth-clip``); a folder's or a hub id's last
    name; an open_clip spec's model and weights (``open_clip:ViT-B-32:laion2b``: ``ViT-B-32-laion2b``)."""
    path = Path(checkpoint)
    if (path / "clip").is_dir():  # a training run
        return str(path / "clip"), path.name, _run_config(path).get("mode", path.name)
    if path.name == "clip" and (run := _run_config(path.parent)):  # a training run's clip/
        return str(checkpoint), path.parent.name, run["mode"]
    if checkpoint.startswith(OPEN_CLIP_PREFIX):
        parts = checkpoint[len(OPEN_CLIP_PREFIX):].split(":")
        name = "-".join(part.rsplit("/", 1)[-1] for part in parts if part and part != "hf-hub")
    else:
        name = f"{path.parent.name}-clip" if path.name == "clip" and path.parent.name else path.name
    return str(checkpoint), as_plain_name(name), "pretrained"


def model_dataset(checkpoint: str, layout: Layout) -> str | None:
    """The dataset a model was made on, where that is known: a training run's, or <dataset> of
    MODELS_DIR/<dataset>/clip (`make pretrain`'s); None for anything else (a hub id, another folder)."""
    path = Path(checkpoint).expanduser()
    for run in (path, path.parent if path.name == "clip" else None):
        if run is not None and (run / "clip").is_dir() and (dataset := _run_config(run).get("dataset")):
            return str(dataset)
    if path.name == "clip" and path.parent.parent.resolve() == Path(layout.models_dir).resolve():
        return path.parent.name
    return None


def default_eval_name(checkpoint: str, dataset: str, layout: Layout) -> str:
    """An evaluation's name when EVAL_NAME gives none: the model's name (:func:`resolve_checkpoint`), and the
    dataset evaluated on unless the model was made on that very dataset: ``mat-synth-20260101-000000`` on synth,
    ``synth-clip-on-f30k`` for MODELS_DIR/synth/clip on f30k, ``clip-vit-base-patch16-on-coco`` for a hub model.
    A plain name (a file name; the W&B run name too)."""
    model = resolve_checkpoint(checkpoint)[1]
    if model_dataset(checkpoint, layout) == dataset:
        return model
    suffix = f"-on-{dataset}"
    return as_plain_name(model, max_length=NAME_MAX - len(suffix)) + suffix


@torch.no_grad()
def embed(clip: CLIPBundle, images: torch.Tensor, texts: list[str], batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised float embeddings of images [N, D] and texts [M, D], in chunks."""
    dim = clip.embed_dim
    img = [clip.encode_images(images[s:s + batch_size].to(clip.device)).float().cpu()
           for s in range(0, len(images), batch_size)]
    step = 4 * batch_size
    txt = [clip.encode_texts(texts[s:s + step]).float().cpu() for s in range(0, len(texts), step)]
    return torch.cat(img) if img else torch.empty(0, dim), torch.cat(txt) if txt else torch.empty(0, dim)


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, txt2img: torch.Tensor) -> dict[str, Any]:
    """TR / IR R@K (percent) and the per-query R@1 hits (kept to compute ASR) on the full similarity matrix, and
    ``embeddings_sha256``, a digest of the embeddings: equal digests mean the same (adversarial) embeddings, the
    check that a resumed or repeated evaluation reproduced the attacks exactly."""
    out = recall_at_k(image_emb @ text_emb.T, txt2img, KS)
    digest = hashlib.sha256(image_emb.float().contiguous().numpy())
    digest.update(text_emb.float().contiguous().numpy())
    out["embeddings_sha256"] = digest.hexdigest()
    return out


def batch_seed(seed: int, index: int) -> int:
    """The attacks' seed for batch ``index``: from the evaluation seed and the index only."""
    return derive_seed("eval-batch", seed, index)


def attacked_embeddings(clip: CLIPBundle, mlm: MLMBundle | None, data: TestSet, attack: str, cfg: EvalConfig,
                        store: PartialStore | None = None, source: Any = None, source_data: TestSet | None = None,
                        keep: list | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(adversarial image embeddings, adversarial caption embeddings, attack seconds) of the whole test set.

    Each batch is attacked with its own captions and :func:`batch_seed`; batches finished in ``store`` are read
    from it and new ones written to it as they finish. Transfer: ``source`` (another model) crafts the attacks on
    ``source_data`` (the same images at its size); adversarial images of another size are resized to ours
    (:func:`to_target_size`). ``keep`` collects each batch's adversarial images and captions (ITM re-ranking).
    """
    done = attack_batches(clip, mlm, data, attack, cfg, range(data.n_batches(cfg.batch_size)), store, source,
                          source_data, keep)
    return join_batches(done, data.n_batches(cfg.batch_size))


def attack_batches(clip: CLIPBundle, mlm: MLMBundle | None, data: TestSet, attack: str, cfg: EvalConfig,
                   indices: Iterable[int], store: PartialStore | None = None, source: Any = None,
                   source_data: TestSet | None = None, keep: list | None = None,
                   progress: bool = True) -> dict[int, tuple[torch.Tensor, torch.Tensor, float]]:
    """{batch index: (adversarial image embeddings, adversarial caption embeddings, seconds)} of the batches
    ``indices`` (global indices: batch i is the same images with any number of processes), as
    :func:`attacked_embeddings` makes them."""
    indices = list(indices)
    out: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}
    reused = 0
    attacked = source if source is not None else clip
    for index in tqdm(indices, desc=f"eval {attack}", unit="batch", leave=False, disable=not progress):
        done = store.load_batch(attack, index) if store is not None else None
        if done is None:
            images, captions = (source_data or data).batch(index, cfg.batch_size)
            start = time.perf_counter()
            attacker = build_attack(attack, **cfg.attack_options(), seed=batch_seed(cfg.seed, index))
            with autocast(clip.device, cfg.precision):
                result = attacker(attacked, mlm, images, captions)
                adv = to_target_size(result.images, clip.image_size)
                if keep is not None:
                    keep.append((adv.cpu(), [t for group in result.texts for t in group]))
                img, txt = embed(clip, adv, [t for group in result.texts for t in group], cfg.batch_size)
            done = img, txt, time.perf_counter() - start
            if store is not None:
                store.save_batch(attack, index, *done)
        else:
            reused += 1
        out[index] = done
    if reused:
        log.info("%s: %d of %d batches taken from an interrupted run", attack, reused, len(indices))
    return out


def join_batches(done: dict[int, tuple[torch.Tensor, torch.Tensor, float]],
                 total: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The batches 0 .. total-1 of :func:`attack_batches` (from one rank or all) put together in batch order:
    (image embeddings, caption embeddings, summed seconds)."""
    missing = sorted(set(range(total)) - set(done))
    if missing or len(done) != total:
        raise RuntimeError(f"batches missing from the attacked set: {missing[:10]} (of {total})")
    ordered = [done[i] for i in range(total)]
    return (torch.cat([d[0] for d in ordered]), torch.cat([d[1] for d in ordered]),
            sum(d[2] for d in ordered))


def rank_batches(total: int, env: DistEnv) -> range:
    """The global batches rank ``env.rank`` of ``env.world_size`` attacks: whole batches, dealt round-robin."""
    return range(env.rank, total, env.world_size)


def check_world_size(store: PartialStore, env: DistEnv) -> None:
    """Refuse to start over batch files stored by a run with another number of processes (ValueError on every
    rank: rank 0 looks, the others take its answer). They are valid results, so they are neither reused under
    another split nor removed: rerun with their number of processes to resume them, or remove them."""
    others = broadcast_from_main(store.other_world_sizes() if env.is_main else None)
    if not others:
        return
    world = max(others, key=lambda w: len(others[w]))
    how = "one process" if world == 1 else f"{world} processes (torchrun: nodes x --nproc-per-node = {world})"
    files = [path for paths in others.values() for path in paths]
    raise ValueError(
        f"evaluation {store.name!r} was interrupted in a run of {' and '.join(map(str, sorted(others)))} "
        f"process(es), whose {len(files)} finished batch file(s) this run of {env.world_size} does not read: "
        f"rerun with {how} to resume them, or remove them to start the unfinished attacks over: "
        f"rm {' '.join(store.batch_patterns(files))}")


def to_target_size(images01: torch.Tensor, size: int) -> torch.Tensor:
    """Adversarial images of a transfer source resized (bicubic, antialiased, clipped to [0, 1]) to the evaluated
    model's input size; images already at that size are returned as they are."""
    if images01.shape[-1] == size and images01.shape[-2] == size:
        return images01
    from torchvision.transforms.v2 import functional as TF

    return TF.resize(images01, [size, size], interpolation=TF.InterpolationMode.BICUBIC, antialias=True).clamp(0, 1)


def resume_fingerprint(cfg: EvalConfig, device: str, precision: str, clip_dir: str, mlm_dir: str | None,
                       data: TestSet) -> str:
    """Fingerprint of everything that changes an evaluation's numbers (the key of its partial results)."""
    content = hashlib.sha256(json.dumps([data.keys, data.captions]).encode())
    content.update(data.images_u8.contiguous().numpy())
    labels = {"name", "mode", "checkpoint", "mlm", "device", "precision", "report_to", "wandb_mode"}  # labels, or resolved
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in labels}
    settings.update(device=device, precision=precision, clip=model_stamp(clip_dir), data=content.hexdigest(),
                    mlm=model_stamp(mlm_dir) if mlm_dir else None,
                    resolved_attacks={a: repr(build_attack(a, **cfg.attack_options())) for a in cfg.attacks})
    if cfg.attack_source:
        settings["attack_source"] = model_stamp(resolve_checkpoint(cfg.attack_source)[0])
    return fingerprint(settings)


def _row(metrics: dict[str, Any], clean: dict[str, Any] | None, seconds: float, n_images: int) -> dict[str, Any]:
    row = {k: v for k, v in metrics.items() if not k.startswith("_")}
    for side in ("tr", "ir"):
        hits, ranks = f"_{side}_hits", f"_{side}_rank"
        row[f"{side}_asr"] = attack_success_rate(clean[hits], metrics[hits]) if clean is not None else 0.0
        for k in KS[1:]:  # SGA's ASR at R@5 and R@10
            row[f"{side}_asr_r{k}"] = asr_at_k(clean[ranks], metrics[ranks], k) if clean is not None else 0.0
    row["seconds"] = round(seconds, 2)
    row["seconds_per_image"] = round(seconds / max(n_images, 1), 4)
    # Per-query ranks, capped at max(KS) (= a miss at every K): the bootstrap of `make study` resamples them.
    row["per_query"] = {side: metrics[f"_{side}"].clamp(max=max(KS)).tolist() for side in ("tr_rank", "ir_rank")}
    return row


def model_specs(cfg: EvalConfig, layout: Layout, clip_dir: str) -> tuple[str | None, str | None]:
    """The attack source and the masked LM of an evaluation (None: not used), checked with the CLIP before any
    loads: a named folder that is not there, or a default masked LM that `make pretrain` has not made, is an
    error naming it."""
    from pipeline.models.errors import default_model
    from pipeline.models.loading import check_model_spec

    source_dir = resolve_checkpoint(cfg.attack_source)[0] if cfg.attack_source else None
    mlm_dir = None
    if any("mlm" in ATTACKS.get(a).needs for a in cfg.attacks):
        image_only = ",".join(a for a in cfg.attacks if "mlm" not in ATTACKS.get(a).needs)
        mlm_dir = cfg.mlm or default_model(layout.model_dir(cfg.dataset, "mlm"), "masked LM", cfg.dataset, "MLM",
                                           f", or evaluate without the text attacks (ATTACKS={image_only!r})")
    for spec in (clip_dir, source_dir, mlm_dir):
        if spec:
            check_model_spec(spec)
    return source_dir, mlm_dir


def evaluate(cfg: EvalConfig, layout: Layout | None = None) -> dict[str, Any]:
    """Run one evaluation and write its JSON; returns the record written (on every rank, under torchrun)."""
    # 1. Resolve (the config validated itself when built).
    if not cfg.checkpoint:
        raise ValueError("checkpoint: required (CKPT=<training run dir, CLIP dir or hub id>)")
    layout = layout or Layout.from_env()
    env = init_distributed(cfg.device, timeout=DIST_TIMEOUT)
    if env.distributed and cfg.itm_k:
        raise ValueError(f"itm_k={cfg.itm_k}: ITM re-ranking needs every adversarial image in one process; "
                         f"run it in one process, not {env.world_size}")
    device = str(resolve_device(cfg.device))  # as a single process names it: the same fingerprint on every rank
    clip_dir, _, default_mode = resolve_checkpoint(cfg.checkpoint)
    name, mode = cfg.name or default_eval_name(cfg.checkpoint, cfg.dataset, layout), cfg.mode or default_mode
    out = eval_path(layout, cfg.dataset, name)  # refuses a name that is not plain before any work
    if not cfg.data:  # the data, then the models, are there before any model loads
        require_shards(layout.base_dir(cfg.dataset), cfg.split)
    source_dir, mlm_dir = model_specs(cfg, layout, clip_dir)
    precision = resolve_precision(cfg.precision, device)
    torch.manual_seed(cfg.seed)
    # 2. Models and data; the store of partial results.
    from pipeline.models.hf import load_mlm
    from pipeline.models.loading import load_model

    clip = load_model(clip_dir, device=env.device)
    check_itm(clip, cfg.itm_k)
    source = load_model(source_dir, device=env.device) if source_dir else None
    mlm = load_mlm(mlm_dir, device=env.device) if mlm_dir else None
    def load_data(model: Any) -> TestSet:
        if cfg.data:
            return load_test_urls(expand_urls(cfg.data), model, cfg.size, cfg.normalise_captions)
        return load_test_set(layout.base_dir(cfg.dataset), cfg.split, model, cfg.size, cfg.normalise_captions)

    data = load_data(clip)
    # Transfer from a model of another input size: it attacks the images preprocessed at its own size.
    source_data = load_data(source) if source is not None and source.image_size != clip.image_size else None
    settings_fp = resume_fingerprint(cfg, device, precision, clip_dir, mlm_dir, data)
    check_same_settings(settings_fp, env)
    store = PartialStore(layout.eval_partial_dir(cfg.dataset), name, settings_fp, env.rank, env.world_size)
    if env.is_main:
        store.drop_stale()
        save_config(cfg, layout.eval_tracking_dir(cfg.dataset, name) / "config.json",
                    resolved={"name": name, "mode": mode, "model_dir": clip_dir, "mlm_dir": mlm_dir, "device": device,
                              "precision": precision})
    check_world_size(store, env)
    texts = [t for group in data.captions for t in group]
    total = data.n_batches(cfg.batch_size)
    mine = rank_batches(total, env)
    log.info("eval %s (%s): %d images, %d captions, attacks %s%s", name, mode, len(data.keys), len(texts),
             cfg.attacks, f"; rank {env.rank} of {env.world_size}: {len(mine)} of {total} batches"
             if env.distributed else "")
    # 3. Clean retrieval (rank 0; the other ranks start on their batches meanwhile).
    results: dict[str, Any] = {}
    if env.is_main:
        start = time.perf_counter()
        with autocast(env.device, cfg.precision):
            image_emb = torch.cat([embed(clip, images, [], cfg.batch_size)[0]
                                   for images, _ in data.batches(cfg.batch_size)])
            _, text_emb = embed(clip, torch.empty(0, 3, clip.image_size, clip.image_size), texts, cfg.batch_size)
            clean = retrieval_metrics(image_emb, text_emb, data.txt2img)
            if cfg.itm_k:
                clean = itm_retrieval_metrics(clip, data.images, texts, image_emb, text_emb, data.txt2img, cfg.itm_k,
                                              KS, cfg.batch_size)
        results[CLEAN] = _row(clean, None, time.perf_counter() - start, len(data.keys))
    # 4. Each attack: every rank its own batches, then rank 0 the row from all of them.
    for attack in cfg.attacks:
        row = broadcast_from_main(store.finished(attack) if env.is_main else None)
        if row is None:
            keep = [] if cfg.itm_k else None  # ITM re-ranking needs the adversarial images: no per-batch resume
            done = attack_batches(clip, mlm, data, attack, cfg, mine, store if keep is None else None, source,
                                  source_data, keep, progress=env.is_main)
            gathered = gather_to_main(done)
            if env.is_main:
                every = {index: batch for part in gathered for index, batch in part.items()}
                adv_image_emb, adv_text_emb, seconds = join_batches(every, total)
                start = time.perf_counter()
                metrics = retrieval_metrics(adv_image_emb, adv_text_emb, data.txt2img)
                if keep:
                    metrics = itm_retrieval_metrics(clip, torch.cat([k[0] for k in keep]),
                                                    [t for _, ts in keep for t in ts], adv_image_emb, adv_text_emb,
                                                    data.txt2img, cfg.itm_k, KS, cfg.batch_size)
                row = _row(metrics, clean, seconds + time.perf_counter() - start, len(data.keys))
                row["setting"] = "transfer" if source is not None else "white-box"
                store.finish(attack, row)
            row = broadcast_from_main(row)  # the row is stored: the other ranks may drop their batch files
        else:
            log.info("%s: finished in an interrupted run with the same settings", attack)
        store.drop_batches(attack)  # each rank its own (also those a kill left after the row was stored)
        barrier()  # before the next attack, and before rank 0 removes what is left
        results[attack] = row
        if env.is_main:
            log.info("%s %s: TR@1 %.1f IR@1 %.1f (ASR %.1f / %.1f) in %.0f s", name, attack, results[attack]["tr_r1"],
                     results[attack]["ir_r1"], results[attack]["tr_asr"], results[attack]["ir_asr"],
                     results[attack]["seconds"])
    # 5. Write (rank 0), then every rank returns the record.
    record = None
    if env.is_main:
        record = {"name": name, "mode": mode, "checkpoint": str(cfg.checkpoint), "model_dir": clip_dir,
                  "dataset": cfg.dataset, "split": cfg.split, "n_images": len(data.keys), "n_texts": len(texts),
                  "captions_per_image": [len(group) for group in data.captions], "precision": precision,
                  "settings": dataclasses.asdict(cfg), "attack_options": cfg.attack_options(), "metrics": results,
                  "time": time.strftime("%Y-%m-%d %H:%M:%S"), **transfer_fields(cfg, clip, source, source_dir),
                  PROVENANCE_KEY: {**provenance(device, precision), "processes": env.world_size}}
        atomic_write_json(out, record)
        store.remove()
        log.info("wrote %s", out)
        track(record, cfg, layout.eval_tracking_dir(cfg.dataset, name))
    return broadcast_from_main(record)


def check_same_settings(settings_fp: str, env: DistEnv) -> None:
    """Every rank loaded the same models and test data with the same settings (ValueError on every rank if not:
    a node that sees other files would attack other images)."""
    seen = broadcast_from_main(gather_to_main(settings_fp))
    if len(set(seen)) > 1:
        raise ValueError("the ranks disagree on the evaluation's models, data or settings (fingerprints "
                         f"{', '.join(fp[:16] for fp in seen)}): every node must see the same files")


def transfer_fields(cfg: EvalConfig, clip: Any, source: Any, source_dir: str | None) -> dict[str, Any]:
    """The record's attack setting: white-box (attacks crafted on the evaluated model) or transfer (on
    ``attack_source``), the source's family and, for sources of another input size, the resize applied."""
    out: dict[str, Any] = {"attack_setting": "white-box" if source is None else "transfer", "family": clip.family,
                           "itm_k": cfg.itm_k}
    if source is not None:
        out.update(attack_source=cfg.attack_source, source_model_dir=source_dir, source_family=source.family,
                   transfer_resize=None if source.image_size == clip.image_size else
                   f"adversarial images resized {source.image_size} -> {clip.image_size} px (bicubic, antialiased)")
    return out


def track(record: dict[str, Any], cfg: EvalConfig, log_dir: Path) -> None:
    """The evaluation's metrics to the trackers of ``cfg.report_to``: ``eval/<attack>/<metric>`` at step 0."""
    tracker = Tracker(log_dir, cfg.report_to, record["settings"], name=record["name"], wandb_mode=cfg.wandb_mode)
    for attack, row in record["metrics"].items():
        tracker.log(0, {k: v for k, v in row.items() if isinstance(v, (int, float))}, prefix=f"eval/{attack}")
    tracker.close()


def eval_path(layout: Layout, dataset: str, name: str) -> Path:
    return layout.eval_path(dataset, name)
