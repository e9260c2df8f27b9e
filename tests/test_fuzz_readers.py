"""Property tests: the readers turn any input into a clean result or their documented error, never another one."""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from ranprm.data.voc import _read_index_png, read_annotation, read_image
from ranprm.errors import DataError, PredictionsError
from ranprm.eval.results_io import encode_mask, read_results

CLASSES = ("square", "disk")
# RANPRM_FUZZ_EXAMPLES=2000 for a deeper local search; 50 keeps CI fast and deterministic enough.
FUZZ = settings(
    max_examples=int(os.environ.get("RANPRM_FUZZ_EXAMPLES", "50")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def _valid_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)).save(buf, "JPEG")
    return buf.getvalue()


def _valid_png(mode: str = "P") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).convert(mode).save(buf, "PNG")
    return buf.getvalue()


JPEG, PNG = _valid_jpeg(), _valid_png()


def _mutated(seed: bytes) -> st.SearchStrategy[bytes]:
    """A valid file cut short, with bytes flipped, or with random bytes appended: reaches the decoders' insides."""

    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        data = bytearray(seed[: draw(st.integers(0, len(seed)))])
        for _ in range(draw(st.integers(0, 6))):
            if data:
                data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data) + draw(st.binary(max_size=64))

    return build()


IMAGE_BYTES = st.one_of(st.binary(max_size=512), _mutated(JPEG), _mutated(PNG))


def _tmp_file(data: bytes, suffix: str) -> Path:
    with tempfile.NamedTemporaryFile(suffix=suffix, delete=False) as handle:
        handle.write(data)
    return Path(handle.name)


@FUZZ
@given(IMAGE_BYTES)
def test_read_image_gives_an_image_or_a_data_error(data):
    path = _tmp_file(data, ".jpg")
    try:
        image = read_image(path)
    except DataError as err:
        assert path.name in str(err)
    else:
        assert image.ndim == 3 and image.shape[0] == 3
    finally:
        path.unlink()


@FUZZ
@given(st.one_of(st.binary(max_size=512), _mutated(PNG), _mutated(_valid_png("L"))))
def test_read_mask_png_gives_an_array_or_a_data_error(data):
    path = _tmp_file(data, ".png")
    try:
        mask = _read_index_png(path)
    except DataError as err:
        assert path.name in str(err)
    else:
        assert mask.ndim == 2
    finally:
        path.unlink()


_TAGS = st.sampled_from(["annotation", "object", "name", "difficult", "bndbox", "xmin", "ymin", "xmax", "ymax"])
_TEXT = st.one_of(st.sampled_from(["square", "disk", "1", "0", "12.5", "", "-3", "nan", "1e400"]), st.text(max_size=8))


@st.composite
def _xml(draw: st.DrawFn, depth: int = 0) -> str:
    tag = draw(_TAGS)
    if depth >= 3 or draw(st.booleans()):
        body = draw(_TEXT).replace("&", "&amp;").replace("<", "&lt;")
    else:
        body = "".join(draw(st.lists(_xml(depth + 1), max_size=4)))
    return f"<{tag}>{body}</{tag}>"


XML_TEXT = st.one_of(
    _xml(),
    st.text(max_size=200),
    _xml().map(lambda x: '<?xml version="1.0"?><!DOCTYPE a [<!ENTITY e "boom">]>' + x.replace("</", "&e;</", 1)),
)


@FUZZ
@given(XML_TEXT)
def test_read_annotation_gives_objects_or_a_data_error(text):
    path = _tmp_file(text.encode("utf-8", "surrogatepass"), ".xml")
    try:
        objects = read_annotation(path, CLASSES)
    except DataError as err:
        assert path.name in str(err)
    else:
        assert objects and all(o.name in CLASSES for o in objects)
    finally:
        path.unlink()


SIZES = {"a": (4, 5), "b": (3, 3)}
_GOOD_RLE = encode_mask(np.eye(4, 5, dtype=bool))
_JSON_LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 5),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.sampled_from(["a", "b", "square", "disk"]),
)
_JSONISH = st.recursive(
    _JSON_LEAF, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3)
)


@st.composite
def _entry(draw: st.DrawFn):
    entry = {
        "image_id": draw(st.one_of(st.sampled_from(["a", "b", "zzz"]), _JSONISH)),
        "category_id": draw(st.one_of(st.integers(-1, 3), _JSONISH)),
        "score": draw(st.one_of(st.floats(allow_nan=True, allow_infinity=True), _JSONISH)),
        "segmentation": draw(
            st.one_of(
                st.just(_GOOD_RLE),
                st.fixed_dictionaries({"size": _JSONISH, "counts": st.one_of(st.text(max_size=12), _JSONISH)}),
                st.fixed_dictionaries({"size": st.just([4, 5]), "counts": st.lists(st.integers(-2, 25), max_size=5)}),
                _JSONISH,
            )
        ),
    }
    if draw(st.booleans()):
        entry["peak"] = draw(st.one_of(st.lists(st.floats(-2, 6), max_size=3), _JSONISH))
    if draw(st.booleans()):
        entry["category"] = draw(st.one_of(st.sampled_from(CLASSES), _JSONISH))
    for key in draw(st.lists(st.sampled_from(sorted(entry)), max_size=2)):
        entry.pop(key, None)
    return entry


RESULTS = st.one_of(st.lists(_entry(), max_size=4), _JSONISH)


@FUZZ
@given(RESULTS)
def test_read_results_gives_results_or_a_predictions_error(data):
    path = _tmp_file(json.dumps(data, allow_nan=True).encode(), ".json")
    try:
        results = read_results(path, CLASSES, SIZES)
    except PredictionsError as err:
        assert path.name in str(err)
    else:
        assert list(results) == list(SIZES)
    finally:
        path.unlink()


@FUZZ
@given(st.binary(max_size=300))
def test_read_results_on_random_bytes(data):
    path = _tmp_file(data, ".json")
    try:
        read_results(path, CLASSES, SIZES)
    except PredictionsError as err:
        assert path.name in str(err)
    finally:
        path.unlink()


def test_fuzz_strategies_reach_the_success_path():
    # The properties above are only meaningful if valid inputs are among the examples; check the seeds.
    path = _tmp_file(JPEG, ".jpg")
    try:
        assert read_image(path).shape == (3, 8, 8)
    finally:
        path.unlink()
    entry = {"image_id": "a", "category_id": 1, "score": 0.5, "segmentation": _GOOD_RLE}
    path = _tmp_file(json.dumps([entry]).encode(), ".json")
    try:
        assert len(read_results(path, CLASSES, SIZES)["a"]) == 1
    finally:
        path.unlink()


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
