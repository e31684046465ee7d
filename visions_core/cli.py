"""The command line: `build_index` turns a folder into an index, `infer` ranks an index against a query."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from visions_core.errors import IndexExistsError, VisionsError

if TYPE_CHECKING:
    from visions_core.build import BuildReport
    from visions_core.index import FlatIndex

# Kept here, not imported from readers, so that --help never loads Pillow or torch.
LAYOUT_CHOICES = ("flat_dir", "mixed_dir", "simple_dir")
DEFAULT_TOP_N = 10
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


class _HelpFormatter(argparse.HelpFormatter):
    """Shows '(default: …)' after an option's help, but only where the default says something."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """argparse type: a whole number of at least minimum."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_item_id = _int_at_least(0)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of every subcommand (cheap: no model or image library is imported)."""
    parser = argparse.ArgumentParser(
        prog="visions",
        description="Index a folder of images and texts in a shared visual-semantic space, then rank it.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    formatter = _HelpFormatter

    build = commands.add_parser(
        "build_index",
        help="embed every item of a folder into an index",
        description="Embed every item of a folder into a flat on-disk index; bad files are skipped, listed.",
        formatter_class=formatter,
    )
    build.add_argument(
        "--data_dir", "--data_path", dest="data_dir", type=Path, required=True, help="the dataset folder"
    )
    build.add_argument("--index_path", type=Path, default=None, help="index folder (default: DATA_DIR/index)")
    build.add_argument(
        "--data_reader_type",
        choices=LAYOUT_CHOICES,
        default="flat_dir",
        help="flat_dir: every file is an item; mixed_dir (alias simple_dir): a sub-folder per item "
        "with img/ and text/",
    )
    build.add_argument(
        "--flat_bucket_size",
        type=_positive_int,
        default=None,
        help="vectors per bucket file of a new index (default: the index's measured default)",
    )
    mode = build.add_mutually_exclusive_group()
    mode.add_argument("--rebuild", action="store_true", help="empty an existing index and start over")
    mode.add_argument("--append", action="store_true", help="add only items not yet in an existing index")
    build.add_argument("--recursive", action="store_true", help="flat_dir: also read sub-folders")
    build.add_argument("--batch_size", type=_positive_int, default=32, help="items embedded per batch")
    build.add_argument("--verbose", "-v", action="store_true", help="list every skipped file with its reason")
    build.set_defaults(run=_run_build)

    infer = commands.add_parser(
        "infer",
        help="rank an index against a text, a file, an item folder or an indexed item",
        description="Print the N items of an index closest to the query, best first, as 'path score' lines.",
        formatter_class=formatter,
    )
    infer.add_argument("--index_path", type=Path, required=True, help="the index folder")
    infer.add_argument("-n", dest="n", type=_positive_int, default=DEFAULT_TOP_N, help="how many results")
    query = infer.add_mutually_exclusive_group(required=True)
    query.add_argument("--query_text", help="rank by this text")
    query.add_argument(
        "--query_path", type=Path, help="rank by this image or text file, or a mixed_dir item folder"
    )
    query.add_argument("--query_index_id", type=_item_id, help="rank by the item with this id in the index")
    infer.add_argument(
        "--data_reader_type",
        choices=LAYOUT_CHOICES,
        default="flat_dir",
        help="how to read --query_path (a folder is always read as one mixed_dir item)",
    )
    infer.add_argument("--json", action="store_true", help="also print the results as one JSON array, last")
    infer.add_argument(
        "--exclude_self", action="store_true", help="leave the query item out when it is in the index"
    )
    infer.set_defaults(run=_run_infer)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; user errors become one line on stderr and a non-zero exit code."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except VisionsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _run_build(args: argparse.Namespace) -> int:
    """build_index: embed a folder into an index with a progress bar, then print the summary."""
    from tqdm import tqdm

    from visions_core.build import build_index, default_index_path
    from visions_core.index import FlatIndex
    from visions_core.readers import check_data_dir

    index_path = args.index_path or default_index_path(args.data_dir)
    mode = "rebuild" if args.rebuild else "append" if args.append else "create"
    # Both checks come before the slow model load, so a mistyped command fails at once.
    check_data_dir(args.data_dir)
    if mode == "create" and FlatIndex.exists(index_path):
        return _index_exists_error(index_path)
    from visions_core.embedder import load_embedder

    embedder = load_embedder()
    bars: list[tqdm] = []

    def progress(done: int, total: int) -> None:
        # The bar appears with the first item, so an early error (locked index...) stays a single line.
        if not bars:
            bars.append(
                tqdm(total=total, unit=" items", desc="indexing", dynamic_ncols=True, file=sys.stderr)
            )
        bar = bars[0]
        bar.total = max(total, done)
        bar.update(done - bar.n)

    try:
        report = build_index(
            args.data_dir,
            embedder,
            index_path=index_path,
            layout=args.data_reader_type,
            bucket_size=args.flat_bucket_size,
            mode=mode,
            recursive=args.recursive,
            batch_size=args.batch_size,
            progress=progress,
        )
    except IndexExistsError:
        # Another process created it after the check above.
        return _index_exists_error(index_path)
    finally:
        for bar in bars:
            bar.close()
    _print_summary(report, args.verbose)
    return 0


def _index_exists_error(index_path: Path) -> int:
    """Explain the two ways on when an index is already there; returns the exit code."""
    print(
        f"error: an index already exists at {index_path}. Re-run with --append to add only the new files, "
        "or with --rebuild to start over.",
        file=sys.stderr,
    )
    return EXIT_ERROR


def _print_summary(report: BuildReport, verbose: bool) -> None:
    """The end-of-build lines: counts, skip reasons, and with verbose every skipped file."""
    rate = (report.added + report.updated) / report.seconds if report.seconds > 0 else 0.0
    print(
        f"added {report.added}, updated {report.updated}, already present {report.present}, "
        f"skipped {len(report.skipped)} "
        f"in {report.seconds:.1f} s ({rate:.1f} items/s) -> {report.index_path}"
    )
    if report.skipped:
        reasons = ", ".join(f"{n} {reason}" for reason, n in report.reason_counts.items())
        print(f"skipped: {reasons}" + ("" if verbose else " (--verbose lists the files)"))
    if verbose:
        for skipped in report.skipped:
            print(f"  {_printable(skipped.path)}: {skipped.reason}")


def _printable(path: str) -> str:
    """A path on one line: control characters such as newlines in file names are shown escaped."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in path)


def _run_infer(args: argparse.Namespace) -> int:
    """infer: embed the query, search the index, print 'path score' lines (and JSON when asked)."""
    from visions_core.index import FlatIndex

    with FlatIndex.open(args.index_path) as index:
        if args.query_index_id is not None:
            # The stored vector is the query: no model to load.
            vector, self_id = index.get_vector(args.query_index_id), args.query_index_id
        else:
            vector, self_id = _embed_query(args, index)
        exclude = [self_id] if args.exclude_self and self_id is not None else []
        results = index.search(vector, args.n, exclude_ids=exclude)
    for r in results:
        print(f"{_printable(r.path)} {r.score:.4f}")
    if args.json:
        rows: list[dict[str, Any]] = [
            {"id": r.id, "path": r.path, "score": round(r.score, 6), "kind": r.kind} for r in results
        ]
        print(json.dumps(rows, ensure_ascii=False))
    return 0


def _embed_query(args: argparse.Namespace, index: FlatIndex) -> tuple[Any, int | None]:
    """The query vector for --query_text / --query_path, and the id of the query item if it is indexed."""
    from visions_core import readers
    from visions_core.embedder import load_embedder
    from visions_core.search import Searcher

    embedder = load_embedder()
    searcher = Searcher(embedder, index)
    if args.query_text is not None:
        return searcher.text_vector(args.query_text), None
    loaded = readers.load_item(readers.item_at(args.query_path))
    vector = embedder.embed_item(loaded.images, loaded.texts)
    return vector, _indexed_id(index, args.query_path)


def _indexed_id(index: FlatIndex, path: Path) -> int | None:
    """The id of the item at path when it lies under the index's data root and is indexed, else None."""
    from visions_core.errors import ItemNotFoundError, UnsafePathError

    try:
        return index.get_record_by_path(path.absolute())["id"]
    except (ItemNotFoundError, UnsafePathError):
        return None
