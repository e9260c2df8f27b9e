"""`python -m ranprm.predict ckpt=PATH input=FILE_OR_DIR output=DIR` (also `ranprm-predict`): instances for images.

For every image it writes `output/<stem>.png`, the image with its instances coloured, peaks marked, class names
and scores; and one `output/predictions.json` for the whole input, in the COCO results style that
`ranprm-evaluate predictions=FILE` reads (see `ranprm.eval.results_io`).

Inference settings: the checkpoint's threshold, retrieval and prm settings are used unless the command line gives
them. `threshold=<option>` / `retrieval=<option>` replace the checkpoint's whole group; `prm.<key>=<value>`
replaces that one key. Network input side: `image_size`, else the checkpoint's training size, else 448.

Nothing a user made is lost: an existing predictions.json or overlay is replaced only with `overwrite=true`, and
an input image is never written over. A run that stops half way (a bad image with `on_bad_image=stop`, a kill)
leaves the overlays it wrote listed in `output/.ranprm-predict-unfinished` (a name is listed before its file is
written); the next run into that folder may replace exactly those, so a stopped run never blocks its own rerun.
`predictions.json` is written last, and the list is removed after it.

Unreadable images (truncated, corrupt, not an image): `on_bad_image=skip` (default) warns for each, counts them and
writes overlays and predictions.json for the images it read; `on_bad_image=stop` stops at the first one.

The model runs under Lightning's `Trainer.predict` with a prediction writer (`ranprm.lightning.prediction_writer`):
a progress bar with the time left (`progress_bar=tqdm|rich|none`), `device=` for one device, or
`trainer.devices=N` (with `trainer.accelerator`, `trainer.strategy=ddp`) for one process per device, each writing
its images' overlays; the first process writes predictions.json over all of them. `batch_size` and
`num_workers` set the image loader (batches of one and no workers by default: images of any size, read in order).

`coco_annotations=<instances_<split>.json>`: predictions.json uses COCO's int image ids (matched by file name) and
category ids (by class name), so COCO's tools and `ranprm-evaluate predictions=... data=coco` read it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from torch.utils.data import DataLoader

from ranprm.cli.config import hydra_main, report_user_errors
from ranprm.cli.inference import (
    answering_signals,
    build_inference_trainer,
    inference_trainer_arguments,
    load_for_inference,
    root_device,
)
from ranprm.cli.run_dir import hold_folder
from ranprm.data.coco import result_ids_for_images
from ranprm.data.images import IMAGE_SUFFIXES, ImageFileDataset, collate_images, list_images
from ranprm.data.sampling import worker_init
from ranprm.data.transforms import build_transform
from ranprm.errors import ConfigError, RunFolderError
from ranprm.lightning.prediction_writer import (
    ON_BAD_IMAGE,
    PREDICTIONS_FILE,
    UNFINISHED_FILE,
    OverlayAndResultsWriter,
)
from ranprm.utils.checks import check_range, check_value
from ranprm.utils.io import check_writable, clean_stale_temp_files
from ranprm.viz.draw import DISPLAY_SCORE

log = logging.getLogger(__name__)

__all__ = ["IMAGE_SUFFIXES", "PREDICTIONS_FILE", "UNFINISHED_FILE", "list_images", "predict"]

DEFAULT_IMAGE_SIZE = 448


def unfinished_outputs(output: Path) -> set[str]:
    """The overlay names an unfinished run listed in `output` (the last line may be cut short: it is a name too)."""
    path = output / UNFINISHED_FILE
    if not path.is_file():
        return set()
    return {line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()}


def _check_outputs(images: list[Path], output: Path, overwrite: bool) -> None:
    inputs = {p.resolve() for p in images}
    targets = [output / PREDICTIONS_FILE] + [output / f"{p.stem}.png" for p in images]
    for target in targets:
        if target.resolve() in inputs:
            raise ConfigError(
                f"output={str(output)!r}: the overlay {target.name} would replace the input image {target}; "
                "choose another output folder"
            )
    ours = unfinished_outputs(output)  # a stopped run's leftovers: replacing them loses nothing
    existing = [t for t in targets if t.exists() and t.name not in ours]
    if existing and not overwrite:
        raise RunFolderError(
            f"output={str(output)!r} already holds {existing[0].name}"
            + (f" and {len(existing) - 1} more output file(s)" if len(existing) > 1 else "")
            + "; choose another output folder or pass overwrite=true"
        )


def _settings(cfg: DictConfig) -> tuple[bool, str, int | None, int, int, str]:
    """(overwrite, on_bad_image, image_size, batch_size, num_workers, progress_bar) checked: one line each, before
    the model loads."""
    overwrite = check_value(cfg.get("overwrite", False), bool, "overwrite")
    on_bad = cfg.get("on_bad_image", "skip")
    if on_bad not in ON_BAD_IMAGE:
        raise ConfigError(f"on_bad_image={on_bad!r} is not valid; choose one of {', '.join(ON_BAD_IMAGE)}")
    image_size = check_value(cfg.get("image_size"), int | None, "image_size")
    check_range(image_size, "image_size", low=32)
    batch_size = check_value(cfg.get("batch_size", 1), int, "batch_size")
    check_range(batch_size, "batch_size", low=1)
    workers = check_value(cfg.get("num_workers", 0), int, "num_workers")
    check_range(workers, "num_workers", low=0)
    bar = cfg.get("progress_bar", "tqdm")  # its choices are checked at compose time (ranprm.cli.schema)
    inference_trainer_arguments(cfg)  # device= and trainer.* too
    return overwrite, on_bad, image_size, int(batch_size), int(workers), str(bar)


def predict(cfg: DictConfig) -> list[dict[str, Any]]:
    """Run the model on every input image through `Trainer.predict`, write overlays and predictions.json; returns
    the result entries (on every process, under several devices)."""
    overwrite, on_bad, image_size, batch_size, workers, bar = _settings(cfg)
    images = list_images(cfg.input)
    output = Path(cfg.output).expanduser()
    if output.exists() and not output.is_dir():
        raise ConfigError(f"output={str(output)!r} is a file; give a folder")
    with hold_folder(output, "output"), answering_signals():  # one predict per output folder at a time
        return _predict(cfg, images, output, overwrite, on_bad, image_size, batch_size, workers, bar)


def _predict(
    cfg: DictConfig,
    images: list[Path],
    output: Path,
    overwrite: bool,
    on_bad: str,
    image_size: int | None,
    batch_size: int,
    workers: int,
    bar: str,
) -> list[dict[str, Any]]:
    _check_outputs(images, output, overwrite)
    check_writable(output, "output")

    display_score = check_value(cfg.get("display_score", DISPLAY_SCORE), float, "display_score")
    check_range(display_score, "display_score", 0.0, 1.0)
    writer = OverlayAndResultsWriter(output, images, [], on_bad, source=f"input={cfg.input!r}",
                                     display_score=float(display_score))  # fmt: skip
    trainer = build_inference_trainer(cfg, output, callbacks=[writer], progress_bar=bar)
    module = load_for_inference(cfg, root_device(trainer))
    if image_size is None:
        image_size = module.hparams.get("image_size")
    if image_size is None:
        image_size = DEFAULT_IMAGE_SIZE
        log.warning("ckpt records no training image size; using image_size=%d (set image_size= to change)",
                    DEFAULT_IMAGE_SIZE)  # fmt: skip
    stride = module.model.stride
    if int(image_size) < stride:
        raise ConfigError(f"image_size={image_size} is smaller than the network stride ({stride} px)")
    writer.class_names = list(module.class_names)
    if cfg.get("coco_annotations") is not None:  # checked before the output folder is made
        writer.ids = result_ids_for_images(Path(cfg.coco_annotations).expanduser(), module.class_names, images)
    dataset = ImageFileDataset(images, build_transform(int(image_size), train=False))
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate_images,
        worker_init_fn=worker_init if workers else None,
    )  # fmt: skip  (workers leave signals to us)

    output.mkdir(parents=True, exist_ok=True)
    clean_stale_temp_files(output)
    trainer.predict(module, dataloaders=loader, return_predictions=False)
    if trainer.is_global_zero:
        read = len(images) - len(writer.skipped)
        print(f"wrote {read} overlay(s) and {output / PREDICTIONS_FILE} ({len(writer.results)} instances)")
        if writer.skipped:
            skipped = writer.skipped
            shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
            log.warning("skipped %d unreadable image(s) of %d: %s", len(skipped), len(images), shown)
    return writer.results


@hydra_main("predict")
@report_user_errors
def main(cfg: DictConfig) -> None:
    predict(cfg)


if __name__ == "__main__":
    main()
