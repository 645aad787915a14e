"""The report: one self-contained HTML page (images as data URIs, inline CSS) and ``summary.json`` for all runs.

Given a comparison of the runs (``jobs/compare.py``), the page leads with it: accuracy and cost side by side, the
Grad-CAM grid with a column per model, the maps' style and agreement, where the predictions differ (McNemar) and
how alike the features are (CKA, a logistic regression on both).

Per run: training curves and accuracies next to the seed's, training time and speed, an architecture summary,
the linear probe's accuracies beside the fine-tuned ones, robustness to corruptions (fine-tuned against the linear
probe), the forest's accuracies, the top-k sweep, each class's top features with their montages, and each class's
concepts (importance against a random baseline, montages, maps beside the CAMs), both for the run's
``figures.max_classes`` classes, the most confused first (``catdog.classes``); across runs: the Grad-CAM grid,
the faithfulness table (today's salient-vs-random score, grad-cam's ROAD and confidence change) and the sanity
check (cascading randomisation) with its plot and flags. A stage that has not run yet is shown as missing, with
its command.

The page stays small enough to open at once: every image is embedded at the size it is shown (``PAGE_WIDTH``, or
``THUMBNAIL_WIDTH`` in a gallery of montages), photos as JPEG and line plots as PNG; a figure shown smaller than its
file links to that file. Every number in a table cell goes through ``_text``.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
import time
from pathlib import Path
from urllib.parse import quote

import torch
from matplotlib.figure import Figure
from PIL import Image

from catdog import models
from catdog.classes import classes_shown
from catdog.errors import CatdogError
from catdog.io import read_json, write_json, write_text
from catdog.run import RunDir, run_label

SEED_VAL_ACCURACY = {"resnet101.tv2_in1k": 0.9825, "convnext_tiny": 0.9880}
"""The seed notebook's val accuracies, for comparison."""

PAGE_WIDTH = 1160
"""Widest image, in CSS pixels: the page's 1200 px column less the images' borders; wider figures are scaled to it."""
THUMBNAIL_WIDTH = 560
"""Montages are shown two across at this width (readable as pictures; the full-size file is one click away)."""
JPEG_QUALITY = 85
"""Photos and heat maps: about a sixth of their PNG's bytes at the same size, with no visible loss."""

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1200px;
       padding: 0 1rem; color: #222; line-height: 1.45; }
h1 { border-bottom: 3px solid #3b6ea5; padding-bottom: .3rem; }
h2 { border-bottom: 1px solid #ccc; margin-top: 2.5rem; }
table { border-collapse: collapse; margin: .8rem 0; font-size: .9rem; }
th, td { border: 1px solid #d6d6d6; padding: .3rem .6rem; text-align: left; }
th { background: #eef2f7; }
tr:nth-child(even) td { background: #fafafa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
img { max-width: 100%; height: auto; border: 1px solid #e2e2e2; }
figure { margin: 1rem 0; }
.gallery { display: flex; flex-wrap: wrap; gap: 1rem; }
.gallery figure { margin: 0; width: THUMBNAIL_FIGURE; max-width: 100%; }
figcaption { font-size: .85rem; color: #555; }
.flag { color: #8a1c1c; background: #fdecec; border-left: 4px solid #d04040; padding: .4rem .8rem; }
tr.below td { background: #fdecec; color: #8a1c1c; }
.missing { color: #a15c00; background: #fff6e5; border-left: 4px solid #f0a020; padding: .4rem .8rem; }
code { background: #f3f3f3; padding: 0 .25rem; }
""".replace("THUMBNAIL_FIGURE", f"{THUMBNAIL_WIDTH + 2}px")


def _missing(command: str) -> dict:
    return {"missing": f"run {command}"}


def architecture(model_name: str, num_classes: int, image_size: int) -> dict:
    """Each top-level backbone layer's type, output shape and parameter count, from one 1x3xSxS forward pass."""
    network = models.create(model_name, num_classes, pretrained="none").eval()
    shapes: dict[str, list[int]] = {}

    def recorder(name):
        def hook(module, args, output):
            tensor = output[0] if isinstance(output, (tuple, list)) else output
            shapes[name] = list(tensor.shape)
        return hook

    handles = [child.register_forward_hook(recorder(name)) for name, child in network.backbone.named_children()]
    try:
        with torch.no_grad():
            network(torch.zeros(1, 3, image_size, image_size))
    finally:
        for handle in handles:
            handle.remove()
    layers = [{"name": name, "type": type(child).__name__, "output_shape": shapes.get(name),
               "parameters": sum(p.numel() for p in child.parameters())}
              for name, child in network.backbone.named_children()]
    return {"input_shape": [1, 3, image_size, image_size], "layers": layers,
            "parameters": sum(p.numel() for p in network.parameters())}


def _training(run: RunDir, model_name: str) -> dict:
    curve = [{key: record[key] for key in ("epoch", "train_loss", "test_accuracy", "images_per_second")}
             for record in run.metrics()]
    section = {"curve": curve, "seed_val_accuracy": SEED_VAL_ACCURACY.get(model_name)}
    if run.state_path.is_file() and not run.summary_path.is_file():
        return {**section, **_missing(f"accelerate launch jobs/train.py --out {run.path} --data DATA_ROOT --resume")}
    if not run.summary_path.is_file():
        return {**section, **_missing(f"accelerate launch jobs/train.py --config configs/{model_name}.yaml "
                                      f"--data DATA_ROOT --out {run.path}")}
    summary = run.summary()
    keys = ("classes", "best_epoch", "best_test_accuracy", "val_accuracy", "linear_probe_test_accuracy",
            "linear_probe_val_accuracy", "epochs", "train_seconds", "images_per_second", "device", "num_processes",
            "mixed_precision")
    return {**section, **{key: summary.get(key) for key in keys}}


def _forest(run: RunDir) -> dict:
    path = run.forest_summary
    if not path.is_file() and run.stage_marker("extract").is_file():
        return _missing(f"python jobs/forest.py --run {run.path}")
    if not path.is_file():
        return _missing(f"accelerate launch jobs/extract.py --run {run.path} --data DATA_ROOT, then python jobs/forest.py "
                        f"--run {run.path}")
    return {"summary": read_json(path)}


def _robustness(run: RunDir) -> dict:
    if not run.robustness_summary.is_file():
        return _missing(f"python jobs/robustness.py --run {run.path} --data DATA_ROOT")
    return {"summary": read_json(run.robustness_summary)}


def _sweep(run: RunDir) -> dict:
    if not run.sweep_results.is_file():
        return _missing(f"python jobs/sweep.py --run {run.path}")
    with open(run.sweep_results, newline="") as handle:
        rows = list(csv.DictReader(handle))
    plot = run.sweep_plot
    return {"rows": rows, "plot": str(plot) if plot.is_file() else None}


def _figure_classes(run: RunDir, training: dict, max_classes: int | None) -> dict | None:
    """The classes whose pictures the page shows (``catdog.classes``: the most confused first), of how many; None
    before training has run."""
    if "classes" not in training:
        return None
    classes = training["classes"]
    return {"shown": [classes[c] for c in classes_shown(run.path, classes, max_classes)], "classes": len(classes)}


def _in_shown_order(by_class: dict, figures: dict | None) -> dict:
    """A stage index's per-class entries, only the classes the page shows, in their order."""
    if figures is None:
        return by_class
    return {name: by_class[name] for name in figures["shown"] if name in by_class}


def _topact(run: RunDir, figures: dict | None) -> dict:
    folder = run.topact_dir
    if not run.topact_index.is_file():
        return _missing(f"python jobs/topact.py --run {run.path} --data DATA_ROOT")
    index = read_json(run.topact_index)
    classes = {name: [{"feature": entry["feature"], "rank": entry["rank"], "class_shares": entry["class_shares"],
                       "montage": str(folder / entry["montage"])} for entry in entries]
               for name, entries in _in_shown_order(index["classes"], figures).items()}
    return {"split": index.get("split"), "selectivity_top": index.get("selectivity_top"), "classes": classes}


def _concepts(run: RunDir, figures: dict | None) -> dict:
    folder = run.concepts_dir
    if not run.concepts_index.is_file():
        return _missing(f"python jobs/concepts.py --run {run.path} --data DATA_ROOT")
    index = read_json(run.concepts_index)
    classes = {}
    for name, entry in _in_shown_order(index["classes"], figures).items():
        concepts = [{**{key: value for key, value in concept.items() if key != "images"},
                     "montage": str(folder / concept["montage"])} for concept in entry["concepts"]]
        classes[name] = {**{key: value for key, value in entry.items() if key not in ("concepts", "sample_figure")},
                         "concepts": concepts, "sample_figure": str(folder / entry["sample_figure"])}
    return {**{key: value for key, value in index.items() if key != "classes"}, "classes": classes}


def collect_run(run: RunDir) -> dict:
    """Everything the report shows about one run, as JSON-ready data (missing stages say how to make them); per-class
    pictures of the run's ``figures.max_classes`` classes only."""
    config = run.config()
    model_name = config.model.name
    training = _training(run, model_name)
    if "classes" in training:
        arch = architecture(model_name, len(training["classes"]), config.data.image_size)
    else:
        arch = {"missing": training["missing"]}
    figures = _figure_classes(run, training, config.figures.max_classes)
    return {"run": str(run.path), "model": model_name, "image_size": config.data.image_size, "training": training,
            "architecture": arch, "robustness": _robustness(run), "forest": _forest(run), "sweep": _sweep(run),
            "figures": figures, "topact": _topact(run, figures), "concepts": _concepts(run, figures)}


def collect_gradcam(folder: str | os.PathLike | None, runs: list[RunDir]) -> dict:
    command = (f"python jobs/gradcam.py --runs {' '.join(str(run.path) for run in runs)} --data DATA_ROOT "
               "--out OUT_DIR, then pass --gradcam OUT_DIR/gradcam")
    if folder is None or not (Path(folder) / "summary.json").is_file():
        return _missing(command)
    grid, sanity = Path(folder) / "grid.png", Path(folder) / "sanity.png"
    summary = read_json(Path(folder) / "summary.json")
    return {"summary": summary, "grid": str(grid) if grid.is_file() else None,
            "sanity": str(sanity) if sanity.is_file() else None}


def collect_comparison(folder: str | os.PathLike | None, runs: list[RunDir]) -> dict | None:
    """``jobs/compare.py``'s ``OUT/compare`` summary; None (no section) for one run and no folder. ``uncompared``:
    the report's runs the comparison does not cover (it is older than them)."""
    if folder is None and len(runs) < 2:
        return None
    command = (f"python jobs/compare.py --runs {' '.join(str(run.path) for run in runs)} --data DATA_ROOT "
               "--out OUT_DIR, then pass --compare OUT_DIR/compare")
    if folder is None or not (Path(folder) / "summary.json").is_file():
        return _missing(command)
    summary = read_json(Path(folder) / "summary.json")
    compared = {Path(run["run"]).resolve() for run in summary["runs"]}
    return {"folder": str(folder), "summary": summary,
            "uncompared": [str(run.path) for run in runs if run.path.resolve() not in compared]}


def curves_png(epochs: list[dict], title: str) -> bytes:
    """Train loss and test accuracy per epoch, side by side."""
    figure = Figure(figsize=(9, 3.2), layout="constrained")
    loss_axis, accuracy_axis = figure.subplots(1, 2)
    x = [record["epoch"] for record in epochs]
    loss_axis.plot(x, [record["train_loss"] for record in epochs], "o-", color="C0")
    loss_axis.set(xlabel="epoch", ylabel="train loss", title="train loss")
    accuracy_axis.plot(x, [100 * record["test_accuracy"] for record in epochs], "o-", color="C1")
    accuracy_axis.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy")
    for axis in (loss_axis, accuracy_axis):
        axis.set_xticks(x)
        axis.grid(True, alpha=0.3)
    figure.suptitle(title)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _percent(value, digits: int = 2) -> str:
    return "—" if value is None else f"{100 * float(value):.{digits}f}%"


def _number(value) -> str:
    """A number at display precision: integers with thousands separators, other floats with at most 3 decimals
    (2 from 1 up, none from 1000 up; tiny ones in scientific notation)."""
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value):
        return str(value)
    if value.is_integer() or abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}" if abs(value) >= 0.01 else f"{value:.1e}"


def _text(value) -> str:
    """A table cell's text. Every value reaching a cell passes here, so no raw float is ever printed in full:
    numbers by ``_number``, mappings as ``key value`` pairs, text unchanged (callers format what needs units)."""
    if isinstance(value, dict):
        return ", ".join(f"{key} {_text(item)}" for key, item in value.items()) or "—"
    if isinstance(value, (list, tuple)):
        return ", ".join(_text(item) for item in value)
    return _number(value)


def _parsed(text: str):
    """A CSV cell as the number or JSON object it spells (so that ``_text`` formats it), else the text itself."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    if text.startswith("{"):
        try:
            return json.loads(text)
        except ValueError:
            pass
    return text


def _cell(value, numeric: bool = False) -> str:
    text = _e(_text(value))
    return f'<td class="num">{text}</td>' if numeric else f"<td>{text}</td>"


def _table(headers: list[str], rows: list[list], numeric: set[int] = frozenset(),
           row_classes: list[str | None] | None = None) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    opening = [f'<tr class="{_e(c)}">' if c else "<tr>" for c in (row_classes or [None] * len(rows))]
    body = "".join(tag + "".join(_cell(v, i in numeric) for i, v in enumerate(row)) + "</tr>"
                   for tag, row in zip(opening, rows))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(image: Image.Image, alt: str, width: int, photo: bool) -> str:
    """``image`` scaled down to at most ``width`` px, embedded, and shown at its natural size (its width and height
    attributes): photos and heat maps as JPEG, plots of lines and text as PNG (sharper, and small anyway)."""
    if image.width > width:
        image = image.resize((width, max(1, round(image.height * width / image.width))), Image.LANCZOS)
    buffer = io.BytesIO()
    if photo:
        image.convert("RGB").save(buffer, "JPEG", quality=JPEG_QUALITY, optimize=True, progressive=True)
    else:
        image.convert("RGB").save(buffer, "PNG", optimize=True)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return (f'<img alt="{_e(alt)}" width="{image.width}" height="{image.height}" '
            f'src="data:image/{"jpeg" if photo else "png"};base64,{data}">')


def _plot(png: bytes, alt: str) -> str:
    """A plot drawn here (PNG bytes), embedded by ``_img``."""
    with Image.open(io.BytesIO(png)) as image:
        return _img(image, alt, PAGE_WIDTH, photo=False)


def _image_file(path: str | os.PathLike | None, alt: str, base: Path | None = None, width: int = PAGE_WIDTH,
                photo: bool = True) -> str:
    """A stage's figure, embedded by ``_img``. One shown smaller than its file links to the file, by its path from
    the report folder ``base`` (None: no link): the full size is one click away while the report sits beside the
    runs, as launch.sh writes them, and the page itself needs nothing but itself."""
    if path is None or not Path(path).is_file():
        return f'<p class="missing">{_e(alt)}: image missing ({_e(path)})</p>'
    with Image.open(path) as image:
        tag, scaled = _img(image, alt, width, photo), image.width > width
    if not scaled or base is None:
        return tag
    href = Path(os.path.relpath(Path(path).resolve(), Path(base).resolve())).as_posix()
    return f'<a href="{_e(quote(href))}" title="full size: {_e(href)}">{tag}</a>'


def _gallery(figures: list[tuple[str, str]], base: Path | None) -> str:
    """(path, caption) montages as thumbnails, two across."""
    items = "".join(f"<figure>{_image_file(path, caption, base, THUMBNAIL_WIDTH)}<figcaption>{_e(caption)}"
                    "</figcaption></figure>" for path, caption in figures)
    return f'<div class="gallery">{items}</div>'


def _classes_note(shown: int, total: int | None) -> str:
    """Says that per-class pictures are bounded (``figures.max_classes``), when they are."""
    if total is None or shown >= total:
        return ""
    return (f"<p>{shown:,} of {total:,} classes shown, most confused first; <code>figures.max_classes=null</code> "
            "shows all.</p>")


def _missing_html(section: dict) -> str:
    return f'<p class="missing">missing ({_e(section["missing"])})</p>'


def _duration(seconds) -> str:
    """Seconds with 2 decimals under 10 s, 1 under a minute, then ``m min s s`` (``h h m min`` from an hour)."""
    if seconds is None:
        return "—"
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.2f} s" if seconds < 10 else f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    if minutes >= 60:
        return f"{minutes // 60} h {minutes % 60} min"
    return f"{minutes} min {rest} s"


def _overview_html(runs: list[dict]) -> str:
    rows = []
    for run in runs:
        t = run["training"]
        rows.append([run["model"], run["run"], _percent(t.get("best_test_accuracy")), _percent(t.get("val_accuracy")),
                     _percent(t["seed_val_accuracy"]), _number(t.get("epochs")), _duration(t.get("train_seconds")),
                     _number(t.get("images_per_second"))])
    return _table(["model", "run", "best test", "val", "seed val", "epochs", "training time", "train images/s"],
                  rows, numeric={2, 3, 4, 5, 6, 7})


def _training_html(run: dict) -> str:
    t = run["training"]
    parts = ["<h3>Training</h3>"]
    if "missing" in t:
        parts.append(_missing_html(t))
    else:
        parts.append(_table(
            ["best epoch", "best test accuracy", "val accuracy", "linear probe test", "linear probe val",
             "seed's val accuracy", "training time", "train images/s", "device", "processes", "mixed precision"],
            [[t["best_epoch"], _percent(t["best_test_accuracy"]), _percent(t["val_accuracy"]),
              _percent(t.get("linear_probe_test_accuracy")), _percent(t.get("linear_probe_val_accuracy")),
              _percent(t["seed_val_accuracy"]), _duration(t["train_seconds"]), _number(t["images_per_second"]),
              t["device"], t["num_processes"], t["mixed_precision"]]], numeric={0, 1, 2, 3, 4, 5, 6, 7}))
        if t.get("linear_probe_val_accuracy") is not None:
            parts.append("<p>Linear probe: a logistic regression on the frozen pretrained backbone's pooled features "
                         "(the baseline fine-tuning has to beat).</p>")
    if t["curve"]:
        parts.append(_plot(curves_png(t["curve"], f"{run['model']} ({run['run']})"),
                           f"training curves of {run['run']}"))
        parts.append(_table(["epoch", "train loss", "test accuracy", "train images/s"],
                            [[r["epoch"], f"{r['train_loss']:.4f}", _percent(r["test_accuracy"]),
                              _number(r["images_per_second"])] for r in t["curve"]], numeric={0, 1, 2, 3}))
    return "".join(parts)


def _architecture_html(run: dict) -> str:
    arch = run["architecture"]
    if "missing" in arch:
        return "<h3>Architecture</h3>" + _missing_html(arch)
    rows = [[layer["name"], layer["type"], "—" if layer["output_shape"] is None else " × ".join(
        str(d) for d in layer["output_shape"]), f"{layer['parameters']:,}"] for layer in arch["layers"]]
    rows.append(["total", "", "", f"{arch['parameters']:,}"])
    shape = " × ".join(str(d) for d in arch["input_shape"])
    return (f"<h3>Architecture</h3><p>Top-level layers of the backbone for a {_e(shape)} input "
            "(output shapes from one forward pass).</p>" + _table(["layer", "type", "output shape", "parameters"],
                                                                  rows, numeric={3}))


def _flatten(tree, prefix: str = "") -> list[tuple[str, object]]:
    if isinstance(tree, dict):
        return [item for key, value in tree.items() for item in _flatten(value, f"{prefix}{key}.")]
    return [(prefix.rstrip("."), tree)]


def _forest_html(run: dict) -> str:
    forest = run["forest"]
    title = "<h3>Random forest on the pooled features</h3>"
    if "missing" in forest:
        return title + _missing_html(forest)
    items = _flatten(forest["summary"])
    accuracies = [[key.removesuffix("_accuracy"), _percent(value)] for key, value in items
                  if key.endswith("_accuracy") and isinstance(value, (int, float))]
    details = []
    for key, value in items:
        if key.endswith("_accuracy"):
            continue
        if isinstance(value, list):
            value = _text(value[:10]) + (" …" if len(value) > 10 else "")
        details.append([key, value])
    return title + _table(["split", "accuracy"], accuracies, numeric={1}) + _table(["", "value"], details)


def _points(value) -> str:
    """A difference of two accuracies in percentage points, signed."""
    return "—" if value is None else f"{100 * float(value):+.2f} pt"


def _robustness_html(run: dict) -> str:
    section = run["robustness"]
    title = "<h3>Robustness: fine-tuned against the linear probe</h3>"
    if "missing" in section:
        return title + _missing_html(section)
    s = section["summary"]
    parts = [title, f"<p>Accuracy on the {s['images']:,} images of <code>{_e(s['data'])}/{_e(s['split'])}</code>, "
                    f"clean and under ImageNet-C-style corruptions at severity {_e(s['severity'])} (torchvision "
                    "<code>transforms.v2.functional</code> on the resized image, before normalisation; noise seed "
                    f"{_e(s['seed'])}); autocast {_e(s['precision'])} on {_e(s['device'])}. <b>Difference</b>: "
                    "fine-tuned minus linear probe; off its training distribution the fine-tuned model should not "
                    "fall below the probe.</p>"]
    if not s["linear_probe"]:
        parts.append(f'<p class="missing">no linear probe: {_e(s.get("note") or "the fine-tuned model alone")}</p>')
    rows, below = [], []
    for name, r in [*s["results"].items(), ("mean of the corruptions", s["mean_corrupted"])]:
        below.append("below" if r["difference"] is not None and r["difference"] < 0 else None)
        params = s["corruptions"].get(name, {})
        setting = ", ".join(f"{key} {value}" for key, value in params.items() if key not in ("function", "imagenet_c"))
        rows.append([name, params.get("function", "—"), setting or "—", _percent(r["fine_tuned"]),
                     _percent(r["linear_probe"]), _points(r["difference"]), "below the probe" if below[-1] else ""])
    parts.append(_table(["corruption", "torchvision function", "parameters", "fine-tuned", "linear probe",
                         "difference", ""], rows, numeric={3, 4, 5}, row_classes=below))
    if s["below_linear_probe"]:
        parts.append(f'<p class="flag">fine-tuned below the linear probe on: '
                     f'{_e(", ".join(s["below_linear_probe"]))}</p>')
    return "".join(parts)


HIDDEN_SWEEP_COLUMNS = {"node_id", "trial_id"}
"""Ray's and Tune's long random ids: in results.csv, not on the page (``node`` is shown)."""


def _sweep_html(run: dict) -> str:
    sweep = run["sweep"]
    title = "<h3>Top-k features sweep</h3>"
    if "missing" in sweep:
        return title + _missing_html(sweep)
    if not sweep["rows"]:
        return title + '<p class="missing">results.csv has no rows yet</p>'
    headers = [h for h in sweep["rows"][0] if h not in HIDDEN_SWEEP_COLUMNS]

    def shown(header: str, text: str):
        if not text:
            return text
        if header.endswith("accuracy"):
            return _percent(text)
        return _duration(text) if header == "fit_seconds" else _parsed(text)

    rows = [[shown(h, row[h]) for h in headers] for row in sweep["rows"]]
    numeric = {i for i, h in enumerate(headers) if h in ("k", "n_features", "fit_seconds") or h.endswith("accuracy")}
    return title + _table(headers, rows, numeric) + _image_file(sweep["plot"], "accuracy against k", photo=False)


def _topact_html(run: dict, base: Path | None) -> str:
    top = run["topact"]
    title = "<h3>Top features per class and their top activations</h3>"
    if "missing" in top:
        return title + _missing_html(top)
    parts = [title, f"<p>Each montage: the {_e(top['split'])} images where the feature fires hardest, with the "
                    "feature's spatial map over them.</p>",
             _classes_note(len(top["classes"]), (run["figures"] or {}).get("classes"))]
    for class_name, entries in top["classes"].items():
        parts.append(f"<h4>{_e(class_name)}</h4>")
        parts.append(_table(["rank", "feature", f"class shares among the top {top['selectivity_top']}"],
                            [[e["rank"], str(e["feature"]), ", ".join(f"{name} {100 * share:.0f}%" for name, share
                                                                      in e["class_shares"].items())] for e in entries],
                            numeric={0, 1}))
        parts.append(_gallery([(e["montage"], f"{class_name} #{e['rank']}: feature {e['feature']}") for e in entries],
                              base))
    return "".join(parts)


def _score(value, digits: int = 3) -> str:
    return "—" if value is None else f"{float(value):+.{digits}f}"


def _faithfulness_rows(summary: dict) -> list[list]:
    rows = []
    for model in summary["models"]:
        for method, score in model["methods"].items():
            road = score.get("road") or {}
            seconds = (score.get("seconds") or {}).get("total")
            rows.append([model["model"], model["run"], method, f"{score['salient_drop']:.3f}",
                         f"{score['random_drop']:.3f}", _percent(score["salient_wins"]), _score(road.get("morf_mean")),
                         _score(road.get("lerf_mean")), _score(road.get("combined")),
                         _score(score.get("confidence_change")), f"{score['mean_confidence']:.3f}", score["n_images"],
                         _duration(seconds)])
    return rows


def _road_percentile_html(summary: dict) -> str:
    percentiles = summary.get("road_percentiles")
    if not percentiles:
        return ""
    headers = ["model", "method"] + [f"MoRF p{p} (−{100 - p}%)" for p in percentiles] + \
              [f"LeRF p{p} (−{100 - p}%)" for p in percentiles]
    rows = []
    for model in summary["models"]:
        for method, score in model["methods"].items():
            road = score.get("road")
            if road:
                rows.append([model["model"], method] + [_score(road["morf"][str(p)]) for p in percentiles]
                            + [_score(road["lerf"][str(p)]) for p in percentiles])
    return _table(headers, rows, numeric=set(range(2, len(headers)))) if rows else ""


def _sanity_html(gradcam: dict) -> str:
    summary = gradcam["summary"]
    models_with = [m for m in summary["models"] if all("sanity" in s for s in m["methods"].values())]
    if not models_with:
        return ""
    threshold = summary["sanity_threshold"]
    parts = ["<h3>Sanity check: cascading model-parameter randomisation</h3>",
             f"<p>Adebayo et al. (2018): the network's layers are re-drawn at random from the classifier down to the "
             f"stem, one more at each step, and the CAMs of {len(summary['sanity_images'])} val images (the same "
             "number per class) recomputed for the same classes. Each cell is the mean Spearman rank correlation "
             "with the trained model's maps (1: unchanged, 0: unrelated). A faithful explanation must change as the "
             f"weights are destroyed; a method still at or above {threshold:g} is flagged.</p>"]
    for model in models_with:
        methods = list(model["methods"])
        rows = [[i, layer] + [f"{model['methods'][m]['sanity'][i]['spearman']:.3f}" for m in methods]
                for i, layer in enumerate(model["sanity_layers"])]
        parts.append(f"<h4>{_e(model['model'])} ({_e(model['run'])})</h4>")
        parts.append(_table(["step", "randomised down to"] + methods, rows, numeric=set(range(2, 2 + len(methods)))
                            | {0}))
        for method in methods:
            flags = model["methods"][method].get("sanity_flags") or []
            if flags:
                parts += [f'<p class="flag">flagged: {_e(model["model"])} {_e(method)}: {_e(flag)}</p>'
                          for flag in flags]
            else:
                parts.append(f"<p>{_e(model['model'])} {_e(method)}: passes (its maps change as the weights are "
                             "randomised).</p>")
    if gradcam.get("sanity"):
        parts.append(_image_file(gradcam["sanity"], "sanity check: Spearman correlation per randomisation step",
                                 photo=False))
    return "".join(parts)


def _grid_caption(summary: dict) -> str:
    return (f"<p>Grid: {len(summary['grid_images'])} {_e(summary['split'])} images, the same for every model, a column "
            "per model and method; each heat map titled with the model's prediction and its probability (red: "
            "wrong).</p>" + _classes_note(len(summary.get("grid_classes", [])), len(summary.get("classes", []))))


def _gradcam_html(gradcam: dict, base: Path | None, grid_above: bool) -> str:
    """The Grad-CAM section; its grid only when the comparison (``grid_above``) has not shown it already."""
    title = "<h2>Grad-CAM</h2>"
    if "missing" in gradcam:
        return title + _missing_html(gradcam)
    summary = gradcam["summary"]
    fraction = f"{100 * summary['removal_fraction']:.0f}%"
    percentiles = ", ".join(f"{100 - p}%" for p in summary.get("road_percentiles", []))
    return (title + f"<p>Faithfulness, per model and method, on the same {len(summary['faithfulness_images'])} "
            f"seeded {_e(summary['split'])} images, on the {_e(summary['target'])} class's probability. "
            f"<b>Salient / random drop</b>: its mean fall when the most salient {fraction} of pixels are removed "
            f"({_e(summary['removal'])}), against removing a random {fraction} ({_e(summary['random_baseline'])}); "
            "higher salient than random is better. "
            f"<b>ROAD</b> (grad-cam's metrics; removed pixels are imputed by "
            f"{_e(summary.get('road_imputation', 'noisy linear imputation'))}; removing {_e(percentiles)}): the mean "
            "change in probability "
            "(after minus before) when the <i>most</i> relevant pixels are removed first (MoRF: more negative is "
            "better) and when the <i>least</i> relevant are (LeRF: closer to 0 or above is better); "
            "<b>combined</b> = (LeRF − MoRF) / 2 averaged over the percentiles: higher is better. "
            "<b>Confidence change</b> (CamMultImageConfidenceChange): the change in probability when the image is "
            "multiplied by its own CAM: higher (near 0 or above) is better. Time: the whole (model, method) "
            "part, sanity check included.</p>"
            + _table(["model", "run", "method", "salient drop", "random drop", "salient > random", "ROAD MoRF",
                      "ROAD LeRF", "ROAD combined", "confidence change", "mean confidence", "images", "time"],
                     _faithfulness_rows(summary), numeric=set(range(3, 13)))
            + _road_percentile_html(summary)
            + ("<p>Grid: in the comparison above.</p>" if grid_above
               else _grid_caption(summary) + _image_file(gradcam["grid"], "Grad-CAM grid", base))
            + _sanity_html(gradcam))


def _spread(stats: dict, show=lambda value: f"{value:.3f}") -> str:
    """A ``stats`` object (spread across images) as median [q25, q75]."""
    return f"{show(stats['median'])} [{show(stats['q25'])}, {show(stats['q75'])}]"


def _p_value(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _pointing_game(style: dict) -> str:
    """The pointing game's accuracy and counts, with the note on images without a mask (or why there is none)."""
    game, note = style["pointing_game"], style["pointing_game_note"]
    if game is None:
        return note or "—"
    return f"{_percent(game['accuracy'])} ({game['hits']:,} of {game['images']:,})" + (f"; {note}" if note else "")


def _comparison_html(comparison: dict, gradcam: dict, base: Path | None) -> str:
    """The runs side by side (``catdog.compare``'s summary), and the Grad-CAM grid with a column per model."""
    title = "<h2>Comparison</h2>"
    if "missing" in comparison:
        return title + _missing_html(comparison)
    s, folder = comparison["summary"], Path(comparison["folder"])
    runs, pairs = s["runs"], s["pairs"]
    pair_names = [f"{pair['a']} (a) vs {pair['b']} (b)" for pair in pairs]
    parts = [title, f"<p>{len(runs)} runs on the same data (<code>{_e(s['data'])}</code>), compared on its "
                    f"{_e(s['split'])} split; pairs as a vs b. From <code>{_e(folder)}</code>.</p>"]
    if comparison["uncompared"]:
        parts.append(f'<p class="missing">the comparison does not cover {_e(", ".join(comparison["uncompared"]))}: '
                     "run jobs/compare.py again with every run</p>")

    parts.append("<h3>Accuracy and cost</h3>")
    parts.append(_table(
        ["run", "image size", "test", "val", "linear probe test / val", "hflip TTA", "epochs", "training time",
         "train images/s", "parameters (trainable)", "precision on device"],
        [[run_label(r["name"], r["model"]), r["image_size"], _percent(r["test_accuracy"]),
          _percent(r["val_accuracy"]),
          f"{_percent(r['linear_probe_test_accuracy'])} / {_percent(r['linear_probe_val_accuracy'])}",
          "yes" if r["tta_hflip"] else "no", r["epochs"], _duration(r["train_seconds"]),
          f"{r['images_per_second']:.1f}", f"{r['parameters']:,} ({r['trainable_parameters']:,})",
          f"{r['mixed_precision']} on {r['device']}"] for r in runs],
        numeric={1, 2, 3, 4, 6, 7, 8, 9}))
    parts += [f'<p class="flag">{_e(r["name"])}: val accuracy recomputed from its checkpoint '
              f'{_percent(r["val_accuracy_recomputed"])}, its summary.json says {_percent(r["val_accuracy"])} '
              "(another device or precision?)</p>" for r in runs if r["val_accuracy_recomputed"] != r["val_accuracy"]]
    parts.append(_table(["pair", "training time, a / b"], [[name, f"{pair['train_time_ratio']:.2f}×"]
                                                           for name, pair in zip(pair_names, pairs)], numeric={1}))

    parts.append(f"<h3>Grad-CAM ({_e(s['method'])}) on the same val images</h3>")
    if "missing" in gradcam:
        parts.append(_missing_html(gradcam))
    else:
        parts.append(_grid_caption(gradcam["summary"]) + _image_file(gradcam["grid"], "Grad-CAM grid", base))

    top = f"{100 * s['top_fraction']:.0f}%"
    parts.append(f"<h3>Heat-map style</h3><p>Per model, over its {_e(s['method'])} maps ({_e(s['target'])} "
                 "class) of the same val images "
                 "(median [25th, 75th percentile] across images): the share of the map at or above half its maximum, "
                 "the map's entropy (normalised: 0 = one pixel, 1 = uniform), and the pointing game (the map's peak "
                 f"on the object). Per pair: Spearman's rank correlation of the two maps and the IoU of their top "
                 f"{top} regions.</p>")
    parts.append(_table(["run", "images", "area ≥ half max", "entropy", "pointing game"],
                        [[r["name"], r["cam_style"]["images"],
                          _spread(r["cam_style"]["area_above_half_max"], lambda v: _percent(v, 1)),
                          _spread(r["cam_style"]["entropy"]), _pointing_game(r["cam_style"])] for r in runs],
                        numeric={1, 2, 3}))
    parts.append(_image_file(folder / s["cam_style_plot"], "map style per model", base, photo=False))
    parts.append(_table(["pair", "images", "Spearman", f"top-{top} IoU"],
                        [[name, pair["cam_agreement"]["images"], _spread(pair["cam_agreement"]["spearman"]),
                          _spread(pair["cam_agreement"]["top_iou"])] for name, pair in zip(pair_names, pairs)],
                        numeric={1, 2, 3}))
    parts.append("<ul>" + "".join(f"<li><b>{_e(pair['a'])} vs {_e(pair['b'])}</b>: {_e(pair['sentence'])}</li>"
                                  for pair in pairs) + "</ul>")

    parts.append(f"<h3>Where the predictions differ</h3><p>Each pair's {_e(s['split'])} predictions; "
                 f"<b>McNemar p</b>: {_e(pairs[0]['disagreement']['mcnemar_test'] if pairs else '')} (a small p: "
                 "one model is right more often than the other where they differ). Each montage: the images only one "
                 "of the two gets right, with both models' maps of the true class.</p>")
    parts.append(_table(["pair", "images", "both right", "only a right", "only b right", "both wrong",
                         "predicted apart", "McNemar p"],
                        [[name, d["images"], d["both_right"], d["a_only_right"], d["b_only_right"], d["both_wrong"],
                          d["predictions_differ"], _p_value(d["mcnemar_p"])]
                         for name, d in zip(pair_names, (pair["disagreement"] for pair in pairs))],
                        numeric=set(range(1, 8))))
    for name, pair in zip(pair_names, pairs):
        montage = pair["disagreement"]["montage"]
        caption = f"{name}: the images only one of them gets right"
        parts.append(f"<figure>{_image_file(folder / montage, caption, base)}<figcaption>{_e(caption)}</figcaption>"
                     "</figure>" if montage else f"<p>{_e(name)}: no image only one of them gets right.</p>")

    regression = [pair["features"]["logistic_regression"] for pair in pairs]
    parts.append("<h3>Features</h3><p><b>Linear CKA</b> of the two models' pooled val features (1: the same up to a "
                 "rotation and scale) against its value with one model's rows shuffled (mean ± std). <b>Logistic "
                 "regression</b> on each model's features alone and on both concatenated"
                 + (f" (fit on {_e(regression[0]['fit_split'])}, regularisation chosen on "
                    f"{_e(regression[0]['chosen_on'])}, scored on {_e(regression[0]['scored_on'])})" if pairs else "")
                 + ": more than either alone means each model knows something the other does not.</p>")
    parts.append(_table(["pair", "images", "linear CKA", "shuffled CKA", "shuffles", "a alone", "b alone",
                         "concatenated", "C chosen"],
                        [[name, f["images"], f"{f['cka']:.3f}",
                          f"{f['cka_shuffled']['mean']:.3f} ± {f['cka_shuffled']['std']:.3f}",
                          f["cka_shuffled"]["shuffles"], _percent(lr["a"]), _percent(lr["b"]),
                          _percent(lr["concatenated"]), lr["C"]]
                         for name, f, lr in zip(pair_names, (pair["features"] for pair in pairs), regression)],
                        numeric=set(range(1, 8))))
    return "".join(parts)


def _concepts_html(run: dict, base: Path | None) -> str:
    concepts = run["concepts"]
    title = "<h3>Concepts (NMF of each class's spatial maps)</h3>"
    if "missing" in concepts:
        return title + _missing_html(concepts)
    parts = [title, f"<p>Per class, {concepts['concepts_per_class']} concepts factorised from the "
                    f"{_e(concepts['split'])} images' spatial activations ({_e(concepts['factorisation'])}). "
                    f"<b>Importance</b>: {_e(concepts['importance'])}, over the class's "
                    f"{_e(concepts['importance_split'])} images; <b>random</b>: {_e(concepts['random_baseline'])}. "
                    "A concept that matters drops the logit far more than its random baseline. Each montage: the "
                    "regions where the concept is strongest, with its map overlaid; the last figure: the concepts' "
                    f"maps on the class's Grad-CAM sample images beside their {_e(concepts['cam_method'])} map.</p>",
             _classes_note(len(concepts["classes"]), (run["figures"] or {}).get("classes"))]
    for name, entry in concepts["classes"].items():
        parts.append(f"<h4>{_e(name)}</h4><p>{entry['images']:,} images ({entry['positions']:,} positions); NMF "
                     f"relative reconstruction error {entry['reconstruction_error']:.3f}; mean logit "
                     f"{entry['mean_logit']:.3f} over {entry['importance_images']} images.</p>")
        parts.append(_table(["concept", "logit drop when removed", "random direction", "beats random on",
                             "mean coefficient", "top channels"],
                            [[c["concept"], f"{c['importance']:.3f} ± {c['importance_std']:.3f}",
                              f"{c['random_importance']:.3f} ± {c['random_importance_std']:.3f}",
                              _percent(c["beats_random"]), f"{c['mean_coefficient']:.3f}",
                              ", ".join(str(ch) for ch in c["top_channels"])] for c in entry["concepts"]],
                            numeric={0, 1, 2, 3, 4}))
        parts.append(_gallery([(c["montage"], f"{name} concept {c['concept']}: logit drop {c['importance']:.3f} vs "
                                              f"{c['random_importance']:.3f}") for c in entry["concepts"]], base))
        caption = f"{name}: concept maps beside the CAMs of its Grad-CAM sample images"
        parts.append(f"<figure>{_image_file(entry['sample_figure'], caption, base)}<figcaption>{_e(caption)}"
                     "</figcaption></figure>")
    return "".join(parts)


def _audit_html(run_paths: list[str], base: Path | None) -> str:
    """The data audit (``jobs/audit.py``, written to the first run's ``audit/``): counts per kind, the top suspects
    with every audited model's Grad-CAM, the top ten of each list, and the leaked images' effect on accuracy."""
    title = "<h2>Data audit</h2>"
    run = RunDir(run_paths[0])
    if not run.audit_summary.is_file():
        return title + _missing_html(_missing(f"python jobs/audit.py --run {' '.join(run_paths)} --data DATA_ROOT"))
    audit = read_json(run.audit_summary)
    counts = audit["counts"]
    parts = [title, f"<p>{audit['images']:,} images of {len(audit['runs'])} run(s), every split. Wrong labels: "
                    f"cleanlab on {audit['cross_validation']['folds']}-fold out-of-fold probabilities of a logistic "
                    f"regression on the stored features; outliers: {_e(audit['outlier_score'])}; near-duplicates: "
                    f"feature cosine &ge; {audit['near_duplicate_cosine']}. Score: higher is more suspicious. Each list "
                    f"is a CSV in {_e(str(run.audit_dir))} (a <code>data.exclude</code> file).</p>",
             _table(["kind", "listed", "of which"],
                    [["wrong labels", counts["label_issues"], ""], ["outliers", counts["outliers"], ""],
                     ["duplicates", counts["duplicates"],
                      f"{counts['exact_duplicates']} exact, {counts['near_duplicates']} near, "
                      f"{counts['cross_split_duplicates']} across splits; leaked from train: "
                      + ", ".join(f"{split} {n}" for split, n in counts["leaked"].items())]], numeric={1})]
    if audit["suspects_plot"]:
        caption = ("The top suspects of each kind (given and suggested label, score) with each model's Grad-CAM for "
                   "the class it predicts (red: not the given label)")
        parts.append(f"<figure>{_image_file(run.audit_dir / audit['suspects_plot'], caption, base)}"
                     f"<figcaption>{_e(caption)}</figcaption></figure>")
    for kind, rows in audit["top"].items():
        parts.append(f"<h3>{_e(kind.replace('_', ' '))}: the first {len(rows)}</h3>")
        parts.append(_table(["path", "split", "given", "suggested", "score"],
                            [[r["path"], r["split"], r["given_label"], r["suggested_label"], f"{r['score']:.3f}"]
                             for r in rows], numeric={4}))
    parts.append("<h3>Leaked test and val images (a copy in train): accuracy with and without them</h3>")
    parts.append(_table(["run", "split", "images", "leaked", "accuracy", "without leaked", "predictions from"],
                        [[r["run"], r["split"], r["images"], r["leaked"], _percent(r["accuracy"]),
                          _percent(r["accuracy_without_leaked"]), r["source"]] for r in audit["leak_effect"]],
                        numeric={2, 3, 4, 5}))
    return "".join(parts)


def render(runs: list[dict], gradcam: dict, generated: str, comparison: dict | None = None,
           base: Path | None = None) -> str:
    """The HTML page, led by the comparison when there is one; ``base``: the report's folder, from which figures
    shown scaled down link to their files (None: no links)."""
    sections = []
    for run in runs:
        sections.append(f"<h2>{_e(run['model'])} <small>({_e(run['run'])})</small></h2>"
                        + _training_html(run) + _architecture_html(run) + _robustness_html(run)
                        + _forest_html(run) + _sweep_html(run)
                        + _topact_html(run, base) + _concepts_html(run, base))
    compared = comparison is not None and "missing" not in comparison
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>catdog report</title><style>{CSS}</style></head><body>"
            f"<h1>catdog report</h1><p>Generated {_e(generated)}. Accuracies are on the test split (best epoch, "
            "chosen by test accuracy) and the held-out val split; the seed's figures are its val accuracies.</p>"
            + ("" if comparison is None else _comparison_html(comparison, gradcam, base) + "<h2>Runs</h2>")
            + _overview_html(runs) + _gradcam_html(gradcam, base, grid_above=compared and "missing" not in gradcam)
            + _audit_html([run["run"] for run in runs], base) + "".join(sections) + "</body></html>\n")


def report(run_paths: list[str | os.PathLike], out: str | os.PathLike,
           gradcam_dir: str | os.PathLike | None = None, compare_dir: str | os.PathLike | None = None) -> dict:
    """Write ``OUT/index.html`` and ``OUT/summary.json``; returns the summary."""
    runs = [RunDir(path) for path in run_paths]
    for run in runs:
        if not run.path.is_dir():
            raise CatdogError(f"run {run.path}: no such directory (give run directories written by jobs/train.py)")
    generated = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    collected = [collect_run(run) for run in runs]
    gradcam = collect_gradcam(gradcam_dir, runs)
    comparison = collect_comparison(compare_dir, runs)
    summary = {"generated": generated, "runs": collected, "gradcam": gradcam, "compare": comparison}
    write_text(Path(out) / "index.html", render(collected, gradcam, generated, comparison, Path(out)))
    write_json(Path(out) / "summary.json", summary)
    return summary
