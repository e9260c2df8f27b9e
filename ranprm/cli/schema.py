"""Structured configs: the typed schema each entry point's config is composed against.

Each entry point's YAML (`conf/train.yaml`, `evaluate.yaml`, `predict.yaml`) names its schema first in its defaults
list (`ranprm_train_schema`, ...; stored in Hydra's ConfigStore by `register_schemas`). Every later YAML file and
every command-line override is then merged into typed nodes, so a value of the wrong type (`optimizer.lr=abc`,
`head.window=1.5`, `prm.mode=3`) or an unknown key (`data.bogus=1`) fails while the config is composed, before the
task runs (`ranprm.cli.config` turns that into one line and exit code 2).

One place for each fact: where a dataclass already describes a section (`DataConfig`, `SyntheticSpec`, `PeakHead`,
`PrmConfig`, `EvalConfig`), the schema is derived from it (`derive`), not copied; the sections that had no
dataclass (`optimizer`, `trainer`, `callbacks`, the entry points' own keys) are defined here. Ranges (lr >= 0, ...)
are checked where the values are used (`ranprm.cli.build`, the dataclasses' `validate` / `__post_init__`).

Open sections: `trainer` (any `lightning.Trainer` argument, `+trainer.<name>=...`) and `optimizer` (any keyword of
the torch optimizer, `+optimizer.betas=[0.9,0.99]`) accept keys beyond the typed ones. The groups whose options
vary in shape (`backbone`, `threshold`, `retrieval`, `logger`, `paths`) are `Any` here: a backbone registered with a
config dataclass is typed by that dataclass (`ranprm.cli.config.register_extensions`), plugins included.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from omegaconf import MISSING

from ranprm.data.datamodule import DataConfig
from ranprm.data.synthetic import SyntheticSpec
from ranprm.eval.config import EvalConfig
from ranprm.prm.peaks import PeakHead
from ranprm.prm.pipeline import PrmConfig

# Sections that take keys beyond their typed fields (free-form keyword arguments of a library).
OPEN_SECTIONS: tuple[str, ...] = ("trainer", "optimizer")


def derive(
    cls: type,
    name: str,
    *,
    optional: bool = False,
    replace: dict[str, tuple[Any, Any]] | None = None,
    extra: tuple[tuple[str, Any, Any], ...] = (),
) -> type:
    """A (mutable) schema dataclass `name` with the fields of the dataclass `cls`: the same names, types and
    defaults, except the fields in `replace` (name -> (type, default or `dataclasses.field(...)`)), plus `extra`
    fields (name, type, default). `optional=True`: every field `X | None` defaulting to None, for sections where
    null means "keep the other value" (the inference overrides of evaluate and predict)."""
    replace = replace or {}
    hints = typing.get_type_hints(cls)
    specs: list[tuple[str, Any, Any]] = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        kind, default = replace.get(f.name, (hints[f.name], _default_of(f)))
        specs.append((f.name, kind, default))
    specs += list(extra)
    made = []
    for key, kind, default in specs:
        if optional:
            kind, default = kind | None if kind is not Any else Any, None
        made.append((key, kind, default if isinstance(default, dataclasses.Field) else field(default=default)))
    schema = dataclasses.make_dataclass(name, made)
    schema.__module__ = __name__  # found by name here (typing.get_type_hints, OmegaConf's messages)
    return schema


def _default_of(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return field(default_factory=f.default_factory)
    return MISSING if f.default is dataclasses.MISSING else f.default


# ------------------------------------------------------------------------------------------------- sections
SyntheticSchema = derive(SyntheticSpec, "SyntheticSchema")
DataSchema = derive(
    DataConfig, "DataSchema", replace={"synthetic": (SyntheticSchema, field(default_factory=SyntheticSchema))}
)
# ranprm-evaluate: `data.image_size: null` (conf/evaluate.yaml) runs at the checkpoint's training size.
EvaluateDataSchema = derive(
    DataConfig,
    "EvaluateDataSchema",
    replace={
        "synthetic": (SyntheticSchema, field(default_factory=SyntheticSchema)),
        "image_size": (int | None, None),
    },
)
HeadSchema = derive(PeakHead, "HeadSchema", replace={"peak_filter": (Any, "median")})  # a rule name, number or map
PrmSchema = derive(PrmConfig, "PrmSchema")
# evaluate and predict: null keeps the checkpoint's value; `max_peaks_per_image: none` lifts the cap there
PrmOverrides = derive(PrmConfig, "PrmOverrides", optional=True, replace={"max_peaks_per_image": (Any, None)})
_EVAL_MAX_IMAGES = ("max_images", int | None, None)  # the first N images of the split only
EvaluateEvalSchema = derive(EvalConfig, "EvaluateEvalSchema", optional=True, extra=(_EVAL_MAX_IMAGES,))
TrainEvalSchema = derive(
    EvalConfig, "TrainEvalSchema", optional=True, extra=(_EVAL_MAX_IMAGES, ("every_n_epochs", int | None, None))
)


class Scheduler(StrEnum):
    none = "none"
    cosine = "cosine"  # per optimizer step, down to 0 at the end of the run


@dataclass
class OptimizerSchema:
    """`optimizer`: its typed keys; any other key is passed to the torch optimizer (`momentum`, `betas`, ...)."""

    name: str = "adam"  # sgd | adam | adamw
    lr: float = 1e-3
    weight_decay: float = 0.0
    backbone_lr_mult: float = 1.0  # the trunk's lr is lr * backbone_lr_mult
    scheduler: Scheduler = Scheduler.none


@dataclass
class TrainerSchema:
    """`trainer`: the `lightning.Trainer` arguments ranprm's configs set, typed; any other Trainer argument with
    `+trainer.<name>=...` (its name is checked against the Trainer's signature when the run is built)."""

    accelerator: str = "auto"
    devices: Any = 1  # an int, a list of device ids, or auto
    num_nodes: int = 1
    strategy: str = "auto"
    max_epochs: int | None = None
    precision: Any = "auto"  # auto | 32-true | bf16-mixed | 16-mixed | 64 | ...
    log_every_n_steps: int = 50
    num_sanity_val_steps: int = 0
    deterministic: Any = False  # true | false | warn
    inference_mode: bool = False
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    limit_train_batches: Any = None  # an int (batches) or a fraction of each epoch
    limit_val_batches: Any = None
    check_val_every_n_epoch: int | None = 1
    fast_dev_run: Any = False  # true or a number of batches
    overfit_batches: Any = 0.0  # an int (batches) or a fraction
    profiler: str | None = None  # simple | advanced | pytorch
    detect_anomaly: bool = False
    sync_batchnorm: bool = False
    use_distributed_sampler: bool = True


class ProgressBar(StrEnum):
    rich = "rich"
    tqdm = "tqdm"
    none = "none"


class Direction(StrEnum):
    min = "min"
    max = "max"


class PanelPrecision(StrEnum):
    auto = "auto"  # bf16 when training in bf16
    fp32 = "fp32"
    bf16 = "bf16"


class PrmScale(StrEnum):
    shared = "shared"  # one scale for a panel's PRMs: a weak map looks weak
    per_map = "per_map"  # each PRM to its own maximum


@dataclass
class CheckpointSchema:
    monitor: str | None = "val/cls_map"
    mode: Direction = Direction.max
    save_top_k: int = 1
    every_n_train_steps: int | None = None


@dataclass
class PanelsSchema:
    num_images: int = 8
    every_n_epochs: int | None = 1
    max_prms: int = 8
    tile_size: int | None = 224
    precision: PanelPrecision = PanelPrecision.auto
    prm_scale: PrmScale = PrmScale.shared
    display_score: float = 0.1


@dataclass
class EarlyStoppingSchema:
    enabled: bool = False
    monitor: str | None = "val/cls_map"
    mode: Direction = Direction.max
    patience: int = 5
    min_delta: float = 0.0


@dataclass
class EmaSchema:
    enabled: bool = False
    decay: float = 0.999
    update_every_n_steps: int = 1
    update_starting_at_step: int | None = None


@dataclass
class CallbacksSchema:
    checkpoint: CheckpointSchema = field(default_factory=CheckpointSchema)
    progress_bar: ProgressBar = ProgressBar.rich
    panels: PanelsSchema = field(default_factory=PanelsSchema)
    early_stopping: EarlyStoppingSchema = field(default_factory=EarlyStoppingSchema)
    ema: EmaSchema = field(default_factory=EmaSchema)
    # {name: {_target_: <class path>, <its arguments>}}: more Lightning callbacks, instantiated by Hydra; each
    # target and its keys are checked at compose time (`ranprm.cli.targets.check_targets`)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class BackboneOverridesSchema:
    mask_grad: str | None = None  # RAN: full | detached; null: as trained


@dataclass
class CalibrationSchema:
    split: str | None = None
    task: str = "Main"
    max_images: int | None = None


class OnBadImage(StrEnum):
    skip = "skip"
    stop = "stop"


@dataclass
class InferenceTrainerSchema:
    """`trainer.*` of evaluate and predict: where the model runs (null: from `device`). The strategy's values are
    checked by `ranprm.cli.inference`, which refuses the ones whose results stay in their processes."""

    accelerator: str | None = None
    devices: Any = None  # N | [i, j] | -1 | auto
    strategy: str = "auto"
    num_nodes: int = 1


# --------------------------------------------------------------------------------------------- entry points
@dataclass
class TrainSchema:
    """`python -m ranprm.train`'s config (conf/train.yaml documents each key)."""

    task_name: str = "train"
    seed: int = 42
    tags: list[str] = field(default_factory=list)
    print_config: bool = True
    resume: str | None = None
    ckpt_path: str | None = None
    overwrite: bool = False
    channels_last: bool = True
    compile: bool = False
    optimized_metric: str | None = "val/cls_map"
    data: DataSchema = field(default_factory=DataSchema)
    backbone: Any = None
    threshold: Any = None
    optimizer: OptimizerSchema = field(default_factory=OptimizerSchema)
    retrieval: Any = None
    trainer: TrainerSchema = field(default_factory=TrainerSchema)
    logger: Any = None
    callbacks: CallbacksSchema = field(default_factory=CallbacksSchema)
    paths: Any = None
    head: HeadSchema = field(default_factory=HeadSchema)
    prm: PrmSchema = field(default_factory=PrmSchema)
    eval: TrainEvalSchema = field(default_factory=TrainEvalSchema)


@dataclass
class EvaluateSchema:
    """`python -m ranprm.evaluate`'s config (conf/evaluate.yaml documents each key)."""

    task_name: str = "evaluate"
    tags: list[str] = field(default_factory=list)
    ckpt: str | None = None
    predictions: str | None = None
    output: str | None = None
    overwrite: bool = False
    records: bool = False
    device: str = "auto"
    trainer: InferenceTrainerSchema = field(default_factory=InferenceTrainerSchema)
    progress_bar: ProgressBar = ProgressBar.tqdm
    data: EvaluateDataSchema = field(default_factory=EvaluateDataSchema)  # type: ignore[valid-type]
    threshold: Any = None
    retrieval: Any = None
    variants: Any = None  # a product mapping or a list of mappings (ranprm.cli.variants)
    variants_rank_by: str = "map_r_50"
    logger: Any = None
    paths: Any = None
    prm: PrmOverrides = field(default_factory=PrmOverrides)
    backbone_overrides: BackboneOverridesSchema = field(default_factory=BackboneOverridesSchema)
    calibration: CalibrationSchema = field(default_factory=CalibrationSchema)
    eval: EvaluateEvalSchema = field(default_factory=EvaluateEvalSchema)


@dataclass
class PredictSchema:
    """`python -m ranprm.predict`'s config (conf/predict.yaml documents each key)."""

    ckpt: str = MISSING
    input: str = MISSING
    output: str = MISSING
    overwrite: bool = False
    on_bad_image: OnBadImage = OnBadImage.skip
    display_score: float = 0.1
    image_size: int | None = None
    device: str = "auto"
    trainer: InferenceTrainerSchema = field(default_factory=InferenceTrainerSchema)
    progress_bar: ProgressBar = ProgressBar.tqdm
    batch_size: int = 1
    num_workers: int = 0
    coco_annotations: str | None = None
    threshold: Any = None
    retrieval: Any = None
    prm: PrmOverrides = field(default_factory=PrmOverrides)
    backbone_overrides: BackboneOverridesSchema = field(default_factory=BackboneOverridesSchema)


SCHEMAS: dict[str, type] = {"train": TrainSchema, "evaluate": EvaluateSchema, "predict": PredictSchema}


def schema_name(config_name: str) -> str:
    """The ConfigStore name of an entry point's schema, as its YAML's defaults list names it."""
    return f"ranprm_{config_name}_schema"


def register_schemas() -> None:
    """Store every entry point's schema in Hydra's ConfigStore, its open sections open to new keys."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    store = ConfigStore.instance()
    for config_name, schema in SCHEMAS.items():
        node = OmegaConf.structured(schema)
        OmegaConf.set_readonly(node, False)  # a frozen dataclass's defaults must still take overrides
        for section in OPEN_SECTIONS:
            if section in node:
                OmegaConf.set_struct(node[section], False)
        store.store(name=schema_name(config_name), node=node)
