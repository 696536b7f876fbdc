"""The README's main job: the whole WMSD pipeline on the embedded toy world, on CPU, in minutes.

    python recipes/pipeline.py                                   # = --config recipes/configs/wmsd_toy.toml
    python recipes/pipeline.py --distill.min_gap 0               # continue even without a Demonstrator gap

Stages (each one a recipe, each resumable; a rerun skips finished work, and a training stage rerun with
other settings or inputs stops and says what changed: <stage>/stage.json):
  1. propose       world.num_scenes toy scenes -> tasks.jsonl (oracle proposer)
  2. gap check     Demonstrator + task vs Demonstrator + solution on eval.num_items held-out scenes,
                   same noise; stops with a clear message when the paired Avg gap < distill.min_gap
  3. distill       on-policy self-distillation (train.steps)                     -> onpolicy/
  4. ablations     Demonstrator videos (demonstrate) -> off-policy SFT and filtered SFT, same steps
                                                                                  -> sft/, sft_filtered/
  5. rl            Flow-GRPO + Demonstrator anchor from the on-policy Executor (rl.steps) -> rl/
  6. evaluate      every condition on the same held-out items and noise          -> eval/
Prints and writes (results.json, results.md in the run folder) the table with CIs, and says whether
on-policy distillation beats off-policy SFT by a paired test, whatever the answer is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from engine.config import ConfigError, JobConfig, config_main, save_config  # noqa: E402
from engine.dist import end_process  # noqa: E402
from engine.evaluation import NoGapError, gap_closed, paired_test  # noqa: E402
from engine.log import get_logger  # noqa: E402
from recipes import demonstrate, distill, evaluate, propose, rl  # noqa: E402
from recipes.common import (  # noqa: E402
    TOY_ASSETS,
    TOY_CONFIG,
    check_judge,
    check_model,
    check_run,
    check_weights_fit,
    read_jsonl,
    run_dir,
)

log = get_logger("pipeline")


def stage(cfg: JobConfig, out: Path, name: str, **sections) -> JobConfig:
    """A copy of ``cfg`` for one stage: run folder <out>/<name>, shared task and demo files, and the
    given section overrides (``distill={"mode": "off_policy"}``)."""
    c = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, out_dir=str(out), name=name))
    shared = {"tasks": str(out / "tasks.jsonl"), "demos": str(out / "demos")}
    c = dataclasses.replace(c, distill=dataclasses.replace(c.distill, **shared))
    for section, values in sections.items():
        c = dataclasses.replace(c, **{section: dataclasses.replace(getattr(c, section), **values)})
    return c


# Settings that do not change what a stage trains (where and how often it logs and checkpoints,
# evaluation, how long collectives and judge calls may take, how requests are batched): a rerun may change them
_OPERATIONAL = {
    "run": ("name", "out_dir", "device"),
    "train": ("log_every",),
    "parallel": ("timeout_s",),
    "judge": ("max_batch", "max_wait_ms", "max_concurrency", "timeout_s", "max_retries", "api_key_env"),
    "checkpoint": None,
    "eval": None,
}


def _file_id(path: Path) -> str:
    """A small text file by its content; weights by size and modification time (hashing 28 GB is slow)."""
    if not path.is_file():
        return "missing"
    if path.suffix == ".jsonl":
        return hashlib.sha256(path.read_bytes()).hexdigest()
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def model_files(c: JobConfig) -> list[Path]:
    """The Demonstrator's weight files (the toy world's world.demonstrator or shipped assets, else those of
    model.pretrained): a training stage's teacher and, without distill.init, its Executor's start."""
    toy = c.model.family == "wan" and c.model.flavour == "toy"
    folder = (c.world.demonstrator or TOY_ASSETS) if toy else c.model.pretrained
    return sorted(Path(folder).rglob("*.safetensors")) if folder and Path(folder).is_dir() else []


# Sections distill.run never reads (no judge: filtered SFT reads its scores from demos/index.jsonl, an input;
# no RL): a rerun changing them stopped the distillation stages
_DISTILL_UNREAD = ("judge", "rl")


def stage_fingerprint(c: JobConfig, inputs: list[Path], unread: tuple[str, ...] = ()) -> dict:
    """What a training stage's result depends on: its config (less :data:`_OPERATIONAL` and the ``unread``
    sections), flattened to "section.key", and its input files."""
    flat = {}
    for section, values in dataclasses.asdict(c).items():
        skip = _OPERATIONAL.get(section, ())
        if skip is None or section in unread:
            continue
        flat.update({f"{section}.{k}": v for k, v in values.items() if k not in skip})
    return {
        "config": json.loads(json.dumps(flat, default=str)),
        "inputs": {str(p): _file_id(p) for p in inputs},
    }


def trained(cfg: JobConfig, out: Path, name: str, fn, inputs: list[Path], **sections) -> Path:
    """Run a training stage unless its export exists; returns the Executor's weights. Its fingerprint
    (:func:`stage_fingerprint`) goes to <stage>/stage.json before it starts; a rerun whose fingerprint
    differs stops with the keys and files that changed (the stage's export or checkpoints would
    otherwise be reused or resumed under other settings)."""
    c = stage(cfg, out, name, **sections)
    weights, record = out / name / "model.safetensors", out / name / "stage.json"
    # the weights it reads, by identity: new weights at the same path reused the stage trained from the old
    inputs = [
        *inputs,
        *model_files(c),
        *([Path(c.distill.init)] if fn is distill.run and c.distill.init else []),
    ]
    unread = _DISTILL_UNREAD if fn is distill.run else ()
    fp = stage_fingerprint(c, inputs, unread)
    if record.is_file():
        old = json.loads(record.read_text())
        # records written before _DISTILL_UNREAD hold those sections too
        old["config"] = {k: v for k, v in old["config"].items() if k.split(".")[0] not in unread}
        keys = sorted(k for k in fp["config"].keys() | old["config"].keys()
                      if fp["config"].get(k) != old["config"].get(k))  # fmt: skip
        files = sorted(k for k in fp["inputs"].keys() | old["inputs"].keys()
                       if fp["inputs"].get(k) != old["inputs"].get(k))  # fmt: skip
        if keys or files:
            changed = [f"{k}: {old['config'].get(k)!r} -> {fp['config'].get(k)!r}" for k in keys]
            raise SystemExit(
                f"STOP: stage '{name}' in {out / name} was trained with other settings or inputs "
                f"({'; '.join(changed + [f'{f} changed' for f in files])}). Rerun with another --run.name, "
                f"or remove {out / name} to train it again."
            )
    elif weights.is_file():
        log.warning(
            "%s: reusing %s, trained before stages recorded their settings (unchecked)", name, weights
        )
        return weights
    if weights.is_file():
        log.info("%s: already trained (%s)", name, weights)
        return weights
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(fp, indent=1))
    return fn(c)


def gap_check(cfg: JobConfig, out: Path) -> dict:
    """Evaluate both Demonstrator baselines (kept for the final table) and test their paired gap."""
    evaluate.run(stage(cfg, out, "eval", eval={"executors": [], "baselines": True}), out=out / "eval")
    task, sol = (
        dict(np.load(out / "eval" / f"{n}.npz")) for n in (evaluate.BASELINE, "demonstrator+solution")
    )
    gap = paired_test(sol["avg"], task["avg"], cfg.eval.ci)
    return {"diff": gap.diff, "lo": gap.lo, "hi": gap.hi, "p_sign": gap.p_sign, "min_gap": cfg.distill.min_gap,
            "passed": gap.diff >= cfg.distill.min_gap}  # fmt: skip


def ablations(cfg: JobConfig, out: Path) -> dict[str, Path]:
    """Off-policy SFT on all Demonstrator videos, and on the judged-successful ones only."""
    demonstrate.run(stage(cfg, out, "demos"))
    inputs = [out / "tasks.jsonl", out / "demos" / "index.jsonl"]
    runs = {"sft": trained(cfg, out, "sft", distill.run, inputs, distill={"mode": "off_policy"})}
    rows = read_jsonl(out / "demos" / "index.jsonl", "demonstrations index", "recipes/demonstrate.py")
    good = sum(1 for r in rows if (r["scores"].get("task") or 0.0) >= cfg.distill.filter_threshold)
    if good == 0:
        log.warning("filtered SFT skipped: none of %d demonstrations solves its task", len(rows))
    else:
        runs["sft_filtered"] = trained(
            cfg, out, "sft_filtered", distill.run, inputs, distill={"mode": "off_policy_filtered"}
        )
    return runs


def verdict(res: dict, cfg: JobConfig) -> str:
    """The honest sentence on on-policy vs off-policy SFT (paired, Avg)."""
    cmp = res["conditions"].get("onpolicy", {}).get("vs_sft")
    if cmp is None:
        return "on-policy vs off-policy: not compared (a condition is missing)."
    d = cmp["avg"]
    sig = d["lo"] > 0 or d["hi"] < 0
    word = (
        "beats"
        if d["diff"] > 0 and sig
        else ("is worse than" if sig else "does not significantly differ from")
    )
    return (f"On-policy distillation {word} off-policy SFT: Avg difference {d['diff']:+.3f} "
            f"[{d['lo']:+.3f}, {d['hi']:+.3f}] ({cfg.eval.ci:.0%} CI), sign test p = {d['p_sign']:.2g}, "
            f"{d['n']} paired items.")  # fmt: skip


def final_results(cfg: JobConfig, out: Path, executors: dict[str, Path], gap: dict, t0: float) -> dict:
    specs = [f"{name}={path}" for name, path in executors.items()]
    res = evaluate.run(
        stage(cfg, out, "eval", eval={"executors": specs, "baselines": True}), out=out / "eval"
    )
    sft = dict(np.load(out / "eval" / "sft.npz")) if "sft" in executors else None
    onp = dict(np.load(out / "eval" / "onpolicy.npz")) if "onpolicy" in executors else None
    if sft is not None and onp is not None:
        res["conditions"]["onpolicy"]["vs_sft"] = {
            q: vars(paired_test(onp[q], sft[q], cfg.eval.ci)) for q in evaluate.COLUMNS
        }
    base = {c: dict(np.load(out / "eval" / f"demonstrator+{c}.npz"))["avg"] for c in ("task", "solution")}
    for name in executors:
        e = dict(np.load(out / "eval" / f"{name}.npz"))["avg"]
        # a run let past the gap check (distill.min_gap <= 0) without a gap: no share to report (n/a)
        try:
            f, lo, hi = gap_closed(e, base["task"], base["solution"], cfg.eval.ci)
        except NoGapError as err:
            log.warning("%s: no share of the gap closed to report: %s", name, err)
            f = lo = hi = float("nan")
        res["conditions"][name]["gap_closed"] = {"mean": f, "lo": lo, "hi": hi}
    res.update(gap=gap, wall_s=time.perf_counter() - t0, verdict=verdict(res, cfg))
    return res


def gap_closed_lines(res: dict, cfg: JobConfig) -> str:
    """One line per Executor: the share of the Demonstrator's Avg gap it closes."""
    pct = lambda x: f"{round(100 * x)}%" if x == x else "n/a"  # noqa: E731  (round, not :.0%: -0.2% prints 0%; NaN: no item scored)
    rows = [f"- {name}: {pct(g['mean'])} [{pct(g['lo'])}, {pct(g['hi'])}]" for name, c in res["conditions"].items()
            if (g := c.get("gap_closed"))]  # fmt: skip
    head = f"Share of the Demonstrator's gap (solution - task, Avg) closed ({cfg.eval.ci:.0%} CI, paired bootstrap):"
    return "\n".join([head, *rows]) + "\n"


def run(cfg: JobConfig) -> dict:
    t0 = time.perf_counter()
    out = run_dir(cfg)
    save_config(cfg, out)
    propose.run(stage(cfg, out, "propose"))  # its own config.toml and images; tasks.jsonl shared in <out>
    gap = gap_check(cfg, out)
    log.info(
        "Demonstrator gap (solution - task, Avg): %+.3f [%+.3f, %+.3f]", gap["diff"], gap["lo"], gap["hi"]
    )
    if not gap["passed"]:
        table = (out / "eval" / "results.md").read_text()
        (out / "results.json").write_text(
            json.dumps({"gap": gap, "stopped": "gap below distill.min_gap"}, indent=1)
        )
        print(table)
        raise SystemExit(
            f"STOP: the Demonstrator's gap (solution - task, Avg) is {gap['diff']:+.3f} "
            f"[{gap['lo']:+.3f}, {gap['hi']:+.3f}], below distill.min_gap = {gap['min_gap']}: the solution "
            "does not carry what the task lacks, so distillation has nothing to teach. Table above; rerun "
            "with --distill.min_gap 0 to run the rest anyway."
        )
    tasks = out / "tasks.jsonl"
    executors = {
        "onpolicy": trained(cfg, out, "onpolicy", distill.run, [tasks], distill={"mode": "on_policy"})
    }
    executors.update(ablations(cfg, out))
    onpolicy = executors["onpolicy"]
    executors["rl"] = trained(cfg, out, "rl", rl.run, [tasks, onpolicy], rl={"init": str(onpolicy)})
    res = final_results(cfg, out, executors, gap, t0)
    table = evaluate.markdown_table(res) + "\n" + gap_closed_lines(res, cfg) + "\n" + res["verdict"] + "\n"
    (out / "results.json").write_text(json.dumps(res, indent=1))
    (out / "results.md").write_text(table)
    print(table)
    return res


def validate(cfg: JobConfig) -> None:
    """Every stage's inputs and settings, checked before the first stage: a ConfigError naming the key (rl's
    refused flow.num_steps 2 only after propose, the gap check, distillation and both SFT runs)."""
    check_run(cfg)
    check_model(cfg)
    check_judge(cfg)
    # the pipeline sets these itself for its stages: a value given was silently ignored
    for key, value in (("distill.tasks", cfg.distill.tasks), ("distill.demos", cfg.distill.demos),
                       ("rl.init", cfg.rl.init), ("eval.executors", cfg.eval.executors)):  # fmt: skip
        if value:
            raise ConfigError(f"{key} = {value!r}: the pipeline sets it for its stages; leave it empty")
    # so are these (each stage's mode; both baselines, which the gap check compares)
    for key, ok, want in (("distill.mode", cfg.distill.mode == "on_policy", '"on_policy"'),
                          ("eval.baselines", cfg.eval.baselines, "true")):  # fmt: skip
        if not ok:
            raise ConfigError(f"{key}: the pipeline sets it for its stages; leave it {want}")
    propose.check_manifest(cfg)  # a bad row failed with a traceback in the propose stage
    sizes = [("distill.pairs_per_image", cfg.distill.pairs_per_image),
             ("distill.demos_per_task", cfg.distill.demos_per_task)]  # fmt: skip
    if not cfg.data.manifest:
        sizes.append(("world.num_scenes", cfg.world.num_scenes))
    for key, v in sizes:
        if v < 1:
            raise ConfigError(f"config key '{key}': expected >= 1, got {v}")
    # the trainer exports <stage>/model.safetensors, which the next stages load, only after >= 1 step
    if cfg.train.steps < 1:
        raise ConfigError(
            f"train.steps = {cfg.train.steps}: expected >= 1 (each stage passes on its trained Executor)"
        )
    if not cfg.checkpoint.export_safetensors:
        raise ConfigError("checkpoint.export_safetensors = false: the stages pass their Executors on as "
                          "<stage>/model.safetensors; set it to true")  # fmt: skip
    evaluate.check_eval_settings(cfg)
    if not 1 <= cfg.distill.steps_per_rollout <= cfg.flow.num_steps:
        raise ConfigError(f"distill.steps_per_rollout = {cfg.distill.steps_per_rollout}: expected 1..flow.num_steps "
                          f"({cfg.flow.num_steps})")  # fmt: skip
    check_weights_fit(cfg, cfg.distill.init, "distill.init")
    rl.check_settings(cfg)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" not in argv and not any(a.startswith("--config=") for a in argv):
        argv = ["--config", str(TOY_CONFIG), *argv]
    run(config_main(JobConfig, argv, description=__doc__, validate=validate))


if __name__ == "__main__":
    main()
    end_process()  # a torchrun worker leaves without interpreter finalisation (see engine.dist)
