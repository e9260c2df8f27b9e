"""The wheel must carry every subpackage and the configs, so `pip install .` works from any folder; dependencies are
ranges that keep a user's torch, and `make` installs the exact versions of constraints.txt."""

import json
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


# ------------------------------------------------------------------------------------ dependencies and the lock

EXTRAS = ("dev", "sweep", "tensorboard")


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _requirements() -> list:
    from packaging.requirements import Requirement

    project = _project()
    names = list(project["dependencies"]) + [r for e in EXTRAS for r in project["optional-dependencies"][e]]
    return [Requirement(r) for r in names]


def _constraints() -> dict[str, str]:
    """name -> the specifier line of constraints.txt."""
    from packaging.requirements import Requirement

    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            pins[req.name.lower().replace("_", "-")] = req.specifier
    return pins


def test_torch_is_a_range_that_keeps_other_builds():
    """`pip install ranprm` must accept the torch a researcher already has (CUDA, ROCm, CPU-only local builds)."""
    from packaging.version import Version

    reqs = {r.name: r.specifier for r in _requirements()}
    for build in ("2.4.1", "2.5.1+cu121", "2.8.0+rocm6.3", "2.13.0", "2.13.0+cpu", "2.13.0+cu130"):
        assert reqs["torch"].contains(Version(build), prereleases=False), build
    assert not reqs["torch"].contains(Version("2.3.1")) and not reqs["torch"].contains(Version("3.0.0"))
    for build in ("0.19.1", "0.20.1+cu121", "0.28.0+cpu"):
        assert reqs["torchvision"].contains(Version(build)), build
    assert not any(s.operator == "==" for r in _requirements() for s in r.specifier)  # ranges, never pins


def test_the_lock_pins_every_dependency_inside_its_range():
    from packaging.version import Version

    pins = _constraints()
    for req in _requirements():
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{name} is not in constraints.txt: run `make lock`"
        (exact,) = [s for s in pins[name] if s.operator == "=="]
        assert req.specifier.contains(Version(exact.version)), f"constraints.txt pins {name} outside {req}"
    # PyPI's CUDA build, never a local +cpu one: that pairs only with PyTorch's own +cpu torchvision
    assert not pins["torch"].contains(Version("2.13.0+cpu")) and pins["torch"].contains(Version("2.13.0"))


def test_pycocotools_is_for_tests_only():
    project = _project()
    assert not any(r.startswith("pycocotools") for r in project["dependencies"])
    assert any(r.startswith("pycocotools") for r in project["optional-dependencies"]["dev"])
    for path in (ROOT / "ranprm").rglob("*.py"):
        assert "import pycocotools" not in path.read_text() and "from pycocotools" not in path.read_text(), path


def test_make_installs_with_the_lock():
    makefile = (ROOT / "Makefile").read_text()
    assert "pip install --quiet -c $(CONSTRAINTS) -e" in makefile and "CONSTRAINTS := constraints.txt" in makefile
    assert "$(STAMP): pyproject.toml $(CONSTRAINTS)" in makefile  # a new lock reinstalls


def _fake_dist(site: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> None:
    """An installed distribution as pip sees it (a dist-info folder), standing for a user's own build."""
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    meta = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}", *[f"Requires-Dist: {r}" for r in requires]]
    (info / "METADATA").write_text("\n".join(meta) + "\n")
    (info / "INSTALLER").write_text("pip\n")
    (info / "RECORD").write_text("")


@pytest.mark.slow
def test_pip_install_keeps_the_torch_build_already_installed(tmp_path):
    """Offline: a venv that sees this environment's packages, with its own torch 2.6.0+cu124 and torchvision in
    front. Resolving `pip install .` against no index at all must succeed and install ranprm alone: had the
    ranges refused that torch, pip would have to fetch another one and fail."""
    import sysconfig

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       check=True, capture_output=True, text=True).stdout.strip()
    )  # fmt: skip
    _fake_dist(site, "torch", "2.6.0+cu124")
    _fake_dist(site, "torchvision", "0.21.0+cu124", ("torch==2.6.0",))
    # everything else (lightning, hydra, ...) from this environment, behind the venv's own site-packages
    (site / "outer.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    report = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--dry-run", "--no-index",
         "--no-build-isolation", "--report", str(report), "--quiet", str(ROOT)],
        env={**env, "PIP_CONFIG_FILE": os.devnull, "PIP_CONSTRAINT": ""}, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    installed = [item["metadata"]["name"] for item in json.loads(report.read_text())["install"]]
    assert installed == ["ranprm"]


def test_every_module_imports():
    """A name removed in one module and still imported by another fails here, not in the first command that
    reaches it."""
    import importlib
    import pkgutil

    import ranprm

    names = [m.name for m in pkgutil.walk_packages(ranprm.__path__, "ranprm.") if not m.name.endswith("__main__")]
    assert len(names) > 50
    for name in names:
        importlib.import_module(name)
