"""Layer 7, evaluation: retrieval R@K clean and under attack, resumable, and the report over evaluations."""
