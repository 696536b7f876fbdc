"""State-dict adapters between our module layout and diffusers' (or any other) key layout.

A :class:`KeyMap` is a list of prefix rules ``(ours, (theirs, ...))``. ``{i}`` in a rule stands for a
block index. A rule with several ``theirs`` prefixes fuses them: the tensors are concatenated along
dim 0 on load (e.g. diffusers' to_q, to_k, to_v -> our qkv) and split into equal chunks on export.
Only known layout conversions are reshaped: the tensors ``their_shapes`` lists, with exactly that
shape (e.g. a Conv3d patch embedding -> our Linear); without ``their_shapes``, trailing dims flattened
into our last one. Any other shape difference raises. Keys that no rule matches map to themselves.
Both directions are exact: ``to_theirs(to_ours(sd)) == sd`` bit for bit.

Files: :func:`load_safetensors` reads one ``.safetensors`` file, a folder with one, or a sharded
folder (``*.safetensors.index.json``). Pickled checkpoints are refused: never unpickle.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file


class StateDictKeyError(KeyError):
    """A state dict does not fit the model: the message lists the missing and unexpected keys."""

    def __init__(self, what: str, missing: list[str], unexpected: list[str]):
        self.missing, self.unexpected = missing, unexpected
        lines = [f"{what}: state dict does not match the model"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): " + ", ".join(missing))
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): " + ", ".join(unexpected))
        super().__init__("\n".join(lines))

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


@dataclass(frozen=True)
class KeyMap:
    """Prefix rules from our keys to theirs; ``ignore`` = regexes of their keys dropped silently."""

    rules: tuple[tuple[str, tuple[str, ...]], ...]
    ignore: tuple[str, ...] = ()

    def __post_init__(self):
        compiled = []
        for ours, theirs in self.rules:
            pattern = re.escape(ours).replace(re.escape("{i}"), r"(?P<i>\d+)")
            compiled.append((re.compile(pattern), theirs))
        object.__setattr__(self, "_compiled", compiled)

    def theirs(self, key: str) -> tuple[str, ...]:
        """Their key(s) for our ``key`` (several = fused along dim 0, in this order)."""
        best = None
        for pattern, theirs in self._compiled:
            m = pattern.match(key)
            if m and (best is None or m.end() > best[0].end()):
                best = (m, theirs)
        if best is None:
            return (key,)
        m, theirs = best
        i = m.groupdict().get("i")
        rest = key[m.end() :]
        return tuple((t.replace("{i}", i) if i is not None else t) + rest for t in theirs)

    def ignored(self, key: str) -> bool:
        return any(re.search(p, key) for p in self.ignore)


def to_ours(
    theirs_sd: Mapping[str, torch.Tensor],
    our_shapes: Mapping[str, torch.Size],
    keymap: KeyMap,
    *,
    strict: bool = True,
    what: str = "model",
    their_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> dict[str, torch.Tensor]:
    """Convert their state dict to our keys and shapes. strict: any missing or unexpected key raises
    :class:`StateDictKeyError` listing them all; otherwise missing keys are left out of the result.
    their_shapes: their tensors whose layout differs from ours (as for :func:`to_theirs`); a tensor is
    reshaped only when listed there and its shape is the listed one (None: trailing dims flattened into
    our last, e.g. Conv3d -> Linear). Any other shape difference raises a ValueError."""
    out, used, missing = {}, set(), []
    for key, shape in our_shapes.items():
        names = keymap.theirs(key)
        absent = [n for n in names if n not in theirs_sd]
        used.update(n for n in names if n in theirs_sd)  # a fused group's present parts: not unexpected
        if absent:
            missing.extend(absent)
            continue
        parts = [theirs_sd[n] for n in names]
        if their_shapes is not None and any(n in their_shapes for n in names):
            # a known layout conversion: each part exactly as listed, then reshaped as to_theirs splits ours
            if any(tuple(p.shape) != tuple(their_shapes.get(n, ())) for n, p in zip(names, parts)) or (
                shape[0] % len(parts) or math_prod(their_shapes[names[0]]) * len(parts) != math_prod(shape)
            ):
                raise ValueError(_shape_error(what, key, names, parts, shape, their_shapes))
            parts = [p.reshape(shape[0] // len(parts), *shape[1:]) for p in parts]
        value = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        if tuple(value.shape) != tuple(shape):
            n = len(shape) - 1
            flattened = n >= 0 and value.dim() > n + 1 and tuple(value.shape[:n]) == tuple(shape[:n])
            if their_shapes is not None or not flattened or math_prod(value.shape[n:]) != shape[-1]:
                raise ValueError(_shape_error(what, key, names, parts, shape, their_shapes))
            value = value.reshape(shape)
        out[key] = value
    unexpected = [k for k in theirs_sd if k not in used and not keymap.ignored(k)]
    if strict and (missing or unexpected):
        raise StateDictKeyError(what, missing, unexpected)
    return out


def _shape_error(what, key, names, parts, shape, their_shapes) -> str:
    got = " + ".join(f"{n} {tuple(p.shape)}" for n, p in zip(names, parts))
    listed = [f"{n} {tuple(their_shapes[n])}" for n in names if their_shapes and n in their_shapes]
    known = f" (the layout conversion expects {', '.join(listed)})" if listed else ""
    return (
        f"{what}: {key}: the checkpoint's {got} does not fit the model's shape {tuple(shape)}{known}; "
        "weights of another model config?"
    )


def to_theirs(
    our_sd: Mapping[str, torch.Tensor],
    keymap: KeyMap,
    their_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`to_ours`: split fused tensors into equal chunks along dim 0 and reshape the ones
    listed in ``their_shapes``."""
    their_shapes = their_shapes or {}
    out = {}
    for key, value in our_sd.items():
        names = keymap.theirs(key)
        parts = [value] if len(names) == 1 else value.chunk(len(names), dim=0)
        for name, part in zip(names, parts):
            if name in their_shapes:
                part = part.reshape(their_shapes[name])
            out[name] = part.contiguous()
    return out


def math_prod(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def preset_config(cls: type, presets: Mapping[str, dict[str, Any]], name: str, overrides: dict, family: str):
    """``cls(**presets[name], **overrides)`` for a config dataclass; unknown preset or field names raise
    a ValueError that lists the valid ones (``family`` names the model in the message)."""
    if name not in presets:
        raise ValueError(f"{family} flavour {name!r}: expected one of {sorted(presets)}")
    names = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(overrides) - names)
    if bad:
        raise ValueError(f"{family} config overrides {bad}: unknown fields; valid: {sorted(names)}")
    return cls(**{**presets[name], **overrides})


def config_from_diffusers(cls: type, fields: Iterable[str], config: Mapping[str, Any], overrides: dict):
    """A config dataclass from a diffusers config.json dict: the keys named in ``fields`` (others, such
    as ``_``-prefixed ones, are ignored), then ``overrides``."""
    kwargs = {k: config[k] for k in fields if k in config}
    if "out_channels" in kwargs and kwargs["out_channels"] is None:  # diffusers: None means in_channels
        kwargs["out_channels"] = kwargs.get("in_channels")
        if kwargs["out_channels"] is None:
            del kwargs["out_channels"]
    return cls(**{**kwargs, **overrides})


def config_to_diffusers(cfg: Any, fields: Iterable[str]) -> dict[str, Any]:
    """The ``fields`` of a config dataclass as a diffusers config.json dict (tuples become lists)."""
    out = {k: getattr(cfg, k) for k in fields}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def read_config(path: str | Path) -> dict:
    """config.json of a diffusers-format folder (or the file itself)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no config.json (expected a diffusers-format model folder)")
    return _read_json(file)


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:  # its message names no file
        raise ValueError(f"{file}: not valid JSON ({e})") from e


def safetensors_files(path: str | Path) -> list[Path]:
    """The weight files of a file or folder: one .safetensors, or the shards named by an index.json."""
    path = Path(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: expected a .safetensors file (pickled checkpoints are not loaded)")
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or folder")
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise ValueError(f"{path}: several index files {[p.name for p in indexes]}; expected one")
    if indexes:
        index = _read_json(indexes[0])
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{indexes[0]}: expected a non-empty 'weight_map' object")
        files = [path / name for name in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"{indexes[0]}: shards listed but not present: {absent}")
        return files
    files = sorted(path.glob("*.safetensors"))
    # beside variants that save_pretrained(variant=...) writes (diffusion_pytorch_model.fp16.safetensors), the
    # default file, as diffusers and transformers load it
    default = [f for f in files if f.name in ("diffusion_pytorch_model.safetensors", "model.safetensors")]
    if len(files) > 1 and len(default) == 1:
        return default
    if len(files) != 1:
        found = [p.name for p in path.iterdir()]
        raise FileNotFoundError(
            f"{path}: expected one *.safetensors file or a *.safetensors.index.json, found {found}"
        )
    return files


def load_safetensors(path: str | Path, *, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors file, a folder with one, or a sharded folder (index.json)."""
    sd: dict[str, torch.Tensor] = {}
    for file in safetensors_files(path):
        try:
            part = load_file(str(file), device=str(device))
        except SafetensorError as e:  # its message names no file
            raise ValueError(
                f"{file}: not a readable .safetensors file ({e}); damaged or partly downloaded?"
            ) from e
        dup = sorted(set(part) & set(sd))
        if dup:
            raise ValueError(f"{file}: keys also present in another shard: {dup[:5]}")
        sd.update(part)
    return sd
