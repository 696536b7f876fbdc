"""models.adapter.to_ours: only known layout conversions reshape; any other shape difference is an error."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn
from diffusers import HunyuanVideo15Transformer3DModel, WanTransformer3DModel

from models.adapter import KeyMap, to_ours
from models.hunyuan15 import HunyuanVideo15Model
from models.wan import WanModel

# (diffusers class, our class, the checkpoint's patch config, another config with the same patch volume,
# the patch embedding's diffusers key)
FAMILIES = [
    (WanTransformer3DModel, WanModel, dict(patch_size=(1, 2, 2)), dict(patch_size=(2, 1, 2)),
     "patch_embedding.weight"),
    (HunyuanVideo15Transformer3DModel, HunyuanVideo15Model, dict(patch_size=1, patch_size_t=4),
     dict(patch_size=2, patch_size_t=1), "x_embedder.proj.weight"),
]  # fmt: skip


def _load(our_cls, theirs: nn.Module, **overrides) -> nn.Module:
    cfg = our_cls.config_cls.from_diffusers_config(dict(theirs.config), **overrides)
    ours = our_cls(cfg).eval()
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    sd = to_ours(theirs.state_dict(), shapes, ours.keymap(), their_shapes=ours.their_shapes(), what="m")
    ours.load_state_dict(sd)
    return ours


@pytest.mark.parametrize("their_cls, our_cls, patch, other, key", FAMILIES)
def test_a_checkpoint_of_another_patch_shape_is_refused(their_cls, our_cls, patch, other, key):
    """A (1, 2, 2)-patch checkpoint into a (2, 1, 2)-patch model has the same element counts everywhere:
    it was reshaped silently into a different model. The error names the key and both shapes; the
    matching config still loads, bit-exactly."""
    torch.manual_seed(0)
    cfg = our_cls.config_cls.flavour("debug", **patch)
    theirs = their_cls(**cfg.to_diffusers_config()).eval()
    cfg_other = our_cls.config_cls.from_diffusers_config(dict(theirs.config), **other)
    with torch.device("meta"):
        model = our_cls(cfg_other)
    ours_key = next(k for k in model.state_dict() if model.keymap().theirs(k) == (key,))
    shapes = (tuple(theirs.state_dict()[key].shape), tuple(model.state_dict()[ours_key].shape))
    with pytest.raises(
        ValueError, match=re.escape(ours_key) + ".*".join(["", *map(re.escape, map(str, shapes))])
    ):
        _load(our_cls, theirs, **other)
    ours = _load(our_cls, theirs)
    back, sd = ours.to_diffusers_state_dict(), theirs.state_dict()
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_without_their_shapes_only_trailing_dims_are_flattened():
    """No their_shapes: a Conv3d patch embedding flattens into the Linear it equals on patches, but a
    Linear(6, 4) checkpoint into a Linear(4, 6) (same element count) is an error, not a reshape."""
    torch.manual_seed(0)
    conv, lin = nn.Conv3d(3, 5, kernel_size=(1, 2, 2), stride=(1, 2, 2)), nn.Linear(12, 5)
    lin.load_state_dict(
        to_ours(conv.state_dict(), {k: v.shape for k, v in lin.state_dict().items()}, KeyMap(()))
    )
    x = torch.randn(1, 3, 1, 2, 2)
    torch.testing.assert_close(lin(x.reshape(1, 12)), conv(x).reshape(1, 5))
    with pytest.raises(ValueError, match=r"weight.*\(4, 6\).*\(6, 4\)"):
        to_ours(nn.Linear(6, 4, bias=False).state_dict(), {"weight": torch.Size((6, 4))}, KeyMap(()))


@pytest.mark.parametrize("their_cls, our_cls, patch, other, key", FAMILIES)
def test_from_pretrained_refuses_a_checkpoint_of_another_patch_shape(tmp_path, their_cls, our_cls, patch, other,
                                                                     key):  # fmt: skip
    """from_pretrained (load_diffusers_state_dict) called to_ours without the model's layout conversions, so a
    (1, 2, 2)-patch folder loaded silently into a (2, 1, 2)-patch model; it is now the error naming the key."""
    torch.manual_seed(0)
    theirs = their_cls(**our_cls.config_cls.flavour("debug", **patch).to_diffusers_config())
    theirs.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=re.escape(key)):
        our_cls.from_pretrained(tmp_path, **other)
    ours = our_cls.from_pretrained(tmp_path)
    back, sd = ours.to_diffusers_state_dict(), theirs.state_dict()
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
