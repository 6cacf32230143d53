"""Hub-mediated rounds: clients federating through a Hub repo reach what the Accelerate-driven run reaches.

The Hub side runs the real `huggingface_hub` client over HTTP against `LocalHub`; the Accelerate side is the recipe's
`run` in-process on one CPU process. Both use the tiny world of `federated_setup` (4 clients, seconds).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from federated_setup import tiny_overrides
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import RevisionNotFoundError
from safetensors.torch import load_file
from transformers import AutoTokenizer

from comigs_hf.cli import main as comigs
from comigs_hf.config import build_strategy, load_config
from comigs_hf.data import build_client_datasets
from comigs_hf.recipe import evaluate_hub_round, run, run_hub_round, seed_hub
from comigs_hf.transports.hub import aggregate_round, hub_client_id, update_folder

try:  # default pytest import mode: `tests/` (no __init__.py) is on sys.path
    from hub_server import LocalHub
except ImportError:  # `tests` made a package, or --import-mode=importlib
    from tests.hub_server import LocalHub

ROOT = Path(__file__).resolve().parents[1]
REPO = "local-user/comigs-rounds"
NUM_CLIENTS = 4
ROUNDS = 2


@pytest.fixture
def hub(local_hub: LocalHub) -> Iterator[LocalHub]:
    yield local_hub
    assert local_hub.unhandled == []  # the client called nothing the local server does not implement


def overrides(world, output_dir: Path, **extra) -> list[str]:
    return tiny_overrides(*world, output_dir, rounds=ROUNDS, save_models=False, **extra)


def saved_states(state_dir: Path, client_id: int) -> dict[str, bytes]:
    """Every state a client saved, by file name (`comigs_hf.client`'s folder of the client)."""
    folder = state_dir / f"client-{client_id}"
    return {path.name: path.read_bytes() for path in sorted(folder.glob("*.pt"))} if folder.is_dir() else {}


def global_at(round_index: int) -> dict[str, torch.Tensor]:
    return load_file(hf_hub_download(REPO, "adapter_model.safetensors", revision=f"round-{round_index}"))


@pytest.mark.parametrize(
    "layout",
    [
        {},
        {"model.num_specialists": "[0,1,2,3]", "model.top_k": 1},
        {"aggregation": "trimmed_mean", "aggregation_kwargs": "{trim_ratio: 0.25}", "weighting": "uniform"},
        {"strategy": "flexlora", "model.num_specialists": 0, "model.top_k": 1, "model.lora_r": "[2,4,4,4]"},
        {"strategy": "hetlora", "model.num_specialists": 0, "model.top_k": 1, "model.lora_r": "[2,4,4,4]"},
        {"strategy": "fd_lora"},
        {"aggregation": "krum", "aggregation_kwargs": "{num_byzantine: 0, num_selected: 2}", "max_client_weight": 0.3},
    ],
    # fresh per-client models vs one model resized client after client; the registry's other rules; clients of
    # different ranks, each taking back its leading slices of the one published adapter
    ids=[
        "1g1s",
        "heterogeneous-0123-top1",
        "trimmed-mean",
        "flexlora-2444",
        "hetlora-2444",
        "fd-lora-fused",
        "multi-krum-capped",
    ],
)
def test_hub_rounds_give_the_accelerate_run_s_global_generalist_and_test_losses(world, hub, tmp_path, layout):
    cfg = load_config(None, overrides(world, tmp_path / "accelerate", **layout))
    results = run(cfg, Accelerator(cpu=True))
    expected_global = load_file(tmp_path / "accelerate" / "global_generalist" / "adapter_model.safetensors")
    with open(tmp_path / "accelerate" / "curves.csv") as handle:
        expected_rows = {(int(row["round"]), int(row["client_id"])): row for row in csv.DictReader(handle)}

    accelerator = Accelerator(cpu=True)
    seed_hub(cfg, REPO, num_clients=NUM_CLIENTS, accelerator=accelerator)
    for round_index in range(1, ROUNDS + 1):
        for client_id in range(NUM_CLIENTS):
            # one private folder per client: they share nothing but the repo
            record = run_hub_round(
                cfg, client_id, round_index, REPO, tmp_path / f"client-{client_id}", accelerator=accelerator
            )
            expected = expected_rows[(round_index, client_id)]
            assert record["train_tokens"] == int(expected["train_tokens"])
            assert record["bytes_sent"] == int(expected["bytes_sent"])
            assert record["train_loss"] == pytest.approx(float(expected["train_loss"]), rel=1e-6)
        report = aggregate_round(
            REPO, round_index, strategy=build_strategy(cfg), min_clients=NUM_CLIENTS, timeout_s=30, poll_interval_s=0.1
        )
        assert report.accepted_clients == [hub_client_id(i) for i in range(NUM_CLIENTS)] and not report.rejected

    hub_global = global_at(ROUNDS + 1)
    assert hub_global.keys() == expected_global.keys()
    for key, value in expected_global.items():
        # the same kernels on the same inputs in the same order: bit-identical in practice; the tolerance only admits
        # a float32 rounding flip should the float64 averages ever be summed in another order
        torch.testing.assert_close(hub_global[key], value, rtol=1e-6, atol=1e-7, msg=key)
    for client_id, expected in enumerate(results["clients"]):
        metrics = evaluate_hub_round(
            cfg, client_id, ROUNDS, REPO, tmp_path / f"client-{client_id}", accelerator=accelerator
        )
        assert metrics["name"] == expected["name"]
        assert metrics["test_loss"] == pytest.approx(expected["test_loss"], rel=1e-6, abs=1e-7)  # as the tensors
        assert metrics.get("fusion_weights") == expected["fusion_weights"]  # FD-LoRA fuses the same way


def test_a_rerun_round_reuploads_the_saved_update_and_refused_rounds_leave_the_state_alone(
    world, hub, tmp_path, capsys
):
    args = overrides(world, tmp_path / "unused")
    assert comigs(["hub-seed", "--repo-id", REPO, "--num-clients", "4", *args]) == 0
    client = ["hub-client", "--repo-id", REPO, "--client-id", "1", "--round", "1", "--state-dir", str(tmp_path)]
    assert comigs([*client, *args]) == 0
    assert "Client 1 (finance) trained round 1" in capsys.readouterr().out
    state_bytes = saved_states(tmp_path, 1)
    assert list(state_bytes) == ["round-1.pt"]
    update = f"{update_folder(1, hub_client_id(1))}/adapter_model.safetensors"
    first_upload = hf_hub_download(REPO, update)

    cfg = load_config(None, args)
    again = run_hub_round(cfg, 1, 1, REPO, tmp_path, accelerator=Accelerator(cpu=True))
    assert saved_states(tmp_path, 1) == state_bytes  # nothing trained, nothing saved
    assert again["commit_sha"] == HfApi().list_repo_refs(REPO).branches[0].target_commit
    for key, value in load_file(first_upload).items():
        assert torch.equal(load_file(hf_hub_download(REPO, update, revision=again["commit_sha"]))[key], value)

    # running ahead of the aggregator: round-2 is not published, and the round-1 state stays as it was
    with pytest.raises(RevisionNotFoundError):
        run_hub_round(cfg, 1, 2, REPO, tmp_path, accelerator=Accelerator(cpu=True))
    with pytest.raises(ValueError, match="belongs to another federation or recipe: federation="):
        run_hub_round(cfg, 1, 2, "local-user/another-federation", tmp_path, accelerator=Accelerator(cpu=True))
    assert saved_states(tmp_path, 1) == state_bytes


def test_a_client_cannot_skip_a_round_nor_train_past_the_last(world, tmp_path):
    cfg = load_config(None, overrides(world, tmp_path / "unused"))
    with pytest.raises(ValueError, match="trained up to round 0 .* run round 1 next"):
        run_hub_round(cfg, 0, 2, REPO, tmp_path)
    with pytest.raises(ValueError, match=r"round_index must be in \[1, rounds=2\], got 3"):
        run_hub_round(cfg, 0, ROUNDS + 1, REPO, tmp_path)
    assert saved_states(tmp_path, 0) == {}


def test_the_hub_client_command_reports_a_refused_recipe_as_a_usage_error(world, tmp_path, capsys):
    command = ["hub-client", "--repo-id", REPO, "--client-id", "0", "--round", "1", "--state-dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        comigs([*command, *overrides(world, tmp_path / "unused", strategy="fedavg")])
    assert exit_info.value.code == 2
    assert "comigs hub-client: error: Hub rounds share the generalist only" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("strategy=fedavg", "shares generalist, specialist: specialists and routers never leave a client"),
        ("strategy=fedavg_all", "shares generalist, router, specialist: specialists and routers never leave a"),
        ("strategy=local", "shares nothing"),
        ("model.num_generalists=2", "model.num_generalists is 2"),
    ],
)
def test_recipes_the_hub_rounds_cannot_carry_are_refused_before_anything_runs(world, tmp_path, override, message):
    cfg = load_config(None, overrides(world, tmp_path / "unused", **dict([override.split("=")])))
    with pytest.raises(ValueError, match=message):
        seed_hub(cfg, REPO)
    with pytest.raises(ValueError, match=message):
        run_hub_round(cfg, 0, 1, REPO, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_hub_client_trains_with_only_its_own_data_file(world, hub, tmp_path):
    _, data_file = world
    files = {}
    for line in data_file.read_text().splitlines():
        record = json.loads(line)
        files.setdefault(record["domain"], []).append(line)
    paths = {}
    for domain, lines in files.items():
        paths[domain] = tmp_path / f"{domain}.jsonl"
        paths[domain].write_text("\n".join(lines))
    per_client = "{" + ", ".join(f"{domain}: {path}" for domain, path in paths.items()) + "}"
    cfg = load_config(None, overrides(world, tmp_path / "unused", **{"data.data_files": per_client}))
    expected = build_client_datasets(cfg.data, AutoTokenizer.from_pretrained(cfg.model.base_model), cfg.seed)
    seed_hub(cfg, REPO, num_clients=NUM_CLIENTS, accelerator=Accelerator(cpu=True))
    own = sorted(paths)[0]  # client 0: the first client value in sorted order
    for domain, path in paths.items():
        if domain != own:
            path.unlink()  # the other clients' data is gone from this machine

    record = run_hub_round(cfg, 0, 1, REPO, tmp_path / "client-0", accelerator=Accelerator(cpu=True))
    assert record["name"] == own == expected[0].name
    assert record["train_tokens"] == expected[0].num_train_tokens
    assert HfApi().file_exists(REPO, f"{update_folder(1, hub_client_id(0))}/adapter_model.safetensors")
    with pytest.raises(FileNotFoundError):  # and the others' really are unreadable here
        run_hub_round(cfg, 1, 1, REPO, tmp_path / "client-1", accelerator=Accelerator(cpu=True))


@pytest.mark.slow
def test_a_client_killed_before_its_upload_landed_uploads_the_same_update_when_run_again(world, hub, tmp_path):
    args = overrides(world, tmp_path / "unused")
    cfg = load_config(None, args)
    update = f"{update_folder(1, hub_client_id(1))}/adapter_model.safetensors"
    clean_repo = "local-user/comigs-uninterrupted"
    seed_hub(cfg, clean_repo, num_clients=NUM_CLIENTS, accelerator=Accelerator(cpu=True))
    run_hub_round(cfg, 1, 1, clean_repo, tmp_path / "clean", accelerator=Accelerator(cpu=True))
    expected = load_file(hf_hub_download(clean_repo, update))

    seed_hub(cfg, REPO, num_clients=NUM_CLIENTS, accelerator=Accelerator(cpu=True))
    hub.faults.append(("POST", rf"/{REPO}/commit/", 0))  # its upload is held until the process is dead
    client = ["hub-client", "--repo-id", REPO, "--client-id", "1", "--round", "1", "--state-dir", str(tmp_path / "s")]
    command = [sys.executable, "-c", "from comigs_hf.cli import main; raise SystemExit(main())", *client, *args]
    process = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL)
    assert hub.held.wait(timeout=300)
    process.kill()
    process.wait()
    hub.release.set()
    saved = saved_states(tmp_path / "s", 1)  # trained and saved before the upload
    assert list(saved) == ["round-1.pt"]
    assert not HfApi().file_exists(REPO, update)

    run_hub_round(cfg, 1, 1, REPO, tmp_path / "s", accelerator=Accelerator(cpu=True))
    assert saved_states(tmp_path / "s", 1) == saved  # not trained twice
    uploaded = load_file(hf_hub_download(REPO, update))
    assert uploaded.keys() == expected.keys() and all(torch.equal(uploaded[k], v) for k, v in expected.items())
