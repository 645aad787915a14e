import logging

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from catdog import models
from catdog.config import DataConfig
from catdog.data import build_transform
from catdog.errors import CatdogError
from conftest import REPO

SHARED_WEIGHTS = REPO.parent / "shared" / "weights"
IMAGENET_CATS, IMAGENET_DOGS = range(281, 286), range(151, 269)
BUNDLED = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_lite_weights_map_onto_timm_and_see_a_cat(name):
    """Each package's tensors load by position into timm's tf_efficientnet_liteN: chelsea is a cat (281-285)."""
    skimage_data = pytest.importorskip("skimage.data")
    net = models.imagenet_backbone(name).eval()
    data = models.data_config(name, DataConfig())
    image = build_transform(data, train=False)(Image.fromarray(skimage_data.chelsea()))
    with torch.no_grad():
        top = net(image[None]).softmax(-1).topk(3)
    assert top.indices[0, 0].item() in IMAGENET_CATS
    assert top.values[0, 0] > 0.5


@pytest.mark.shared_data
@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_lite_weights_name_real_cats_and_dogs(shared_data, name):
    """The untouched 1000-class ImageNet head on real photos (the first 10 of each class in test/, at the model's
    own input size): the top-1 class is an ImageNet class of the photo's kind for 16 or more of the 20 (a few cats
    pass for a lynx, a skunk or a rabbit); weights loaded in the wrong places would name no cat or dog at all."""
    net = models.imagenet_backbone(name).eval()
    transform = build_transform(models.data_config(name, DataConfig()), train=False)
    right = {}
    for label, classes in (("cat", IMAGENET_CATS), ("dog", IMAGENET_DOGS)):
        paths = sorted((shared_data / "test" / label).glob("*.jpg"))[:10]
        batch = torch.stack([transform(Image.open(path).convert("RGB")) for path in paths])
        with torch.no_grad():
            top1 = net(batch).argmax(-1).tolist()
        right[label] = sum(c in classes for c in top1)
    assert min(right.values()) >= 6 and sum(right.values()) >= 16, right


@pytest.mark.parametrize("name, channels, dim, cam_layer", [
    ("efficientnet_lite0", 1280, 1280, "bn2"), ("convnext_atto", 320, 320, "stages"), ("resnet18", 512, 512, "layer4"),
    ("resnet101.tv2_in1k", 2048, 2048, "layer4"), ("regnety_016", 888, 888, "s4"),
    ("mobilenetv3_large_100", 960, 1280, "blocks"),
])
def test_any_timm_cnn_gets_the_uniform_interface(name, channels, dim, cam_layer):
    net = models.create(name, num_classes=3, pretrained="none").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fmap = net.spatial(x)
        pooled = net.pool(fmap)
        logits = net(x)
    assert fmap.ndim == 4 and fmap.shape[1] == channels
    assert pooled.shape == (2, dim) and net.feature_dim == dim
    assert logits.shape == (2, 3)
    assert net.cam_layer_name == cam_layer and isinstance(net.cam_layer, torch.nn.Module)
    torch.testing.assert_close(net.head(pooled), logits)  # the same computation: dtype-scaled tolerance
    assert net.stages[0] and all(not name.startswith(("fc", "classifier", "head.fc")) for s in net.stages for name in s)


def test_cam_layer_can_be_named_and_a_wrong_name_is_clear():
    net = models.create("resnet18", 2, pretrained="none", cam_layer="layer3")
    assert net.cam_layer is net.backbone.layer3
    with pytest.raises(CatdogError, match="model.cam_layer: resnet18 has no module 'layer9'"):
        models.create("resnet18", 2, pretrained="none", cam_layer="layer9").cam_layer


def test_transformers_are_refused_with_a_clear_message():
    with pytest.raises(CatdogError, match="vit_tiny_patch16_224's features are tokens .* not supported yet"):
        models.create("vit_tiny_patch16_224", 2, pretrained="none")


def test_normalisation_and_size_come_from_the_pretrained_config():
    lite0 = models.data_config("efficientnet_lite0", DataConfig())
    assert (lite0.mean, lite0.std, lite0.interpolation, lite0.image_size) == ((0.5,) * 3, (0.5,) * 3, "bicubic", 224)
    resnet = models.data_config("resnet101.tv2_in1k", DataConfig(image_size=224))
    assert resnet.mean == (0.485, 0.456, 0.406) and resnet.interpolation == "bilinear" and resnet.image_size == 224


def test_torchvision_resnet101_is_timms_resnet101_tv2():
    """A torchvision ResNet-101 state dict loads into timm's by name and gives the same logits."""
    torchvision = pytest.importorskip("torchvision")
    reference = torchvision.models.resnet101(weights=None).eval()
    timm_net = models.imagenet_backbone("resnet101.tv2_in1k", pretrained="none").eval()
    timm_net.load_state_dict(reference.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(timm_net(x), reference(x))


def test_freeze_stages_freezes_weights_and_batchnorm():
    net = models.create("efficientnet_lite0", num_classes=2, pretrained="none", freeze_stages=4)
    net.train()
    assert not any(p.requires_grad for p in net.backbone.blocks[2].parameters())
    assert all(p.requires_grad for p in net.backbone.blocks[3].parameters())
    assert not net.backbone.bn1.training and net.backbone.blocks[3].training
    with pytest.raises(CatdogError, match="freeze_stages"):
        net.freeze_stages(99)


def test_local_weights_file_and_clear_errors(tmp_path):
    weights = tmp_path / "lite0.pth"
    torch.save(models.imagenet_backbone("efficientnet_lite0").state_dict(), weights)
    from_file = models.create("efficientnet_lite0", 2, pretrained=str(weights))
    bundled = models.create("efficientnet_lite0", 2, pretrained="imagenet")
    assert torch.equal(from_file.backbone.conv_stem.weight, bundled.backbone.conv_stem.weight)
    with pytest.raises(CatdogError, match="timm has no model 'vgg_nope'"):
        models.create("vgg_nope", 2)
    with pytest.raises(CatdogError, match="no such file"):
        models.create("efficientnet_lite0", 2, pretrained=str(tmp_path / "absent.pth"))
    with pytest.raises(CatdogError, match="no tensor conv1.weight, which resnet18 needs"):
        models.create("resnet18", 2, pretrained=str(weights))


def test_offline_hub_download_fails_fast_and_says_how_to_give_a_file(monkeypatch):
    monkeypatch.setattr(models, "weights_source", lambda name: None)
    with pytest.raises(CatdogError, match=r"convnext_tiny: could not download .*model.pretrained=/path/to/"):
        models.create("convnext_tiny", 2, pretrained="imagenet")


def test_pretrained_batchnorm_statistics_stay_in_eval_mode_while_training():
    network = models.create("efficientnet_lite0", 2, pretrained="none", freeze_stages=1,
                            batchnorm_statistics="pretrained")
    network.train()
    norms = [m for m in network.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and not any(m.training for m in norms)
    assert network.backbone.blocks[-1].training  # everything else trains
    before = [m.running_mean.clone() for m in norms]
    network(torch.randn(4, 3, 64, 64)).sum().backward()
    assert all(torch.equal(a, m.running_mean) for a, m in zip(before, norms))
    assert any(m.weight.grad is not None for m in norms[-3:])  # their affine weights still learn


# ------------------------------------------------------------------------ weights files: full, backbone-only, wrong

def _classifier_free(state: dict) -> dict:
    return {key: value for key, value in state.items() if not key.startswith("classifier.")}


@pytest.fixture(scope="module")
def mobilenet_source() -> torch.nn.Module:
    """A randomly initialised timm MobileNetV2 0.5 whose tensors the files below hold."""
    torch.manual_seed(0)
    return timm.create_model("mobilenetv2_050").eval()


def _assert_same_backbone(network: models.Network, source: torch.nn.Module) -> None:
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(network.eval().spatial(x), source.forward_features(x), rtol=0, atol=0)


@pytest.mark.parametrize("renamed", [False, True], ids=["by name", "by position"])
@pytest.mark.parametrize("with_classifier", [True, False], ids=["full", "backbone-only"])
def test_weights_file_loads_full_or_backbone_only_by_name_or_position(tmp_path, caplog, mobilenet_source,
                                                                      with_classifier, renamed):
    """The backbone comes from the file exactly; without a classifier the run is told that the classifier is new.
    Renamed tensors (another naming, same order, as in the bundled Lite files) load by position from a torch file."""
    state = mobilenet_source.state_dict() if with_classifier else _classifier_free(mobilenet_source.state_dict())
    if renamed:
        state = {f"_m.{i}": value for i, value in enumerate(state.values())}
        path = tmp_path / "mnv2.pth"
        torch.save(state, path)
    else:
        path = tmp_path / "mnv2.safetensors"
        save_file({key: value.contiguous() for key, value in state.items()}, path)
    with caplog.at_level(logging.INFO, logger="catdog.models"):
        network = models.create("mobilenetv2_050", 2, pretrained=str(path))
    _assert_same_backbone(network, mobilenet_source)
    assert network.head.weight.shape == (2, network.feature_dim)
    told = [r.getMessage() for r in caplog.records if "classifier is new" in r.getMessage()]
    assert len(told) == (0 if with_classifier else 1) and all(str(path) in line for line in told)
    imagenet = models.imagenet_backbone("mobilenetv2_050", str(path))  # the 1000-class network keeps the file's head
    assert torch.equal(imagenet.classifier.weight, mobilenet_source.classifier.weight) == with_classifier


def test_renamed_safetensors_are_refused_rather_than_loaded_in_the_wrong_order(tmp_path, mobilenet_source):
    """safetensors stores its tensors sorted by name (_m.10 before _m.2), so their position means nothing."""
    path = tmp_path / "renamed.safetensors"
    save_file({f"_m.{i}": value.contiguous() for i, value in enumerate(mobilenet_source.state_dict().values())}, path)
    with pytest.raises(CatdogError, match=r"renamed\.safetensors: none of its names .* does not keep its tensors"):
        models.create("mobilenetv2_050", 2, pretrained=str(path))


def _broken(state: dict, change: str) -> dict:
    """``state`` with one backbone tensor missing or mis-shaped, or one tensor no MobileNetV2 has."""
    state = _classifier_free(state)
    key = "blocks.3.0.conv_pw.weight"
    if change == "missing":
        del state[key]
    elif change == "misshaped":
        state[key] = state[key][:-1].clone()
    elif change == "renamed misshaped":
        state[key] = state[key][:-1].clone()
        state = {f"_m.{i}": value for i, value in enumerate(state.values())}
    elif change == "unknown":
        state["blocks.9.0.conv_pw.weight"] = state[key].clone()
    return state


@pytest.mark.parametrize("change, message", [
    ("missing", r"no tensor blocks\.3\.0\.conv_pw\.weight, which mobilenetv2_050 needs \(1 of its \d+ backbone"),
    ("misshaped", r"tensor blocks\.3\.0\.conv_pw\.weight is \(95, 16, 1, 1\), mobilenetv2_050 needs \(96, 16, 1, 1\)"),
    ("renamed misshaped", r"tensor blocks\.3\.0\.conv_pw\.weight \(the file's _m\.\d+\) is \(95, 16, 1, 1\)"),
    ("unknown", r"tensor blocks\.9\.0\.conv_pw\.weight is not in mobilenetv2_050"),
])
def test_a_backbone_tensor_missing_or_misshaped_is_one_line_naming_file_and_tensor(tmp_path, mobilenet_source, change,
                                                                                   message):
    path = tmp_path / "broken.pth"
    torch.save(_broken(mobilenet_source.state_dict(), change), path)
    with pytest.raises(CatdogError, match=message) as error:
        models.create("mobilenetv2_050", 2, pretrained=str(path))
    assert str(error.value).startswith(f"weights {path}: ") and "\n" not in str(error.value)
    assert str(error.value).endswith("pass a state dict of mobilenetv2_050 (timm's names, or its order in a .pth; "
                                     "the classifier may be left out)")


@pytest.mark.parametrize("other", ["mobilenetv2_100", "resnet18"])
def test_weights_of_another_architecture_are_refused(tmp_path, mobilenet_source, other):
    """A wider MobileNetV2 (same names, other shapes) or a ResNet (other names), backbone-only or not."""
    path = tmp_path / f"{other}.safetensors"
    save_file(_classifier_free(timm.create_model(other).state_dict()), path)
    message = {"mobilenetv2_100": r"tensor conv_stem\.weight is \(32, 3, 3, 3\), mobilenetv2_050 needs \(16, 3, 3, 3\)",
               "resnet18": r"no tensor conv_stem\.weight, which mobilenetv2_050 needs"}[other]
    with pytest.raises(CatdogError, match=message):
        models.create("mobilenetv2_050", 2, pretrained=str(path))
    renamed = tmp_path / "renamed.pth"
    torch.save({f"_m.{i}": value for i, value in enumerate(timm.create_model(other).state_dict().values())}, renamed)
    with pytest.raises(CatdogError, match=r"weights .*renamed\.pth: (none of its names|tensor conv_stem\.weight)"):
        models.create("mobilenetv2_050", 2, pretrained=str(renamed))


@pytest.mark.shared_data
def test_shared_mobilenetv2_backbone_only_file_loads(caplog):
    """The real MobileNetV2 1.0 ImageNet file: 312 backbone tensors, no classifier (timm's model has 314)."""
    path = SHARED_WEIGHTS / "mobilenetv2_100.safetensors"
    if not path.is_file():
        pytest.skip(f"{path} is absent (reference weights)")
    state = models.read_state_dict(path)
    with caplog.at_level(logging.INFO, logger="catdog.models"):
        network = models.create("mobilenetv2_100", 2, pretrained=str(path))
    assert any("classifier is new" in r.getMessage() for r in caplog.records)
    loaded = network.backbone.state_dict()
    assert set(loaded) - set(state) == {"classifier.weight", "classifier.bias"}
    assert all(torch.equal(loaded[key], value) for key, value in state.items())
    with pytest.raises(CatdogError, match=r"mobilenetv2_050 needs"):
        models.create("mobilenetv2_050", 2, pretrained=str(path))
