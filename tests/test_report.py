import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from catdog.cam import gradcam
from catdog.errors import CatdogError
from catdog.io import read_json, write_json
from catdog.report import architecture, report
from catdog.sweep import plot_accuracy, write_results
from conftest import tiny_config

CHROMIUM = shutil.which("chromium")
CHECK_SCRIPT = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const marker = document.createElement("pre");
  marker.id = "browser-check";
  marker.textContent = JSON.stringify({
    images: images.length,
    loaded: images.filter(image => image.complete && image.naturalWidth > 0).length,
    tables: document.querySelectorAll("table").length,
  });
  document.body.appendChild(marker);
});
</script>"""


def chromium(profile: Path, *args: str) -> str:
    """Headless Chromium with no network (every host name fails to resolve); returns stdout."""
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--host-resolver-rules=MAP * ~NOTFOUND", *args],
        capture_output=True, text=True, timeout=120, check=True)
    return result.stdout


def browser_check(page: Path, workdir: Path, screenshot: Path | None = None) -> dict:
    """Open ``page`` in Chromium: how many images it has, how many decoded, how many tables; optionally a screenshot."""
    checked = workdir / "checked.html"
    checked.write_text(page.read_text().replace("</body>", CHECK_SCRIPT + "</body>"))
    dom = chromium(workdir / "profile", "--dump-dom", checked.as_uri())
    found = re.search(r'<pre id="browser-check">(.*?)</pre>', dom)
    assert found, f"the check script did not run; DOM starts: {dom[:300]}"
    if screenshot is not None:
        chromium(workdir / "profile", f"--screenshot={screenshot}", "--window-size=1280,2000", "--hide-scrollbars",
                 page.as_uri())
    return json.loads(found.group(1))


def _png(path: Path, colour: tuple[int, int, int]) -> None:
    Image.new("RGB", (120, 60), colour).save(path)


def add_later_stages(run: Path) -> None:
    """Forest, sweep and top-activation outputs in the layout their jobs write (small made-up numbers)."""
    write_json(run / "forest" / "summary.json", {
        "train_accuracy": 1.0, "test_accuracy": 0.75, "val_accuracy": 0.7, "backend": "sklearn",
        "n_estimators": 10, "classes": ["cat", "dog"], "top10": {"global": [3, 1, 2], "cat": [1], "dog": [2]}})
    rows = [{"k": str(k), "classifier": "lr", "n_features": k, "test_accuracy": 0.6 + k / 10_000,
             "val_accuracy": 0.55 + k / 10_000, "fit_seconds": 0.01, "estimator": "LogisticRegression",
             "params": "{}", "ranking": "global"} for k in (10, 100, 1280)]
    (run / "sweep").mkdir()
    write_results(run / "sweep" / "results.csv", rows)
    plot_accuracy([{key: str(value) for key, value in row.items()} for row in rows],
                  run / "sweep" / "accuracy_vs_k.png")
    (run / "topact").mkdir()
    classes = {}
    for name, colour in (("cat", (200, 40, 40)), ("dog", (40, 160, 40))):
        classes[name] = []
        for rank, feature in enumerate((7, 42), start=1):
            _png(run / "topact" / f"{name}-f{feature}.png", colour)
            classes[name].append({"feature": feature, "rank": rank, "montage": f"{name}-f{feature}.png",
                                  "class_shares": {"cat": 0.8, "dog": 0.2},
                                  "images": [{"path": f"train/{name}/{name}.0.jpg", "row": 0, "activation": 1.5,
                                              "label": name}]})
    write_json(run / "topact" / "index.json",
               {"split": "train", "images_per_feature": 1, "selectivity_top": 5, "classes": classes})
    (run / "concepts").mkdir()
    classes = {}
    for name, colour in (("cat", (200, 120, 40)), ("dog", (40, 120, 200))):
        _png(run / "concepts" / f"{name}-samples.png", colour)
        concepts = []
        for number in (1, 2):
            _png(run / "concepts" / f"{name}-c{number}.png", colour)
            concepts.append({"concept": number, "importance": 1.5 / number, "importance_std": 0.2,
                             "random_importance": 0.1, "random_importance_std": 0.05, "beats_random": 0.9,
                             "mean_coefficient": 0.3, "top_channels": [5, 1, 9, 2, 7], "montage": f"{name}-c{number}.png",
                             "images": [{"path": f"train/{name}/{name}.0.jpg", "row": 0, "value": 2.0,
                                         "label": name, "position": [1, 1]}]})
        classes[name] = {"images": 24, "positions": 96, "reconstruction_error": 0.4, "importance_images": 5,
                         "mean_logit": 1.2, "seconds": 1.0, "peak_rss_mib": 900.0, "concepts": concepts,
                         "sample_images": [f"val/{name}/{name}.1.jpg"], "sample_figure": f"{name}-samples.png"}
    write_json(run / "concepts" / "index.json", {
        "split": "train", "importance_split": "val", "concepts_per_class": 2, "factorisation": "NMF",
        "importance": "logit drop", "random_baseline": "random direction", "cam_method": "gradcam",
        "classes": classes})
    write_json(run / "robustness" / "summary.json", made_up_robustness(str(run)))


ROBUSTNESS = {"clean": (0.9, 0.8), "gaussian_noise": (0.6, 0.7), "gaussian_blur": (0.7, 0.5), "jpeg": (0.8, 0.75),
              "brightness": (0.85, 0.8), "contrast": (0.5, 0.55)}
"""Made-up (fine-tuned, linear probe) accuracies: noise and contrast below the probe."""


def made_up_robustness(run: str) -> dict:
    """A robustness summary in the layout jobs/robustness.py writes (its parameters from catdog.robustness)."""
    from catdog.robustness import SEED, SEVERITY, corruption_parameters

    results = {name: {"fine_tuned": ft, "linear_probe": lp, "difference": ft - lp, "fine_tuned_correct": round(ft * 20),
                      "linear_probe_correct": round(lp * 20)} for name, (ft, lp) in ROBUSTNESS.items()}
    corrupted = [r for name, r in results.items() if name != "clean"]
    mean = {key: float(np.mean([r[key] for r in corrupted])) for key in ("fine_tuned", "linear_probe", "difference")}
    return {"run": run, "model": "efficientnet_lite0", "data": "/data/other", "split": "val", "classes": ["cat", "dog"],
            "images": 20, "skipped": [], "models": ["fine_tuned", "linear_probe"], "linear_probe": True, "note": None,
            "precision": "no", "device": "cpu", "image_size": 64, "severity": SEVERITY, "seed": SEED,
            "corruptions": corruption_parameters(64), "results": results, "mean_corrupted": mean,
            "below_linear_probe": [name for name, r in results.items() if r["difference"] < 0], "seconds": 1.0}


@pytest.fixture(scope="module")
def full_report(tiny_run, synthetic_root, tmp_path_factory) -> Path:
    """A report of a run with every stage present (Grad-CAM computed for real, later stages made up)."""
    root = tmp_path_factory.mktemp("full")
    run = root / "lite0"
    shutil.copytree(tiny_run, run)
    add_later_stages(run)
    gradcam([run], synthetic_root, root / "out", tiny_config("gradcam.images_per_class=1",
                                                             "gradcam.faithfulness_images=4",
                                                             "gradcam.sanity_images_per_class=1",
                                                             "gradcam.road_percentiles=[50]"))
    report([run], root / "report", root / "out" / "gradcam")
    return root / "report"


def test_report_of_a_run_with_missing_stages(tiny_run, tmp_path):
    summary = report([tiny_run], tmp_path / "report")
    page = (tmp_path / "report" / "index.html").read_text()
    assert read_json(tmp_path / "report" / "summary.json") == json.loads(json.dumps(summary))
    (run,) = summary["runs"]
    assert 0 <= run["training"]["val_accuracy"] <= 1 and len(run["training"]["curve"]) == 1
    for stage, job in (("forest", "jobs/forest.py"), ("sweep", "jobs/sweep.py"), ("topact", "jobs/topact.py"),
                       ("concepts", "jobs/concepts.py"), ("robustness", "jobs/robustness.py")):
        assert job in run[stage]["missing"]
        assert f"missing (run python {job}" in page or f"then python {job}" in page
    assert run["robustness"]["missing"] == f"run python jobs/robustness.py --run {tiny_run} --data DATA_ROOT"
    assert "jobs/gradcam.py --runs" in summary["gradcam"]["missing"]
    assert page.count('class="missing"') == 6
    assert "data:image/png;base64," in page  # the training curves


def test_training_not_finished_is_shown_as_missing(tiny_run, tmp_path):
    run = tmp_path / "unfinished"
    shutil.copytree(tiny_run, run)
    (run / "summary.json").unlink()
    summary = report([run], tmp_path / "report")
    assert summary["runs"][0]["training"]["missing"] == f"run accelerate launch jobs/train.py --out {run} --data DATA_ROOT --resume"
    assert summary["runs"][0]["architecture"]["missing"] == summary["runs"][0]["training"]["missing"]
    assert summary["runs"][0]["training"]["curve"]  # metrics.jsonl is still drawn


def test_report_needs_existing_run_directories(tmp_path):
    with pytest.raises(CatdogError, match="no such directory"):
        report([tmp_path / "absent"], tmp_path / "report")


def test_architecture_walks_the_backbone():
    arch = architecture("efficientnet_lite0", 2, 64)
    layers = {layer["name"]: layer for layer in arch["layers"]}
    assert layers["conv_stem"]["output_shape"] == [1, 32, 32, 32]
    assert layers["bn2"]["output_shape"] == [1, 1280, 2, 2]
    assert layers["classifier"]["output_shape"] == [1, 2] and layers["classifier"]["parameters"] == 1280 * 2 + 2
    assert sum(layer["parameters"] for layer in arch["layers"]) == arch["parameters"]


def test_full_report_shows_every_stage(full_report):
    page = (full_report / "index.html").read_text()
    summary = read_json(full_report / "summary.json")
    assert 'class="missing"' not in page
    (run,) = summary["runs"]
    assert run["forest"]["summary"]["test_accuracy"] == 0.75 and "75.00%" in page
    assert [row["k"] for row in run["sweep"]["rows"]] == ["10", "100", "1280"]
    assert [e["feature"] for e in run["topact"]["classes"]["dog"]] == [7, 42]
    gradcam = summary["gradcam"]["summary"]["models"][0]["methods"]["gradcam"]
    assert gradcam["n_images"] == 4 and set(gradcam["road"]["morf"]) == {"50"}
    assert "ROAD combined" in page and "confidence change" in page and "Sanity check" in page
    assert [c["concept"] for c in run["concepts"]["classes"]["dog"]["concepts"]] == [1, 2]
    assert "1.500 ± 0.200" in page and "0.100 ± 0.050" in page  # a concept's importance and its random baseline
    # curves, gradcam grid and sanity plot, sweep plot, 4 top-activation montages, 4 concept montages and
    # 2 concept-sample figures; every image embedded, nothing fetched
    assert page.count("<img ") == 14 == page.count('src="data:image/png;base64,')
    # overview, training x2, architecture, robustness, forest x2, sweep, topact x2, faithfulness, ROAD percentiles,
    # sanity, concepts x2
    assert page.count("<table>") == 15 and "{'" not in page  # no Python reprs leak into the page


def test_report_escapes_html_in_values(full_report, tmp_path):
    run = tmp_path / "run<b>"
    shutil.copytree(Path(read_json(full_report / "summary.json")["runs"][0]["run"]), run)
    forest = read_json(run / "forest" / "summary.json")
    write_json(run / "forest" / "summary.json", {**forest, "backend": "<script>alert(1)</script>"})
    report([run], tmp_path / "report")
    page = (tmp_path / "report" / "index.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "run&lt;b&gt;" in page and "run<b>" not in page


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not on PATH (Debian: apt-get install -y chromium)")
def test_report_opens_in_headless_chromium(full_report, tmp_path):
    screenshot = full_report / "screenshot.png"
    result = browser_check(full_report / "index.html", tmp_path, screenshot)
    assert result["images"] == 14 and result["loaded"] == 14
    assert result["tables"] == (full_report / "index.html").read_text().count("<table>") == 15
    shot = Image.open(screenshot)
    assert shot.size == (1280, 2000)
    assert len(np.unique(np.asarray(shot.convert("L")))) > 20  # a rendered page, not a blank one


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not on PATH (Debian: apt-get install -y chromium)")
def test_browser_check_sees_a_broken_image(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><body><img src="data:image/png;base64,bm90IGEgcG5n">'
                    '<img src="https://example.com/a.png"><table><tr><td>1</td></tr></table></body></html>')
    assert browser_check(page, tmp_path) == {"images": 2, "loaded": 0, "tables": 1}


def test_sanity_flags_are_shown(full_report, tmp_path):
    """A flagged method is named in a flag box; one that passes says so."""
    from catdog.report import render

    summary = read_json(full_report / "summary.json")
    gradcam = summary["gradcam"]
    methods = gradcam["summary"]["models"][0]["methods"]
    methods["gradcam"]["sanity_flags"] = ["maps barely change when every layer is randomised"]
    methods["layercam"] = {**methods["gradcam"], "sanity_flags": []}
    page = render(summary["runs"], gradcam, "now")
    assert page.count('class="flag">flagged:') == 1 and "flagged: efficientnet_lite0 gradcam" in page
    assert "efficientnet_lite0 layercam: passes" in page


def _section(page: str, title: str) -> str:
    """The HTML from the ``<h3>`` titled ``title`` up to the next heading."""
    start = page.index(f"<h3>{title}")
    return page[start:re.search(r"<h[1-3]>", page[start + 4:]).start() + start + 4]


def _rows(html_table: str) -> list[list[str]]:
    """Each body row's cells as text."""
    body = html_table[html_table.index("<tbody>"):]
    return [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in re.findall(r"<tr[^>]*>(.*?)</tr>", body)]


def test_robustness_section_flags_rows_below_the_probe(full_report):
    page = (full_report / "index.html").read_text()
    summary = read_json(full_report / "summary.json")
    robustness = summary["runs"][0]["robustness"]["summary"]
    assert robustness["below_linear_probe"] == ["gaussian_noise", "contrast"]
    section = _section(page, "Robustness")
    assert "/data/other/val" in section and "severity 3" in section
    rows = {row[0]: row for row in _rows(section)}
    assert list(rows) == [*ROBUSTNESS, "mean of the corruptions"]
    assert rows["clean"][3:] == ["90.00%", "80.00%", "+10.00 pt", ""]
    assert rows["gaussian_noise"][3:] == ["60.00%", "70.00%", "-10.00 pt", "below the probe"]
    assert rows["contrast"][6] == "below the probe" and rows["gaussian_blur"][6] == ""
    assert rows["gaussian_noise"][1:3] == ["gaussian_noise", "mean 0.0, sigma 0.18, clip True, seed 0"]
    assert rows["jpeg"][1:3] == ["jpeg", "quality 15"]
    # the flagged rows are marked, and named in a flag box
    assert section.count('<tr class="below">') == 2
    assert re.findall(r'<tr class="below"><td>(\w+)</td>', section) == ["gaussian_noise", "contrast"]
    assert '<p class="flag">fine-tuned below the linear probe on: gaussian_noise, contrast</p>' in section
    mean_difference = np.mean([ft - lp for name, (ft, lp) in ROBUSTNESS.items() if name != "clean"])
    assert rows["mean of the corruptions"][5] == f"{100 * mean_difference:+.2f} pt"


def test_robustness_without_a_probe(full_report, tmp_path):
    from catdog.report import render

    summary = read_json(full_report / "summary.json")
    robustness = summary["runs"][0]["robustness"]["summary"]
    robustness.update(models=["fine_tuned"], linear_probe=False, below_linear_probe=[],
                      note="RUN/linear_probe.safetensors is missing: scoring the fine-tuned model alone")
    for result in [*robustness["results"].values(), robustness["mean_corrupted"]]:
        result.update(linear_probe=None, difference=None)
    section = _section(render(summary["runs"], summary["gradcam"], "now"), "Robustness")
    assert "scoring the fine-tuned model alone" in section and 'class="flag"' not in section
    assert "below" not in "".join(row[6] for row in _rows(section))
    assert [row[3:6] for row in _rows(section)][0] == ["90.00%", "—", "—"]


def test_linear_probe_beside_the_fine_tuned_accuracy(tiny_run, tmp_path):
    """summary.json's linear_probe_{test,val}_accuracy in the training table; an older run without them: —."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    train_summary = read_json(run / "summary.json")
    write_json(run / "summary.json", {**train_summary, "linear_probe_test_accuracy": 0.9125,
                                      "linear_probe_val_accuracy": 0.8875})
    collected = report([run], tmp_path / "with")
    assert collected["runs"][0]["training"]["linear_probe_val_accuracy"] == 0.8875
    section = _section((tmp_path / "with" / "index.html").read_text(), "Training")
    headers = re.findall(r"<th>(.*?)</th>", section)
    (row, *_) = _rows(section)
    cells = dict(zip(headers, row))
    assert cells["linear probe test"] == "91.25%" and cells["linear probe val"] == "88.75%"
    assert cells["val accuracy"] == f"{100 * train_summary['val_accuracy']:.2f}%"

    write_json(run / "summary.json", {key: value for key, value in train_summary.items()
                                      if not key.startswith("linear_probe")})
    collected = report([run], tmp_path / "without")
    assert collected["runs"][0]["training"]["linear_probe_test_accuracy"] is None
    section = _section((tmp_path / "without" / "index.html").read_text(), "Training")
    cells = dict(zip(re.findall(r"<th>(.*?)</th>", section), _rows(section)[0]))
    assert cells["linear probe test"] == cells["linear probe val"] == "—"
    assert "Linear probe:" not in section
