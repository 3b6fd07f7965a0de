"""Layer 4, curation: per-stage statistics, filters over the scored variants, and export of the kept pairs."""
