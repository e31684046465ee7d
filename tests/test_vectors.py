"""The shared space's vector helpers: normalisation and the merge strategies for multi-part items."""

import numpy as np
import pytest

from visions_core.vectors import MERGE_STRATEGIES, l2_normalize, merge_vectors


def unit(*values: float) -> np.ndarray:
    return l2_normalize(np.array(values, dtype=np.float32))


def test_l2_normalize_gives_float32_unit_rows_and_keeps_zero_rows():
    out = l2_normalize([[3.0, 4.0], [0.0, 0.0]])
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0], [0.6, 0.8], rtol=1e-6)
    np.testing.assert_array_equal(out[1], [0.0, 0.0])


def test_multimodal_merge_weighs_each_modality_equally_whatever_the_part_counts():
    images = [unit(1, 0, 0), unit(1, 0, 0), unit(1, 0, 0)]
    texts = [unit(0, 1, 0)]
    merged = merge_vectors(images, texts, "multimodal")
    np.testing.assert_allclose(merged, unit(1, 1, 0), rtol=1e-6)
    assert merged.dtype == np.float32


@pytest.mark.parametrize(("strategy", "expected"), [("image", (1, 0, 0)), ("text", (0, 0.6, 0.8))])
def test_single_modality_strategies_use_only_their_parts(strategy, expected):
    merged = merge_vectors([unit(1, 0, 0)], [unit(0, 1, 0), unit(0, 0.2, 1)], strategy)
    np.testing.assert_allclose(np.linalg.norm(merged), 1.0, rtol=1e-6)
    if strategy == "image":
        np.testing.assert_allclose(merged, expected, atol=1e-6)
    else:
        assert merged[0] == 0 and merged[1] > 0 and merged[2] > 0


def test_an_item_missing_the_chosen_modality_falls_back_to_what_it_has():
    merged = merge_vectors(np.zeros((0, 3), np.float32), [unit(0, 1, 0)], "image")
    np.testing.assert_allclose(merged, [0, 1, 0], atol=1e-6)


def test_merge_refuses_empty_items_and_unknown_strategies():
    empty = np.zeros((0, 3), np.float32)
    with pytest.raises(ValueError, match="at least one"):
        merge_vectors(empty, empty)
    with pytest.raises(ValueError, match="unknown merge strategy"):
        merge_vectors([unit(1, 0)], [], "average")
    assert set(MERGE_STRATEGIES) == {"multimodal", "image", "text"}
