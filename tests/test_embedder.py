"""The shipped embedder: unit float32 vectors for texts, images and items, offline loading, bad weights."""

import os
import shutil
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from PIL import Image

from visions_core.aligners import CARD_FILE, DEFAULT_WEIGHTS_DIR, WEIGHTS_FILE, load_weights, save_weights
from visions_core.embedder import load_embedder
from visions_core.encoders import load_image, preprocess
from visions_core.errors import UnreadableItemError, WeightsError
from visions_core.evaluate import read_captions, read_split


def assert_unit_rows(m: np.ndarray, n: int, dim: int) -> None:
    assert m.shape == (n, dim)
    assert m.dtype == np.float32
    assert np.all(np.isfinite(m))
    np.testing.assert_allclose(np.linalg.norm(m, axis=1), 1.0, atol=1e-5)


def test_card_describes_the_space(embedder):
    assert embedder.aligner_id == embedder.card["aligner_id"]
    assert embedder.dim == embedder.card["dim"] == 512
    assert embedder.card["dev"]["t2i"]["r1"] > 0


def test_texts_become_unit_rows(embedder):
    m = embedder.embed_texts(["a dog runs on the grass", "two people ride bicycles", "", "   "])
    assert_unit_rows(m, 4, embedder.dim)
    assert embedder.embed_texts([]).shape == (0, embedder.dim)


def test_text_embedding_is_deterministic_and_batch_independent(embedder):
    alone = embedder.embed_texts(["a child in a pink dress"])
    batched = embedder.embed_texts(
        ["a much longer sentence that changes the padding of the batch", "a child in a pink dress"]
    )
    np.testing.assert_allclose(alone[0], batched[1], atol=1e-5)


def _odd_images(tmp_path):
    base = Image.new("RGB", (64, 48), (200, 120, 40))
    base.paste((30, 60, 200), (0, 0, 32, 48))
    paths = {}
    for mode, suffix in [("CMYK", "jpg"), ("P", "png"), ("RGBA", "png"), ("LA", "png"), ("1", "png")]:
        paths[mode] = tmp_path / f"{mode}.{suffix}"
        base.convert(mode).save(paths[mode])
    paths["I;16"] = tmp_path / "deep.png"
    Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257).save(paths["I;16"])
    paths["tiny"] = tmp_path / "tiny.png"
    Image.new("RGB", (1, 1), (0, 0, 0)).save(paths["tiny"])
    return paths


def test_odd_mode_and_tiny_images_embed(embedder, tmp_path):
    paths = _odd_images(tmp_path)
    m = embedder.embed_images(list(paths.values()))
    assert_unit_rows(m, len(paths), embedder.dim)
    rgb = embedder.embed_images([Image.open(paths["CMYK"]).convert("RGB")])[0]
    # A CMYK JPEG is the same picture as its RGB conversion.
    assert float(m[0] @ rgb) > 0.99


def test_exif_rotated_photo_embeds_like_the_upright_one(embedder, tmp_path):
    upright = Image.new("RGB", (40, 80), (250, 250, 250))
    upright.paste((0, 0, 0), (0, 0, 40, 20))
    stored = upright.transpose(
        Image.Transpose.ROTATE_90
    )  # what a camera writes, with orientation 6 (rotate 270)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "cam.jpg", exif=exif.tobytes(), quality=95)
    upright.save(tmp_path / "up.jpg", quality=95)
    stored.save(tmp_path / "raw.jpg", quality=95)
    cam, up, raw = embedder.embed_images([tmp_path / "cam.jpg", tmp_path / "up.jpg", tmp_path / "raw.jpg"])
    assert float(cam @ up) > 0.98
    assert float(cam @ up) > float(cam @ raw)


def test_pixels_paths_bytes_and_pil_give_the_same_vector(embedder, tmp_path):
    path = _odd_images(tmp_path)["P"]
    by_path = embedder.embed_images([path])
    np.testing.assert_allclose(embedder.embed_images([path.read_bytes()]), by_path, atol=1e-6)
    np.testing.assert_allclose(embedder.embed_images([Image.open(path)]), by_path, atol=1e-6)
    np.testing.assert_allclose(embedder.embed_pixels(preprocess(load_image(path))[None]), by_path, atol=1e-6)
    assert embedder.embed_pixels(torch.zeros(0, 3, 224, 224)).shape == (0, embedder.dim)


def test_unreadable_image_raises(embedder, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    with pytest.raises(UnreadableItemError):
        embedder.embed_images([bad])


def test_image_and_text_item_merges_both_modalities(embedder, tmp_path):
    paths = _odd_images(tmp_path)
    images, texts = [paths["P"], paths["RGBA"]], ["an orange and blue flag", "two colours"]
    img_vecs, txt_vecs = embedder.embed_images(images), embedder.embed_texts(texts)
    multi = embedder.embed_item(images, texts)
    assert multi.shape == (embedder.dim,) and multi.dtype == np.float32
    assert float(np.linalg.norm(multi)) == pytest.approx(1.0, abs=1e-5)
    img_mean = img_vecs.mean(axis=0) / np.linalg.norm(img_vecs.mean(axis=0))
    txt_mean = txt_vecs.mean(axis=0) / np.linalg.norm(txt_vecs.mean(axis=0))
    np.testing.assert_allclose(embedder.embed_item(images, texts, "image"), img_mean, atol=1e-5)
    np.testing.assert_allclose(embedder.embed_item(images, texts, "text"), txt_mean, atol=1e-5)
    expected = (img_mean + txt_mean) / np.linalg.norm(img_mean + txt_mean)
    np.testing.assert_allclose(multi, expected, atol=1e-5)


def test_item_ignores_empty_texts_and_needs_some_content(embedder, tmp_path):
    path = _odd_images(tmp_path)["P"]
    np.testing.assert_allclose(
        embedder.embed_item([path], ["", "  "]), embedder.embed_images([path])[0], atol=1e-5
    )
    with pytest.raises(UnreadableItemError):
        embedder.embed_item([], ["", " \n"])


def test_second_load_is_instant_and_shared(embedder):
    start = time.perf_counter()
    again = load_embedder()
    assert again is embedder
    assert time.perf_counter() - start < 0.5


@pytest.fixture
def weights_copy(tmp_path):
    dst = tmp_path / "weights"
    shutil.copytree(DEFAULT_WEIGHTS_DIR, dst, ignore=shutil.ignore_patterns("*.md"))
    return dst


def test_missing_weights_file_is_named(weights_copy):
    (weights_copy / WEIGHTS_FILE).unlink()
    with pytest.raises(WeightsError, match=WEIGHTS_FILE):
        load_embedder(weights_copy)


def test_missing_card_is_named(weights_copy):
    (weights_copy / CARD_FILE).unlink()
    with pytest.raises(WeightsError, match=CARD_FILE):
        load_embedder(weights_copy)


def test_corrupt_weights_file_is_named(weights_copy):
    data = (weights_copy / WEIGHTS_FILE).read_bytes()
    (weights_copy / WEIGHTS_FILE).write_bytes(data[:1000])
    with pytest.raises(WeightsError, match=WEIGHTS_FILE):
        load_embedder(weights_copy)


def test_weights_for_another_architecture_are_refused(weights_copy):
    card, tensors = load_weights(weights_copy)
    tensors["image_encoder.net._bn1.bias"] = torch.zeros(7)
    save_weights(weights_copy, tensors, card)
    with pytest.raises(WeightsError, match=WEIGHTS_FILE):
        load_embedder(weights_copy)


def test_loading_works_with_the_network_unreachable():
    script = textwrap.dedent(
        """
        import socket

        def refuse(*args, **kwargs):
            raise OSError("network disabled by the test")

        socket.socket.connect = refuse
        socket.socket.connect_ex = refuse
        socket.create_connection = refuse
        from visions_core.embedder import load_embedder

        e = load_embedder()
        v = e.embed_texts(["a dog"])
        print(e.aligner_id, v.shape[1])
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env
    )
    assert done.returncode == 0, done.stderr
    aligner_id, dim = done.stdout.split()
    assert aligner_id == load_weights(DEFAULT_WEIGHTS_DIR)[0]["aligner_id"]
    assert int(dim) == 512


@pytest.mark.flickr
def test_captions_find_their_image_in_the_top_5_of_50(embedder, flickr_dir):
    names = read_split(flickr_dir / "splits" / "dev.txt")[:50]
    captions = read_captions(flickr_dir / "captions.tsv")
    images = embedder.embed_images([flickr_dir / "images" / n for n in names])
    handful = names[:5]
    texts = [c for n in handful for c in captions[n]]
    owner = np.repeat(np.arange(len(handful)), 5)
    sims = embedder.embed_texts(texts) @ images.T
    ranks = (sims > sims[np.arange(len(texts)), owner][:, None]).sum(axis=1)
    report = dict(zip(texts, ranks.tolist(), strict=True))
    # Each caption's image in the top 5 of 50, bar at most one of the 25 (dev R@5 is about 50% of 1000);
    # none may fall far: that would mean the spaces are misaligned rather than a hard caption.
    assert int((ranks >= 5).sum()) <= 1, report
    assert ranks.max() < 15, report
