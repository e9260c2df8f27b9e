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
from ranprm.prm.retrieval import (
    PrmOnlyConfig,
    ProposalRetrievalConfig,
    background_masks,
    build_retrieval_config,
    contour_masks,
    contour_masks_pooled,
    gaussian_blur,
    instance_nms,
    peak_strength,
    proposal_terms,
    retrieve_instances,
)

CONF = Path(__file__).resolve().parents[1] / "conf" / "retrieval"
S = 64


def box(y0: int, y1: int, x0: int, x1: int, size: tuple[int, int] = (S, S)) -> torch.Tensor:
    mask = torch.zeros(size, dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    return mask


def fg_crms(classes: int = 1, size: tuple[int, int] = (S, S)) -> torch.Tensor:
    """CRMs whose every pixel is foreground (constant maps: CRM >= 0.95 * mean everywhere)."""
    return torch.ones(classes, *size)


def call(cfg, prms, peaks, labels, values, logits, crms, **kwargs) -> Instances:
    return retrieve_instances(
        cfg,
        prms=prms,
        peaks_yx=torch.tensor(peaks, dtype=torch.float32).reshape(-1, 2),
        labels=torch.tensor(labels, dtype=torch.long),
        peak_values=torch.tensor(values, dtype=torch.float32),
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
    assert build_retrieval_config(cfg) == cls()
    assert build_retrieval_config(loaded) == cls()  # a DictConfig works too


def test_config_errors_name_the_option():
    with pytest.raises(ConfigError, match="retrieval.name"):
        build_retrieval_config({"name": "mcg"})
    with pytest.raises(ConfigError, match="unknown option"):
        build_retrieval_config({"name": "prm_only", "treshold": 0.3})
    with pytest.raises(ConfigError, match="retrieval.nms_iou"):
        build_retrieval_config({"name": "proposals", "nms_iou": 0})
    with pytest.raises(ConfigError, match="retrieval.contour_size"):
        build_retrieval_config({"name": "proposals", "contour_size": 4})
    with pytest.raises(ConfigError, match="retrieval.gate"):
        build_retrieval_config({"name": "prm_only", "gate": "maybe"})
    with pytest.raises(ConfigError, match="retrieval.search"):
        build_retrieval_config({"name": "proposals", "search": {"mode": "slow"}})
    cfg = build_retrieval_config({"name": "proposals", "cache_dir": "/tmp/x", "search": {"max_side": None}})
    assert cfg.search.cache_dir == "/tmp/x" and cfg.search.max_side is None
    assert build_retrieval_config(None) == PrmOnlyConfig()


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
    assert background_masks(crm, 0.95).tolist() == [[[True, True], [False, False]]]


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
            prm = prms[k].numpy()
            expected = 0.8 * prm[m].sum() + prm[c].sum() - 1e-5 * bg[k].numpy()[m].sum()
            assert terms.score(0.8, 1e-5)[k, p].item() == pytest.approx(expected, rel=1e-5)


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
    terms = proposal_terms(prm, props, background_masks(crm))
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
        {"name": "proposals"},
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
        cfg,
        prms=torch.zeros(0, 20, 30),
        peaks_yx=torch.zeros(0, 2),
        labels=torch.zeros(0, dtype=torch.long),
        peak_values=torch.zeros(0),
        class_logits=torch.zeros(4),
        crms=torch.zeros(4, 20, 30),
    )
    assert len(out) == 0 and out.image_size == (20, 30) and out.masks.shape == (0, 20, 30)


def test_a_peak_without_response_gives_no_instance():
    out = call({"name": "prm_only"}, torch.zeros(1, S, S), [[5, 5]], [0], [30.0], [2.0], fg_crms())
    assert len(out) == 0


def test_shape_mismatch_is_reported():
    with pytest.raises(ValueError, match="peaks_yx"):
        call({"name": "prm_only"}, torch.zeros(2, S, S), [[5, 5]], [0], [30.0], [2.0], fg_crms())
    with pytest.raises(ValueError, match="prms"):
        call({"name": "prm_only"}, torch.zeros(1, 8, 8), [[5, 5]], [0], [30.0], [2.0], fg_crms())


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
