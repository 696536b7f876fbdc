"""engine.config: TOML + dotted overrides, validation errors that name the key, round trip."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import ConfigError, JobConfig, load_config, load_toml, save_config, to_toml


def test_defaults_then_file_then_cli(tmp_path):
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text('[train]\nlr = 0.5\nsteps = 7\n[model]\nattention = "triton"\n')
    cfg = load_config(JobConfig, ["--config", str(cfg_file), "--train.lr", "1e-4", "--model.attention=sdpa"])
    assert cfg.train.lr == 1e-4  # CLI beats file
    assert cfg.train.steps == 7  # file beats default
    assert cfg.model.attention == "sdpa"
    assert cfg.train.batch_size == JobConfig().train.batch_size  # default kept


def test_int_accepted_for_float_and_lists_parse():
    cfg = load_config(
        JobConfig, ["--train.lr", "1", "--eval.seeds", "[1, 2, 3]", "--checkpoint.enabled", "false"]
    )
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == 1.0
    assert cfg.eval.seeds == [1, 2, 3]
    assert cfg.checkpoint.enabled is False


@pytest.mark.parametrize("text, value", [(".5", 0.5), ("5.", 5.0), ("1.e-4", 1e-4), ("-.25", -0.25)])
def test_python_spelt_floats_parse(text, value):
    """Floats TOML does not spell ('.5') were refused with "expected float, got str '.5'"."""
    assert load_config(JobConfig, ["--train.lr", text]).train.lr == value


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--train.lrr", "1"], "unknown config key 'train.lrr'"),
        (["--trian.lr", "1"], "unknown config key 'trian.lr'"),
        (["--train.steps", "ten"], "config key 'train.steps': expected int"),
        (["--train.steps", "1.5"], "config key 'train.steps': expected int"),
        (["--model.attention", "cudnn"], "config key 'model.attention': 'cudnn' is not one of"),
        (["--train", "1"], "is a section"),
        (["--train.lr"], "has no value"),
        (
            ["--eval.seeds", "[0, 1"],
            "config key 'eval.seeds': '[0, 1' is not a valid TOML list (Unclosed array",
        ),
    ],
)
def test_bad_cli_names_the_key(argv, needle):
    with pytest.raises(ConfigError) as e:
        load_config(JobConfig, argv)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_key_lists_valid_ones(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[train]\nlearning_rate = 1.0\n")
    with pytest.raises(ConfigError) as e:
        load_config(JobConfig, ["--config", str(p)])
    msg = str(e.value)
    assert "train.learning_rate" in msg and "lr" in msg and "steps" in msg


def test_wrong_type_in_file_and_missing_file(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text('[train]\nsteps = "100"\n')
    with pytest.raises(ConfigError, match="train.steps"):
        load_config(JobConfig, ["--config", str(p)])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(JobConfig, ["--config", str(tmp_path / "nope.toml")])
    p.write_text("[train\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(JobConfig, ["--config", str(p)])


def test_saved_config_round_trips(tmp_path):
    # quotes, backslashes, control characters (a \r from a script with Windows line ends), non-ASCII
    name = 'a "q" \\ b\r\x1b\x7f é 😀'
    cfg = load_config(JobConfig, ["--train.lr", "3e-5", "--eval.seeds", "[4, 5]", "--run.name", name])
    path = save_config(cfg, tmp_path)
    again = load_config(JobConfig, ["--config", str(path)])
    assert again == cfg
    assert load_toml(path)["train"]["lr"] == 3e-5
    assert to_toml(again) == to_toml(cfg)


def test_help_shows_the_defaults_in_effect(capsys):
    """--help with --config lists the values the file sets as the defaults (the pipeline always loads its
    toy config), and list keys say how to write them."""
    toy = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "wmsd_toy.toml"
    with pytest.raises(SystemExit):
        load_config(JobConfig, ["--config", str(toy), "--help"])
    text = capsys.readouterr().out
    steps = load_toml(toy)["train"]["steps"]
    assert f"--train.steps (int, default {steps})" in text and f"defaults after {toy}" in text
    assert "--eval.seeds (list[int], TOML syntax, default [0])" in text


def test_cli_error_is_one_line_exit_2(tmp_path):
    code = "from engine.config import config_main; config_main()"
    r = subprocess.run([sys.executable, "-c", code, "--train.nope", "1"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "train.nope" in r.stderr


def test_help_spells_defaults_as_the_cli_takes_them(capsys):
    """--help showed bool defaults as Python's 'False', which the CLI rejects ("expected bool, got str 'False'"):
    every non-string default, passed back as shown, must rebuild the same config."""
    with pytest.raises(SystemExit):
        load_config(JobConfig, ["--help"])
    argv = []
    for line in capsys.readouterr().out.splitlines():
        m = re.match(r"\s+--(\S+) \((.*), default (.*)\)$", line)
        if m and m.group(2) != "str" and not m.group(2).startswith("'"):  # strings are taken as raw text
            argv += [f"--{m.group(1)}", m.group(3)]
    assert "--model.meta_init" in argv and "--train.lr" in argv and "--eval.seeds" in argv
    assert load_config(JobConfig, argv) == JobConfig()


def test_help_says_how_to_turn_progress_bars_off():
    """Progress bars on long work are switched by WMSD_PROGRESS, which no --help mentioned."""
    out = subprocess.run([sys.executable, "-c", "from engine.config import config_main; config_main(argv=['--help'])"],
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert "WMSD_PROGRESS=0 hides them" in out.stdout
