"""Decoding any image into RGB, the shared preprocessing, and the two pre-trained encoders."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from visions_core.encoders import (
    DECODE_MIN_SIDE,
    IMAGE_FEATURE_DIM,
    IMAGE_SIZE,
    TEXT_FEATURE_DIM,
    ImageEncoder,
    OnnxEncoder,
    TextEncoder,
    fast_encoder,
    load_image,
    mean_pool,
    preprocess,
)
from visions_core.errors import UnreadableItemError


def _save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


def _gradient(w: int = 40, h: int = 30) -> Image.Image:
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    arr[..., 1] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]
    return Image.fromarray(arr)


@pytest.mark.parametrize(
    ("mode", "suffix"),
    [
        ("RGB", ".jpg"),
        ("L", ".png"),
        ("LA", ".png"),
        ("RGBA", ".png"),
        ("P", ".gif"),
        ("CMYK", ".jpg"),
        ("I;16", ".png"),
        ("1", ".bmp"),
    ],
)
def test_any_mode_decodes_to_rgb(tmp_path, mode, suffix):
    src = _gradient().convert("RGB")
    img = src.convert("I;16") if mode == "I;16" else src.convert(mode)
    loaded = load_image(_save(img, tmp_path / f"x{suffix}"))
    assert loaded.mode == "RGB"
    assert loaded.size == (40, 30)
    assert preprocess(loaded).shape == (3, IMAGE_SIZE, IMAGE_SIZE)


def test_sixteen_bit_greyscale_keeps_its_contrast(tmp_path):
    arr = np.tile(np.linspace(0, 65535, 64, dtype=np.uint16), (8, 1))
    loaded = np.asarray(load_image(_save(Image.fromarray(arr), tmp_path / "deep.png")))
    # A plain convert("L") would clip every value above 255 to white.
    assert loaded[..., 0].min() == 0
    assert loaded[..., 0].max() == 255
    assert np.all(np.diff(loaded[0, :, 0].astype(int)) >= 0)


def test_transparency_is_flattened_onto_white(tmp_path):
    rgba = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    assert load_image(_save(rgba, tmp_path / "clear.png")).getpixel((5, 5)) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path):
    img = _gradient(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    path = _save(img, tmp_path / "rot.jpg", exif=exif.tobytes())
    assert Image.open(path).size == (40, 20)
    assert load_image(path).size == (20, 40)


def test_first_frame_of_an_animation_is_used(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    r, _g, b = load_image(path).getpixel((4, 4))
    assert r > 200 and b < 50


def test_bytes_and_pil_sources_decode_like_a_path(tmp_path):
    path = _save(_gradient(), tmp_path / "g.png")
    from_path = np.asarray(load_image(path))
    assert np.array_equal(np.asarray(load_image(path.read_bytes())), from_path)
    assert np.array_equal(np.asarray(load_image(Image.open(path))), from_path)


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 20])
def test_undecodable_bytes_raise_unreadable_item(tmp_path, content):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(UnreadableItemError):
        load_image(path)


def test_truncated_jpeg_raises_unreadable_item(tmp_path):
    buf = io.BytesIO()
    _gradient(200, 200).save(buf, format="JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(UnreadableItemError):
        load_image(path)


def test_missing_file_raises_unreadable_item(tmp_path):
    with pytest.raises(UnreadableItemError, match="not found"):
        load_image(tmp_path / "nope.png")


def test_preprocess_resizes_the_whole_image_without_cropping():
    # Left half black, right half white on a wide image: a centre crop would lose the proportions.
    arr = np.zeros((100, 400, 3), dtype=np.uint8)
    arr[:, 200:] = 255
    x = preprocess(Image.fromarray(arr))
    assert x.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    assert x.dtype == torch.float32
    assert float(x.min()) == pytest.approx(-1.0) and float(x.max()) == pytest.approx(1.0)
    row = x[0, IMAGE_SIZE // 2]
    assert float(row[: IMAGE_SIZE // 2 - 2].max()) == pytest.approx(-1.0)
    assert float(row[IMAGE_SIZE // 2 + 2 :].min()) == pytest.approx(1.0)


def test_tiny_image_is_upscaled():
    assert preprocess(Image.new("RGB", (1, 1), (10, 20, 30))).shape == (3, IMAGE_SIZE, IMAGE_SIZE)


@pytest.fixture(scope="module")
def image_encoder():
    return ImageEncoder()


@pytest.fixture(scope="module")
def text_encoder():
    return TextEncoder()


def test_image_encoder_gives_pooled_1280d_features(image_encoder):
    x = torch.stack([preprocess(_gradient()), preprocess(Image.new("RGB", (50, 50), (0, 128, 0)))])
    with torch.inference_mode():
        f = image_encoder(x)
    assert f.shape == (2, IMAGE_FEATURE_DIM)
    assert torch.isfinite(f).all()
    assert not torch.allclose(f[0], f[1])


def test_image_encoder_split_forward_equals_full_forward(image_encoder):
    x = preprocess(_gradient()).unsqueeze(0)
    with torch.inference_mode():
        full = image_encoder(x)
        split = image_encoder.top(image_encoder.stem(x, 11), 11)
    assert torch.allclose(full, split, atol=1e-5)


DEV_DOG_IMAGES = [  # dev images all five of whose captions mention a dog
    "1032122270_ea6f0beedb.jpg",
    "1130369873_d80a1aa59c.jpg",
    "1164131282_b30926f332.jpg",
    "1178705300_c224d9a4f1.jpg",
    "124972799_de706b6d0b.jpg",
]


def test_image_encoder_weights_and_preprocessing_recognise_dogs(image_encoder, flickr_dir):
    x = torch.stack([preprocess(load_image(flickr_dir / "images" / n)) for n in DEV_DOG_IMAGES])
    with torch.inference_mode():
        top1 = image_encoder.net(x).argmax(dim=1)
    # ImageNet classes 151-268 are dog breeds; wrong weights or pixel scaling would miss most of them.
    assert int(((top1 >= 151) & (top1 <= 268)).sum()) >= 4


def test_text_encoder_mean_pools_minilm(text_encoder):
    batch = text_encoder.tokenize(["A dog runs on the grass .", "two children play football on a beach"])
    with torch.inference_mode():
        pooled = text_encoder(batch)
        staged = text_encoder.layers_from(text_encoder.hidden_upto(batch, 4), batch["attention_mask"], 4)
    assert pooled.shape == (2, TEXT_FEATURE_DIM)
    assert torch.allclose(pooled, mean_pool(staged, batch["attention_mask"]), atol=1e-5)


def test_text_encoder_matches_sentence_similarity(text_encoder):
    batch = text_encoder.tokenize(
        ["a dog runs on grass", "a puppy running across a lawn", "stock market report"]
    )
    with torch.inference_mode():
        f = torch.nn.functional.normalize(text_encoder(batch), dim=-1)
    assert float(f[0] @ f[1]) > float(f[0] @ f[2]) + 0.2


def test_text_encoder_truncates_long_texts(text_encoder):
    batch = text_encoder.tokenize(["word " * 5000])
    assert batch["input_ids"].shape[1] == text_encoder.max_length
    with torch.inference_mode():
        assert text_encoder(batch).shape == (1, TEXT_FEATURE_DIM)


def test_onnx_image_encoder_gives_the_pytorch_features_at_any_batch_size(image_encoder):
    onnx = fast_encoder(image_encoder, torch.device("cpu"))
    assert isinstance(onnx, OnnxEncoder)
    x = torch.stack([preprocess(_gradient()), preprocess(Image.new("RGB", (50, 50), (0, 128, 0)))] * 2)
    with torch.inference_mode():
        expected = image_encoder(x)
        for n in (1, 3, 4):
            got = onnx(x[:n])
            assert got.shape == (n, IMAGE_FEATURE_DIM) and got.dtype == torch.float32
            assert torch.allclose(got, expected[:n], atol=1e-4)


def test_onnx_text_encoder_gives_the_pytorch_features_for_any_padding(text_encoder):
    onnx = fast_encoder(text_encoder, torch.device("cpu"))
    assert isinstance(onnx, OnnxEncoder)
    texts = ["a dog", "two children in red shirts play football on a sandy beach", "word " * 600]
    with torch.inference_mode():
        for count in (3, 2, 1):
            batch = text_encoder.tokenize(texts[:count])
            # Exporting must leave the PyTorch module as it was: compare after, not before.
            expected = text_encoder(batch)
            got = onnx(batch)
            assert got.shape == expected.shape == (len(batch["input_ids"]), TEXT_FEATURE_DIM)
            assert torch.allclose(got, expected, atol=1e-4)


def test_fast_encoder_uses_onnx_on_cpu_unless_opted_out(image_encoder, monkeypatch):
    monkeypatch.setenv("VISIONS_ONNX", "0")
    assert fast_encoder(image_encoder, torch.device("cpu")) is image_encoder
    monkeypatch.delenv("VISIONS_ONNX")
    assert fast_encoder(image_encoder, torch.device("cuda")) is image_encoder


def test_min_side_decodes_a_big_jpeg_smaller_with_the_same_model_input(tmp_path):
    big = _gradient(2000, 1600).resize((2000, 1600))
    path = _save(big, tmp_path / "big.jpg", quality=92)
    full, reduced = load_image(path), load_image(path, min_side=DECODE_MIN_SIDE)
    assert full.size == (2000, 1600)
    assert min(reduced.size) >= DECODE_MIN_SIDE and reduced.size[0] < 2000
    assert float((preprocess(full) - preprocess(reduced)).abs().mean()) < 0.01


def test_min_side_leaves_non_jpeg_and_small_images_whole(tmp_path):
    png = _save(_gradient(1200, 900), tmp_path / "big.png")
    small = _save(_gradient(300, 200), tmp_path / "small.jpg")
    assert load_image(png, min_side=DECODE_MIN_SIDE).size == (1200, 900)
    assert load_image(small, min_side=DECODE_MIN_SIDE).size == (300, 200)
