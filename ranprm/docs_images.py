"""`python -m ranprm.docs_images`: the README's pictures, made from a checkpoint by the current code.

`make docs-images` trains the default run (or takes `CKPT=`) and calls this, so the README's panel always shows what
the code draws today:

    python -m ranprm.docs_images --ckpt outputs/docs-images/checkpoints/last.ckpt            # -> docs/images/panel.png

A real-photo panel is one more checkpoint and the data it was trained on (`--photo-ckpt`, `--photo-data` as the
training command's `data.*` overrides); with the photo set's provenance file (`--photo-provenance`, the devset's
`<name>.provenance.json`: each image's `file_name`, `flickr_url` and `license`), the photo's credit and licence are
written beside it (`photo_panel.credit.txt`) for the README's caption:

    python -m ranprm.docs_images --ckpt ... \\
        --photo-ckpt outputs/devset/checkpoints/last.ckpt \\
        --photo-data data.root=~/.cache/ranprm/devset/coco-snapshots-v2 ... \\
        --photo-provenance experiments/devset/coco-snapshots-v2.provenance.json

Each panel shows one validation image: `--image-id` (`--photo-image-id`), or the first of the validation split's
first 64 images with the most classes (a panel that shows several classes, successes and failures). The panels
are rendered by `PanelCallback.render` (the training panels' own inference and drawing, fp32), not padded, at
`--tile-size` px. What each panel shows (checkpoint epoch, image, valid classes, GT) is printed, so the README's
caption can be checked against it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ranprm.cli.config import compose, to_plain
from ranprm.data.datamodule import DataConfig, VOCDataModule
from ranprm.data.dataset import collate
from ranprm.errors import ConfigError, RanprmError
from ranprm.lightning.checkpoint import load_module, read_checkpoint
from ranprm.lightning.panels import PanelCallback
from ranprm.utils.io import write_text_atomic
from ranprm.viz.draw import save_png

log = logging.getLogger(__name__)

SCAN_IMAGES = 64  # the validation images searched for the one with the most classes


@dataclass(frozen=True)
class DocPanel:
    """One rendered panel and what it shows."""

    image: np.ndarray
    image_id: str
    caption: str  # `panel_caption`: valid classes, peaks, instances, GT
    epoch: int | None  # the checkpoint's epoch (0-based), when it records one


def pick_image(labels: Sequence[Sequence[float]], wanted: str | None, ids: Sequence[str]) -> int:
    """The index of image `wanted` in `ids`, or (None) the first of the first `SCAN_IMAGES` with the most classes
    present in `labels` (multi-hot rows)."""
    if wanted is not None:
        if wanted not in ids:
            raise ConfigError(f"--image-id {wanted!r} is not a validation image (e.g. {', '.join(ids[:3])})")
        return list(ids).index(wanted)
    counts = [int(np.count_nonzero(np.asarray(row, np.float32) > 0)) for row in labels[:SCAN_IMAGES]]
    if not counts:
        raise ConfigError("the validation split has no images to show")
    return int(np.argmax(counts))  # argmax takes the first of equals


def render_doc_panel(ckpt: str | Path, data_overrides: Sequence[str], image_id: str | None,
                     tile_size: int) -> DocPanel:  # fmt: skip
    """The panel of one validation image of the data `data_overrides` describe, by the checkpoint `ckpt`."""
    cfg = compose("train", list(data_overrides))
    datamodule = VOCDataModule(DataConfig.from_config(to_plain(cfg.data)), seed=cfg.seed)
    datamodule.setup("validate")
    dataset = datamodule.val_set
    assert dataset is not None
    index = pick_image([dataset.labels[i].tolist() for i in range(min(len(dataset), SCAN_IMAGES))], image_id,
                       list(dataset.ids))  # fmt: skip
    module = load_module(ckpt, datamodule.class_names)
    epoch = read_checkpoint(ckpt).get("epoch")
    callback = PanelCallback(num_images=1, tile_size=tile_size, precision="fp32")
    batch = collate([dataset[index]])
    panels, captions = callback.render(module, batch, pad=False)
    return DocPanel(panels[0], str(batch["image_id"][0]), captions[0], None if epoch is None else int(epoch))


def photo_credit(provenance: str | Path, image_id: str) -> str:
    """The credit line of a photo from the dev set's provenance file: its COCO id, Flickr page and licence."""
    try:
        record = json.loads(Path(provenance).read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"--photo-provenance {provenance}: cannot read it as JSON ({err})") from err
    for image in record.get("images", []):
        if Path(str(image.get("file_name", ""))).stem == image_id:
            licence = image.get("license") or {}
            return (f"COCO 2017 image {image.get('id')} ({image.get('flickr_url')}), "
                    f"{licence.get('name', 'licence unknown')} ({licence.get('url', '')})")  # fmt: skip
    raise ConfigError(f"--photo-provenance {provenance} does not list the image {image_id!r}")


def _save(panel: DocPanel, out: Path, name: str) -> Path:
    path = out / f"{name}.png"
    save_png(path, panel.image)
    epoch = "?" if panel.epoch is None else panel.epoch + 1
    print(f"{path}: {panel.image.shape[1]} x {panel.image.shape[0]} px, epoch {epoch}, {panel.caption}")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ranprm.docs_images", description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default=None, help="checkpoint of the synthetic panel (the default run's)")
    parser.add_argument("--data", nargs="*", default=[], help="data.* overrides of that run (default: data=synthetic)")
    parser.add_argument("--image-id", default=None, help="the validation image shown (default: the most classes)")
    parser.add_argument("--out", default="docs/images", help="folder of the pictures (default: docs/images)")
    parser.add_argument("--tile-size", type=int, default=224, help="tiles' longer side in px (default: 224)")
    parser.add_argument("--photo-ckpt", default=None, help="checkpoint of the real-photo panel (optional)")
    parser.add_argument("--photo-data", nargs="*", default=[], help="data.* overrides of the photo run")
    parser.add_argument("--photo-image-id", default=None, help="the photo shown (default: the most classes)")
    parser.add_argument("--photo-provenance", default=None, help="the photo set's provenance JSON (the licences)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.tile_size < 16:
        parser.error(f"--tile-size must be at least 16, got {args.tile_size}")
    if args.ckpt is None and args.photo_ckpt is None:
        parser.error("give --ckpt (the synthetic panel), --photo-ckpt (the real-photo panel) or both")
    out = Path(args.out)
    try:
        if args.ckpt is not None:  # each panel can be redrawn alone: the other picture is left as it is
            _save(render_doc_panel(args.ckpt, args.data, args.image_id, args.tile_size), out, "panel")
        if args.photo_ckpt is not None:
            photo = render_doc_panel(args.photo_ckpt, args.photo_data, args.photo_image_id, args.tile_size)
            _save(photo, out, "photo_panel")
            if args.photo_provenance is not None:
                credit = photo_credit(args.photo_provenance, photo.image_id)
                write_text_atomic(out / "photo_panel.credit.txt", credit + "\n")
                print(f"photo credit: {credit}")
            else:
                log.warning("no --photo-provenance: the photo's licence is not recorded; give it before publishing")
    except RanprmError as err:
        print(f"ranprm.docs_images: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
