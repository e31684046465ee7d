"""Encoder forward rate per speed recipe: eager fp32, channels-last, TorchScript, ONNX Runtime, int8, bf16.

Times the project's ImageEncoder and TextEncoder on the same pre-decoded real images and tokenised captions,
every recipe called in turn each round (the machine is shared and noisy: ratios within one run count), and
checks each recipe against eager fp32 (lowest cosine over the batch). Prints a table; the last line is
one JSON object {"threads", "batch", "results": [{"encoder", "recipe", "per_s", "speedup", "min_cos"}, ...]}.

Usage: python benchmarks/bench_encoders.py [--batch 32] [--repeats 5] [--compile] [--bf16] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from benchlib import captions, image_files, interleaved_ms, parser_with_inputs, print_table

Recipe = Callable[[], object]


def pixels(folder: Path, count: int) -> object:
    """A (count, 3, 224, 224) batch of real images through the project's own decode and preprocess."""
    import torch

    from visions_core.encoders import load_image, preprocess

    files = image_files(folder, count)
    if not files:
        raise SystemExit(f"no images in {folder}")
    batch = torch.stack([preprocess(load_image(f)) for f in files])
    # Fewer files than asked: repeat them, the forward cost does not depend on the pixels.
    return batch.repeat((count + len(batch) - 1) // len(batch), 1, 1, 1)[:count]


def image_recipes(batch: object, use_compile: bool, use_bf16: bool) -> dict[str, Recipe]:
    """Zero-argument forward calls of the image encoder, one per recipe, all over the same batch."""
    import torch

    from visions_core.encoders import ImageEncoder, OnnxEncoder, fast_encoder

    eager = ImageEncoder().eval()
    onnx = fast_encoder(eager, torch.device("cpu"))
    assert isinstance(onnx, OnnxEncoder), "onnxruntime is not installed"
    last = batch.contiguous(memory_format=torch.channels_last)
    cl_model = ImageEncoder(eager.net).to(memory_format=torch.channels_last).eval()
    with torch.inference_mode():
        # freeze folds BatchNorm into the convolutions and lets oneDNN fuse conv + activation.
        frozen = torch.jit.freeze(torch.jit.trace(eager, batch[:2]))
        frozen_cl = torch.jit.freeze(torch.jit.trace(cl_model, last[:2]))
        optimized = torch.jit.optimize_for_inference(torch.jit.trace(eager, batch[:2]))
    recipes: dict[str, Recipe] = {
        "eager fp32": lambda: eager(batch),
        "channels_last": lambda: cl_model(last),
        "jit trace+freeze": lambda: frozen(batch),
        "jit trace+freeze, channels_last": lambda: frozen_cl(last),
        "jit optimize_for_inference": lambda: optimized(batch),
        "onnxruntime": lambda: onnx(batch),
    }
    return with_opt_in(recipes, eager, batch, use_compile, use_bf16)


def text_recipes(texts: list[str], use_compile: bool, use_bf16: bool) -> dict[str, Recipe]:
    """Zero-argument forward calls of the text encoder, one per recipe, on the same tokenised captions."""
    import torch

    from visions_core.encoders import OnnxEncoder, TextEncoder, fast_encoder

    eager = TextEncoder().eval()
    tokens = eager.tokenize(texts)
    onnx = fast_encoder(eager, torch.device("cpu"))
    assert isinstance(onnx, OnnxEncoder), "onnxruntime is not installed"
    int8 = TextEncoder().eval()
    # Dynamic int8 quantises the Linear layers, which hold almost all of MiniLM's compute.
    int8.model = torch.ao.quantization.quantize_dynamic(int8.model, {torch.nn.Linear}, dtype=torch.qint8)
    recipes: dict[str, Recipe] = {
        "eager fp32": lambda: eager(tokens),
        "dynamic int8 (Linear)": lambda: int8(tokens),
        "onnxruntime": lambda: onnx(tokens),
        "tokenize + eager fp32": lambda: eager(eager.tokenize(texts)),
    }
    return with_opt_in(recipes, eager, tokens, use_compile, use_bf16)


def with_opt_in(
    recipes: dict[str, Recipe], eager: object, inputs: object, use_compile: bool, use_bf16: bool
) -> dict[str, Recipe]:
    """Add the torch.compile and bf16 recipes when asked (both take minutes on this kind of machine)."""
    import torch

    if use_compile:
        compiled = torch.compile(eager)
        recipes["torch.compile"] = lambda: compiled(inputs)
    if use_bf16:

        def bf16() -> object:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return eager(inputs).float()

        recipes["bf16 autocast"] = bf16
    return recipes


def measure(encoder: str, recipes: dict[str, Recipe], items: int, repeats: int) -> list[dict[str, object]]:
    """Rate, speed-up over eager fp32 and agreement with eager fp32 of each recipe."""
    import torch

    with torch.inference_mode():
        reference = torch.nn.functional.normalize(recipes["eager fp32"]().float(), dim=1)
        cosines = {
            name: float((torch.nn.functional.normalize(fn().float(), dim=1) * reference).sum(1).min())
            for name, fn in recipes.items()
        }
        ms = interleaved_ms(recipes, repeats)
    base = items / ms["eager fp32"] * 1000
    return [
        {
            "encoder": encoder,
            "recipe": name,
            "per_s": items / ms[name] * 1000,
            "speedup": items / ms[name] * 1000 / base,
            "min_cos": cosines[name],
        }
        for name in recipes
    ]


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of this benchmark."""
    parser = parser_with_inputs(__doc__)
    parser.add_argument("--batch", type=int, default=32, help="items per forward call (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per recipe (default %(default)s)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--compile", action="store_true", help="also try torch.compile (slow to compile)")
    parser.add_argument("--bf16", action="store_true", help="also try bf16 autocast (slow without AVX-512)")
    parser.add_argument("--skip", choices=("image", "text"), default=None, help="leave one encoder out")
    parser.add_argument("--quick", action="store_true", help="batch 2, 1 repeat: a smoke run")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table and the JSON line."""
    args = build_parser().parse_args(argv)
    import torch

    warnings.filterwarnings("ignore")
    if args.quick:
        args.batch, args.repeats = 2, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows: list[dict[str, object]] = []
    if args.skip != "image":
        batch = pixels(args.images, args.batch)
        rows += measure("image", image_recipes(batch, args.compile, args.bf16), args.batch, args.repeats)
    if args.skip != "text" and args.captions.is_file():
        texts = captions(args.captions, args.batch)
        rows += measure("text", text_recipes(texts, args.compile, args.bf16), len(texts), args.repeats)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"{args.repeats} repeats, {time.perf_counter() - start:.0f} s")  # fmt: skip
    print_table(rows, ("encoder", "recipe", "per_s", "speedup", "min_cos"))
    print(json.dumps({"threads": torch.get_num_threads(), "batch": args.batch, "results": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
