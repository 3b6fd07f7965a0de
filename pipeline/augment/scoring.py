"""CLIP scorer: per-variant alignment / src_sim / shift and per-shard feature stats, from one place.

Hooks the stage runner calls (see docs/architecture.md):

    scorer = load_scorer(spec, dataset, layout)          # driver; None => scoring skipped (logged)
    scorer.prepare(base_dir)                             # driver, once: reference Gaussians (cached .npz);
                                                         # or prepare(bases), the fingerprints of base shard URLs
    features = scorer.score_shard(samples, results, m)   # worker, per shard: fills variant.extra, returns stats

Per variant: ``alignment`` = cosine(image, text) of the pair the variant forms (raw cosine, as DataComp's
clip-score); ``src_sim`` = cosine to the original in the changed modality (diversity = 1 - src_sim);
``shift`` = RMS Mahalanobis distance under the Gaussian of the original features of that modality (about 1
for a typical original), the per-sample view of the Frechet distance.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.fileio import atomic_write_bytes, sha256_files
from pipeline.core.config import check_device, check_positive, check_range
from pipeline.core.images import decode_rgb
from pipeline.core.metrics import FeatureStats, MahalanobisReference, RunningGaussian
from pipeline.core.paths import Layout
from pipeline.core.schema import base_record
from pipeline.models.errors import ModelNotFoundError, check_local

log = logging.getLogger(__name__)

SIDES = ("image", "text")
SIDES_BY_MODALITY: dict[str, tuple[str, ...]] = {"text": ("text",), "image": ("image",), "both": ("image", "text")}
DISABLED_SPECS = frozenset({"none", "off", "false", "0"})


@dataclass(frozen=True)
class ScorerConfig:
    model: str
    batch_size: int = 64
    device: str = "auto"  # "auto" = cuda when available
    precision: str = "auto"  # auto: bf16 where the hardware runs it natively (models.resolve_precision)
    # Mahalanobis shift: shrink the reference covariance this much towards a scaled identity. Light, so a
    # direction the originals never vary in (off their manifold) still counts as far; enough to invert n < dim.
    shrinkage: float = 0.01
    reference_samples: int = 20_000  # base images (and their captions) the reference Gaussians are fitted on

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("scorer model must be a hub id or a directory, got an empty string")
        check_positive(self, "batch_size", "shrinkage")
        check_range("shrinkage", self.shrinkage, 0.0, 1.0)
        check_device("device", self.device)
        if self.reference_samples < 2:
            raise ValueError(f"reference_samples={self.reference_samples!r}: must be >= 2")


def _weights_digest(directory: Path) -> str:
    return sha256_files(sorted(directory.glob("*.safetensors")) + sorted(directory.glob("*.bin")))[:16]


def _files_stamp(model: str) -> tuple:
    """What a local model folder's files are (name, size, mtime), to tell a model saved again in the same place
    from the one loaded before; empty for a hub id."""
    directory = Path(model).expanduser()
    if not directory.is_dir():
        return ()
    return tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(directory.iterdir()) if p.is_file())


#: The scorer model this process loaded last, by (model, device, files): every shard of a worker process shares it
#: (each shard's job carries its own unpickled Scorer, which loaded the model again, and printed transformers'
#: "Loading weights" bar again, once per shard).
_LOADED: dict[tuple, Any] = {}


class Scorer:
    """Picklable: the model is loaded lazily in whichever process scores; references travel as arrays."""

    def __init__(self, config: ScorerConfig, cache_dir: Path) -> None:
        self.config = config
        self.cache_dir = Path(cache_dir)
        self.references: dict[str, MahalanobisReference] = {}
        self.shift_percentiles: dict[str, np.ndarray] = {}  # percentiles 0..100 of the originals' own shift
        self._revision: str | None = None
        self._bundle = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_bundle"] = None
        return state

    # ------------------------------------------------------------------------------------ model

    @property
    def device(self) -> str:
        from pipeline.models.device import resolve_device

        return str(resolve_device(self.config.device))

    @property
    def bundle(self):
        """The model, loaded once per process (see ``_LOADED``)."""
        if self._bundle is None:
            key = (self.config.model, self.device, _files_stamp(self.config.model))
            if key not in _LOADED:
                from pipeline.models.loading import load_model

                bundle = load_model(self.config.model, device=self.device)
                bundle.model.requires_grad_(False)
                _LOADED.clear()  # one model held: a process scoring with another model lets the former go
                _LOADED[key] = bundle
            self._bundle = _LOADED[key]
        return self._bundle

    def revision(self) -> str:
        """Content digest of a local directory's weights, or the hub commit the weights came from."""
        if self._revision is None:
            local = Path(self.config.model).expanduser()
            if local.is_dir():
                self._revision = "sha256:" + _weights_digest(local)
            else:
                self._revision = str(getattr(getattr(self.bundle.model, "config", None), "_commit_hash", None) or "unknown")
        return self._revision

    def describe(self) -> dict[str, Any]:
        from pipeline.models.device import resolve_precision

        local = Path(self.config.model).expanduser()
        path = str(local.resolve()) if local.is_dir() else None
        percentiles = {side: [round(float(v), 6) for v in values] for side, values in self.shift_percentiles.items()}
        return {"name": self.config.model, "path": path, "revision": self.revision(), **asdict(self.config),
                "precision_resolved": resolve_precision(self.config.precision, self.device),
                "reference_shift_percentiles": percentiles}

    def _run(self, encode: Callable[[Any], Any], batches: Sequence[Any], prepare: Callable[[Any], Any]) -> np.ndarray:
        """Encode batches while threads prepare (decode, resize, tokenize) the next ones."""
        import torch

        from pipeline.models.device import autocast

        if not batches:
            return np.zeros((0, self.dim), dtype=np.float32)
        ahead = max(1, min(4, (os.cpu_count() or 2) - 1))
        outputs = []
        with ThreadPoolExecutor(max_workers=ahead) as pool, torch.inference_mode():
            pending = [pool.submit(prepare, batch) for batch in batches[: ahead + 1]]
            for index in range(len(batches)):
                ready = pending[index].result()
                if index + ahead + 1 < len(batches):
                    pending.append(pool.submit(prepare, batches[index + ahead + 1]))
                pending[index] = None  # free the prepared batch once used
                with autocast(self.device, self.config.precision):
                    features = encode(ready)
                # normalise in float32: under bf16 autocast the norms would be off by ~1e-3
                outputs.append(torch.nn.functional.normalize(features.float(), dim=-1).cpu())
        return torch.cat(outputs).numpy()

    def _batches(self, items: Sequence[Any]) -> list[Sequence[Any]]:
        size = self.config.batch_size
        return [items[i : i + size] for i in range(0, len(items), size)]

    def embed_images(self, images: Sequence[Any]) -> np.ndarray:
        """PIL images or JPEG bytes -> L2-normalised float32 embeddings [N, D]."""

        def prepare(batch: Sequence[Any]):
            pil = [decode_rgb(item) if isinstance(item, bytes) else item for item in batch]
            return self.bundle.preprocess(pil).to(self.device, non_blocking=True)

        return self._run(self.bundle.image_features, self._batches(list(images)), prepare)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Strings -> L2-normalised float32 embeddings [N, D]; duplicates are encoded once."""
        unique = list(dict.fromkeys(texts))
        embedded = self._run(self.bundle.text_features, self._batches(unique), self.bundle.tokenize)
        row = {text: i for i, text in enumerate(unique)}
        return embedded[[row[text] for text in texts]] if len(texts) else embedded

    @property
    def dim(self) -> int:
        return int(self.bundle.embed_dim)

    # ------------------------------------------------------------------------------ reference

    def prepare(self, base: Path | list[Any]) -> None:
        """Fit (or load from cache) the Gaussians of the original image and caption features of the base: the
        dataset's base folder, or shard_urls.Fingerprint's of base shard URLs (same cache key for the same shards)."""
        from pipeline.core.shards import list_shards, read_stats

        if isinstance(base, (str, Path)):
            stats = [(p, read_stats(p) or {}) for p in list_shards(Path(base))]
            shards = [(str(p), p.name, s.get("sha256")) for p, s in stats if s.get("sha256") is not None]
            images = sum(int(s.get("samples", len(s.get("keys", ())))) for _, s in stats if s.get("sha256") is not None)
        else:
            shards = [(shard.url, shard.name, shard.sha256) for shard in base]
            images = sum(len(shard.keys) for shard in base)
        if not shards:
            raise FileNotFoundError(f"no committed base shards in {base}: run `make ingest` first")
        key = "|".join([self.revision(), str(self.config.shrinkage), str(self.config.reference_samples)]
                       + [f"{name}:{sha256}" for _, name, sha256 in shards])
        cache = self.cache_dir / f"reference-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
        if cache.exists():
            with np.load(cache) as arrays:
                self.references = {side: MahalanobisReference(arrays[f"{side}_mean"], arrays[f"{side}_precision"])
                                   for side in SIDES}
                self.shift_percentiles = {side: arrays[f"{side}_shift_percentiles"] for side in SIDES}
            log.info("scorer reference loaded from %s", cache)
            return
        features = self._reference_features([url for url, _, _ in shards], min(images, self.config.reference_samples))
        arrays = {}
        for side, rows in features.items():
            gaussian = RunningGaussian(self.dim).update(rows)
            self._check_reference(side, gaussian, len(features["image"]))
            reference = MahalanobisReference.fit(gaussian, self.config.shrinkage)
            self.references[side] = reference
            # the originals' own shift, so filters can say "farther than 99% of the originals"
            self.shift_percentiles[side] = np.percentile(reference.distance(rows), np.arange(101))
            arrays.update({f"{side}_{name}": array for name, array in reference.to_arrays().items()})
            arrays[f"{side}_shift_percentiles"] = self.shift_percentiles[side]
        cache.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        atomic_write_bytes(cache, buffer.getvalue())
        log.info("scorer reference fitted on %d images / %d captions, cached at %s",
                 len(features["image"]), len(features["text"]), cache)

    def _check_reference(self, side: str, gaussian: RunningGaussian, images: int) -> None:
        """A reference Gaussian needs features that vary: refused with how many images it needs when they do not
        (too few images, or all alike, e.g. one caption for every image); a warning below the feature dimension."""
        what = "images" if side == "image" else "captions"
        varied = gaussian.count >= 2 and float(np.trace(gaussian.cov)) > 1e-9  # unit vectors: total variance <= 2
        if not varied:
            alike = f"{gaussian.count} {what}, all with the same features" if gaussian.count >= 2 else \
                f"{gaussian.count} {what[:-1] if gaussian.count == 1 else what}"
            raise ValueError(
                f"the scorer's reference of the original {what} has zero variance: the {images} base image(s) "
                f"give {alike}. It needs at least 2 different {what}, and about {self.dim + 1} (the feature "
                f"dimension + 1) for shift scores that mean something: add images, or run without scores (SCORER=none)")
        if gaussian.count <= self.dim:
            log.warning("scorer reference of the %s: %d for %d feature dimensions; shift scores are rough below %d "
                        "(the covariance is shrunk to invert)", what, gaussian.count, self.dim, self.dim + 1)

    def _reference_features(self, shard_urls: list[str], total: int | None = None) -> dict[str, np.ndarray]:
        """The original image and caption features of the first ``reference_samples`` base images (``total``:
        how many that is, for the progress bar)."""
        from tqdm import tqdm

        from pipeline.core.shard_urls import read_url

        found: dict[str, list[np.ndarray]] = {side: [] for side in SIDES}
        count = 0
        total = self.config.reference_samples if total is None else total
        progress = tqdm(total=total, desc="scorer reference", unit="img", leave=False)
        for url in shard_urls:
            samples = read_url(url)[: self.config.reference_samples - count]
            found["image"].append(self.embed_images([s["jpg"] for s in samples]))
            found["text"].append(self.embed_texts([c for s in samples for c in base_record(s).captions]))
            count += len(samples)
            progress.update(len(samples))
            if count >= self.config.reference_samples:
                break
        progress.close()
        return {side: np.concatenate(rows) for side, rows in found.items()}

    # ---------------------------------------------------------------------------------- scoring

    def score_shard(self, samples: Sequence[Any], results: Sequence[Any], modality: str) -> FeatureStats:
        """Set variant.extra["alignment" | "src_sim" | "shift"] in place; return the shard's feature stats.

        ``samples[i]`` (key, image_bytes, captions) pairs with ``results[i].variants``. A variant with text
        pairs with the base image; a variant with an image pairs with caption ``caption_index`` (the primary
        caption, index 0, when it is None).
        """
        if modality not in SIDES_BY_MODALITY:
            raise ValueError(f"unknown modality {modality!r}; valid: {sorted(SIDES_BY_MODALITY)}")
        if not self.references:
            raise RuntimeError("Scorer.prepare(base_dir) must run before score_shard")
        sides = SIDES_BY_MODALITY[modality]
        flat = [(i, v) for i, result in enumerate(results) for v in result.variants]
        rows = np.array([i for i, _ in flat], dtype=np.int64)
        # 1. Which originals: every base image / caption on a changed side (for its Gaussian), else those paired.
        image_rows = list(range(len(samples))) if "image" in sides else sorted(set(rows.tolist()))
        caption_ids = ([(i, c) for i, s in enumerate(samples) for c in range(len(s.captions))] if "text" in sides
                       else sorted({(i, v.caption_index or 0) for i, v in flat}))
        has_image = [k for k, (_, v) in enumerate(flat) if v.image_jpeg is not None]
        has_text = [k for k, (_, v) in enumerate(flat) if v.text is not None]
        # 2. Embed originals and variants together, one pipelined pass per modality.
        images = self.embed_images([samples[i].image_bytes for i in image_rows] + [flat[k][1].image_jpeg for k in has_image])
        texts = self.embed_texts([samples[i].captions[c] for i, c in caption_ids] + [flat[k][1].text for k in has_text])
        base_images, var_images = images[: len(image_rows)], images[len(image_rows) :]
        captions, var_texts = texts[: len(caption_ids)], texts[len(caption_ids) :]
        # 3. Scores, vectorised over the shard's variants.
        if flat:
            image_row = {i: r for r, i in enumerate(image_rows)}
            caption_row = {ids: r for r, ids in enumerate(caption_ids)}
            own_image = base_images[[image_row[i] for i in rows]]
            own_caption = captions[[caption_row[(i, v.caption_index or 0)] for i, v in flat]]
            pair_image, pair_text = own_image.copy(), own_caption.copy()
            pair_image[has_image], pair_text[has_text] = var_images, var_texts
            alignment = np.einsum("nd,nd->n", pair_image, pair_text)
            src_sim = np.full((2, len(flat)), np.nan)
            shift = np.full((2, len(flat)), np.nan)
            for side, (at, new, old) in enumerate(((has_image, var_images, own_image), (has_text, var_texts, own_caption))):
                src_sim[side, at] = np.einsum("nd,nd->n", new, old[at])
                shift[side, at] = self.references[SIDES[side]].distance(new) if len(at) else []
            changed = ~np.isnan(src_sim).all(axis=0)  # a variant with neither text nor image changes nothing
            counts = np.maximum(changed.astype(np.int64), (~np.isnan(src_sim)).sum(axis=0))
            src_sim_mean, shift_mean = np.nansum(src_sim, axis=0) / counts, np.nansum(shift, axis=0) / counts
            for k, (_, variant) in enumerate(flat):
                variant.extra["alignment"] = float(alignment[k])
                if changed[k]:
                    variant.extra["src_sim"], variant.extra["shift"] = float(src_sim_mean[k]), float(shift_mean[k])
        # 4. Feature stats of the changed sides.
        found = {"image": (base_images, var_images), "text": (captions, var_texts)}
        return {side: {role: RunningGaussian(self.dim).update(found[side][r]).to_dict()
                       for r, role in enumerate(("original", "variant"))} for side in sides}


def load_scorer(spec: str | None, dataset: str, layout: Layout, **options: Any) -> Scorer | None:
    """The scorer SCORER names (hub id or directory); by default the CLIP `make pretrain` saved for the dataset.

    Returns None when no scorer is named and no pretrained one exists, or
    when spec is "none". A named directory that does not exist (models.errors.looks_like_path) raises
    ModelNotFoundError at once.
    """
    cache_dir = layout.dataset_manifests(dataset)
    if spec is not None and spec.strip().lower() in DISABLED_SPECS:
        log.info("scoring disabled (SCORER=%s)", spec)
        return None
    if not spec:
        default = layout.model_dir(dataset, "clip")
        if not (default / "config.json").exists():
            return None  # the caller says scoring was skipped and how to enable it
        spec = str(default)
    local = Path(spec).expanduser()
    check_local(spec, "scorer")
    if local.is_dir() and not (local / "config.json").exists():
        raise ModelNotFoundError(f"scorer {spec!r} is not a model directory (no config.json): "
                                  "pass SCORER=<save_pretrained dir or hub id>, or run `make pretrain`")
    return Scorer(ScorerConfig(model=spec, **options), cache_dir)
