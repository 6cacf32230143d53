"""What leaves a client is its update, on every transport: the bytes each transport sends are the update's shared
tensors, bit for bit, differential privacy's clipping included.

Each client's round is recorded where the client step returns it (`Client.train`, wrapped, not replaced), and what
leaves is read where it leaves: the Accelerate collective's payload, the adapter a Hub client uploads (read back from
the local Hub as any aggregator reads it), the arrays of a Flower node's train reply.
"""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from federated_setup import tiny_overrides
from flwr.app import ConfigRecord, RecordDict
from huggingface_hub import hf_hub_download
from safetensors.torch import load_file

from comigs_hf.adapters import generalist_state_dict
from comigs_hf.algorithms.privacy import update_norm
from comigs_hf.client import Client
from comigs_hf.client_state import initial_shared_state
from comigs_hf.config import load_config
from comigs_hf.flower_app import build_node
from comigs_hf.recipe import run, run_hub_round, seed_hub
from comigs_hf.strategies import partition_state_dict
from comigs_hf.transports import accelerate as rounds_module
from comigs_hf.transports.flower import shared_to_arrays, update_from_reply
from comigs_hf.transports.hub import hub_client_id, update_folder

REPO = "local-user/what-leaves"
CLIPPING = 0.005  # far below what one round moves the generalist: every update is clipped
CLIENTS = "[cooking,finance,science,sports]"


@pytest.fixture
def recorded(monkeypatch) -> list:
    """Every `(client, update, global the round started from)` the client step returned, in order."""
    seen = []
    train = Client.train

    def recording(client, round_index, shared, **kwargs):
        update, evaluation = train(client, round_index, shared, **kwargs)
        seen.append((client, update, shared))
        return update, evaluation

    monkeypatch.setattr(Client, "train", recording)
    return seen


def recipe(world, output_dir, private: bool):
    extra = {"rounds": 1, "save_models": False, "data.client_values": CLIENTS}
    if private:
        extra["dp_clipping_norm"] = CLIPPING
    return load_config(None, tiny_overrides(*world, output_dir, **extra))


def accelerate_sends(world, tmp_path, monkeypatch, private: bool) -> list[dict[str, torch.Tensor]]:
    payloads = []
    exchange = rounds_module._exchange

    def audited(accelerator, updates):
        payloads.extend(updates)
        return exchange(accelerator, updates)

    monkeypatch.setattr(rounds_module, "_exchange", audited)
    run(recipe(world, tmp_path / "out", private), Accelerator(cpu=True))
    return [update.shared for update in payloads]


def hub_sends(world, tmp_path, private: bool) -> list[dict[str, torch.Tensor]]:
    cfg = recipe(world, tmp_path / "unused", private)
    seed_hub(cfg, REPO, num_clients=4, accelerator=Accelerator(cpu=True))
    uploads = []
    for client_id in range(4):
        run_hub_round(cfg, client_id, 1, REPO, tmp_path / f"client-{client_id}", accelerator=Accelerator(cpu=True))
        path = f"{update_folder(1, hub_client_id(client_id))}/adapter_model.safetensors"
        uploads.append(load_file(hf_hub_download(REPO, path)))
    return uploads


def flower_sends(world, tmp_path, private: bool) -> list[dict[str, torch.Tensor]]:
    cfg = recipe(world, tmp_path / "out", private)
    replies = []
    for client_id in range(4):
        node = build_node(cfg, client_id, tmp_path / "nodes")
        spec = node.client.spec
        shared = initial_shared_state(node.client.model, spec.strategy, spec.num_specialists, cfg.seed, spec.top_k)
        message = RecordDict({"arrays": shared_to_arrays(shared), "config": ConfigRecord({"round": 1})})
        update, _, _ = update_from_reply(node.train(message), shared, 4, 1)
        replies.append(update.shared)
    return replies


@pytest.mark.parametrize("private", [True, False], ids=["dp-clipped", "plain"])
@pytest.mark.parametrize("transport", ["accelerate", "hub", "flower"])
def test_the_bytes_that_leave_a_client_are_its_update_on_every_transport(
    world, tmp_path, monkeypatch, recorded, request, transport, private
):
    if transport == "accelerate":
        sent = accelerate_sends(world, tmp_path, monkeypatch, private)
    elif transport == "hub":
        request.getfixturevalue("local_hub")
        sent = hub_sends(world, tmp_path, private)
    else:
        sent = flower_sends(world, tmp_path, private)
    assert len(sent) == len(recorded) == 4
    for tensors, (client, update, start) in zip(sent, recorded):
        # the Hub carries the update as a PEFT adapter: the same tensors under PEFT's names
        expected = generalist_state_dict(client.model, 0, update.shared) if transport == "hub" else update.shared
        assert tensors.keys() == expected.keys() and tensors
        for key, value in expected.items():
            assert torch.equal(tensors[key], value), (transport, client.client_id, key)
        # what the client trained stays with it; clipped, the update is not what it trained
        trained = partition_state_dict(client.latest_state(1)[0].parameters, client.spec.strategy)[0]
        if private:
            assert update_norm(update.shared, start) == pytest.approx(CLIPPING, rel=1e-4)
            assert update_norm(trained, start) > 10 * CLIPPING
        else:
            assert all(torch.equal(trained[key], value) for key, value in update.shared.items())
