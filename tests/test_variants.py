"""`ranprm-evaluate variants=...`: the grammar, one pass equal to separate runs, and one `cls_map` for training and
evaluation."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import lightning as L
import pytest
import torch

from ranprm.cli.config import compose
from ranprm.cli.variants import parse_variants
from ranprm.data.datamodule import DataConfig, VOCDataModule
from ranprm.errors import ConfigError
from ranprm.eval import write_results
from ranprm.evaluate import evaluate
from ranprm.lightning.checkpoint import load_module
from ranprm.models.prm_net import PRMNet
from ranprm.models.registry import build_backbone
from ranprm.prm.pipeline import InferenceConfig, gradient_path, predict_batch, predict_variants
from tests.helpers import CLASSES
from tests.test_evaluate import _data
from tests.test_loggers import no_wandb_key, offline_wandb  # noqa: F401  (fixtures)
from tests.test_predict import tiny_model  # noqa: F401  (the module-scoped fixture)
from tests.test_ran import tiny_ran
from tests.wandb_records import history, offline_runs

# Every class and every peak valid (the tiny model is barely trained): the fixed preset with its cut-offs lowered.
ALL = "{name:fixed,classes:{kind:fixed,value:-1e9},peaks:{kind:fixed,value:-1e9,strict:true}}"
ALL_ALONE = ["threshold=fixed", "threshold.classes.value=-1e9", "threshold.peaks.value=-1e9"]


def test_a_product_runs_threshold_major_with_names_from_its_values():
    specs = parse_variants({"threshold": ["seed", "fixed"], "retrieval": ["prm_only", "proposals"]})
    assert [s.name for s in specs] == ["seed/prm_only", "seed/proposals", "fixed/prm_only", "fixed/proposals"]
    assert specs[1].threshold["classes"] == {"kind": "quantile", "q": 0.75}  # the preset's YAML, written out
    assert specs[1].retrieval["proposal_count"] == 100 and specs[1].mask_grad is None


def test_a_list_takes_names_mappings_and_gradient_paths():
    specs = parse_variants([
        {"threshold": "q3"},
        {"name": "official", "threshold": "fixed", "retrieval": {"name": "proposals", "size": 448}},
        {"threshold": {"name": "mean", "min_class_prob": 0.3}, "mask_grad": "detached"},
    ])  # fmt: skip
    assert [s.name for s in specs] == ["q3", "official", "mean(min_class_prob=0.3)/detached"]
    custom = {"name": "all", "classes": {"kind": "none"}, "peaks": {"kind": "none"}}
    assert parse_variants({"threshold": [custom], "retrieval": [{"name": "proposals", "size": 448}]})[0].name == (
        "all/proposals(size=448)"
    )
    assert specs[0].retrieval is None  # left out: the command line's / checkpoint's
    assert specs[1].retrieval["size"] == 448 and specs[1].retrieval["balance"] == 0.8
    assert specs[2].threshold["min_class_prob"] == 0.3 and specs[2].threshold["peaks"] == {"kind": "mean"}
    assert parse_variants(None) is None


def test_variants_that_differ_only_in_protocol_share_an_inference_key():
    specs = parse_variants({"threshold": ["seed", "q3"], "protocol": ["voc", "coco"]})
    assert [s.name for s in specs] == ["seed/voc", "seed/coco", "q3/voc", "q3/coco"]
    assert [s.protocol for s in specs] == ["voc", "coco", "voc", "coco"]
    keys = [s.inference_key() for s in specs]
    assert keys[0] == keys[1] and keys[2] == keys[3] and keys[0] != keys[2]
    assert parse_variants([{"threshold": "seed"}])[0].protocol is None  # eval.protocol decides


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ({"thresholds": ["seed"]}, "unknown axis"),
        ({"threshold": ["seed", "nope"]}, "not a preset"),
        ({"retrieval": ["nope"]}, "not a method"),
        ({"mask_grad": ["half"]}, "not a gradient path"),
        ({"protocol": ["voc", "cityscapes"]}, "protocol='cityscapes' is not a protocol"),
        ([{"threshold": "seed"}, {"threshold": "seed"}], "repeat"),
        ([], "lists no variant"),
        ("seed", "must be a product"),
    ],
)
def test_bad_variants_are_one_line(value, match):
    with pytest.raises(ConfigError, match=match):
        parse_variants(value)


def _metrics_of(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def test_one_pass_equals_each_variant_alone(tiny_model, tmp_path):  # noqa: F811
    """Every metric, count and per-class value of each variant of one pass is exactly (==) that of a separate
    evaluation with the variant's settings on the command line; the table is ranked by the chosen metric."""
    voc, ckpt = tiny_model
    base = [*_data(voc), f"ckpt={ckpt}", "eval.max_images=3", "progress_bar=none"]
    product = f"variants={{threshold:[mean,q3,{ALL}],retrieval:[prm_only,proposals]}}"
    evaluate(compose("evaluate", [*base, f"output={tmp_path / 'all'}", product, "variants_rank_by=abo"]))
    record = _metrics_of(tmp_path / "all")
    assert record["ranked_by"] == "abo" and len(record["variants"]) == 6
    abo = [v["metrics"]["abo"] for v in record["variants"]]
    assert abo == sorted(abo, reverse=True) and [v["rank"] for v in record["variants"]] == [1, 2, 3, 4, 5, 6]
    assert record["image_size"] == 64 and record["image_size_from"] == "data.image_size"
    alone = {
        "mean/prm_only": ["threshold=mean", "retrieval=prm_only"],
        "q3/proposals": ["threshold=q3", "retrieval=proposals"],
        "fixed(classes.value=-1e+09,peaks.value=-1e+09)/prm_only": [*ALL_ALONE, "retrieval=prm_only"],
        "fixed(classes.value=-1e+09,peaks.value=-1e+09)/proposals": [*ALL_ALONE, "retrieval=proposals"],
    }
    by_name = {v["name"]: v for v in record["variants"]}
    assert set(alone) <= set(by_name), sorted(by_name)
    for i, (name, overrides) in enumerate(alone.items()):
        out = tmp_path / f"alone{i}"
        evaluate(compose("evaluate", [*base, f"output={out}", *overrides]))
        single = _metrics_of(out)
        variant = by_name[name]
        assert {k: single[k] for k in single["metric_names"]} == variant["metrics"], name
        assert single["per_class"] == variant["per_class"], name
        assert single["num_predictions"] == variant["counts"]["num_predictions"], name
        assert single["threshold"] == variant["settings"]["threshold"], name
    assert (
        by_name[next(iter(alone))]["counts"]["num_predictions"] <= by_name[list(alone)[2]]["counts"]["num_predictions"]
    )
    assert (tmp_path / "all" / "variants.md").read_text().count("\n| ") == 7  # header + 6 rows
    assert (tmp_path / "all" / "variants.csv").read_text().splitlines()[0].startswith("rank,variant,threshold")


def test_a_protocol_axis_scores_one_prediction_under_each_protocol(tiny_model, tmp_path, monkeypatch):  # noqa: F811
    """`protocol:[voc,coco]` gives each protocol's metrics exactly (==) as a separate evaluation with
    `eval.protocol=` does, from one prediction per image: the model's variants pass is asked for one setting."""
    from ranprm.lightning.module import PRMModule

    voc, ckpt = tiny_model
    base = [*_data(voc), f"ckpt={ckpt}", "eval.max_images=3", "progress_bar=none"]
    asked: list[int] = []
    original = PRMModule.predict_variants

    def counting(self, images, sizes, configs, *args, **kwargs):
        asked.append(len(configs))
        return original(self, images, sizes, configs, *args, **kwargs)

    monkeypatch.setattr(PRMModule, "predict_variants", counting)
    both = "variants={threshold:[mean],protocol:[voc,coco]}"
    evaluate(compose("evaluate", [*base, f"output={tmp_path / 'both'}", both]))
    assert asked and set(asked) == {1}  # one setting per step for both protocols
    record = _metrics_of(tmp_path / "both")
    assert record["protocol"] == "voc"  # eval.protocol, for variants that name none
    by_name = {v["name"]: v for v in record["variants"]}
    assert {n: v["protocol"] for n, v in by_name.items()} == {"mean/voc": "voc", "mean/coco": "coco"}
    assert [v["rank"] for v in record["variants"]] == [1, 1]  # ranked within each protocol
    assert "map_r_50_95" in record["metric_names"] and "map_r_50_95" not in by_name["mean/voc"]["metrics"]
    for protocol in ("voc", "coco"):
        out = tmp_path / protocol
        evaluate(compose("evaluate", [*base, f"output={out}", "threshold=mean", f"eval.protocol={protocol}"]))
        single = _metrics_of(out)
        variant = by_name[f"mean/{protocol}"]
        assert single["protocol"] == protocol
        assert {k: single[k] for k in single["metric_names"]} == variant["metrics"], protocol
        assert single["per_class"] == variant["per_class"], protocol
    table = (tmp_path / "both" / "variants.md").read_text()
    assert "| mask_grad | protocol | map_r_25 |" in table and "| mean/coco | mean | prm_only |  | coco |" in table
    header = (tmp_path / "both" / "variants.csv").read_text().splitlines()[0]
    assert header.startswith("rank,variant,threshold,retrieval,mask_grad,protocol,map_r_25")
    cfg = compose("evaluate", [*base, f"output={tmp_path / 'refused'}", "variants={protocol:[voc,coco]}",
                               "eval.protocol=coco", "variants_rank_by=map_r_50_95"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"variants_rank_by=map_r_50_95 is not a metric of this evaluation"):
        evaluate(cfg)  # the voc variant has no COCO AP to rank by
    assert not (tmp_path / "refused").exists() or not any((tmp_path / "refused").iterdir())


def test_rank_by_must_be_a_metric(tiny_model, tmp_path):  # noqa: F811
    voc, ckpt = tiny_model
    cfg = compose("evaluate", [*_data(voc), f"ckpt={ckpt}", f"output={tmp_path}", "variants={threshold:[mean]}",
                               "variants_rank_by=map_r@0.5"])  # fmt: skip
    with pytest.raises(ConfigError, match="variants_rank_by=map_r@0.5 is not a metric"):
        evaluate(cfg)
    assert not (tmp_path / "metrics.json").exists()


def test_image_size_defaults_to_the_checkpoints(tiny_model, tmp_path):  # noqa: F811
    voc, ckpt = tiny_model
    data = [d for d in _data(voc) if not d.startswith("data.image_size")]
    evaluate(compose("evaluate", [*data, f"ckpt={ckpt}", f"output={tmp_path}", "eval.max_images=1",
                                  "eval.metrics=[classification]", "progress_bar=none"]))  # fmt: skip
    record = _metrics_of(tmp_path)
    assert (record["image_size"], record["image_size_from"]) == (64, "checkpoint")


def test_training_and_evaluation_report_one_cls_map(tiny_model, tmp_path):  # noqa: F811
    """`val/cls_map` of a validation pass and `cls_map` of ranprm-evaluate on the same checkpoint and images are
    the same function on the same class scores: equal."""
    voc, ckpt = tiny_model
    evaluate(compose("evaluate", [*_data(voc), f"ckpt={ckpt}", f"output={tmp_path}", "progress_bar=none",
                                  "eval.metrics=[classification]"]))  # fmt: skip
    module = load_module(ckpt)
    module.hparams.eval = {**dict(module.hparams.eval or {}), "metrics": ["classification"]}
    data = VOCDataModule(DataConfig(root=str(voc), class_names=list(CLASSES), image_size=64, batch_size=4,
                                    num_workers=0, persistent_workers=False, pin_memory=False))  # fmt: skip
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, inference_mode=False)  # fmt: skip
    trainer.validate(module, datamodule=data, verbose=False)
    assert float(trainer.callback_metrics["val/cls_map"]) == pytest.approx(_metrics_of(tmp_path)["cls_map"], abs=0)


def test_variants_table_goes_to_wandb(tiny_model, tmp_path, offline_wandb):  # noqa: F811
    voc, ckpt = tiny_model
    out = tmp_path / "eval"
    evaluate(compose("evaluate", [*_data(voc), f"ckpt={ckpt}", f"output={out}", f"paths.output_dir={out}",
                                  "eval.max_images=2", "progress_bar=none", "logger=wandb",
                                  f"variants={{threshold:[mean,{ALL}]}}"]))  # fmt: skip
    record = _metrics_of(out)
    (run,) = offline_runs(out)
    logged = {key: value for row in history(run) for key, value in row.items()}
    for variant in record["variants"]:
        assert logged[f"eval/{variant['name']}/abo"] == pytest.approx(variant["metrics"]["abo"])
    table = json.loads(next(run.glob("files/media/table/eval/variants_*.table.json")).read_text())
    assert table["columns"][:3] == ["rank", "variant", "threshold"]
    assert [row[1] for row in table["data"]] == [v["name"] for v in record["variants"]]


# ------------------------------------------------------------------------------------- predict_variants, directly
def _instances_equal(a, b) -> bool:
    fields = ("masks", "labels", "scores", "peaks", "prms")
    return a.image_size == b.image_size and all(torch.equal(getattr(a, f), getattr(b, f)) for f in fields)


def _inference(threshold: dict, retrieval: dict | None = None, mask_grad: str | None = None) -> InferenceConfig:
    head = {"stimulation": False, "peak_filter": "none"}
    cfg = InferenceConfig.from_config(threshold, head, {}, retrieval or {"name": "prm_only"})
    return dataclasses.replace(cfg, gradient_path=mask_grad)


def test_variants_of_one_pass_are_each_setting_alone_with_both_gradient_paths():
    """Every instance field, the peaks and the PRMs of each variant equal (==) `predict_batch` with its settings
    alone, the soft masks' gradient paths included; the paths really differ, and the model keeps its own."""
    torch.manual_seed(0)
    model = PRMNet(tiny_ran(), num_classes=3).eval()
    images = torch.randn(2, 3, 64, 64)
    sizes = [(64, 64), (48, 80)]
    mean = {"name": "mean", "classes": {"kind": "mean"}, "peaks": {"kind": "mean"}}
    everything = {"name": "all", "classes": {"kind": "none"}, "peaks": {"kind": "none"}}
    variants = [_inference(mean), _inference(everything), _inference(everything, mask_grad="detached"),
                _inference(mean, {"name": "prm_only", "size": 32}, mask_grad="full")]  # fmt: skip
    together = predict_variants(model, images, sizes, variants, with_prms=True)
    for cfg, predictions in zip(variants, together, strict=True):
        with gradient_path(model, cfg.gradient_path):
            alone = predict_batch(model, images, sizes, dataclasses.replace(cfg, gradient_path=None), with_prms=True)
        for got, want in zip(predictions, alone, strict=True):
            assert _instances_equal(got.instances, want.instances)
            assert torch.equal(got.prms, want.prms) and torch.equal(got.peaks, want.peaks)
    assert model.backbone.mask_grad == "full"  # restored
    full, detached = together[1][0].prms, together[2][0].prms
    assert len(full) > 0 and not torch.equal(full, detached)  # the detached path is another backward
    # retrieval.size=32: retrieved at 32 x 32, the masks back at each image's size
    assert [p.instances.masks.shape[1:] for p in together[3]] == [torch.Size(s) for s in sizes]


def test_mask_grad_variants_need_an_attention_trunk():
    model = PRMNet(build_backbone("tiny"), num_classes=3).eval()
    with pytest.raises(ConfigError, match="no attention soft masks"), gradient_path(model, "detached"):
        pass


def test_retrieval_at_the_image_size_is_retrieval_without_a_size():
    """`retrieval.size` equal to the image's side changes nothing; at another side the masks are the ones
    retrieved there, resized back nearest (a known answer: at 2x the side every mask pixel doubles into 2x2)."""
    torch.manual_seed(1)
    model = PRMNet(build_backbone("tiny"), num_classes=3).eval()
    images = torch.randn(1, 3, 64, 64)
    everything = {"name": "all", "classes": {"kind": "none"}, "peaks": {"kind": "none"}}
    plain = predict_batch(model, images, [(64, 64)], _inference(everything))[0].instances
    same = predict_batch(model, images, [(64, 64)], _inference(everything, {"name": "prm_only", "size": 64}))[0]
    assert len(plain) > 0 and _instances_equal(plain, same.instances)
    small = predict_batch(model, images, [(64, 64)], _inference(everything, {"name": "prm_only", "size": 32}))[0]
    at_32 = predict_batch(model, images, [(32, 32)], _inference(everything))[0].instances
    assert torch.equal(small.instances.masks, at_32.masks.repeat_interleave(2, 1).repeat_interleave(2, 2))
    assert torch.equal(small.instances.scores, at_32.scores)


def test_variants_need_a_checkpoint(voc_root, tmp_path):
    write_results(tmp_path / "empty.json", [])
    cfg = compose("evaluate", [*_data(voc_root), f"predictions={tmp_path / 'empty.json'}", f"output={tmp_path / 'o'}",
                               "variants={threshold:[seed]}"])  # fmt: skip
    with pytest.raises(ConfigError, match="variants= needs ckpt=PATH"):
        evaluate(cfg)
    assert not (tmp_path / "o").exists()
