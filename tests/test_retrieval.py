"""Instance retrieval: known answers on constructed scenes (proposal score terms, NMS, prm_only, scores)."""

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from ranprm.errors import ConfigError
from ranprm.prm.instances import Instances
from ranprm.prm.peaks import ImagePeaks
from ranprm.prm.retrieval import build_retrieval, retrieve_instances
from ranprm.prm.retrieval.prm_only import PrmOnlyConfig, gaussian_blur
from ranprm.prm.retrieval.proposals import ProposalRetrievalConfig, proposal_terms
from ranprm.prm.retrieval.scoring import (
    background_masks,
    bytescale,
    contour_masks,
    contour_masks_pooled,
    instance_nms,
    peak_strength,
)
from tests.helpers import fp32_sum_bound

CONF = Path(__file__).resolve().parents[1] / "conf" / "retrieval"
S = 64


def box(y0: int, y1: int, x0: int, x1: int, size: tuple[int, int] = (S, S)) -> torch.Tensor:
    mask = torch.zeros(size, dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    return mask


def fg_crms(classes: int = 1, size: tuple[int, int] = (S, S)) -> torch.Tensor:
    """CRMs whose every pixel is foreground (constant maps: CRM >= 0.95 * mean everywhere)."""
    return torch.ones(classes, *size)


def image_peaks(peaks, labels, values) -> ImagePeaks:
    return ImagePeaks(
        yx=torch.tensor(peaks, dtype=torch.float32).reshape(-1, 2),
        labels=torch.tensor(labels, dtype=torch.long),
        values=torch.tensor(values, dtype=torch.float32),
    )


def call(cfg, prms, peaks, labels, values, logits, crms, **kwargs) -> Instances:
    return retrieve_instances(
        build_retrieval(cfg),
        prms=prms,
        peaks=image_peaks(peaks, labels, values),
        class_logits=torch.tensor(logits, dtype=torch.float32),
        crms=crms,
        **kwargs,
    )


# --------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize(("name", "cls"), [("proposals", ProposalRetrievalConfig), ("prm_only", PrmOnlyConfig)])
def test_yaml_files_hold_every_option_at_its_default(name, cls):
    loaded = OmegaConf.load(CONF / f"{name}.yaml")
    cfg = OmegaConf.to_container(loaded)
    assert cfg["name"] == name
    assert build_retrieval(cfg) == cls()
    assert build_retrieval(loaded) == cls()  # a DictConfig works too


def test_config_errors_name_the_option():
    with pytest.raises(ConfigError, match="retrieval.name"):
        build_retrieval({"name": "mcg"})
    with pytest.raises(ConfigError, match="unknown option"):
        build_retrieval({"name": "prm_only", "treshold": 0.3})
    with pytest.raises(ConfigError, match="retrieval.nms_iou"):
        build_retrieval({"name": "proposals", "nms_iou": 0})
    with pytest.raises(ConfigError, match="retrieval.contour_size"):
        build_retrieval({"name": "proposals", "contour_size": 4})
    with pytest.raises(ConfigError, match="retrieval.gate"):
        build_retrieval({"name": "prm_only", "gate": "maybe"})
    with pytest.raises(ConfigError, match="retrieval.search"):
        build_retrieval({"name": "proposals", "search": {"mode": "slow"}})
    cfg = build_retrieval({"name": "proposals", "cache_dir": "/tmp/x", "search": {"max_side": None}})
    assert cfg.cache_dir == "/tmp/x" and cfg.search.max_side is None
    with pytest.raises(ConfigError, match="retrieval.proposal_count=0"):
        build_retrieval({"name": "proposals", "proposal_count": 0})
    with pytest.raises(ConfigError, match="retrieval.background='raw'"):
        build_retrieval({"name": "prm_only", "background": "raw"})
    with pytest.raises(TypeError, match="parsed config"):
        retrieve_instances({"name": "prm_only"}, torch.zeros(0, 4, 4), image_peaks([], [], []), torch.zeros(1),
                           torch.zeros(1, 4, 4))  # fmt: skip
    assert build_retrieval(None) == PrmOnlyConfig()


# ---------------------------------------------------------------------------------------- score pieces
@pytest.mark.parametrize("fn", [contour_masks, contour_masks_pooled])
@pytest.mark.parametrize("size", [3, 5])
def test_contour_equals_opencv_morphological_gradient(size, fn):
    gen = torch.Generator().manual_seed(1)
    masks = torch.rand(4, 30, 36, generator=gen) > 0.6
    masks[0] = box(0, 12, 0, 20, (30, 36))  # touches the border: OpenCV neither dilates nor erodes there
    got = fn(masks, size)
    kernel = np.ones((size, size), np.uint8)
    for m, g in zip(masks, got, strict=True):
        expected = cv2.morphologyEx(m.numpy().astype(np.uint8), cv2.MORPH_GRADIENT, kernel).astype(bool)
        np.testing.assert_array_equal(g.numpy(), expected)


def test_background_is_below_factor_times_mean():
    crm = torch.tensor([[[0.0, 1.0], [2.0, 5.0]]])  # mean 2, cut 1.9
    classes = torch.tensor([0])
    assert background_masks(crm, classes, (2, 2), 0.95, "bilinear").tolist() == [[[True, True], [False, False]]]
    # Bytescaled: 0, 51, 102, 255 (v * 51 + 0.5, truncated); mean 102, cut 96.9: the same pixels.
    assert bytescale(crm[0].numpy()).tolist() == [[0, 51], [102, 255]]
    assert background_masks(crm, classes, (2, 2), 0.95, "official").tolist() == [[[True, True], [False, False]]]


def test_official_background_cuts_at_min_plus_factor_of_the_range_not_at_factor_times_mean():
    """PRM bytescales the CRM to 0..255 before `< 0.95 * mean`: for logits below zero the cut moves."""
    crm = torch.tensor([[[-10.0, -6.8], [-6.7, -4.5]]])
    # bytescale: (v + 10) * 255 / 5.5 + 0.5, truncated -> 0, 148 (148.86), 153 (153.5), 255; mean 139, cut 132.05.
    assert bytescale(crm[0].numpy()).tolist() == [[0, 148], [153, 255]]
    classes = torch.tensor([0, 0])  # two peaks of the same class share one map
    official = background_masks(crm, classes, (2, 2), 0.95, "official")
    assert official.tolist() == [[[True, False], [False, False]]] * 2
    # docs/method.md's equivalent on the raw map: min + 0.95 * (mean - min) = -10 + 0.95 * 3 = -7.15.
    assert (crm < -7.15).tolist() == official[:1].tolist()
    # The raw rule: mean -7, cut -6.65, so -6.8 and -6.7 count as background too.
    assert background_masks(crm, classes[:1], (2, 2), 0.95, "bilinear").tolist() == [[[True, True], [True, False]]]
    # A constant map bytescales to zeros: nothing is background (0 < 0.95 * 0 is false).
    assert not background_masks(torch.full((1, 3, 3), -4.0), classes[:1], (6, 6), 0.95, "official").any()


def test_official_background_resizes_the_bytescaled_map_with_pil_bicubic():
    from PIL import Image

    crm = torch.tensor([[[0.0, 1.0, 0.0], [1.0, 9.0, 2.0], [0.0, 1.0, 0.0]]])
    got = background_masks(crm, torch.tensor([0]), (12, 9), 0.95, "official")[0].numpy()
    resized = np.asarray(Image.fromarray(bytescale(crm[0].numpy()), mode="L").resize((9, 12), Image.BICUBIC))
    np.testing.assert_array_equal(got, resized < 0.95 * resized.mean())
    assert got.shape == (12, 9) and got[6, 4] == False and got[0, 0] == True  # noqa: E712


def test_proposal_terms_match_the_direct_formula():
    gen = torch.Generator().manual_seed(2)
    prms = torch.rand(3, 20, 24, generator=gen)
    proposals = torch.rand(5, 20, 24, generator=gen) > 0.5
    bg = torch.rand(3, 20, 24, generator=gen) > 0.7
    terms = proposal_terms(prms, proposals, bg)
    kernel = np.ones((5, 5), np.uint8)
    for k in range(3):
        for p in range(5):
            m = proposals[p].numpy()
            c = cv2.morphologyEx(m.astype(np.uint8), cv2.MORPH_GRADIENT, kernel).astype(bool)
            prm = prms[k].numpy().astype(np.float64)  # the known answer in float64; the matmul's error bounded
            expected = 0.8 * prm[m].sum() + prm[c].sum() - 1e-5 * bg[k].numpy()[m].sum()
            bound = fp32_sum_bound(20 * 24, 0.8 * prm[m].sum() + prm[c].sum() + 1e-5 * m.sum())
            assert terms.score(0.8, 1e-5)[k, p].item() == pytest.approx(expected, abs=bound)


def test_peak_strength_is_relative_to_the_strongest_peak_of_the_class():
    got = peak_strength(torch.tensor([0, 0, 1]), torch.tensor([10.0, 5.0, -3.0]))
    expected = [1.0, float(F.softplus(torch.tensor(5.0)) / F.softplus(torch.tensor(10.0))), 1.0]
    assert got.tolist() == pytest.approx(expected)


def test_gaussian_blur_keeps_constants_and_mass_centre():
    flat = torch.full((1, 16, 20), 0.5)
    assert torch.allclose(gaussian_blur(flat, 2.0), flat)
    dot = torch.zeros(1, 21, 21)
    dot[0, 10, 10] = 1.0
    out = gaussian_blur(dot, 1.5)
    assert out.sum().item() == pytest.approx(1.0, abs=1e-5) and out[0].argmax().item() == 10 * 21 + 10


# -------------------------------------------------------------------------------- the proposals method
def scene_proposals() -> torch.Tensor:
    """A (top left), B (centre, 16 x 16), C (bottom right), D (a big box around B)."""
    return torch.stack([box(2, 14, 2, 14), box(24, 40, 24, 40), box(50, 62, 50, 62), box(12, 52, 12, 52)])


def test_retrieval_picks_the_proposal_under_the_prm_blob():
    prm = box(24, 40, 24, 40).float()[None]  # the response covers B exactly
    props = scene_proposals()
    terms = proposal_terms(prm, props, torch.zeros(1, S, S, dtype=torch.bool))
    # Instance term: B and D both hold all 256 responding pixels. Contour term: B's 5x5 gradient band holds
    # the 16^2 - 12^2 = 112 responding pixels along B's inner edge; D's band lies far from the response.
    assert terms.inside[0].tolist() == [0.0, 256.0, 0.0, 256.0]
    assert terms.contour[0].tolist() == [0.0, 112.0, 0.0, 0.0]
    out = call({"name": "proposals"}, prm, [[31.5, 31.5]], [0], [40.0], [3.0], fg_crms(), proposals=props.numpy())
    assert len(out) == 1 and torch.equal(out.masks[0], props[1])
    assert out.labels.tolist() == [0] and out.peaks.tolist() == [[31.5, 31.5]]
    assert torch.equal(out.prms, prm)
    # Whole response inside an all-foreground mask, the only peak: the score is the class probability.
    assert out.scores.item() == pytest.approx(torch.sigmoid(torch.tensor(3.0)).item())


def test_background_penalty_breaks_a_tie_towards_the_foreground_side():
    prm = box(24, 40, 24, 40).float()[None]
    left, right = box(24, 40, 14, 40), box(24, 40, 24, 50)  # mirror images: equal PRM and contour terms
    crm = torch.zeros(1, S, S)
    crm[:, :, 32:] = 10.0  # the class map sees the object on the right: the left half is background
    props = torch.stack([left, right])
    terms = proposal_terms(prm, props, background_masks(crm, torch.tensor([0]), (S, S)))
    assert terms.inside[0, 0] == terms.inside[0, 1] and terms.contour[0, 0] == terms.contour[0, 1]
    assert terms.background[0].tolist() == [16.0 * 18, 16.0 * 8]
    out = call({"name": "proposals"}, prm, [[32, 32]], [0], [40.0], [3.0], crm, proposals=props)
    assert torch.equal(out.masks[0], right)
    out = call({"name": "proposals"}, prm, [[32, 32]], [0], [40.0], [3.0], crm.flip(-1), proposals=props)
    assert torch.equal(out.masks[0], left)


def test_size_filter_skips_huge_and_tiny_proposals():
    size = (32, 32)
    huge = box(0, 32, 0, 28, size)  # 896 / 1024 = 87.5% >= 85%
    small = box(8, 16, 8, 16, size)
    prm = huge.float()[None]  # the huge proposal would win on every term
    args = (prm, [[10, 10]], [0], [5.0], [1.0], fg_crms(1, size))
    props = torch.stack([huge, small])
    assert torch.equal(call({"name": "proposals"}, *args, proposals=props).masks[0], small)
    assert torch.equal(call({"name": "proposals", "max_area": 0.9}, *args, proposals=props).masks[0], huge)
    # 64 pixels = 6.25% of the image: below a 10% floor nothing is left, so the peak yields no instance.
    out = call({"name": "proposals", "min_area": 0.1}, *args, proposals=props)
    assert len(out) == 0 and out.masks.shape == (0, 32, 32)


def test_nms_merges_the_suppressed_prm_into_the_kept_one():
    obj = box(20, 44, 20, 44)
    props = torch.stack([obj, box(0, 8, 0, 8)])
    strong = box(20, 44, 20, 32).float()  # left half of the object
    weak = box(20, 44, 32, 44).float() * 0.5  # right half, weaker
    prms = torch.stack([weak, strong])
    out = call(
        {"name": "proposals", "nms_order": "score", "nms_merge": "masked"},
        prms,
        [[30, 38], [30, 26]],
        [0, 0],
        [20.0, 40.0],
        [3.0],
        fg_crms(),
        proposals=props,
    )
    assert len(out) == 1 and torch.equal(out.masks[0], obj)
    assert out.peaks.tolist() == [[30.0, 26.0]]  # the stronger peak's instance is kept
    expected = strong + weak * obj  # already peaks at 1
    assert torch.allclose(out.prms[0], expected)


def test_nms_class_agnostic_by_default_per_class_on_request():
    obj = box(20, 44, 20, 44)
    prm = obj.float()
    args = (torch.stack([prm, prm]), [[30, 30], [32, 32]], [0, 1], [40.0, 40.0], [3.0, 2.0], fg_crms(2))
    kw = {"proposals": obj[None]}
    assert len(call({"name": "proposals"}, *args, **kw)) == 1
    out = call({"name": "proposals", "nms_per_class": True}, *args, **kw)
    assert out.labels.tolist() == [0, 1]  # class 0 has the higher logit, so it comes first


def test_instance_nms_threshold_is_inclusive():
    a, b, c = box(0, 10, 0, 10, (10, 30)), box(0, 10, 5, 15, (10, 30)), box(0, 10, 20, 30, (10, 30))
    masks = torch.stack([a, b, c])  # IoU(a, b) = 50 / 150 = 1/3, c is disjoint
    prms = masks.float()
    scores = torch.tensor([0.9, 0.5, 0.7])
    keep, merged = instance_nms(masks, prms, scores, torch.zeros(3, dtype=torch.long), iou_threshold=1 / 3)
    assert keep.tolist() == [0, 2]
    assert merged.shape == (2, 10, 30) and merged.max() == 1.0
    keep, _ = instance_nms(masks, prms, scores, torch.zeros(3, dtype=torch.long), iou_threshold=0.34)
    assert keep.tolist() == [0, 2, 1]


def test_proposals_computed_from_the_image_when_not_given():
    image = np.full((S, S, 3), 120, dtype=np.uint8)
    image[16:48, 10:40] = (220, 40, 40)
    obj = box(16, 48, 10, 40)
    out = call({"name": "proposals"}, obj.float()[None], [[32, 25]], [0], [40.0], [3.0], fg_crms(), image=image)
    assert len(out) == 1
    iou = (out.masks[0] & obj).sum() / (out.masks[0] | obj).sum()
    assert iou > 0.7
    with pytest.raises(ConfigError, match="retrieval.name=proposals"):
        call({"name": "proposals"}, obj.float()[None], [[32, 25]], [0], [40.0], [3.0], fg_crms())


# --------------------------------------------------------------------------------- the prm_only method
def two_blobs() -> torch.Tensor:
    return (box(8, 24, 8, 24).float() + 0.8 * box(36, 56, 36, 56).float())[None]


def test_prm_only_keeps_the_component_holding_the_peak():
    cfg = {"name": "prm_only", "smooth": 0.0, "threshold": 0.5, "gate": False}
    out = call(cfg, two_blobs(), [[45, 45]], [0], [30.0], [2.0], fg_crms())
    assert torch.equal(out.masks[0], box(36, 56, 36, 56))
    out = call(cfg, two_blobs(), [[15, 15]], [0], [30.0], [2.0], fg_crms())
    assert torch.equal(out.masks[0], box(8, 24, 8, 24))


def test_prm_only_peak_off_the_mask_takes_the_nearest_component():
    cfg = {"name": "prm_only", "smooth": 0.0, "threshold": 0.5, "gate": False}
    out = call(cfg, two_blobs(), [[30, 28]], [0], [30.0], [2.0], fg_crms())  # nearer the small blob's corner
    assert torch.equal(out.masks[0], box(8, 24, 8, 24))
    out = call(cfg, two_blobs(), [[33, 33]], [0], [30.0], [2.0], fg_crms())
    assert torch.equal(out.masks[0], box(36, 56, 36, 56))


def test_prm_only_gate_cuts_what_the_class_map_calls_background():
    crm = torch.zeros(1, S, S)
    crm[:, :, :46] = 10.0  # columns >= 46 are background
    prm = (box(8, 24, 8, 24).float() + 0.8 * box(36, 56, 36, 46).float() + 0.3 * box(36, 56, 46, 56).float())[None]
    cfg = {"name": "prm_only", "smooth": 0.0, "threshold": 0.2}
    out = call(cfg, prm, [[45, 40]], [0], [30.0], [2.0], crm)
    assert torch.equal(out.masks[0], box(36, 56, 36, 46))
    ungated = call({**cfg, "gate": False}, prm, [[45, 40]], [0], [30.0], [2.0], crm)
    assert torch.equal(ungated.masks[0], box(36, 56, 36, 56))
    # Half of the ungated mask is background and it adds little response: its score is lower.
    total = 256 + 0.8 * 200 + 0.3 * 200
    prob = torch.sigmoid(torch.tensor(2.0)).item()
    assert out.scores.item() == pytest.approx(prob * 160 / total)
    assert ungated.scores.item() == pytest.approx(prob * 220 / total * 0.5)


def test_prm_only_smoothing_bridges_speckle():
    gen = torch.Generator().manual_seed(3)
    speckled = box(16, 48, 16, 48).float() * (torch.rand(S, S, generator=gen) > 0.5)
    args = (speckled[None], [[32, 32]], [0], [30.0], [2.0], fg_crms())
    raw = call({"name": "prm_only", "smooth": 0.0, "gate": False}, *args)
    smooth = call({"name": "prm_only", "smooth": 0.03, "gate": False}, *args)
    obj = box(16, 48, 16, 48)
    assert (smooth.masks[0] & obj).sum() > 0.9 * obj.sum() > (raw.masks[0] & obj).sum()


# ------------------------------------------------------------------------------------ empty and errors
@pytest.mark.parametrize("cfg", [{"name": "proposals"}, {"name": "prm_only"}])
def test_no_peaks_gives_empty_instances(cfg):
    out = retrieve_instances(
        build_retrieval(cfg),
        prms=torch.zeros(0, 20, 30),
        peaks=image_peaks([], [], []),
        class_logits=torch.zeros(4),
        crms=torch.zeros(4, 5, 8),
    )
    assert len(out) == 0 and out.image_size == (20, 30) and out.masks.shape == (0, 20, 30)


def test_a_peak_without_response_gives_no_instance():
    out = call({"name": "prm_only"}, torch.zeros(1, S, S), [[5, 5]], [0], [30.0], [2.0], fg_crms())
    assert len(out) == 0


def test_shape_mismatch_is_reported():
    with pytest.raises(ValueError, match=r"peaks need yx \(K, 2\)"):
        call({"name": "prm_only"}, torch.zeros(2, S, S), [[5, 5]], [0], [30.0], [2.0], fg_crms())
    with pytest.raises(ValueError, match="prms"):
        call({"name": "prm_only"}, torch.zeros(8, 8), [[5, 5]], [0], [30.0], [2.0], fg_crms())
    with pytest.raises(ValueError, match="class_logits"):
        call({"name": "prm_only"}, torch.zeros(1, 8, 8), [[5, 5]], [0], [30.0], [2.0, 1.0], fg_crms())


# ---------------------------------------------------------------------------------------------- scores
def test_scores_rank_a_strong_clean_instance_above_a_weak_diffuse_one():
    a, b = box(4, 24, 4, 24), box(36, 60, 36, 60)
    clean = a.float()  # all of the response inside A
    diffuse = b.float() * 0.4 + 0.2 * box(0, S, 0, S).float()  # much of it spread over the whole image
    prms = torch.stack([diffuse / diffuse.max(), clean])
    props = torch.stack([a, b])
    peaks = [[48, 48], [14, 14]]
    out = call({"name": "proposals"}, prms, peaks, [0, 0], [12.0, 40.0], [4.0], fg_crms(), proposals=props)
    assert len(out) == 2
    assert out.peaks.tolist() == [[14.0, 14.0], [48.0, 48.0]]  # sorted by score: the clean, strong one first
    assert out.scores[0] > out.scores[1] > 0
    assert ((out.scores >= 0) & (out.scores <= 1)).all()


def test_scores_compare_across_images_through_the_class_probability():
    prm = box(24, 40, 24, 40).float()[None]
    props = scene_proposals()
    sure = call({"name": "proposals"}, prm, [[32, 32]], [0], [40.0], [4.0], fg_crms(), proposals=props)
    doubtful = call({"name": "proposals"}, prm, [[32, 32]], [0], [40.0], [-1.0], fg_crms(), proposals=props)
    assert sure.scores.item() > doubtful.scores.item()
    assert doubtful.scores.item() == pytest.approx(torch.sigmoid(torch.tensor(-1.0)).item())


def test_scores_prefer_a_mask_that_explains_the_whole_response():
    prm = box(24, 40, 24, 40).float()[None]
    full = call(
        {"name": "proposals"},
        prm,
        [[32, 32]],
        [0],
        [40.0],
        [4.0],
        fg_crms(),
        proposals=box(24, 40, 24, 40)[None],
    )
    half = call(
        {"name": "proposals"},
        prm,
        [[32, 32]],
        [0],
        [40.0],
        [4.0],
        fg_crms(),
        proposals=box(24, 40, 24, 32)[None],
    )
    assert half.scores.item() == pytest.approx(full.scores.item() / 2)


# ------------------------------------------------------------------------------ retrieval as published
def toy_scene_448() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """At 448 px: an object T (100 x 100), a loose proposal L (250 x 250) around it that is 84% background, and a
    PRM of 1 on T with a faint tail (0.05) over the rest of L. The class map sees T only."""
    size = (448, 448)
    tight, loose = box(174, 274, 174, 274, size), box(99, 349, 99, 349, size)
    prm = tight.float() + 0.05 * (loose & ~tight).float()  # maximum 1: ranprm's old normalisation
    crm = 10.0 * tight.float()[None]
    return prm[None], torch.stack([tight, loose]), crm


def test_toy_case_sum_normalised_prms_pick_the_tight_proposal_max_normalised_ones_the_leaky_one():
    prm, proposals, crm = toy_scene_448()
    tight, loose = proposals
    assert (loose & ~tight).sum() / loose.sum() == 0.84
    bg = background_masks(crm, torch.tensor([0]), (448, 448))
    assert torch.equal(bg[0], ~tight)  # bytescaled: 255 on T, 0 elsewhere; mean 12.7: BG is all but T
    # By hand. T: inside 10000 x 1; contour (5 x 5 gradient) = 2-px bands: outside 104^2 - 100^2 = 816 px x 0.05,
    # inside 100^2 - 96^2 = 784 px x 1, so 824.8; no background. L: inside 10000 + 52500 x 0.05 = 12625; contour:
    # outer band 0, inner band 250^2 - 246^2 = 1984 px x 0.05 = 99.2; background 52500 px.
    # proposal_terms sums 448^2 fp32 products per term; how the sum is blocked depends on the CPU's BLAS, so the
    # tolerance is the worst-case bound for that sum (n * 2^-24 * the sum of |terms|), not a value seen on one CPU.
    old = proposal_terms(prm, proposals, bg).score(0.8, 1e-5)[0]
    assert old.tolist() == pytest.approx(
        [0.8 * 10000 + 824.8, 0.8 * 12625 + 99.2 - 0.525], abs=fp32_sum_bound(448 * 448, 0.8 * 12625 + 99.2 + 0.525)
    )
    assert old.argmax().item() == 1  # max-normalised (ranprm before): the 84%-background proposal won
    total = 12625.0  # the PRM's sum: the official code divides by it
    new = proposal_terms(prm / total, proposals, bg).score(0.8, 1e-5)[0]
    assert new.tolist() == pytest.approx(
        [(8000 + 824.8) / total, (10100 + 99.2) / total - 0.525],
        abs=fp32_sum_bound(448 * 448, (10100 + 99.2) / total + 0.525),
    )
    assert new.argmax().item() == 0
    # retrieve_instances gets max-normalised PRMs and scores the proposals on their sum-normalised copies.
    out = call({"name": "proposals"}, prm, [[224, 224]], [0], [40.0], [3.0], crm, proposals=proposals)
    assert len(out) == 1 and torch.equal(out.masks[0], tight)


def test_only_the_first_proposal_count_proposals_are_scored():
    prm, proposals, crm = toy_scene_448()
    reordered = proposals.flip(0)  # the leaky one ranks first
    args = (prm, [[224, 224]], [0], [40.0], [3.0], crm)
    assert torch.equal(call({"name": "proposals"}, *args, proposals=reordered).masks[0], proposals[0])
    one = call({"name": "proposals", "proposal_count": 1}, *args, proposals=reordered)
    assert torch.equal(one.masks[0], proposals[1])


def test_nms_merge_whole_as_official_or_masked_or_none():
    obj = box(20, 44, 20, 44)
    props = torch.stack([obj, box(0, 8, 0, 8)])
    strong = box(20, 44, 20, 32).float()
    weak = box(20, 44, 32, 60).float() * 0.5  # reaches past the object's right edge (columns 44..59)
    args = (torch.stack([weak, strong]), [[30, 38], [30, 26]], [0, 0], [20.0, 40.0], [3.0], fg_crms())
    merged = {m: call({"name": "proposals", "nms_merge": m, "nms_order": "score"}, *args, proposals=props).prms[0]
              for m in ("whole", "masked", "none")}  # fmt: skip
    assert torch.allclose(merged["whole"], strong + weak)
    assert torch.allclose(merged["masked"], strong + weak * obj)
    assert torch.allclose(merged["none"], strong)


# ------------------------------------------------------------------------- a new method is one new file
def test_a_registered_toy_method_runs_end_to_end_through_a_composed_config(voc_root, tmp_path):
    """What a new method module does: a config dataclass and a candidate function, registered. `retrieval=<name>`
    then composes with no YAML file, a short training run uses it, and its instances reach metrics.json."""
    import json
    from dataclasses import dataclass

    from ranprm.cli.config import compose
    from ranprm.prm.retrieval import RETRIEVAL_METHODS, Candidates, RetrievalConfig, register_method
    from ranprm.train import train
    from tests.test_train import tiny_overrides

    @dataclass(frozen=True)
    class ToySquareConfig(RetrievalConfig):
        name: str = "toy_square"
        max_area: float | None = None
        half_side: int = 6

    made: list[int] = []

    @register_method("toy_square", config=ToySquareConfig)
    def toy_square(cfg: ToySquareConfig, inputs):
        k, h, w = inputs.prms.shape
        masks = torch.zeros(k, h, w, dtype=torch.bool)
        side = cfg.half_side
        for i, (y, x) in enumerate(inputs.peaks.yx.round().long().tolist()):
            masks[i, max(0, y - side) : y + side, max(0, x - side) : x + side] = True
        made.append(k)
        return Candidates(torch.ones(k, dtype=torch.bool), masks)

    try:
        every_peak = ["threshold=fixed", "threshold.classes.value=-1e9", "threshold.peaks.value=-1e9"]
        overrides = tiny_overrides(voc_root, tmp_path) + ["retrieval=toy_square", "retrieval.half_side=5", *every_peak]
        cfg = compose("train", overrides)
        assert dict(cfg.retrieval)["half_side"] == 5 and cfg.retrieval.name == "toy_square"
        train(cfg)
        summary = json.loads((tmp_path / "metrics.json").read_text())
        assert made and sum(made) > 0  # the method ran on the validation images' peaks
        instances = summary["instance_metrics"]
        assert instances["num_predictions"] > 0 and instances["num_images"] == 2
    finally:
        RETRIEVAL_METHODS.unregister("toy_square")


def test_nms_visits_by_the_proposal_score_as_official_or_by_ranprms_confidence():
    """Two peaks pick the same proposal: peak 0 is strong but half its PRM lies outside it; peak 1 is weak but its
    PRM lies wholly inside. PRM's order (the proposal score) keeps peak 1's; ranprm's confidence keeps peak 0's."""
    obj = box(20, 44, 20, 44)
    spread = obj.float() + box(50, 74, 0, 24).float()  # the same mass again where no proposal reaches
    args = (torch.stack([spread / spread.max(), obj.float()]), [[32, 32], [32, 33]], [0, 0], [40.0, 10.0], [3.0])
    kw = {"proposals": torch.stack([obj, box(0, 6, 58, 64)])}
    by_value = call({"name": "proposals"}, *args, fg_crms(), **kw)
    by_score = call({"name": "proposals", "nms_order": "score"}, *args, fg_crms(), **kw)
    assert by_value.peaks.tolist() == [[32.0, 33.0]] and by_score.peaks.tolist() == [[32.0, 32.0]]
    with pytest.raises(ConfigError, match="prm_only has no retrieval value"):
        build_retrieval({"name": "prm_only", "nms_order": "value"})
