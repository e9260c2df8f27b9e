"""`python -m ranprm.predict ckpt=PATH input=FILE_OR_DIR output=DIR` (also `ranprm-predict`): instances for images.

For every image it writes `output/<stem>.png`, the image with its instances coloured, peaks marked, class names
and scores; and one `output/predictions.json` for the whole input, in the COCO results style that
`ranprm-evaluate predictions=FILE` reads (see `ranprm.eval.results_io`).

Inference settings: the checkpoint's threshold, retrieval and prm settings are used unless the command line gives
them. `threshold=<option>` / `retrieval=<option>` replace the checkpoint's whole group; `prm.<key>=<value>`
replaces that one key. Network input side: `image_size`, else the checkpoint's training size, else 448.

Nothing a user made is lost: an existing predictions.json or overlay is replaced only with `overwrite=true`, and
an input image is never written over.
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
from ranprm.errors import ConfigError, DataError
from ranprm.eval.results_io import instances_to_results, write_results
from ranprm.viz.draw import save_png
from ranprm.viz.overlay import render_overlay

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
DEFAULT_IMAGE_SIZE = 448
PREDICTIONS_FILE = "predictions.json"


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


def _check_outputs(images: list[Path], output: Path, overwrite: bool) -> None:
    inputs = {p.resolve() for p in images}
    targets = [output / PREDICTIONS_FILE] + [output / f"{p.stem}.png" for p in images]
    for target in targets:
        if target.resolve() in inputs:
            raise ConfigError(
                f"output={str(output)!r}: the overlay {target.name} would replace the input image {target}; "
                "choose another output folder"
            )
    existing = [t for t in targets if t.exists()]
    if existing and not overwrite:
        raise ConfigError(
            f"output={str(output)!r} already holds {existing[0].name}"
            + (f" and {len(existing) - 1} more output file(s)" if len(existing) > 1 else "")
            + "; choose another output folder or pass overwrite=true"
        )


def predict(cfg: DictConfig) -> list[dict[str, Any]]:
    """Run the model on every input image, write overlays and predictions.json; returns the result entries."""
    images = list_images(cfg.input)
    output = Path(cfg.output).expanduser()
    if output.exists() and not output.is_dir():
        raise ConfigError(f"output={str(output)!r} is a file; give a folder")
    _check_outputs(images, output, bool(cfg.overwrite))
    device = resolve_device(str(cfg.device))

    module = load_for_inference(cfg, device)
    image_size = cfg.image_size or module.hparams.get("image_size")
    if image_size is None:
        image_size = DEFAULT_IMAGE_SIZE
        log.warning("ckpt records no training image size; using image_size=%d (set image_size= to change)",
                    DEFAULT_IMAGE_SIZE)  # fmt: skip
    if int(image_size) < 32:
        raise ConfigError(f"image_size={image_size} is too small; give at least 32 pixels")
    class_names = list(module.class_names)
    transform = build_transform(int(image_size), train=False)

    results: list[dict[str, Any]] = []
    output.mkdir(parents=True, exist_ok=True)
    for path in images:
        image = read_image(path)  # (3, H, W) uint8 RGB, whatever the file's mode
        size = (int(image.shape[1]), int(image.shape[2]))
        raw = image.permute(1, 2, 0).numpy()
        batch = transform(image)[None].to(device)
        (prediction,) = module.predict_images(batch, [size], [raw])
        results.extend(instances_to_results(path.stem, prediction.instances, class_names))
        overlay = render_overlay(raw, prediction.instances, class_names, peaks=prediction.peaks)
        save_png(output / f"{path.stem}.png", overlay)
        print(f"{path.name}: {len(prediction.instances.labels)} instance(s)")
    write_results(output / PREDICTIONS_FILE, results)
    print(f"wrote {len(images)} overlay(s) and {output / PREDICTIONS_FILE} ({len(results)} instances)")
    return results


@hydra_main("predict")
@report_user_errors
def main(cfg: DictConfig) -> None:
    predict(cfg)


if __name__ == "__main__":
    main()
