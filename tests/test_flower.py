"""The round protocol on Flower: a node answers the server's messages from its persisted state, the server strategy
keeps what passes its checks, and a simulation gives the Accelerate run's numbers."""

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from federated_setup import tiny_overrides, write_tiny_world
from flwr.app import ConfigRecord, RecordDict

from comigs_hf.cli import main as comigs
from comigs_hf.config import build_strategy, load_config
from comigs_hf.flower import CoMiGSStrategy, FederationIncomplete, shared_to_arrays, update_from_reply, update_to_reply
from comigs_hf.flower_app import build_node, node_settings
from comigs_hf.outputs import TEST_FIGURES
from comigs_hf.recipe import main as accelerate_run
from comigs_hf.server import InvalidUpdate, aggregate_updates
from comigs_hf.trainer import ClientUpdate, initial_shared_state

CLIENTS = "[cooking,finance,science,sports]"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_tiny_world(tmp_path_factory.mktemp("flower-world"))


def _recipe(world, output_dir: Path, **extra):
    return load_config(None, tiny_overrides(*world, output_dir, **{"data.client_values": CLIENTS, **extra}))


def _train_message(node, round_index: int, shared: dict, evaluate: bool = False) -> RecordDict:
    config = ConfigRecord({"round": round_index, "evaluate": evaluate})
    return RecordDict({"arrays": shared_to_arrays(shared), "config": config})


def _global(node, cfg) -> dict:
    return initial_shared_state(node.model, node.strategy, node.num_specialists, cfg.seed, node.top_k)


# ---- the node ------------------------------------------------------------------------------------------------------
def test_node_sends_the_saved_update_again_for_a_round_it_already_trained(world, tmp_path):
    cfg = _recipe(world, tmp_path / "out")
    node = build_node(cfg, 1, tmp_path / "nodes")
    shared = _global(node, cfg)
    first = update_from_reply(node.train(_train_message(node, 1, shared, evaluate=True)), shared, 4, 1)
    saved = torch.load(node.state_path, weights_only=True)
    again = update_from_reply(node.train(_train_message(node, 1, shared, evaluate=True)), shared, 4, 1)
    assert torch.load(node.state_path, weights_only=True)["state"]["expert_steps"] == saved["state"]["expert_steps"]
    assert first[1] == again[1] == "finance" and first[2] == again[2] and "test_ppl" in first[2]
    assert first[0].metrics == again[0].metrics
    assert all(torch.equal(first[0].shared[key], again[0].shared[key]) for key in shared)


def test_node_that_sat_out_rounds_trains_from_the_global_it_receives(world, tmp_path):
    cfg = _recipe(world, tmp_path / "out")
    node = build_node(cfg, 0, tmp_path / "nodes")
    shared = _global(node, cfg)
    update_from_reply(node.train(_train_message(node, 1, shared)), shared, 4, 1)
    update, _, evaluation = update_from_reply(node.train(_train_message(node, 3, shared)), shared, 4, 3)
    assert update.round == 3 and evaluation is None
    assert torch.load(node.state_path, weights_only=True)["round"] == 3
    with pytest.raises(ValueError, match="trained up to round 3"):
        node.train(_train_message(node, 2, shared))


def test_node_refuses_a_state_saved_by_another_federation(world, tmp_path):
    cfg = _recipe(world, tmp_path / "out")
    node = build_node(cfg, 2, tmp_path / "nodes")
    shared = _global(node, cfg)
    node.train(_train_message(node, 1, shared))
    other = build_node(_recipe(world, tmp_path / "out", seed=7), 2, tmp_path / "nodes")
    with pytest.raises(ValueError, match="another federation or recipe: seed=0, now 7"):
        other.train(_train_message(other, 2, shared))


def test_node_refuses_a_global_that_does_not_fit_its_layout(world, tmp_path):
    cfg = _recipe(world, tmp_path / "out")
    node = build_node(cfg, 3, tmp_path / "nodes")
    shared = _global(node, cfg)
    key = sorted(shared)[0]
    wrong = {**shared, key: torch.zeros(shared[key].shape[0] + 1, *shared[key].shape[1:])}
    with pytest.raises(InvalidUpdate, match="'server'.*declares"):
        node.train(_train_message(node, 1, wrong))
    poisoned = {**shared, key: torch.full_like(shared[key], float("nan"))}
    with pytest.raises(InvalidUpdate, match="NaN"):
        node.train(_train_message(node, 1, poisoned))
    assert not node.state_path.exists()  # nothing trained, nothing saved


def test_node_config_may_point_at_its_own_data_and_nothing_else(world, tmp_path):
    cfg = _recipe(world, tmp_path / "out")
    own, client, state_dir = node_settings(cfg, {"partition-id": 2, "overrides": "data.max_records_per_client=30"})
    assert (own.data.max_records_per_client, client, state_dir) == (30, 2, tmp_path / "out" / "nodes")
    assert own.training == cfg.training and own.model == cfg.model
    with pytest.raises(ValueError, match="data.\\* keys and output_dir only.*training.local_steps=9"):
        node_settings(cfg, {"partition-id": 0, "overrides": "training.local_steps=9"})
    with pytest.raises(ValueError, match="no partition-id"):
        node_settings(cfg, {})
    with pytest.raises(ValueError, match="partition-id must be an integer >= 0"):
        node_settings(cfg, {"partition-id": -1})


# ---- the server strategy -------------------------------------------------------------------------------------------
@dataclass
class _Reply:
    """What the strategy reads of a Flower reply: its sender, its content, or its error."""

    src_node_id: int
    content: RecordDict | None = None
    reason: str | None = None
    metadata: object = field(init=False)
    error: object = field(init=False)

    def __post_init__(self):
        self.metadata = self
        self.error = self

    def has_error(self) -> bool:
        return self.reason is not None


REFERENCE = {
    "model.layers.0.mlp.generalist_0.lora_A.weight": torch.zeros(2, 4),
    "model.layers.0.mlp.generalist_0.lora_B.weight": torch.zeros(4, 2),
}


def _update(client_id: int, value: float) -> ClientUpdate:
    shared = {key: torch.full_like(tensor, value) for key, tensor in REFERENCE.items()}
    return ClientUpdate(client_id, 1, shared, 100 * (client_id + 1), {"train_loss": 3.0, "router_loss": None})


def _strategy(**kwargs) -> CoMiGSStrategy:
    cfg = load_config(None, ["strategy=comigs"])
    server = CoMiGSStrategy(build_strategy(cfg), REFERENCE, 4, rounds=2, eval_every=1, **kwargs)
    server._sent = {10 + client: client for client in range(4)}  # node 10 + i was sent client i's round
    return server


def test_strategy_drops_a_hostile_update_and_aggregates_the_others_in_client_order():
    server = _strategy(min_train_nodes=3)
    honest = [_update(client, float(client)) for client in (2, 0, 1)]
    replies = [_Reply(10 + u.client_id, update_to_reply(u, f"c{u.client_id}")) for u in honest]
    replies.append(_Reply(13, update_to_reply(_update(3, 5e6), "c3")))  # beyond any trained value
    arrays, totals = server.aggregate_train(1, replies)
    expected = aggregate_updates(server.strategy, sorted(honest, key=lambda u: u.client_id), REFERENCE)
    for key, tensor in expected.items():
        assert torch.equal(server.shared[key], tensor)
    assert [row["client_id"] for row in server._round["clients"]] == [0, 1, 2] and totals["clients"] == 3


def test_strategy_refuses_a_node_replying_as_another_client():
    server = _strategy(min_train_nodes=3)
    replies = [_Reply(10 + c, update_to_reply(_update(c, 1.0), "c")) for c in range(3)]
    replies.append(_Reply(13, update_to_reply(_update(0, 9.0), "impostor")))  # node of client 3 sends as client 0
    server.aggregate_train(1, replies)
    assert [row["client_id"] for row in server._round["clients"]] == [0, 1, 2]
    assert torch.equal(server.shared[sorted(REFERENCE)[0]], torch.ones(2, 4))


def test_a_round_with_fewer_usable_updates_than_min_train_nodes_fails_naming_who_is_missing():
    server = _strategy()  # every client by default
    replies = [_Reply(10 + c, update_to_reply(_update(c, 1.0), "c")) for c in range(2)]
    replies.append(_Reply(12, reason="the ClientApp raised"))
    with pytest.raises(FederationIncomplete, match=r"2 usable updates \(clients \[0, 1\]\).*min_train_nodes=4"):
        server.aggregate_train(1, replies)


def test_strategy_refuses_a_minimum_beyond_the_federation():
    with pytest.raises(ValueError, match=r"min_train_nodes must be in \[1, 4\]"):
        _strategy(min_train_nodes=5)


# ---- the simulation engine -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_flower_simulation_gives_the_accelerate_run_per_client_metrics(world, tmp_path):
    extra = {"data.client_values": CLIENTS, "evaluation.before_aggregation": "true", "save_models": "true"}
    accelerate = accelerate_run(tiny_overrides(*world, tmp_path / "accelerate", **extra))
    assert comigs(["flower-sim", *tiny_overrides(*world, tmp_path / "flower", **extra)]) == 0
    flower = json.loads((tmp_path / "flower" / "results.json").read_text())
    assert flower["transport"] == "flower" and accelerate["transport"] == "accelerate"
    figures = [key for key in TEST_FIGURES if not key.startswith("ood_") and key in accelerate["clients"][0]]
    assert "test_ppl_before_aggregation" in figures and "paper_test_ppl" in figures
    for ours, theirs in zip(flower["clients"], accelerate["clients"]):
        assert ours["name"] == theirs["name"]
        for key in figures + ["bytes_sent", "bytes_received", "tokens_seen", "train_tokens"]:
            assert ours[key] == pytest.approx(theirs[key], rel=1e-5), (ours["name"], key)
    for name in ("curves.csv", "global_generalist/adapter_model.safetensors"):
        assert (tmp_path / "flower" / name).is_file()
    saved = sorted(path.name for path in (tmp_path / "flower" / "clients").iterdir())
    assert saved == sorted(path.name for path in (tmp_path / "accelerate" / "clients").iterdir())
    with pytest.raises(SystemExit):  # the node states of that run are not overwritten by another
        comigs(["flower-sim", *tiny_overrides(*world, tmp_path / "flower", **extra)])
