#!/usr/bin/env bash
# RAN-56 from scratch, Lite0 and Lite0 + attention [8,16] on the real-photo development set at one wall-clock
# budget each (BENCHMARKS.md, "Real photos"), then ranprm-evaluate under both protocols and the threshold presets'
# class counts for each model.
#   experiments/devset/run.sh                      # ~/.cache/ranprm/devset/coco-snapshots-v2, 10 minutes a model
#   BUDGET=00:00:30:00 SIZE=320 experiments/devset/run.sh trainer=gpu    # extra args go to every training
# Writes experiments/devset/runs/<stamp>/{lite0,lite0_att,ran}/ (checkpoints, panels/, metrics.json, class_counts.md)
# and <model>/eval-{voc,coco}/metrics.json + per_class.md. The trainings run one after another: on a shared CPU,
# side by side they only slow each other down.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
cd "$ROOT"
PY="${PY:-$ROOT/.venv/bin/python}"
SET="${SET:-${RANPRM_CACHE:-$HOME/.cache/ranprm}/devset/coco-snapshots-v2}"
BUDGET="${BUDGET:-00:00:10:00}"  # Lightning's max_time (DD:HH:MM:SS): the same wall-clock budget for every model
SIZE="${SIZE:-256}"
RUNS="$HERE/runs/${STAMP:-$(date +%Y-%m-%d_%H-%M-%S)}"
export WANDB_MODE="${WANDB_MODE:-disabled}"
DATA=(data=coco "data.root=$SET" data.train_split=train data.val_split=val data.classes=voc "data.image_size=$SIZE")
TRAIN=("${DATA[@]}" trainer.max_epochs=100 "+trainer.max_time=$BUDGET" logger=csv callbacks.progress_bar=none
  callbacks.panels.num_images=6 eval.metrics=[classification] print_config=false)

train() {  # name, overrides...
  local name=$1; shift
  local t0; t0=$(date +%s)
  "$PY" -m ranprm.train "${TRAIN[@]}" "$@" "hydra.run.dir=$RUNS/$name"
  echo "$name: training $(( $(date +%s) - t0 )) s wall" | tee -a "$RUNS/wall_times.txt"
  for protocol in voc coco; do
    t0=$(date +%s)
    "$PY" -m ranprm.evaluate "${DATA[@]}" "ckpt=$RUNS/$name/checkpoints/last.ckpt" "eval.protocol=$protocol" \
      progress_bar=none "output=$RUNS/$name/eval-$protocol" "hydra.run.dir=$RUNS/$name/eval-$protocol"
    echo "$name: evaluation ($protocol) $(( $(date +%s) - t0 )) s wall" | tee -a "$RUNS/wall_times.txt"
  done
  "$PY" -m experiments.devset.class_counts --ckpt "$RUNS/$name/checkpoints/last.ckpt" "${DATA[@]}" \
    > "$RUNS/$name/class_counts.md"
}

mkdir -p "$RUNS"
grep -m1 "model name" /proc/cpuinfo | tee "$RUNS/wall_times.txt"
train lite0 experiment=pretrained_coco "$@"
train lite0_att experiment=pretrained_coco "backbone.attention=[8,16]" "$@"
# RAN-56 has no ImageNet weights: from scratch with the default run's Adam (constant lr here: the budget is time)
train ran threshold=seed data.flip_prob=0.5 data.batch_size=16 backbone=ran optimizer=adam optimizer.scheduler=none "$@"
