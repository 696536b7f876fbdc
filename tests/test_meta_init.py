"""Meta-device initialisation (model.meta_init): build on meta, shard, then rank 0 alone reads the weights
(or a random init fills the shards). Two gloo processes vs plain single-process loads; single-process
checks of the engine's hooks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import models
from engine.config import JobConfig, build_config, overrides_to_dict
from engine.parallel import defer_weights, is_meta, materialize
from models.wan import WanModel

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "dist_scripts" / "meta_init.py"
TRAIN = "--train.steps 3 --train.batch_size 2 --train.grad_accum 1 --train.lr 3e-3 --checkpoint.interval 0".split()


def _save_diffusers_folder(folder: Path, seed: int = 3) -> WanModel:
    """A Wan "debug" transformer in diffusers layout (config.json + safetensors), as a user's folder."""
    torch.manual_seed(seed)
    model = models.build_model("wan", "debug")
    folder.mkdir(parents=True)
    sd = {k: v.contiguous() for k, v in model.to_diffusers_state_dict().items()}
    save_file(sd, folder / "diffusion_pytorch_model.safetensors")
    config = {"_class_name": "WanTransformer3DModel", **model.cfg.to_diffusers_config()}
    (folder / "config.json").write_text(json.dumps(config))
    return model


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert got.keys() == want.keys(), what
    for k, w in want.items():
        assert torch.equal(got[k], w), f"{what}: {k} differs"


@pytest.mark.dist
def test_meta_init_rank0_load_matches_plain_load(tmp_path):
    """On 2 gloo ranks: the Executor (Trainer) and the frozen Demonstrator (prepare_teacher) built on meta
    and loaded by rank 0 alone hold bit-exactly the plain single-process load's parameters after FSDP;
    training matches the path without meta_init; a random init fills valid, distinct shards."""
    folder = tmp_path / "transformer"
    _save_diffusers_folder(folder)
    plain = WanModel.from_pretrained(folder).state_dict()
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd = [*launcher, str(SCRIPT), "--folder", str(folder), "--out", str(out), *TRAIN]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]

    _assert_same(load_file(out / "meta_full.safetensors"), plain, "Executor under meta_init")
    _assert_same(load_file(out / "teacher_full.safetensors"), plain, "Demonstrator under meta_init")
    # while meta_init was on, only rank 0 opened the weights (Executor + Demonstrator: twice)
    assert not (out / "loaded_by_rank1").exists()
    assert (out / "loaded_by_rank0").read_text().splitlines() == [str(folder)] * 2

    losses = json.loads((out / "losses.json").read_text())
    assert losses["meta"] == pytest.approx(losses["plain"], rel=1e-5, abs=1e-6)
    final_meta, final_plain = (
        load_file(out / "final_meta.safetensors"),
        load_file(out / "final_plain.safetensors"),
    )
    for k, w in final_plain.items():
        assert (final_meta[k] - w).abs().max().item() < 1e-5, k

    _check_random_init(load_file(out / "random_full.safetensors"), load_file(out / "random_rope.safetensors"))


@pytest.mark.dist
def test_meta_init_with_fp8_ac_compile_hsdp_matches_plain_load(tmp_path):
    """meta_init combined with torchao FP8 (conversion on the meta device), selective / full activation
    checkpointing, per-block compile and HSDP (2 x 1 mesh), on 2 gloo ranks: the Executor and the
    Demonstrator hold bit-exactly the plain single-process load's parameters, and training matches the same
    configuration without meta_init (which loads the whole model on every rank)."""
    folder = tmp_path / "transformer"
    _save_diffusers_folder(folder)
    plain = WanModel.from_pretrained(folder).state_dict()
    out = tmp_path / "out"
    out.mkdir()
    # compile: AOTAutograd graphs run without Inductor's codegen (~40 s cold per graph on 2 CPU cores); the
    # trainer's torch.compile call is unchanged, torch's debug switch only swaps the backend
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "TORCH_COMPILE_OVERRIDE_BACKENDS": ">=0:aot_eager"}  # fmt: skip
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    variants = ["fp8_ac", "hsdp", "compile"]
    cmd = [*launcher, str(SCRIPT), "--folder", str(folder), "--out", str(out), "--variants", ",".join(variants),
           *TRAIN]  # fmt: skip
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]

    for name in variants:
        d = out / name
        for what in ("init", "teacher"):
            _assert_same(load_file(d / f"meta_{what}.safetensors"), plain, f"{name}: {what} under meta_init")
            _assert_same(load_file(d / f"plain_{what}.safetensors"), plain, f"{name}: {what} without it")
        losses = json.loads((d / "losses.json").read_text())
        assert losses["meta"] == pytest.approx(losses["plain"], rel=1e-6, abs=1e-7), name
        final_meta, final_plain = (
            load_file(d / "meta_final.safetensors"),
            load_file(d / "plain_final.safetensors"),
        )
        for k, w in final_plain.items():
            assert (final_meta[k] - w).abs().max().item() < 1e-6, f"{name}: {k}"
        assert not torch.equal(
            final_plain["blocks.0.self_attn.qkv.weight"], plain["blocks.0.self_attn.qkv.weight"]
        )
        shape = json.loads((d / "structure.json").read_text())
        assert shape["meta"]["float8"] == shape["plain"]["float8"] == 2 * 7, name  # every linear of 2 blocks
        assert shape["meta"]["ac"] == 2, name
        assert shape["meta"]["mesh"] == ([2, 1] if name == "hsdp" else [2]), name
    compiled = json.loads((out / "compile" / "structure.json").read_text())["meta"]
    assert compiled["compiled"] == 2 and compiled["dynamo_graphs"] > 0


def _wan_pipeline_folder(path: Path, **overrides) -> None:
    """A tiny Wan pipeline folder (transformer/, vae/, tokenizer/, text_encoder/) as the sampling recipes
    read one; the debug DiT with the tiny UMT5's 16-d text states."""
    from tests.test_encoders import tiny_tokenizer, tiny_umt5, tiny_vae

    torch.manual_seed(4)
    model = models.build_model("wan", "debug", text_dim=16, **overrides)
    (path / "transformer").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.to_diffusers_state_dict().items()},
              path / "transformer" / "diffusion_pytorch_model.safetensors")  # fmt: skip
    config = {"_class_name": "WanTransformer3DModel", **model.cfg.to_diffusers_config()}
    (path / "transformer" / "config.json").write_text(json.dumps(config))
    tiny_vae().save_pretrained(path / "vae")
    tiny_tokenizer().save_pretrained(path / "tokenizer")
    tiny_umt5().save_pretrained(path / "text_encoder")


def _sampling_outputs(run: Path) -> dict:
    """What demonstrate and evaluate wrote that depends on the model: the demonstrations' latents and index
    rows in order, each condition's per-item scores, and the contact sheets (decoded frames, lossless)."""
    from recipes.common import read_jsonl
    from recipes.demonstrate import read_demos

    latents, ids, _, _ = read_demos(run / "demos", None)
    out = {"demo_latents": latents, "demo_ids": ids, "demo_rows": read_jsonl(run / "demos" / "index.jsonl")}
    for npz in sorted((run / "eval").glob("*.npz")):
        out[npz.name] = dict(np.load(npz))
    for png in sorted((run / "eval" / "videos").rglob("*.png")):
        out[str(png.relative_to(run))] = png.read_bytes()
    return out


@pytest.mark.dist
@pytest.mark.filterwarnings("ignore:Mean of empty slice")  # the toy oracle cannot read these videos: NaN
def test_sampling_recipes_under_meta_init_match_plain_load(tmp_path):
    """demonstrate and evaluate (the Demonstrator baselines and an Executor export loaded on top of the
    pretrained folder) with model.meta_init on 2 gloo ranks: only rank 0 reads the transformer weights, and
    every latent, score and decoded contact sheet equals one plain process's without meta_init."""
    from PIL import Image

    from recipes import demonstrate, evaluate

    pipe = tmp_path / "pipe"
    _wan_pipeline_folder(pipe)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        rows.append({"id": f"s{i}", "image": f"{i}.png", "task": "move the red block",
                     "solution": ["the red one", "slide it left", "the agent pushes"][i]})  # fmt: skip
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps(r) + "\n" for r in rows))
    torch.manual_seed(9)
    executor = tmp_path / "executor.safetensors"
    save_file(models.build_model("wan", "debug", text_dim=16).state_dict(), executor)
    args = ["--model.family", "wan", "--model.flavour", "debug", "--model.pretrained", str(pipe),
            "--run.device", "cpu", "--run.out_dir", str(tmp_path), "--data.num_frames", "5", "--data.height", "16",
            "--data.width", "16", "--flow.num_steps", "3", "--flow.guidance", "2.0", "--distill.tasks", str(tasks),
            "--eval.tasks", str(tasks), "--eval.num_items", "3", "--eval.batch_size", "2",
            "--eval.write_videos", "2", "--eval.executors", json.dumps([f"exec={executor}"])]  # fmt: skip
    out = tmp_path / "marks"
    out.mkdir()
    env = {**os.environ, "WMSD_PROGRESS": "0", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd = [*launcher, str(ROOT / "tests" / "dist_scripts" / "meta_sampling.py"), "--out", str(out), *args,
           "--run.name", "meta", "--model.meta_init", "true"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:  # the reference meanwhile, here: one process, every weight read in place
        cfg = build_config(JobConfig, None, overrides_to_dict(JobConfig, [*args, "--run.name", "plain"]))
        assert not cfg.model.meta_init
        demonstrate.run(cfg)
        evaluate.run(cfg)
        log, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, log[-4000:]

    got, want = _sampling_outputs(tmp_path / "meta"), _sampling_outputs(tmp_path / "plain")
    assert got.keys() == want.keys()
    assert {"demonstrator+task.npz", "demonstrator+solution.npz", "exec.npz"} <= want.keys()
    assert len(want["demo_ids"]) == 3 and sum(k.endswith(".png") for k in want) == 3 * 2
    assert torch.equal(got.pop("demo_latents"), want.pop("demo_latents"))
    for k, w in want.items():
        if k.endswith(".npz"):
            assert w.keys() == got[k].keys(), k
            for q in w:
                np.testing.assert_array_equal(got[k][q], w[q], err_msg=f"{k}/{q}")
        else:
            assert got[k] == w, k
    transformer = str(pipe / "transformer")  # demonstrate: 1 load; evaluate: 3 conditions
    assert (out / "loaded_by_rank0").read_text().splitlines() == [transformer] * 4
    assert not (out / "loaded_by_rank1").exists()


def _check_random_init(got: dict[str, torch.Tensor], rope: dict[str, torch.Tensor]) -> None:
    """Against a normally built model: constant inits equal, random ones of the same scale, the two ranks'
    row shards distinct (not one seed drawn twice), RoPE tables equal."""
    torch.manual_seed(0)
    ref = models.build_model("wan", "debug")
    want = ref.state_dict()
    assert got.keys() == want.keys()
    for k, w in want.items():
        g = got[k]
        assert g.shape == w.shape and torch.isfinite(g).all(), k
        if w.numel() == 1 or w.std() == 0:  # norms (ones), zero-initialised tables
            assert torch.equal(g, w), k
        elif w.numel() >= 512:
            assert 0.8 < (g.std() / w.std()).item() < 1.25, k
            half = g.shape[0] // 2
            assert not torch.equal(g[:half], g[half : 2 * half]), k
    cos, sin = ref.rope_tables((2, 2, 2), torch.device("cpu"))
    assert torch.equal(rope["cos"], cos) and torch.equal(rope["sin"], sin)


def test_single_process_meta_load_and_random_init(tmp_path):
    """Without a process group, materialize loads the deferred weights (bit-exact) or random-inits with the
    valid values (module by module: not the constructor's draw order), leaving the caller's RNG untouched."""
    from engine.config import JobConfig
    from recipes.common import load_pretrained_denoiser

    folder = tmp_path / "transformer"
    _save_diffusers_folder(folder)
    cfg = JobConfig()
    cfg.model.family, cfg.model.flavour, cfg.model.pretrained = "wan", "debug", str(folder)
    model = load_pretrained_denoiser(cfg, "", meta=True)
    assert is_meta(model)
    _assert_same(materialize(model, torch.device("cpu")).state_dict(),
                 WanModel.from_pretrained(folder).state_dict(), "single-process meta load")  # fmt: skip

    torch.manual_seed(5)
    with torch.device("meta"):
        meta = models.build_model("wan", "debug")
    before = torch.get_rng_state()
    materialize(meta, torch.device("cpu"), seed=0)
    assert torch.equal(torch.get_rng_state(), before)
    rope = dict(zip(("cos", "sin"), meta.rope_tables((2, 2, 2), torch.device("cpu")), strict=True))
    _check_random_init(meta.state_dict(), rope)


class _WithTable(nn.Module):
    """A model with a non-persistent buffer (like a RoPE table) that it recomputes in init_buffers()."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.register_buffer("table", torch.arange(4.0).exp(), persistent=False)

    def init_buffers(self) -> None:
        self.table = torch.arange(4.0, device=self.proj.weight.device).exp()


def test_materialize_recomputes_buffers_and_names_what_it_cannot_init():
    normal = _WithTable()
    with torch.device("meta"):
        model = _WithTable()
    defer_weights(model, normal.state_dict)
    materialize(model, torch.device("cpu"))
    _assert_same(model.state_dict(), normal.state_dict(), "loaded")
    assert torch.equal(model.table, normal.table)

    with torch.device("meta"):
        no_hook = nn.Sequential(nn.Linear(2, 2))
        no_hook.register_buffer("table", torch.ones(2), persistent=False)
    with pytest.raises(TypeError, match="non-persistent buffers \\['table'\\]"):
        materialize(no_hook, torch.device("cpu"))

    class Raw(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))

    with torch.device("meta"):
        raw = Raw()
    with pytest.raises(TypeError, match="\\['scale'\\]"):
        materialize(raw, torch.device("cpu"))
    with pytest.raises(ValueError, match="not on the meta device"):
        defer_weights(nn.Linear(2, 2), dict)


def test_te_fp8_with_meta_init_is_refused_naming_the_keys(tmp_path):
    """Transformer Engine's FP8 state (_extra_state) is not in the weights rank 0 reads: a meta-built model
    with precision.fp8 = 'te' stops in the Trainer with an error naming both keys (before importing TE)."""
    from engine.trainer import Trainer

    cfg = JobConfig()
    cfg.run.device, cfg.model.meta_init = "cpu", True
    cfg.precision.fp8, cfg.precision.fp8_min_features = "te", 16
    with torch.device("meta"):
        model = models.build_model("wan", "debug")
    with pytest.raises(
        ValueError, match=r"precision.fp8 = 'te' with model.meta_init = true is not supported"
    ):
        Trainer(cfg, model, lambda m, b: (m, {}), None, run_dir=tmp_path)


def test_wan21_i2v_kit_conditions_on_the_pipelines_video_latent(tmp_path):
    """A Wan2.1 I2V folder (transformer in_channels = 2C + 4): the kit's image cond carries the pipeline's
    condition latent, the VAE encoding of [image, zero frames] over the whole clip; a T2V folder's has none."""
    from models.encoders import WanVAE
    from recipes.common import build_kit
    from tests.test_encoders import Z

    images = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    for name, in_channels in (("i2v", 2 * Z + 4), ("t2v", Z)):
        _wan_pipeline_folder(tmp_path / name, in_channels=in_channels)
        cfg = build_config(JobConfig, None, overrides_to_dict(JobConfig, [
            "--model.family", "wan", "--model.flavour", "debug", "--model.pretrained", str(tmp_path / name),
            "--run.device", "cpu", "--data.num_frames", "5", "--data.height", "16", "--data.width", "16"]))  # fmt: skip
        cond = build_kit(cfg).encode_image_cond(images)
        if name == "t2v":
            assert "image_condition" not in cond
            continue
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        want = WanVAE.from_pretrained(tmp_path / name / "vae").encode_i2v_condition(pixels, 5)
        assert cond["image_condition"].shape == (2, Z, 3, 8, 8)
        torch.testing.assert_close(cond["image_condition"], want)
        torch.testing.assert_close(cond["image_latent"], want[:, :, :1])  # the causal VAE's frame 0 alone


@pytest.mark.parametrize("crop", [False, True])
def test_first_frames_are_resized_as_the_pipelines_image_processors_do(crop):
    """recipes.common.fit_images against diffusers' VaeImageProcessor.resize (PIL Lanczos): Wan's stretch
    ("default") and HunyuanVideo-1.5's aspect-keeping cover-and-crop ("crop"), on wide, tall and square
    frames (the kit stretched every frame with a bilinear filter: 11% off at 1280x720 -> 848x480)."""
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image

    from recipes.common import fit_images

    proc = VaeImageProcessor(vae_scale_factor=8, resample="lanczos")
    rng = np.random.default_rng(0)
    for H, W in ((72, 128), (128, 72), (64, 64), (48, 84)):
        img = rng.integers(0, 256, (1, H, W, 3), dtype=np.uint8)
        ours = fit_images(img, 48, 84, crop=crop)[0]
        ref = np.asarray(
            proc.resize(Image.fromarray(img[0]), 48, 84, resize_mode="crop" if crop else "default")
        )
        assert ours.shape == ref.shape == (48, 84, 3) and np.array_equal(ours, ref), (H, W)


def test_plain_load_of_a_bf16_folder_is_fp32_like_the_meta_load(tmp_path):
    """A bf16 diffusers folder (as released checkpoints are) loads into fp32 parameters with and without
    model.meta_init, the same values: the trainer's master weights (the plain load kept bf16 ones)."""
    from recipes.common import load_pretrained_denoiser

    folder = tmp_path / "transformer"
    model = _save_diffusers_folder(folder)
    sd = {
        k: v.to(torch.bfloat16) for k, v in load_file(folder / "diffusion_pytorch_model.safetensors").items()
    }
    save_file(sd, folder / "diffusion_pytorch_model.safetensors")
    cfg = JobConfig()
    cfg.model.family, cfg.model.flavour, cfg.model.pretrained = "wan", "debug", str(folder)
    plain = load_pretrained_denoiser(cfg, "")
    meta = materialize(load_pretrained_denoiser(cfg, "", meta=True), torch.device("cpu"))
    assert {p.dtype for p in plain.parameters()} == {torch.float32}
    _assert_same(plain.state_dict(), meta.state_dict(), "bf16 folder, plain vs meta load")
    want = {k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()}
    _assert_same(plain.state_dict(), want, "bf16 folder, plain load")
