"""The inference pipeline's settings: parsed once, the class test's factor, the peak cap, the module's mode."""

import pytest
import torch

from ranprm.errors import ConfigError
from ranprm.prm.peaks import GridPeaks, PeakHead
from ranprm.prm.pipeline import InferenceConfig, cap_peaks_per_image, select_valid_peaks
from tests.helpers import CLASSES, HEAD

MEAN = {"name": "mean", "classes": {"kind": "mean"}, "peaks": {"kind": "mean"}, "min_class_prob": 0.0}
EVERYTHING = {"name": "all", "classes": {"kind": "none"}, "peaks": {"kind": "none"}, "min_class_prob": 0.0}


def config(prm: dict | None = None, threshold: dict | None = None, head: dict | None = None) -> InferenceConfig:
    return InferenceConfig.from_config(threshold or MEAN, head or HEAD, prm or {}, {"name": "prm_only"})


def test_prm_settings_parse_with_defaults_and_clear_errors():
    cfg = config()
    assert (cfg.sub_pixel_factor, cfg.class_sub_pixel_factor, cfg.max_peaks_per_image) == (1, 1, 50)
    assert config({"max_peaks_per_image": None}).max_peaks_per_image is None
    assert config({"max_peaks_per_image": "none"}).max_peaks_per_image is None  # predict/evaluate: `none` = no cap
    with pytest.raises(ConfigError, match=r"prm.max_peaks_per_image=0 must be a positive integer"):
        config({"max_peaks_per_image": 0})
    with pytest.raises(ConfigError, match=r"prm.class_sub_pixel_factor='x'"):
        config({"class_sub_pixel_factor": "x"})
    with pytest.raises(ConfigError, match=r"prm: unknown option\(s\) \['max_peaks'\]"):
        config({"max_peaks": 3})


def test_class_test_runs_at_the_inference_factor_not_the_training_one():
    torch.manual_seed(0)
    crms = torch.randn(2, 3, 4, 4)
    head = PeakHead.from_config({**HEAD, "sub_pixel_factor": 8})
    at_one = config(head={**HEAD, "sub_pixel_factor": 8})
    assert torch.equal(at_one.class_scores(crms), head.scores(crms, 1))
    at_eight = config({"class_sub_pixel_factor": 8}, head={**HEAD, "sub_pixel_factor": 8})
    assert torch.equal(at_eight.class_scores(crms), head.scores(crms))  # ranprm's old class test
    assert not torch.equal(head.scores(crms, 1), head.scores(crms))


def test_cap_keeps_the_strongest_peaks_of_each_image_in_their_order():
    index = torch.tensor([[0, 0, 0, 0], [0, 0, 1, 1], [0, 1, 2, 2], [0, 1, 3, 3], [1, 0, 0, 0]])
    peaks = GridPeaks(index, torch.tensor([1.0, 5.0, 3.0, 4.0, 0.5]), (4, 4))
    kept, dropped = cap_peaks_per_image(peaks, 2, cap=2)
    assert kept.index[:, 2].tolist() == [1, 3, 0] and kept.values.tolist() == [5.0, 4.0, 0.5]
    assert dropped == [2, 0]
    same, none = cap_peaks_per_image(peaks, 2, cap=None)
    assert same is peaks and none == [0, 0]
    tie = GridPeaks(index[:3], torch.tensor([2.0, 2.0, 2.0]), (4, 4))
    assert cap_peaks_per_image(tie, 1, cap=2)[0].index.tolist() == index[:2].tolist()  # ties: the earlier peak


def test_valid_peaks_follow_the_class_and_peak_rules():
    crms = torch.full((1, 2, 3, 3), -5.0)
    crms[0, 0, 0, 0], crms[0, 0, 2, 2] = 4.0, 1.0  # class 0: peaks 4 and 1, mean of the two 2.5
    crms[0, 1, 1, 1] = -1.0
    logits = torch.tensor([[3.0, -3.0]])  # mean 0: class 0 only
    peaks, valid = select_valid_peaks(crms, logits, config(head={**HEAD, "peak_filter": "none"}))
    assert valid.tolist() == [[True, False]] and peaks.index.tolist() == [[0, 0, 0, 0]]
    assert peaks.values.tolist() == [4.0]


# --------------------------------------------------------------------------------------------- the module
@pytest.fixture
def module():
    from ranprm.lightning.module import PRMModule

    return PRMModule(
        class_names=list(CLASSES),
        backbone={"name": "tiny", "pretrained": False},
        head=HEAD,
        optimizer={"name": "sgd", "lr": 0.01},
        threshold=EVERYTHING,
        prm={"max_peaks_per_image": 3},
        retrieval={"name": "prm_only"},
    )


def test_module_parses_inference_settings_once_and_again_only_when_they_change(module, monkeypatch):
    import ranprm.lightning.module as module_file

    calls = []
    real = module_file.InferenceConfig.from_config

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module_file.InferenceConfig, "from_config", counting)
    images = torch.rand(2, 3, 64, 64)
    for _ in range(3):
        module.predict_images(images, [(64, 64)] * 2)
    assert len(calls) == 1
    cfg = module.configure_inference(prm={"max_peaks_per_image": 1})
    assert len(calls) == 2 and cfg.max_peaks_per_image == 1 and module.hparams.prm["max_peaks_per_image"] == 1
    predictions = module.predict_images(images, [(64, 64)] * 2)
    assert len(calls) == 2 and all(len(p.image_peaks) <= 1 for p in predictions)
    with pytest.raises(ConfigError):
        module.configure_inference(prm={"max_peaks_per_image": -1})
    assert module.hparams.prm["max_peaks_per_image"] == 1  # a bad override changes nothing


def test_predict_images_leaves_the_module_in_the_mode_it_found(module):
    images = torch.rand(1, 3, 64, 64)
    module.train()
    (prediction,) = module.predict_images(images, [(64, 64)])
    assert module.training and module.model.training
    module.eval()
    module.predict_images(images, [(64, 64)])
    assert not module.training
    # Every class and every local maximum is valid here, so the cap binds: 3 peaks at most, the strongest.
    assert len(prediction.image_peaks) == 3 and prediction.peaks_over_cap > 0
    assert prediction.peaks.shape == (3, 3)  # [class, y, x] for panels and overlays
