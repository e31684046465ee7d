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


# -- small real datasets for the readers, build and CLI tests (generated or copied into tmp_path) ------------

GENERATED_TEXTS = {
    "dog.txt": "A brown dog runs across a green field.",
    "beach.txt": "Children play football on a sandy beach.",
    "city.txt": "A busy city street at night with cars.",
    "snow.txt": "A skier jumps over fresh white snow.",
}


def write_generated_image(path: Path, seed: int, size: tuple[int, int] = (96, 72)) -> Path:
    """A distinct picture per seed: a coloured background with a few random rectangles and ellipses."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    img = Image.new("RGB", size, tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, size[0] - 10)), int(rng.integers(0, size[1] - 10))
        box = (x0, y0, x0 + int(rng.integers(5, 40)), y0 + int(rng.integers(5, 40)))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.rectangle if rng.random() < 0.5 else draw.ellipse)(box, fill=fill)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


@pytest.fixture
def generated_dataset(tmp_path: Path) -> Path:
    """A flat_dir of 8 generated images and 4 short texts; needs nothing outside the repository."""
    root = tmp_path / "generated"
    for i in range(8):
        write_generated_image(root / f"img_{i:02d}.png", seed=i)
    for name, text in GENERATED_TEXTS.items():
        (root / name).write_text(text, encoding="utf-8")
    return root


def flickr_sample(flickr_dir: Path, n: int) -> list[tuple[str, str]]:
    """The first n Flickr8k dev images with their first caption, as (file name, caption)."""
    names = (flickr_dir / "splits" / "dev.txt").read_text().split()[:n]
    first: dict[str, str] = {}
    for line in (flickr_dir / "captions.tsv").read_text(encoding="utf-8").splitlines()[1:]:
        image, _, caption = line.split("\t", 2)
        first.setdefault(image, caption)
    return [(name, first[name]) for name in names]


@pytest.fixture
def flickr_flat_dataset(flickr_dir: Path, tmp_path: Path) -> Path:
    """A flat_dir of 10 Flickr8k images (copied) plus the captions of the first 4 as text files."""
    import shutil

    root = tmp_path / "flickr_flat"
    root.mkdir()
    for i, (name, caption) in enumerate(flickr_sample(flickr_dir, 10)):
        shutil.copy(flickr_dir / "images" / name, root / name)
        if i < 4:
            (root / f"caption_{i}.txt").write_text(caption, encoding="utf-8")
    return root


@pytest.fixture
def flickr_mixed_dataset(flickr_dir: Path, tmp_path: Path) -> Path:
    """A mixed_dir: 6 items with an image and its caption, one image-only and one text-only item."""
    import shutil

    root = tmp_path / "flickr_mixed"
    sample = flickr_sample(flickr_dir, 8)
    for i, (name, caption) in enumerate(sample):
        item = root / f"item_{i}"
        if i != 7:
            (item / "img").mkdir(parents=True)
            shutil.copy(flickr_dir / "images" / name, item / "img" / name)
        if i != 6:
            (item / "text").mkdir(parents=True)
            (item / "text" / "caption.txt").write_text(caption, encoding="utf-8")
    return root
