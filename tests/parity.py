"""Parity checks of our DiT families against their diffusers counterparts (tests/test_wan.py,
tests/test_hunyuan15.py): the same random weights, then outputs, gradients and state dicts compared."""

from __future__ import annotations

import torch
import torch.nn as nn

from models.adapter import to_theirs


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make_pair(their_cls: type, our_cls: type, **overrides) -> tuple[nn.Module, nn.Module]:
    """A diffusers model of our ``debug`` flavour (with overrides) with every weight drawn from N(0, 0.2),
    and our model built from it."""
    cfg = our_cls.config_cls.flavour("debug", **overrides)
    theirs = their_cls(**cfg.to_diffusers_config()).eval()
    with torch.no_grad():  # diffusers zero-inits some tensors; randomise all so every weight matters
        for p in theirs.parameters():
            p.normal_(0, 0.2)
    return theirs, our_cls.from_diffusers(theirs, attention_backend=cfg.attention_backend)


def _param_grads(model: nn.Module, allow_unused: bool) -> dict[str, torch.Tensor]:
    """name -> gradient; a parameter without one is an error unless allow_unused (then zeros)."""
    grads = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            assert allow_unused, f"{name}: no gradient"
            grads[name] = torch.zeros_like(p)
        else:
            grads[name] = p.grad
    return grads


def check_parity(theirs, ours, args: tuple, kwargs: dict, *, allow_unused: bool = False) -> None:
    """Outputs and all gradients (float inputs and parameters) agree to 1e-5 relative error. An input
    diffusers gives no (or an all-zero) gradient must get none (or zeros) from ours too. allow_unused:
    parameters without a gradient (unused by these inputs) count as zero gradients."""
    args_t = [a.clone().requires_grad_(a.is_floating_point()) for a in args]
    args_o = [a.clone().requires_grad_(a.is_floating_point()) for a in args]
    kw_t = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in kwargs.items()}
    kw_o = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in kwargs.items()}
    out_t = theirs(*args_t, **kw_t, return_dict=False)[0]
    out_o = ours(*args_o, **kw_o)
    assert out_o.shape == out_t.shape
    assert rel_err(out_o, out_t) <= 1e-5
    w = torch.randn_like(out_t)
    (out_t * w).sum().backward()
    (out_o * w).sum().backward()
    pairs = list(zip(args_o, args_t)) + [(kw_o[k], kw_t[k]) for k in kw_o if kw_o[k].is_floating_point()]
    for i, (a, b) in enumerate(pairs):
        if b.grad is None or b.grad.abs().max() == 0:
            assert a.grad is None or a.grad.abs().max() == 0, f"input {i}"
        else:
            assert rel_err(a.grad, b.grad) <= 1e-5, f"input {i}"
    ours_in_theirs = to_theirs(_param_grads(ours, allow_unused), ours.keymap(), ours.their_shapes())
    theirs_grads = _param_grads(theirs, allow_unused)
    total = torch.cat([g.flatten() for g in theirs_grads.values()]).norm()
    for name, g in theirs_grads.items():  # floor: a 1e-7 share of the total norm (near-cancelling biases)
        err = (ours_in_theirs[name] - g).norm()
        assert err <= 1e-5 * g.norm() + 1e-7 * total, (name, err, g.norm())


def check_state_dict_round_trip(theirs, ours) -> None:
    """Export is bit-exact (keys, shapes, dtypes, values) and loading the export reproduces ours."""
    sd = theirs.state_dict()
    back = ours.to_diffusers_state_dict()
    assert sorted(back) == sorted(sd)
    for k, v in sd.items():
        assert back[k].shape == v.shape and back[k].dtype == v.dtype, k
        assert torch.equal(back[k], v), k
    fresh = type(ours)(ours.cfg)
    fresh.load_diffusers_state_dict(back)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), ours.state_dict().values()))
