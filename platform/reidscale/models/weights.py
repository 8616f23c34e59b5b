"""Local checkpoint files → state dicts, and loading them into a module with a clear report.

A checkpoint is a ``.safetensors`` file or a torch file read with
``torch.load(weights_only=True)`` (never an arbitrary pickle). Common wrappers are
unwrapped (``{"state_dict": ...}``, ``{"model": ...}``) and a DataParallel ``module.``
prefix is stripped, so torchvision, torchreid and open_clip checkpoints load as they are.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from reidscale.config import ConfigError


def read_state_dict(path: str | Path, *, key: str = "model.pretrained") -> dict[str, torch.Tensor]:
    """Name → tensor from a local checkpoint file; ConfigError (naming ``key``) if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{key}: {path} is not a file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj = load_file(str(path))
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
            raise ConfigError(f"{key}: {path} is not a tensors-only checkpoint "
                              f"(torch.load(weights_only=True) refused it: {exc})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"{key}: {path} does not hold a state dict (a mapping of names to tensors)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under ``prefix`` (without it) if there are any, else ``state`` unchanged."""
    inner = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return inner or state


def load_state(module: nn.Module, state: dict[str, torch.Tensor], *, source: str,
                 may_miss: tuple[str, ...] = (), may_ignore: tuple[str, ...] = ()) -> None:
    """Copy ``state`` into ``module``; every parameter must arrive except names starting with
    ``may_miss`` (e.g. a new SIE table), and every entry must be used except names starting
    with ``may_ignore`` (e.g. an ImageNet classifier). Anything else is a ConfigError."""
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ConfigError(f"model.pretrained: {source} does not fit this model: {exc}") from None
    missing = [k for k in result.missing_keys if not k.startswith(may_miss)]
    unexpected = [k for k in result.unexpected_keys if not k.startswith(may_ignore)]
    if missing or unexpected:
        raise ConfigError(f"model.pretrained: {source} does not fit this model: "
                          f"{len(missing)} missing ({missing[:4]}), {len(unexpected)} unexpected ({unexpected[:4]})")
