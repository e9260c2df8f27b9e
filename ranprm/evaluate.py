"""`python -m ranprm.evaluate (ckpt=PATH | predictions=FILE) [data=...]` (also `ranprm-evaluate`).

Scores instances on the data's validation split (VOC: `ImageSets/Segmentation/val.txt`; COCO:
`annotations/instances_<data.val_split>.json`, val2017 by default; the synthetic data's own) with the evaluators
of `eval.metrics` under `eval.protocol` (default `voc`, chainercv's): mAP^r at IoU 0.25/0.5/0.75, ABO, and, where
a model ran, pointing accuracy (ours), the pointing game's mAP (PRM's) and classification mAP.

- `ckpt=PATH` runs the model (its threshold/retrieval/prm settings unless given here, as in `ranprm-predict`;
  network input side: the checkpoint's training size unless `data.image_size` is given, logged and recorded).
- `variants=...` (with `ckpt`): many inference variants (threshold x retrieval x mask_grad, `ranprm.cli.variants`)
  from one pass: one forward, one PRM backward per peak and gradient path for the union of their peaks; writes
  `metrics.json` with one entry per variant and `variants.md` / `variants.csv` ranked by `variants_rank_by`.
- `calibration.split=<split>` (with `ckpt`): recompute the per-class calibration that
  `threshold.class_distribution: dataset` (threshold=class_q3) uses, on ImageSets/<calibration.task>/<split>.txt.
- `predictions=FILE` scores a COCO-style results file as `ranprm-predict` writes it; no model runs. Pointing is
  reported only when the entries carry a `peak`. On `data=coco` the file uses COCO's int image ids and category ids.

The model runs under Lightning's `Trainer.test` (the module's `test_step` feeds the evaluators; they gather every
process's per-image records, one per image id), so `device=` (one device) or `trainer.devices=N`
(`trainer.accelerator`, `trainer.strategy=ddp`: one process per device) and a progress bar with the time left
(`progress_bar=tqdm|rich|none`, also over the images of `predictions=FILE`) come from Lightning. Every process
computes the same full-set metrics; the first writes them.

Writes `metrics.json` (with the protocol and the metric names) and `per_class.md` (with `variants=`: `variants.md` and
`variants.csv` instead) into `output` (default: a new Hydra run folder; a given `output` is the Hydra run folder itself,
holding `evaluate.log` and `.hydra/` too, so nothing is made under `./outputs`) and prints a summary; `records=true`
also writes `records.pt`, every evaluator's per-image records (`EvaluatorSuite.image_records`, per variant with
`variants=`; no masks), from which a bootstrap over images recomputes each metric with the evaluator's own `reduce`. An
existing `metrics.json`, `per_class.md`, `variants.md`, `variants.csv` or `records.pt` there is replaced only with
`overwrite=true`; the folder is checked writable, and the evaluated split's masks are checked from their headers, before
the model runs.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from ranprm.cli.build import run_identity_of
from ranprm.cli.config import hydra_main, report_user_errors, to_plain
from ranprm.cli.inference import (
    answering_signals,
    build_inference_trainer,
    inference_settings,
    inference_trainer_arguments,
    load_for_inference,
    root_device,
)
from ranprm.cli.run_dir import check_output_files, commit_hydra_files, hold_folder
from ranprm.cli.variants import VariantSpec, parse_variants, variant_config
from ranprm.data.datamodule import DataConfig, VOCDataModule, split_name
from ranprm.data.dataset import VOCDataset, collate
from ranprm.data.transforms import build_transform
from ranprm.data.voc import image_size_of
from ranprm.errors import ConfigError, DataError
from ranprm.eval import (
    EvalConfig,
    EvaluatorSuite,
    SuiteResult,
    ground_truth,
    per_class_table,
    prediction_from_instances,
    read_results,
    summary,
)
from ranprm.eval.report import rank_variants, variants_markdown, variants_rows
from ranprm.lightning.loggers import log_evaluation
from ranprm.lightning.module import PRMModule
from ranprm.prm.pipeline import InferenceConfig
from ranprm.prm.thresholds import ClassCalibration
from ranprm.utils.checks import check_range, check_value
from ranprm.utils.io import (
    check_writable,
    clean_stale_temp_files,
    write_json_atomic,
    write_text_atomic,
    write_via_temp,
)
from ranprm.utils.progress import track
from ranprm.utils.stop import check_stop

log = logging.getLogger(__name__)

# One variant of a `variants=` evaluation: what it was asked as, its full settings, its metrics, its evaluators.
VariantResult = tuple[VariantSpec, dict[str, Any], SuiteResult, EvaluatorSuite]

OUTPUT_FILES = ("metrics.json", "per_class.md", "variants.md", "variants.csv", "records.pt")
DEFAULT_IMAGE_SIZE = 448
EXAMPLE = "ranprm-evaluate ckpt=runs/<run>/checkpoints/last.ckpt data=voc data.root=/data/VOCdevkit/VOC2012"


def prepare_output(out_dir: Path, cfg: DictConfig, option: str = "output") -> Path:
    """Refuse to replace an earlier evaluation's files without `overwrite=true`; check the folder is writable;
    remove the temp files a killed write left there. All before any data is read or any model runs. `option`
    names the setting that chose the folder, for the messages."""
    overwrite = check_value(cfg.get("overwrite", False), bool, "overwrite")
    check_output_files([out_dir / name for name in OUTPUT_FILES], overwrite, f"{option}={out_dir}")
    check_writable(out_dir, option)
    clean_stale_temp_files(out_dir)
    return out_dir


def _cap(ids: list[str], max_images: Any) -> list[str]:
    if check_value(max_images, int | None, "eval.max_images") is None:
        return ids
    if int(max_images) < 1:
        raise ConfigError(f"eval.max_images={max_images} must be at least 1 (or null for the whole split)")
    return ids[: int(max_images)]


# --------------------------------------------------------------------------------------------- class calibration
def calibrate_classes(
    cfg: DictConfig, module: PRMModule, datamodule: VOCDataModule, needed_by: list[str] | None = None
) -> None:
    """`calibration.split=<split>`: recompute the class calibration of `threshold.class_distribution: dataset`
    on ImageSets/<calibration.task>/<split>.txt (the class-test scores of those images) and give it to `module`.

    Without a split the checkpoint's own calibration is used; a threshold that needs one when the checkpoint has
    none is a one-line error here, before any image is evaluated. `needed_by`: with `variants=`, the names of the
    variants whose threshold takes one; None: the module's own threshold decides.
    """
    calibration = cfg.get("calibration") or {}
    split = calibration.get("split")
    if needed_by is None:
        own = module.inference_config().thresholds.class_distribution == "dataset"
        needed_by = [f"threshold={module.hparams['threshold'].get('name')}"] if own else []
    if split is None:
        if needed_by and module.class_calibration is None:
            raise ConfigError(
                f"{', '.join(needed_by)} needs a class calibration and ckpt={cfg.ckpt} has none; name a split to "
                "compute it on, e.g. calibration.split=train"
            )
        return
    if not needed_by:
        log.warning("calibration.split=%s is ignored: no threshold here takes a class calibration", split)
        return
    task = str(calibration.get("task") or "Main")
    evaluated_ids = set(datamodule.split_ids()[1])
    ids = _cap(datamodule.source.split_ids(str(split), task, training=False), calibration.get("max_images"))
    evaluated = set(ids) & evaluated_ids
    dataset = VOCDataset(datamodule.root, ids, datamodule.class_names,
                         build_transform(datamodule.cfg.image_size, train=False),
                         skip_bad_images=datamodule.cfg.skip_bad_images, source=datamodule.source)  # fmt: skip
    loader = DataLoader(dataset, batch_size=datamodule.cfg.val_batch_size or datamodule.cfg.batch_size,
                        num_workers=datamodule.cfg.num_workers, collate_fn=collate)  # fmt: skip
    scores = module.calibration_scores(track(loader, len(loader), "calibrating", _progress_bar(cfg), "batch"))
    if len(scores) == 0:
        raise DataError(f"calibration.split={split}: none of its {len(ids)} images could be read")
    name = split_name(datamodule.cfg, str(split), task)
    name += f" (first {len(ids)})" if calibration.get("max_images") is not None else ""
    module.set_class_calibration(ClassCalibration(scores, name, evaluated_split=bool(evaluated)))
    if evaluated:
        log.warning("calibration.split=%s shares %d images with the evaluated split", name, len(evaluated))


# ---------------------------------------------------------------------------------------------- evaluation
def _evaluate_checkpoint(
    cfg: DictConfig,
    datamodule: VOCDataModule,
    evaluators: EvaluatorSuite,
    out_dir: Path,
    specs: list[VariantSpec] | None = None,
) -> tuple[list[VariantResult] | SuiteResult, dict[str, Any], bool]:
    """The model on the evaluated images through `Trainer.test` (devices, DDP, a progress bar); returns the result
    (with `variants=`: one (spec, settings, result, suite) per variant, all from one pass), the run's record fields, and
    whether this process writes the files (the first process does)."""
    _, val_ids = datamodule.split_ids()
    ids = _cap(val_ids, cfg.eval.max_images)
    datamodule.check_val_masks(ids)  # a bad mask is one line now, not after the model ran on the images before it
    trainer = build_inference_trainer(cfg, out_dir, progress_bar=_progress_bar(cfg))
    module = load_for_inference(cfg, root_device(trainer), datamodule.class_names)
    size_info = _use_image_size(cfg, module, datamodule)
    variants = _variant_configs(module, specs) if specs else None
    needed_by = None
    if variants:
        needed_by = [f"variant {s.name}" for s, c, _ in variants if c.thresholds.class_distribution == "dataset"]
    calibrate_classes(cfg, module, datamodule, needed_by)
    if variants:  # re-parsed after the calibration: the per-class cut-offs come from it
        variants = _variant_configs(module, specs)
    settings = inference_settings(module)
    # One image per step: the progress bar counts images, and the PRMs held at once are one image's (for every
    # variant); the per-peak backward, not the batched forward, is what an evaluation spends its time on.
    datamodule.cfg.val_batch_size = 1
    # Only the evaluated images are read (setup() would read every training annotation too).
    datamodule.val_set = datamodule._dataset(ids, train=False)
    if variants:
        module.test_variants = [(c, EvaluatorSuite(evaluators.class_names, _protocol_config(evaluators.cfg, spec)))
                                for spec, c, _ in variants]  # fmt: skip
    else:
        module.test_evaluators = evaluators
    with warnings.catch_warnings():
        # Lightning warns that a DistributedSampler repeats images to even the shares; the evaluators keep one
        # record per image id, so a repeated image counts once.
        warnings.filterwarnings("ignore", message=r"Using `DistributedSampler` with the dataloaders")
        trainer.test(module, dataloaders=datamodule.val_dataloader(), verbose=False)
    assert module.test_result is not None  # on_test_epoch_end ran on every process
    # Unreadable images and images without segmentation are not scored (counted once each, whatever the sampler).
    skipped = len(ids) - module.test_images_evaluated
    info = {"mode": "ckpt", "ckpt": str(cfg.ckpt), "skipped_images": skipped, **size_info}
    if not variants:
        return module.test_result, {**info, **settings}, trainer.is_global_zero
    per_variant = [(spec, s, r, suite) for (spec, _, s), r, (_, suite)
                   in zip(variants, module.test_results, module.test_variants, strict=True)]  # fmt: skip
    return per_variant, info, trainer.is_global_zero


def _variant_configs(
    module: PRMModule, specs: list[VariantSpec]
) -> list[tuple[VariantSpec, InferenceConfig, dict[str, Any]]]:
    """(spec, its InferenceConfig, its settings) per variant; variants that differ only in `protocol` get the same
    InferenceConfig object, which the module's test step predicts once for all of them."""
    made: dict[str, tuple[InferenceConfig, dict[str, Any]]] = {}
    for spec in specs:
        made.setdefault(spec.inference_key(), variant_config(module, spec))
    return [(spec, *made[spec.inference_key()]) for spec in specs]


def _protocol_config(cfg: EvalConfig, spec: VariantSpec) -> EvalConfig:
    return dataclasses.replace(cfg, protocol=spec.protocol) if spec.protocol else cfg


def _use_image_size(cfg: DictConfig, module: PRMModule, datamodule: VOCDataModule) -> dict[str, Any]:
    """The network input side: `data.image_size` when given, else the checkpoint's training size (else 448); set on
    the data, logged, and returned for metrics.json."""
    given = cfg.data.get("image_size")
    trained = module.hparams.get("image_size")
    if given is not None:
        size, source = int(given), "data.image_size"
        if trained is not None and int(trained) != size:
            log.warning("evaluating at data.image_size=%d px; ckpt was trained at %d px", size, int(trained))
    elif trained is not None:
        size, source = int(trained), "checkpoint"
    else:
        size, source = DEFAULT_IMAGE_SIZE, "default"
        log.warning("ckpt records no training image size; evaluating at %d px (set data.image_size= to change)", size)
    check_range(size, "data.image_size", low=1)
    datamodule.cfg.image_size = size
    log.info("evaluating at %d x %d px (%s)", size, size, source)
    return {"image_size": size, "image_size_from": source}


def _evaluate_predictions(
    cfg: DictConfig, datamodule: VOCDataModule, evaluators: EvaluatorSuite
) -> tuple[SuiteResult, dict[str, Any], bool]:
    source = datamodule.source
    _, val_ids = datamodule.split_ids()
    ids = _cap(val_ids, cfg.eval.max_images)
    datamodule.check_val_masks(ids)
    sizes = {i: image_size_of(source.image_path(i)) for i in ids}
    results = read_results(Path(cfg.predictions).expanduser(), datamodule.class_names, sizes, source.result_ids())
    skipped = 0
    for image_id, entries in track(results.items(), len(results), "evaluating", _progress_bar(cfg), "image"):
        check_stop()
        targets = source.instance_targets(image_id, sizes[image_id])
        if targets is None:
            skipped += 1
            continue
        objects = source.objects(image_id)
        gt = ground_truth(image_id, sizes[image_id], datamodule.class_names, targets=targets, objects=objects)
        evaluators.update([gt], [prediction_from_instances(entries.to_instances())])
    info = {"mode": "predictions", "predictions": str(cfg.predictions), "skipped_images": skipped}
    return evaluators.compute(), info, True


def _progress_bar(cfg: DictConfig) -> str:
    return str(cfg.get("progress_bar", "tqdm"))  # its choices are checked at compose time (ranprm.cli.schema)


def evaluate(cfg: DictConfig, output: str | Path | None = None) -> dict[str, Any]:
    """Evaluate, write `metrics.json` and `per_class.md` into `output` (else `cfg.output`), return the metrics.

    Under several processes (`trainer.devices=N`) every process computes the same full-set metrics and returns
    them; the first one writes the files, prints the summary and logs.
    """
    started = time.perf_counter()
    if (cfg.get("ckpt") is None) == (cfg.get("predictions") is None):
        raise ConfigError(
            "give exactly one of ckpt=PATH (run a model) and predictions=FILE (score a results file)"
            + ("; both were given" if cfg.get("ckpt") is not None else f", e.g. {EXAMPLE}")
        )
    eval_cfg = EvalConfig.from_config(to_plain(cfg.eval))  # a bad eval.* key fails before anything is written
    specs = parse_variants(to_plain(cfg.get("variants")))  # so does a bad variant
    if specs is not None and cfg.get("predictions") is not None:
        raise ConfigError("variants= needs ckpt=PATH (a results file holds one variant's instances already)")
    _progress_bar(cfg)
    if cfg.get("ckpt") is not None:
        inference_trainer_arguments(cfg)  # a bad device= or trainer.* value too
    elif any(v is not None for v in (to_plain(cfg.get("trainer")) or {}).values() if v not in ("auto", 1)):
        log.warning("trainer.* is ignored with predictions=FILE: no model runs, the file is scored in this process")
    in_run_folder = output is None and cfg.get("output") is None
    out_dir = Path(output or cfg.get("output") or cfg.paths.output_dir).expanduser()
    with hold_folder(out_dir, "hydra.run.dir" if in_run_folder else "output"), answering_signals():
        return _evaluate_into(cfg, eval_cfg, specs, out_dir, in_run_folder, started)


def _evaluate_into(
    cfg: DictConfig,
    eval_cfg: EvalConfig,
    specs: list[VariantSpec] | None,
    out_dir: Path,
    in_run_folder: bool,
    started: float,
) -> dict[str, Any]:
    prepare_output(out_dir, cfg, "hydra.run.dir" if in_run_folder else "output")
    # This evaluation's record goes with its results: Hydra runs in `output` when it is given (conf/hydra); a no-op
    # when out_dir is not the Hydra job's folder (an `evaluate(cfg, output=...)` call).
    commit_hydra_files(out_dir)
    data_cfg = dict(to_plain(cfg.data))
    if data_cfg.get("image_size") is None:  # ckpt mode: the checkpoint's size, set once it is loaded
        data_cfg["image_size"] = DEFAULT_IMAGE_SIZE
    if cfg.get("predictions") is not None:
        data_cfg["num_workers"] = 0
    datamodule = VOCDataModule(DataConfig.from_config(data_cfg))
    evaluators = EvaluatorSuite(datamodule.class_names, eval_cfg)
    rank_by = _rank_by(cfg, evaluators, specs)
    if cfg.get("ckpt") is not None:
        result, info, writes = _evaluate_checkpoint(cfg, datamodule, evaluators, out_dir, specs)
    else:
        result, info, writes = _evaluate_predictions(cfg, datamodule, evaluators)
    common = {
        "data": datamodule.cfg.name,
        "split": split_name(datamodule.cfg, datamodule.cfg.val_split, datamodule.cfg.val_task),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    if isinstance(result, list):
        if writes:
            _save_records(cfg, out_dir, lambda: {spec.name: suite.image_records() for spec, _, _, suite in result})
        return _write_variants(cfg, out_dir, result, {**info, **common}, rank_by, eval_cfg.protocol, writes)
    record = {**result.to_record(), **info, **common}
    if not writes:
        return record
    _save_records(cfg, out_dir, evaluators.image_records)
    write_json_atomic(out_dir / "metrics.json", record)
    write_text_atomic(out_dir / "per_class.md", per_class_table(result))
    print(summary(result))
    print(f"wrote {out_dir / 'metrics.json'} and {out_dir / 'per_class.md'}")
    if to_plain(cfg.logger):  # logger=wandb (or csv, tensorboard, several): the metrics and per-class table there too
        log_evaluation(to_plain(cfg.logger), out_dir, record, run_config=cfg, identity=run_identity_of(cfg))
    return record


def _save_records(cfg: DictConfig, out_dir: Path, records: Callable[[], dict[str, Any]]) -> None:
    """`records=true`: records.pt, every evaluator's per-image records (`EvaluatorSuite.image_records`; with
    `variants=`, {variant name: those}), written before metrics.json, which marks a finished evaluation. Else an
    earlier evaluation's records.pt there (overwrite=true got here) is removed: it would not match these metrics."""
    if check_value(cfg.get("records", False), bool, "records"):
        write_via_temp(out_dir / "records.pt", lambda tmp: torch.save(records(), tmp))
    else:
        (out_dir / "records.pt").unlink(missing_ok=True)


def _rank_by(cfg: DictConfig, evaluators: EvaluatorSuite, specs: list[VariantSpec] | None) -> str:
    """`variants_rank_by`, checked against the metrics every variant's protocol computes (before anything runs)."""
    rank_by = str(cfg.get("variants_rank_by") or "map_r_50")
    if not specs:
        return rank_by
    suites = [EvaluatorSuite(evaluators.class_names, _protocol_config(evaluators.cfg, s)) for s in specs]
    common = [n for n in evaluators.names() if all(n in suite.names() for suite in suites)]
    if rank_by not in common:
        raise ConfigError(f"variants_rank_by={rank_by} is not a metric of this evaluation; choose one of {common}")
    return rank_by


def _write_variants(
    cfg: DictConfig,
    out_dir: Path,
    results: list[VariantResult],
    info: dict[str, Any],
    rank_by: str,
    protocol: str,
    writes: bool,
) -> dict[str, Any]:
    """metrics.json with one entry per variant, ranked by `rank_by` within each protocol (README "Inference
    variants"), and the table as variants.md / variants.csv (and to the logger). `protocol` is `eval.protocol`, the
    one variants that name none use; each entry names its own."""
    entries = []
    for spec, settings, result, _ in results:
        record = result.to_record()
        entries.append({
            "name": spec.name,
            "protocol": result.protocol,
            "settings": settings,
            "metrics": result.metrics,
            "counts": result.counts,
            "summary": summary(result),
            "per_class": record["per_class"],
        })  # fmt: skip
    ranked = []
    for scored_by in dict.fromkeys(e["protocol"] for e in entries):  # in the order the variants first name them
        group = [e for e in entries if e["protocol"] == scored_by]
        order = rank_variants([e["metrics"] for e in group], rank_by)
        ranked += [{"rank": position + 1, **group[i]} for position, i in enumerate(order)]
    metric_names = list(dict.fromkeys(name for _, _, result, _ in results for name in result.metrics))
    record = {
        "ranked_by": rank_by,
        "protocol": protocol,
        "metric_names": metric_names,
        "variants": ranked,
        **info,
    }
    if not writes:
        return record
    columns, rows = variants_rows(ranked, metric_names)
    write_json_atomic(out_dir / "metrics.json", record)
    write_text_atomic(out_dir / "variants.md", variants_markdown(columns, rows, rank_by))
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows([columns, *rows])
    write_text_atomic(out_dir / "variants.csv", buffer.getvalue())
    for entry in ranked:
        print(f"{entry['rank']:>3}. {entry['name']}: {entry['summary']}")
    print(f"wrote {out_dir / 'metrics.json'}, {out_dir / 'variants.md'} and {out_dir / 'variants.csv'}")
    if to_plain(cfg.logger):
        scalars = {f"{e['name']}/{k}": v for e in ranked for k, v in e["metrics"].items()}
        log_evaluation(to_plain(cfg.logger), out_dir, {**scalars, "image_size": info.get("image_size")},
                       run_config=cfg, identity=run_identity_of(cfg), tables={"variants": (columns, rows)})  # fmt: skip
    return record


@hydra_main("evaluate")
@report_user_errors
def main(cfg: DictConfig) -> None:
    from ranprm.cli.sweep import run_job

    run_job(evaluate, cfg)


if __name__ == "__main__":
    main()
