"""The report: one self-contained HTML page (images as data URIs, inline CSS) and ``summary.json`` for all runs.

Per run: training curves and accuracies next to the seed's, training time and speed, an architecture summary,
the linear probe's accuracies beside the fine-tuned ones, robustness to corruptions (fine-tuned against the linear
probe), the forest's accuracies, the top-k sweep, each class's top features with their montages, and each class's
concepts (importance against a random baseline, montages, maps beside the CAMs); across runs: the Grad-CAM grid,
the faithfulness table (today's salient-vs-random score, grad-cam's ROAD and confidence change) and the sanity
check (cascading randomisation) with its plot and flags. A stage that has not run yet is shown as missing, with
its command.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import os
import time
from pathlib import Path

import torch
from matplotlib.figure import Figure

from catdog import models
from catdog.errors import CatdogError
from catdog.io import read_json, write_json, write_text
from catdog.run import RunDir

SEED_VAL_ACCURACY = {"resnet101.tv2_in1k": 0.9825, "convnext_tiny": 0.9880}
"""The seed notebook's val accuracies, for comparison."""

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1200px;
       padding: 0 1rem; color: #222; line-height: 1.45; }
h1 { border-bottom: 3px solid #3b6ea5; padding-bottom: .3rem; }
h2 { border-bottom: 1px solid #ccc; margin-top: 2.5rem; }
table { border-collapse: collapse; margin: .8rem 0; font-size: .9rem; }
th, td { border: 1px solid #d6d6d6; padding: .3rem .6rem; text-align: left; }
th { background: #eef2f7; }
tr:nth-child(even) td { background: #fafafa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; border: 1px solid #e2e2e2; }
figure { margin: 1rem 0; }
figcaption { font-size: .85rem; color: #555; }
.flag { color: #8a1c1c; background: #fdecec; border-left: 4px solid #d04040; padding: .4rem .8rem; }
tr.below td { background: #fdecec; color: #8a1c1c; }
.missing { color: #a15c00; background: #fff6e5; border-left: 4px solid #f0a020; padding: .4rem .8rem; }
code { background: #f3f3f3; padding: 0 .25rem; }
"""


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


def _topact(run: RunDir) -> dict:
    folder = run.topact_dir
    if not run.topact_index.is_file():
        return _missing(f"python jobs/topact.py --run {run.path} --data DATA_ROOT")
    index = read_json(run.topact_index)
    classes = {name: [{"feature": entry["feature"], "rank": entry["rank"], "class_shares": entry["class_shares"],
                       "montage": str(folder / entry["montage"])} for entry in entries]
               for name, entries in index["classes"].items()}
    return {"split": index.get("split"), "selectivity_top": index.get("selectivity_top"), "classes": classes}


def _concepts(run: RunDir) -> dict:
    folder = run.concepts_dir
    if not run.concepts_index.is_file():
        return _missing(f"python jobs/concepts.py --run {run.path} --data DATA_ROOT")
    index = read_json(run.concepts_index)
    classes = {}
    for name, entry in index["classes"].items():
        concepts = [{**{key: value for key, value in concept.items() if key != "images"},
                     "montage": str(folder / concept["montage"])} for concept in entry["concepts"]]
        classes[name] = {**{key: value for key, value in entry.items() if key not in ("concepts", "sample_figure")},
                         "concepts": concepts, "sample_figure": str(folder / entry["sample_figure"])}
    return {**{key: value for key, value in index.items() if key != "classes"}, "classes": classes}


def collect_run(run: RunDir) -> dict:
    """Everything the report shows about one run, as JSON-ready data (missing stages say how to make them)."""
    config = run.config()
    model_name = config.model.name
    training = _training(run, model_name)
    if "classes" in training:
        arch = architecture(model_name, len(training["classes"]), config.data.image_size)
    else:
        arch = {"missing": training["missing"]}
    return {"run": str(run.path), "model": model_name, "image_size": config.data.image_size, "training": training,
            "architecture": arch, "robustness": _robustness(run), "forest": _forest(run), "sweep": _sweep(run),
            "topact": _topact(run), "concepts": _concepts(run)}


def collect_gradcam(folder: str | os.PathLike | None, runs: list[RunDir]) -> dict:
    command = (f"python jobs/gradcam.py --runs {' '.join(str(run.path) for run in runs)} --data DATA_ROOT "
               "--out OUT_DIR, then pass --gradcam OUT_DIR/gradcam")
    if folder is None or not (Path(folder) / "summary.json").is_file():
        return _missing(command)
    grid, sanity = Path(folder) / "grid.png", Path(folder) / "sanity.png"
    summary = read_json(Path(folder) / "summary.json")
    return {"summary": summary, "grid": str(grid) if grid.is_file() else None,
            "sanity": str(sanity) if sanity.is_file() else None}


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


def _percent(value) -> str:
    return "—" if value is None else f"{100 * float(value):.2f}%"


def _number(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _cell(value, numeric: bool = False) -> str:
    return f'<td class="num">{_e(value)}</td>' if numeric else f"<td>{_e(value)}</td>"


def _table(headers: list[str], rows: list[list], numeric: set[int] = frozenset(),
           row_classes: list[str | None] | None = None) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    opening = [f'<tr class="{_e(c)}">' if c else "<tr>" for c in (row_classes or [None] * len(rows))]
    body = "".join(tag + "".join(_cell(v, i in numeric) for i, v in enumerate(row)) + "</tr>"
                   for tag, row in zip(opening, rows))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _image(png: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _image_file(path: str | None, alt: str) -> str:
    if path is None or not Path(path).is_file():
        return f'<p class="missing">{_e(alt)}: image missing ({_e(path)})</p>'
    return _image(Path(path).read_bytes(), alt)


def _missing_html(section: dict) -> str:
    return f'<p class="missing">missing ({_e(section["missing"])})</p>'


def _duration(seconds) -> str:
    if seconds is None:
        return "—"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


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
        parts.append(_image(curves_png(t["curve"], f"{run['model']} ({run['run']})"), f"training curves of {run['run']}"))
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
            value = ", ".join(str(v) for v in value[:10]) + (" …" if len(value) > 10 else "")
        details.append([key, _number(value)])
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
    rows = [[_percent(row[h]) if h.endswith("accuracy") and row[h] else row[h] for h in headers]
            for row in sweep["rows"]]
    numeric = {i for i, h in enumerate(headers) if h in ("k", "n_features", "fit_seconds") or h.endswith("accuracy")}
    return title + _table(headers, rows, numeric) + _image_file(sweep["plot"], "accuracy against k")


def _topact_html(run: dict) -> str:
    top = run["topact"]
    title = "<h3>Top features per class and their top activations</h3>"
    if "missing" in top:
        return title + _missing_html(top)
    parts = [title, f"<p>Each montage: the {_e(top['split'])} images where the feature fires hardest, with the "
                    "feature's spatial map over them.</p>"]
    for class_name, entries in top["classes"].items():
        parts.append(f"<h4>{_e(class_name)}</h4>")
        parts.append(_table(["rank", "feature", f"class shares among the top {top['selectivity_top']}"],
                            [[e["rank"], e["feature"], ", ".join(f"{name} {100 * share:.0f}%" for name, share
                                                                 in e["class_shares"].items())] for e in entries],
                            numeric={0, 1}))
        for e in entries:
            caption = f"{class_name} #{e['rank']}: feature {e['feature']}"
            parts.append(f"<figure>{_image_file(e['montage'], caption)}<figcaption>{_e(caption)}</figcaption></figure>")
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
        parts.append(_image_file(gradcam["sanity"], "sanity check: Spearman correlation per randomisation step"))
    return "".join(parts)


def _gradcam_html(gradcam: dict) -> str:
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
            + f"<p>Grid: {len(summary['grid_images'])} {_e(summary['split'])} images, the same for every model; "
              "each heat map titled with the model's prediction and its probability (red: wrong).</p>"
            + _image_file(gradcam["grid"], "Grad-CAM grid")
            + _sanity_html(gradcam))


def _concepts_html(run: dict) -> str:
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
                    f"maps on the class's Grad-CAM sample images beside their {_e(concepts['cam_method'])} map.</p>"]
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
        for c in entry["concepts"]:
            caption = f"{name} concept {c['concept']}: logit drop {c['importance']:.3f} vs {c['random_importance']:.3f}"
            parts.append(f"<figure>{_image_file(c['montage'], caption)}<figcaption>{_e(caption)}</figcaption></figure>")
        caption = f"{name}: concept maps beside the CAMs of its Grad-CAM sample images"
        parts.append(f"<figure>{_image_file(entry['sample_figure'], caption)}<figcaption>{_e(caption)}"
                     "</figcaption></figure>")
    return "".join(parts)


def render(runs: list[dict], gradcam: dict, generated: str) -> str:
    """The HTML page."""
    sections = []
    for run in runs:
        sections.append(f"<h2>{_e(run['model'])} <small>({_e(run['run'])})</small></h2>"
                        + _training_html(run) + _architecture_html(run) + _robustness_html(run)
                        + _forest_html(run) + _sweep_html(run)
                        + _topact_html(run) + _concepts_html(run))
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>catdog report</title><style>{CSS}</style></head><body>"
            f"<h1>catdog report</h1><p>Generated {_e(generated)}. Accuracies are on the test split (best epoch, "
            "chosen by test accuracy) and the held-out val split; the seed's figures are its val accuracies.</p>"
            + _overview_html(runs) + _gradcam_html(gradcam) + "".join(sections) + "</body></html>\n")


def report(run_paths: list[str | os.PathLike], out: str | os.PathLike,
           gradcam_dir: str | os.PathLike | None = None) -> dict:
    """Write ``OUT/index.html`` and ``OUT/summary.json``; returns the summary."""
    runs = [RunDir(path) for path in run_paths]
    for run in runs:
        if not run.path.is_dir():
            raise CatdogError(f"run {run.path}: no such directory (give run directories written by jobs/train.py)")
    generated = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    collected = [collect_run(run) for run in runs]
    gradcam = collect_gradcam(gradcam_dir, runs)
    summary = {"generated": generated, "runs": collected, "gradcam": gradcam}
    write_text(Path(out) / "index.html", render(collected, gradcam, generated))
    write_json(Path(out) / "summary.json", summary)
    return summary
