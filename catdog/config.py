"""Typed configuration: YAML files plus ``section.key=value`` overrides, validated by pydantic.

One ``Config`` holds a section per stage; every job reads the sections it needs and writes the
resolved config next to its outputs, so a run directory always says how it was made.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt,
                      PlainValidator, ValidationError, field_validator)

from catdog.errors import CatdogError
from catdog.io import write_text

SPLITS = ("train", "test", "val")
"""The splits of a data root (``ROOT/<split>/<class>/``), in the order the stages use them."""


Precision = Annotated[Literal["auto", "no", "bf16", "fp16"], BeforeValidator(lambda v: "no" if v is False else v)]
"""Mixed precision; ``auto`` picks by hardware (``catdog.devices``). YAML reads a bare ``no`` as false: accepted."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    name: str = "efficientnet_lite0"
    pretrained: str = "imagenet"
    """``imagenet`` (the hub, or the bundled file where one exists), ``none``, or a path to a weights file."""
    drop_rate: Optional[float] = Field(None, ge=0, lt=1)
    freeze_stages: NonNegativeInt = 0
    """Freeze the stem and the next stages, this many in all (see each model's ``stages``); 0 trains everything."""
    batchnorm_statistics: Literal["batch", "pretrained"] = "batch"
    """While training, normalise with each batch's statistics (and update the running ones), or keep every
    BatchNorm on its pretrained running statistics, so that fine-tuning starts from the pretrained features."""
    cam_layer: Optional[str] = None
    """Grad-CAM target layer, a module path in the backbone (``layer4``); ``None`` finds the one that makes the
    feature map."""


class DataConfig(Section):
    """Inputs. ``image_size``, ``interpolation``, ``mean`` and ``std`` left unset are taken from the model's
    pretrained config when training starts (``catdog.models.data_config``) and recorded in the run's config.yaml."""

    image_size: Optional[PositiveInt] = None
    interpolation: Optional[Literal["bilinear", "bicubic", "nearest"]] = None
    hflip: bool = True
    rotation: float = Field(10.0, ge=0, le=180)
    """Maximum random rotation in degrees (0 turns it off)."""
    mean: Optional[tuple[float, float, float]] = None
    std: Optional[tuple[PositiveFloat, PositiveFloat, PositiveFloat]] = None
    batch_size: PositiveInt = 32
    eval_batch_size: PositiveInt = 64
    num_workers: NonNegativeInt = 2
    max_image_pixels: PositiveInt = 89_478_485
    """Image files larger than this (width x height, read from the header) are skipped like unreadable ones, before
    they are decoded; the default is PIL's own limit against decompression bombs (about 9459 x 9459)."""
    cache: bool = False
    """Decode and resize each image once into a uint8 array file in the run (``RUN/cache``), memory-mapped, and
    augment whole batches as tensors on the model's device: no JPEG decoding in the training loop."""
    exclude: Optional[str] = None
    """Image files every job leaves out of its splits (e.g. a data audit's suspects): a CSV with a ``path`` column or
    a text file of one path per line, paths relative to the data root (``catdog.data.excluded_paths``). Made absolute
    when the config is loaded, so that the run's config.yaml names it for every later job."""

    @field_validator("exclude")
    @classmethod
    def _absolute(cls, exclude: Optional[str]) -> Optional[str]:
        return None if exclude is None else str(Path(exclude).expanduser().absolute())


class OptimConfig(Section):
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: PositiveFloat = 1e-4
    weight_decay: NonNegativeFloat = 0.0
    epochs: PositiveInt = 5
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_epochs: NonNegativeFloat = 0.0
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    backbone_lr_scale: PositiveFloat = 1.0
    """Discriminative learning rates: the backbone learns at ``lr * backbone_lr_scale``, the head at ``lr``."""
    head_init: Literal["random", "linear_probe"] = "random"
    """``linear_probe`` starts fine-tuning from the fitted linear probe's head (LP-FT, Kumar et al. 2022), so the
    first steps do not distort the pretrained features to fit a random head."""


class TrainConfig(Section):
    seed: int = 42
    mixed_precision: Precision = "auto"
    channels_last: bool = True
    cpu: bool = False
    """Run on the CPU even where a GPU is present."""
    cpu_threads: Optional[PositiveInt] = None
    """Torch threads per process on the CPU; ``None`` shares the cores among the local processes
    (``accelerate launch`` itself sets OMP_NUM_THREADS=1, which would leave cores idle)."""
    max_train_batches: Optional[PositiveInt] = None
    """Stop each epoch after this many batches (smoke tests); ``None`` trains on everything."""
    linear_probe: bool = True
    """Fit a logistic regression on the frozen pretrained features before fine-tuning and report its accuracy
    beside the fine-tuned model's (RUN/linear_probe.safetensors); ``optim.head_init=linear_probe`` needs it."""
    linear_probe_max_rows: Optional[PositiveInt] = 100_000
    """The probe fits on a stratified sample of at most this many train images (seeded by ``seed``, every class
    kept), whose features the main process holds (512 MB at 100,000 x 1,280 float32); test and val are scored on
    every image, streamed. ``null`` fits on every train image."""
    ema_decay: Optional[float] = Field(None, gt=0, lt=1)
    """Evaluate and keep an exponential moving average of the weights (timm's ``ModelEmaV3``); ``None`` is off."""
    wise_ft: float = Field(1.0, gt=0, le=1)
    """WiSE-FT's mixing weight: evaluate and keep ``(1 - wise_ft) * start + wise_ft * trained`` (the EMA's when there
    is one), where ``start`` is the network fine-tuning began from (with LP-FT: the linear probe); 1 keeps the
    trained weights. Values between keep more of the pretrained features' robustness (Wortsman et al., 2022)."""
    tta_hflip: bool = False
    """Evaluate on each image and its mirror image (mean of the two softmaxes)."""
    log_with: Optional[str] = "tensorboard"
    """An Accelerate tracker (tensorboard, wandb, mlflow, ...) logging to RUN/trackers; ``none`` turns it off."""

    @field_validator("log_with", mode="before")
    @classmethod
    def _none_is_off(cls, value):
        return None if value in (None, False, "none") else value


class ExtractConfig(Section):
    splits: list[str] = Field(list(SPLITS), min_length=1)
    batch_size: PositiveInt = 64
    num_workers: Optional[NonNegativeInt] = None
    """DataLoader workers decoding images; ``None``: one per core this process may use, shared among the
    processes of this machine (``catdog.extract.decode_workers``)."""
    shard_size: PositiveInt = 1000
    """Images per HDF5 shard."""

    spatial: bool = True
    """Store each image's last spatial feature map (float16) beside its pooled features."""
    compression: Optional[Literal["lz4", "lzf", "gzip"]] = "lz4"
    """The spatial maps' HDF5 filter (``catdog.store.COMPRESSION``): lz4 writes 2-3x and reads 5x faster than lzf at
    the same size (``bench/compression.py``); ``None`` stores them raw."""
    mixed_precision: Precision = "auto"
    channels_last: bool = True
    fold_batchnorm: bool = True
    """Fold each BatchNorm into the convolution before it (exact in eval mode; about 1.5x faster on a CPU)."""
    cpu: bool = False
    """Run on the CPU even where a GPU is present."""

    @field_validator("splits")
    @classmethod
    def _distinct(cls, splits: list[str]) -> list[str]:
        if len(set(splits)) != len(splits):
            raise ValueError("list each split once, e.g. [train, test, val]")
        return splits


class ForestConfig(Section):
    backend: Literal["auto", "sklearn", "cuml"] = "auto"
    n_estimators: PositiveInt = 100
    random_state: int = 42
    max_depth: Optional[PositiveInt] = None
    n_jobs: int = -1
    """scikit-learn's convention: -1 uses every core."""
    max_train_rows: Optional[PositiveInt] = 100_000
    """The forest fits on a stratified sample of at most this many train rows (seeded by ``random_state``; every
    class kept); ``null`` fits on all of them. Accuracies and per-class means still cover every row."""


class ClassifierSpec(Section):
    estimator: str
    """A scikit-learn classifier's class name, e.g. ``RandomForestClassifier``."""
    params: dict = {}
    """Its parameters; one written ``{grid_search: [v1, v2, ...]}`` (Tune's spelling) is an axis of the sweep."""

    @field_validator("params")
    @classmethod
    def _axes_have_values(cls, params: dict) -> dict:
        for key, value in params.items():
            if isinstance(value, dict) and "grid_search" in value and (
                    set(value) != {"grid_search"} or not isinstance(value["grid_search"], list)
                    or not value["grid_search"]):
                raise ValueError(f"{key}: a hyperparameter axis is {{grid_search: [v1, v2, ...]}} with at least "
                                 "one value")
        return params


def _top_k(value):
    if value == "all" or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return value
    raise ValueError("each k is a positive number of features or 'all'")


class SweepConfig(Section):
    ks: list[Annotated[Union[int, str], PlainValidator(_top_k)]] = Field([10, 100, 500, 1000, "all"], min_length=1)
    classifiers: dict[str, ClassifierSpec] = Field(min_length=1, default={
        "rf": ClassifierSpec(estimator="RandomForestClassifier", params={"n_estimators": 100, "random_state": 42}),
        "lr": ClassifierSpec(estimator="LogisticRegression", params={"max_iter": 1000, "random_state": 42}),
    })
    """Name -> scikit-learn estimator class name and its parameters (one line per name in the plot)."""
    ranking: str = "global"
    """``global`` (the forest's importances) or a class name (that class's per-class ranking)."""
    max_retries: NonNegativeInt = 3
    """Times Tune reruns a trial whose worker or node died."""
    max_train_rows: Optional[PositiveInt] = 50_000
    """Cells fit on a stratified sample of at most this many train rows (every class kept); ``null``: all rows."""
    max_eval_rows: Optional[PositiveInt] = 50_000
    """Cells are scored on a stratified sample of at most this many rows of test and of val; ``null``: all rows."""
    seed: int = 0
    """Seeds the samples."""


class TopactConfig(Section):
    features_per_class: PositiveInt = 5
    """Each class's first this-many features of the forest's per-class ranking."""
    images_per_feature: PositiveInt = 10
    """Images in each feature's montage."""
    selectivity_top: PositiveInt = 100
    """Class shares are reported among each feature's top this-many images."""
    split: str = "train"
    overlay_alpha: float = Field(0.5, ge=0, le=1)
    colormap: str = "jet"
    """A matplotlib colormap name."""

    @field_validator("colormap")
    @classmethod
    def _known_colormap(cls, name: str) -> str:
        import matplotlib

        if name not in matplotlib.colormaps:
            raise ValueError(f"{name!r} is not a matplotlib colormap (e.g. jet, viridis)")
        return name


class GradcamConfig(Section):
    methods: list[Literal["gradcam", "gradcam++", "hirescam", "xgradcam", "layercam", "eigencam", "eigengradcam",
                          "scorecam"]] = Field(["gradcam"], min_length=1)
    """grad-cam methods to compare (scorecam runs one forward pass per channel: hours on a CPU)."""
    target: Literal["true", "predicted"] = "true"
    """Explain each image's true class, or the class the model predicts."""
    images_per_class: PositiveInt = 3
    """Val images per class in the grid: one seeded sample, the same for every model."""
    faithfulness_images: PositiveInt = 200
    """Seeded val sample over which the confidence drops are averaged."""
    removal_fraction: float = Field(0.2, gt=0, lt=1)
    """Share of pixels removed (set to the normalisation mean) for the faithfulness score."""
    seed: int = 0
    batch_size: PositiveInt = 8
    road_percentiles: list[Annotated[int, Field(gt=0, lt=100)]] = Field([70, 90], min_length=1)
    """grad-cam's ROAD percentiles: at p, most-relevant-first imputes the pixels above the CAM's p-th percentile
    and least-relevant-first those below its (100 - p)-th, so each removes (100 - p)% (70, 90: 30% and 10%).
    Imputation time grows with the share removed: [50, 70, 90] costs about twice as much as the default."""
    sanity_images_per_class: PositiveInt = 5
    """Val images per shown class (``figures.max_classes``; seeded) whose CAMs are recomputed at each step of the
    parameter randomisation."""
    sanity_threshold: float = Field(0.5, gt=0, lt=1)
    """A method is flagged when its maps keep a mean Spearman correlation at least this high with the trained
    model's after randomisation (of every layer, or of the classifier alone)."""


class ConceptsConfig(Section):
    concepts: PositiveInt = 5
    """Concepts (NMF components) per class."""
    split: str = "train"
    """The split whose spatial maps are factorised (each class's images)."""
    importance_split: str = "val"
    """The split whose pooled features measure each concept's importance."""
    reservoir_images: PositiveInt = 1000
    """The NMF is fitted on a seeded uniform sample of at most this many of each class's images (held in memory:
    this many x C x h x w float16 per class); the montages and numbers still cover all of them."""
    batch_images: PositiveInt = 64
    """Images per partial_fit batch (each of their spatial positions is a row), and per read in the other passes."""
    passes: PositiveInt = 3
    """Passes of MiniBatchNMF.partial_fit over the class's reservoir."""
    images_per_concept: PositiveInt = 10
    """Regions in each concept's montage (one per image, the strongest)."""
    random_directions: PositiveInt = 10
    """Random non-negative directions of equal norm averaged for each concept's importance baseline."""
    crop_cells: PositiveInt = 3
    """Side of a montage crop, in cells of the spatial map (clipped to the map)."""
    seed: int = 0
    overlay_alpha: float = Field(0.5, ge=0, le=1)


class CompareConfig(Section):
    """``jobs/compare.py``: two or more runs trained on the same data, side by side."""

    method: Optional[str] = None
    """The grad-cam method whose maps are compared (one the gradcam stage ran); ``None``: gradcam if it ran, else the
    first method it ran."""
    top_fraction: float = Field(0.2, gt=0, lt=1)
    """Share of each map taken as its top region for the IoU between two models' maps."""
    cka_shuffles: PositiveInt = 20
    """Row shuffles of one model's features for the spread of the CKA baseline (its mean is exact, in closed form)."""
    cka_sample_rows: int = Field(2000, ge=2, le=50_000)
    """Val rows (a seeded sample) the shuffles are measured on: they hold the sample in memory and cost
    rows x features^2 each."""
    regression_sample_rows: int = Field(20_000, ge=10)
    """Train rows (a seeded sample stratified by class) each logistic regression is fitted on; test and val are
    scored in full, streamed."""
    montage_images: PositiveInt = 12
    """At most this many disagreements in each pair's montage."""
    seed: int = 0


class FiguresConfig(Section):
    """Per-class pictures (the Grad-CAM grid, top-activation montages, concepts, the report): bounded as classes grow."""

    max_classes: Optional[PositiveInt] = 10
    """Draw per-class pictures for at most this many classes, the most confused first (``catdog.classes``);
    ``null`` draws every class."""


class AuditConfig(Section):
    """``jobs/audit.py``: wrong labels, outliers, duplicates and leaks, from the feature store."""

    folds: int = Field(5, ge=2, le=50)
    """Folds of the cross-validated logistic regression whose out-of-fold probabilities cleanlab ranks."""
    fit_rows: PositiveInt = 20_000
    """Each fold's regression is fitted on a seeded stratified sample of at most this many rows of the other folds
    (memory: ``fit_rows`` x features x 4 bytes), then predicts every row of its fold, shard by shard."""
    logistic_c: PositiveFloat = 1.0
    """Inverse regularisation strength of the regression (on standardised features)."""
    neighbours: PositiveInt = 10
    """Nearest neighbours (feature cosine) averaged for the outlier score; also how many each image's near-duplicate
    search looks at."""
    outlier_fraction: float = Field(0.01, gt=0, lt=1)
    """The most outlying share of the images is listed in outliers.csv."""
    near_duplicate_cosine: float = Field(0.97, gt=0, le=1)
    """Two images whose features' cosine similarity (averaged over the runs) reaches this are near-duplicates. On
    the shared photos (Lite0) distinct photos reach 0.962 at most, resized or re-encoded copies 0.981 at least
    (docs/audit.md)."""
    block_rows: PositiveInt = 2048
    """Rows per block read from the features file: the regression's prediction blocks and the neighbour index's add
    and search blocks."""
    exact_rows: NonNegativeInt = 100_000
    """Up to this many rows the neighbours are exact (faiss ``IndexFlatIP``: N^2 x D multiply-adds, time per image
    grows with N); above, an HNSW graph (``catdog.audit.nearest_neighbours``); 0: always the graph. Near 100,000 rows
    of 1280 features on a 2-core CPU the exact search costs per image about what the graph does (docs/audit.md)."""
    suspects_per_kind: PositiveInt = Field(4, le=20)
    """The top suspects of each kind drawn with every model's Grad-CAM (RUN/audit/suspects.png, the report)."""
    seed: int = 0


class Config(Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    extract: ExtractConfig = ExtractConfig()
    forest: ForestConfig = ForestConfig()
    sweep: SweepConfig = SweepConfig()
    topact: TopactConfig = TopactConfig()
    gradcam: GradcamConfig = GradcamConfig()
    concepts: ConceptsConfig = ConceptsConfig()
    compare: CompareConfig = CompareConfig()
    figures: FiguresConfig = FiguresConfig()
    audit: AuditConfig = AuditConfig()


def _set_dotted(tree: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise CatdogError(f"override {dotted!r}: {key!r} is not a section")
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """Turn ``["optim.lr=3e-4", "model.name=resnet101"]`` into a nested dict (values parsed as YAML)."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise CatdogError(f"override {item!r}: expected section.key=value, e.g. optim.lr=3e-4")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw))
    return tree


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _describe(error: ValidationError, source: str) -> str:
    problems = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            problems.append(f"{where}: unknown key")
        else:
            message = item["msg"].removeprefix("Value error, ")
            problems.append(f"{where}: {message} (got {item.get('input')!r})")
    return f"config {source}: " + "; ".join(problems)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None), apply overrides, validate."""
    tree: dict = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            tree = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise CatdogError(f"config {path}: no such file (see configs/ for examples)") from None
        except yaml.YAMLError as exc:
            raise CatdogError(f"config {path}: not valid YAML: {exc}") from None
        if not isinstance(tree, dict):
            raise CatdogError(f"config {path}: expected a mapping of sections, got {type(tree).__name__}")
    tree = _merge(tree, parse_overrides(overrides or []))
    if overrides:
        source += " + overrides"
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise CatdogError(_describe(exc, source)) from None


RECIPES = Path(__file__).resolve().parents[1] / "configs"
"""The recipes catdog ships, one per model: ``configs/<model>.yaml``."""


def recipe_path(model: str) -> Path | None:
    """``configs/<model>.yaml`` when catdog ships a recipe for ``model``, else None (the defaults then apply)."""
    path = RECIPES / f"{model}.yaml"
    return path if "/" not in model and path.is_file() else None


def load_recipe(model: str, overrides: list[str] | None = None) -> Config:
    """A model's recipe (``recipe_path``, which names its timm model, e.g. ``resnet101.tv2_in1k``), else the
    defaults with ``model.name=model``; then the overrides."""
    path = recipe_path(model)
    return load_config(path, [*([] if path else [f"model.name={model}"]), *(overrides or [])])


def save_config(config: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically)."""
    write_text(path, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
