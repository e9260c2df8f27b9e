"""The drawing kit and the predict overlay drawn with it: colours, blends, marks and labels at known pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ranprm.prm.instances import Instances
from ranprm.viz import draw
from ranprm.viz.overlay import render_overlay

TAB10_WITHOUT_GREY = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (188, 189, 34), (23, 190, 207),
)  # fmt: skip


def test_palette_is_matplotlibs_tab10_without_its_grey() -> None:
    assert draw.palette() == draw.palette("tab10") == TAB10_WITHOUT_GREY
    assert len(draw.palette("viridis")) == 10  # a continuous map: ten samples


def test_ink_is_dark_on_light_boxes_and_light_on_dark_ones() -> None:
    assert draw.ink_for((235, 235, 235)) == draw.BLACK
    assert draw.ink_for((31, 119, 180)) == draw.WHITE  # luma 0.299*31 + 0.587*119 + 0.114*180 = 99.6


def test_heat_over_blends_the_colour_map_with_an_opacity_that_grows_with_the_value() -> None:
    grey = np.full((1, 2), 100, np.uint8)
    heat = np.array([[0.0, 1.0]], np.float32)
    out = draw.heat_over(grey, heat, "viridis", (0.3, 0.85))
    # viridis runs from (0.267, 0.0049, 0.329) to (0.993, 0.906, 0.144) x 255 = (68.1, 1.2, 84.0), (253.3, 231.1, 36.8)
    # heat 0: 0.7 * 100 + 0.3 * colour; heat 1: 0.15 * 100 + 0.85 * colour; rounded.
    assert out[0, 0].tolist() == [90, 70, 95]
    assert out[0, 1].tolist() == [230, 211, 46]
    assert draw.grey_of(np.array([[[200, 100, 50]]], np.uint8), dim=0.5).tolist() == [[62]]  # luma 124.2 -> 124, halved


def test_normalise_maps_the_range_to_unit_and_a_flat_range_to_zero() -> None:
    m = np.array([[1.0, 2.0, 3.0]], np.float32)
    np.testing.assert_allclose(draw.normalise(m, 1.0, 3.0), [[0.0, 0.5, 1.0]])
    assert not draw.normalise(m, 2.0, 2.0).any() and not draw.normalise(m, 0.0, float("nan")).any()


def test_fill_masks_puts_the_first_mask_on_top() -> None:
    img = np.zeros((1, 3, 3), np.uint8)
    masks = np.array([[[1, 1, 0]], [[0, 1, 1]]], np.uint8)
    out = draw.fill_masks(img, masks, [(0, 100, 0), (200, 0, 0)], alpha=0.5)
    # the second mask first: (100, 0, 0) where it is; then the first over it: (50, 50, 0) where both are
    assert out[0].tolist() == [[0, 50, 0], [50, 50, 0], [100, 0, 0]]


def test_peak_cross_is_white_at_its_centre_and_skips_non_finite_points() -> None:
    img = np.zeros((21, 21, 3), np.uint8)
    draw.draw_peak(img, 10.0, 6.0, size=7)
    assert img[10, 6].tolist() == [255, 255, 255] and img[10, 15].tolist() == [0, 0, 0]
    before = img.copy()
    draw.draw_peak(img, float("nan"), 3.0, size=7)
    np.testing.assert_array_equal(img, before)


def test_text_box_stays_inside_the_image() -> None:
    img = np.zeros((40, 60, 3), np.uint8)
    draw.draw_text_box(img, "person 0.97", 55, 38, (255, 127, 14), 0.35)
    ys, xs = np.nonzero((img == (255, 127, 14)).all(axis=2))
    w, h, base = draw.text_size("person 0.97", 0.35)
    assert xs.max() == 59 and ys.max() == 39  # pushed back against the bottom-right corner
    assert xs.min() == 60 - w - 4 and ys.min() == 40 - h - base - 4


def test_fit_text_prefers_the_longest_option_that_fits() -> None:
    assert draw.fit_text(("a long caption", "short"), 1000, 0.4) == "a long caption"
    assert draw.fit_text(("a long caption", "short"), draw.text_size("short", 0.4)[0], 0.4) == "short"
    assert draw.fit_text("caf\u00e9", 1000, 0.4) == "caf?"


def test_instances_are_labelled_at_their_masks_top_left_and_their_seeds_marked() -> None:
    img = np.full((60, 80, 3), 128, np.uint8)
    masks = np.zeros((1, 60, 80), np.uint8)
    masks[0, 20:50, 30:70] = 1
    out = draw.draw_instances(img, masks, np.array([[40.0, 60.0]]), ["dog 0.80"], alpha=0.5, marker=7, font_scale=0.3)
    blue = TAB10_WITHOUT_GREY[0]
    assert out[20, 30].tolist() == list(blue)  # the label's box starts at the mask's top-left corner
    # inside, away from the label, the outline and the seed: (128 + colour) / 2, rounded
    assert out[45, 40].tolist() == [80, 124, 154]
    assert out[40, 60].tolist() == list(blue)  # the seed's tilted cross, in the instance's colour
    assert out[5, 5].tolist() == [128, 128, 128] and (img == 128).all()  # outside untouched; input unchanged


def _instances(hw: tuple[int, int]) -> Instances:
    mask = torch.zeros(1, *hw, dtype=torch.bool)
    mask[0, 10:40, 10:50] = True
    return Instances(
        hw,
        masks=mask,
        labels=torch.tensor([1]),
        scores=torch.tensor([0.5]),
        peaks=torch.tensor([[25.0, 30.0]]),
        prms=mask.float(),
    )


def test_overlay_fills_outlines_and_marks_with_the_kit() -> None:
    hw = (60, 100)
    image = np.full((*hw, 3), 100, np.uint8)
    out = render_overlay(image, _instances(hw), ["cat", "dog"], peaks=torch.tensor([[0, 50.0, 80.0]]), alpha=0.45)
    blue = np.array(TAB10_WITHOUT_GREY[0])
    assert out[35, 15].tolist() == (100 * 0.55 + blue * 0.45 + 0.5).astype(int).tolist()
    assert (out[50, 80] > 240).all() and (out[50, 88] == 100).all()  # a further valid peak: a white cross
    assert out[5, 5].tolist() == [100, 100, 100] and (image == 100).all()
    with pytest.raises(ValueError, match="masks are"):
        render_overlay(np.zeros((30, 50, 3), np.uint8), _instances(hw), ["cat", "dog"])


def test_save_png_refuses_what_is_not_an_rgb_uint8_image(tmp_path) -> None:
    with pytest.raises(ValueError, match="uint8"):
        draw.save_png(tmp_path / "x.png", np.zeros((4, 4), np.uint8))
    assert not list(tmp_path.iterdir())
