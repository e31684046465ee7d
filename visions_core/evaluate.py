"""`python -m visions_core.evaluate`: image<->text retrieval R@K on a captioned image folder."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

import numpy as np

from visions_core.errors import UnreadableItemError, VisionsError

if TYPE_CHECKING:
    from visions_core.embedder import Embedder
    from visions_core.vectors import Matrix

CAPTION_HEADER = ("image", "caption_index", "caption")
KS = (1, 5, 10)


class Recalls(TypedDict):
    """R@1, R@5, R@10 as percentages."""

    r1: float
    r5: float
    r10: float


class EvalResult(TypedDict):
    """Both directions' recalls and the counts they were measured on."""

    i2t: Recalls
    t2i: Recalls
    images: int
    captions: int


def read_captions(path: Path) -> dict[str, list[str]]:
    """Read a captions TSV (header image, caption_index, caption) into image -> captions in index order."""
    rows: dict[str, list[tuple[int, str]]] = {}
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
            header = next(reader, None)
            if header is None or tuple(h.strip() for h in header[:3]) != CAPTION_HEADER:
                raise UnreadableItemError(f"{path}: header must be {'<TAB>'.join(CAPTION_HEADER)}")
            for line_no, row in enumerate(reader, start=2):
                if not row or not "".join(row).strip():
                    continue
                if len(row) < 3 or not row[1].strip().lstrip("-").isdigit():
                    raise UnreadableItemError(
                        f"{path}:{line_no}: expected image<TAB>caption_index<TAB>caption"
                    )
                rows.setdefault(row[0].strip(), []).append((int(row[1]), "\t".join(row[2:]).strip()))
    except (OSError, UnicodeDecodeError) as exc:
        raise UnreadableItemError(f"cannot read captions file {path}: {exc}") from exc
    return {name: [text for _, text in sorted(caps)] for name, caps in rows.items()}


def read_split(path: Path) -> list[str]:
    """Image names listed one per line (blank lines ignored)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UnreadableItemError(f"cannot read split file {path}: {exc}") from exc
    return [line.strip() for line in lines if line.strip()]


def select(captions: dict[str, list[str]], split: Sequence[str] | None) -> dict[str, list[str]]:
    """Keep the images named in split (all when None), in split order; raises if a name has no caption."""
    if split is None:
        return captions
    missing = [name for name in split if name not in captions]
    if missing:
        raise UnreadableItemError(f"{len(missing)} split images have no captions, e.g. {missing[0]}")
    return {name: captions[name] for name in dict.fromkeys(split)}


def recalls(image_vecs: Matrix, text_vecs: Matrix, text_to_image: Sequence[int]) -> EvalResult:
    """Standard R@K: i2t finds any of an image's captions in the top K, t2i finds a caption's image."""
    owner = np.asarray(text_to_image, dtype=np.int64)
    sims = np.asarray(text_vecs, dtype=np.float32) @ np.asarray(image_vecs, dtype=np.float32).T
    n_img, n_txt = sims.shape[1], sims.shape[0]
    # Rank of the true image for each caption = number of images scoring strictly higher.
    own = sims[np.arange(n_txt), owner]
    t2i_rank = (sims > own[:, None]).sum(axis=1)
    # For each image, best rank among its captions in the image's column ordering.
    col = sims.T
    order = np.argsort(-col, axis=1, kind="stable")
    is_own = owner[order] == np.arange(n_img)[:, None]
    i2t_rank = np.where(is_own.any(axis=1), is_own.argmax(axis=1), n_txt)

    def pct(ranks: np.ndarray, k: int) -> float:
        return round(100.0 * float((ranks < k).mean()), 2)

    return {
        "i2t": {"r1": pct(i2t_rank, 1), "r5": pct(i2t_rank, 5), "r10": pct(i2t_rank, 10)},
        "t2i": {"r1": pct(t2i_rank, 1), "r5": pct(t2i_rank, 5), "r10": pct(t2i_rank, 10)},
        "images": int(n_img),
        "captions": int(n_txt),
    }


def evaluate(
    embedder: Embedder,
    images_dir: Path,
    captions: dict[str, list[str]],
    batch_size: int = 32,
    progress: bool = False,
) -> EvalResult:
    """Embed every image and caption with the embedder and measure R@K in both directions."""
    from tqdm import tqdm

    from visions_core.encoders import load_image, preprocess

    names = list(captions)
    if not names:
        raise UnreadableItemError("no captioned images to evaluate")
    image_rows = []
    for start in tqdm(range(0, len(names), batch_size), desc="images", disable=not progress, unit="batch"):
        import torch

        pixels = torch.stack(
            [preprocess(load_image(Path(images_dir) / n)) for n in names[start : start + batch_size]]
        )
        image_rows.append(embedder.embed_pixels(pixels))
    texts = [t for n in names for t in captions[n]]
    owner = [i for i, n in enumerate(names) for _ in captions[n]]
    text_rows = [
        embedder.embed_texts(texts[s : s + 256])
        for s in tqdm(range(0, len(texts), 256), desc="captions", disable=not progress, unit="batch")
    ]
    return recalls(np.concatenate(image_rows), np.concatenate(text_rows), owner)


def format_table(result: EvalResult) -> str:
    """A small fixed-width table of both directions' R@K."""
    lines = [f"{'direction':<12}{'R@1':>8}{'R@5':>8}{'R@10':>8}"]
    for key, label in (("i2t", "image->text"), ("t2i", "text->image")):
        r = result[key]
        lines.append(f"{label:<12}{r['r1']:>8.2f}{r['r5']:>8.2f}{r['r10']:>8.2f}")
    lines.append(f"{result['images']} images, {result['captions']} captions")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The evaluate command's arguments."""
    p = argparse.ArgumentParser(
        prog="python -m visions_core.evaluate",
        description="Image<->text retrieval R@1/5/10 of the shipped embedder on a captioned image folder.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--images", type=Path, required=True, help="folder holding the image files")
    p.add_argument("--captions", type=Path, required=True, help="TSV: image<TAB>caption_index<TAB>caption")
    p.add_argument("--split", type=Path, default=None, help="file of image names to keep, one per line")
    p.add_argument(
        "--weights", type=Path, default=None, help="weights folder (default: the shipped weights/)"
    )
    p.add_argument("--batch-size", type=int, default=32, help="images per encoder batch")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the evaluation; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        if not args.images.is_dir():
            raise UnreadableItemError(f"images folder not found: {args.images}")
        captions = read_captions(args.captions)
        captions = select(captions, read_split(args.split) if args.split else None)
        from visions_core.embedder import load_embedder

        embedder = load_embedder(args.weights)
        result = evaluate(
            embedder, args.images, captions, batch_size=args.batch_size, progress=sys.stderr.isatty()
        )
    except VisionsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_table(result))
    print(f"aligner {embedder.aligner_id}")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
