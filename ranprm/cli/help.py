"""What each entry point says about itself: `--help`, and the example in a "required value missing" error.

`--help` is Hydra's app help with ranprm's template (`hydra.help.template: ${ranprm_help:<config name>}` in
`conf/hydra/default.yaml` and `conf/predict.yaml`): a short description, usage, examples, the config groups this
entry point composes (read from the composed config's `hydra.runtime.choices`, so `ranprm-predict --help` never
lists train-only groups such as `optimizer` or `debug`) with their options, then its own keys with their current values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class EntryPoint:
    command: str
    summary: str
    usage: str
    examples: tuple[str, ...]


ENTRY_POINTS: dict[str, EntryPoint] = {
    "train": EntryPoint(
        command="ranprm-train",
        summary="Train a PRM network (RAN or ResNet-50 FCN) from image-level labels; writes checkpoints, panels and "
        "metrics.json into its run folder.",
        usage="ranprm-train [group=option ...] [key=value ...]   (python -m ranprm.train; -m for a sweep)",
        examples=(
            "ranprm-train experiment=seed_voc",
            "ranprm-train backbone=ran threshold=mean optimizer.lr=0.01 debug=fast_dev_run",
            "ranprm-train -m experiment=seed_voc backbone=ran,resnet50 seed=0,1,2",
        ),
    ),
    "evaluate": EntryPoint(
        command="ranprm-evaluate",
        summary="Score instance masks on the data's validation split (mAP^r, ABO, pointing, classification mAP), "
        "from a checkpoint or a predictions file; writes metrics.json and per_class.md. variants=... evaluates many "
        "inference variants (threshold x retrieval x mask_grad) in one pass: metrics.json gets one entry per variant "
        "and variants.md/.csv rank them by variants_rank_by. The network input is the checkpoint's size unless "
        "data.image_size is given.",
        usage="ranprm-evaluate (ckpt=PATH | predictions=FILE) [data=...] [output=DIR] [key=value ...]",
        examples=(
            "ranprm-evaluate ckpt=outputs/train/<date>/<time>/checkpoints/last.ckpt data=voc",
            "ranprm-evaluate ckpt=last.ckpt data=voc retrieval=proposals eval.protocol=coco output=eval_coco",
            "ranprm-evaluate predictions=predictions/predictions.json data=voc",
            "ranprm-evaluate ckpt=last.ckpt data=voc "
            "variants='{threshold:[seed,fixed,mean,q3,class_q3],retrieval:[prm_only,proposals]}' "
            "variants_rank_by=map_r_50",
            "ranprm-evaluate ckpt=last.ckpt data=voc "
            "variants='[{threshold:seed},{name:official,threshold:fixed,retrieval:{name:proposals,size:448}}]'",
        ),
    ),
    "predict": EntryPoint(
        command="ranprm-predict",
        summary="Find instances in images with a trained checkpoint; writes an overlay per image and "
        "predictions.json (COCO results) into output.",
        usage="ranprm-predict ckpt=PATH input=FILE_OR_DIR output=DIR [key=value ...]",
        examples=(
            "ranprm-predict ckpt=outputs/train/<date>/<time>/checkpoints/last.ckpt input=photos/ output=predicted/",
            "ranprm-predict ckpt=last.ckpt input=dog.jpg output=out threshold=mean prm.precision=bf16",
        ),
    ),
}


def example(config_name: str) -> str:
    """The first example command of an entry point (for error messages)."""
    return ENTRY_POINTS[config_name].examples[0]


def _group_options(group: str) -> list[str]:
    """The options of a config group, as the running Hydra sees them (YAML files, the ConfigStore, plugins)."""
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return sorted(GlobalHydra.instance().config_loader().get_group_options(group))
    return []


def help_template(config_name: str, *, _root_: Any) -> str:
    """Hydra's `hydra.help.template` for `config_name`: `$CONFIG` and `$FLAGS_HELP` are filled in by Hydra."""
    entry = ENTRY_POINTS[config_name]
    choices = dict(_root_.hydra.runtime.choices) if "runtime" in _root_.hydra else {}
    groups = [g for g in choices if g != "hydra" and not g.startswith("hydra/")]
    lines = [f"{entry.command}: {entry.summary}", "", f"Usage: {entry.usage}", "", "Examples:"]
    lines += [f"  {command}" for command in entry.examples]
    lines += ["", "Config groups (group=option; the current choice in brackets):"]
    for group in sorted(groups):
        options = _group_options(group)
        shown = ", ".join(f"[{o}]" if o == choices[group] else o for o in options) or "(none here)"
        lines.append(f"  {group}: {shown}")
    lines += [
        "",
        "Options (key=value; a wrong type or an unknown key is one error line, exit 2; the current values):",
        "",
        "$CONFIG",
        f"More: {entry.command} --cfg job (the composed config), --info defaults (where each value comes from), "
        "--hydra-help (Hydra's own flags)",
    ]
    # Hydra fills the template with string.Template: a literal $ must be doubled
    return "\n".join(lines).replace("$", "$$").replace("$$CONFIG", "$CONFIG")


def register_help_resolver() -> None:
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("ranprm_help", help_template, replace=True)
