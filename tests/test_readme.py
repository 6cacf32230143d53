"""The README tells the truth: its two commands exist and its configuration reference is the config fields' metadata,
which `comigs run --help` prints too."""

import re
from pathlib import Path

import pytest

import comigs_hf
from comigs_hf.cli import main as comigs
from comigs_hf.config import config_reference

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_configuration_reference_is_the_config_fields_metadata():
    rows = re.findall(r"^\| `([a-z_.]+)` \| `(.*?)` \| (.*?) \|$", README, flags=re.M)
    documented = {key: (default, meaning) for key, default, meaning in rows}
    for key, default, meaning in config_reference():
        assert documented.get(key) == (default, meaning), f"README row of {key} differs from its field's metadata"


def test_comigs_run_help_lists_every_key_with_its_default_and_meaning(capsys):
    with pytest.raises(SystemExit) as exit_status:
        comigs(["run", "--help"])
    assert exit_status.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for key, default, meaning in config_reference():
        assert f"{key} (default: {default}) {' '.join(meaning.split())}" in text, key


def test_comigs_version_is_the_package_version(capsys):
    with pytest.raises(SystemExit):
        comigs(["--version"])
    assert capsys.readouterr().out.strip() == f"comigs_hf {comigs_hf.__version__}"


def test_readme_commands_are_make_targets_and_ci_runs_the_test_command():
    targets = set(re.findall(r"^([a-z-]+(?: [a-z-]+)*):", (ROOT / "Makefile").read_text(), flags=re.M))
    targets = {name for line in targets for name in line.split()}
    assert "make demo" in README and "make test" in README
    assert {"demo", "test", "install", "bench", "lint"} <= targets
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_readme_has_no_unfilled_placeholders():
    assert not re.search(r"\b(DEMO_TABLE|BENCH_TABLE|CONFIG_REFERENCE|TODO|TBD)\b", README)
