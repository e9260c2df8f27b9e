"""`ranprm-predict` on bad input: unreadable images skipped with a count (or a stop on request), a stopped run that
never blocks its own rerun, and nothing a user made replaced (issue 18 item 3)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from PIL import Image

from ranprm.errors import ConfigError, DataError, RunFolderError
from ranprm.predict import UNFINISHED_FILE, predict
from tests.test_predict import _predict_cfg, tiny_model  # noqa: F401  (the module-scoped fixture)


def _folder(voc: Path, tmp_path: Path, bad: str = "b_bad.jpg") -> Path:
    """Three images in name order: a_ok.jpg, the unreadable `bad`, c_ok.png."""
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(voc / "JPEGImages" / "2024_000001.jpg", folder / "a_ok.jpg")
    (folder / bad).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    Image.open(voc / "JPEGImages" / "2024_000003.jpg").save(folder / "c_ok.png")
    return folder


def test_unreadable_images_are_skipped_with_a_warning_and_a_count(tiny_model, tmp_path, caplog):  # noqa: F811
    voc, ckpt = tiny_model
    inp, out = _folder(voc, tmp_path), tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="ranprm.predict"):
        results = predict(_predict_cfg(ckpt, inp, out))
    assert {e["image_id"] for e in results} == {"a_ok", "c_ok"}
    assert {e["image_id"] for e in json.loads((out / "predictions.json").read_text())} == {"a_ok", "c_ok"}
    assert sorted(p.name for p in out.iterdir()) == ["a_ok.png", "c_ok.png", "predictions.json"]
    assert "skipping image" in caplog.text and "b_bad.jpg" in caplog.text
    assert "skipped 1 unreadable image(s) of 3: b_bad.jpg" in caplog.text
    assert "skip_bad_images" not in caplog.text  # an option predict does not have


def test_on_bad_image_stop_names_the_image_and_the_rerun_is_not_blocked_by_its_leftovers(
    tiny_model,  # noqa: F811
    tmp_path,
):
    voc, ckpt = tiny_model
    inp, out = _folder(voc, tmp_path), tmp_path / "out"
    with pytest.raises(DataError, match=r"b_bad\.jpg is truncated or corrupt.*on_bad_image=skip") as info:
        predict(_predict_cfg(ckpt, inp, out, "on_bad_image=stop"))
    assert "skip_bad_images" not in str(info.value)
    assert (out / "a_ok.png").is_file() and not (out / "predictions.json").exists()
    assert (out / UNFINISHED_FILE).read_text() == "a_ok.png\n"

    shutil.copy(inp / "a_ok.jpg", inp / "b_bad.jpg")  # the user fixes the image and runs the same command again
    predict(_predict_cfg(ckpt, inp, out, "on_bad_image=stop"))  # no overwrite=true needed for its own leftovers
    assert {e["image_id"] for e in json.loads((out / "predictions.json").read_text())} >= {"a_ok", "b_bad"}
    assert not (out / UNFINISHED_FILE).exists()
    with pytest.raises(RunFolderError, match=r"already holds predictions\.json and 3 more.*overwrite=true"):
        predict(_predict_cfg(ckpt, inp, out))  # a finished run's outputs are the user's now


def test_a_folder_of_only_bad_images_and_bad_options_are_one_line(tiny_model, tmp_path):  # noqa: F811
    _, ckpt = tiny_model
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "x.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"none of the 1 image\(s\) could be read"):
        predict(_predict_cfg(ckpt, inp, tmp_path / "out"))
    assert not (tmp_path / "out" / "predictions.json").exists()
    with pytest.raises(ConfigError, match=r"on_bad_image='ignore' must be one of skip, stop"):
        predict(_predict_cfg(ckpt, inp, tmp_path / "out", "on_bad_image=ignore"))
    with pytest.raises(ConfigError, match=r"image_size=16 must lie in \[32, inf\]"):
        predict(_predict_cfg(ckpt, inp, tmp_path / "out", "image_size=16"))
    with pytest.raises(ConfigError, match=r"backbone_overrides\.mask_grad=full: .* has no setting 'mask_grad'"):
        predict(_predict_cfg(ckpt, inp, tmp_path / "out", "backbone_overrides.mask_grad=full"))


def test_a_full_disk_while_predict_writes_is_one_line_naming_the_file(tiny_model, tmp_path, monkeypatch):  # noqa: F811
    import errno

    import ranprm.lightning.prediction_writer as writer

    voc, ckpt = tiny_model
    inp, out = _folder(voc, tmp_path), tmp_path / "out"

    def full(path, image):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(writer, "save_png", full)
    with pytest.raises(RunFolderError) as info:
        predict(_predict_cfg(ckpt, inp, out))
    assert str(info.value) == (
        f"cannot write {out / 'a_ok.png'} (No space left on device); free space or fix the folder's permissions, "
        "then run the same command again"
    )
    assert not (out / "predictions.json").exists()
