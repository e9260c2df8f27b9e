"""The study's statistics, pure functions over finished cells: no training, no files.

Every metric is recomputed by the evaluator that defined it (`ranprm.eval`'s `reduce` on the per-image records that
`ranprm-evaluate records=true` saved), so a bootstrap over images, or a restriction to some (image, class) pairs,
uses the same AP, matching and void rule as `metrics.json`: there is no second AP here.

- **Records** (`encode` / `decode`): an evaluator's `(image_id, record)` pairs as JSON (tensors as dtype, shape and
  flat values; tuples as lists), so that a cell is one small JSON file in git.
- **Paired differences** (`paired_difference`): model A − model B on the same images, per seed (attention vs none on
  the same seed; detached vs full on the same checkpoint), their mean, sample std and how many seeds are positive,
  and a percentile bootstrap interval over images: the same resampled images for A and B and for every seed, the
  statistic being the mean over seeds of A − B.
- **Classification held equal** (`correct_pairs`, `restrict`): an (image, class) pair is correctly classified when
  the class is in the image and its class-test logit is >= 0 (probability >= 1/2); the restricted instance metrics
  keep only the GT instances and predictions of pairs that both compared models classify correctly, so a difference
  in them is a difference of the peaks and PRMs, not of which classes were found.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ranprm.eval import EvalConfig
from ranprm.eval.base import EVALUATORS

# The evaluators whose per-image records a cell keeps (the others' metrics are in the cell's metrics all the same).
RECORDED = ("instance_ap", "abo", "classification")
# The metrics recomputed from records, by the evaluator that defines them.
RECORD_METRICS = {"instance_ap": ("map_r_25", "map_r_50", "map_r_75"), "abo": ("abo",)}

ImageRecords = dict[str, Any]  # {evaluator name: that evaluator's record of one image}


# ------------------------------------------------------------------------------------------------------ the codec
def encode(obj: Any) -> Any:
    """A record (tensors, tuples, lists, numbers, None) as JSON values; `decode` gives it back."""
    if isinstance(obj, torch.Tensor):
        flat = obj.detach().cpu().reshape(-1)
        values = flat.int().tolist() if obj.dtype == torch.bool else flat.tolist()
        return {"dtype": str(obj.dtype).removeprefix("torch."), "shape": list(obj.shape), "values": values}
    if isinstance(obj, tuple | list):
        return [encode(item) for item in obj]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot encode a record holding {type(obj).__name__}")


def decode(obj: Any) -> Any:
    """`encode`'s inverse; sequences come back as tuples (the evaluators unpack and index them alike)."""
    if isinstance(obj, dict):
        dtype = getattr(torch, obj["dtype"])
        return torch.tensor(obj["values"], dtype=dtype).reshape(obj["shape"])
    if isinstance(obj, list):
        return tuple(decode(item) for item in obj)
    return obj


def encode_records(records: Mapping[str, Sequence[tuple[str, Any]]]) -> dict[str, dict[str, Any]]:
    """{evaluator: [(image_id, record)]} (`EvaluatorSuite.image_records`) -> {image_id: {evaluator: encoded}} for
    the evaluators in `RECORDED`."""
    out: dict[str, dict[str, Any]] = {}
    for name in RECORDED:
        for image_id, record in records.get(name, ()):
            out.setdefault(image_id, {})[name] = encode(record)
    return dict(sorted(out.items()))


def decode_records(encoded: Mapping[str, Mapping[str, Any]]) -> dict[str, ImageRecords]:
    return {image_id: {name: decode(rec) for name, rec in per_image.items()} for image_id, per_image in encoded.items()}


def pack_records(per_variant: Mapping[str, Mapping[str, Sequence[tuple[str, Any]]]]) -> dict[str, Any]:
    """{variant: {evaluator: [(image_id, record)]}} -> {"shared": {image_id: {evaluator: encoded}}, "variants":
    {variant: {image_id: {evaluator: encoded}}}}: a record every variant has alike (the class scores: the class test
    runs before any variant) is kept once, in "shared", which keeps a cell of 20 variants small."""
    encoded = {name: encode_records(records) for name, records in per_variant.items()}
    shared: dict[str, dict[str, Any]] = {}
    first = next(iter(encoded.values()), {})
    for image_id, per_image in first.items():
        for name, record in per_image.items():
            if all(images.get(image_id, {}).get(name) == record for images in encoded.values()):
                shared.setdefault(image_id, {})[name] = record
    for images in encoded.values():
        for image_id, names in shared.items():
            for name in names:
                images[image_id].pop(name)
    return {"shared": shared, "variants": encoded}


def unpack_records(packed: Mapping[str, Any], variant: str) -> dict[str, ImageRecords]:
    """One variant's `{image_id: {evaluator: record}}` from `pack_records`' form ({} for a variant it lacks)."""
    images = packed["variants"].get(variant, {})
    shared = packed.get("shared", {})
    return decode_records({i: {**shared.get(i, {}), **per_image} for i, per_image in images.items()})


# ---------------------------------------------------------------------------------------------------- the metrics
def record_metrics(
    images: Sequence[ImageRecords], class_names: Sequence[str], protocol: str = "voc"
) -> dict[str, float]:
    """mAP^r (at the protocol's IoUs) and ABO of these images (repeats count again), by the evaluators' `reduce`."""
    cfg = EvalConfig(protocol=protocol)
    out: dict[str, float] = {}
    for name in RECORD_METRICS:
        evaluator = EVALUATORS.get(name)(class_names, cfg)
        out.update(evaluator.reduce([image.get(name) for image in images]).metrics)
    return out


def correct_pairs(image: ImageRecords) -> set[int]:
    """The classes of one image that it shows and whose class-test logit is >= 0 (probability >= 1/2)."""
    record = image.get("classification")
    if record is None:
        return set()
    logits, targets = record
    return {int(c) for c in torch.nonzero((targets > 0) & (logits >= 0)).flatten().tolist()}


def restrict(image: ImageRecords, classes: set[int]) -> ImageRecords:
    """One image's instance records with only the GT instances and predictions of `classes` (the rest removed)."""
    kept = torch.tensor(sorted(classes), dtype=torch.long)
    out = dict(image)
    ap = image.get("instance_ap")
    if ap is not None:
        gt_counts, _, (labels, scores, matches) = ap
        keep = torch.isin(labels, kept)
        counts = torch.zeros_like(gt_counts)
        counts[kept] = gt_counts[kept]
        out["instance_ap"] = (counts, int(keep.sum()), (labels[keep], scores[keep], matches[keep]))
    abo = image.get("abo")
    if abo is not None:
        best, gt_labels = abo
        keep = torch.isin(gt_labels, kept)
        out["abo"] = (best[keep], gt_labels[keep])
    return out


# -------------------------------------------------------------------------------------------------- paired stats
@dataclass
class Pair:
    """One seed's two models on the same images: {image_id: records} of A and of B."""

    seed: int
    a: dict[str, ImageRecords]
    b: dict[str, ImageRecords]

    def image_ids(self) -> list[str]:
        return sorted(set(self.a) & set(self.b))


@dataclass
class Difference:
    """A − B of one metric: per seed, their mean and sample std (0 for one seed), the seeds where A is higher, and
    a percentile bootstrap interval over images (None without a bootstrap)."""

    metric: str
    per_seed: list[float]
    interval: tuple[float, float] | None = None

    @property
    def mean(self) -> float:
        return statistics.fmean(self.per_seed)

    @property
    def std(self) -> float:
        return statistics.stdev(self.per_seed) if len(self.per_seed) > 1 else 0.0

    @property
    def positive(self) -> int:
        return sum(d > 0 for d in self.per_seed)

    @property
    def excludes_zero(self) -> bool:
        return self.interval is not None and (self.interval[0] > 0 or self.interval[1] < 0)


def _prepared(pair: Pair, ids: Sequence[str], held_equal: bool) -> tuple[dict[str, ImageRecords], ...]:
    """The pair's records of `ids`, restricted (with `held_equal`) to the pairs both models classify correctly."""
    a = {i: pair.a[i] for i in ids}
    b = {i: pair.b[i] for i in ids}
    if held_equal:
        for i in ids:
            keep = correct_pairs(a[i]) & correct_pairs(b[i])
            a[i], b[i] = restrict(a[i], keep), restrict(b[i], keep)
    return a, b


def _difference(a: dict[str, ImageRecords], b: dict[str, ImageRecords], ids: Sequence[str],
                class_names: Sequence[str]) -> dict[str, float]:  # fmt: skip
    ma = record_metrics([a[i] for i in ids], class_names)
    mb = record_metrics([b[i] for i in ids], class_names)
    return {m: ma[m] - mb[m] for m in ma.keys() & mb.keys()}


def paired_difference(
    pairs: Sequence[Pair],
    class_names: Sequence[str],
    metrics: Sequence[str] = ("map_r_25", "map_r_50", "map_r_75", "abo"),
    held_equal: bool = False,
    n_boot: int = 0,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Difference]:
    """A − B per metric over the seeds' pairs (see the module docstring); `held_equal` restricts every image to the
    (image, class) pairs both models classify correctly. `n_boot` resamples of the images (drawn with `seed`, the
    same images for every seed's pair) give the interval at `level`; 0: no interval."""
    if not pairs:
        raise ValueError("paired_difference: no pairs to compare")
    # The images every model of every pair was evaluated on (the same split for all, unless an image failed).
    ids = sorted(set.intersection(*(set(pair.image_ids()) for pair in pairs)))
    if not ids:
        raise ValueError("paired_difference: the pairs share no evaluated image")
    prepared = [_prepared(pair, ids, held_equal) for pair in pairs]
    per_seed = [_difference(a, b, ids, class_names) for a, b in prepared]
    out = {m: Difference(m, [d[m] for d in per_seed]) for m in metrics}
    if n_boot <= 0:
        return out
    rng = random.Random(seed)
    draws: dict[str, list[float]] = {m: [] for m in metrics}
    for _ in range(n_boot):
        picks = [ids[rng.randrange(len(ids))] for _ in ids]
        diffs = [_difference(a, b, picks, class_names) for a, b in prepared]
        for m in metrics:
            draws[m].append(statistics.fmean(d[m] for d in diffs))
    for m in metrics:
        out[m].interval = percentile_interval(draws[m], level)
    return out


def percentile_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """The central `level` interval of `values` (linear interpolation between order statistics, as NumPy's
    default `quantile`)."""
    if not values:
        raise ValueError("percentile_interval: no values")
    ordered = sorted(values)
    tail = (1.0 - level) / 2

    def quantile(q: float) -> float:
        position = q * (len(ordered) - 1)
        low = math.floor(position)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (position - low)

    return quantile(tail), quantile(1.0 - tail)


def seed_spread(values: Sequence[float]) -> tuple[float, float, int]:
    """(mean, sample std (0 for one value), n) of a metric over seeds."""
    if not values:
        raise ValueError("seed_spread: no values")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def verdict(diff: Difference, what: str, unit: float = 100.0) -> str:
    """One sentence on a paired difference: what the interval and the seeds say, and no more."""
    points = f"{unit * diff.mean:+.1f} points"
    seeds = f"{diff.positive}/{len(diff.per_seed)} seeds positive"
    if diff.interval is None:
        return f"{what}: {points} ({seeds}; no bootstrap interval)"
    lo, hi = (unit * v for v in diff.interval)
    span = f"95% bootstrap interval over images [{lo:+.1f}, {hi:+.1f}]"
    agree = diff.positive in (0, len(diff.per_seed)) and len(diff.per_seed) > 1
    if diff.excludes_zero and agree:
        call = "higher" if diff.mean > 0 else "lower"
        return f"{what}: {points} ({span}; {seeds}): {call}, consistently over seeds"
    if diff.excludes_zero:
        return f"{what}: {points} ({span}; {seeds}): the interval excludes 0 but the seeds disagree"
    return f"{what}: {points} ({span}; {seeds}): no evidence of a difference"
