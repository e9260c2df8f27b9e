"""The study's grid: data × trunk × seed cells, and the inference variants each cell's checkpoint is evaluated under.

A cell is one training; the variants are inference-time choices (peak and class thresholds, retrieval, the gradient
path through the attention masks), so each is an evaluation of the same checkpoint. Everything the runner and the
report need to know about the grid is here, in one place.

**The budget, per training, equal for every trunk**: the same images seen (epochs × training split) at the same
input size, Adam lr 1e-3 with per-step cosine decay, batch 16; the ImageNet trunk at `optimizer.backbone_lr_mult`
0.1 (the new layers, classifier and attention branches, at the full lr), RAN-56 from scratch at the full lr, as the
default run trains it. The stated target: at most 15 minutes per training on a 2-core CPU (`DEFAULT_MINUTES` holds
the estimates the runner uses before a cell of that kind has finished; finished cells replace them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ranprm.data.synthetic import default_cache_dir

CONF = Path(__file__).resolve().parents[2] / "conf"

# The real-photo development set (experiments/devset/build.py writes it in COCO 2017 layout into the cache).
DEVSET_NAME = "coco-snapshots-v2"
DEVSET_BUILD = "python -m experiments.devset.build --snapshot <snapshot folder> (see experiments/devset/build.py)"

THRESHOLDS = ("seed", "fixed", "mean", "q3", "class_q3")
RETRIEVALS = ("prm_only", "proposals")
MASK_GRADS = ("full", "detached")


@dataclass(frozen=True)
class Data:
    """A data set of the grid: its name in cell ids, the overrides that select it (training and evaluation), and
    where it must already exist (None: generated on first use, as the embedded data)."""

    name: str
    label: str
    overrides: tuple[str, ...]
    epochs: int
    required_root: Path | None = None
    build_hint: str = ""
    required_config: str | None = None  # a config file under conf/ that reading it needs, e.g. data/coco.yaml

    def missing_reason(self) -> str | None:
        """None when the data can be used here; else one line saying what is missing and how to make it."""
        if self.required_config is not None and not (CONF / self.required_config).is_file():
            return f"this checkout has no conf/{self.required_config}, which reading {self.name} needs"
        if self.required_root is None or (self.required_root / "annotations").is_dir():
            return None
        return f"{shown(self.required_root)} does not exist: build it with `{self.build_hint}`"


def shown(path: Path | str) -> str:
    """A path as the report shows it: the cache folder as `$RANPRM_CACHE`, so that no machine's home is written."""
    return str(path).replace(str(default_cache_dir()), "$RANPRM_CACHE")


@dataclass(frozen=True)
class Trunk:
    """A trunk of the grid: `attention` says whether it has soft masks (then the detached path is evaluated too)."""

    name: str
    label: str
    overrides: tuple[str, ...]
    attention: bool


@dataclass(frozen=True)
class Variant:
    """One inference setting of a checkpoint."""

    threshold: str
    retrieval: str
    mask_grad: str

    @property
    def name(self) -> str:
        return f"{self.threshold}/{self.retrieval}/{self.mask_grad}"

    @classmethod
    def parse(cls, name: str) -> Variant:
        threshold, retrieval, mask_grad = name.split("/")
        return cls(threshold, retrieval, mask_grad)


@dataclass(frozen=True)
class Cell:
    data: Data
    trunk: Trunk
    seed: int

    @property
    def id(self) -> str:
        return f"{self.data.name}/{self.trunk.name}/seed{self.seed}"

    @property
    def file_name(self) -> str:
        return self.id.replace("/", "__") + ".json"


@dataclass(frozen=True)
class Grid:
    """The cells (data first, in `data` order; then seed; then trunk, so that each seed's comparable models finish
    together) and the variants; `train_overrides` go to every training, `eval_overrides` to every evaluation."""

    name: str
    data: tuple[Data, ...]
    trunks: tuple[Trunk, ...]
    seeds: tuple[int, ...]
    thresholds: tuple[str, ...] = THRESHOLDS
    retrievals: tuple[str, ...] = RETRIEVALS
    train_overrides: tuple[str, ...] = ()
    eval_overrides: tuple[str, ...] = ()
    coco_variants: tuple[str, ...] = ("seed/prm_only/full",)
    default_minutes: dict[str, float] = field(default_factory=dict)  # "<data>/<trunk>" -> minutes per cell

    def cells(self) -> list[Cell]:
        return [Cell(d, t, s) for d in self.data for s in self.seeds for t in self.trunks]

    def variants(self, trunk: Trunk) -> list[Variant]:
        grads = MASK_GRADS if trunk.attention else MASK_GRADS[:1]
        return [Variant(t, r, g) for g in grads for r in self.retrievals for t in self.thresholds]


# Common to every training: CSV logs, no panels or progress bar (the study's output is the cell file), and the
# training's own instance evaluation on one image only (a PRM backward per peak on every validation image would
# repeat what the cell's `variants=` evaluation of the checkpoint measures, at a quarter of the cell's time).
QUIET = ("logger=csv", "callbacks.progress_bar=none", "callbacks.panels.num_images=0", "eval.max_images=1")

LITE0 = ("backbone=efficientnet_lite0", "backbone.pretrained=imagenet", "backbone.output_stride=16",
         "optimizer.backbone_lr_mult=0.1")  # fmt: skip
TRUNKS = (
    Trunk("lite0", "ImageNet EfficientNet-Lite0", LITE0, attention=False),
    # The same trunk and weights; the branches start as the identity (attention_init=identity), so the trunk's
    # output at step 0 is the plain Lite0's.
    Trunk(
        "lite0_attn",
        "ImageNet Lite0 + RAN attention [8,16]",
        (*LITE0, "backbone.attention=[8,16]", "backbone.attention_init=identity"),
        attention=True,
    ),  # fmt: skip
    Trunk("ran56", "RAN-56 from scratch", ("backbone=ran",), attention=True),
)


def _devset() -> Data:
    root = default_cache_dir() / "devset" / DEVSET_NAME
    overrides = ("data=coco", f"data.root={root}", "data.train_split=train", "data.val_split=val", "data.classes=voc",
                 "data.image_size=256", "data.num_workers=1")  # fmt: skip
    return Data("devset", f"real photos ({DEVSET_NAME}, the 20 VOC classes)", overrides, epochs=8, required_root=root,
                build_hint=DEVSET_BUILD, required_config="data/coco.yaml")  # fmt: skip


def main_grid() -> Grid:
    """The study: the real-photo development set first, then the embedded data at 256 px (class maps 8x8 for RAN at
    stride 32, 16x16 for Lite0 at output stride 16)."""
    synthetic = Data("synthetic256", "embedded shapes, 256 px", ("data=synthetic", "data.image_size=256"), epochs=4)
    return Grid(
        name="main",
        data=(_devset(), synthetic),
        trunks=TRUNKS,
        seeds=(0, 1, 2),
        train_overrides=QUIET,
        # What a cell costs before one of its kind has finished (finished cells replace these). Measured: the
        # first cell, devset/lite0/seed0, took 38.9 min on a 2-core AMD EPYC shared with other work (training
        # 12.1 min, every voc variant 19.4 min, the coco pass 7.3 min). The others are scaled from it by the
        # trunks' per-peak PRM costs (BENCHMARKS.md: + attention evaluates two gradient paths, RAN-56 is slower
        # per step and per peak) and the embedded data's 100 validation images.
        default_minutes={
            "synthetic256/lite0": 35,
            "synthetic256/lite0_attn": 40,  # devset/lite0_attn/seed0 took 35.3 (its evaluation quiet, one pass)
            "synthetic256/ran56": 75,
            "devset/lite0": 39,
            "devset/lite0_attn": 65,
            "devset/ran56": 80,
        },  # fmt: skip
    )


def smoke_grid() -> Grid:
    """Seconds per cell: the tiny CNN on 32 + 8 embedded images at 64 px, one epoch, two variants; proves the path
    (`--grid smoke`), never an answer."""
    data = Data(
        "smoke",
        "embedded shapes, 64 px, 40 images",
        ("data=synthetic", "data.image_size=64", "data.synthetic.num_train=32", "data.synthetic.num_val=8",
         "data.num_workers=0", "data.persistent_workers=false", "data.batch_size=8"),
        epochs=1,
    )  # fmt: skip
    tiny = Trunk("tiny", "tiny CNN (tests)", ("backbone=tiny", "trainer=cpu", "trainer.precision=32-true"), False)
    return Grid(
        name="smoke",
        data=(data,),
        trunks=(tiny,),
        seeds=(0,),
        thresholds=("seed", "mean"),
        retrievals=("prm_only",),
        train_overrides=QUIET,
        eval_overrides=("device=cpu",),
        coco_variants=("seed/prm_only/full",),
        default_minutes={"smoke/tiny": 1},
    )


GRIDS = {"main": main_grid, "smoke": smoke_grid}
