"""The VSE++ projection heads and the weights/ folder format."""

import json

import pytest
import torch

from visions_core.aligners import (
    CARD_FILE,
    WEIGHTS_FILE,
    Aligner,
    build_aligner,
    load_weights,
    read_card,
    save_weights,
)
from visions_core.errors import WeightsError


def _write(tmp_path, aligner_id="test-1", dim=8):
    torch.manual_seed(0)
    image, text = Aligner(16, dim), Aligner(6, dim, hidden=10)
    tensors = {f"image_aligner.{k}": v for k, v in image.state_dict().items()}
    tensors |= {f"text_aligner.{k}": v for k, v in text.state_dict().items()}
    card = {
        "aligner_id": aligner_id,
        "dim": dim,
        "image_aligner": image.config(),
        "text_aligner": text.config(),
    }
    save_weights(tmp_path, tensors, card)
    return image, text, card


@pytest.mark.parametrize("hidden", [0, 32])
def test_aligner_outputs_unit_vectors_whatever_the_input_scale(hidden):
    aligner = Aligner(20, 12, hidden=hidden)
    x = torch.randn(5, 20)
    out = aligner(x)
    assert out.shape == (5, 12)
    assert torch.allclose(out.norm(dim=1), torch.ones(5), atol=1e-6)
    # Input is normalised first, so scaling a feature vector does not move its projection.
    assert torch.allclose(aligner(x * 37.0), out, atol=1e-6)


def test_weights_round_trip_through_the_folder(tmp_path):
    _image, text, card = _write(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([WEIGHTS_FILE, CARD_FILE])
    loaded_card, tensors = load_weights(tmp_path)
    assert loaded_card == card
    x = torch.randn(3, 6)
    rebuilt = build_aligner(tensors, "text_aligner", loaded_card["text_aligner"], tmp_path / WEIGHTS_FILE)
    assert torch.equal(rebuilt(x), text.eval()(x))


def test_missing_weights_file_names_it(tmp_path):
    _write(tmp_path)
    (tmp_path / WEIGHTS_FILE).unlink()
    with pytest.raises(WeightsError, match=WEIGHTS_FILE):
        load_weights(tmp_path)


def test_missing_card_names_it(tmp_path):
    with pytest.raises(WeightsError, match=CARD_FILE):
        read_card(tmp_path)


@pytest.mark.parametrize("garbage", [b"", b"\x00\x01garbage", b"{}" * 50])
def test_corrupt_weights_file_names_it(tmp_path, garbage):
    _write(tmp_path)
    (tmp_path / WEIGHTS_FILE).write_bytes(garbage)
    with pytest.raises(WeightsError, match=WEIGHTS_FILE):
        load_weights(tmp_path)


def test_truncated_weights_file_names_it(tmp_path):
    _write(tmp_path)
    data = (tmp_path / WEIGHTS_FILE).read_bytes()
    (tmp_path / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=WEIGHTS_FILE):
        load_weights(tmp_path)


@pytest.mark.parametrize("text", ["not json", "[]", '{"dim": 8}', '{"aligner_id": "x"}'])
def test_corrupt_card_names_it(tmp_path, text):
    _write(tmp_path)
    (tmp_path / CARD_FILE).write_text(text)
    with pytest.raises(WeightsError, match=CARD_FILE):
        read_card(tmp_path)


def test_card_and_weights_of_different_versions_are_refused(tmp_path):
    _write(tmp_path, aligner_id="v1")
    card = json.loads((tmp_path / CARD_FILE).read_text())
    card["aligner_id"] = "v2"
    (tmp_path / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(WeightsError, match="does not match"):
        load_weights(tmp_path, retries=1)


def test_aligner_of_the_wrong_shape_is_refused(tmp_path):
    _, _, _card = _write(tmp_path)
    _, tensors = load_weights(tmp_path)
    with pytest.raises(WeightsError, match="image_aligner"):
        build_aligner(tensors, "image_aligner", {"in_dim": 99, "out_dim": 8}, tmp_path / WEIGHTS_FILE)


def test_rewriting_leaves_no_temporary_files(tmp_path):
    _write(tmp_path, aligner_id="v1")
    _write(tmp_path, aligner_id="v2")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([WEIGHTS_FILE, CARD_FILE])
    assert load_weights(tmp_path)[0]["aligner_id"] == "v2"
