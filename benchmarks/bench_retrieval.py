"""Retrieval at COCO's scale: peak memory and time of R@K on simulated 5,000 images x 25,000 captions.

Random 512-d features (ViT-B/16's embedding size), 5 captions per image. The measurement runs in a fresh
subprocess: peak memory is the growth of the process's resident-set high-water mark (``ru_maxrss``) across the
retrieval call, after the features are built (tracemalloc would miss torch's allocations). Target: under 1.5 GB;
the similarity matrix alone is 500 MB of float32. That the chunked ranks equal the straightforward ones is
tested in tests/test_retrieval.py.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

N_IMAGES, N_TEXTS, DIM = 5_000, 25_000, 512


def measure() -> dict[str, float]:
    import torch

    from pipeline.evaluation.retrieval import recall_at_k, similarity

    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(N_IMAGES, DIM, generator=g), torch.randn(N_TEXTS, DIM, generator=g)
    txt2img = torch.arange(N_TEXTS) // (N_TEXTS // N_IMAGES)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    recall_at_k(similarity(img, txt), txt2img)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"retrieval_5k_x_25k_seconds": round(seconds, 2),
            "retrieval_5k_x_25k_peak_mb": round((after - before) / 1024, 1),
            "retrieval_5k_x_25k_process_peak_mb": round(after / 1024, 1)}


def run() -> dict[str, float]:
    done = subprocess.run([sys.executable, str(Path(__file__).resolve())], capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(measure()))
