"""Video DiTs written here, weight-compatible with diffusers state dicts.

``build_model(family, flavour, **overrides)`` builds a model of a registered family from a named size
preset; ``FAMILIES`` maps a family name to ``(module, model class, config class)``. Families are
imported lazily so that ``import models`` stays cheap.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn as nn

# family -> (module, model class, config class); the config class has ``flavour(name, **overrides)``.
FAMILIES: dict[str, tuple[str, str, str]] = {
    "wan": ("models.wan", "WanModel", "WanConfig"),
    "hunyuan15": ("models.hunyuan15", "HunyuanVideo15Model", "HunyuanVideo15Config"),
}


def model_classes(family: str) -> tuple[type, type]:
    """(model class, config class) of a registered family."""
    if family not in FAMILIES:
        raise ValueError(f"model family {family!r}: expected one of {sorted(FAMILIES)}")
    module, model_cls, config_cls = FAMILIES[family]
    mod = importlib.import_module(module)
    return getattr(mod, model_cls), getattr(mod, config_cls)


def build_model(
    family: str, flavour: str, *, device: str | torch.device | None = None, **overrides
) -> nn.Module:
    """A randomly initialised model of ``family`` at size preset ``flavour``, config fields overridden.

    device="meta" builds without memory (shape and parameter-count checks).
    """
    model_cls, config_cls = model_classes(family)
    cfg = config_cls.flavour(flavour, **overrides)
    if device is None:
        return model_cls(cfg)
    with torch.device(device):
        return model_cls(cfg)
