"""What ``./launch.sh`` is about to train, checked before its first stage: each model's config (its recipe, the
``--set`` overrides, its ``--weights`` file) and where its ImageNet weights come from. A typo in a model name, an
override or a weights file is then one line before anything runs, not a failure an hour in."""
from __future__ import annotations

from pathlib import Path

from catdog import models
from catdog.config import Config, load_recipe, recipe_path
from catdog.errors import CatdogError


def weights_overrides(model: str, weights: dict[str, str]) -> list[str]:
    """The override that gives ``model`` its own weights file (``--weights MODEL=FILE``), if any."""
    return [f"model.pretrained={Path(weights[model]).resolve()}"] if model in weights else []


def parse_weights(pairs: list[str], names: list[str]) -> dict[str, str]:
    """``["NAME=FILE", ...]`` as a dict; every NAME must be one of the models being trained."""
    weights = {}
    for pair in pairs:
        name, sep, file = pair.partition("=")
        if not sep or not name or not file:
            raise CatdogError(f"--weights {pair}: expected NAME=FILE, e.g. --weights mobilenetv2_100=weights.safetensors")
        if name not in names:
            raise CatdogError(f"--weights {pair}: {name} is not one of --models ({', '.join(names)}); name a model "
                              "being trained")
        weights[name] = file
    return weights


def plan(names: list[str], weights: dict[str, str], overrides: list[str]) -> dict[str, tuple[Config, str]]:
    """Each model's resolved config and a line saying where its recipe and weights come from; every problem is a
    ``CatdogError`` naming the model and what to do."""
    if len(set(names)) != len(names):
        raise CatdogError(f"--models {' '.join(names)}: a model is named twice (each model gets one run directory)")
    planned = {}
    for name in names:
        config = load_recipe(name, [*overrides, *weights_overrides(name, weights)])
        models.data_config(config.model.name, config.data)  # an unknown model name fails here
        pretrained = config.model.pretrained
        if pretrained == "imagenet":
            source = models.weights_source(config.model.name)
            if source is None:
                raise CatdogError(f"{name}: its ImageNet weights cannot be had here (offline?): pass a local file "
                                  f"with --weights {name}=FILE, or --set model.pretrained=none to start from scratch")
            where = f"ImageNet weights {source}"
        elif pretrained == "none":
            where = "random initialisation"
        else:
            models.imagenet_backbone(config.model.name, pretrained)  # a file that does not fit fails here
            where = f"weights {pretrained}"
        recipe = recipe_path(name)
        planned[name] = (config, f"{name}: recipe {recipe.relative_to(recipe.parents[1]) if recipe else 'defaults'}, "
                                 f"{where}")
    return planned
