import torch

from ranprm.prm.peaks import (
    class_scores,
    find_peaks,
    local_maxima,
    peak_coordinates,
    stimulated_scores,
    to_image_coordinates,
    upsample_crm,
)


def test_peaks_found_where_placed():
    crm = torch.zeros(1, 2, 7, 9)
    crm[0, 0, 2, 3] = 5.0
    crm[0, 0, 5, 7] = 3.0
    crm[0, 1, 0, 0] = 1.0  # a corner peak: padding with -inf lets borders win
    peaks = find_peaks(crm, window=3, peak_filter="median")
    coords = peak_coordinates(peaks).tolist()
    assert [0, 0, 2, 3] in coords and [0, 0, 5, 7] in coords and [0, 1, 0, 0] in coords


def test_plateau_gives_one_peak_and_window_matters():
    assert local_maxima(torch.ones(1, 1, 4, 4)).sum() == 1
    crm = torch.zeros(1, 1, 1, 6)
    crm[0, 0, 0, 1], crm[0, 0, 0, 3] = 2.0, 1.0  # two apart: both peaks for a 3-window, one for a 5-window
    assert local_maxima(crm, 3)[0, 0, 0].nonzero().flatten().tolist() == [1, 3]
    assert local_maxima(crm, 5)[0, 0, 0].nonzero().flatten().tolist() == [1]


def test_median_filter_drops_low_maxima():
    crm = torch.tensor([[[[4.0, 0.0, -5.0, -4.0, -5.0, 0.0, 0.5]]]])  # maxima at 4.0, -4.0 and 0.5; median 0
    peaks = find_peaks(crm, 3, "median")[0, 0, 0]
    assert peaks.nonzero().flatten().tolist() == [0, 6]


def test_stimulated_score_is_mean_with_full_peak_gradient():
    crm = torch.zeros(1, 1, 5, 5, requires_grad=True)
    with torch.no_grad():
        crm[0, 0, 1, 1], crm[0, 0, 3, 3] = 4.0, 2.0
    peaks = find_peaks(crm, 3, "max") | find_peaks(crm, 3, 2.0)
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
