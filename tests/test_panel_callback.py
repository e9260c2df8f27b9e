"""The panel callback: on short real runs (PNGs per epoch, the same images each time, silent in the sanity check),
and on a model whose CRMs and PRMs are known, the PRM row shows the PRM of the peak each tile marks."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from PIL import Image
from torch import nn

import ranprm.lightning.panels as callback_mod
import ranprm.prm.pipeline as inference_mod
import ranprm.train as train_mod
from ranprm.cli.build import build_callbacks, build_module
from ranprm.cli.config import compose
from ranprm.lightning.panels import PanelCallback
from ranprm.train import train
from ranprm.viz.layout import panel_layout
from tests.test_train import tiny_overrides

VAL_IDS = ["2024_000006", "2024_000007"]  # write_voc(8 images): the last quarter is val


def panel_overrides(voc_root: Path, out: Path, epochs: int = 2, backbone: str = "tiny") -> list[str]:
    return [
        *tiny_overrides(voc_root, out, backbone),
        f"trainer.max_epochs={epochs}",
        "logger=none",
        "callbacks.panels.num_images=2",
        "callbacks.panels.every_n_epochs=1",
    ]


def _pngs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.png")) if folder.is_dir() else []


@pytest.fixture
def rendered(monkeypatch):
    """Records every `PanelCallback.render` call: the image ids and the (H, W, 3) shape of each panel."""
    calls: list[tuple[list[str], list[tuple[int, ...]]]] = []
    original = PanelCallback.render

    def spy(self, pl_module, batch, *args):
        panels, captions = original(self, pl_module, batch, *args)
        calls.append((list(batch["image_id"]), [p.shape for p in panels]))
        assert [c.split(":")[0] for c in captions] == list(batch["image_id"])
        return panels, captions

    monkeypatch.setattr(PanelCallback, "render", spy)
    return calls


class _SanitySpy(Callback):
    """Notes, when the sanity check ends and when the first epoch ends, which panel PNGs exist."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.after_sanity: list[str] | None = None
        self.sanity_batches = 0

    def on_validation_batch_end(self, trainer, *args, **kwargs) -> None:
        if trainer.sanity_checking:
            self.sanity_batches += 1

    def on_sanity_check_end(self, trainer, pl_module) -> None:
        self.after_sanity = sorted(str(p) for p in (self.run_dir / "panels").rglob("*.png"))


def test_short_run_writes_one_png_per_image_every_epoch(voc_root, tmp_path, rendered, monkeypatch):
    spy = _SanitySpy(tmp_path)
    build = train_mod.build_callbacks
    monkeypatch.setattr(train_mod, "build_callbacks", lambda *a, **k: [*build(*a, **k), spy])
    cfg = compose("train", [*panel_overrides(voc_root, tmp_path), "trainer.num_sanity_val_steps=2"])
    train(cfg)

    # The sanity check ran validation, and the callback wrote nothing then.
    assert spy.sanity_batches > 0
    assert spy.after_sanity == []
    # One render per epoch, of the same images (the first of the val split), and a PNG per image per epoch at
    # its panel's size (which may change between epochs: a row per valid class and per peak).
    assert [ids for ids, _ in rendered] == [VAL_IDS, VAL_IDS]
    for epoch, (_, shapes) in enumerate(rendered):
        folder = tmp_path / "panels" / f"epoch_{epoch:03d}"
        assert _pngs(folder) == [f"{i}.png" for i in VAL_IDS]
        for image_id, (h, w, c) in zip(VAL_IDS, shapes, strict=True):
            with Image.open(folder / f"{image_id}.png") as png:
                assert png.size == (w, h)
                assert png.mode == "RGB" and c == 3
    assert sorted(p.name for p in (tmp_path / "panels").iterdir()) == ["epoch_000", "epoch_001"]
    # One size for every panel of the run (padded): W&B shows a batch of one size without a warning.
    assert len({shape for _, shapes in rendered for shape in shapes}) == 1


def test_tensorboard_shows_each_images_panel_at_one_size(voc_root, tmp_path):
    """logger=tensorboard: one image per panel image (`val/panels/<image_id>`) each epoch, all of one size."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    train(compose("train", [*panel_overrides(voc_root, tmp_path), "logger=tensorboard"]))
    (events,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={IMAGES: 0})
    acc.Reload()
    assert sorted(acc.Tags()[IMAGES]) == [f"val/panels/{i}" for i in VAL_IDS]
    images = [event for tag in acc.Tags()[IMAGES] for event in acc.Images(tag)]
    assert len(images) == 2 * len(VAL_IDS)  # two epochs
    assert len({(e.width, e.height) for e in images}) == 1
    with Image.open(next((tmp_path / "panels" / "epoch_001").glob("*.png"))) as png:
        assert (images[0].width, images[0].height) == png.size  # the PNG on disk is the panel TensorBoard shows


def test_every_n_epochs_skips_epochs_but_renders_the_last(voc_root, tmp_path, rendered):
    cfg = compose("train", [*panel_overrides(voc_root, tmp_path, epochs=3), "callbacks.panels.every_n_epochs=2"])
    train(cfg)
    assert sorted(p.name for p in (tmp_path / "panels").iterdir()) == ["epoch_001", "epoch_002"]
    assert len(rendered) == 2


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_ran_panels_show_every_attention_modules_mask(voc_root, tmp_path, monkeypatch, precision):
    """RAN's masks reach each panel, one (h, w) map per attention module, from the prediction's forward. The
    panels backpropagate in the precision asked for, while the instance evaluation keeps prm.precision (fp32)."""
    seen = []
    render_panel = callback_mod.render_panel

    def spy(inputs, **kwargs):
        seen.append(inputs)
        return render_panel(inputs, **kwargs)

    monkeypatch.setattr(callback_mod, "render_panel", spy)
    dtypes = []
    backprop = inference_mod.peak_response_maps

    def dtype_spy(*args, **kwargs):
        dtypes.append(kwargs["dtype"])
        return backprop(*args, **kwargs)

    monkeypatch.setattr(inference_mod, "peak_response_maps", dtype_spy)
    overrides = [*panel_overrides(voc_root, tmp_path, epochs=1, backbone="ran"), "backbone.width=8"]
    train(compose("train", [*overrides, f"callbacks.panels.precision={precision}"]))
    assert len(seen) == len(VAL_IDS)
    for inputs in seen:
        assert inputs.attention is not None and len(inputs.attention) == 3  # Attention-56: 1 module per stage
        assert all(mask.ndim == 2 and 0 <= mask.min() <= mask.max() <= 1 for mask in inputs.attention)
    panel_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    assert dtypes[-1] == panel_dtype  # the panels render after the epoch's evaluation
    assert set(dtypes[:-1]) == {torch.float32}  # the evaluation's validation batches


@pytest.mark.parametrize(
    ("setting", "trainer_precision", "expected"),
    [("auto", "bf16-mixed", torch.bfloat16), ("auto", "bf16-true", torch.bfloat16), ("auto", "32-true", torch.float32),
     ("auto", "16-mixed", torch.float32), ("fp32", "bf16-mixed", torch.float32), ("bf16", "32-true", torch.bfloat16)],
)  # fmt: skip
def test_panel_backprop_precision_follows_the_training_precision_on_auto(setting, trainer_precision, expected):
    assert PanelCallback(precision=setting).prm_dtype(trainer_precision) == expected


class _Untouchable:
    def __getattr__(self, name: str):
        raise AssertionError(f"the callback must not read the data here (.{name})")


def _fake_trainer(tmp_path: Path, **overrides) -> SimpleNamespace:
    fields = dict(
        sanity_checking=False,
        is_global_zero=True,
        current_epoch=0,
        max_epochs=2,
        datamodule=None,
        default_root_dir=str(tmp_path),
        loggers=[],
    )
    fields.update(overrides)
    return SimpleNamespace(**fields)


@pytest.mark.parametrize("overrides", [{"sanity_checking": True}, {"is_global_zero": False}])
def test_callback_is_silent_in_sanity_check_and_off_rank_zero(tmp_path, overrides):
    def boom(*_a, **_k):
        raise AssertionError("the callback must not render here")

    trainer = _fake_trainer(tmp_path, datamodule=_Untouchable(), **overrides)
    callback = PanelCallback(num_images=2, output_dir=tmp_path)
    callback.render = boom  # type: ignore[method-assign]
    callback.on_validation_epoch_end(trainer, pl_module=None)  # type: ignore[arg-type]
    assert not (tmp_path / "panels").exists()


def test_num_images_zero_turns_the_callback_off(voc_root, tmp_path):
    cfg = compose("train", [*panel_overrides(voc_root, tmp_path, epochs=1), "callbacks.panels.num_images=0"])
    assert not any(isinstance(c, PanelCallback) for c in build_callbacks(cfg, tmp_path, False))


def test_wandb_panels_are_stepped_by_epoch():
    """The panels' row carries `epoch`, and W&B is told to plot `val/panels` against it."""
    from types import SimpleNamespace

    from ranprm.lightning.panels import PANEL_KEY, PanelCallback

    calls: list[tuple] = []
    experiment = SimpleNamespace(
        define_metric=lambda *a, **k: calls.append(("define_metric", a, k)),
        log=lambda *a, **k: calls.append(("log", a, k)),
    )
    logger = SimpleNamespace(experiment=experiment, log_image=lambda **k: calls.append(("log_image", (), k)))
    trainer = SimpleNamespace(current_epoch=3, global_step=120)
    PanelCallback._log_to_wandb(
        logger, ["run/panels/epoch_003/a.png", "run/panels/epoch_003/b.png"], ["c1", "c2"], trainer
    )
    assert calls[0] == ("define_metric", (PANEL_KEY,), {"step_metric": "epoch"})
    assert calls[1] == ("log", ({"epoch": 3},), {"commit": False})  # pending: joins the row log_image commits
    name, _, kwargs = calls[2]
    assert (
        name == "log_image"
        and kwargs["key"] == PANEL_KEY
        and kwargs["images"] == ["run/panels/epoch_003/a.png", "run/panels/epoch_003/b.png"]
    )
    assert kwargs["caption"] == ["c1", "c2"]


# ------------------------------------------------------------------------------------ known CRMs and PRMs

# A one-layer CRM model: a 16 x 16 convolution with stride 16, so the network input (64 px) is a 4 x 4 grid of
# cells and each CRM cell sees its own cell only. "dog" reads the red channel, "chair" the green one, "cat" is
# -40 everywhere (never valid). The PRM of a peak in cell (u, v) is then exactly that cell's block of pixels.
KNOWN_CLASSES = ("cat", "dog", "chair")
ORIG_HW = (48, 80)  # the original image: not the network input's 64 x 64, and not square
# Cells (u, v) of the peaks and their CRM values: dog 100 and 90, chair 110 (the strongest class, yet second in
# the CRM row, which is in class order).
DOG_STRONG, DOG_WEAK, CHAIR = (3, 0), (3, 3), (0, 3)


def _known_module() -> nn.Module:
    module = build_module(
        compose("train", ["backbone=tiny", "threshold=fixed", "retrieval=prm_only", "data.image_size=64"]),
        KNOWN_CLASSES,
    )
    conv = nn.Conv2d(3, 3, 16, stride=16)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.copy_(torch.tensor([-40.0, 0.0, 0.0]))
        conv.weight[1, 0] = 100 / 256  # the mean of the cell's red channel, times 100
        conv.weight[2, 1] = 100 / 256
    module.model = conv
    return module


def _known_batch() -> dict:
    image = torch.zeros(1, 3, 64, 64)
    for (u, v), channel, value in ((DOG_STRONG, 0, 1.0), (DOG_WEAK, 0, 0.9), (CHAIR, 1, 1.1)):
        image[0, channel, 16 * u : 16 * (u + 1), 16 * v : 16 * (v + 1)] = value
    raw = np.full((*ORIG_HW, 3), 128, np.uint8)
    raw[:4, :4] = (200, 30, 60)  # a mark the input tile must show, away from every peak
    return {"image": image, "raw_image": [raw], "orig_size": [ORIG_HW], "targets": [None], "image_id": ["known"]}


def _block(cell: tuple[int, int], grow: int = 0) -> tuple[slice, slice]:
    """The pixels of a network-input cell in the original image (48 / 4 = 12 rows by 80 / 4 = 20 columns),
    grown by `grow` pixels on every side."""
    u, v = cell
    return slice(max(0, 12 * u - grow), 12 * (u + 1) + grow), slice(max(0, 20 * v - grow), 20 * (v + 1) + grow)


def _centre(cell: tuple[int, int]) -> tuple[int, int]:
    """Where the peak of a cell is drawn: the cell's centre, (u + 0.5) * 12 - 0.5 and (v + 0.5) * 20 - 0.5."""
    u, v = cell
    return round((u + 0.5) * 12 - 0.5), round((v + 0.5) * 20 - 0.5)


def test_each_prm_tile_shows_the_prm_of_the_peak_it_marks_in_the_crm_rows_class_order() -> None:
    module, batch = _known_module(), _known_batch()
    (panel,), (caption,) = PanelCallback(max_prms=8).render(module, batch, pad=False)
    assert caption == "known: valid classes: dog, chair; 3 peaks; 3 instances"
    layout = panel_layout(ORIG_HW, num_crms=2, num_prms=3, has_instances=True, num_attention=0)
    assert panel.shape[1] == layout.size[1] and panel.shape[0] > layout.size[0]  # and the legend below
    bar = max(4, ORIG_HW[1] // 40) + 1  # each heat map's colour bar and its edge, along the right

    def tile(kind: str, n: int) -> np.ndarray:
        y, x = layout.picture_origin(*layout.cells_of(kind)[n])
        return panel[y : y + ORIG_HW[0], x : x + ORIG_HW[1]].astype(int)

    # The input tile is the batch's own pixels, untouched (no GT here): no dataset was even given to read from.
    np.testing.assert_array_equal(tile("overview", 0), batch["raw_image"][0])

    yy, xx = np.mgrid[: ORIG_HW[0], : ORIG_HW[1]]
    # Dog first (the CRM row's order), dog's peaks strongest first, chair's after dog's strongest.
    expected = [DOG_STRONG, CHAIR, DOG_WEAK]
    for n, cell in enumerate(expected):
        brightness = tile("prm", n).sum(axis=2)
        cy, cx = _centre(cell)
        assert brightness[cy, cx] == 3 * 255, f"tile {n}: the white centre of its peak's cross"
        for other in (DOG_STRONG, CHAIR, DOG_WEAK):
            inside = np.zeros(ORIG_HW, bool)
            inside[_block(other)] = True
            oy, ox = _centre(other)
            inside &= (np.abs(yy - oy) > 3) & (np.abs(xx - ox) > 3)  # off the marker's arms
            inside &= ~((yy < oy) & (yy > oy - 20) & (xx > ox) & (xx < ox + 20))  # and off its number, up right
            inside[:, -bar:] = False
            if other == cell:  # its own block is hot: inferno's bright end over the dimmed grey
                assert brightness[inside].min() > 350, f"tile {n}: its PRM is not under its peak"
            else:  # another peak's block shows only the dimmed grey backdrop under inferno's darkest colour
                assert brightness[inside].max() < 240, f"tile {n}: lit under the peak of {other}"
                assert brightness[oy, ox] < 240, f"tile {n}: marks the peak of {other}"

    # Each CRM tile marks the peaks of its own class.
    for n, cells in enumerate([(DOG_STRONG, DOG_WEAK), (CHAIR,)]):
        crm = tile("crm", n).sum(axis=2)
        for cell in (DOG_STRONG, DOG_WEAK, CHAIR):
            assert (crm[_centre(cell)] == 3 * 255) == (cell in cells)


def test_predictions_keep_each_valid_peaks_prm_only_when_asked() -> None:
    module, batch = _known_module(), _known_batch()
    (plain,) = module.predict_images(batch["image"], batch["orig_size"])
    assert plain.prms is None
    (pred,) = module.predict_images(batch["image"], batch["orig_size"], with_prms=True)
    assert pred.prms is not None and pred.prms.shape == (3, *ORIG_HW)
    for (_, y, x), prm in zip(pred.peaks.tolist(), pred.prms, strict=True):
        cell = next(c for c in (DOG_STRONG, DOG_WEAK, CHAIR) if _centre(c) == (round(y), round(x)))
        outside = torch.ones(ORIG_HW, dtype=torch.bool)
        outside[_block(cell, grow=1)] = False  # bilinear resizing from 64 x 64 blurs the edge by a pixel
        assert prm.max() == 1.0 and prm[_block(cell)].min() > 0.4 and prm[outside].max() == 0.0
    # Each map's maximum before retrieval's [0, 1] scaling is kept, and the panel shows the maps at that magnitude
    # (a map that peaks at exactly 1.0 times its maximum: the maximum, exactly), so a shared scale can tell them apart.
    assert plain.prm_maxima is None
    assert pred.prm_maxima is not None and pred.prm_maxima.shape == (3,) and (pred.prm_maxima > 0).all()
    shown = callback_mod.panel_inputs(pred, batch["raw_image"][0], None, KNOWN_CLASSES).prms
    assert torch.equal(shown.flatten(1).amax(1), pred.prm_maxima)
