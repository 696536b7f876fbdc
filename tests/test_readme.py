"""The README's two commands are what .ci/run and the docs say they are."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_ci_runs_the_readme_test_command_verbatim():
    test_cmd = _bash_blocks()[1].strip()
    ci_lines = [ln.strip() for ln in (ROOT / ".ci/run").read_text().splitlines()]
    assert test_cmd in ci_lines


def test_main_command_runs_an_existing_recipe():
    main_cmd = _bash_blocks()[0]
    scripts = re.findall(r"(recipes/\w+\.py)", main_cmd)
    assert scripts and all((ROOT / s).is_file() for s in scripts)


def test_documented_paths_exist():
    text = (ROOT / "README.md").read_text()
    for rel in re.findall(r"\]\(((?:docs|bench)/[\w.]+)\)", text):
        assert (ROOT / rel).is_file(), rel
