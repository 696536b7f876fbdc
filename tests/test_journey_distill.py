"""recipes/distill.py as a user meets it: train.grad_accum with the batch size engine.config documents."""

import pytest
import torch

from engine.config import load_config


def _cfg(tmp_path, accum: int):
    return load_config(argv=["--run.out_dir", str(tmp_path), "--run.name", "d", "--world.num_scenes", "4",
                             "--distill.pairs_per_image", "1", "--train.batch_size", "3", "--train.grad_accum",
                             str(accum), "--flow.num_steps", "2", "--distill.steps_per_rollout", "2",
                             "--run.device", "cpu"])  # fmt: skip


def test_grad_accum_keeps_batch_size_per_micro_step(tmp_path):
    """train.batch_size is 'per rank, per micro-step' (engine.config; pretrain's ToyVideoBatches gives
    grad_accum micro-batches of batch_size): distill split batch_size into grad_accum parts instead, so
    grad_accum 2 halved the step's batch (and batch_size 3 failed to split). Micro-batch 0 stays the draw of
    grad_accum 1."""
    from recipes import propose
    from recipes.common import build_kit, load_items, prepare_teacher, tasks_path
    from recipes.distill import DemoBatches, OnPolicyBatches
    from recipes.pretrain import ToyVideoBatches

    one, two = _cfg(tmp_path, 1), _cfg(tmp_path, 2)
    propose.run(one)
    kit = build_kit(one)
    table = kit.encode_items(load_items(tasks_path(one)))
    model = kit.load_denoiser("")
    teacher = prepare_teacher(kit.load_denoiser(""), one)
    ref = ToyVideoBatches(3, 2, 0, torch.device("cpu")).next(0, model)
    assert [len(mb["x0"]) for mb in ref] == [3, 3]
    on1, on2 = (OnPolicyBatches(c, kit, table, teacher).next(5, model) for c in (one, two))
    assert [len(mb["x_t"]) for mb in on2] == [3 * 2, 3 * 2]  # batch_size rollouts x steps_per_rollout each
    assert torch.equal(on2[0]["x_t"], on1[0]["x_t"]) and not torch.equal(on2[1]["x_t"], on2[0]["x_t"])
    latents = torch.randn(5, *kit.latent_shape)
    item_idx = torch.arange(5) % len(table)
    sft1, sft2 = (DemoBatches(c, table, latents, item_idx).next(5, model) for c in (one, two))
    assert [len(mb["x0"]) for mb in sft2] == [3, 3]
    assert torch.equal(sft2[0]["noise"], sft1[0]["noise"]) and not torch.equal(
        sft2[1]["noise"], sft2[0]["noise"]
    )


def test_bad_distill_inputs_are_one_line_errors_before_loading(tmp_path):
    """distill.steps_per_rollout above flow.num_steps, and an off-policy run without demonstrations (said to be
    a missing "task file ... run recipes/propose.py first?"), failed with tracebacks after loading the models."""
    import subprocess
    import sys
    from pathlib import Path

    from recipes import propose

    propose.run(_cfg(tmp_path, 1))
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "distill.py"
    base = [
        sys.executable,
        str(recipe),
        "--run.out_dir",
        str(tmp_path),
        "--run.name",
        "d",
        "--run.device",
        "cpu",
    ]
    for extra, message in (
        (
            ["--flow.num_steps", "2", "--distill.steps_per_rollout", "3"],
            "error: distill.steps_per_rollout = 3",
        ),
        (["--distill.mode", "off_policy_filtered"], "run recipes/demonstrate.py first"),
    ):
        r = subprocess.run(base + extra, capture_output=True, text=True, timeout=300)
        assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_weights_of_another_model_config_are_one_line_errors_before_loading(tmp_path):
    """distill.init and an eval.executors entry were only checked to exist: a checkpoint of another model
    config (a tensor of another shape) failed with a traceback once the prompts were encoded and the models
    loaded. Both are now checked against the model's shapes up front, in one line naming the key."""
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import save_file

    from recipes import propose
    from recipes.common import build_kit

    cfg = _cfg(tmp_path, 1)
    propose.run(cfg)
    sd = build_kit(cfg).load_denoiser("").state_dict()
    key = next(k for k, v in sd.items() if v.ndim == 2)
    sd[key] = sd[key][:, :-1].contiguous()  # one column short: another config's width
    wrong = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(wrong))
    repo = Path(__file__).resolve().parents[1] / "recipes"
    base = ["--run.out_dir", str(tmp_path), "--run.name", "d", "--run.device", "cpu", "--flow.num_steps", "2"]
    for recipe, extra, message in (
        ("distill.py", ["--distill.steps_per_rollout", "2", "--distill.init", str(wrong)], "error: distill.init"),
        ("evaluate.py", ["--eval.num_items", "2", "--eval.executors", f'["other={wrong}"]'],
         "error: eval.executors entry 'other'"),
    ):  # fmt: skip
        r = subprocess.run([sys.executable, str(repo / recipe), *base, *extra], capture_output=True, text=True,
                           timeout=300)  # fmt: skip
        assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert key in r.stderr and "another shape" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "d" / "eval" / "demonstrator+task.npz").exists()  # nothing sampled


def test_the_teacher_runs_the_attention_precision_the_executor_trains_with(tmp_path):
    """prepare_teacher applied the FP8 linear backend but not model.attention_precision: with "fp8" the frozen
    Demonstrator's forwards (the targets of every step) ran bf16 attention beside an FP8 Executor. It now
    gets FP8 attention in the same blocks (model.fp8_attention_skip_blocks stay bf16)."""
    from recipes.common import build_kit, prepare_teacher

    cfg = _cfg(tmp_path, 1)
    cfg.model.attention, cfg.model.attention_precision = "triton", "fp8"
    cfg.model.fp8_attention_skip_blocks = [-1]
    teacher = prepare_teacher(build_kit(cfg).load_denoiser(""), cfg)
    per_block = [
        {m.attention_precision for m in block.modules() if hasattr(m, "attention_precision")}
        for block in teacher.blocks
    ]
    assert per_block == [{"fp8"}] * (len(per_block) - 1) + [{"bf16"}], per_block
    cfg.model.attention_precision = "bf16"
    teacher = prepare_teacher(build_kit(cfg).load_denoiser(""), cfg)
    assert all(p == {"bf16"} for p in (
        {m.attention_precision for m in b.modules() if hasattr(m, "attention_precision")} for b in teacher.blocks
    ))  # fmt: skip


def test_weights_in_the_diffusers_layout_of_another_patch_shape_are_refused(tmp_path):
    """check_weights_fit let a diffusers-layout file through when a tensor of another shape had the same size
    (a patch embedding of another patch shape), since loading used to reshape it silently; shapes are now
    compared exactly in either layout, and the model's own export still fits."""
    from safetensors.torch import save_file

    from recipes.common import ConfigError, build_kit, check_weights_fit

    cfg = _cfg(tmp_path, 1)
    theirs = build_kit(cfg).load_denoiser("").to_diffusers_state_dict()
    good = tmp_path / "good.safetensors"
    save_file({k: v.contiguous() for k, v in theirs.items()}, str(good))
    check_weights_fit(cfg, str(good), "distill.init")
    w = theirs["patch_embedding.weight"]  # (out, in, 1, 2, 2) -> the same numbers as a (2, 1, 2) patch
    theirs["patch_embedding.weight"] = w.reshape(*w.shape[:2], 2, 1, 2).contiguous()
    wrong = tmp_path / "other_patch.safetensors"
    save_file({k: v.contiguous() for k, v in theirs.items()}, str(wrong))
    with pytest.raises(ConfigError, match=r"distill.init.*patch_embedding.weight.*another model config"):
        check_weights_fit(cfg, str(wrong), "distill.init")


def test_filtered_sft_with_no_demonstration_over_the_threshold_is_a_one_line_error(tmp_path):
    """distill.mode off_policy_filtered with no demonstration whose Task score reaches distill.filter_threshold
    failed with a ValueError traceback after the models were loaded; validate now reads the demonstrations
    index and refuses it in one line. At the best score itself, one is kept and validate passes."""
    import subprocess
    import sys
    from pathlib import Path

    from recipes import demonstrate, distill, propose
    from recipes.common import read_jsonl

    cfg = _cfg(tmp_path, 1)
    propose.run(cfg)
    out = demonstrate.run(cfg)
    best = max((r["scores"]["task"] or 0.0) for r in read_jsonl(out / "index.jsonl"))
    base = ["--run.out_dir", str(tmp_path), "--run.name", "d", "--run.device", "cpu", "--flow.num_steps", "2",
            "--distill.mode", "off_policy_filtered"]  # fmt: skip
    distill.validate(load_config(argv=[*base, "--distill.filter_threshold", str(best)]))
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "distill.py"
    r = subprocess.run([sys.executable, str(recipe), *base, "--distill.filter_threshold", str(best + 0.01)],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode != 0 and "error: distill.filter_threshold" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-2000:]


def test_off_policy_sft_weights_its_loss_by_distill_t_weighting(tmp_path):
    """distill.t_weighting weighted only the on-policy loss: an off-policy (SFT) run with 'late' trained
    unweighted without a word, so the ablation compared two different objectives. The SFT loss is now
    mean_b w(t_b) mean_i (v - (eps - x0))^2 with w = 2 (1 - t) for 'late', computed here from the model's
    velocities at x_t = (1 - t) x0 + t eps; 'uniform' is the plain mean."""
    from recipes import propose
    from recipes.common import build_kit, load_items, tasks_path
    from recipes.distill import DemoBatches, sft_loss

    cfg = _cfg(tmp_path, 1)
    propose.run(cfg)
    kit = build_kit(cfg)
    table = kit.encode_items(load_items(tasks_path(cfg)))
    model = kit.load_denoiser("")
    latents = torch.randn(4, *kit.latent_shape, generator=torch.Generator().manual_seed(0))
    item_idx = torch.arange(4) % len(table)
    for scheme in ("late", "uniform"):
        c = load_config(argv=["--run.out_dir", str(tmp_path), "--run.name", "d", "--train.batch_size", "3",
                              "--distill.t_weighting", scheme, "--run.device", "cpu"])  # fmt: skip
        (mb,) = DemoBatches(c, table, latents, item_idx).next(3, model)
        x0, eps, t = mb["x0"], mb["noise"], mb["t"]
        tb = t.view(-1, 1, 1, 1, 1)
        with torch.no_grad():
            v = model.predict_velocity((1 - tb) * x0 + tb * eps, t, mb["cond"])
            per_sample = (v.double() - (eps - x0).double()).pow(2).flatten(1).mean(1)
            w = 2 * (1 - t.double()) if scheme == "late" else torch.ones_like(per_sample)
            want = (w * per_sample).mean()
            got, _ = sft_loss(model, mb)
        assert torch.allclose(got.double(), want, rtol=1e-5), (scheme, float(got), float(want))
