#!/usr/bin/env bash
# The RAN-PRM vs ResNet-PRM study on the embedded dataset (see README.md in this folder).
#   experiments/ran_vs_resnet/run.sh                 # the full grid: 27 jobs, hours on a 2-core CPU
#   EPOCHS=1 SEEDS=0 experiments/ran_vs_resnet/run.sh trainer=gpu   # extra args go to every job
# Writes experiments/ran_vs_resnet/runs/<stamp>/{full,detached}/<job>/metrics.json, run_info.json, then gathers
# RESULTS.md and results.png into this folder.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
cd "$ROOT"
PY="${PY:-$ROOT/.venv/bin/python}"
EPOCHS="${EPOCHS:-6}"           # the equal budget: every job sees the same images for the same number of epochs
SEEDS="${SEEDS:-0,1,2}"
STAMP="${STAMP:-$(date +%Y-%m-%d_%H-%M-%S)}"
RUNS="$HERE/runs/$STAMP"
mkdir -p "$RUNS"
export WANDB_MODE="${WANDB_MODE:-disabled}"

COMMON=(
  data=synthetic
  "trainer.max_epochs=$EPOCHS"
  logger=csv
  callbacks.progress_bar=none
  callbacks.panels.num_images=0
  optimized_metric=val/map_r_50
  "seed=$SEEDS"
)

started=$(date +%s)
# backbone {ran (full mask gradient), resnet50} x threshold {fixed, mean, q3} x seeds
"$PY" -m ranprm.train -m backbone=ran,resnet50 threshold=fixed,mean,q3 "${COMMON[@]}" "$@" \
  "hydra.sweep.dir=$RUNS/full"
# the detached-mask gradient path exists only for RAN
"$PY" -m ranprm.train -m backbone=ran backbone.mask_grad=detached threshold=fixed,mean,q3 "${COMMON[@]}" "$@" \
  "hydra.sweep.dir=$RUNS/detached"
finished=$(date +%s)

"$PY" - "$RUNS/run_info.json" "$started" "$finished" "$EPOCHS" "$SEEDS" "$*" <<'PY'
import json, os, platform, sys, time
path, started, finished, epochs, seeds, extra = sys.argv[1:]
try:
    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    torch_version = torch.__version__
except Exception:
    gpu, torch_version = None, None
cpu = platform.processor()
try:
    cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
except Exception:
    pass
info = {
    "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(int(started))),
    "wall_s": int(finished) - int(started),
    "machine": f"{platform.node()} ({platform.system()} {platform.machine()}, {os.cpu_count()} cores, {cpu})",
    "gpu": gpu,
    "torch": torch_version,
    "epochs": int(epochs),
    "seeds": seeds,
    "extra_overrides": extra,
}
with open(path, "w") as fh:
    json.dump(info, fh, indent=2)
print(f"wrote {path}")
PY

"$PY" "$HERE/gather.py" "$RUNS"
