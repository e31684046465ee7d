"""VSE++ loss, the feature cache and a small seeded training run on real Flickr8k images."""

import json

import numpy as np
import pytest
import torch

from visions_core.aligners import WEIGHTS_FILE, load_weights
from visions_core.embedder import load_embedder
from visions_core.evaluate import read_split
from visions_core.train import Config, Inputs, build_cache, build_parser, main, train, vse_loss, write_weights


def test_loss_is_zero_when_every_pair_beats_its_negatives_by_the_margin():
    emb = torch.eye(4)
    assert float(vse_loss(emb, emb, margin=0.2, max_violation=True)) == 0.0
    assert float(vse_loss(emb, emb, margin=0.2, max_violation=False)) == 0.0


def test_max_of_hinges_counts_only_the_hardest_negative():
    im = torch.eye(3)
    txt = torch.eye(3)
    txt[0] = torch.tensor([0.9, 0.3, 0.1])  # caption 0 is close to image 1 (hard) and a bit to image 2
    # Caption 0 still scores its own image (0.9) above the others by more than the margin: no loss.
    assert float(vse_loss(im, txt, margin=0.2, max_violation=True)) == pytest.approx(0.0, abs=1e-6)
    txt[0] = torch.tensor([0.5, 0.45, 0.4])
    hardest = float(vse_loss(im, txt, margin=0.2, max_violation=True))
    summed = float(vse_loss(im, txt, margin=0.2, max_violation=False))
    # caption0 vs images 1 and 2: hinges 0.15 and 0.10; max keeps 0.15, sum keeps both.
    assert hardest == pytest.approx(0.15, abs=1e-5)
    assert summed == pytest.approx(0.25, abs=1e-5)


def test_every_option_has_help():
    text = build_parser().format_help()
    for option in ("--data", "--out", "--cache", "--image-from", "--text-from", "--epochs", "--seed"):
        assert option in text


@pytest.fixture(scope="module")
def tiny_data(flickr_dir, tmp_path_factory):
    """A Flickr8k-format folder of 48 train and 16 dev images (images linked, never copied)."""
    root = tmp_path_factory.mktemp("tiny")
    (root / "images").symlink_to(flickr_dir / "images")
    (root / "captions.tsv").symlink_to(flickr_dir / "captions.tsv")
    (root / "splits").mkdir()
    train_names = read_split(flickr_dir / "splits" / "train.txt")[:48]
    dev_names = read_split(flickr_dir / "splits" / "dev.txt")[:16]
    (root / "splits" / "train.txt").write_text("\n".join(train_names) + "\n")
    (root / "splits" / "dev.txt").write_text("\n".join(dev_names) + "\n")
    return root


@pytest.mark.flickr
@pytest.mark.slow
def test_seeded_training_is_reproducible_and_loadable(tiny_data, tmp_path, capsys):
    argv = ["--data", str(tiny_data), "--cache", str(tmp_path / "cache"), "--epochs", "3"]
    argv += ["--batch-size", "16", "--image-from", "-1", "--text-from", "-1", "--variants", "orig"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main([*argv, "--out", str(tmp_path / "b")]) == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["aligner_id"] == second["aligner_id"]
    assert (tmp_path / "a" / WEIGHTS_FILE).read_bytes() == (tmp_path / "b" / WEIGHTS_FILE).read_bytes()
    card, _ = load_weights(tmp_path / "a")
    assert card["hyperparameters"]["epochs"] == 3
    assert [row["epoch"] for row in card["history"]] == [1, 2, 3]
    assert card["history"][-1]["loss"] < card["history"][0]["loss"]
    embedder = load_embedder(tmp_path / "a")
    assert embedder.aligner_id == first["aligner_id"]
    assert embedder.embed_texts(["a dog"]).shape == (1, 512)


@pytest.mark.flickr
@pytest.mark.slow
def test_fine_tuned_layers_ship_and_index_time_matches_train_time(tiny_data, tmp_path):
    cache = build_cache(tiny_data, tmp_path / "cache", ["orig", "flip"])
    cfg = Config(image_from=14, text_from=5, epochs=1, warmup_epochs=0, batch_size=16, backbone_lr=1e-3)
    model, _, _ = train(cfg, cache, log=lambda _: None)
    write_weights(tmp_path / "w", model, cfg, {"i2t": {}, "t2i": {}}, [], tiny_data, cache["n_train"])
    _, tensors = load_weights(tmp_path / "w")
    tuned = [k for k in tensors if k.startswith(("image_encoder.", "text_encoder."))]
    assert any(k.startswith("image_encoder.net._blocks.14.") for k in tuned)
    assert any(k.startswith("text_encoder.model.encoder.layer.5.") for k in tuned)
    assert not any(k.startswith("image_encoder.net._blocks.13.") for k in tuned)
    assert all(tensors[k].dtype in (torch.float16, torch.int64) for k in tuned)

    embedder = load_embedder(tmp_path / "w")
    dev = cache["names"][cache["n_train"] :]
    with torch.inference_mode():
        inputs = Inputs(cfg, cache, *cache["encoders"])
        trained_img = model.encode_images(inputs.image["orig"][cache["n_train"] :]).numpy()
    served_img = embedder.embed_images([tiny_data / "images" / n for n in dev])
    # Same preprocessing and weights at index time: only fp16 storage separates the two.
    assert np.min(np.sum(trained_img * served_img, axis=1)) > 0.99
    base = load_embedder()
    assert not np.allclose(base.embed_images([tiny_data / "images" / dev[0]]), served_img[:1], atol=1e-3)
