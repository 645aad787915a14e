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
    image = build_transform(DataConfig(), train=False)(Image.fromarray(skimage_data.chelsea()))
    with torch.no_grad():
        top = net(image[None]).softmax(-1).topk(3)
    assert 281 <= top.indices[0, 0].item() <= 285
    assert top.values[0, 0] > 0.5


@pytest.mark.parametrize("name, dim", [("efficientnet_lite0", 1280), ("convnext_tiny", 768), ("resnet101", 2048)])
def test_uniform_interface(name, dim):
    net = models.create(name, num_classes=2, pretrained="none").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fmap = net.spatial(x)
        pooled = net.pool(fmap)
        logits = net(x)
    assert fmap.ndim == 4 and fmap.shape[1] == dim
    assert pooled.shape == (2, dim) and net.feature_dim == dim
    assert logits.shape == (2, 2)
    assert torch.allclose(net.head(pooled), logits, atol=1e-5)
    assert isinstance(net.cam_layer, torch.nn.Module)


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
    with pytest.raises(CatdogError, match="unknown model 'vgg'.*efficientnet_lite0"):
        models.create("vgg", 2)
    with pytest.raises(CatdogError, match="no such file"):
        models.create("efficientnet_lite0", 2, pretrained=str(tmp_path / "absent.pth"))
    with pytest.raises(CatdogError, match="do not fit"):
        models.create("resnet101", 2, pretrained=str(weights))


def test_offline_hub_download_says_how_to_give_a_file(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(models.timm, "create_model", offline)
    with pytest.raises(CatdogError, match=r"model.pretrained=/path/to/convnext_tiny"):
        models.create("convnext_tiny", 2, pretrained="imagenet")
