"""``--init``: start the ResNet (and the head, when it fits) from pretrained weights, completely or not at all.

Accepted sources:
- a local torchvision ResNet state dict (``fc.*`` ignored);
- the reference implementation's checkpoints (bytedance/TWIST): the full training checkpoint
  ``{'model', 'backbone', 'args', ...}`` whose ``args`` is an ``argparse.Namespace`` (unpickled through an
  allow-list of exactly that type, never arbitrary objects), or a backbone-only state dict;
  ``module.``/``backbone.`` prefixes are stripped, and the head is loaded too when K matches;
- ``torchvision:resnet18|resnet34|resnet50``: ImageNet weights through torchvision's weights API, read from
  the torch hub cache (``$TORCH_HOME/hub/checkpoints``), downloaded there only when the machine is online.
"""

from __future__ import annotations

import argparse
import pickle
import socket
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch

from twist_core.errors import UserError
from twist_core.io_utils import file_sha256

TORCHVISION_PREFIX = "torchvision:"
TORCHVISION_ARCHITECTURES = ("resnet18", "resnet34", "resnet50")
STRIPPED_PREFIXES = ("module.", "backbone.")
# The reference's projection head -> this project's TwistHead (Linear, BN, ReLU, [Dropout], Linear, BN, ReLU, Linear).
REFERENCE_HEAD = {"projection_heads.projection_head.0.": "mlp.0.", "projection_heads.projection_head.1.": "mlp.1.",
                  "projection_heads.projection_head.4.": "mlp.3.", "projection_heads.projection_head.5.": "mlp.4.",
                  "projection_heads.last_linear.": "mlp.6.", "projection_heads.norm.": "logit_norm."}


class InitError(UserError, ValueError):
    """Weights that cannot start this run as asked; nothing was trained."""


@dataclass(frozen=True)
class InitWeights:
    """Pretrained tensors in this project's layout, with where they came from."""

    source: str
    file: Path
    sha256: str
    backbone: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def width(self) -> int:
        return int(self.backbone["conv1.weight"].shape[0])

    @property
    def small_stem(self) -> bool:
        return self.backbone["conv1.weight"].shape[-1] == 3

    @property
    def architecture(self) -> str:
        """resnet18/34/50 from the block layout (bottleneck blocks have a conv3; depth from layer3's blocks)."""
        bottleneck = "layer1.0.conv3.weight" in self.backbone
        blocks = len({key.split(".")[1] for key in self.backbone if key.startswith("layer3.")})
        if bottleneck:
            return "resnet50"
        return "resnet34" if blocks >= 6 else "resnet18"

    @property
    def head_shape(self) -> tuple[int, int] | None:
        """(hidden width, K) of the saved head, if the file has one."""
        if "mlp.6.weight" not in self.head:
            return None
        return int(self.head["mlp.0.weight"].shape[0]), int(self.head["mlp.6.weight"].shape[0])


def read_init(source: str) -> InitWeights:
    """Read ``source`` (a file or ``torchvision:NAME``) into backbone (and head) tensors; ``InitError`` if unusable."""
    path = torchvision_weights_file(source[len(TORCHVISION_PREFIX):]) if source.startswith(TORCHVISION_PREFIX) \
        else Path(source)
    if not path.is_file():
        raise InitError(f"--init {source}: no such file")
    backbone, head = split_layout(load_weights_file(path), path)
    return InitWeights(source, path, file_sha256(path), backbone, head)


def torchvision_weights_file(name: str) -> Path:
    """torchvision's ImageNet weights for ``name`` in the torch hub cache, downloaded there if online.

    Offline it fails at once, naming the exact file to place in the cache.
    """
    import torchvision

    if name not in TORCHVISION_ARCHITECTURES:
        raise InitError(f"--init torchvision:{name}: choose one of "
                        f"{', '.join(TORCHVISION_PREFIX + n for n in TORCHVISION_ARCHITECTURES)}")
    url = torchvision.models.get_model_weights(name).DEFAULT.url
    target = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    if target.is_file():
        return target
    host = urlparse(url).hostname or ""
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError:
        raise InitError(f"--init torchvision:{name}: the weights are not in the cache and {host} cannot be "
                        f"reached; download {url} on a machine with internet and place it at {target}") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(url, str(target), hash_prefix=None, progress=True)
    return target


def load_weights_file(path: Path) -> dict:
    """``torch.load(weights_only=True)``, allowing exactly one more type: the reference's ``argparse.Namespace``."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, OSError) as error:
        reason = "it holds objects other than tensors" if "weights_only" in str(error) else \
            (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        raise InitError(f"--init {path}: not a readable weights file ({reason})") from None
    if not isinstance(state, dict):
        raise InitError(f"--init {path}: expected a state dict or a checkpoint, found a {type(state).__name__}")
    return state


def _strip(state: dict, prefixes: tuple[str, ...] = STRIPPED_PREFIXES) -> dict[str, torch.Tensor]:
    stripped = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        for prefix in prefixes:
            while key.startswith(prefix):
                key = key[len(prefix):]
        stripped[key] = value
    return stripped


def split_layout(state: dict, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Backbone tensors (torchvision names, no ``fc``) and head tensors (this project's names) of any accepted form."""
    if "model" in state and isinstance(state["model"], dict):  # the reference's full training checkpoint
        model = {key.removeprefix("module."): value for key, value in state["model"].items()}
        backbone = _strip(state.get("backbone") or {k: v for k, v in model.items() if k.startswith("backbone.")})
        head = {}
        for key, value in model.items():
            for theirs, ours in REFERENCE_HEAD.items():
                if key.startswith(theirs):
                    head[ours + key[len(theirs):]] = value
        if not head:  # a checkpoint of this project's own layout (head.*)
            head = {k.removeprefix("head."): v for k, v in model.items() if k.startswith("head.")}
    else:
        state = state.get("state_dict", state)
        backbone = _strip(state)
        head = {}
    backbone = {k: v for k, v in backbone.items() if not k.startswith(("fc.", "head.", "projection_heads."))}
    if "conv1.weight" not in backbone:
        raise InitError(f"--init {path}: no ResNet weights found (no conv1.weight); give a torchvision ResNet state "
                        "dict, a TWIST reference checkpoint, or torchvision:resnet18|resnet50")
    return backbone, head


def check_complete(own: dict[str, torch.Tensor], given: dict[str, torch.Tensor], what: str, advice: str) -> None:
    """Stop unless every tensor of ``own`` (0-d counters aside) has a same-shaped tensor in ``given``."""
    missing = [k for k, v in own.items() if v.ndim > 0 and k not in given]
    wrong = [f"{k} {tuple(given[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if v.ndim > 0 and k in given and given[k].shape != v.shape]
    if missing or wrong:
        listed = "; ".join([*(f"missing {k}" for k in missing[:4]), *(f"shape {w}" for w in wrong[:4])])
        raise InitError(f"--init fits only part of the {what} ({len(missing)} missing, {len(wrong)} of another "
                        f"shape: {listed}); {advice}")


def _advice(init: InitWeights) -> str:
    return (f"the weights are a {init.architecture} of width {init.width} with a "
            f"{'3x3' if init.small_stem else '7x7'} stem: match --backbone, --width and --small-stem/--no-small-stem")


def check_fits(init: InitWeights, backbone: str, width: int, small_stem: bool) -> None:
    """Raise unless the weights fill this backbone completely: checked before the run writes anything."""
    from twist_core.model.network import ResNetBackbone

    check_complete(ResNetBackbone(backbone, width, small_stem).state_dict(), init.backbone, "backbone",
                   _advice(init))


def load_into(model: torch.nn.Module, init: InitWeights) -> bool:
    """Load the backbone completely (or raise), and the head when its shape matches; returns whether it did."""
    own = model.backbone.state_dict()
    check_complete(own, init.backbone, "backbone", _advice(init))
    model.backbone.load_state_dict({k: init.backbone[k] for k in own if k in init.backbone}, strict=False)
    head_own = model.head.state_dict()
    if init.head and all(k in init.head and init.head[k].shape == v.shape for k, v in head_own.items() if v.ndim):
        model.head.load_state_dict({k: init.head[k] for k in head_own if k in init.head}, strict=False)
        return True
    return False
