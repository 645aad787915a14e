#!/usr/bin/env bash
# The first look at a lent GPU, in one table (about 5 minutes on one H100; at most 8):
#   - the random forest: cuML against scikit-learn on the same feature store (accuracy, seconds); cuML comes from
#     catdog's `gpu` extra, installed here when missing, and is skipped with a line saying why when it cannot be;
#   - training throughput of ResNet-101 and ConvNeXt-tiny (random init, bf16 autocast, channels_last, 224 px,
#     batch 256, images/s) against timm's benchmark.py numbers for the same card, where timm published them;
#   - extraction (jobs/extract.py, JPEG decoding included) against the forward pass alone, images/s;
#   - the suite's GPU tests (pytest -m gpu).
#
#   bench/gpu_check.sh            # torch and catdog installed as the README says (tools/setup.sh)
#
# Without a CUDA GPU it stops at once: one line "error: ...", exit code 2.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
if ! nvidia-smi -L 2>/dev/null | grep -q '^GPU' \
   || ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "error: bench/gpu_check.sh needs a CUDA GPU; none here (nvidia-smi -L lists none, or torch cannot use it)" >&2
  exit 2
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
ROWS="$WORK/rows.tsv"

if ! "$PY" -c 'import cuml' 2>/dev/null; then
  echo "gpu_check: installing cuML (pip install -e '.[gpu]')" >&2
  timeout 300 "$PY" -m pip install -q -e '.[gpu]' >&2 || echo "gpu_check: cuML could not be installed" >&2
fi

# The forest and the training throughput: one Python process, rows "check<TAB>result<TAB>reference" to $ROWS.
"$PY" - "$ROWS" <<'EOF'
import sys, time
import numpy as np, timm, torch
from sklearn.datasets import make_classification
from catdog.config import ForestConfig
from catdog.forest import cuml_available, fit_cuml, fit_sklearn

rows = open(sys.argv[1], "a")
# A store-sized problem: 20,000 images x 1,280 features (EfficientNet-Lite0's width), 2 classes, 100 trees.
x, y = make_classification(20000, 1280, n_informative=64, random_state=0)
x = x.astype(np.float32)
cfg = ForestConfig(n_estimators=100, max_depth=16)
fits = [("sklearn", fit_sklearn)] + ([("cuml", fit_cuml)] if cuml_available() else [])
for name, fit in fits:
    start = time.perf_counter()
    predict, _ = fit(cfg, x[:16000], y[:16000])
    seconds = time.perf_counter() - start
    rows.write(f"forest {name} (16k x 1280, 100 trees, depth 16)\t{(predict(x[16000:]) == y[16000:]).mean():.2%} "
               f"test, fit {seconds:.1f} s\t-\n")
if not cuml_available():
    rows.write("forest cuml\tskipped: cuML is not installed and could not be (pip install 'catdog[gpu]')\t-\n")

# timm's benchmark.py, train, AMP, NHWC, batch 256, 224 px: results/benchmark-train-amp-nhwc-pt112-cu113-rtx3090.csv
# (github.com/huggingface/pytorch-image-models). timm has published no train numbers for the A100, H100 or H200.
REFERENCE = {"NVIDIA GeForce RTX 3090": {"resnet101": 747.89, "convnext_tiny": 819.24}}
card = torch.cuda.get_device_name()
for model_name in ("resnet101", "convnext_tiny"):
    model = timm.create_model(model_name, pretrained=False).cuda().to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(256, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (256,), device="cuda")
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    start, steps = time.perf_counter(), 20
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    rate = steps * 256 / (time.perf_counter() - start)
    known = REFERENCE.get(card, {}).get(model_name)
    rows.write(f"train {model_name} on {card} (bf16, NHWC, batch 256)\t{rate:,.0f} images/s\t"
               + (f"timm {known:,.0f} images/s" if known else "unknown for this card (timm: RTX 3090 only, "
                  f"{REFERENCE['NVIDIA GeForce RTX 3090'][model_name]:,.0f} images/s)") + "\n")
    del model, optimizer
    torch.cuda.empty_cache()
EOF

# Extraction against the forward pass alone: a 1-epoch run on 2,000 synthetic 256 px JPEGs, then jobs/extract.py.
"$PY" - "$WORK/data" <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, "tests")
from conftest import make_image_folder
make_image_folder(Path(sys.argv[1]), {"train": 1000, "test": 50, "val": 50}, size=(256, 256))
EOF
"$PY" jobs/train.py --model efficientnet_lite0 --data "$WORK/data" --out "$WORK/run" optim.epochs=1 \
  train.max_train_batches=2 train.linear_probe=false > "$WORK/train.log" 2>&1 || { tail -5 "$WORK/train.log"; exit 1; }
"$PY" jobs/extract.py --run "$WORK/run" --data "$WORK/data" extract.splits=[train] extract.num_workers=8 \
  > "$WORK/extract.log" 2>&1 || { tail -5 "$WORK/extract.log"; exit 1; }
extracted=$(grep -o '[0-9.]* images/s' "$WORK/extract.log" | tail -1)
"$PY" - "$WORK/run" "$extracted" "$ROWS" <<'EOF'
import sys, time
import torch
from catdog.run import RunDir
network = RunDir(sys.argv[1]).load_model()[0].cuda().eval().to(memory_format=torch.channels_last)
size = RunDir(sys.argv[1]).config().data.image_size
batch = torch.randn(64, 3, size, size, device="cuda").contiguous(memory_format=torch.channels_last)
with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
    for _ in range(5):
        network(batch)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(50):
        network(batch)
    torch.cuda.synchronize()
forward = 50 * 64 / (time.perf_counter() - start)
with open(sys.argv[3], "a") as rows:
    rows.write(f"extract efficientnet_lite0, 1,000 JPEGs at {size} px\t{sys.argv[2]}\tforward pass alone "
               f"{forward:,.0f} images/s (bf16, batch 64)\n")
EOF

if "$PY" -m pytest -q -m gpu > "$WORK/pytest.log" 2>&1; then status=passed; else status=FAILED; fi
printf 'pytest -m gpu\t%s: %s\t-\n' "$status" "$(tail -1 "$WORK/pytest.log")" >> "$ROWS"

echo
{ printf 'check\tresult\treference\n'; cat "$ROWS"; } | column -t -s $'\t'
[ "$status" = passed ]
