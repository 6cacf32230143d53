"""Refactors keep the numbers: the tiny world's runs reproduce figures recorded before them.

The figures in `data/recorded_figures.json` were measured once and are only ever re-recorded by a change that says
why (a bug fix that changes what a round computes). The tolerance admits float32 rounding differences between CPUs,
not a change of algorithm: a different weight, seed or update order moves these losses by far more than 1e-5.
"""

import json
from pathlib import Path

import pytest
from accelerate import Accelerator
from federated_setup import tiny_overrides

from comigs_hf.config import load_config
from comigs_hf.recipe import run

RECORDED = json.loads((Path(__file__).parent / "data" / "recorded_figures.json").read_text())
CASES = [(era, name) for era in ("before_redesign", "after_weight_fix") for name in RECORDED[era]]


@pytest.mark.slow
@pytest.mark.parametrize(("era", "name"), CASES, ids=[f"{era}-{name}" for era, name in CASES])
def test_the_tiny_world_reproduces_its_recorded_test_losses(world, tmp_path, era, name):
    case = RECORDED[era][name]
    cfg = load_config(None, tiny_overrides(*world, tmp_path / "out", save_models=False, **case["overrides"]))
    results = run(cfg, Accelerator(cpu=True))
    assert [c["test_loss"] for c in results["clients"]] == pytest.approx(case["test_loss"], rel=1e-5, abs=0)
