"""The wheel must carry every subpackage and the configs, so `pip install .` works from any folder."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "ranprm").rglob("__init__.py")}
    assert found | {"ranprm.conf"} == listed


@pytest.mark.slow
def test_installed_wheel_finds_configs_from_any_folder(tmp_path):
    """A plain (non-editable) install of the package, run from an unrelated folder, composes its configs."""
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target",
         str(target), str(ROOT)],
        check=True,
    )  # fmt: skip
    assert (target / "ranprm" / "conf" / "train.yaml").is_file()
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = (
        "import ranprm, ranprm.cli.config as c; print(ranprm.__file__); "
        "print(c.config_dir()); print(c.compose('train', ['backbone=tiny']).backbone.name)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[0].startswith(str(target)) and out[1] == str(target / "ranprm" / "conf") and out[2] == "tiny"
