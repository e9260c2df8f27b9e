"""`ranprm-evaluate variants=...`: the inference variants one pass evaluates, parsed once from the command line.

A variant is a threshold (a `conf/threshold/<name>.yaml` preset or a rule mapping), a retrieval (a method name,
its `conf/retrieval/<name>.yaml` when it has one, or a mapping with `name` and options on top), a gradient
path (`mask_grad`: full | detached, attention trunks) and the instance protocol that scores it (`protocol`: voc |
coco, `ranprm.eval.protocols`). An axis a variant leaves out keeps the command line's (or the checkpoint's)
setting (`eval.protocol` for the protocol). Variants that differ only in `protocol` share one prediction: the model
runs once for them and each protocol scores the same instances. Two forms:

    variants='{threshold:[seed,fixed,mean,q3,class_q3],retrieval:[prm_only,proposals]}'   # product: 10 variants
    variants='[{threshold:seed},{threshold:fixed,retrieval:{name:proposals,size:448},name:official}]'  # a list
    variants='{threshold:[seed,q3],protocol:[voc,coco]}'   # 4 variants, 2 predictions

In a product each axis is one value or a list; the variants come threshold-major (then retrieval, then
mask_grad, then protocol). A list entry may carry `name`; otherwise a variant is named by its values joined with `/`
(`seed/proposals`; a mapping value reads `proposals(size=448)`). Names must be unique.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ranprm.cli.config import config_dir
from ranprm.errors import ConfigError
from ranprm.models.attention import MASK_GRAD_MODES
from ranprm.prm.pipeline import PRM_DEFAULTS, InferenceConfig

if TYPE_CHECKING:
    from ranprm.lightning.module import PRMModule

AXES = ("threshold", "retrieval", "mask_grad", "protocol")


@dataclass(frozen=True)
class VariantSpec:
    """One variant as the command line gave it, its groups resolved to full config mappings.

    threshold, retrieval: the group's config (None: the command line's / checkpoint's); mask_grad: None: the
    model's own path; protocol: None: `eval.protocol`."""

    name: str
    threshold: dict[str, Any] | None = None
    retrieval: dict[str, Any] | None = None
    mask_grad: str | None = None
    protocol: str | None = None

    def inference_key(self) -> str:
        """What decides the variant's instances (everything but the protocol): variants with equal keys share one
        prediction."""
        return json.dumps([self.threshold, self.retrieval, self.mask_grad], sort_keys=True, default=str)


def _presets(group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def _load_preset(group: str, name: str) -> dict[str, Any] | None:
    from omegaconf import OmegaConf

    path = config_dir() / group / f"{name}.yaml"
    if not path.is_file():
        return None
    return dict(OmegaConf.to_container(OmegaConf.load(path), resolve=True))  # type: ignore[arg-type]


def _flat(options: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in options.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _label(group: str, value: Any) -> str:
    """A value's part of a variant name: a name as it is; a mapping as its `name` and, when that is a preset of
    `group`, the options that differ from it (`mean(min_class_prob=0.3)`, `proposals(size=448)`)."""
    if not isinstance(value, Mapping):
        return str(value)
    name = str(value.get("name", "custom"))
    preset = _flat(_load_preset(group, name) or {})
    changed = {k: v for k, v in _flat(value).items() if k != "name" and (k not in preset or preset[k] != v)}
    if not preset or not changed:  # not a preset: its own name says what it is
        return name
    return f"{name}(" + ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in changed.items()) + ")"


def _threshold(value: Any) -> dict[str, Any]:
    """A preset name, or a mapping: `{name: <preset>, <keys on top>}`, or a whole rule (classes and peaks) whose
    `name` (not a preset's) labels it."""
    if isinstance(value, str):
        preset = _load_preset("threshold", value)
        if preset is None:
            raise ConfigError(f"variants: threshold={value!r} is not a preset; choose one of {_presets('threshold')}")
        return preset
    if isinstance(value, Mapping):
        base = _load_preset("threshold", str(value["name"])) if "name" in value else None
        return {**(base or {}), **dict(value)}
    raise ConfigError(f"variants: threshold={value!r} must be a preset name or a mapping")


def _retrieval(value: Any) -> dict[str, Any]:
    """A method name (its YAML's options when it has one), or a mapping with `name` and options on top."""
    from ranprm.prm.retrieval import RETRIEVAL_METHODS

    options = {"name": value} if isinstance(value, str) else dict(value) if isinstance(value, Mapping) else None
    if options is None or "name" not in options:
        raise ConfigError(f"variants: retrieval={value!r} must be a method name or a mapping with `name`")
    name = str(options["name"])
    if name not in RETRIEVAL_METHODS:
        raise ConfigError(f"variants: retrieval={name!r} is not a method; choose one of {RETRIEVAL_METHODS.names()}")
    return {**(_load_preset("retrieval", name) or {}), **options}


def _mask_grad(value: Any) -> str:
    if value not in MASK_GRAD_MODES:
        raise ConfigError(
            f"variants: mask_grad={value!r} is not a gradient path; choose one of {list(MASK_GRAD_MODES)}"
        )
    return str(value)


def _protocol(value: Any) -> str:
    from ranprm.eval.protocols import PROTOCOLS

    if value not in PROTOCOLS:
        raise ConfigError(f"variants: protocol={value!r} is not a protocol; choose one of {PROTOCOLS.names()}")
    return str(value)


def _spec(entry: Mapping[str, Any], name: str | None) -> VariantSpec:
    unknown = sorted(set(entry) - set(AXES) - {"name"})
    if unknown:
        raise ConfigError(f"variants: unknown key(s) {unknown}; a variant has {list(AXES)} (and a `name`)")
    label = name or str(entry.get("name") or "/".join(_label(a, entry[a]) for a in AXES if a in entry) or "default")
    return VariantSpec(
        name=label,
        threshold=_threshold(entry["threshold"]) if "threshold" in entry else None,
        retrieval=_retrieval(entry["retrieval"]) if "retrieval" in entry else None,
        mask_grad=_mask_grad(entry["mask_grad"]) if "mask_grad" in entry else None,
        protocol=_protocol(entry["protocol"]) if "protocol" in entry else None,
    )


def parse_variants(value: Any) -> list[VariantSpec] | None:
    """The variants of `variants=` (module docstring), or None when it is null (one run, the usual settings)."""
    if value is None:
        return None
    if isinstance(value, Mapping):  # a product
        unknown = sorted(set(value) - set(AXES))
        if unknown:
            raise ConfigError(f"variants: unknown axis {unknown}; a product takes {list(AXES)} (lists of values)")
        axes = [a for a in AXES if a in value]
        if not axes:
            raise ConfigError("variants={} names no axis; give e.g. variants='{threshold:[seed,fixed]}'")
        lists = [list(value[a]) if isinstance(value[a], Sequence) and not isinstance(value[a], str) else [value[a]]
                 for a in axes]  # fmt: skip
        if any(len(values) == 0 for values in lists):
            raise ConfigError("variants: an axis of the product is an empty list")
        specs = [_spec(dict(zip(axes, combo, strict=True)), None) for combo in itertools.product(*lists)]
    elif isinstance(value, Sequence) and not isinstance(value, str):
        if not value:
            raise ConfigError("variants=[] lists no variant; give at least one, or leave variants null")
        if not all(isinstance(entry, Mapping) for entry in value):
            raise ConfigError(
                "variants: each entry of a list is a mapping, e.g. [{threshold:seed,retrieval:proposals}]"
            )
        specs = [_spec(entry, None) for entry in value]
    else:
        raise ConfigError(
            f"variants={value!r} must be a product {{threshold:[...],retrieval:[...]}} or a list [{{...}}, ...]"
        )
    names = [s.name for s in specs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"variants: the name(s) {repeated} repeat; give each list entry its own `name`")
    return specs


def variant_config(module: PRMModule, spec: VariantSpec) -> tuple[InferenceConfig, dict[str, Any]]:
    """The parsed inference settings of `spec` on `module` (its own settings for the axes the spec leaves out, its
    class calibration, its head and prm), and those settings written out in full for metrics.json."""
    hp = module.hparams
    threshold = spec.threshold if spec.threshold is not None else dict(hp["threshold"])
    retrieval = spec.retrieval if spec.retrieval is not None else dict(hp["retrieval"])
    prm = {**PRM_DEFAULTS, **dict(hp["prm"] or {})}  # keys a checkpoint predates run at their defaults
    parsed = InferenceConfig.from_config(threshold, hp["head"], prm, retrieval, module.class_calibration)
    parsed = dataclasses.replace(parsed, gradient_path=spec.mask_grad)
    settings: dict[str, Any] = {
        "threshold": threshold,
        "retrieval": dataclasses.asdict(parsed.retrieval),
        "prm": prm,
        "mask_grad": spec.mask_grad or dict(hp["backbone"]).get("mask_grad"),
    }
    if parsed.thresholds.class_distribution == "dataset" and module.class_calibration is not None:
        settings["class_calibration"] = module.class_calibration.summary()
    return parsed, settings
