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


def test_class_palette_is_tab20_dark_hues_first_without_its_greys() -> None:
    # tab20 lists tab10's colours (dark) each followed by a lighter one; the greys (the 8th pair) are dropped.
    assert draw.palette("tab10") == TAB10_WITHOUT_GREY
    colours = draw.palette()
    assert len(colours) == 18 and colours[:9] == TAB10_WITHOUT_GREY
    assert colours[9] == (174, 199, 232)  # tab20's second entry: the light blue
    assert len(draw.palette("viridis")) == 10  # a continuous map: ten samples
    # A class's colour is a function of its index alone, the same in every picture.
    assert draw.class_colour(0) == (31, 119, 180) and draw.class_colour(3) == (214, 39, 40)
    # VOC's 20 classes get 20 different colours (tab20b's darkest shades follow tab20's 18); COCO's 80 cycle.
    assert len({draw.class_colour(c) for c in range(20)}) == 20
    assert draw.class_colour(18) == (57, 59, 121) and draw.class_colour(23) == draw.class_colour(0)


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


def test_a_label_moves_off_what_is_occupied_to_the_nearest_free_spot() -> None:
    # A 20 x 10 box anchored at (5, 5) on a 60 x 40 image; a marker covers x < 30, y < 20. The search steps 11 px
    # (the box's height + 1) vertically and max(11, 10) horizontally: ring 1 overlaps everywhere, ring 2 first
    # tries up (clipped to y = 0: overlaps), then right (x = 27 < 30: overlaps), then down to y = 27: free.
    assert draw.place_label((40, 60), (20, 10), [(5, 5)], [(0, 0, 30, 20)]) == (5, 27, 25, 37)
    assert draw.place_label((40, 60), (20, 10), [(5, 5)], []) == (5, 5, 25, 15)  # free: at its anchor
    # Nowhere free: the spot covering the least (here any spot; the first tried).
    assert draw.place_label((40, 60), (20, 10), [(5, 5)], [(0, 0, 60, 40)]) == (5, 5, 25, 15)
    assert draw.overlap_area((0, 0, 10, 10), (5, 5, 20, 20)) == 25
    assert draw.overlap_area((0, 0, 5, 5), (5, 0, 9, 5)) == 0  # touching is not overlapping


def test_labels_of_instances_at_one_corner_never_cover_each_other_or_a_seed() -> None:
    img = np.full((80, 120, 3), 128, np.uint8)
    masks = np.zeros((3, 80, 120), np.uint8)
    masks[:, 10:60, 10:90] = 1  # three masks with the same top-left corner: the same preferred spot
    seeds = np.array([[12.0, 14.0], [40.0, 50.0], [30.0, 30.0]])  # the first seed right at that corner
    occupied: list = []
    draw.draw_instances(img, masks, seeds, ["cat 0.90", "dog 0.50", "cat 0.20"], alpha=0.4, marker=7,
                        font_scale=0.35, occupied=occupied)  # fmt: skip
    markers, labels = occupied[:3], occupied[3:]
    assert len(labels) == 3
    for i, a in enumerate(labels):
        assert min(a[0], a[1]) >= 0 and a[2] <= 120 and a[3] <= 80  # inside the image
        assert all(draw.overlap_area(a, m) == 0 for m in markers)
        assert all(draw.overlap_area(a, b) == 0 for b in labels[i + 1 :])


def test_colour_bar_runs_low_to_high_and_dims_above_a_maps_own_maximum() -> None:
    tile = np.zeros((101, 20, 3), np.uint8)
    draw.draw_colour_bar(tile, "viridis", 4)
    table = draw.colour_table("viridis")
    assert tile[0, -1].tolist() == (table[255] + 0.5).astype(int).tolist()  # top: the map's high end
    assert tile[100, -1].tolist() == (table[0] + 0.5).astype(int).tolist()
    assert (tile[:, -5] == 0).all() and (tile[:, :15] == 0).all()  # a dark edge; the map itself untouched
    draw.draw_colour_bar(tile, "viridis", 4, level=0.5)  # a map reaching half the shared scale
    assert (tile[50, -1] == 255).all()  # the white tick at its maximum: row (1 - 0.5) * 100
    assert tile[10, -1].tolist() == (table[230] * 0.25 + 0.5).astype(int).tolist()  # dimmed above it


def test_legend_wraps_items_to_the_width_and_draws_a_swatch_per_class() -> None:
    items = [("cat", (31, 119, 180)), ("dog", (255, 127, 14)), ("2 below 0.10 not drawn", None)]
    one_line = draw.legend_lines(items, 1000, 0.4)
    assert one_line == [items]
    narrow = draw.legend_lines(items, 60, 0.4)
    assert [len(line) for line in narrow] == [1, 1, 1]  # each item wider than half the width: one per line
    img = np.zeros((40, 300, 3), np.uint8)
    draw.draw_legend(img, one_line, 0, 0, 0.4)
    assert (img == (31, 119, 180)).all(axis=2).any() and (img == (255, 127, 14)).all(axis=2).any()
    assert draw.legend_size(one_line, 0.4)[1] == draw.legend_line_height(0.4)


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
    orange = np.array(draw.class_colour(1))  # the instance is a dog: class 1's colour
    assert out[35, 15].tolist() == (100 * 0.55 + orange * 0.45 + 0.5).astype(int).tolist()
    assert (out[50, 80] > 240).all() and (out[50, 88] == 100).all()  # a further valid peak: a white cross
    assert out[58, 5].tolist() == [100, 100, 100] and (image == 100).all()
    # The legend names the class in the corner the mask covers least (the top-right), on a dark box.
    assert (out[:15, 60:] == orange).all(axis=2).any() and out[2, 98].tolist() == [30, 30, 30]


def test_overlay_leaves_out_instances_below_the_display_score_and_says_so() -> None:
    hw = (120, 200)
    masks = torch.zeros(2, *hw, dtype=torch.bool)
    masks[0, 10:50, 10:60] = True
    masks[1, 60:110, 120:190] = True
    inst = Instances(hw, masks=masks, labels=torch.tensor([0, 1]), scores=torch.tensor([0.8, 0.05]),
                     peaks=torch.tensor([[30.0, 30.0], [85.0, 150.0]]), prms=masks.float())  # fmt: skip
    image = np.full((*hw, 3), 100, np.uint8)
    out = render_overlay(image, inst, ["cat", "dog"], display_score=0.1)
    assert (out[80, 130] == 100).all()  # the 0.05 dog is not drawn
    assert not (out == draw.class_colour(1)).all(axis=2).any()
    assert (out[45, 15] != 100).any()  # the cat is
    every = render_overlay(image, inst, ["cat", "dog"], display_score=0.0)
    assert (every[80, 130] != 100).any()
    # The legend's note: its box is taller with the extra line on a 200 px image (legend width 100 px).
    note = (out[:, :, 0] == 30) & (out[:, :, 1] == 30)
    assert note.sum() > ((every[:, :, 0] == 30) & (every[:, :, 1] == 30)).sum()
    with pytest.raises(ValueError, match="masks are"):
        render_overlay(np.zeros((30, 50, 3), np.uint8), _instances(hw), ["cat", "dog"])


def test_save_png_refuses_what_is_not_an_rgb_uint8_image(tmp_path) -> None:
    with pytest.raises(ValueError, match="uint8"):
        draw.save_png(tmp_path / "x.png", np.zeros((4, 4), np.uint8))
    assert not list(tmp_path.iterdir())
