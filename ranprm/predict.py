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
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ranprm.cli.config import hydra_main, report_user_errors
from ranprm.cli.inference import load_for_inference, resolve_device
from ranprm.data.transforms import build_transform
from ranprm.data.voc import read_image
from ranprm.errors import ConfigError, DataError, RunFolderError
from ranprm.eval.results_io import instances_to_results, write_results
from ranprm.utils.checks import check_range, check_value
from ranprm.utils.io import check_writable, clean_stale_temp_files
from ranprm.viz.draw import save_png
from ranprm.viz.overlay import render_overlay

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
DEFAULT_IMAGE_SIZE = 448
PREDICTIONS_FILE = "predictions.json"
UNFINISHED_FILE = ".ranprm-predict-unfinished"  # overlays written by a run that has not written predictions.json
ON_BAD_IMAGE = ("skip", "stop")


def list_images(path: str | Path) -> list[Path]:
    """The image files of `path` (a file, or a folder's images in name order, not recursive)."""
    path = Path(path).expanduser()
    if path.is_file():
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise DataError(f"input={str(path)!r} is not an image file ({', '.join(IMAGE_SUFFIXES)})")
        return [path]
    if not path.exists():
        raise DataError(f"input={str(path)!r} does not exist; give an image file or a folder of images")
    if not path.is_dir():
        raise DataError(f"input={str(path)!r} is neither a file nor a folder")
    images = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise DataError(f"input={str(path)!r} holds no images ({', '.join(IMAGE_SUFFIXES)}); nothing to predict")
    stems: dict[str, Path] = {}
    for p in images:
        if p.stem in stems:
            raise DataError(
                f"input={str(path)!r}: {stems[p.stem].name} and {p.name} share the stem {p.stem!r}, which is "
                "the image_id in predictions.json; rename one"
            )
        stems[p.stem] = p
    return images


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


def _settings(cfg: DictConfig) -> tuple[bool, str, int | None]:
    """(overwrite, on_bad_image, image_size) checked: one line each, before the model loads."""
    overwrite = check_value(cfg.get("overwrite", False), bool, "overwrite")
    on_bad = cfg.get("on_bad_image", "skip")
    if on_bad not in ON_BAD_IMAGE:
        raise ConfigError(f"on_bad_image={on_bad!r} is not valid; choose one of {', '.join(ON_BAD_IMAGE)}")
    image_size = check_value(cfg.get("image_size"), int | None, "image_size")
    check_range(image_size, "image_size", low=32)
    return overwrite, on_bad, image_size


def predict(cfg: DictConfig) -> list[dict[str, Any]]:
    """Run the model on every input image, write overlays and predictions.json; returns the result entries."""
    overwrite, on_bad, image_size = _settings(cfg)
    images = list_images(cfg.input)
    output = Path(cfg.output).expanduser()
    if output.exists() and not output.is_dir():
        raise ConfigError(f"output={str(output)!r} is a file; give a folder")
    _check_outputs(images, output, overwrite)
    check_writable(output, "output")
    device = resolve_device(str(cfg.device))

    module = load_for_inference(cfg, device)
    if image_size is None:
        image_size = module.hparams.get("image_size")
    if image_size is None:
        image_size = DEFAULT_IMAGE_SIZE
        log.warning("ckpt records no training image size; using image_size=%d (set image_size= to change)",
                    DEFAULT_IMAGE_SIZE)  # fmt: skip
    stride = module.model.stride
    if int(image_size) < stride:
        raise ConfigError(f"image_size={image_size} is smaller than the network stride ({stride} px)")
    class_names = list(module.class_names)
    transform = build_transform(int(image_size), train=False)

    results: list[dict[str, Any]] = []
    skipped: list[str] = []
    output.mkdir(parents=True, exist_ok=True)
    clean_stale_temp_files(output)
    with (output / UNFINISHED_FILE).open("a") as unfinished:
        for path in images:
            try:
                image = read_image(path)  # (3, H, W) uint8 RGB, whatever the file's mode
            except DataError as err:
                if on_bad == "stop":
                    raise DataError(f"{err}; remove it, or pass on_bad_image=skip to skip such images") from err
                log.warning("skipping %s", err)
                skipped.append(path.name)
                continue
            size = (int(image.shape[1]), int(image.shape[2]))
            raw = image.permute(1, 2, 0).numpy()
            batch = transform(image)[None].to(device)
            (prediction,) = module.predict_images(batch, [size], [raw])
            results.extend(instances_to_results(path.stem, prediction.instances, class_names))
            overlay = render_overlay(raw, prediction.instances, class_names, peaks=prediction.peaks)
            unfinished.write(f"{path.stem}.png\n")  # listed before it exists: a kill mid-write leaves it listed
            unfinished.flush()
            save_png(output / f"{path.stem}.png", overlay)
            print(f"{path.name}: {len(prediction.instances.labels)} instance(s)")
    if len(skipped) == len(images):
        raise DataError(f"input={cfg.input!r}: none of the {len(images)} image(s) could be read; nothing to predict")
    write_results(output / PREDICTIONS_FILE, results)
    (output / UNFINISHED_FILE).unlink(missing_ok=True)
    read = len(images) - len(skipped)
    print(f"wrote {read} overlay(s) and {output / PREDICTIONS_FILE} ({len(results)} instances)")
    if skipped:
        shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        log.warning("skipped %d unreadable image(s) of %d: %s", len(skipped), len(images), shown)
    return results


@hydra_main("predict")
@report_user_errors
def main(cfg: DictConfig) -> None:
    predict(cfg)


if __name__ == "__main__":
    main()
