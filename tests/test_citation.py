"""LICENSE and CITATION.cff: the licence is MIT, and the citation file is well-formed CFF 1.2.0 YAML citing this
software and, as preferred citation, the paper it implements (arXiv:2405.18770)."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_license_is_mit_with_the_authors_line() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "Copyright (c) 2026 The MAT pipeline authors" in text


def test_citation_file_is_cff_with_the_required_keys_and_the_paper() -> None:
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert {"cff-version", "message", "title", "authors"} <= set(cff)
    assert cff["cff-version"] == "1.2.0" and cff["license"] == "MIT"
    assert all(isinstance(a, dict) and (a.get("name") or a.get("family-names")) for a in cff["authors"])
    paper = cff["preferred-citation"]
    assert {"type", "title", "authors"} <= set(paper)
    assert [(a["given-names"], a["family-names"]) for a in paper["authors"]] == [
        ("Futa", "Waseda"), ("Antonio", "Tejero-de-Pablos"), ("Isao", "Echizen")]
    assert paper["title"] == ("Multimodal Adversarial Defense for Vision-Language Models by Leveraging "
                              "One-To-Many Relationships")
    assert {"type": "other", "value": "arXiv:2405.18770", "description": "arXiv identifier"} in paper["identifiers"]
