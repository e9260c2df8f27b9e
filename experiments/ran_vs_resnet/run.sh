#!/usr/bin/env bash
# The RAN-PRM vs ResNet-PRM study on the embedded dataset (see README.md in this folder).
#   experiments/ran_vs_resnet/run.sh                 # the full grid: 27 jobs, hours on a 2-core CPU
#   EPOCHS=1 SEEDS=0 experiments/ran_vs_resnet/run.sh trainer=gpu   # extra args go to every training job
# Writes experiments/ran_vs_resnet/runs/<stamp>/train/<backbone>/<job>/ (checkpoints, metrics.json),
# runs/<stamp>/eval/<backbone>/<job>/metrics.json (one per checkpoint x threshold [x mask gradient path]) and
# run_info.json, then gathers RESULTS.md and results.png into this folder.
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
EVAL_ARGS="${EVAL_ARGS:-}"     # extra overrides for the evaluations, e.g. device=cuda
export WANDB_MODE="${WANDB_MODE:-disabled}"

# Threshold strategy and the mask gradient path are inference-time choices (peak selection and peak backprop), so
# each (backbone, seed) is trained once and its checkpoint is evaluated under every inference variant: every cell of
# the grid then rests on the same trained models, and training with a detached mask would freeze the masks instead.
TRAIN=(
  data=synthetic
  "trainer.max_epochs=$EPOCHS"
  logger=csv
  callbacks.progress_bar=none
  callbacks.panels.num_images=0
  "seed=$SEEDS"
)

# A Hydra choice list of quoted checkpoint paths: 'a','b',...
ckpt_list() { local out="" p; for p in "$@"; do [ -f "$p" ] && out+="${out:+,}'$p'"; done; echo "$out"; }

started=$(date +%s)
for backbone in ran resnet50; do
  "$PY" -m ranprm.train -m "backbone=$backbone" "${TRAIN[@]}" "$@" "hydra.sweep.dir=$RUNS/train/$backbone"
  ckpts=$(ckpt_list "$RUNS/train/$backbone"/*/checkpoints/last.ckpt)
  if [ -z "$ckpts" ]; then echo "no $backbone checkpoint was written; see $RUNS/train/$backbone" >&2; continue; fi
  variants=()
  [ "$backbone" = ran ] && variants=(backbone_overrides.mask_grad=full,detached)  # RAN only
  "$PY" -m ranprm.evaluate -m "ckpt=$ckpts" threshold=fixed,mean,q3 "${variants[@]}" data=synthetic $EVAL_ARGS \
    "hydra.sweep.dir=$RUNS/eval/$backbone"
done
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
