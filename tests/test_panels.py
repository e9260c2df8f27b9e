"""Panels: known layouts and sizes, outlines and markers where they belong, empty inputs, PNG IO, speed."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from ranprm.prm.instances import Instances
from ranprm.viz import draw
from ranprm.viz.draw import fit_text, label_size, legend_line_height, save_png
from ranprm.viz.layout import caption_height, font_scale, pad_to, panel_layout, tile_shape
from ranprm.viz.panels import (
    PanelInputs,
    PanelStyle,
    choose_prms,
    largest_layout,
    layout_for,
    panel_caption,
    render_panel,
)

NAMES = ["cat", "dog", "person", "car"]
H, W = 64, 96  # not square, so a swapped height and width shows up


def grey_image(h: int = H, w: int = W, value: float = 0.5) -> torch.Tensor:
    return torch.full((3, h, w), value)


def box_mask(y0: int, y1: int, x0: int, x1: int, h: int = H, w: int = W) -> torch.Tensor:
    m = torch.zeros(h, w, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


def instances(n: int, h: int = H, w: int = W) -> Instances:
    masks = torch.stack([box_mask(5 + 10 * i, 20 + 10 * i, 10 + 20 * i, 30 + 20 * i, h, w) for i in range(n)])
    return Instances(
        (h, w),
        masks=masks,
        labels=torch.arange(n) % 2,
        scores=torch.linspace(0.9, 0.5, n),
        peaks=torch.tensor([[12.0 + 10 * i, 20.0 + 20 * i] for i in range(n)]).reshape(n, 2),
        prms=torch.rand(n, h, w),
    )


def full_inputs(h: int = H, w: int = W) -> PanelInputs:
    """2 valid classes, 3 peaks with PRMs, 2 instances, GT, 3 attention maps of different sizes."""
    peaks = torch.tensor([[0, 10.0, 20.0], [0, 40.0, 60.0], [1, 30.0, 30.0]])
    return PanelInputs(
        image=torch.rand(3, h, w),
        class_names=NAMES,
        crms=torch.randn(4, 2, 3),
        valid_classes=torch.tensor([0, 1]),
        peaks=peaks,
        prms=torch.rand(3, h, w),
        instances=instances(2, h, w),
        gt_masks=torch.stack([box_mask(10, 30, 10, 40, h, w), box_mask(35, 60, 50, 90, h, w)]),
        gt_labels=torch.tensor([0, 1]),
        attention=[torch.rand(16, 24), torch.rand(8, 8, 12), torch.rand(4, 6)],
        class_scores=torch.tensor([2.0, 1.0, -3.0, -4.0]),
    )


def empty_inputs(**changes) -> PanelInputs:
    fields = dict(
        image=grey_image(),
        class_names=NAMES,
        crms=torch.zeros(4, 2, 3),
        valid_classes=torch.zeros(0, dtype=torch.long),
        peaks=torch.zeros(0, 3),
    )
    fields.update(changes)
    return PanelInputs(**fields)


def tile_of(panel: np.ndarray, inputs: PanelInputs, row: int, col: int, **kw) -> np.ndarray:
    layout = layout_for(inputs, **kw)
    y, x = layout.picture_origin(row, col)
    th, tw = layout.tile_hw
    return panel[y : y + th, x : x + tw]


# ------------------------------------------------------------------------------------------------ layout


def test_full_panel_has_the_known_layout_and_size() -> None:
    inputs = full_inputs()
    layout = layout_for(inputs)
    assert layout.rows == (("overview", 2), ("crm", 2), ("prm", 3), ("attention", 3))
    assert layout.cols == 3 and layout.tile_hw == (H, W)
    # A 96 px tile takes the smallest font (0.35), whose caption strip is 18 px: 4 cells of 64 + 18 and 5 gaps
    # of 4, plus the legend's one line ("cat", "dog", the PRM scale: 37 + 39 + 142 px of the 296 px) of 18 px and
    # a gap, by 3 cells of 96 and 4 gaps.
    assert layout.caption_h == caption_height(W) == 18
    assert layout.footer_h == legend_line_height(0.35) == 18
    assert layout.size == (4 * (64 + 18) + 5 * 4 + 18 + 4, 3 * 96 + 4 * 4) == (370, 304)
    panel = render_panel(inputs)
    assert panel.shape == (370, 304, 3) and panel.dtype == np.uint8 and panel.flags.c_contiguous


def test_layout_wraps_rows_at_max_cols_and_caps_prms() -> None:
    layout = panel_layout((H, W), num_crms=6, num_prms=8, has_instances=True, num_attention=0, max_cols=4)
    assert layout.rows == (("overview", 2), ("crm", 4), ("crm", 2), ("prm", 4), ("prm", 4))
    assert layout.cols == 4
    peaks = torch.tensor([[0, 5.0 + i, 5.0 + i] for i in range(12)])
    inputs = empty_inputs(valid_classes=torch.tensor([0]), peaks=peaks, prms=torch.rand(12, H, W))
    assert layout_for(inputs, max_prms=5).rows == (("overview", 1), ("crm", 1), ("prm", 5))
    assert render_panel(inputs, max_prms=5).shape[:2] == layout_for(inputs, max_prms=5).size
    assert layout_for(inputs, max_prms=0).rows == (("overview", 1), ("crm", 1))


def test_tile_size_scales_the_longer_side_and_the_maps_follow() -> None:
    assert tile_shape((H, W)) == (H, W)
    assert tile_shape((H, W), 48) == (32, 48)
    assert tile_shape((300, 500), 192) == (115, 192)
    inputs = full_inputs()
    panel = render_panel(inputs, tile_size=192)
    layout = layout_for(inputs, tile_size=192)
    assert layout.tile_hw == (128, 192)
    assert panel.shape == (*layout.size, 3)


@pytest.mark.parametrize(
    ("changes", "rows"),
    [
        ({}, (("overview", 1),)),
        ({"instances": Instances.empty((H, W))}, (("overview", 2),)),
        ({"attention": []}, (("overview", 1),)),
        ({"valid_classes": torch.tensor([2])}, (("overview", 1), ("crm", 1))),
        # Instances alone give no PRM row: their maps are merged by NMS, not the PRM of the peak they mark.
        ({"instances": instances(2)}, (("overview", 2),)),
    ],
)
def test_missing_parts_render_a_smaller_panel(changes: dict, rows: tuple) -> None:
    inputs = empty_inputs(**changes)
    layout = layout_for(inputs)
    assert layout.rows == rows
    panel = render_panel(inputs)
    assert panel.dtype == np.uint8 and panel.shape == (*layout.size, 3)


def test_bare_panel_is_one_captioned_tile() -> None:
    panel = render_panel(empty_inputs())
    gap, cap = PanelStyle().gap, caption_height(W)
    assert panel.shape == (H + cap + 2 * gap, W + 2 * gap, 3)
    # The picture is the untouched input: 0.5 grey is 128 everywhere.
    assert (tile_of(panel, empty_inputs(), 0, 0) == 128).all()


# ------------------------------------------------------------------------------------------------ content


def band(mask: np.ndarray, radius: int) -> np.ndarray:
    """Pixels within `radius` of the mask's boundary."""
    k = np.ones((2 * radius + 1, 2 * radius + 1), np.uint8)
    m = mask.astype(np.uint8)
    return (cv2.dilate(m, k) - cv2.erode(m, k)).astype(bool)


@pytest.mark.parametrize("gt_scale", [1, 2])  # GT masks at the image size, and at twice it (an original size)
def test_gt_outline_is_drawn_on_the_mask_boundary_only(gt_scale: int) -> None:
    y0, y1, x0, x1 = 20, 44, 30, 70
    gt = box_mask(y0 * gt_scale, y1 * gt_scale, x0 * gt_scale, x1 * gt_scale, H * gt_scale, W * gt_scale)
    inputs = empty_inputs(gt_masks=gt[None], gt_labels=torch.tensor([1]))
    tile = tile_of(render_panel(inputs), inputs, 0, 0)
    changed = (tile != 128).any(axis=2)
    mask = box_mask(y0, y1, x0, x1).numpy()
    assert changed[band(mask, 1)].mean() > 0.9  # the boundary is outlined all round
    # The outline and the label are dog's colour (class 1); the label "dog" sits at the mask's top-left corner.
    dog = draw.class_colour(1)
    lw, lh = label_size("dog", font_scale(W) * 0.9)
    label = np.zeros_like(mask)
    label[y0 : y0 + lh, x0 : x0 + lw] = True
    assert tile[y0, x0].tolist() == list(dog)
    # Anti-aliased: each outline pixel mixes the grey with dog's colour, so it moves from the grey towards it.
    towards = tile[band(mask, 1) & changed & ~label].astype(float) - 128
    direction = np.asarray(dog, float) - 128
    cosine = towards @ direction / (np.linalg.norm(towards, axis=1) * np.linalg.norm(direction))
    assert (cosine > 0.95).mean() > 0.9
    assert not changed[~band(mask, 3) & ~label].any()  # nothing else far inside or outside changes
    assert not changed[(y0 + y1) // 2, (x0 + x1) // 2] and not changed[2, 2]


def test_peak_marker_is_drawn_where_the_peak_is() -> None:
    py, px = 30, 50
    inputs = empty_inputs(valid_classes=torch.tensor([1]), peaks=torch.tensor([[1, py, px], [2, 10, 10]]))
    panel = render_panel(inputs)
    tile = tile_of(panel, inputs, 1, 0)
    bar = max(4, W // 40) + 1  # the colour bar and its dark edge along the right
    tile = tile[:, :-bar]
    # A flat CRM is a flat heat map: every pixel but the marker and its number has one colour.
    background = tile[2, 2]
    changed = (tile != background).any(axis=2)
    assert (tile[py, px] > 200).all()  # the cross's white centre
    marker = max(7, min(H, W) // 16)
    # The black outline is 2 px longer than the white cross, and 4 px thick with anti-aliasing.
    reach = (marker + 2) // 2 + 3
    near = np.zeros_like(changed)
    near[py - reach : py + reach + 1, px - reach : px + reach + 1] = True
    assert changed[near].sum() > 10
    # Beyond the cross: only the peak's number, "1" on class 1's colour, up and to the right of it.
    ys, xs = np.nonzero(changed & ~near)
    assert len(ys) and ys.max() < py and xs.min() > px and ys.min() >= py - marker - 20 and xs.max() < px + 30
    assert (tile[ys, xs] == draw.class_colour(1)).all(axis=1).mean() > 0.5
    # The peak of class 2 is not drawn on class 1's CRM.
    assert not changed[10, 10]


def test_peak_marker_follows_a_scaled_tile() -> None:
    inputs = empty_inputs(valid_classes=torch.tensor([0]), peaks=torch.tensor([[0, 16.0, 24.0]]))
    tile = tile_of(render_panel(inputs, tile_size=192), inputs, 1, 0, tile_size=192)
    assert tile.shape[:2] == (128, 192)
    assert (tile[32, 48] > 200).all()


def test_instances_are_filled_where_their_masks_are() -> None:
    inst = Instances(
        (H, W),
        masks=box_mask(30, 60, 50, 90)[None],
        labels=torch.tensor([3]),
        scores=torch.tensor([0.8]),
        peaks=torch.tensor([[45.0, 70.0]]),
        prms=torch.rand(1, H, W),
    )
    inputs = empty_inputs(instances=inst)
    tile = tile_of(render_panel(inputs), inputs, 0, 1)
    assert (tile[55, 85] != 128).any()  # inside, away from the label and the peak marker: coloured
    assert (tile[10, 10] == 128).all() and (tile[25, 40] == 128).all()  # outside: the input


def test_instances_take_their_class_colour_and_those_below_the_display_score_are_left_out() -> None:
    masks = torch.stack([box_mask(30, 60, 50, 90), box_mask(5, 25, 5, 40)])
    inst = Instances((H, W), masks=masks, labels=torch.tensor([3, 0]), scores=torch.tensor([0.8, 0.05]),
                     peaks=torch.tensor([[45.0, 70.0], [15.0, 20.0]]), prms=torch.rand(2, H, W))  # fmt: skip
    inputs = empty_inputs(instances=inst)
    tile = tile_of(render_panel(inputs), inputs, 0, 1)
    car = np.array(draw.class_colour(3))
    assert tile[55, 85].tolist() == (128 * 0.55 + car * 0.45 + 0.5).astype(int).tolist()
    assert (tile[20, 10] == 128).all()  # the 0.05 cat is below the default display score (0.1): not drawn
    every = tile_of(render_panel(inputs, display_score=0.0), inputs, 0, 1, display_score=0.0)
    cat = np.array(draw.class_colour(0))
    assert every[20, 10].tolist() == (128 * 0.55 + cat * 0.45 + 0.5).astype(int).tolist()

    # The legend says so: "car" and the note "1 instance below 0.10 not drawn" (about 180 px) instead of "car" and
    # "cat" (about 80 px): its text reaches further right.
    def legend_end(panel: np.ndarray) -> int:
        footer = panel[-22:-4]
        return int(np.nonzero((footer != PanelStyle().background).any(axis=(0, 2)))[0].max())

    assert legend_end(render_panel(inputs)) > legend_end(render_panel(inputs, display_score=0.0)) + 60


@pytest.mark.parametrize("prm_scale", ["shared", "per_map"])
def test_prms_share_one_scale_so_a_weak_map_looks_weak_unless_each_is_scaled_to_its_own(prm_scale: str) -> None:
    prms = torch.zeros(2, H, W)
    prms[0, 5:25, 5:25] = 2.0  # the strong PRM
    prms[1, 5:25, 5:25] = 0.5  # a map a quarter as strong
    peaks = torch.tensor([[0, 40.0, 60.0], [1, 40.0, 60.0]])
    inputs = empty_inputs(valid_classes=torch.tensor([0, 1]), peaks=peaks, prms=prms)
    panel = render_panel(inputs, prm_scale=prm_scale)
    strong, weak = (tile_of(panel, inputs, 2, col, prm_scale=prm_scale)[15, 15] for col in (0, 1))
    grey = draw.grey_of(np.full((1, 1, 3), 128, np.uint8), dim=0.85)
    table = draw.heat_over(grey.repeat(256, 1), np.linspace(0, 1, 256, dtype=np.float32)[None], "inferno",
                           PanelStyle().heat_alpha)[0]  # fmt: skip
    assert strong.tolist() == table[255].tolist()  # the top of the scale
    # Shared: 0.5 of 2.0 is level 0.25 * 255 = 63.75 -> 64; per map: the weak map's own top.
    assert weak.tolist() == table[64 if prm_scale == "shared" else 255].tolist()
    with pytest.raises(ValueError, match="prm_scale"):
        render_panel(inputs, prm_scale="log")


def test_peaks_are_numbered_in_the_prm_rows_order_with_their_crm_value() -> None:
    crms = torch.zeros(4, 2, 3)
    crms[0, 0, 0], crms[0, 1, 2], crms[1, 1, 0] = 9.0, 4.0, 2.5
    peaks = np.array([[0, 50.0, 80.0], [1, 50.0, 10.0], [0, 5.0, 5.0]])
    numbered = choose_prms(peaks, crms.numpy(), (H, W), [0, 1], max_prms=3)
    # #1 cat's strongest (row 2, value 9), #2 dog (2.5), #3 cat's second (4.0): the numbers the CRM tiles draw
    # beside the crosses and the PRM captions start with.
    assert [(p.index, p.label, p.value) for p in numbered] == [(2, 0, 9.0), (1, 1, 2.5), (0, 0, 4.0)]


def test_one_run_size_fits_every_panel_and_padding_keeps_the_panel_at_the_top_left() -> None:
    inputs = full_inputs()
    largest = largest_layout([(H, W)], NAMES, num_attention=3, max_prms=8)
    panel = render_panel(inputs)
    assert panel.shape[0] <= largest.size[0] and panel.shape[1] <= largest.size[1]
    padded = pad_to(panel, largest.size, PanelStyle().background)
    assert padded.shape == (*largest.size, 3)
    np.testing.assert_array_equal(padded[: panel.shape[0], : panel.shape[1]], panel)
    assert (padded[-1, -1] == PanelStyle().background).all()
    with pytest.raises(ValueError, match="does not fit"):
        pad_to(padded, panel.shape[:2], (0, 0, 0))


def test_crm_and_prm_tiles_are_hot_where_the_maps_are_high() -> None:
    crms = torch.zeros(4, 2, 3)
    crms[0, 1, 2] = 10.0  # bottom-right cell
    prm = torch.zeros(1, H, W)
    prm[0, 5:15, 5:15] = 1.0
    inputs = empty_inputs(valid_classes=torch.tensor([0]), crms=crms, peaks=torch.tensor([[0, 3.0, 3.0]]), prms=prm)
    panel = render_panel(inputs)
    crm_tile = tile_of(panel, inputs, 1, 0).astype(int)
    prm_tile = tile_of(panel, inputs, 2, 0).astype(int)
    # viridis runs from dark blue-purple to bright yellow: the hot corner is far brighter.
    assert crm_tile[56, 86].sum() > crm_tile[10, 10].sum() + 150
    # (the peak's cross and number cover part of the hot square)
    assert prm_tile[5:15, 5:15].sum(axis=2).max() > prm_tile[50, 80].sum() + 150


def test_prm_choice_follows_the_crm_order_and_takes_every_class_before_a_second_peak() -> None:
    crms = torch.zeros(4, 2, 3)
    crms[0] = 5.0
    crms[0, 0, 0] = 9.0  # class 0's peak in the top-left cell is its strongest
    crms[1] = 1.0
    crms[3] = 20.0  # class 3 is the strongest, but it is not a valid class: it comes after the CRM row's
    peaks = np.array([[0, 40.0, 80.0], [0, 5.0, 5.0], [3, 10.0, 10.0], [0, 40.0, 10.0], [1, 20.0, 20.0]])
    picked = choose_prms(peaks, crms.numpy(), (H, W), class_order=[1, 0], max_prms=4)
    # (row of peaks, class, rank in class, peaks of the class): class 1 then 0 as in the CRM row, then class 3;
    # class 0's second peak (row 0, the bottom-right cell at 5.0, ties with row 3: the peaks' order) comes last.
    expected = [(4, 1, 1, 1), (1, 0, 1, 3), (2, 3, 1, 1), (0, 0, 2, 3)]
    assert [(p.index, p.label, p.rank, p.of) for p in picked] == expected
    assert (picked[1].y, picked[1].x) == (5.0, 5.0)
    assert choose_prms(peaks, crms.numpy(), (H, W), [1, 0], max_prms=0) == []


def test_prm_strength_is_read_in_the_crm_cell_under_the_peak() -> None:
    """Pixel centres map to CRM cells as `to_image_coordinates` puts them: cell u's centre (u + 0.5) * s - 0.5."""
    crms = np.zeros((1, 2, 2), np.float32)
    crms[0, 0, 1] = 1.0  # top-right cell of a 64 x 96 image: rows 0-31, columns 48-95
    peaks = np.array([[0, 31.0, 47.0], [0, 31.0, 48.0]])  # the last column of the left cell, the first of the right
    picked = choose_prms(peaks, crms, (H, W), [0], max_prms=1)
    assert picked[0].index == 1


def _blob_prm(
    peak_yx: tuple[float, float], image_hw: tuple[int, int], prm_hw: tuple[int, int], sigma: float
) -> np.ndarray:
    """A Gaussian blob of `sigma` image pixels at an image point, on a grid of `prm_hw` (e.g. the network input)
    stretched over the image, with pixel centres mapped as the pipeline maps them ((i + 0.5) * H / h - 0.5)."""
    ys = (np.arange(prm_hw[0]) + 0.5) * image_hw[0] / prm_hw[0] - 0.5
    xs = (np.arange(prm_hw[1]) + 0.5) * image_hw[1] / prm_hw[1] - 0.5
    d2 = (ys[:, None] - peak_yx[0]) ** 2 + (xs[None, :] - peak_yx[1]) ** 2
    return np.exp(-d2 / (2 * sigma**2)).astype(np.float32)


def test_each_prm_tile_shows_its_own_peaks_prm_in_the_crm_order_not_the_instances_merged_maps() -> None:
    """A blob at each peak, at different places, on a 64 x 64 grid for a 60 x 100 image shown at 150 px tiles.

    Class 0 is the stronger class, but the CRM row lists class 2 first, and so must the PRM row. The instance
    seeded at (10, 15) carries a map merged by NMS with the class-2 peak's PRM (as `instance_nms` does when it
    suppresses that instance): it is hot under the class-2 peak too, and must not be what the PRM tile shows.
    """
    hw, prm_hw, tile = (60, 100), (64, 64), 150
    cat_a, cat_b, car = (10.0, 15.0), (45.0, 80.0), (40.0, 30.0)
    peaks = torch.tensor([[0, *cat_a], [0, *cat_b], [2, *car]])
    blobs = {p: _blob_prm(p, hw, prm_hw, sigma=5.0) for p in (cat_a, cat_b, car)}
    crms = torch.zeros(4, 3, 5)
    crms[0] = 5.0
    crms[0, 0, 0] = 9.0  # cat_a's cell
    crms[2] = 1.0
    on_image = {p: torch.from_numpy(_blob_prm(p, hw, hw, sigma=5.0)) for p in (cat_a, cat_b, car)}
    merged = on_image[cat_a] + on_image[car]
    inst = Instances(
        hw,
        masks=torch.stack([box_mask(0, 25, 0, 35, *hw), box_mask(30, 60, 60, 100, *hw)]),
        labels=torch.tensor([0, 0]),
        scores=torch.tensor([0.9, 0.8]),
        peaks=torch.tensor([cat_a, cat_b]),
        prms=torch.stack([merged / merged.max(), on_image[cat_b]]),
    )
    inputs = PanelInputs(
        image=torch.full((3, *hw), 0.5),
        class_names=NAMES,
        crms=crms,
        valid_classes=torch.tensor([2, 0]),
        peaks=peaks,
        prms=torch.from_numpy(np.stack([blobs[cat_a], blobs[cat_b], blobs[car]])),
        instances=inst,
    )
    panel = render_panel(inputs, tile_size=tile)
    layout = layout_for(inputs, tile_size=tile)
    assert layout.tile_hw == (90, 150) and layout.rows == (("overview", 2), ("crm", 2), ("prm", 3))
    s = 1.5  # image pixels -> tile pixels

    def brightness(row: int, col: int) -> np.ndarray:
        return tile_of(panel, inputs, row, col, tile_size=tile).astype(int).sum(axis=2)

    # The CRM row: class 2 (flat CRM: one colour) then class 0 (hot in cat_a's top-left cell).
    crm_car, crm_cat = brightness(1, 0), brightness(1, 1)
    assert crm_car[80, 140] == crm_car[5, 60]
    assert crm_cat[5, 5] > crm_cat[80, 140] + 150

    for col, own in enumerate([car, cat_a, cat_b]):  # class 2, then class 0's strongest, then its second
        b = brightness(2, col)
        py, px = round(own[0] * s), round(own[1] * s)
        assert b[py, px] == 3 * 255  # the white centre of the cross: the tile marks its own peak
        # 5 px along the diagonal (off the cross's arms; 4.7 image px away) the blob is at 0.64: about 360.
        assert b[py + 5, px + 5] > 300, f"PRM tile {col} is not hot at its own peak"
        for other in {cat_a, cat_b, car} - {own}:  # dark under every other peak, and no marker there
            assert b[round(other[0] * s), round(other[1] * s)] < 240, f"PRM tile {col} is lit under {other}"


@pytest.mark.parametrize("tile_size", [None, 48])
def test_a_uint8_image_renders_like_the_same_float_image(tile_size: int | None) -> None:
    inputs = full_inputs()
    rgb = (inputs.image.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    as_float = PanelInputs(**{**inputs.__dict__, "image": torch.from_numpy(rgb).permute(2, 0, 1).float() / 255})
    as_uint8 = PanelInputs(**{**inputs.__dict__, "image": rgb})
    a = render_panel(as_float, tile_size=tile_size).astype(int)
    b = render_panel(as_uint8, tile_size=tile_size).astype(int)
    assert a.shape == b.shape and np.abs(a - b).max() == 0
    with pytest.raises(ValueError, match="uint8"):
        render_panel(PanelInputs(**{**inputs.__dict__, "image": rgb.transpose(2, 0, 1).copy()}))


def test_attention_maps_accept_channels_and_a_batch_of_one() -> None:
    att = [torch.rand(1, 4, 8, 12), torch.rand(4, 8, 12), torch.rand(8, 12)]
    inputs = empty_inputs(attention=att)
    assert layout_for(inputs).rows == (("overview", 1), ("attention", 3))
    assert render_panel(inputs).shape == (*layout_for(inputs).size, 3)
    with pytest.raises(ValueError, match="attention map 0"):
        render_panel(empty_inputs(attention=[torch.rand(2, 3, 4, 5)]))


def test_non_finite_maps_still_render() -> None:
    crms = torch.full((4, 2, 3), float("nan"))
    inputs = empty_inputs(valid_classes=torch.tensor([0]), crms=crms, attention=[torch.full((4, 4), 0.5)])
    assert render_panel(inputs).dtype == np.uint8


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"image": torch.rand(1, H, W)}, "image"),
        ({"crms": torch.rand(2, 3)}, "crms"),
        ({"valid_classes": torch.tensor([4])}, "valid classes"),
        ({"peaks": torch.tensor([[0, 1.0, 1.0]]), "prms": torch.rand(2, H, W)}, "prms"),
    ],
)
def test_bad_inputs_are_refused_with_a_clear_message(changes: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        render_panel(empty_inputs(**changes))


def test_caption_names_classes_and_counts() -> None:
    text = panel_caption(full_inputs(), image_id="2007_000032")
    assert text == "2007_000032: valid classes: cat, dog; 3 peaks; 2 instances; GT: cat, dog"
    assert panel_caption(empty_inputs()) == "valid classes: none; 0 peaks"


# ------------------------------------------------------------------------------------------------ IO, speed


def test_save_png_round_trips_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    panel = render_panel(full_inputs())
    path = tmp_path / "panels" / "epoch_000" / "img.png"
    save_png(path, panel)
    back = cv2.imread(str(path), cv2.IMREAD_COLOR)[..., ::-1]
    np.testing.assert_array_equal(back, panel)
    save_png(path, panel[:10])  # overwriting replaces the file
    assert cv2.imread(str(path)).shape[0] == 10
    assert sorted(p.name for p in path.parent.iterdir()) == ["img.png"]
    with pytest.raises(ValueError):
        save_png(path, panel.astype(np.float32))


def test_a_busy_192px_panel_renders_every_row() -> None:
    # Its speed is measured in the benchmarks (BENCHMARKS.md), never asserted here.
    h = w = 192
    peaks = torch.tensor([[c, 30.0 + 50 * i, 40.0 + 40 * c] for c in range(3) for i in range(2)])
    inputs = PanelInputs(
        image=torch.rand(3, h, w),
        class_names=NAMES,
        crms=torch.randn(4, 6, 6),
        valid_classes=torch.tensor([0, 1, 2]),
        peaks=peaks,
        prms=torch.rand(6, h, w),
        instances=instances(3, h, w),
        gt_masks=instances(3, h, w).masks,
        gt_labels=torch.tensor([0, 1, 2]),
        attention=[torch.rand(48, 48), torch.rand(24, 24), torch.rand(12, 12)],
    )
    panel = render_panel(inputs)
    assert panel.dtype == np.uint8 and panel.shape == (*layout_for(inputs).size, 3)


def test_captions_drop_detail_before_cutting_the_class_name() -> None:
    options = ("CRM pottedplant p=0.98 [-13.2,25.3]", "CRM pottedplant p=0.98", "CRM pottedplant")
    assert fit_text(options, 186, 0.4) == "CRM pottedplant p=0.98"
    assert fit_text(options, 1000, 0.4) == options[0]
    short = fit_text(options, 40, 0.4)
    assert short.endswith("..") and cv2.getTextSize(short, cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)[0][0] <= 40
    assert fit_text("chaise \u00e9", 1000, 0.4) == "chaise ?"  # Hershey fonts draw ASCII only


def test_bench_case_reports_the_render_time_of_a_panel_of_the_layouts_size(capsys) -> None:
    import json

    from ranprm.bench import panels as bench_panels

    bench_panels.main(["--quick"])
    (row,) = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert row["case"] == "panels" and row["size"] == 64 and row["render_ms"] > 0
    assert tuple(row["panel_hw"]) == layout_for(bench_panels.busy_inputs(64)).size
