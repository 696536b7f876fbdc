"""Typed job configuration: nested dataclasses, TOML files, dotted CLI overrides.

Precedence is CLI > TOML file > dataclass defaults (as in torchtitan). A job config is a dataclass
whose fields are section dataclasses; every section field has a default and a docstring-style
comment. Unknown keys and wrong types fail with a one-line :class:`ConfigError` that names the key
and lists the valid ones. The resolved config is written as ``config.toml`` into every run folder.

    cfg = load_config(JobConfig, ["--config", "recipes/configs/wmsd_toy.toml", "--train.lr", "1e-4"])
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


class ConfigError(ValueError):
    """A bad configuration: unknown key, wrong type, missing file. The message names the key."""


# ---------------------------------------------------------------------------------------------
# Sections. Each recipe uses the sections it needs; one JobConfig serves every recipe so that one
# TOML file describes a whole WMSD run.
# ---------------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    name: str = "wmsd"  # run name; the run folder is <out_dir>/<name>
    out_dir: str = "runs"  # parent folder of run folders
    seed: int = 0  # base seed; each rank adds its rank
    device: str = "auto"  # "auto" (cuda if available, else cpu) | "cpu" | "cuda"


@dataclass
class ModelConfig:
    family: str = "wan"  # "wan" | "hunyuan15"
    flavour: str = "toy"  # named size preset: wan "toy", "1.3B", "14B", ...; hunyuan15 "i2v-480p", ...
    pretrained: str = ""  # local diffusers-format folder or .safetensors file; "" = random init
    attention: Literal["triton", "sdpa", "flash_attn", "te"] = "sdpa"  # attention backend
    attention_precision: Literal["bf16", "fp8"] = "bf16"  # fp8: FP8 self-attention (fp8_attention_backend's)
    # the FP8 self-attention's kernel: "triton" (ours, needs attention "triton") or "te" (cuDNN's FP8 attention
    # through Transformer Engine; the rest of the model's attention stays on model.attention)
    fp8_attention_backend: Literal["triton", "te"] = "triton"
    fp8_attention_skip_blocks: list[int] = field(default_factory=list)  # blocks kept in bf16
    meta_init: bool = False  # build on the meta device (shape/param-count checks, no memory)


@dataclass
class TrainConfig:
    steps: int = 100  # optimizer steps
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    batch_size: int = 8  # per rank, per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    max_grad_norm: float = 1.0  # <= 0 disables clipping
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    ema_decay: float = 0.0  # 0 disables EMA
    max_bad_steps: int = 5  # consecutive non-finite losses/grads before the run stops
    log_every: int = 10


@dataclass
class ParallelConfig:
    dp_replicate: int = 1  # HSDP replicate degree (1 = plain FSDP)
    dp_shard: int = -1  # FSDP shard degree; -1 = world_size / (dp_replicate * cp)
    cp: int = 1  # sequence-parallel degree (Ulysses: tokens and heads split over cp ranks; wan, hunyuan15)
    fsdp: bool = True  # wrap blocks with FSDP2 when world_size > 1
    reshard_after_forward: bool = True
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    compile: bool = False  # per-block torch.compile
    timeout_s: int = 600  # collective timeout; a hang becomes a clear error after this


@dataclass
class PrecisionConfig:
    param_dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype under FSDP / autocast
    reduce_dtype: Literal["float32", "bfloat16"] = "float32"
    fp8: Literal["none", "te", "torchao"] = "none"  # FP8 linear backend (torchao: with parallel.compile)
    fp8_recipe: Literal["delayed", "current", "mxfp8"] = "current"  # TE scaling recipe
    fp8_min_features: int = 256  # linears smaller than this (in or out) stay in high precision
    fp8_skip: list[str] = field(default_factory=list)  # linears whose name contains one of these stay bf16


@dataclass
class CheckpointConfig:
    enabled: bool = True
    interval: int = 50  # save every N steps (and at the end)
    keep_last: int = 2
    async_save: bool = False
    # resume from the newest complete checkpoint in the run folder (false: move them aside)
    resume: bool = True
    export_safetensors: bool = True  # write a consolidated diffusers-layout file at the end


@dataclass
class ProfileConfig:
    enabled: bool = False
    wait: int = 2
    warmup: int = 2
    active: int = 3
    trace_dir: str = ""  # "" = <run>/trace
    latent_shape: list[int] = field(default_factory=lambda: [4, 8, 8])  # bench.profile: latent (F, h, w)
    text_len: int = 16  # bench.profile: text tokens per sample
    top_k: int = 15  # bench.profile: ops listed in the summary


@dataclass
class FlowConfig:
    shift: float = 1.0  # timestep shift: sampling, and training t in pretrain / SFT (Wan 3-5, HY1.5 5)
    num_steps: int = 8  # sampling steps
    guidance: float = 1.0  # classifier-free guidance scale (1 = off)
    sde_sigma: float = 0.7  # SDE noise level for RL rollouts (Flow-GRPO style eta)
    t_sampling: Literal["uniform", "logit_normal"] = "logit_normal"


@dataclass
class DataConfig:
    manifest: str = ""  # JSONL manifest of (video|image, caption/task/solution)
    root: str = ""  # folder the manifest paths are relative to ("" = manifest's folder)
    decoder: Literal["auto", "dali", "dali_cpu", "pyav"] = "auto"
    num_frames: int = 4
    fps: float = 0.0  # 0 = native
    height: int = 32
    width: int = 32
    cache_dir: str = ""  # latent / text cache recipes/precompute.py writes (no WMSD recipe reads it)
    num_workers: int = 0  # precompute: processes decoding the clips while it encodes (0 = in this process)
    aspect_buckets: bool = False  # True: equal-area aspect-ratio buckets; False: one (height, width)
    bucket_multiple: int = 16  # bucket sides are multiples of this (VAE stride x patch size)
    clip_start: Literal["first", "random"] = "first"  # where a clip starts in a longer video
    max_upscale: float = 4.0  # skip videos that must be enlarged more than this to fill the bucket
    quarantine: str = ""  # JSONL of skipped files/rows ("" = <run dir or cache dir>/quarantine.jsonl)
    shard_size: int = 64  # items per latent-cache shard
    encode_batch: int = 4  # items per VAE / text-encoder call while caching
    text_fields: list[str] = field(default_factory=lambda: ["task", "solution", "caption"])  # to embed


@dataclass
class JudgeConfig:
    backend: Literal["oracle", "transformers", "openai"] = "oracle"
    model: str = ""  # transformers path or served model name
    base_url: str = ""  # OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1
    api_key_env: str = "OPENAI_API_KEY"
    max_batch: int = 16
    max_wait_ms: float = 50.0
    max_concurrency: int = 4
    timeout_s: float = 60.0
    max_retries: int = 2
    num_frames: int = 4  # frames sampled from a video for the judge
    frame_layout: Literal["separate", "grid"] = "separate"
    fallback_score: float = 0.0  # RL reward of a failed verdict with rl.failed_rollouts = "fallback"


@dataclass
class WorldConfig:
    num_scenes: int = 64  # scenes to propose tasks for
    eval_scenes: int = 256  # held-out paired scenes for pretrain's gap check (evaluation: eval.num_items)
    seed: int = 1234
    text_layers: int = 1  # toy text encoder: transformer layers over learned embeddings (0 = embeddings only)
    caption_dropout: float = 0.1  # pretraining: fraction of captions replaced by "" (for CFG)
    time_budget_s: float = 0.0  # pretraining: stop after this many wall-clock seconds (0 = no limit)
    demonstrator: str = ""  # folder with demonstrator.safetensors etc.; "" = engine/world/assets
    gap_batch: int = 64  # videos per sampling batch in the gap check / evaluation
    gap_guidance: list[float] = field(
        default_factory=lambda: [1.0]
    )  # CFG scales the pretrain gap is measured at


@dataclass
class DistillConfig:
    mode: Literal["on_policy", "off_policy", "off_policy_filtered"] = "on_policy"
    steps_per_rollout: int = 2  # rollout states trained on per iteration
    t_weighting: Literal["uniform", "snr", "late"] = "uniform"
    # recipes/pipeline.py stops before distilling when the Demonstrator's gap (solution - task, paired Avg, its
    # gap check) is below this; distill.py alone does not measure it; pretrain.py records "passed" against it
    min_gap: float = 0.25
    demos_per_task: int = 1  # off-policy: Demonstrator samples per task
    pairs_per_image: int = 8  # propose: task/solution pairs per image (the paper's 8)
    tasks: str = ""  # tasks.jsonl from recipes/propose.py ("" = <run>/tasks.jsonl); distill and rl read it
    demos: str = ""  # off-policy: folder from recipes/demonstrate.py ("" = <run>/demos)
    init: str = ""  # Executor's initial weights ("" = the Demonstrator, model.pretrained)
    filter_threshold: float = 0.5  # off_policy_filtered: keep demonstrations whose judged Task score >= this


@dataclass
class RLConfig:
    group_size: int = 8
    clip_range: float = 1e-3
    beta_d: float = 0.01  # anchor toward the Demonstrator (paper's best)
    train_timesteps: int = 2  # rollout steps trained on per group
    adv_eps: float = 1e-4
    steps: int = 0  # RL optimizer steps (0 = train.steps)
    init: str = (
        ""  # Executor's initial weights ("" = the Demonstrator; the pipeline passes the distilled one)
    )
    prompts_per_step: int = 1  # (image, task) prompts per step; each gets group_size rollouts
    reward_questions: list[str] = field(default_factory=lambda: ["task", "consistency"])  # reward = mean
    prefetch: bool = (
        True  # roll out + submit the next step's group before this step's update (judge overlaps)
    )
    # the policy ratio's log-prob per sample: "mean" over latent elements (Flow-GRPO) or "sum" (the
    # exact joint density: over ~1e4 elements even a tiny update moves the ratio far outside the clip)
    logprob_reduction: Literal["mean", "sum"] = "mean"
    # a rollout whose verdicts failed (timeout, unparsable answer): "skip" leaves it out of its group's
    # mean and std with advantage 0; "fallback" scores it judge.fallback_score like the others
    failed_rollouts: Literal["skip", "fallback"] = "skip"


@dataclass
class EvalConfig:
    num_items: int = 256
    seeds: list[int] = field(default_factory=lambda: [0])
    write_videos: int = 8  # mp4 + contact sheet for the first N items
    ci: float = 0.95
    tasks: str = ""  # held-out (image, task, solution) JSONL ("" = the toy world's held-out scenes)
    executors: list[str] = field(default_factory=list)  # "name=weights" Executors to evaluate
    baselines: bool = True  # also evaluate Demonstrator + task and Demonstrator + solution
    batch_size: int = 32  # videos sampled per forward batch


@dataclass
class JobConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    data: DataConfig = field(default_factory=DataConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    world: WorldConfig = field(default_factory=WorldConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ---------------------------------------------------------------------------------------------
# Loading, overriding, validating, dumping
# ---------------------------------------------------------------------------------------------


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:  # written in TOML syntax on the command line: --eval.seeds '[0, 1]'
        (item,) = typing.get_args(tp) or (Any,)
        return f"list[{_type_name(item)}], TOML syntax"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert ints to floats where a float is wanted."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"config key '{key}': {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"config key '{key}': {value!r} does not match {_type_name(tp)}")
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"config key '{key}': expected float, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}': expected int, got {type(value).__name__} {value!r}")
        return value
    if tp is bool or tp is str:
        if not isinstance(value, tp):
            raise ConfigError(
                f"config key '{key}': expected {tp.__name__}, got {type(value).__name__} {value!r}"
            )
        return value
    raise ConfigError(f"config key '{key}': unsupported annotation {tp!r}")


def _apply(obj: Any, data: dict, prefix: str) -> None:
    hints = typing.get_type_hints(type(obj))
    valid = _fields(type(obj))
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in valid:
            raise ConfigError(f"unknown config key '{dotted}'; valid keys here: {', '.join(sorted(valid))}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{dotted}' is a section; expected a table, got {value!r}")
            _apply(getattr(obj, key), value, dotted + ".")
        else:
            setattr(obj, key, _coerce(value, tp, dotted))


def _parse_cli_value(text: str, tp: Any) -> Any:
    """Parse one CLI value by the annotation: TOML syntax for lists/bools/numbers, raw text for str."""
    if tp is str or (
        typing.get_origin(tp) is Literal and all(isinstance(a, str) for a in typing.get_args(tp))
    ):
        return text
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError as e:
        if typing.get_origin(tp) is list and text.lstrip().startswith("["):  # meant as a list: say why not
            raise ConfigError(
                f"{text!r} is not a valid TOML list ({e}); e.g. '[1, 2]' or '[\"a\", \"b\"]'"
            ) from None
        # a float TOML does not spell but Python does ('.5', '5.', '1.e-4')
        if tp is float:
            try:
                return float(text)
            except ValueError:
                pass
        return text  # let _coerce report the type mismatch


def _lookup_type(cls: type, dotted: str) -> Any:
    tp: Any = cls
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"unknown config key '{dotted}': '{'.'.join(parts[:i])}' is not a section")
        hints = typing.get_type_hints(tp)
        if part not in hints:
            where = ".".join(parts[:i]) or "top level"
            raise ConfigError(
                f"unknown config key '{dotted}'; valid keys in {where}: {', '.join(sorted(hints))}"
            )
        tp = hints[part]
    return tp


def overrides_to_dict(cls: type, overrides: list[str]) -> dict:
    """``["--train.lr", "1e-4", "--model.attention=sdpa"]`` -> ``{"train": {"lr": 1e-4}, ...}``."""
    out: dict = {}
    i = 0
    while i < len(overrides):
        arg = overrides[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.key value")
        if "=" in arg:
            key, text = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(overrides):
                raise ConfigError(f"config key '{arg[2:]}' has no value")
            key, text = arg[2:], overrides[i + 1]
            i += 2
        tp = _lookup_type(cls, key)
        if dataclasses.is_dataclass(tp):
            raise ConfigError(f"config key '{key}' is a section; set one of its keys instead")
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        try:
            node[leaf] = _parse_cli_value(text, tp)
        except ConfigError as e:
            raise ConfigError(f"config key '{key}': {e}") from None
    return out


def load_toml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{p}' does not exist")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file '{p}' is not valid TOML: {e}") from None


def build_config(cls: type, file_data: dict | None = None, cli: dict | None = None):
    """Defaults, then the file's values, then the CLI's; validated on the way."""
    cfg = cls()
    for data in (file_data or {}, cli or {}):
        _apply(cfg, data, "")
    return cfg


def load_config(cls: type = JobConfig, argv: list[str] | None = None, description: str = ""):
    """Parse ``--config FILE`` plus dotted overrides from ``argv`` (default ``sys.argv[1:]``).

    ``--help`` lists every key with its default. Errors exit with a one-line message naming the key.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default="")
    known, _ = pre.parse_known_args(argv)
    file_data = load_toml(known.config) if known.config else {}
    in_effect = "after " + known.config if known.config else "built in"
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        # the switch for progress bars is an environment variable: say so where users look
        epilog=f"overrides (--section.key value; defaults {in_effect}):\n"
        + describe(cls, inst=build_config(cls, file_data))
        + "\n\nprogress bars: shown on rank 0 on a terminal outside CI; WMSD_PROGRESS=0 hides them, 1 forces them",
    )
    parser.add_argument("--config", default="", help="TOML config file (keys as in the list below)")
    args, rest = parser.parse_known_args(argv)
    return build_config(cls, file_data, overrides_to_dict(cls, rest))


def describe(cls: type, prefix: str = "", inst: Any = None) -> str:
    """One line per key: ``--train.lr (float, default 0.0001)``, the defaults read from ``inst`` (a config
    with a file's values applied; the built-in defaults without one)."""
    lines = []
    inst = cls() if inst is None else inst
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(describe(tp, f"{prefix}{f.name}.", getattr(inst, f.name)))
        else:
            v = getattr(inst, f.name)
            # spelt as the CLI takes it (TOML: false, not Python's False); a string as quoted text
            shown = repr(v) if isinstance(v, str) else _toml_value(v)
            lines.append(f"  --{prefix}{f.name} ({_type_name(tp)}, default {shown})")
    return "\n".join(lines)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):  # a TOML basic string: backslash, quote and control characters escaped
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def to_toml(cfg: Any, _prefix: str = "") -> str:
    """Serialise a (nested) config dataclass; ``load_toml`` of the result rebuilds the same config."""
    top, sections = [], []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            sections.append(f"[{_prefix}{f.name}]\n" + to_toml(v, f"{_prefix}{f.name}."))
        else:
            top.append(f"{f.name} = {_toml_value(v)}")
    return "\n".join(top) + ("\n\n" if top and sections else "") + "\n".join(sections) + ("\n" if top else "")


def save_config(cfg: Any, run_dir: str | Path) -> Path:
    path = Path(run_dir) / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_toml(cfg))
    return path


def config_main(cls: type = JobConfig, argv: list[str] | None = None, description: str = "", validate=None):
    """``load_config`` for scripts: a ConfigError prints one line and exits with status 2. ``validate(cfg)``
    (a recipe's up-front check of its inputs: files, sizes, devices) runs before any work; the
    ConfigError it raises is reported the same way."""
    try:
        cfg = load_config(cls, argv, description)
        if validate is not None:
            validate(cfg)
        return cfg
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
