"""Hub-mediated rounds: clients federating through a Hub repo reach what the Accelerate-driven run reaches.

The Hub side runs the real `huggingface_hub` client over HTTP against `LocalHub`; the Accelerate side is
`run_federated` in-process on one CPU process. Both use the tiny world of `federated_setup` (4 clients, seconds).
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from federated_setup import tiny_overrides
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import RevisionNotFoundError
from safetensors.torch import load_file

from comigs_hf.cli import main as comigs
from comigs_hf.config import load_config
from comigs_hf.hub import aggregate_round, update_folder
from comigs_hf.hub_rounds import (
    client_state_path,
    evaluate_hub_client,
    hub_client_id,
    run_hub_client_round,
    seed_hub_rounds,
)
from comigs_hf.rounds import run_federated

try:  # default pytest import mode: `tests/` (no __init__.py) is on sys.path
    from hub_server import LocalHub
except ImportError:  # `tests` made a package, or --import-mode=importlib
    from tests.hub_server import LocalHub

REPO = "local-user/comigs-rounds"
NUM_CLIENTS = 4
ROUNDS = 2



@pytest.fixture
def hub(local_hub: LocalHub) -> Iterator[LocalHub]:
    yield local_hub
    assert local_hub.unhandled == []  # the client called nothing the local server does not implement


def overrides(world, output_dir: Path, **extra) -> list[str]:
    return tiny_overrides(*world, output_dir, rounds=ROUNDS, save_models=False, **extra)


def global_at(round_index: int) -> dict[str, torch.Tensor]:
    return load_file(hf_hub_download(REPO, "adapter_model.safetensors", revision=f"round-{round_index}"))


@pytest.mark.parametrize(
    "layout",
    [{}, {"model.num_specialists": "[0,1,2,3]", "model.top_k": 1}],
    ids=["1g1s", "heterogeneous-0123-top1"],  # fresh per-client models vs one model resized client after client
)
def test_hub_rounds_give_the_accelerate_run_s_global_generalist_and_test_losses(
    world, hub, tmp_path, layout
):
    cfg = load_config(None, overrides(world, tmp_path / "accelerate", **layout))
    results = run_federated(cfg, Accelerator(cpu=True))
    expected_global = load_file(tmp_path / "accelerate" / "global_generalist" / "adapter_model.safetensors")
    with open(tmp_path / "accelerate" / "curves.csv") as handle:
        expected_rows = {(int(row["round"]), int(row["client_id"])): row for row in csv.DictReader(handle)}

    accelerator = Accelerator(cpu=True)
    seed_hub_rounds(cfg, REPO, accelerator=accelerator)
    for round_index in range(1, ROUNDS + 1):
        for client_id in range(NUM_CLIENTS):
            # one private folder per client: they share nothing but the repo
            record = run_hub_client_round(cfg, client_id, round_index, REPO, tmp_path / f"client-{client_id}",
                                          accelerator=accelerator)
            expected = expected_rows[(round_index, client_id)]
            assert record["train_tokens"] == int(expected["train_tokens"])
            assert record["bytes_sent"] == int(expected["bytes_sent"])
            assert record["train_loss"] == pytest.approx(float(expected["train_loss"]), rel=1e-6)
        report = aggregate_round(REPO, round_index, min_clients=NUM_CLIENTS, timeout_s=30, poll_interval_s=0.1)
        assert report.accepted_clients == [hub_client_id(i) for i in range(NUM_CLIENTS)] and not report.rejected

    hub_global = global_at(ROUNDS + 1)
    assert hub_global.keys() == expected_global.keys()
    for key, value in expected_global.items():
        # the same kernels on the same inputs in the same order: bit-identical in practice; the tolerance only admits
        # a float32 rounding flip should the float64 averages ever be summed in another order
        torch.testing.assert_close(hub_global[key], value, rtol=1e-6, atol=1e-7, msg=key)
    for client_id, expected in enumerate(results["clients"]):
        metrics = evaluate_hub_client(cfg, client_id, ROUNDS, REPO, tmp_path / f"client-{client_id}",
                                      accelerator=accelerator)
        assert metrics["name"] == expected["name"]
        assert metrics["test_loss"] == pytest.approx(expected["test_loss"], rel=1e-6, abs=1e-7)  # as the tensors


def test_a_rerun_round_reuploads_the_saved_update_and_refused_rounds_leave_the_state_alone(
    world, hub, tmp_path, capsys
):
    args = overrides(world, tmp_path / "unused")
    assert comigs(["hub-seed", "--repo-id", REPO, *args]) == 0
    client = ["hub-client", "--repo-id", REPO, "--client-id", "1", "--round", "1", "--state-dir", str(tmp_path)]
    assert comigs([*client, *args]) == 0
    assert "Client 1 (finance) trained round 1" in capsys.readouterr().out
    path = client_state_path(tmp_path, 1)
    state_bytes = path.read_bytes()
    update = f"{update_folder(1, hub_client_id(1))}/adapter_model.safetensors"
    first_upload = hf_hub_download(REPO, update)

    cfg = load_config(None, args)
    again = run_hub_client_round(cfg, 1, 1, REPO, tmp_path, accelerator=Accelerator(cpu=True))
    assert path.read_bytes() == state_bytes  # nothing trained, nothing saved
    assert again["commit_sha"] == HfApi().list_repo_refs(REPO).branches[0].target_commit
    for key, value in load_file(first_upload).items():
        assert torch.equal(load_file(hf_hub_download(REPO, update, revision=again["commit_sha"]))[key], value)

    # running ahead of the aggregator: round-2 is not published, and the round-1 state stays as it was
    with pytest.raises(RevisionNotFoundError):
        run_hub_client_round(cfg, 1, 2, REPO, tmp_path, accelerator=Accelerator(cpu=True))
    with pytest.raises(ValueError, match="belongs to another federation or recipe: repo_id="):
        run_hub_client_round(cfg, 1, 2, "local-user/another-federation", tmp_path, accelerator=Accelerator(cpu=True))
    assert path.read_bytes() == state_bytes


def test_a_client_cannot_skip_a_round_nor_train_past_the_last(world, tmp_path):
    cfg = load_config(None, overrides(world, tmp_path / "unused"))
    with pytest.raises(ValueError, match="trained up to round 0 .* run round 1 next"):
        run_hub_client_round(cfg, 0, 2, REPO, tmp_path)
    with pytest.raises(ValueError, match=r"round_index must be in \[1, rounds=2\], got 3"):
        run_hub_client_round(cfg, 0, ROUNDS + 1, REPO, tmp_path)
    assert not client_state_path(tmp_path, 0).exists()


def test_the_hub_client_command_reports_a_refused_recipe_as_a_usage_error(world, tmp_path, capsys):
    command = ["hub-client", "--repo-id", REPO, "--client-id", "0", "--round", "1", "--state-dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        comigs([*command, *overrides(world, tmp_path / "unused", strategy="fedavg")])
    assert exit_info.value.code == 2
    assert "comigs hub-client: error: Hub rounds share the generalist only" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("strategy=fedavg", "shares generalist, router, specialist: specialists and routers never leave a client"),
        ("strategy=local", "shares nothing"),
        ("weighting=uniform", "weighting='uniform'"),
        ("model.num_generalists=2", "model.num_generalists is 2"),
    ],
)
def test_recipes_the_hub_rounds_cannot_carry_are_refused_before_anything_runs(world, tmp_path, override, message):
    cfg = load_config(None, overrides(world, tmp_path / "unused", **dict([override.split("=")])))
    with pytest.raises(ValueError, match=message):
        seed_hub_rounds(cfg, REPO)
    with pytest.raises(ValueError, match=message):
        run_hub_client_round(cfg, 0, 1, REPO, tmp_path)
    assert list(tmp_path.iterdir()) == []
