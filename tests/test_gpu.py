"""What only a CUDA GPU can check (``pytest -m gpu``; bench/gpu_check.sh runs these): deselected without one."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from catdog.config import ForestConfig
from catdog.forest import cuml_available, fit_cuml, fit_sklearn
from conftest import run_script

pytestmark = pytest.mark.gpu  # deselected without a CUDA GPU (tests/conftest.py)


@pytest.mark.skipif(not cuml_available(), reason="needs cuML (pip install 'catdog[gpu]')")
def test_cuml_forest_agrees_with_scikit_learn():
    """Both backends on the same separable features: near the same test accuracy, the same top feature."""
    from sklearn.datasets import make_classification

    x, y = make_classification(4000, 64, n_informative=8, n_redundant=0, shuffle=False, random_state=0)
    x = x.astype(np.float32)
    cfg = ForestConfig(n_estimators=50, max_depth=12)
    scores = []
    for fit in (fit_sklearn, fit_cuml):
        predict, importances = fit(cfg, x[:3000], y[:3000])
        scores.append(((predict(x[3000:]) == y[3000:]).mean(), int(np.argmax(importances))))
    (sk_accuracy, sk_top), (cu_accuracy, cu_top) = scores
    assert abs(sk_accuracy - cu_accuracy) < 0.03 and cu_top < 8 and sk_top < 8  # an informative feature leads


def test_bf16_autocast_on_cuda_predicts_as_fp32_on_the_cpu(tiny_run, synthetic_root, tmp_path, monkeypatch, capsys):
    """jobs/predict.py under bf16 autocast on the GPU: the same classes as fp32 on the CPU, probabilities close."""
    rows = {}
    for device, precision in (("cuda", "bf16"), ("cpu", "no")):
        out = tmp_path / device
        code, _, err = run_script("jobs/predict.py", ["--run", tiny_run, "--out", out, "--device", device,
                                                      "--precision", precision, synthetic_root / "val"],
                                  monkeypatch, capsys)
        assert code == 0, err
        with open(out / "predictions.csv", newline="") as handle:
            rows[device] = list(csv.DictReader(handle))
    assert [r["predicted"] for r in rows["cuda"]] == [r["predicted"] for r in rows["cpu"]]
    gap = max(abs(float(a["p_cat"]) - float(b["p_cat"])) for a, b in zip(rows["cuda"], rows["cpu"]))
    assert gap < 0.05  # bf16 keeps 8 bits of mantissa
