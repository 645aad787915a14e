import pytest
import torch
from PIL import Image

from catdog import models
from catdog.config import DataConfig
from catdog.data import build_transform
from catdog.errors import CatdogError


def test_bundled_lite0_weights_map_onto_timm_and_see_a_cat():
    """The package's 296 tensors load by position into timm's tf_efficientnet_lite0: chelsea is a cat (281-285)."""
    skimage_data = pytest.importorskip("skimage.data")
    net = models.imagenet_backbone("efficientnet_lite0").eval()
    data = models.data_config("efficientnet_lite0", DataConfig())
    image = build_transform(data, train=False)(Image.fromarray(skimage_data.chelsea()))
    with torch.no_grad():
        top = net(image[None]).softmax(-1).topk(3)
    assert 281 <= top.indices[0, 0].item() <= 285
    assert top.values[0, 0] > 0.5


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
    with pytest.raises(CatdogError, match="do not fit"):
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
