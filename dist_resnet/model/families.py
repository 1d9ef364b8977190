"""The model families `--model NAME` chooses from, one entry each in FAMILIES: the reference
network, torchvision's classification models, timm's (`timm:NAME`), and the user's own
(`path/to/file.py:build` or `package.module:build`). Each builds a network for a data set's
channels, classes and image size; adding a family is one more entry here.

A name that imports code (the user's own) runs that code: the command line must give it
(config.command_line refuses it from an options file, a run record or a weights card)."""

import importlib
import importlib.util
import itertools
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call

from dist_resnet.model.reference import ResNet

SMALL_IMAGE_SIDE = 32  # and below: torchvision's ResNets get a stem that keeps the resolution
# torchvision's models that return their auxiliary classifiers' outputs too, a namedtuple, in
# training mode unless built without them.
AUXILIARY_CLASSIFIERS = ("googlenet", "inception_v3")


class ModelError(Exception):
    """A model that cannot be built as asked: an unknown name, a missing package, a builder
    that fails or returns no nn.Module."""


@dataclass(frozen=True)
class Shape:
    """What a data set asks of a model: its input channels, its classes, its image size."""

    channels: int
    classes: int
    image_size: tuple[int, int]


@dataclass(frozen=True)
class Family:
    """A family of models: which names are its own, and how one of them is built."""

    matches: Callable[[str], bool]
    build: Callable[[str, Shape, tuple[int, ...]], nn.Module]
    imports_code: bool = False  # the user's own code: only a name typed on the command line
    # Whether a build is tried on the meta device first (_check_logits): models made for other
    # inputs (ImageNet's), whose failure on the data set's images would come at the first step.
    # Not the reference (made for these inputs), nor the user's code (it may branch on values).
    check_output: bool = False
    describe: str = ""


def _reference(name: str, shape: Shape, widths: tuple[int, ...]) -> nn.Module:
    return ResNet(widths, in_channels=shape.channels, num_classes=shape.classes)


def _torchvision_names() -> list[str]:
    from torchvision import models

    return models.list_models(module=models)


def _is_torchvision(name: str) -> bool:
    return bool(re.fullmatch(r"[a-z][a-z0-9_]*", name)) and name != "reference" and name in _torchvision_names()


def _torchvision(name: str, shape: Shape, widths: tuple[int, ...]) -> nn.Module:
    """torchvision's model of that name, untrained, with the data set's classes; its first
    convolution takes the data set's channels; a ResNet (resnet*, resnext*, wide_resnet*) on
    images of SMALL_IMAGE_SIDE or less gets a 3x3 stride-1 first convolution and no max-pool,
    as is usual for CIFAR-sized inputs (otherwise a 28x28 image is 7x7 after the stem)."""
    from torchvision import models

    extra = {"aux_logits": False} if name in AUXILIARY_CLASSIFIERS else {}
    net = models.get_model(name, weights=None, num_classes=shape.classes, **extra)
    small = max(shape.image_size) <= SMALL_IMAGE_SIDE
    if isinstance(net, models.ResNet) and small:
        out = net.conv1.out_channels
        net.conv1 = nn.Conv2d(shape.channels, out, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif shape.channels != 3:
        _replace_first_conv(net, shape.channels)
    return net


def _replace_first_conv(net: nn.Module, channels: int) -> None:
    """The first Conv2d of net, made anew for `channels` input channels, all else the same."""
    for path, module in net.named_modules():
        if isinstance(module, nn.Conv2d):
            parent = net.get_submodule(path.rpartition(".")[0]) if "." in path else net
            setattr(parent, path.rpartition(".")[2], nn.Conv2d(
                channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                module.dilation, module.groups, module.bias is not None, module.padding_mode))
            return
    raise ModelError("no Conv2d to take the data set's channels")


def _timm(name: str, shape: Shape, widths: tuple[int, ...]) -> nn.Module:
    """timm.create_model(NAME, in_chans=C, num_classes=K): timm adapts the stem and the head of
    any of its architectures; untrained (no download)."""
    try:
        import timm
    except ImportError:
        raise ModelError(f"--model {name} needs timm, which is not installed: "
                         "`pip install -e \".[timm]\"` (or `pip install timm`)") from None
    architecture = name.split(":", 1)[1]
    try:
        return timm.create_model(architecture, pretrained=False, in_chans=shape.channels, num_classes=shape.classes)
    except Exception as err:  # timm's "Unknown model", or an architecture that cannot take these inputs
        raise ModelError(f"--model {name}: {type(err).__name__}: {' '.join(str(err).split())[:200]}") from None


# timm's own architecture names (resnet18, vit_base_patch16_224.augreg_in21k): not its
# hf-hub: or local-dir: sources, which a file naming a model would have timm fetch or read.
TIMM_NAME = re.compile(r"timm:[A-Za-z0-9_][A-Za-z0-9_.-]*")


CODE_NAME = re.compile(r"(?P<source>[^:]+):(?P<function>[A-Za-z_][A-Za-z0-9_]*)")


def _is_code(name: str) -> bool:
    return not name.startswith("timm:") and bool(CODE_NAME.fullmatch(name))


def same_model(a: str, b: str) -> bool:
    """Whether two --model names build the same network: the same name, or the same function
    of the same file however its path is written (relative, absolute, through ./)."""
    if a == b:
        return True
    if not (_is_code(a) and _is_code(b)):
        return False
    (file_a, function_a), (file_b, function_b) = (CODE_NAME.fullmatch(n).group("source", "function") for n in (a, b))
    if function_a != function_b or not (file_a.endswith(".py") and file_b.endswith(".py")):
        return False
    return Path(file_a).resolve() == Path(file_b).resolve()


def _code(name: str, shape: Shape, widths: tuple[int, ...]) -> nn.Module:
    """The user's own: FILE.py:FUNCTION or package.module:FUNCTION, called as
    FUNCTION(channels, classes, image_size) -> nn.Module."""
    match = CODE_NAME.fullmatch(name)
    source, function = match["source"], match["function"]
    try:
        module = _load_module(source)
    except ModelError:
        raise
    except (Exception, SystemExit) as err:  # the user's module failed, or exited, as it ran
        raise ModelError(f"--model {name}: importing {source} failed: {type(err).__name__}: {err}") from None
    build = getattr(module, function, None)
    if not callable(build):
        raise ModelError(f"--model {name}: {source} has no function {function}")
    try:
        net = build(shape.channels, shape.classes, shape.image_size)
    except (Exception, SystemExit) as err:
        raise ModelError(f"--model {name}: {function}({shape.channels}, {shape.classes}, {shape.image_size}) "
                         f"failed: {type(err).__name__}: {err}") from None
    if not isinstance(net, nn.Module):
        raise ModelError(f"--model {name}: {function} returned {type(net).__name__}, not a torch.nn.Module")
    return net


def _load_module(source: str):
    if source.endswith(".py"):
        path = Path(source)
        if not path.is_file():
            raise ModelError(f"--model {source}: no such file")
        name = "dist_resnet_user_model_" + re.sub(r"\W", "_", path.stem)
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # so that pickling and torch.compile find its classes
        spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(source)
    except ModuleNotFoundError as err:
        raise ModelError(f"--model {source}: no module {err.name} (give FILE.py:FUNCTION, or a module "
                         "on the Python path)") from None


FAMILIES = {
    "reference": Family(lambda name: name == "reference", _reference,
                        describe="the reference ResNet (--widths)"),
    "torchvision": Family(_is_torchvision, _torchvision, check_output=True,
                          describe="torchvision's classification models by name"),
    "timm": Family(lambda name: bool(TIMM_NAME.fullmatch(name)), _timm, check_output=True,
                   describe="timm's models, timm:NAME"),
    "code": Family(_is_code, _code, imports_code=True,
                   describe="your own, FILE.py:FUNCTION or package.module:FUNCTION"),
}


def family_of(name: str) -> Family:
    for family in FAMILIES.values():
        if family.matches(name):
            return family
    raise ModelError(f"--model {name}: not a model name: reference, a torchvision model (such as resnet18), "
                     "timm:NAME (an architecture's name), FILE.py:FUNCTION or package.module:FUNCTION")


def imports_code(name: str) -> bool:
    """Whether building `name` runs code from outside the suite and its dependencies."""
    return _is_code(name)


def build(name: str, shape: Shape, widths: tuple[int, ...]) -> nn.Module:
    """The untrained network `name` for a data set of this shape (widths: the reference's)."""
    family = family_of(name)
    net = family.build(name, shape, widths)
    if family.check_output:
        _check_logits(name, net, shape)
    return net


def _check_logits(name: str, net: nn.Module, shape: Shape) -> None:
    """ModelError, in one line, for a model that cannot take the data set's images or does not
    return [N, classes] logits in training mode, instead of a traceback at the first step. A
    forward of two images on the meta device: no arithmetic, and the model's weights, buffers
    and torch's generator are not touched."""
    if next(iter(net.parameters()), torch.empty(0)).is_meta:
        return  # built on the meta device (weights.load_model's shape check): nothing to run yet
    meta = {key: t.to("meta") for key, t in itertools.chain(net.named_parameters(), net.named_buffers())}
    images = torch.zeros(2, shape.channels, *shape.image_size, device="meta")
    was_training = net.training
    try:
        out = functional_call(net.train(), meta, (images,))
    except Exception as err:  # the model's own failure, whatever it raises
        side = "x".join(map(str, shape.image_size))
        raise ModelError(f"--model {name} cannot take {shape.channels}x{side} images ({type(err).__name__}: "
                         f"{' '.join(str(err).split())[:160]}): try --image-size") from None
    finally:
        net.train(was_training)
    if not (isinstance(out, torch.Tensor) and tuple(out.shape) == (2, shape.classes)):
        got = f"a tensor of shape {list(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(f"--model {name} returns {got}, not logits [N, {shape.classes}]")
