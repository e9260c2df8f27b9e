"""Resuming a training run: `ranprm-train resume=<run dir>` from the run folder alone, and the checks that a
resumed run trains the same model on the same data.

`resume=<run dir>` is expanded on the command line, before Hydra composes anything, into the run's saved overrides
(`<run dir>/.hydra/overrides.yaml`) + the overrides typed now + `hydra.run.dir=<run dir>` + `ckpt_path=last`: the
resumed run then composes exactly like the original, writes into the same folder (the same checkpoints, the same
W&B run id), and `--cfg job` shows what it will run. Overrides typed now may change how the run goes on
(`trainer.max_epochs`, `data.num_workers`, `logger`, ...) but not what it trains: the architecture (`backbone`,
`head`), the data (`data.*` except where it is read from and how fast) and the seed are refused, one line each.

Whatever way a run is resumed (`resume=`, `ckpt_path=last`, a path), `check_checkpoint_matches` compares the
checkpoint's saved hyper-parameters with the model this run builds, so a retyped override that differs is named.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ranprm.cli.run_dir import HYDRA_DIR, override_key
from ranprm.errors import ConfigError, RunFolderError

RESUME_KEY = "resume"
# What a resumed run may not change: the model it trains and the data it trains on (and the seed, which fixes the
# order of the remaining batches). `data.*` keys outside DATA_RUNTIME_KEYS are data.
FROZEN_GROUPS = ("backbone", "head", "data", "seed")
DATA_RUNTIME_KEYS = ("root", "num_workers", "pin_memory", "persistent_workers", "val_batch_size", "cache_dir",
                     "skip_bad_images")  # fmt: skip
FROZEN_OPTIMIZER_KEYS = ("optimizer", "optimizer.name", "optimizer.scheduler")  # the saved optimizer state's shape
# Checkpoint hyper-parameters that must equal this run's (backbone.pretrained is only where the first weights came
# from: the checkpoint replaces them).
COMPARED_HPARAMS = ("class_names", "backbone", "head", "image_size", "optimizer.name")


def frozen_reason(key: str) -> str | None:
    """Why an override of `key` may not change a resumed run, or None when it may."""
    if key in FROZEN_OPTIMIZER_KEYS:
        return "the optimizer (its saved state would not fit)"
    group, _, rest = key.partition(".")
    if group not in FROZEN_GROUPS:
        return None
    if group == "data" and rest in DATA_RUNTIME_KEYS:
        return None
    return {"backbone": "the architecture", "head": "the architecture", "data": "the data", "seed": "the data order"}[
        group
    ]


def resume_overrides(run_dir: str | Path, extra: list[str]) -> list[str]:
    """The overrides that resume the run in `run_dir`: its saved ones, then `extra`, then the run folder and
    `ckpt_path=last` (unless `extra` names another checkpoint). Raises one line for a folder that is not a run,
    or an override that would change what the run trains."""
    run_dir = Path(str(run_dir)).expanduser()
    saved_file = run_dir / HYDRA_DIR / "overrides.yaml"
    if not saved_file.is_file():
        raise RunFolderError(
            f"resume={run_dir}: no {HYDRA_DIR}/overrides.yaml there; give the folder of a ranprm-train run "
            "(the one holding checkpoints/ and .hydra/)"
        )
    try:
        saved = [str(o) for o in (OmegaConf.load(saved_file) or [])]
    except Exception as err:  # a hand-edited or truncated file
        raise RunFolderError(f"resume={run_dir}: {saved_file} is not a list of overrides ({err})") from err
    for override in extra:
        key = override_key(override)
        if key.startswith("hydra.run.dir"):
            raise ConfigError(f"resume={run_dir}: {override} conflicts with it; a run resumes in its own folder")
        reason = frozen_reason(key)
        if reason is not None:
            raise ConfigError(
                f"resume={run_dir}: {override} would change {reason} of the run being resumed; drop it, or start a "
                "new run with those settings"
            )
    keep = [o for o in saved if override_key(o) not in ("ckpt_path", RESUME_KEY, "overwrite")]
    tail = [] if any(override_key(o) == "ckpt_path" for o in extra) else ["ckpt_path=last"]
    return [*keep, *extra, f"hydra.run.dir={quote_override_value(str(run_dir))}", *tail]


def quote_override_value(value: str) -> str:
    """`value` as a Hydra override value: as it is when plain, else single-quoted (Hydra's grammar)."""
    if re.fullmatch(r"[\w./~:+@%-]+", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def expand_resume_argv(argv: list[str]) -> list[str]:
    """`argv` with `resume=<run dir>` replaced by the overrides that resume it (see the module docstring)."""
    args = argv[1:]
    given = [a for a in args if override_key(a) == RESUME_KEY and "=" in a]
    if not given:
        return argv
    if len(given) > 1:
        raise ConfigError(f"resume= is given {len(given)} times; give one run folder")
    value = given[0].split("=", 1)[1]
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":  # resume='my runs/x': Hydra's quoting
        value = value[1:-1]
    if value in ("", "null"):
        return [argv[0], *(a for a in args if a != given[0])]
    if any(a in ("-m", "--multirun") for a in args):
        raise ConfigError(
            "resume= runs one job: resume each job of a sweep on its own (`ranprm-train resume=<sweep dir>/<job>`)"
        )
    is_override = [("=" in a and not a.startswith("-")) for a in args]  # `--cfg job`: a flag and its value
    flags = [a for a, o in zip(args, is_override, strict=True) if not o]
    overrides = [a for a, o in zip(args, is_override, strict=True) if o and a != given[0]]
    return [argv[0], *flags, *resume_overrides(value, overrides)]


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}"))
        return flat
    return {prefix: list(value) if isinstance(value, list | tuple) else value}


def check_checkpoint_matches(saved: dict[str, Any], current: dict[str, Any], ckpt: Path) -> None:
    """Refuse to resume from `ckpt` when its hyper-parameters `saved` differ from this run's `current` in what
    the model is (classes, backbone, head, input size, optimizer): one line naming the first difference."""
    for name in COMPARED_HPARAMS:
        group, _, key = name.partition(".")
        old = saved.get(group, {}) if key else saved.get(group)
        new = current.get(group, {}) if key else current.get(group)
        if key:
            old, new = (old or {}).get(key), (new or {}).get(key)
        old_flat, new_flat = _flatten(old, name), _flatten(new, name)
        # `.name` first: across backbone families the names differ, and naming them says more than a setting
        # only one of them has (`backbone.attention=[]`)
        for flat_key in sorted(set(old_flat) | set(new_flat), key=lambda k: (not k.endswith(".name"), k)):
            if flat_key.endswith(".pretrained"):
                continue
            if old_flat.get(flat_key) != new_flat.get(flat_key):
                raise ConfigError(
                    f"ckpt_path={ckpt}: the checkpoint was trained with {flat_key}={old_flat.get(flat_key)!r}, this "
                    f"run sets {new_flat.get(flat_key)!r}; resume with the run's own settings (`ranprm-train "
                    f"resume=<run dir>` reads them) or start a new run"
                )


def main_argv() -> None:
    """Expand `resume=` in `sys.argv` in place (called by `ranprm.train.main` before Hydra parses it)."""
    sys.argv = expand_resume_argv(sys.argv)
