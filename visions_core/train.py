"""`python -m visions_core.train`: VSE++ training of aligners and top encoder layers on cached features."""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from visions_core.aligners import Aligner, save_weights
from visions_core.encoders import (
    IMAGE_FEATURE_DIM,
    IMAGE_SIZE,
    TEXT_FEATURE_DIM,
    ImageEncoder,
    TextEncoder,
    load_image,
    mean_pool,
    preprocess,
)
from visions_core.evaluate import read_captions, read_split, recalls, select

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = ROOT / "cache"
# Encoder features are cached at these depths; everything above them can be fine-tuned cheaply.
IMAGE_CUT = 11  # input of Lite0 block 11 (112 x 14 x 14)
TEXT_CUT = 4  # token states after MiniLM layer 4 (of 6)
CACHE_VERSION = 1
CHUNK = 250
VARIANTS = ("orig", "flip")


def _fingerprint(names: Sequence[str], extra: str) -> str:
    """Short hash of the inputs so a cache is never reused for other data or another preprocessing."""
    h = hashlib.sha1(f"v{CACHE_VERSION}|{extra}|".encode())
    for n in names:
        h.update(n.encode() + b"\n")
    return h.hexdigest()[:12]


def _variant(img, variant: str):
    """Apply a cached augmentation variant to an RGB image before the shared preprocess."""
    from PIL import ImageOps

    if variant == "orig":
        return img
    if variant == "flip":
        return ImageOps.mirror(img)
    raise ValueError(f"unknown variant {variant}")


def cache_images(
    encoder: ImageEncoder,
    images_dir: Path,
    names: Sequence[str],
    cache_dir: Path,
    variant: str,
    batch: int = 25,
) -> dict[str, torch.Tensor]:
    """Cached block-IMAGE_CUT activations (fp16) and pooled features, computed once in chunks."""
    key = _fingerprint(names, f"img|{IMAGE_CUT}|{variant}")
    out = cache_dir / f"images-{variant}-{key}.safetensors"
    if out.is_file():
        return load_file(out)
    part_dir = cache_dir / f"images-{variant}-{key}.parts"
    part_dir.mkdir(parents=True, exist_ok=True)
    from tqdm import tqdm

    for c0 in tqdm(range(0, len(names), CHUNK), desc=f"cache images ({variant})", unit="chunk"):
        part = part_dir / f"{c0:06d}.safetensors"
        if part.is_file():
            continue
        acts, pooled = [], []
        for s in range(c0, min(c0 + CHUNK, len(names)), batch):
            imgs = [
                _variant(load_image(images_dir / n), variant) for n in names[s : min(s + batch, c0 + CHUNK)]
            ]
            with torch.inference_mode():
                a = encoder.stem(torch.stack([preprocess(i) for i in imgs]), IMAGE_CUT)
                pooled.append(encoder.top(a, IMAGE_CUT))
            acts.append(a.half())
        tmp = part.with_suffix(".tmp")
        save_file({"act": torch.cat(acts).contiguous(), "pooled": torch.cat(pooled).contiguous()}, tmp)
        tmp.rename(part)
    parts = [load_file(part_dir / f"{c0:06d}.safetensors") for c0 in range(0, len(names), CHUNK)]
    merged = {k: torch.cat([p[k] for p in parts]).contiguous() for k in ("act", "pooled")}
    tmp = out.with_suffix(".tmp")
    save_file(merged, tmp)
    tmp.rename(out)
    for p in part_dir.iterdir():
        p.unlink()
    part_dir.rmdir()
    return merged


def cache_texts(
    encoder: TextEncoder, texts: Sequence[str], cache_dir: Path, batch: int = 256
) -> dict[str, torch.Tensor]:
    """Cached MiniLM token states after layer TEXT_CUT (fp16, concatenated) and frozen pooled features."""
    key = _fingerprint(texts, f"txt|{TEXT_CUT}")
    out = cache_dir / f"texts-{key}.safetensors"
    if out.is_file():
        return load_file(out)
    from tqdm import tqdm

    # Length-sorted batches waste little on padding; results are put back in the original order.
    lens = [len(encoder.tokenizer.tokenize(t)) for t in texts]
    order = sorted(range(len(texts)), key=lens.__getitem__)
    tokens: list[torch.Tensor] = [torch.empty(0)] * len(texts)
    pooled = torch.zeros(len(texts), encoder.model.config.hidden_size)
    for s in tqdm(range(0, len(texts), batch), desc="cache captions", unit="batch"):
        idx = order[s : s + batch]
        b = encoder.tokenize([texts[i] for i in idx])
        with torch.inference_mode():
            h = encoder.hidden_upto(b, TEXT_CUT)
            top = encoder.layers_from(h, b["attention_mask"], TEXT_CUT)
            pooled[idx] = mean_pool(top, b["attention_mask"])
        n = b["attention_mask"].sum(dim=1)
        for j, i in enumerate(idx):
            tokens[i] = h[j, : n[j]].half()
    lengths = [t.shape[0] for t in tokens]
    merged = {
        "tokens": torch.cat(tokens).contiguous(),
        "lengths": torch.tensor(lengths, dtype=torch.int64),
        "pooled": pooled.contiguous(),
    }
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    save_file(merged, tmp)
    tmp.rename(out)
    return merged


def load_data(data_dir: Path) -> tuple[dict[str, list[str]], list[str], list[str]]:
    """Captions and the train/dev image names of a Flickr8k-format folder."""
    captions = read_captions(data_dir / "captions.tsv")
    train = list(select(captions, read_split(data_dir / "splits" / "train.txt")))
    dev = list(select(captions, read_split(data_dir / "splits" / "dev.txt")))
    return captions, train, dev


def build_cache(data_dir: Path, cache_dir: Path, variants: Sequence[str] = VARIANTS) -> dict[str, Any]:
    """Compute (or load) every cached feature that training needs."""
    captions, train, dev = load_data(data_dir)
    names = train + dev
    texts = [t for n in names for t in captions[n][:5]]
    cache_dir.mkdir(parents=True, exist_ok=True)
    text_encoder = TextEncoder()
    txt = cache_texts(text_encoder, texts, cache_dir)
    image_encoder = ImageEncoder()
    imgs = {v: cache_images(image_encoder, data_dir / "images", names, cache_dir, v) for v in variants}
    return {
        "names": names,
        "n_train": len(train),
        "texts": texts,
        "txt": txt,
        "imgs": imgs,
        "encoders": (image_encoder, text_encoder),
    }


@dataclass
class Config:
    """Hyper-parameters of one training run (recorded in the model card)."""

    dim: int = 512
    hidden: int = 0
    image_from: int | None = None  # first Lite0 block fine-tuned; None = frozen pooled features
    text_from: int | None = None  # first MiniLM layer fine-tuned; None = frozen pooled features
    epochs: int = 4
    warmup_epochs: int = 1  # sum-of-hinges epochs before VSE++ max-of-hinges
    batch_size: int = 128
    lr: float = 5e-4
    backbone_lr: float = 5e-5
    weight_decay: float = 1e-4
    margin: float = 0.2
    captions_per_image: int = 5  # pairs per train image per epoch
    seed: int = 0
    variants: tuple[str, ...] = VARIANTS  # cached copies of each image: as is and mirrored


def vse_loss(im: torch.Tensor, txt: torch.Tensor, margin: float, max_violation: bool) -> torch.Tensor:
    """VSE++ hinge loss over in-batch negatives (max of hinges, or the sum during warm-up)."""
    scores = im @ txt.T
    diag = scores.diag()
    cost_txt = (margin + scores - diag[:, None]).clamp(min=0)
    cost_im = (margin + scores - diag[None, :]).clamp(min=0)
    eye = torch.eye(scores.shape[0], dtype=torch.bool, device=scores.device)
    cost_txt = cost_txt.masked_fill(eye, 0)
    cost_im = cost_im.masked_fill(eye, 0)
    if max_violation:
        return cost_txt.max(dim=1).values.sum() + cost_im.max(dim=0).values.sum()
    return cost_txt.sum() + cost_im.sum()


class Trainable(nn.Module):
    """The parts that learn: top image blocks, top text layers and both aligners."""

    def __init__(self, cfg: Config, image_encoder: ImageEncoder, text_encoder: TextEncoder) -> None:
        super().__init__()
        self.cfg = cfg
        self.image_encoder = copy.deepcopy(image_encoder)
        self.text_encoder = copy.deepcopy(text_encoder)
        for prm in self.parameters():
            prm.requires_grad_(False)
        for name in self.image_params(), self.text_params():
            for prm in name:
                prm.requires_grad_(True)
        self.image_aligner = Aligner(IMAGE_FEATURE_DIM, cfg.dim, cfg.hidden)
        self.text_aligner = Aligner(TEXT_FEATURE_DIM, cfg.dim, cfg.hidden)

    def image_params(self) -> list[nn.Parameter]:
        """Lite0 parameters being fine-tuned."""
        if self.cfg.image_from is None:
            return []
        net = self.image_encoder.net
        return [
            *(p for b in net._blocks[self.cfg.image_from :] for p in b.parameters()),
            *net._conv_head.parameters(),
            *net._bn1.parameters(),
        ]

    def text_params(self) -> list[nn.Parameter]:
        """MiniLM parameters being fine-tuned."""
        if self.cfg.text_from is None:
            return []
        return [
            p
            for layer in self.text_encoder.model.encoder.layer[self.cfg.text_from :]
            for p in layer.parameters()
        ]

    def finetuned_state(self) -> dict[str, torch.Tensor]:
        """Fine-tuned encoder tensors (fp16) under the key names the embedder loads."""
        out: dict[str, torch.Tensor] = {}
        if self.cfg.image_from is not None:
            keep = [
                f"net._blocks.{i}." for i in range(self.cfg.image_from, len(self.image_encoder.net._blocks))
            ]
            keep += ["net._conv_head.", "net._bn1."]
            for k, v in self.image_encoder.state_dict().items():
                if any(k.startswith(p) for p in keep):
                    out[f"image_encoder.{k}"] = v.half() if v.is_floating_point() else v
        if self.cfg.text_from is not None:
            n = len(self.text_encoder.model.encoder.layer)
            keep = [f"model.encoder.layer.{i}." for i in range(self.cfg.text_from, n)]
            for k, v in self.text_encoder.state_dict().items():
                if any(k.startswith(p) for p in keep):
                    out[f"text_encoder.{k}"] = v.half() if v.is_floating_point() else v
        return out

    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        """Aligned image vectors from cached activations (or pooled features when frozen)."""
        if self.cfg.image_from is not None:
            x = self.image_encoder.top(x.float(), self.cfg.image_from)
        return self.image_aligner(x)

    def encode_texts(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Aligned text vectors from cached token states (or pooled features when frozen)."""
        if self.cfg.text_from is not None:
            assert mask is not None
            x = mean_pool(self.text_encoder.layers_from(x.float(), mask, self.cfg.text_from), mask)
        return self.text_aligner(x)

    def train(self, mode: bool = True) -> Trainable:
        """Train mode for the heads and text layers; Lite0 batch-norm statistics stay frozen."""
        super().train(mode)
        self.image_encoder.eval()
        return self


def pad_tokens(tokens: Sequence[torch.Tensor], idx: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad the cached token states of captions idx into (B, L, H) states and a (B, L) mask."""
    rows = [tokens[i] for i in idx]
    x = nn.utils.rnn.pad_sequence(rows, batch_first=True)
    lengths = torch.tensor([r.shape[0] for r in rows])
    mask = (torch.arange(x.shape[1])[None, :] < lengths[:, None]).to(torch.int64)
    return x, mask


class Inputs:
    """Per-variant image inputs and per-caption text inputs at the depth where training starts."""

    def __init__(
        self, cfg: Config, cache: dict[str, Any], image_encoder: ImageEncoder, text_encoder: TextEncoder
    ):
        self.image: dict[str, torch.Tensor] = {}
        for v in cfg.variants:
            c = cache["imgs"][v]
            if cfg.image_from is None:
                self.image[v] = c["pooled"].float()
            else:
                self.image[v] = _advance_images(image_encoder, c["act"], cfg.image_from)
        txt = cache["txt"]
        if cfg.text_from is None:
            self.text_pooled: torch.Tensor | None = txt["pooled"].float()
            self.tokens: list[torch.Tensor] = []
        else:
            self.text_pooled = None
            self.tokens = _advance_texts(text_encoder, txt, cfg.text_from)

    def texts(self, idx: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text encoder inputs of captions idx (and their mask when token states are used)."""
        if self.text_pooled is not None:
            return self.text_pooled[list(idx)], None
        return pad_tokens(self.tokens, idx)


def _advance_images(encoder: ImageEncoder, act: torch.Tensor, start: int) -> torch.Tensor:
    """Run frozen Lite0 blocks [IMAGE_CUT, start) over cached activations."""
    if start == IMAGE_CUT:
        return act
    out = []
    with torch.inference_mode():
        for s in range(0, act.shape[0], 256):
            x = act[s : s + 256].float()
            for block in encoder.net._blocks[IMAGE_CUT:start]:
                x = block(x)
            out.append(x.half())
    return torch.cat(out)


def _advance_texts(encoder: TextEncoder, txt: dict[str, torch.Tensor], start: int) -> list[torch.Tensor]:
    """Split cached token states per caption and run frozen MiniLM layers [TEXT_CUT, start) over them."""
    tokens = list(torch.split(txt["tokens"], txt["lengths"].tolist()))
    if start == TEXT_CUT:
        return tokens
    order = sorted(range(len(tokens)), key=lambda i: tokens[i].shape[0])
    out: list[torch.Tensor] = [torch.empty(0)] * len(tokens)
    with torch.inference_mode():
        for s in range(0, len(order), 512):
            idx = order[s : s + 512]
            x, mask = pad_tokens(tokens, idx)
            h = encoder.layers_from(x.float(), mask, TEXT_CUT, start)
            for j, i in enumerate(idx):
                out[i] = h[j, : tokens[i].shape[0]].half()
    return out


def embed_dev(model: Trainable, inputs: Inputs, dev_images: Sequence[int], dev_captions: Sequence[int]):
    """Aligned vectors of the dev images (unaugmented) and dev captions."""
    model.eval()
    with torch.inference_mode():
        ims = torch.cat(
            [
                model.encode_images(inputs.image["orig"][dev_images[s : s + 100]])
                for s in range(0, len(dev_images), 100)
            ]
        )
        txs = []
        for s in range(0, len(dev_captions), 500):
            x, mask = inputs.texts(dev_captions[s : s + 500])
            txs.append(model.encode_texts(x, mask))
    return ims.numpy(), torch.cat(txs).numpy()


def rsum(result: dict[str, Any]) -> float:
    """Sum of R@1/5/10 in both directions, the usual model-selection score."""
    return sum(result[d][k] for d in ("i2t", "t2i") for k in ("r1", "r5", "r10"))


def train(
    cfg: Config, cache: dict[str, Any], log=print
) -> tuple[Trainable, dict[str, Any], list[dict[str, Any]]]:
    """Train on the train split, keep the best dev-rsum epoch; returns model, dev result, history."""
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    image_encoder, text_encoder = cache["encoders"]
    model = Trainable(cfg, image_encoder, text_encoder)
    inputs = Inputs(cfg, cache, image_encoder, text_encoder)
    n_train, n_all = cache["n_train"], len(cache["names"])
    dev_images = list(range(n_train, n_all))
    dev_captions = [5 * i + j for i in dev_images for j in range(5)]
    owner = [i - n_train for i in dev_images for _ in range(5)]
    heads = [*model.image_aligner.parameters(), *model.text_aligner.parameters()]
    backbone = model.image_params() + model.text_params()
    groups = [{"params": heads, "lr": cfg.lr}]
    if backbone:
        groups.append({"params": backbone, "lr": cfg.backbone_lr})
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = (n_train * cfg.captions_per_image) // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    warm = max(1, steps_per_epoch // 2)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda step: min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total)),
    )
    best: tuple[float, dict[str, torch.Tensor] | None, dict[str, Any] | None] = (-1.0, None, None)
    history = []
    for epoch in range(cfg.epochs):
        model.train()
        t0 = time.time()
        caps = torch.stack([torch.randperm(5, generator=gen) for _ in range(n_train)])[
            :, : cfg.captions_per_image
        ]
        pairs = torch.stack([torch.arange(n_train)[:, None].expand_as(caps), caps], dim=-1).reshape(-1, 2)
        pairs = pairs[torch.randperm(len(pairs), generator=gen)]
        variant_pick = torch.randint(len(cfg.variants), (len(pairs),), generator=gen)
        total_loss = 0.0
        for step in range(steps_per_epoch):
            sl = slice(step * cfg.batch_size, (step + 1) * cfg.batch_size)
            img_idx, cap_j = pairs[sl, 0], pairs[sl, 1]
            vpick = variant_pick[sl]
            x_img = torch.empty((len(img_idx), *inputs.image[cfg.variants[0]].shape[1:]), dtype=torch.float32)
            for vi, v in enumerate(cfg.variants):
                sel = vpick == vi
                if sel.any():
                    x_img[sel] = inputs.image[v][img_idx[sel]].float()
            x_txt, mask = inputs.texts((img_idx * 5 + cap_j).tolist())
            loss = vse_loss(
                model.encode_images(x_img),
                model.encode_texts(x_txt, mask),
                cfg.margin,
                max_violation=epoch >= cfg.warmup_epochs,
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 2.0)
            opt.step()
            sched.step()
            total_loss += loss.item()
        ims, txs = embed_dev(model, inputs, dev_images, dev_captions)
        result = recalls(ims, txs, owner)
        row = {
            "epoch": epoch + 1,
            "loss": round(total_loss / max(1, steps_per_epoch), 4),
            "dev": result,
            "seconds": round(time.time() - t0, 1),
        }
        history.append(row)
        log(json.dumps(row))
        if rsum(result) > best[0]:
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            best = (rsum(result), state, result)
    assert best[1] is not None and best[2] is not None
    model.load_state_dict(best[1])
    return model.eval(), best[2], history


def write_weights(
    out_dir: Path,
    model: Trainable,
    cfg: Config,
    dev: dict[str, Any],
    history: list[dict[str, Any]],
    data_dir: Path,
    n_train: int,
) -> dict[str, Any]:
    """Write the trained parts as safetensors plus the model card; the aligner_id hashes the tensors."""
    tensors = {f"image_aligner.{k}": v for k, v in model.image_aligner.state_dict().items()}
    tensors |= {f"text_aligner.{k}": v for k, v in model.text_aligner.state_dict().items()}
    tensors |= model.finetuned_state()
    digest = hashlib.sha256()
    for k in sorted(tensors):
        digest.update(k.encode())
        digest.update(tensors[k].detach().cpu().contiguous().numpy().tobytes())
    now = datetime.now(UTC)
    card = {
        "aligner_id": f"vsepp-lite0-minilm-{digest.hexdigest()[:12]}",
        "dim": cfg.dim,
        "image_aligner": model.image_aligner.config(),
        "text_aligner": model.text_aligner.config(),
        "finetuned": {
            "image_blocks_from": cfg.image_from,
            "text_layers_from": cfg.text_from,
            "dtype": "float16",
        },
        "encoders": {
            "image": model.image_encoder.versions,
            "text": model.text_encoder.versions,
            "torch": torch.__version__,
        },
        "preprocess": {
            "image": f"EXIF-transpose, RGB, resize whole image to {IMAGE_SIZE}x{IMAGE_SIZE} "
            "(bilinear, antialias, no crop), scale to [-1, 1]",
            "text": "MiniLM tokenizer, truncation at the model limit, mean pooling over the mask",
        },
        "loss": f"VSE++ max of hinges, margin {cfg.margin}, hardest in-batch negatives "
        f"({cfg.warmup_epochs} warm-up epochs of sum of hinges)",
        "hyperparameters": asdict(cfg),
        "data": {
            "name": "Flickr8k",
            "path": str(data_dir),
            "train_images": n_train,
            "dev_images": dev.get("images"),
        },
        "dev": dev,
        "history": history,
        "date": now.isoformat(timespec="seconds"),
        "command": "python -m visions_core.train --data ../shared/data/flickr8k --out weights/",
    }
    save_weights(out_dir, tensors, card)
    return card


def build_parser() -> argparse.ArgumentParser:
    """The train command's arguments (defaults reproduce the shipped weights)."""
    d = Config()
    p = argparse.ArgumentParser(
        prog="python -m visions_core.train",
        description="Train the VSE++ aligners (and top encoder layers) on Flickr8k and write weights/.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--data", type=Path, required=True, help="Flickr8k folder (captions.tsv, images/, splits/)"
    )
    p.add_argument("--out", type=Path, default=ROOT / "weights", help="weights folder to write")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="encoder feature cache folder")
    p.add_argument("--cache-only", action="store_true", help="only fill the feature cache")
    p.add_argument(
        "--image-from", type=int, default=d.image_from, help="first Lite0 block to fine-tune (-1: none)"
    )
    p.add_argument(
        "--text-from", type=int, default=d.text_from, help="first MiniLM layer to fine-tune (-1: none)"
    )
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--warmup-epochs", type=int, default=d.warmup_epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--backbone-lr", type=float, default=d.backbone_lr)
    p.add_argument("--hidden", type=int, default=d.hidden, help="MLP aligner hidden width (0: linear)")
    p.add_argument("--captions-per-image", type=int, default=d.captions_per_image)
    p.add_argument("--variants", nargs="+", default=list(d.variants), choices=VARIANTS)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: bit-exact shipped weights)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Train and write weights; returns the exit code."""
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    cache = build_cache(args.data, args.cache, args.variants)
    if args.cache_only:
        return 0
    cfg = Config(
        dim=Config.dim,
        hidden=args.hidden,
        image_from=None if args.image_from is None or args.image_from < 0 else args.image_from,
        text_from=None if args.text_from is None or args.text_from < 0 else args.text_from,
        epochs=args.epochs,
        warmup_epochs=args.warmup_epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        backbone_lr=args.backbone_lr,
        captions_per_image=args.captions_per_image,
        seed=args.seed,
        variants=tuple(args.variants),
    )
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    model, dev, history = train(cfg, cache, log)
    card = write_weights(args.out, model, cfg, dev, history, args.data, cache["n_train"])
    print(json.dumps({"aligner_id": card["aligner_id"], "dev": dev}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
