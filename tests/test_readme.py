"""The README tells the truth: its two commands exist and its configuration reference covers every key."""

import dataclasses
import re
from pathlib import Path

import pytest

from comigs_hf.config import RecipeConfig
from comigs_hf.data import DataConfig
from comigs_hf.evaluation import EvaluationConfig
from comigs_hf.model import ModelConfig
from comigs_hf.trainer import TrainingConfig

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


@pytest.mark.parametrize(
    "section, prefix",
    [
        (RecipeConfig, ""),
        (ModelConfig, "model."),
        (TrainingConfig, "training."),
        (EvaluationConfig, "evaluation."),
        (DataConfig, "data."),
    ],
)
def test_configuration_reference_documents_every_key(section, prefix):
    nested = {"model", "data", "training", "evaluation"} if not prefix else set()
    missing = [
        f.name for f in dataclasses.fields(section) if f.name not in nested and f"`{prefix}{f.name}`" not in README
    ]
    assert not missing, f"README lacks {missing}"


def test_readme_commands_are_make_targets_and_ci_runs_the_test_command():
    targets = set(re.findall(r"^([a-z-]+(?: [a-z-]+)*):", (ROOT / "Makefile").read_text(), flags=re.M))
    targets = {name for line in targets for name in line.split()}
    assert "make demo" in README and "make test" in README
    assert {"demo", "test", "install", "bench", "lint"} <= targets
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_readme_has_no_unfilled_placeholders():
    assert not re.search(r"\b(DEMO_TABLE|BENCH_TABLE|CONFIG_REFERENCE|TODO|TBD)\b", README)
