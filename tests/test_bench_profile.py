"""bench.profile's random batches for every model family: shapes the model takes, FLOPs it runs."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.profile import RandomLatents
from engine.config import JobConfig, build_config, overrides_to_dict
from models import FAMILIES, build_model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_random_latents_fit_the_model_and_count_its_flops(family):
    """RandomLatents builds batches predict_velocity accepts and counts the FLOPs torch counts on them
    (it read Wan-only config fields: HunyuanVideo-1.5 raised AttributeError on text_dim)."""
    cfg = build_config(JobConfig, None, overrides_to_dict(JobConfig, [
        "--model.family", family, "--model.flavour", "debug", "--train.batch_size", "1",
        "--profile.latent_shape", "[2, 4, 4]", "--profile.text_len", "8"]))  # fmt: skip
    model = build_model(family, "debug", attention_backend="torch")
    batches = RandomLatents(model, cfg, torch.device("cpu"))
    (mb,) = batches.next(0, model)
    cond = {k: v for k, v in mb.items() if k != "x0"}
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        v = model.predict_velocity(mb["x0"], torch.tensor([0.5]), cond)
    assert v.shape == mb["x0"].shape
    assert abs(batches.fwd_flops / counter.get_total_flops() - 1) < 1e-6


def test_too_few_steps_is_a_usage_error_not_a_traceback(capsys):
    """``--steps 1`` (nothing left to profile after the warm-up step) raised ValueError from profile_training."""
    from bench.profile import main

    with pytest.raises(SystemExit) as e:
        main(["--steps", "1"])
    assert e.value.code == 2 and "--steps 1: expected >= 2" in capsys.readouterr().err
