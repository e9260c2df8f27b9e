"""Selective-search segment proposals: box -> mask rule, masks near the objects, rank order, cache."""

import numpy as np
import pytest

import ranprm.prm.retrieval.selective_search as proposals_mod
from ranprm.errors import ConfigError
from ranprm.prm.retrieval.selective_search import (
    SelectiveSearchConfig,
    boxes_to_masks,
    cache_key,
    proposal_masks,
    selective_search_boxes,
    upsample_masks,
)
from ranprm.utils.typed_config import from_mapping

RED = (slice(10, 40), slice(8, 38))
BLUE = (slice(44, 74), slice(50, 88))


@pytest.fixture(scope="module")
def scene() -> np.ndarray:
    """80 x 96 RGB: a red and a blue rectangle on a faintly noisy grey background."""
    rng = np.random.default_rng(0)
    image = (110 + rng.random((80, 96, 3)) * 12).astype(np.uint8)
    image[RED] = (220, 40, 40)
    image[BLUE] = (40, 50, 210)
    return image


def _best_iou(masks: np.ndarray, region: tuple[slice, slice]) -> float:
    truth = np.zeros(masks.shape[1:], dtype=bool)
    truth[region] = True
    inter = (masks & truth).sum((1, 2))
    union = (masks | truth).sum((1, 2))
    return float((inter / union).max())


@pytest.mark.parametrize("mode", ["fast", "single"])
def test_masks_include_one_close_to_each_rectangle(scene, mode):
    masks = proposal_masks(scene, SelectiveSearchConfig(mode=mode))
    assert masks.dtype == bool and masks.shape[1:] == scene.shape[:2] and len(masks) > 2
    assert _best_iou(masks, RED) > 0.5
    assert _best_iou(masks, BLUE) > 0.5
    assert masks.reshape(len(masks), -1).any(1).all()  # no empty proposal
    assert len(np.unique(masks.reshape(len(masks), -1), axis=0)) == len(masks)  # no duplicate


@pytest.mark.parametrize("rank", ["opencv", "random"])
def test_rank_order_is_reproducible_and_follows_the_seed(scene, rank):
    cfg = SelectiveSearchConfig(rank=rank)
    first = selective_search_boxes(scene, cfg)
    np.testing.assert_array_equal(first, selective_search_boxes(scene, cfg))
    np.testing.assert_array_equal(proposal_masks(scene, cfg), proposal_masks(scene, cfg))
    other = selective_search_boxes(scene, SelectiveSearchConfig(rank=rank, seed=1))
    assert not np.array_equal(first, other)  # another seed, another order ...
    same_set = {tuple(b) for b in first}
    assert {tuple(b) for b in other} == same_set and len(same_set) == len(first)  # ... of the same unique boxes


def test_random_rank_is_a_seeded_shuffle_of_the_sorted_boxes(scene):
    boxes = selective_search_boxes(scene, SelectiveSearchConfig(rank="random", seed=3))
    canonical = np.unique(boxes, axis=0)
    np.testing.assert_array_equal(boxes, canonical[np.random.default_rng(3).permutation(len(canonical))])


def test_boxes_to_masks_known_answer():
    # Superpixels: 0 = left two columns, 1 = middle two, 2 = right two (4 rows x 6 columns).
    labels = np.repeat(np.array([[0, 0, 1, 1, 2, 2]]), 4, axis=0)
    boxes = np.array(
        [
            [0, 0, 3, 4],  # all of 0, half of 1 (>= 0.5 joins), clipped to the box: columns 0..2
            [0, 0, 2, 4],  # exactly superpixel 0
            [0, 0, 2, 4],  # duplicate box -> kept once
            [0, 0, 1, 4],  # half of 0: joins, clipped -> column 0 only
            [1, 0, 1, 1],  # 1/8 of superpixel 0: nothing joins -> empty, dropped
        ]
    )

    def columns(*cols: int) -> bytes:
        mask = np.zeros((4, 6), dtype=bool)
        mask[:, list(cols)] = True
        return mask.tobytes()

    masks = boxes_to_masks(labels, boxes, min_inside=0.5)
    assert [m.tobytes() for m in masks] == [columns(0, 1, 2), columns(0, 1), columns(0)]  # the boxes' order
    stricter = boxes_to_masks(labels, boxes, min_inside=0.75)  # half-covered superpixels no longer join
    assert [m.tobytes() for m in stricter] == [columns(0, 1)]  # box 0 keeps superpixel 0 only: a repeat of box 1's
    assert [m.tobytes() for m in boxes_to_masks(labels, boxes, limit=2)] == [columns(0, 1, 2), columns(0, 1)]


def test_downscaled_search_returns_masks_at_image_size(scene):
    masks = proposal_masks(scene, SelectiveSearchConfig(max_side=48))
    assert masks.shape[1:] == scene.shape[:2]
    assert _best_iou(masks, BLUE) > 0.5


def test_upsample_is_pixel_centre_nearest():
    low = np.array([[[True, False], [False, True]]])
    up = upsample_masks(low, (4, 6))
    expected = np.kron(low[0], np.ones((2, 3), dtype=bool))
    np.testing.assert_array_equal(up[0], expected)


def test_max_proposals_and_limit_keep_the_first_in_rank_order(scene):
    full = proposal_masks(scene, SelectiveSearchConfig())
    np.testing.assert_array_equal(proposal_masks(scene, SelectiveSearchConfig(max_proposals=5)), full[:5])
    np.testing.assert_array_equal(proposal_masks(scene, SelectiveSearchConfig(), limit=4), full[:4])


def test_cache_round_trip_returns_identical_masks(scene, tmp_path, monkeypatch):
    cfg, cache = SelectiveSearchConfig(), tmp_path / "cache"
    first = proposal_masks(scene, cfg, cache)
    files = list(cache.iterdir())
    assert [f.name for f in files] == [f"{cache_key(scene, cfg)}.npz"]  # no temporary file left behind

    def fail(*args, **kwargs):
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr(proposals_mod, "low_res_proposals", fail)
    second = proposal_masks(scene, cfg, cache)
    np.testing.assert_array_equal(first, second)
    assert second.dtype == bool


def test_cache_key_depends_on_image_options_and_count(scene):
    base = cache_key(scene, SelectiveSearchConfig())
    assert cache_key(scene, SelectiveSearchConfig(max_proposals=7)) != base
    assert cache_key(scene, SelectiveSearchConfig(rank="random")) != base
    assert cache_key(scene, SelectiveSearchConfig(), limit=100) != base
    assert cache_key(scene, SelectiveSearchConfig(max_proposals=100)) == cache_key(
        scene, SelectiveSearchConfig(), limit=100
    )
    other = scene.copy()
    other[0, 0, 0] ^= 1
    assert cache_key(other, SelectiveSearchConfig()) != base


def test_corrupt_cache_file_is_recomputed(scene, tmp_path):
    cfg = SelectiveSearchConfig()
    expected = proposal_masks(scene, cfg, tmp_path)
    path = tmp_path / f"{cache_key(scene, cfg)}.npz"
    path.write_bytes(b"not a zip file")
    np.testing.assert_array_equal(proposal_masks(scene, cfg, tmp_path), expected)
    np.testing.assert_array_equal(proposal_masks(scene, cfg, tmp_path), expected)  # and the file was replaced
    assert path.stat().st_size > 100


def test_cache_dir_that_is_a_file_is_a_config_error(scene, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="retrieval.cache_dir"):
        proposal_masks(scene, SelectiveSearchConfig(), blocker / "sub")


def test_config_validation():
    assert (
        from_mapping(SelectiveSearchConfig, {"mode": "quality", "max_side": None}, "retrieval.search").max_side is None
    )
    with pytest.raises(ConfigError, match="retrieval.search.mode"):
        SelectiveSearchConfig(mode="slow")
    with pytest.raises(ConfigError, match="retrieval.search.rank"):
        SelectiveSearchConfig(rank="best")
    with pytest.raises(ConfigError, match="unknown option"):
        from_mapping(SelectiveSearchConfig, {"max_boxes": 3}, "retrieval.search")
    with pytest.raises(ConfigError, match="min_inside"):
        from_mapping(SelectiveSearchConfig, {"min_inside": 0}, "retrieval.search")
    with pytest.raises(ConfigError, match="retrieval.search.max_side='big' must be an integer"):
        from_mapping(SelectiveSearchConfig, {"max_side": "big"}, "retrieval.search")


def test_rejects_non_rgb_uint8_images():
    with pytest.raises(ValueError, match="uint8 RGB"):
        proposal_masks(np.zeros((8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match="uint8 RGB"):
        proposal_masks(np.zeros((8, 8, 3), dtype=np.float32))
