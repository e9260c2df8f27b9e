"""`python -m ranprm.docs_images` (`make docs-images`): it runs on a tiny model and writes the README's pictures
(what the pixels are is the panel tests' business), and records a photo's licence from the provenance file."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from ranprm.docs_images import main, pick_image
from ranprm.errors import ConfigError
from tests.helpers import CLASSES
from tests.test_predict import _train_tiny


def _data(voc) -> list[str]:
    return [f"data.root={voc}", f"data.class_names=[{','.join(CLASSES)}]", "data.image_size=64", "data.num_workers=0"]


def test_the_command_writes_the_synthetic_and_the_photo_panel_with_its_credit(tmp_path_factory, tmp_path, capsys):
    voc, ckpt = _train_tiny(str(tmp_path_factory.getbasetemp() / "tiny_model"))
    provenance = tmp_path / "set.provenance.json"
    licence = {"id": 4, "name": "Attribution License", "url": "http://creativecommons.org/licenses/by/2.0/"}
    image = {"id": 6, "file_name": "2024_000006.jpg", "flickr_url": "http://farm.example/6.jpg", "license": licence}
    provenance.write_text(json.dumps({"images": [image]}))
    out = tmp_path / "docs"
    code = main(["--ckpt", str(ckpt), "--data", *_data(voc), "--out", str(out), "--tile-size", "64",
                 "--image-id", "2024_000006", "--photo-ckpt", str(ckpt), "--photo-data", *_data(voc),
                 "--photo-image-id", "2024_000006", "--photo-provenance", str(provenance)])  # fmt: skip
    assert code == 0
    for name in ("panel.png", "photo_panel.png"):
        with Image.open(out / name) as png:
            assert png.mode == "RGB" and png.size[0] >= 64
    credit = (out / "photo_panel.credit.txt").read_text()
    assert credit == ("COCO 2017 image 6 (http://farm.example/6.jpg), Attribution License "
                      "(http://creativecommons.org/licenses/by/2.0/)\n")  # fmt: skip
    printed = capsys.readouterr().out
    assert "panel.png" in printed and "2024_000006" in printed and "epoch 1" in printed
    # An image that is not in the validation split: one line, exit 2, nothing new written.
    assert main(["--ckpt", str(ckpt), "--data", *_data(voc), "--out", str(tmp_path / "x"), "--image-id", "nope"]) == 2
    assert "is not a validation image" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_the_photo_panel_alone_leaves_the_synthetic_one_as_it_is(tmp_path_factory, tmp_path, capsys):
    voc, ckpt = _train_tiny(str(tmp_path_factory.getbasetemp() / "tiny_model"))
    out = tmp_path / "docs"
    out.mkdir()
    (out / "panel.png").write_bytes(b"the published synthetic panel")
    assert main(["--out", str(out), "--tile-size", "64", "--photo-ckpt", str(ckpt), "--photo-data", *_data(voc),
                 "--photo-image-id", "2024_000006"]) == 0  # fmt: skip
    assert (out / "panel.png").read_bytes() == b"the published synthetic panel"
    with Image.open(out / "photo_panel.png") as png:
        assert png.mode == "RGB"
    with pytest.raises(SystemExit) as stop:  # neither checkpoint: argparse's one line, exit 2
        main(["--out", str(out)])
    assert stop.value.code == 2 and "give --ckpt" in capsys.readouterr().err


def test_the_default_image_is_the_first_with_the_most_classes() -> None:
    labels = [[1, 0, 0], [1, 0, 1], [0, 1, 1], [1, 1, 0]]
    assert pick_image(labels, None, ["a", "b", "c", "d"]) == 1
    assert pick_image(labels, "d", ["a", "b", "c", "d"]) == 3
    with pytest.raises(ConfigError, match="not a validation image"):
        pick_image(labels, "e", ["a", "b", "c", "d"])
