"""Shared fixtures: the Flickr8k location (skip when absent) and one real embedder per test session."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
FLICKR_DIR = Path(os.environ.get("VISIONS_FLICKR8K", ROOT.parent / "shared" / "data" / "flickr8k"))


@pytest.fixture(scope="session")
def flickr_dir() -> Path:
    """The shared Flickr8k folder; tests needing it skip with a reason on a clone without ../shared."""
    if not (FLICKR_DIR / "captions.tsv").is_file():
        pytest.skip(f"Flickr8k not found at {FLICKR_DIR} (set VISIONS_FLICKR8K or clone beside ../shared)")
    return FLICKR_DIR


@pytest.fixture(scope="session")
def embedder():
    """The real shipped encoders and aligners, loaded once for the whole test session."""
    from visions_core.embedder import load_embedder

    return load_embedder()
