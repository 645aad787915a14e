import base64
import html
import io
import json
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image

from catdog.cam import draw_grid, gradcam
from catdog.concepts import draw_concept_montage, draw_samples
from catdog.errors import CatdogError
from catdog.io import read_json, write_json
from catdog.report import PAGE_WIDTH, THUMBNAIL_WIDTH, architecture, report
from catdog.sweep import plot_accuracy, write_results
from catdog.topact import montage_png
from conftest import run_script, tiny_config

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
    scaled: images.filter(image => image.naturalWidth > 0 && Math.abs(image.width - image.naturalWidth) > 1)
                  .map(image => `${image.alt}: ${image.naturalWidth} px shown at ${image.width}`),
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
    """Open ``page`` in Chromium, 1280 px wide: how many images it has, how many decoded, how many tables, which
    images are shown at another width than their own; optionally a screenshot."""
    checked = workdir / "checked.html"
    checked.write_text(page.read_text().replace("</body>", CHECK_SCRIPT + "</body>"))
    dom = chromium(workdir / "profile", "--dump-dom", "--window-size=1280,2000", checked.as_uri())
    found = re.search(r'<pre id="browser-check">(.*?)</pre>', dom)
    assert found, f"the check script did not run; DOM starts: {dom[:300]}"
    if screenshot is not None:
        chromium(workdir / "profile", f"--screenshot={screenshot}", "--window-size=1280,2000", "--hide-scrollbars",
                 page.as_uri())
    return json.loads(found.group(1))


def _png(path: Path, colour: tuple[int, int, int]) -> None:
    Image.new("RGB", (120, 60), colour).save(path)


IMG = re.compile(r'<img alt="([^"]*)" width="(\d+)" height="(\d+)" src="data:image/(png|jpeg);base64,([^"]+)">')


def shown_images(page: str) -> list[dict]:
    """Every embedded image: its alt text, the size the page shows it at, its format, bytes and decoded size."""
    images = []
    for alt, width, height, kind, data in IMG.findall(page):
        raw = base64.b64decode(data)
        with Image.open(io.BytesIO(raw)) as image:
            images.append({"alt": html.unescape(alt), "shown": (int(width), int(height)), "kind": kind,
                           "bytes": len(raw), "size": image.size, "format": image.format})
    return images


def assert_shown_at_natural_size(page: str) -> list[dict]:
    """Every ``<img>`` is embedded and shown at its own size, no wider than the page; returns them."""
    images = shown_images(page)
    assert len(images) == page.count("<img ")
    for image in images:
        assert image["size"] == image["shown"], image["alt"]
        assert image["format"] == image["kind"].upper() and image["size"][0] <= PAGE_WIDTH, image["alt"]
    return images


LONG_DECIMALS = re.compile(r"\d\.\d{5,}")


def long_numbers(page: str) -> list[str]:
    """Table cells with a number of more than 4 decimals (a raw float)."""
    return [cell for cell in re.findall(r"<td[^>]*>(.*?)</td>", page) if LONG_DECIMALS.search(cell)]


def add_later_stages(run: Path) -> None:
    """Forest, sweep and top-activation outputs in the layout their jobs write (small made-up numbers)."""
    write_json(run / "forest" / "summary.json", {
        "train_accuracy": 1.0, "test_accuracy": 0.75, "val_accuracy": 0.7, "backend": "sklearn",
        "oob_score": 0.7183098591549296,
        "n_estimators": 10, "classes": ["cat", "dog"], "top10": {"global": [3, 1, 2], "cat": [1], "dog": [2]}})
    rows = [{"k": str(k), "classifier": "lr", "n_features": k, "test_accuracy": 0.6 + k / 10_000,
             "val_accuracy": 0.55 + k / 10_000, "fit_seconds": 0.19062469700020301, "estimator": "LogisticRegression",
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
    assert page.count('class="missing"') == 7 and "missing (run python jobs/audit.py --run" in page  # and the audit
    assert "data:image/png;base64," in page  # the training curves
    assert summary["compare"] is None and "Comparison" not in page  # one run, no --compare: no comparison section


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
    assert page.count('class="missing"') == 1 and "missing (run python jobs/audit.py" in page  # only the audit
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
    # 2 concept-sample figures; every image embedded, nothing fetched: the plots as PNG, the rest (photos) as JPEG
    assert page.count("<img ") == 14 == len(shown_images(page))
    assert page.count('src="data:image/png;base64,') == 3 and page.count('src="data:image/jpeg;base64,') == 11
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
    assert result["scaled"] == []  # every image at its own width
    assert result["tables"] == (full_report / "index.html").read_text().count("<table>") == 15
    shot = Image.open(screenshot)
    assert shot.size == (1280, 2000)
    assert len(np.unique(np.asarray(shot.convert("L")))) > 20  # a rendered page, not a blank one


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not on PATH (Debian: apt-get install -y chromium)")
def test_browser_check_sees_a_broken_image(tmp_path):
    """Broken and fetched images do not load; one squeezed by the layout is named."""
    wide = io.BytesIO()
    Image.new("RGB", (800, 10), (0, 0, 0)).save(wide, "PNG")
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><body><img src="data:image/png;base64,bm90IGEgcG5n">'
                    '<img src="https://example.com/a.png"><table><tr><td>1</td></tr></table>'
                    '<div style="width: 500px"><img alt="wide" style="max-width: 100%" src="data:image/png;base64,'
                    f'{base64.b64encode(wide.getvalue()).decode()}"></div></body></html>')
    assert browser_check(page, tmp_path) == {"images": 3, "loaded": 1, "tables": 1,
                                             "scaled": ["wide: 800 px shown at 500"]}


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


def test_numbers_at_display_precision(full_report):
    """Raw floats (the sweep's fit_seconds, the forest's extra scores) reach no table cell in full."""
    from catdog.report import _duration, _number

    page = (full_report / "index.html").read_text()
    assert long_numbers(page) == []
    cells = dict(zip(re.findall(r"<th>(.*?)</th>", _section(page, "Top-k")), _rows(_section(page, "Top-k"))[0]))
    assert cells["fit_seconds"] == "0.19 s" and cells["n_features"] == "10" and cells["test_accuracy"] == "60.10%"
    assert ["oob_score", "0.718"] in _rows(_section(page, "Random forest"))
    assert [_number(v) for v in (0.19062469700020301, 12.3456, 1234.5678, 1_234_567, 2.0, 0.000123, None, True)] == \
        ["0.191", "12.35", "1,235", "1,234,567", "2", "1.2e-04", "—", "True"]
    assert [_duration(v) for v in (0.19062469700020301, 12.345, 612.3456789, 7325.0)] == \
        ["0.19 s", "12.3 s", "10 min 12 s", "2 h 2 min"]


def photo_like(rng: np.random.Generator, size: int = 224) -> np.ndarray:
    """A synthetic photo: smooth colour fields under fine texture, which compresses (PNG and JPEG) at least as badly
    as the val photos do in the stages' figures."""
    low = Image.fromarray((rng.random((6, 6, 3)) * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    return np.clip(np.asarray(low, dtype=np.float32) + rng.normal(0, 32, (size, size, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def realistic_report(full_report, tmp_path_factory) -> Path:
    """full_report's run with figures the size the stages draw them with their defaults: 5 features and 5 concepts
    per class with 10 photos of 224 px each, the concepts' sample figures, a grid of two models."""
    root = tmp_path_factory.mktemp("realistic")
    run = root / "lite0"
    shutil.copytree(Path(read_json(full_report / "summary.json")["runs"][0]["run"]), run)
    shutil.copytree(full_report.parent / "out" / "gradcam", root / "gradcam")
    rng = np.random.default_rng(0)
    photos = [photo_like(rng) for _ in range(10)]
    titles = [f"{rng.random() * 5:.2f} · cat\ncat.{i}.jpg" for i in range(10)]
    feature = montage_png(photos, rng.random((10, 7, 7)).astype(np.float32), titles,
                          "cat: feature 7 (rank 1), top 10 train images; among its top 100: cat 80%, dog 20%",
                          "jet", 0.5)
    draw_concept_montage([Image.fromarray(photo) for photo in photos], rng.random((10, 7, 7)).astype(np.float32),
                         titles, "cat: concept 1 of 5; logit drop when removed 1.234 vs 0.100 for a random direction; "
                         "its top 10 train regions", 3, 0.5, root / "concept.png")
    draw_samples([Image.fromarray(photo) for photo in photos[:3]], rng.random((3, 7, 7)), rng.random((3, 5, 7, 7)),
                 titles[:3], "gradcam", [f"concept {c}" for c in range(1, 6)], 0.5, root / "samples.png")
    draw_grid([photo / 255 for photo in photos[:6]], titles[:6],
              [{"title": f"model {m}\ngradcam", "maps": rng.random((6, 7, 7)).astype(np.float32),
                "predictions": [{"predicted": "cat", "probability": 0.97, "label": "cat"}] * 6} for m in "ab"],
              root / "gradcam" / "grid.png")
    topact, concepts = read_json(run / "topact" / "index.json"), read_json(run / "concepts" / "index.json")
    for name in ("cat", "dog"):
        entries = topact["classes"][name]
        topact["classes"][name] = [{**entries[0], "feature": f, "rank": f, "montage": f"{name}-f{f}.png"}
                                   for f in range(1, 6)]
        concept = concepts["classes"][name]["concepts"][0]
        concepts["classes"][name]["concepts"] = [{**concept, "concept": c, "montage": f"{name}-c{c}.png"}
                                                 for c in range(1, 6)]
        for f in range(1, 6):
            (run / "topact" / f"{name}-f{f}.png").write_bytes(feature)
            shutil.copy(root / "concept.png", run / "concepts" / f"{name}-c{f}.png")
        shutil.copy(root / "samples.png", run / "concepts" / f"{name}-samples.png")
    concepts["concepts_per_class"] = 5
    write_json(run / "topact" / "index.json", topact)
    write_json(run / "concepts" / "index.json", concepts)
    report([run], root / "report", root / "gradcam")
    return root / "report"


PAGE_BUDGET = 8_000_000
"""Bytes of one model's report with every section (issue 20: 23.6 MB with PNG data URIs)."""
BYTES_PER_PIXEL = 0.35
"""Budget of an embedded image per pixel shown (a PNG of the photo montages took about 1.5)."""


def test_images_are_embedded_at_the_size_they_are_shown(realistic_report):
    page = (realistic_report / "index.html").read_text()
    assert len(page.encode()) <= PAGE_BUDGET
    images = assert_shown_at_natural_size(page)
    # curves, grid, sanity, sweep, 10 top-activation and 10 concept montages, 2 concept-sample figures
    assert len(images) == 26
    for image in images:
        width, height = image["size"]
        assert image["bytes"] <= BYTES_PER_PIXEL * width * height, image["alt"]
    kinds = {image["alt"]: image["kind"] for image in images}
    assert kinds["Grad-CAM grid"] == "jpeg" and kinds["accuracy against k"] == "png"
    # the montages (1300 and 1200 px drawn) as thumbnails, two across, each a link to its own PNG
    galleries = "".join(re.findall(r'<div class="gallery">(.*?)</div>', page))
    thumbnails = shown_images(galleries)
    assert len(thumbnails) == 20 and {image["size"][0] for image in thumbnails} == {THUMBNAIL_WIDTH}
    links = re.findall(r'<a href="([^"]+)"[^>]*><img alt="([^"]*)"', galleries)
    assert len(links) == 20
    for href, alt in links:
        target = (realistic_report / unquote(href)).resolve()
        assert target.suffix == ".png" and target.is_file() and target.parent.name in ("topact", "concepts"), alt
    # the sample figures (1400 px) at the page's width, linked too
    samples = [image for image in images if "concept maps beside the CAMs" in image["alt"]]
    assert [image["size"][0] for image in samples] == [PAGE_WIDTH] * 2
    assert page.count('<a href="../lite0/concepts/cat-samples.png"') == 1


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not on PATH (Debian: apt-get install -y chromium)")
def test_realistic_report_in_chromium_shows_every_image_at_its_width(realistic_report, tmp_path):
    """The thumbnails two across and the full-width figures fit the page: none is scaled by the layout."""
    result = browser_check(realistic_report / "index.html", tmp_path)
    assert result["images"] == result["loaded"] == 26 and result["scaled"] == []


def made_up_comparison(folder: Path, runs: list[Path]) -> dict:
    """``OUT/compare/summary.json`` in the layout catdog.compare writes (raw floats, as computed), with a
    disagreement montage and cam_style.png."""
    rng = np.random.default_rng(1)

    def stats(values: np.ndarray) -> dict:
        return {"n": len(values), "mean": float(values.mean()), "std": float(values.std()),
                "median": float(np.median(values)), "q25": float(np.quantile(values, 0.25)),
                "q75": float(np.quantile(values, 0.75))}

    def run(path: Path, seconds: float, game: dict | None) -> dict:
        style = {"images": 200, "area_above_half_max": stats(rng.beta(3, 6, 200)),
                 "entropy": stats(rng.beta(8, 2, 200)), "pointing_game": game}
        style["pointing_game_note"] = "not available: DATA has no masks/ folder" if game is None else None
        return {"name": path.name, "run": str(path), "model": "efficientnet_lite0", "test_accuracy": 0.99,
                "val_accuracy": 0.9875, "val_accuracy_recomputed": 0.9875,
                "linear_probe_test_accuracy": 0.98, "linear_probe_val_accuracy": 0.985,
                "train_seconds": seconds, "images_per_second": 20.123456789, "epochs": 5, "parameters": 4_800_000,
                "trainable_parameters": 4_700_000, "image_size": 260, "mixed_precision": "bf16", "device": "cpu",
                "tta_hflip": True, "checkpoint_sha256": "ab12", "cam_style": style}

    folder.mkdir(parents=True)
    (a, b) = runs
    runs_entries = [run(a, 612.3456789, {"hits": 180, "images": 200, "accuracy": 0.9}), run(b, 291.1111111, None)]
    montage = f"disagreements-{a.name}-vs-{b.name}.png"
    draw_grid([photo_like(rng) / 255 for _ in range(2)], ["cat: cat.1.jpg", "dog: dog.2.jpg"],
              [{"title": name, "maps": rng.random((2, 7, 7)).astype(np.float32),
                "predictions": [{"predicted": "cat", "probability": 0.61, "label": "cat"},
                                {"predicted": "cat", "probability": 0.55, "label": "dog"}]} for name in ("a", "b")],
              folder / montage)
    _png(folder / "cam_style.png", (250, 250, 250))
    summary = {
        "data": "/abs/data/root", "split": "val", "method": "gradcam", "top_fraction": 0.2, "target": "true",
        "map_size": 64, "gradcam": "OUT/gradcam/summary.json", "cam_style_plot": "cam_style.png", "runs": runs_entries,
        "pairs": [{"a": a.name, "b": b.name, "train_time_ratio": 612.3456789 / 291.1111111,
                   "disagreement": {"images": 1000, "both_right": 985, "a_only_right": 7, "b_only_right": 5,
                                    "both_wrong": 3, "predictions_differ": 12, "mcnemar_p": 0.7744140625,
                                    "mcnemar_test": "exact two-sided binomial test on the discordant pairs",
                                    "montage": montage,
                                    "examples": [{"image": "val/cat/cat.1.jpg", "label": "cat",
                                                  "a": {"predicted": "cat", "probability": 0.97},
                                                  "b": {"predicted": "dog", "probability": 0.61}}]},
                   "cam_agreement": {"images": 200, "spearman": stats(rng.beta(6, 3, 200)),
                                     "top_iou": stats(rng.beta(4, 4, 200))},
                   "features": {"images": 1000, "cka": 0.8312345678,
                                "cka_shuffled": {"mean": 0.0101234, "std": 0.0021234, "shuffles": 20},
                                "logistic_regression": {"a": 0.992, "b": 0.991, "concatenated": 0.994,
                                                        "C": {"a": 0.1, "b": 0.31622776601683794,
                                                              "concatenated": 0.01},
                                                        "fit_split": "train", "chosen_on": "test",
                                                        "scored_on": "val"}},
                   "sentence": f"{b.name}'s maps cover 31% of the image vs {a.name}'s 48%; they agree <more> here"}]}
    write_json(folder / "summary.json", summary)
    return summary


@pytest.fixture(scope="module")
def two_runs(full_report, tmp_path_factory) -> list[Path]:
    """Two copies of full_report's run, every stage present."""
    root = tmp_path_factory.mktemp("two")
    source = Path(read_json(full_report / "summary.json")["runs"][0]["run"])
    for name in ("lite0", "mnv2"):
        shutil.copytree(source, root / name)
    return [root / "lite0", root / "mnv2"]


def _h2_section(page: str, title: str) -> str:
    start = page.index(f"<h2>{title}")
    end = page.find("<h2>", start + 4)
    return page[start:end if end > 0 else len(page)]


def _cells(page: str, header: str) -> list[dict[str, str]]:
    """Each body row of the table with the column ``header``, by header."""
    column = page.index(f"<th>{header}</th>")
    table = page[page.rindex("<table>", 0, column):page.index("</table>", column)]
    headers = re.findall(r"<th>(.*?)</th>", table)
    return [dict(zip(headers, row)) for row in _rows(table)]


def test_comparison_leads_the_page(full_report, two_runs, tmp_path, monkeypatch, capsys):
    comparison = made_up_comparison(tmp_path / "out" / "compare", two_runs)
    arguments = ["--runs", *two_runs, "--gradcam", full_report.parent / "out" / "gradcam",
                 "--compare", tmp_path / "out" / "compare", "--out", tmp_path / "report"]
    code, out, _ = run_script("jobs/report.py", arguments, monkeypatch, capsys)
    assert code == 0 and "compare: missing" not in out
    page = (tmp_path / "report" / "index.html").read_text()
    summary = read_json(tmp_path / "report" / "summary.json")
    assert summary["compare"]["summary"] == comparison and summary["compare"]["uncompared"] == []
    # first on the page: the comparison, then the overview, Grad-CAM and each run
    assert re.findall(r"<h2>(.*?)</h2>", page)[:3] == ["Comparison", "Runs", "Grad-CAM"]
    assert page.index("<h2>Comparison") < page.index("<table>")
    section = _h2_section(page, "Comparison")
    pair = "lite0 (a) vs mnv2 (b)"

    (lite0, mnv2) = _cells(section, "linear probe test / val")
    assert [lite0[key] for key in ("run", "test", "val", "linear probe test / val", "training time", "train images/s",
                                   "parameters (trainable)", "image size", "hflip TTA", "precision on device")] == \
        ["lite0 (efficientnet_lite0)", "99.00%", "98.75%", "98.00% / 98.50%", "10 min 12 s", "20.1",
         "4,800,000 (4,700,000)", "260", "yes", "bf16 on cpu"]
    assert mnv2["training time"] == "4 min 51 s" and "recomputed" not in section
    ratio = f"{612.3456789 / 291.1111111:.2f}×"
    assert _cells(section, "training time, a / b") == [{"pair": pair, "training time, a / b": ratio}]

    # the Grad-CAM grid: here, once, and not again in the Grad-CAM section
    assert 'alt="Grad-CAM grid"' in section and page.count('alt="Grad-CAM grid"') == 1
    assert "Grid: in the comparison above." in _h2_section(page, "Grad-CAM")

    style = section[section.index("<h3>Heat-map style"):]
    runs = {run["name"]: run["cam_style"] for run in comparison["runs"]}
    (a_style, b_style) = _cells(style, "pointing game")
    area = runs["lite0"]["area_above_half_max"]
    assert a_style["area ≥ half max"] == \
        f"{100 * area['median']:.1f}% [{100 * area['q25']:.1f}%, {100 * area['q75']:.1f}%]"
    entropy = runs["mnv2"]["entropy"]
    assert b_style["entropy"] == f"{entropy['median']:.3f} [{entropy['q25']:.3f}, {entropy['q75']:.3f}]"
    assert a_style["pointing game"] == "90.00% (180 of 200)"
    assert b_style["pointing game"] == "not available: DATA has no masks/ folder"
    agreement = comparison["pairs"][0]["cam_agreement"]
    (pair_style,) = _cells(style, "top-20% IoU")
    assert pair_style["top-20% IoU"] == (f"{agreement['top_iou']['median']:.3f} [{agreement['top_iou']['q25']:.3f}, "
                                         f"{agreement['top_iou']['q75']:.3f}]")
    assert html.escape(comparison["pairs"][0]["sentence"]) in section and "<more>" not in page
    assert 'alt="map style per model"' in style

    differ = section[section.index("<h3>Where the predictions differ"):]
    assert _rows(differ)[0] == [pair, "1,000", "985", "7", "5", "3", "12", "0.774"]
    montages = [image for image in shown_images(differ) if "only one of them gets right" in image["alt"]]
    assert [image["kind"] for image in montages] == ["jpeg"]

    (features,) = _cells(section, "linear CKA")
    assert features == {"pair": pair, "images": "1,000", "linear CKA": "0.831", "shuffled CKA": "0.010 ± 0.002",
                        "shuffles": "20", "a alone": "99.20%", "b alone": "99.10%", "concatenated": "99.40%",
                        "C chosen": "a 0.100, b 0.316, concatenated 0.010"}
    assert "fit on train, regularisation chosen on test, scored on val" in section
    assert long_numbers(page) == []
    assert_shown_at_natural_size(page)


def test_comparison_missing_or_partial(full_report, two_runs, tmp_path):
    """A missing comparison is shown with its command (also for two runs without --compare); a pair without
    disagreements says so; runs the comparison does not cover are named."""
    from catdog.report import collect_comparison, render
    from catdog.run import RunDir

    gradcam_dir = full_report.parent / "out" / "gradcam"
    summary = report(two_runs, tmp_path / "report", gradcam_dir, tmp_path / "absent")
    command = (f"run python jobs/compare.py --runs {two_runs[0]} {two_runs[1]} --data DATA_ROOT --out OUT_DIR, then "
               "pass --compare OUT_DIR/compare")
    assert summary["compare"] == {"missing": command}
    page = (tmp_path / "report" / "index.html").read_text()
    assert _h2_section(page, "Comparison") == \
        f'<h2>Comparison</h2><p class="missing">missing ({html.escape(command)})</p>'
    assert 'alt="Grad-CAM grid"' in _h2_section(page, "Grad-CAM")  # the grid stays in its own section

    comparison = made_up_comparison(tmp_path / "compare", two_runs)
    assert collect_comparison(None, [RunDir(two_runs[0])]) is None
    assert collect_comparison(None, [RunDir(path) for path in two_runs]) == {"missing": command}
    third = tmp_path / "third"
    collected = collect_comparison(tmp_path / "compare", [RunDir(path) for path in [*two_runs, third]])
    assert collected["uncompared"] == [str(third)]
    collected["summary"]["pairs"][0]["disagreement"]["montage"] = None
    first = collected["summary"]["runs"][0]
    first["val_accuracy_recomputed"] = 0.985
    first["cam_style"]["pointing_game_note"] = "3 of 200 images have no mask"
    page = render(summary["runs"], summary["gradcam"], "now", collected)
    assert f"the comparison does not cover {third}" in page
    assert "lite0 (a) vs mnv2 (b): no image only one of them gets right." in page
    assert ('<p class="flag">lite0: val accuracy recomputed from its checkpoint 98.50%, its summary.json says 98.75% '
            "(another device or precision?)</p>") in page
    assert _cells(page, "pointing game")[0]["pointing game"] == "90.00% (180 of 200); 3 of 200 images have no mask"
    assert comparison["pairs"][0]["disagreement"]["montage"] is not None
