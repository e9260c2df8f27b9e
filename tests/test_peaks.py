import pytest
import torch

from ranprm.errors import ConfigError
from ranprm.prm.peaks import (
    GridPeaks,
    PeakHead,
    class_scores,
    local_maxima,
    peak_mask,
    stimulated_scores,
    to_image_coordinates,
    upsample_crm,
)


def test_peaks_found_where_placed():
    crm = torch.zeros(1, 2, 7, 9)
    crm[0, 0, 2, 3] = 5.0
    crm[0, 0, 5, 7] = 3.0
    crm[0, 1, 0, 0] = 1.0  # a corner peak: padding with -inf lets borders win
    peaks = GridPeaks.from_mask(peak_mask(crm, window=3, peak_filter="median"), crm, (7, 9), 1)
    coords = peaks.index.tolist()
    assert [0, 0, 2, 3] in coords and [0, 0, 5, 7] in coords and [0, 1, 0, 0] in coords
    assert peaks.values[coords.index([0, 0, 2, 3])] == 5.0


def test_plateau_gives_one_peak_and_window_matters():
    assert local_maxima(torch.ones(1, 1, 4, 4)).sum() == 1
    crm = torch.zeros(1, 1, 1, 6)
    crm[0, 0, 0, 1], crm[0, 0, 0, 3] = 2.0, 1.0  # two apart: both peaks for a 3-window, one for a 5-window
    assert local_maxima(crm, 3)[0, 0, 0].nonzero().flatten().tolist() == [1, 3]
    assert local_maxima(crm, 5)[0, 0, 0].nonzero().flatten().tolist() == [1]


def test_median_filter_drops_low_maxima():
    crm = torch.tensor([[[[4.0, 0.0, -5.0, -4.0, -5.0, 0.0, 0.5]]]])  # maxima at 4.0, -4.0 and 0.5; median 0
    peaks = peak_mask(crm, 3, "median")[0, 0, 0]
    assert peaks.nonzero().flatten().tolist() == [0, 6]


def test_stimulated_score_is_mean_with_full_peak_gradient():
    crm = torch.zeros(1, 1, 5, 5, requires_grad=True)
    with torch.no_grad():
        crm[0, 0, 1, 1], crm[0, 0, 3, 3] = 4.0, 2.0
    peaks = peak_mask(crm, 3, "max") | peak_mask(crm, 3, 2.0)
    score = stimulated_scores(crm, peaks, full_peak_gradient=True)
    assert torch.allclose(score, torch.tensor([[3.0]]))
    score.sum().backward()
    assert crm.grad[0, 0, 1, 1] == 1.0 and crm.grad[0, 0, 3, 3] == 1.0 and crm.grad.sum() == 2.0
    crm.grad = None
    stimulated_scores(crm, peaks, full_peak_gradient=False).sum().backward()
    assert crm.grad[0, 0, 1, 1] == 0.5


def test_gap_fallback_and_upsampling():
    crm = torch.arange(8.0).view(1, 2, 2, 2)
    assert torch.allclose(class_scores(crm, stimulation=False), torch.tensor([[1.5, 5.5]]))
    fine = upsample_crm(crm, 4)
    assert fine.shape == (1, 2, 8, 8)
    assert fine[0, 0, 0, 0] == crm[0, 0, 0, 0] and fine[0, 0, -1, -1] == crm[0, 0, -1, -1]  # align_corners


def test_image_coordinates_of_cells():
    # a 4x4 CRM of a 128 px image: cell 0 is centred at 15.5, cell 3 at 111.5
    yx = torch.tensor([[0, 3]])
    assert to_image_coordinates(yx, (4, 4), 1, (128, 128)).tolist() == [[15.5, 111.5]]
    # with factor 2 (4 -> 8, align_corners) the last fine position is the last cell
    assert to_image_coordinates(torch.tensor([[7, 0]]), (4, 4), 2, (128, 128)).tolist() == [[111.5, 15.5]]


def test_grid_peaks_to_image_peaks_of_one_image():
    """Grid peaks of a batch: image 1's peaks alone, in that image's pixels, with their labels and values."""
    crm = torch.full((2, 2, 4, 4), -1.0)
    crm[0, 0, 1, 1] = 2.0
    crm[1, 1, 3, 0] = 7.0
    crm[1, 0, 0, 2] = 5.0
    peaks = GridPeaks.from_mask(peak_mask(crm, 3, 0.0), crm, (4, 4), 1)
    assert peaks.index.tolist() == [[0, 0, 1, 1], [1, 0, 0, 2], [1, 1, 3, 0]]
    image = peaks.in_image(1, (128, 64))  # cells of 32 x 16 px: centres (u + 0.5) * s - 0.5
    assert image.yx.tolist() == [[15.5, 39.5], [111.5, 7.5]]
    assert image.labels.tolist() == [0, 1] and image.values.tolist() == [5.0, 7.0]
    assert image.rows().tolist() == [[0.0, 15.5, 39.5], [1.0, 111.5, 7.5]]


def test_peak_head_parses_once_and_scores_at_either_factor():
    head = PeakHead.from_config({"stimulation": True, "window": 3, "peak_filter": "median", "sub_pixel_factor": 2,
                                 "full_peak_gradient": True})  # fmt: skip
    crm = torch.zeros(1, 1, 3, 3)
    crm[0, 0, 1, 1] = 4.0  # one peak, value 4 at factor 1; up-sampled to 6 x 6 the peak spreads into a plateau
    assert head.scores(crm, 1).item() == 4.0
    expected = class_scores(crm, True, 3, "median", 2)
    assert torch.equal(head.scores(crm), expected)  # default: the training factor
    with pytest.raises(ConfigError, match="head.window=4"):
        PeakHead.from_config({"window": 4})
    with pytest.raises(ConfigError, match="head.peak_filter='lowest'"):
        PeakHead.from_config({"peak_filter": "lowest"})
    with pytest.raises(ConfigError, match=r"head: unknown option\(s\) \['windw'\]"):
        PeakHead.from_config({"windw": 3})
