"""build_index: each item embedded once with metadata, exact search over many buckets, append, rebuild."""

import numpy as np
import pytest
import torch
from PIL import Image

from visions_core.build import build_index, reason_category
from visions_core.encoders import preprocess
from visions_core.errors import IndexExistsError, IndexMismatchError
from visions_core.index import FlatIndex
from visions_core.readers import item_at, load_item
from visions_core.search import Searcher
from visions_core.vectors import merge_vectors


def index_matrix(index: FlatIndex) -> np.ndarray:
    return np.stack([index.get_vector(i) for i in range(len(index))])


def brute_force(index: FlatIndex, query: np.ndarray, n: int, exclude: set[int] = frozenset()) -> list[int]:
    """The reference ranking: every stored vector scored in one numpy product, ties by id."""
    scores = index_matrix(index) @ (query / np.linalg.norm(query))
    order = sorted((i for i in range(len(scores)) if i not in exclude), key=lambda i: (-scores[i], i))
    return order[:n]


def test_build_indexes_every_item_once_with_its_metadata(generated_dataset, embedder):
    report = build_index(generated_dataset, embedder, batch_size=5)
    assert (report.added, report.present, report.skipped) == (12, 0, [])
    assert report.index_path == generated_dataset / "index"
    with FlatIndex.open(report.index_path) as index:
        records = index.records()
        assert [r["id"] for r in records] == list(range(12))
        assert sorted(r["path"] for r in records) == sorted(
            p.name for p in generated_dataset.iterdir() if p.is_file()
        )
        by_path = {r["path"]: r for r in records}
        dog = by_path["dog.txt"]
        assert (dog["kind"], dog["snippet"]) == ("text", "A brown dog runs across a green field.")
        assert dog["size"] == (generated_dataset / "dog.txt").stat().st_size
        assert dog["hash"] == load_item(item_at(generated_dataset / "dog.txt")).content_hash
        assert by_path["img_03.png"]["kind"] == "image" and by_path["img_03.png"]["snippet"] is None
        vectors = index_matrix(index)
        assert vectors.dtype == np.float32 and vectors.shape == (12, embedder.dim)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
        # The pipeline's vectors are the embedder's own, whatever the batching and threads did.
        image = Image.open(generated_dataset / "img_03.png").convert("RGB")
        direct = embedder.embed_pixels(torch.stack([preprocess(image)]))[0]
        assert float(index.get_vector_by_path("img_03.png") @ direct) > 0.9999
        text = embedder.embed_texts(["A brown dog runs across a green field."])[0]
        assert float(index.get_vector_by_path("dog.txt") @ text) > 0.9999


@pytest.mark.parametrize("workers", [1, 3])
def test_search_over_many_small_buckets_matches_brute_force_for_every_query_kind(
    flickr_flat_dataset, embedder, workers
):
    report = build_index(flickr_flat_dataset, embedder, bucket_size=4, batch_size=3, workers=workers)
    assert report.added == 14
    with FlatIndex.open(report.index_path) as index:
        assert len(list((report.index_path / "buckets").iterdir())) == 4  # 14 items in buckets of 4
        image_path = sorted(flickr_flat_dataset.glob("*.jpg"))[5]
        queries = {
            "text": embedder.embed_texts(["a dog playing in the water"])[0],
            "image": embedder.embed_images([image_path])[0],
            "index id": index.get_vector(9),
            "last bucket item": index.get_vector(13),
        }
        for kind, query in queries.items():
            for n in (1, 5, 14):
                got = [r.id for r in index.search(query, n)]
                assert got == brute_force(index, query, n), (kind, n)
        # Asked about one of its own items, the index ranks that item first with a score of about 1.
        first = index.search(queries["image"], 1)[0]
        assert (first.path, first.kind) == (image_path.name, "image") and first.score > 0.9999


def test_mixed_items_merge_their_image_and_text_vectors(flickr_mixed_dataset, embedder):
    report = build_index(flickr_mixed_dataset, embedder, layout="simple_dir", batch_size=3)
    assert (report.added, report.skipped) == (8, [])
    with FlatIndex.open(report.index_path) as index:
        kinds = {r["path"]: r["kind"] for r in index.records()}
        assert kinds == {f"item_{i}": "mixed" for i in range(6)} | {"item_6": "image", "item_7": "text"}
        item = flickr_mixed_dataset / "item_2"
        (image_file,) = (item / "img").iterdir()
        caption = (item / "text" / "caption.txt").read_text()
        expected = merge_vectors(embedder.embed_images([image_file]), embedder.embed_texts([caption]))
        assert float(index.get_vector_by_path("item_2") @ expected) > 0.9999
        assert (
            float(index.get_vector_by_path("item_2") @ embedder.embed_item([image_file], [caption])) > 0.9999
        )
        assert index.get_record_by_path("item_2")["snippet"] == " ".join(caption.split())[:200]


def test_append_is_idempotent_and_adds_only_new_files(generated_dataset, embedder):
    first = build_index(generated_dataset, embedder)
    with FlatIndex.open(first.index_path) as index:
        before = index.records()
        vectors = index_matrix(index)
    again = build_index(generated_dataset, embedder, mode="append")
    assert (again.added, again.present, again.skipped) == (0, 12, [])
    (generated_dataset / "new.txt").write_text("A cat sleeps on a sofa.")
    more = build_index(generated_dataset, embedder, mode="append")
    assert (more.added, more.present) == (1, 12)
    with FlatIndex.open(first.index_path) as index:
        records = index.records()
        assert records[:12] == before and records[12]["path"] == "new.txt"
        np.testing.assert_array_equal(index_matrix(index)[:12], vectors)
        assert len({r["path"] for r in records}) == len(records) == 13


def test_append_re_embeds_edited_files_in_place_and_ignores_touched_ones(generated_dataset, embedder):
    import os

    first = build_index(generated_dataset, embedder)
    with FlatIndex.open(first.index_path) as index:
        before = {r["path"]: r for r in index.records()}
        vectors = index_matrix(index)
    dog = generated_dataset / "dog.txt"
    dog.write_text("A red sports car parked in a city street at night.", encoding="utf-8")
    touched = generated_dataset / "img_03.png"
    os.utime(touched, (touched.stat().st_atime, touched.stat().st_mtime + 100))

    report = build_index(generated_dataset, embedder, mode="append")
    assert (report.added, report.updated, report.present, report.skipped) == (0, 1, 11, [])
    with FlatIndex.open(first.index_path) as index:
        records = {r["path"]: r for r in index.records()}
        assert len(index) == 12 and records.keys() == before.keys()
        dog_id = records["dog.txt"]["id"]
        assert dog_id == before["dog.txt"]["id"]
        assert records["dog.txt"]["snippet"].startswith("A red sports car")
        assert records["dog.txt"]["hash"] != before["dog.txt"]["hash"]
        expected = embedder.embed_texts(["A red sports car parked in a city street at night."])[0]
        np.testing.assert_allclose(index.get_vector(dog_id), expected, atol=1e-5)
        others = [i for i in range(12) if i != dog_id]
        np.testing.assert_array_equal(index_matrix(index)[others], vectors[others])
        hits = Searcher(embedder, index).by_text("A red sports car parked in a city street at night.", n=1)
        assert hits[0].path == "dog.txt" and hits[0].score == pytest.approx(1.0, abs=1e-4)
    again = build_index(generated_dataset, embedder, mode="append")
    assert (again.added, again.updated, again.present) == (0, 0, 12)


def test_rebuild_starts_over_and_create_refuses_an_existing_index(generated_dataset, embedder):
    build_index(generated_dataset, embedder)
    with pytest.raises(IndexExistsError, match=r"append to it .* or rebuild it"):
        build_index(generated_dataset, embedder)
    (generated_dataset / "dog.txt").unlink()
    (generated_dataset / "img_00.png").unlink()
    report = build_index(generated_dataset, embedder, mode="rebuild", bucket_size=3)
    assert (report.added, report.present) == (10, 0)
    with FlatIndex.open(report.index_path) as index:
        paths = [r["path"] for r in index.records()]
        assert len(paths) == 10 and "dog.txt" not in paths and "img_00.png" not in paths
        assert [r["id"] for r in index.records()] == list(range(10)) and index.bucket_size == 3


def test_indexes_are_never_read_as_data_wherever_they_are(generated_dataset, embedder):
    build_index(generated_dataset, embedder)
    inside = generated_dataset / "sub" / "second_index"
    report = build_index(generated_dataset, embedder, index_path=inside, recursive=True)
    assert (report.added, report.skipped) == (12, [])
    again = build_index(generated_dataset, embedder, index_path=inside, recursive=True, mode="append")
    assert (again.added, again.present, again.skipped) == (0, 12, [])


def test_append_from_another_folder_is_refused(generated_dataset, embedder, tmp_path):
    build_index(generated_dataset, embedder, index_path=tmp_path / "shared_index")
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.txt").write_text("elsewhere")
    with pytest.raises(IndexMismatchError, match="append from the same folder or rebuild"):
        build_index(other, embedder, index_path=tmp_path / "shared_index", mode="append")


def test_every_batch_is_committed_before_the_build_ends(generated_dataset, embedder):
    seen: list[tuple[int, int, int]] = []

    def progress(done: int, total: int) -> None:
        with FlatIndex.open(generated_dataset / "index") as reader:
            seen.append((done, total, len(reader)))

    build_index(generated_dataset, embedder, batch_size=4, progress=progress)
    assert seen[0] == (0, 12, 0), "the first call announces the total before any work"
    assert [s[0] for s in seen] == sorted(s[0] for s in seen) and seen[-1][:2] == (12, 12)
    # A reader in between sees whole committed batches: that is what a killed build resumes from.
    assert sorted({s[2] for s in seen}) == [0, 4, 8, 12]


def test_a_file_vanishing_during_the_build_is_skipped_and_the_build_goes_on(generated_dataset, embedder):
    victim = generated_dataset / "snow.txt"  # listed early, looked at last: names are read in order

    def progress(done: int, total: int) -> None:
        if done > 0:  # the folder has been listed by now
            victim.unlink(missing_ok=True)

    report = build_index(generated_dataset, embedder, batch_size=1, progress=progress)
    assert [(s.path, s.reason) for s in report.skipped] == [
        ("snow.txt", "file vanished before it could be read")
    ]
    assert report.added == 11


def test_reason_category_folds_details_so_counts_group_alike_files():
    assert reason_category("cannot decode image: image file is truncated (3 bytes not processed)") == (
        "cannot decode image"
    )
    assert (
        reason_category("decompression bomb (12000×10000 is over 100,000,000 pixels)") == "decompression bomb"
    )
    assert reason_category("empty file") == "empty file"
