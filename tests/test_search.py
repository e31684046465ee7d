"""Searcher with the real embedder: each query kind gives the brute-force ranking of a multi-bucket index."""

import numpy as np
import pytest
from PIL import Image

from visions_core.errors import IndexMismatchError, ItemNotFoundError, UnreadableItemError
from visions_core.index import FlatIndex
from visions_core.search import Searcher
from visions_core.vectors import merge_vectors


@pytest.fixture(scope="module")
def real_embedder(request):
    """The session embedder, skipped only while the trained aligner weights are not in weights/ yet."""
    from visions_core import embedder as embedder_module
    from visions_core.aligners import CARD_FILE, WEIGHTS_FILE

    weights = embedder_module.DEFAULT_WEIGHTS_DIR
    if not (weights / WEIGHTS_FILE).is_file() or not (weights / CARD_FILE).is_file():
        pytest.skip(f"no aligner weights in {weights} yet")
    return request.getfixturevalue("embedder")


def assert_brute_force_top(results, stored: np.ndarray, query: np.ndarray, n: int) -> None:
    """results are the n best by brute-force cosine (exact ties, e.g. an item's two halves, in any order)."""
    scores = stored @ (query / np.linalg.norm(query))
    assert len({r.id for r in results}) == len(results) == min(n, len(stored))
    np.testing.assert_allclose([r.score for r in results], np.sort(scores)[::-1][:n], atol=1e-5)
    np.testing.assert_allclose([scores[r.id] for r in results], [r.score for r in results], atol=1e-5)


@pytest.fixture(scope="module")
def indexed(real_embedder, tmp_path_factory):
    """A bucket-size-4 index of 8 generated images, 4 texts and one image+text item, plus its vectors."""
    from conftest import GENERATED_TEXTS, write_generated_image

    data = tmp_path_factory.mktemp("generated")
    images = [write_generated_image(data / f"img_{i:02d}.png", seed=i) for i in range(8)]
    texts = [data / name for name in sorted(GENERATED_TEXTS)]
    for path in texts:
        path.write_text(GENERATED_TEXTS[path.name], encoding="utf-8")
    image_vecs = real_embedder.embed_images(images)
    text_vecs = real_embedder.embed_texts([p.read_text() for p in texts])
    mixed = merge_vectors(image_vecs[:1], text_vecs[:1])
    vectors = np.concatenate([image_vecs, text_vecs, mixed[None]])
    records = [{"path": p, "kind": "image"} for p in images] + [{"path": p, "kind": "text"} for p in texts]
    records.append({"path": "pair", "kind": "mixed"})
    index = FlatIndex.create(
        data / "index", dim=real_embedder.dim, aligner_id=real_embedder.aligner_id, bucket_size=4,
        data_root=data,
    )  # fmt: skip
    index.add(vectors, records, aligner_id=real_embedder.aligner_id)
    yield Searcher(real_embedder, index), vectors, images, texts
    index.close()


def test_by_text_ranks_like_brute_force_and_finds_its_own_text(indexed):
    searcher, vectors, _, texts = indexed
    for path in texts:
        query = path.read_text()
        results = searcher.by_text(query, n=13)
        assert_brute_force_top(results, vectors, searcher.embedder.embed_texts([query])[0], 13)
        assert results[0].path == path.name and results[0].kind == "text"
        assert results[0].score == pytest.approx(1.0, abs=1e-4)


def test_by_image_takes_a_pil_image_and_finds_itself_first(indexed):
    searcher, vectors, images, _ = indexed
    for i in (0, 3, 7):
        with Image.open(images[i]) as img:
            results = searcher.by_image(img.copy(), n=5)
        assert results[0].id == i and results[0].score == pytest.approx(1.0, abs=1e-4)
        assert_brute_force_top(results, vectors, vectors[i], 5)


def test_by_text_and_image_merges_like_the_build_and_finds_the_pair(indexed):
    searcher, vectors, images, texts = indexed
    text = texts[0].read_text()
    with Image.open(images[0]) as img:
        results = searcher.by_text_and_image(text, img.copy(), n=13)
    assert results[0].path == "pair" and results[0].score == pytest.approx(1.0, abs=1e-4)
    assert_brute_force_top(results, vectors, vectors[-1], 13)
    image_only = searcher.by_text_and_image(text, images[0], n=1, strategy="image")
    assert image_only[0].id == 0


def test_by_item_lists_the_item_first_unless_excluded(indexed):
    searcher, vectors, _, _ = indexed
    for item_id in (0, 5, 12):
        results = searcher.by_item(item_id, n=6)
        assert results[0].id == item_id and results[0].score == pytest.approx(1.0, abs=1e-5)
        assert_brute_force_top(results, vectors, vectors[item_id], 6)
        others = searcher.by_item(item_id, n=5, exclude_self=True)
        assert [r.id for r in others] == [r.id for r in results[1:]]
    assert searcher.by_vector(vectors[4], n=3) == searcher.index.search(vectors[4], n=3)
    with pytest.raises(ItemNotFoundError):
        searcher.by_item(13)


def test_blank_text_query_is_refused(indexed):
    with pytest.raises(UnreadableItemError, match="empty"):
        indexed[0].by_text("   ")


def test_an_index_of_another_aligner_or_dimension_is_refused(real_embedder, tmp_path):
    dim, aligner = real_embedder.dim, real_embedder.aligner_id
    other = FlatIndex.create(tmp_path / "a", dim=dim, aligner_id=aligner + "-other")
    with pytest.raises(IndexMismatchError, match="aligner"):
        Searcher(real_embedder, other)
    wider = FlatIndex.create(tmp_path / "b", dim=dim + 1, aligner_id=aligner)
    with pytest.raises(IndexMismatchError, match="dimensional"):
        Searcher(real_embedder, wider)


def test_flickr_images_and_captions_rank_like_brute_force(real_embedder, flickr_flat_dataset):
    data = flickr_flat_dataset
    images = sorted(data.glob("*.jpg"))
    captions = sorted(data.glob("caption_*.txt"))
    vectors = np.concatenate(
        [real_embedder.embed_images(images), real_embedder.embed_texts([p.read_text() for p in captions])]
    )
    records = [{"path": p, "kind": "image"} for p in images] + [{"path": p, "kind": "text"} for p in captions]
    with FlatIndex.create(
        data / "index",
        dim=real_embedder.dim,
        aligner_id=real_embedder.aligner_id,
        bucket_size=4,
        data_root=data,
    ) as index:
        index.add(vectors, records, aligner_id=real_embedder.aligner_id)
        searcher = Searcher(real_embedder, index)
        for path in captions:
            by_text = searcher.by_text(path.read_text(), n=14)
            assert by_text[0].path == path.name and by_text[0].score == pytest.approx(1.0, abs=1e-4)
            assert_brute_force_top(by_text, vectors, real_embedder.embed_texts([path.read_text()])[0], 14)
        for i in (0, 9):
            assert searcher.by_image(images[i], n=1)[0].path == images[i].name
            assert index.resolve(searcher.by_item(i, n=1)[0].path) == images[i]
