"""Rejection templates: counts, disjoint split, loading TOFU's idontknow.jsonl."""

from pathlib import Path

import pytest

from raysweep.data.loaders import DataError
from raysweep.data.templates import (PRIOR_TEMPLATES, REJECTION_TEMPLATES, UNLEARN_TEMPLATES,
                                     load_idk_templates)

SHARED = Path(__file__).resolve().parents[2] / "shared"


def test_template_counts_and_split():
    assert len(REJECTION_TEMPLATES) >= 60
    assert len(set(REJECTION_TEMPLATES)) == len(REJECTION_TEMPLATES)
    assert len(UNLEARN_TEMPLATES) >= 25 and len(PRIOR_TEMPLATES) >= 25
    assert not set(UNLEARN_TEMPLATES) & set(PRIOR_TEMPLATES)
    assert set(UNLEARN_TEMPLATES) | set(PRIOR_TEMPLATES) == set(REJECTION_TEMPLATES)
    assert all(t.strip() == t and t for t in REJECTION_TEMPLATES)


def test_load_default_is_unlearn_templates():
    assert load_idk_templates(None) == list(UNLEARN_TEMPLATES)


def test_load_file_skips_blank_lines(tmp_path):
    path = tmp_path / "idk.jsonl"
    path.write_text("I don't know.\n\n  \n\"A quoted one.\"\nNo idea\n", encoding="utf-8")
    assert load_idk_templates(path) == ["I don't know.", "A quoted one.", "No idea"]


def test_load_missing_or_empty_file_names_it(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl"):
        load_idk_templates(tmp_path / "nope.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n \n", encoding="utf-8")
    with pytest.raises(DataError, match="empty.jsonl"):
        load_idk_templates(empty)


def test_load_tofu_idontknow():
    path = SHARED / "data" / "idontknow.jsonl"
    if not path.is_file():
        pytest.skip("shared TOFU data not present")
    templates = load_idk_templates(path)
    assert len(templates) == 100
    assert templates[0] == "I'm not certain about that."
