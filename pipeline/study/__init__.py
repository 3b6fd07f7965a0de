"""Layer 8, the study: the paper's comparisons as a resumable plan of train/eval units, with intervals."""
