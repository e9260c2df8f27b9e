"""The LightningModule: wires the network, peak stimulation, loss, optimiser and validation metrics.

`ranprm-evaluate` runs it under `Trainer.test` (`test_step`: instances into the evaluators it is given) and
`ranprm-predict` under `Trainer.predict` (`predict_step`: instances for a prediction writer). It holds no algorithm
of its own: peaks and scores come from `ranprm.prm.peaks`, instance inference from
`ranprm.prm.pipeline`, metrics from the evaluators of `ranprm.eval` (named by `eval.metrics`, protocol
`eval.protocol`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ranprm.data.datamodule import validation_split
from ranprm.errors import ConfigError, RanprmError
from ranprm.eval import EvalConfig, EvaluatorSuite, SuiteResult, eval_inputs, summary
from ranprm.eval.base import gather_records
from ranprm.lightning.callbacks import due_this_epoch
from ranprm.lightning.schedule import CosineToZero
from ranprm.models.prm_net import PRMNet
from ranprm.prm.peaks import PeakHead
from ranprm.prm.pipeline import ImagePrediction, InferenceConfig, predict_variants
from ranprm.prm.thresholds import ClassCalibration

log = logging.getLogger(__name__)

# The checkpoint key holding the class calibration (`threshold.class_distribution: dataset`).
CALIBRATION_KEY = "class_calibration"

# Runs every validation epoch on every validation image: `val/cls_map` selects checkpoints and is what sweeps optimise.
CLASSIFICATION = "classification"


class NonFiniteLossError(RanprmError):
    """Training produced a NaN or infinite loss."""


def _loggable(value: float | None) -> float:
    """A metric for Lightning's log: an undefined one (None, e.g. mAP^r with no GT instance) is NaN, never 0.0;
    checkpointing on it then keeps the best defined epoch (ModelCheckpoint ranks NaN last)."""
    return float("nan") if value is None else float(value)


class PRMModule(L.LightningModule):
    def __init__(
        self,
        class_names: list[str],
        backbone: dict[str, Any],
        head: dict[str, Any],
        optimizer: dict[str, Any],
        threshold: dict[str, Any] | None = None,
        prm: dict[str, Any] | None = None,
        retrieval: dict[str, Any] | None = None,
        eval: dict[str, Any] | None = None,  # noqa: A002  (the config group's name)
        image_size: int | None = None,  # the training input size, so predict can use the same one
        channels_last: bool = False,  # NHWC weights and inputs (faster convolutions); results are unchanged
        compile: bool = False,  # noqa: A002  torch.compile the network for the training/validation forward
    ) -> None:
        super().__init__()
        # Everything needed to rebuild the model from a checkpoint alone (ranprm-predict / ranprm-evaluate).
        self.save_hyperparameters()
        self.class_names = list(class_names)
        self.model = PRMNet.from_config(backbone, len(class_names))
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        # Later .to(device) and load_state_dict keep this layout, so checkpoints need no conversion.
        self.model.to(memory_format=self.memory_format)
        # The compiled wrapper shares the network's parameters. It lives in a plain dict, not as a submodule, so
        # checkpoints keep the network's own keys, and peak backprop (which patches convolutions) keeps using the
        # eager network.
        self._compiled: dict[str, nn.Module] = {"model": torch.compile(self.model)} if compile else {}
        self.peak_head = PeakHead.from_config(head)  # parsed once: the training score and the class test
        # Inference settings are parsed once into `_inference` and re-parsed only when they change
        # (`configure_inference`, `set_class_calibration`).
        self._inference: InferenceConfig | None = None
        self.class_calibration: ClassCalibration | None = None
        self._peaks_over_cap = 0
        self.loss_fn = nn.MultiLabelSoftMarginLoss()
        # Built by `setup` (fit/validate), so a checkpoint loaded for predict or evaluate never needs the metric
        # plugins its training run used.
        self.eval_config: EvalConfig | None = None
        self.classification = EvaluatorSuite(self.class_names, only=[])
        self.evaluators = EvaluatorSuite(self.class_names, only=[])
        self.last_instance_metrics: dict[str, Any] = {}
        self._instance_images_seen = 0
        # `ranprm-evaluate` (Trainer.test): its evaluators, the images they scored and, after the pass, the result.
        self.test_evaluators: EvaluatorSuite | None = None
        # `ranprm-evaluate variants=...`: (settings, evaluators) per variant, all from one pass; None: the module's
        # own settings into `test_evaluators`.
        self.test_variants: list[tuple[InferenceConfig, EvaluatorSuite]] | None = None
        self.test_results: list[SuiteResult] = []
        self._test_image_ids: list[str] = []
        self.test_result: SuiteResult | None = None
        self.test_images_evaluated = 0

    def setup(self, stage: str) -> None:
        if stage in ("fit", "validate"):
            self.build_evaluators()

    def build_evaluators(self) -> None:
        """The evaluators of `eval.metrics` (a bad `eval.*` key fails here, before any epoch): classification runs
        every validation epoch on every image; the others on the instance-evaluation epochs (PRM backprop)."""
        self.eval_config = EvalConfig.from_config(self.hparams.eval)
        self.classification = EvaluatorSuite(self.class_names, self.eval_config, only=[CLASSIFICATION])
        instance_metrics = [m for m in self.eval_config.metrics if m != CLASSIFICATION]
        self.evaluators = EvaluatorSuite(self.class_names, self.eval_config, only=instance_metrics)

    def forward(self, images: Tensor) -> Tensor:
        """Class response maps (B, C, h, w)."""
        network = self._compiled.get("model", self.model)
        return network(images.contiguous(memory_format=self.memory_format))

    def class_logits(self, crms: Tensor) -> Tensor:
        """The training score (B, C): peak stimulation at the training sub-pixel factor (`head`)."""
        return self.peak_head.scores(crms)

    # ------------------------------------------------------------------------------------- inference settings
    def inference_config(self) -> InferenceConfig:
        """The parsed inference settings (threshold, head, prm, retrieval, calibration), built once."""
        if self._inference is None:
            hp = self.hparams
            self._inference = InferenceConfig.from_config(
                hp.threshold, hp.head, hp.prm, hp.retrieval, self.class_calibration
            )
        return self._inference

    def configure_inference(
        self,
        threshold: Mapping[str, Any] | None = None,
        retrieval: Mapping[str, Any] | None = None,
        prm: Mapping[str, Any] | None = None,
    ) -> InferenceConfig:
        """Replace the inference settings that are given (predict/evaluate overrides) and parse them once.

        `threshold` and `retrieval` replace the whole group; `prm` replaces the keys it holds. A bad setting
        raises before anything changes, so the module keeps its old settings.
        """
        hp = self.hparams
        new = {
            "threshold": dict(threshold) if threshold is not None else hp.get("threshold"),
            "retrieval": dict(retrieval) if retrieval is not None else hp.get("retrieval"),
            "prm": {**dict(hp.get("prm") or {}), **dict(prm or {})},
        }
        parsed = InferenceConfig.from_config(new["threshold"], hp.head, new["prm"], new["retrieval"],
                                             self.class_calibration)  # fmt: skip
        for key, value in new.items():
            hp[key] = value
        self._inference = parsed
        return parsed

    def set_class_calibration(self, calibration: ClassCalibration | None) -> None:
        """Use `calibration` for `threshold.class_distribution: dataset` (stored in the next checkpoint)."""
        self.class_calibration = calibration
        self._inference = None

    def inference_class_scores(self, crms: Tensor) -> Tensor:
        """The class test's scores (B, C): the peak head at the inference factor (`prm.class_sub_pixel_factor`)."""
        return self.inference_config().class_scores(crms)

    @torch.no_grad()
    def calibration_scores(self, batches: Iterable[dict[str, Any]]) -> Tensor:
        """(N, C) class-test scores of every image in `batches` (collated, with `image`), as inference computes
        them: eval mode, fp32, the eager network. The module's mode is left as it was found."""
        was_training = self.training
        self.eval()
        rows = []
        try:
            with torch.autocast(device_type=self.device.type, enabled=False):
                for batch in batches:
                    if "image" not in batch:
                        continue  # every image of the batch was skipped as unreadable
                    images = batch["image"].to(self.device).float().contiguous(memory_format=self.memory_format)
                    rows.append(self.inference_class_scores(self.model(images).float()).cpu())
        finally:
            self.train(was_training)
        return torch.cat(rows) if rows else torch.zeros(0, len(self.class_names))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.class_calibration is not None:
            checkpoint[CALIBRATION_KEY] = self.class_calibration.to_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        record = checkpoint.get(CALIBRATION_KEY)
        self.set_class_calibration(ClassCalibration.from_dict(record) if record else None)

    def predict_images(
        self,
        images: Tensor,
        orig_sizes: list[tuple[int, int]],
        raw_images: list[Any] | None = None,
        stage_times: dict[str, float] | None = None,
        with_attention: bool = False,
        prm_dtype: torch.dtype | None = None,
        with_prms: bool = False,
    ) -> list[ImagePrediction]:
        """Instances at the original sizes for network inputs `images (B, 3, S, S)`; see `ranprm.prm.pipeline`.

        Runs in eval mode and leaves the module in the mode it found it in. `prm_dtype` replaces
        `prm.precision` for this call (the panels backpropagate in bf16); `with_prms` keeps each valid peak's PRM
        (the panels show them).
        """
        cfg = self.inference_config()
        if prm_dtype is not None:
            cfg = dataclasses.replace(cfg, prm_dtype=prm_dtype)
        return self.predict_variants(images, orig_sizes, [cfg], raw_images, stage_times, with_attention, with_prms)[0]

    def predict_variants(
        self,
        images: Tensor,
        orig_sizes: list[tuple[int, int]],
        variants: Sequence[InferenceConfig],
        raw_images: list[Any] | None = None,
        stage_times: dict[str, float] | None = None,
        with_attention: bool = False,
        with_prms: bool = False,
    ) -> list[list[ImagePrediction]]:
        """`predict_images` under several inference settings at once (`ranprm.prm.pipeline.predict_variants`: one
        forward, one backward per peak and gradient path): `out[v][b]`."""
        was_training = self.training
        self.eval()
        try:
            # Autocast is off even inside a bf16-mixed validation step: PRM's custom backward would mix bf16
            # activations with fp32 weights, and instance maps should not depend on the training precision. A
            # bf16 backprop is asked for explicitly (`prm.precision`), and then runs on bf16 weights throughout.
            with torch.autocast(device_type=images.device.type, enabled=False):
                return predict_variants(
                    self.model,
                    images.float().contiguous(memory_format=self.memory_format),
                    orig_sizes,
                    variants,
                    raw_images,
                    stage_times,
                    with_attention,
                    with_prms,
                )
        finally:
            self.train(was_training)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        if "image" not in batch:
            return None  # every image of this batch was skipped as unreadable
        logits = self.class_logits(self(batch["image"]))
        loss = self.loss_fn(logits, batch["labels"])
        # One device->host sync per step is the price of never training on from a NaN: the run stops with the
        # step and images named, and the last checkpoint written before it stays the last good one.
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"loss is {loss.item()} at global step {self.global_step} (batch {batch_idx}, images "
                f"{batch['image_id'][:4]}...); lower optimizer.lr or check the data; the last good checkpoint is kept"
            )
        self.log("train/loss", loss, prog_bar=True, batch_size=len(logits))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if "image" not in batch:
            return
        crms = self(batch["image"])
        logits = self.class_logits(crms)
        self.log("val/loss", self.loss_fn(logits, batch["labels"]), prog_bar=True, batch_size=len(logits))
        if self.eval_config is None:  # validation outside trainer.fit/validate, which call `setup`
            self.build_evaluators()
        # `cls_map` ranks the class test's scores (`prm.class_sub_pixel_factor`), the scores inference selects
        # classes with and `ranprm-evaluate` reports: one definition. The loss keeps the training score.
        class_scores = self.inference_class_scores(crms.float())
        self.classification.update(*eval_inputs(batch, self.class_names, class_logits=class_scores))
        if self._instance_eval_this_epoch():
            self._update_instance_metrics(batch)

    def on_validation_epoch_start(self) -> None:
        if self.trainer.sanity_checking:
            return
        dataset_rule = self.inference_config().thresholds.class_distribution == "dataset"
        if dataset_rule or self._instance_eval_this_epoch():
            self._calibrate_on_validation_set()

    def _calibrate_on_validation_set(self) -> None:
        """The class calibration of `threshold.class_distribution: dataset`: the class-test scores of the
        validation images, collected at the start of every epoch that evaluates instances (always the last, so
        at the end of training) and stored in the checkpoints saved after it; with a threshold that uses it, at
        every epoch, before the instance evaluation and the panels use it. One extra fp32 forward over the
        validation set each time."""
        loaders = self.trainer.val_dataloaders
        loaders = loaders if isinstance(loaders, list | tuple) else [loaders]
        # Fresh loaders over the same images: iterating Lightning's own validation loaders here, inside its
        # validation epoch, leaves that epoch with no batches at all (no cls mAP, no instance metrics). They read
        # the whole set in every process (no distributed sampler), so every process gets the same calibration.
        fresh = [
            DataLoader(
                loader.dataset,
                batch_size=loader.batch_size,
                shuffle=False,
                num_workers=loader.num_workers,
                collate_fn=loader.collate_fn,
            )  # fmt: skip
            for loader in loaders
        ]
        # A DataLoader draws its workers' base seed from the global RNG: fork it, so that the extra pass leaves
        # the training's random stream (shuffling, augmentation) exactly as it would be without it.
        with torch.random.fork_rng(devices=[]):
            scores = self.calibration_scores(batch for loader in fresh for batch in loader)
        if len(scores) == 0:
            return
        split, evaluated = validation_split(getattr(self.trainer, "datamodule", None))
        self.set_class_calibration(ClassCalibration(scores, split, evaluated))
        if evaluated and self.inference_config().thresholds.class_distribution == "dataset":
            log.warning(
                "threshold.class_distribution=dataset is calibrated on %s, the split these instance metrics are "
                "computed on; set data.holdout_fraction to calibrate on held-out images",
                split,
            )

    def _instance_eval_this_epoch(self) -> bool:
        """Instance metrics cost a PRM backward per peak: every `eval.every_n_epochs`, default the last epoch."""
        return due_this_epoch(self.trainer, (self.hparams.eval or {}).get("every_n_epochs"))

    def _update_instance_metrics(self, batch: dict[str, Any]) -> None:
        cap = (self.hparams.eval or {}).get("max_images")
        keep = [i for i, t in enumerate(batch["targets"]) if t is not None]
        if cap is not None:
            keep = keep[: max(0, int(cap) - self._instance_images_seen)]
        if not keep:
            return
        self._instance_images_seen += len(keep)
        predictions = self.predict_images(
            batch["image"][keep], [batch["orig_size"][i] for i in keep], [batch["raw_image"][i] for i in keep]
        )
        self._peaks_over_cap += sum(p.peaks_over_cap > 0 for p in predictions)
        self.evaluators.update(*eval_inputs(batch, self.class_names, predictions=predictions, keep=keep))

    def on_validation_epoch_end(self) -> None:
        # Every process computes (the evaluators gather all processes' images), so every process logs the same
        # full-set numbers; sync_dist only averages identical values and keeps Lightning from warning.
        classification = self.classification.compute()
        self.classification.reset()
        self.log("val/cls_map", _loggable(classification.metrics.get("cls_map", 0.0)), prog_bar=True, sync_dist=True)
        if self._instance_eval_this_epoch():
            result = self.evaluators.compute()
            if self.eval_config is not None and CLASSIFICATION in self.eval_config.metrics:
                result = result.merged(classification)
            self.last_instance_metrics = result.to_record()
            for name, value in result.metrics.items():
                if name != "cls_map":  # logged above, on every epoch
                    self.log(f"val/{name}", _loggable(value), sync_dist=True)
            log.info("validation, epoch %d: %s", self.current_epoch, summary(result))
        self.evaluators.reset()
        self._instance_images_seen = 0
        if self._peaks_over_cap:
            log.warning("%d validation images had more than prm.max_peaks_per_image=%s valid peaks; the strongest "
                        "were kept", self._peaks_over_cap, self.inference_config().max_peaks_per_image)  # fmt: skip
        self._peaks_over_cap = 0

    # ------------------------------------------------------------- ranprm-evaluate (test) and ranprm-predict (predict)
    def on_test_epoch_start(self) -> None:
        if self.test_evaluators is None and not self.test_variants:
            # Trainer.test without ranprm-evaluate's suite: the checkpoint's eval.*
            self.build_evaluators()
            self.test_evaluators = EvaluatorSuite(self.class_names, self.eval_config)
        for _, suite in self._test_suites():
            suite.reset()
        self._test_image_ids = []
        self.test_result = None
        self.test_results = []

    def _test_suites(self) -> list[tuple[InferenceConfig, EvaluatorSuite]]:
        if self.test_variants:
            return list(self.test_variants)
        return [(self.inference_config(), self.test_evaluators)] if self.test_evaluators is not None else []

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Instances of the batch's images that have ground truth, fed to the test evaluators (an image without
        segmentation, or unreadable and skipped, is not scored). Suites that hold the same InferenceConfig object
        (variants that differ only in their protocol) score one prediction."""
        suites = self._test_suites()
        if "image" not in batch or not suites:
            return
        keep = [i for i, t in enumerate(batch["targets"]) if t is not None]
        if not keep:
            return
        configs = list({id(cfg): cfg for cfg, _ in suites}.values())
        per_config = self.predict_variants(
            batch["image"][keep],
            [batch["orig_size"][i] for i in keep],
            configs,
            [batch["raw_image"][i] for i in keep],
        )
        predictions_of = {id(cfg): predictions for cfg, predictions in zip(configs, per_config, strict=True)}
        # Lightning moved the whole batch to the device; the evaluators score on the CPU, where the predictions are
        # (exact copies: the masks are bool, so no number changes).
        batch = {**batch, "targets": move_data_to_device(batch["targets"], torch.device("cpu"))}
        for cfg, suite in suites:
            suite.update(*eval_inputs(batch, self.class_names, predictions=predictions_of[id(cfg)], keep=keep))
        self._test_image_ids += [batch["image_id"][i] for i in keep]

    def on_test_epoch_end(self) -> None:
        # Every process computes: the evaluators gather all processes' records, one per image id (the padding a
        # distributed sampler adds counts once), so the result is the full set's on every process.
        suites = self._test_suites()
        if not suites:
            return
        self.test_results = [suite.compute() for _, suite in suites]
        self.test_result = self.test_results[0]
        self.test_images_evaluated = len(gather_records([(i, None) for i in self._test_image_ids]))

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[ImagePrediction]:
        """Instances of the readable images of a `ranprm.data.images` batch, in its order (none if it has none)."""
        if "image" not in batch:
            return []
        return self.predict_images(batch["image"], batch["orig_size"], batch["raw_image"])

    def build_optimizer(self) -> torch.optim.Optimizer:
        """The configured optimizer over two groups: the backbone's trunk at `lr * backbone_lr_mult` (PRM's recipe
        fine-tunes an ImageNet trunk at 0.01x) and the new layers at `lr`: the classifier and whatever the backbone
        adds on top of its trunk (`added_modules()`: attention branches on a pretrained trunk)."""
        cfg = dict(self.hparams.optimizer)
        name = cfg.pop("name")
        mult = float(cfg.pop("backbone_lr_mult", 1.0))
        cfg.pop("scheduler", None)
        lr = float(cfg["lr"])
        added = getattr(self.model.backbone, "added_modules", None)
        new = {id(p) for m in (added() if added else []) for p in m.parameters()}
        trunk = [p for p in self.model.backbone.parameters() if id(p) not in new]
        fresh = [p for p in self.model.backbone.parameters() if id(p) in new]
        groups = [
            {"params": trunk, "lr": lr * mult},
            {"params": [*fresh, *self.model.classifier.parameters()], "lr": lr},
        ]
        optimizers = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
        if name not in optimizers:
            raise ConfigError(f"optimizer.name={name!r} is unknown; choose sgd, adam or adamw")
        return optimizers[name](groups, **cfg)

    def configure_optimizers(self) -> Any:
        schedule = self.hparams.optimizer.get("scheduler") or "none"
        optimizer = self.build_optimizer()
        if schedule == "none":
            return optimizer
        if schedule != "cosine":
            raise ConfigError(f"optimizer.scheduler={schedule!r} is unknown; choose none or cosine")
        # Per step, down to 0 at the last step of the run: short from-scratch runs end on a settled model
        # instead of wherever the last large step left it.
        cosine = CosineToZero(optimizer, int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": cosine, "interval": "step"}}

    def on_train_start(self) -> None:
        """A resumed run with another length (`trainer.max_epochs` / `max_steps`): the cosine restored from the
        checkpoint becomes the cosine of the new length (`ranprm.lightning.schedule`), instead of climbing back up."""
        schedulers = self.lr_schedulers()
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
            if isinstance(scheduler, CosineToZero):
                old, steps = scheduler.total_steps, int(self.trainer.estimated_stepping_batches)
                if steps <= scheduler.last_epoch:
                    raise ConfigError(
                        f"the run being resumed is at step {scheduler.last_epoch} and this one would end at step "
                        f"{steps}; its lr schedule cannot end in the past: pass a larger trainer.max_epochs"
                    )
                if scheduler.retarget(steps):
                    log.warning("lr schedule: the cosine that ended at step %d now ends at step %d; from step %d "
                                "the lr is that run length's (%.3g x optimizer.lr)", old, steps,
                                scheduler.last_epoch, scheduler.factor(scheduler.last_epoch))  # fmt: skip
