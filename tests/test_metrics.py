import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from comigs_hf.metrics import PERPLEXITY_PATH, load_perplexity

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def perplexity():
    return load_perplexity(keep_in_memory=True)


def test_perplexity_is_exp_of_the_token_mean_nll(perplexity):
    # (6 + 2) nats over (3 + 1) tokens: mean loss 2, perplexity e^2
    result = perplexity.compute(nll_sum=[6.0, 2.0], num_tokens=[3, 1])
    assert result["mean_loss"] == pytest.approx(2.0)
    assert result["perplexity"] == pytest.approx(math.exp(2.0))
    assert result["num_tokens"] == 4


def test_tokens_count_equally_whatever_the_example_lengths(perplexity):
    # per-example means 0.5 and 1.5 average to 1.0; pooled over tokens the loss is (1 + 12) / (2 + 8) = 1.3
    perplexity.add_batch(nll_sum=[1.0], num_tokens=[2])
    perplexity.add_batch(nll_sum=[12.0], num_tokens=[8])
    result = perplexity.compute()
    assert result["mean_loss"] == pytest.approx(1.3)
    assert result["perplexity"] == pytest.approx(math.exp(1.3))


def test_zero_loss_gives_perplexity_one(perplexity):
    assert perplexity.compute(nll_sum=[0.0], num_tokens=[5])["perplexity"] == 1.0


def test_overflowing_perplexity_is_infinite(perplexity):
    assert perplexity.compute(nll_sum=[1e6], num_tokens=[1])["perplexity"] == math.inf


@pytest.mark.parametrize(
    ("nll_sum", "num_tokens", "message"),
    [
        ([1.0, 2.0], [0, 0], "zero tokens in total"),
        ([float("nan")], [3], "nll_sum of example 0 is NaN"),
        ([1.0, 1.0], [2, -1], "num_tokens of example 1 is negative"),
    ],
)
def test_undefined_inputs_are_rejected(perplexity, nll_sum, num_tokens, message):
    with pytest.raises(ValueError, match=message):
        perplexity.compute(nll_sum=nll_sum, num_tokens=num_tokens)


def test_metric_script_and_card_live_inside_the_package():
    assert PERPLEXITY_PATH.is_file()
    assert PERPLEXITY_PATH.parent.parent == REPO_ROOT / "comigs_hf" / "metrics"
    # the folder is a package so that packaging installs the script; the card sits beside it
    assert (PERPLEXITY_PATH.parent / "__init__.py").is_file()
    assert (PERPLEXITY_PATH.parent / "README.md").is_file()


def test_metric_loads_offline_into_an_empty_cache(tmp_path):
    script = f"""
import json, evaluate
from comigs_hf.metrics import load_perplexity
results = [load_perplexity().compute(nll_sum=[6.0, 2.0], num_tokens=[3, 1])]
# evaluate.load also accepts the folder, as a metric card documents
results.append(evaluate.load({str(PERPLEXITY_PATH.parent)!r}).compute(nll_sum=[3.0], num_tokens=[3]))
print(json.dumps(results))
"""
    env = dict(os.environ)
    env.update(
        HF_HOME=str(tmp_path / "hf_home"),
        HF_HUB_OFFLINE="1",
        HF_EVALUATE_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        # any request that slipped through would hit a closed local port and fail, not reach the Hub
        HF_ENDPOINT="http://127.0.0.1:9",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),
    )
    completed = subprocess.run(
        [sys.executable, "-c", script], check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    first, second = json.loads(completed.stdout.strip().splitlines()[-1])
    assert first["perplexity"] == pytest.approx(math.exp(2.0))
    assert second["perplexity"] == pytest.approx(math.e)
    # the script was copied from the package into the fresh module cache, not found in an old one
    assert list((tmp_path / "hf_home").rglob("perplexity.py"))
