"""Federated rounds: what is shared, equality across process counts, resume after a kill, the alternation."""

import dataclasses
import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from federated_setup import finished, launch, tiny_overrides
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_post_hook

from comigs_hf import parameter_role
from comigs_hf.algorithms import PCL, get_strategy
from comigs_hf.algorithms import pcl as pcl_module
from comigs_hf.algorithms.hetlora import prune_ranks
from comigs_hf.client_state import activate_client, client_folder_name
from comigs_hf.config import load_config
from comigs_hf.recipe import run, setup_federation
from comigs_hf.server import sample_clients
from comigs_hf.trainer import ClientUpdate, train_client_round
from comigs_hf.transports import accelerate as rounds_module


@pytest.fixture
def exchanged(monkeypatch) -> list[list[ClientUpdate]]:
    """What every round's exchange gave every rank, appended as the rounds run."""
    seen = []
    exchange = rounds_module._exchange

    def audited(accelerator, updates):
        seen.append(exchange(accelerator, updates))
        return seen[-1]

    monkeypatch.setattr(rounds_module, "_exchange", audited)
    return seen


def states(federation) -> dict:
    """Every training client's state as it is saved now (a client holds none in memory between its calls)."""
    return {client.client_id: client.latest_state()[0] for client in federation.clients}


def config(world, output_dir, **extra):
    return load_config(None, tiny_overrides(*world, output_dir, **extra))


def client_metrics(output_dir: Path, num_processes: int = 1) -> list[tuple]:
    results = json.loads((output_dir / "results.json").read_text())
    # processes that never joined one group would each run every client, and still agree on every metric
    assert results["num_processes"] == num_processes
    return [(c["name"], c["test_loss"], c["bytes_sent"], c["train_tokens"]) for c in results["clients"]]


def assert_same_metrics(a, b):
    assert [x[0] for x in a] == [x[0] for x in b]
    for left, right in zip(a, b):
        assert left[2:] == right[2:]
        assert left[1] == pytest.approx(right[1], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("strategy", ["comigs", "fedavg", "local"])
def test_only_the_strategy_s_shared_tensors_reach_the_collective(world, tmp_path, monkeypatch, strategy):
    payloads = []
    exchange = rounds_module._exchange

    def audited(accelerator, updates):
        payloads.append(updates)
        return exchange(accelerator, updates)

    monkeypatch.setattr(rounds_module, "_exchange", audited)
    cfg = config(world, tmp_path / "out", strategy=strategy, rounds=2, eval_every=2)
    results = run(cfg, Accelerator(cpu=True))
    shared_roles = get_strategy(strategy).shared_roles
    assert len(payloads) == 2
    for updates in payloads:
        for update in updates:
            assert type(update) is ClientUpdate
            outside = {f.name: getattr(update, f.name) for f in dataclasses.fields(update) if f.name != "shared"}
            assert {k: v for k, v in outside.items() if isinstance(v, torch.Tensor)} == {}
            assert all(isinstance(v, (int, float, type(None))) for v in update.metrics.values()), update.metrics
            assert set(update.metrics) == {"train_loss", "router_loss", "tokens_seen"}
            assert {parameter_role(k) for k in update.shared} == set(shared_roles)
    if strategy == "local":
        assert all(c["bytes_sent"] == 0 and c["bytes_received"] == 0 for c in results["clients"])


def test_comigs_1g1s_sends_exactly_the_generalist_tensors_each_round(world, tmp_path):
    cfg = config(world, tmp_path / "out", rounds=2, eval_every=2)
    results = run(cfg, Accelerator(cpu=True))
    model = setup_federation(config(world, tmp_path / "again"), Accelerator(cpu=True)).model
    generalist_bytes = sum(p.numel() * p.element_size() for _, p in model.named_parameters_by_role("generalist"))
    expert_bytes = sum(
        p.numel() * p.element_size() for _, p in model.named_parameters_by_role("generalist", "specialist")
    )
    assert generalist_bytes * 2 == expert_bytes  # half of what FedAvg over both experts would send
    for client in results["clients"]:
        assert client["bytes_sent"] == client["bytes_received"] == 2 * generalist_bytes
    rows = (tmp_path / "out" / "curves.csv").read_text().splitlines()
    assert rows[0].startswith("round,client_id,client,train_loss") and len(rows) == 1 + 2 * 4


def test_outputs_hold_results_curves_models_generalist_and_plots(world, tmp_path):
    cfg = config(world, tmp_path / "out", rounds=1, plots=True)
    run(cfg, Accelerator(cpu=True))
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    assert {"strategy", "rounds", "seed", "clients", "mean_test_ppl"} <= set(results)
    assert {"id", "num_specialists", "train_tokens", "test_loss", "test_ppl", "bytes_sent", "bytes_received"} <= set(
        results["clients"][0]
    )
    assert sorted(os.listdir(out / "clients")) == ["0-cooking", "1-finance", "2-science", "3-sports"]
    assert (out / "global_generalist" / "adapter_model.safetensors").is_file()
    assert (out / "training_curves.png").stat().st_size > 0 and (out / "routing.png").stat().st_size > 0


def test_router_steps_zero_never_change_the_router(world, tmp_path):
    cfg = config(world, tmp_path / "out", **{"training.router_steps": 0, "save_models": False})
    federation = setup_federation(cfg, Accelerator(cpu=True))
    before = {i: {k: v.clone() for k, v in s.parameters.items()} for i, s in states(federation).items()}
    for round_index in (1, 2):
        rounds_module.run_round(federation, round_index, Accelerator(cpu=True))
    for client_id, state in states(federation).items():
        for key, value in before[client_id].items():
            if parameter_role(key) == "router":
                assert torch.equal(state.parameters[key], value), key
        assert any(
            not torch.equal(state.parameters[k], v)
            for k, v in before[client_id].items()
            if parameter_role(k) == "specialist"
        )


def test_expert_steps_never_touch_the_router_and_router_steps_never_touch_experts(world, tmp_path):
    cfg = config(
        world,
        tmp_path / "out",
        **{"training.local_steps": 2, "training.router_update_every": 1, "training.router_steps": 2},
    )
    federation = setup_federation(cfg, Accelerator(cpu=True))
    model, state = federation.model, federation.clients[0].latest_state()[0]
    activate_client(model, state, federation.shared)
    names = {id(p): n for n, p in model.named_parameters()}
    changes = []
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def record(optimizer, args, kwargs):
        owned = {names[id(p)] for group in optimizer.param_groups for p in group["params"]}
        changed = {n for n, p in model.named_parameters() if n in snapshot and not torch.equal(p, snapshot[n])}
        changes.append((owned, changed))
        snapshot.update({n: model.get_parameter(n).detach().clone() for n in changed})

    handle = register_optimizer_step_post_hook(record)
    try:
        train_client_round(model, state, federation.clients[0].data, cfg.training, 10, Accelerator(cpu=True))
    finally:
        handle.remove()
    assert len(changes) == 2 + 2 * 2  # each expert step is followed by a router phase of 2 steps
    roles = [{parameter_role(n) for n in owned} for owned, _ in changes]
    assert roles[0] == {"generalist", "specialist"} and roles[1] == {"router"}
    for owned, changed in changes:
        assert changed and changed <= owned


def test_impossible_combinations_are_rejected_before_training(world, tmp_path, capsys):
    from comigs_hf.recipe import main

    with pytest.raises(SystemExit) as exit_info:
        main(tiny_overrides(*world, tmp_path / "out", strategy="fedavg", **{"model.num_specialists": "[0,1,2,3]"}))
    assert exit_info.value.code == 2
    assert "num_specialists" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.xdist_group("two_process_launches")  # one worker runs them in turn: never two gloo jobs at once
def test_one_and_two_processes_give_the_same_metrics(world, tmp_path):
    one = launch(world, tmp_path / "p1", num_processes=1, **{"model.num_specialists": "[0,1,2,1]", "model.top_k": 1})
    finished(one)
    two = launch(world, tmp_path / "p2", num_processes=2, **{"model.num_specialists": "[0,1,2,1]", "model.top_k": 1})
    finished(two)
    assert_same_metrics(client_metrics(tmp_path / "p1"), client_metrics(tmp_path / "p2", num_processes=2))


@pytest.mark.slow
def test_a_run_killed_mid_round_resumes_to_the_same_final_metrics(world, tmp_path):
    extra = {"rounds": 4, "save_models": False, "training.local_steps": 3}
    finished(launch(world, tmp_path / "clean", **extra))
    victim = launch(world, tmp_path / "killed", direct=True, **extra)
    pointer = tmp_path / "killed" / "checkpoints" / "latest.json"
    deadline = time.time() + 300
    while time.time() < deadline and not (pointer.is_file() and json.loads(pointer.read_text())["round"] >= 2):
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    checkpointed = json.loads(pointer.read_text())["round"]
    assert checkpointed < 4 and not (tmp_path / "killed" / "results.json").exists()
    output = finished(launch(world, tmp_path / "killed", resume="true", **extra))
    assert f"{checkpointed}/4" in output  # the progress bar starts after the last complete round
    assert_same_metrics(client_metrics(tmp_path / "clean"), client_metrics(tmp_path / "killed"))


def test_clients_are_weighted_by_the_tokens_of_their_training_split(world, tmp_path, exchanged):
    caps = [32, 64, 96, 128]  # tokens: whole blocks of 16
    cfg = config(world, tmp_path / "out", strategy="fedavg", **{"data.max_train_tokens": str(caps)})
    federation = setup_federation(cfg, Accelerator(cpu=True))
    rounds_module.run_round(federation, 1, Accelerator(cpu=True))
    updates = exchanged[0]
    assert [update.train_tokens for update in updates] == caps == [c.data.num_train_tokens for c in federation.clients]
    tokens_seen = cfg.training.local_steps * cfg.training.batch_size * cfg.data.block_size
    assert all(update.metrics["tokens_seen"] == tokens_seen for update in updates)  # the same for every client
    for key, value in federation.shared.items():
        expected = sum(cap * update.shared[key].double() for cap, update in zip(caps, updates)) / sum(caps)
        torch.testing.assert_close(value, expected.float(), msg=key)


def test_results_record_the_split_size_and_the_tokens_seen(world, tmp_path):
    cfg = config(world, tmp_path / "out", rounds=2, **{"data.max_train_tokens": "[32, 64, 96, 128]"})
    results = run(cfg, Accelerator(cpu=True))
    assert [c["train_tokens"] for c in results["clients"]] == [32, 64, 96, 128]
    per_round = cfg.training.local_steps * cfg.training.batch_size * cfg.data.block_size
    assert [c["tokens_seen"] for c in results["clients"]] == [2 * per_round] * 4


def test_clients_per_round_trains_the_drawn_clients_and_evaluates_everyone_with_their_own_state(world, tmp_path):
    cfg = config(world, tmp_path / "out", rounds=4, eval_every=2, clients_per_round=2)
    federation = setup_federation(cfg, Accelerator(cpu=True))
    for round_index in range(1, 5):
        asked = sample_clients(4, 2, cfg.seed, round_index)
        held = states(federation)
        before = {c: {k: v.clone() for k, v in s.parameters.items() if "specialist" in k} for c, s in held.items()}
        record = rounds_module.run_round(federation, round_index, Accelerator(cpu=True))
        federation.records.append(record)
        trained = [row["client_id"] for row in record["clients"] if row["trained"]]
        assert trained == asked
        after = states(federation)
        for client, specialists in before.items():  # a client that sat the round out kept its private experts
            changed = any(not torch.equal(v, after[client].parameters[k]) for k, v in specialists.items())
            assert changed == (client in asked), (round_index, client)
        if round_index % 2 == 0:  # evaluated: every client, those that sat out in a row of their own
            assert [row["client_id"] for row in record["clients"]] == [0, 1, 2, 3]
            assert all("test_ppl" in row for row in record["clients"])
            assert all("train_loss" not in row for row in record["clients"] if not row["trained"])
        else:
            assert [row["client_id"] for row in record["clients"]] == asked
    results = run(config(world, tmp_path / "run", rounds=4, eval_every=2, clients_per_round=2), Accelerator(cpu=True))
    per_round = cfg.training.local_steps * cfg.training.batch_size * cfg.data.block_size
    for client in results["clients"]:
        times = sum(client["id"] in sample_clients(4, 2, cfg.seed, t) for t in range(1, 5))
        assert client["rounds_trained"] == times and client["tokens_seen"] == times * per_round
        assert client["test_ppl"] is not None
    # traffic is counted in the rounds a client trained: the same generalist bytes each time
    per_round_bytes = {c["bytes_sent"] / c["rounds_trained"] for c in results["clients"] if c["rounds_trained"]}
    assert len(per_round_bytes) == 1


def test_clients_per_round_beyond_the_clients_or_with_pooling_is_refused_before_training(world, tmp_path):
    with pytest.raises(ValueError, match="clients_per_round=5 is more than the 4 clients"):
        config(
            world, tmp_path / "out", clients_per_round=5, **{"data.client_values": "[cooking,finance,science,sports]"}
        )
    with pytest.raises(ValueError, match="trains one model on everyone's pooled data"):
        config(world, tmp_path / "out", clients_per_round=2, strategy="centralized")


def test_capped_top_k_gives_each_heterogeneous_client_min_of_top_k_and_its_experts(world, tmp_path):
    cfg = config(
        world, tmp_path / "out", rounds=1, save_models=False,
        **{"model.num_specialists": "[0,1,2,3]", "model.top_k": 2, "model.cap_top_k": "true"},
    )  # fmt: skip
    results = run(cfg, Accelerator(cpu=True))
    assert [(c["num_specialists"], c["top_k"]) for c in results["clients"]] == [(0, 1), (1, 2), (2, 2), (3, 2)]
    assert all(c["test_loss"] > 0 for c in results["clients"])
    # what a client sends is its expert payload plus, here, nothing else: comigs shares the generalist only
    assert all(c["expert_params_sent"] == c["params_sent"] > 0 for c in results["clients"])


def test_without_the_cap_a_top_k_above_a_clients_experts_is_refused_naming_it(world, tmp_path):
    with pytest.raises(ValueError, match=r"num_specialists=0 \(clients \[0\]\)"):
        config(world, tmp_path / "out", **{"model.num_specialists": "[0,1,2,3]", "model.top_k": 2})


def test_a_run_starts_from_the_clients_a_previous_run_saved(world, tmp_path):
    run(config(world, tmp_path / "first", rounds=1), Accelerator(cpu=True))
    clients = tmp_path / "first" / "clients"
    federation = setup_federation(config(world, tmp_path / "second", init_from=str(clients)), Accelerator(cpu=True))
    assert len(federation.clients) > 1
    for client_id, state in states(federation).items():
        saved = load_file(clients / client_folder_name(client_id, state.name) / "model.safetensors")
        assert state.parameters.keys() <= saved.keys()
        assert all(torch.equal(value, saved[key]) for key, value in state.parameters.items()), client_id
    first = load_file(clients / client_folder_name(0, federation.clients[0].spec.name) / "model.safetensors")
    assert federation.shared and all(torch.equal(value, first[key]) for key, value in federation.shared.items())


def test_init_from_a_folder_without_a_client_names_what_is_missing(world, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty/0-.* holds no saved client"):
        setup_federation(config(world, tmp_path / "run", init_from=str(tmp_path / "empty")), Accelerator(cpu=True))


# ---- resume: the checkpoint's run, the last two rounds, unreadable files ------------------------------------------
def ran(world, output_dir, **extra) -> dict:
    return run(config(world, output_dir, save_models=False, **extra), Accelerator(cpu=True))


@pytest.fixture(scope="module")
def two_rounds(world, tmp_path_factory) -> list[float]:
    """The test losses of an uninterrupted 2-round run."""
    return [c["test_loss"] for c in ran(world, tmp_path_factory.mktemp("clean"), rounds=2)["clients"]]


def test_a_resume_with_other_settings_is_refused_naming_the_keys(world, tmp_path):
    ran(world, tmp_path / "out", rounds=1)
    changes = {"strategy": "local", "model.num_specialists": 2, "seed": 1, "data.block_size": 8}
    for key, value in changes.items():
        with pytest.raises(ValueError, match=rf"differing keys: {key}\b"):
            ran(world, tmp_path / "out", rounds=1, resume="true", **{key: value})
    assert json.loads((tmp_path / "out" / "results.json").read_text())["strategy"] == "comigs"  # untouched


def test_a_resume_may_extend_the_rounds_and_keeps_the_last_two_checkpoints(world, tmp_path):
    ran(world, tmp_path / "out", rounds=1)
    extended = ran(world, tmp_path / "out", rounds=3, resume="true")  # (the cosine schedule is now over 3 rounds)
    assert extended["rounds"] == 3
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == [
        "clients",  # each client's last states, beside the rounds' global states
        "latest.json",
        "round-2",
        "round-3",
    ]
    with pytest.raises(ValueError, match="holds round 3, past rounds=2"):
        ran(world, tmp_path / "out", rounds=2, resume="true")


def test_a_corrupt_last_checkpoint_falls_back_to_the_one_before_naming_the_file(world, tmp_path, caplog, two_rounds):
    ran(world, tmp_path / "out", rounds=2)
    checkpoints = tmp_path / "out" / "checkpoints"
    (checkpoints / "clients" / "client-1" / "round-2.pt").write_bytes(b"garbage")
    with caplog.at_level("WARNING", logger="comigs_hf.transports.accelerate"):
        resumed = ran(world, tmp_path / "out", rounds=2, resume="true")  # round 2 again, from round 1
    assert "client-1/round-2.pt is unreadable" in caplog.text
    assert [c["test_loss"] for c in resumed["clients"]] == pytest.approx(two_rounds, rel=1e-5)
    (checkpoints / "round-2" / "global.safetensors").write_bytes(b"\x00" * 7)
    (checkpoints / "round-1" / "state.json").write_text("{")
    with pytest.raises(ValueError, match=r"round-2/global\.safetensors is unreadable.*round-1/state\.json is unread"):
        ran(world, tmp_path / "out", rounds=3, resume="true")


def test_a_missing_pointer_resumes_from_the_newest_round_and_a_fresh_start_never_overwrites(
    world, tmp_path, caplog, two_rounds
):
    ran(world, tmp_path / "out", rounds=2)
    shutil.rmtree(tmp_path / "out" / "checkpoints" / "round-2")  # as if killed between the round and its pointer
    (tmp_path / "out" / "checkpoints" / "latest.json").unlink()
    with pytest.raises(ValueError, match="holds the checkpoints of a run .*pass resume=true"):
        ran(world, tmp_path / "out", rounds=2)
    resumed = ran(world, tmp_path / "out", rounds=2, resume="true")
    assert [c["test_loss"] for c in resumed["clients"]] == pytest.approx(two_rounds, rel=1e-5)
    with caplog.at_level("WARNING", logger="comigs_hf.transports.accelerate"):
        ran(world, tmp_path / "empty", rounds=1, resume="true")
    assert "holds no checkpoint: starting at round 1" in caplog.text


# ---- federated-LoRA baselines that share one LoRA factor ------------------------------------------------------
@pytest.mark.parametrize(
    ("strategy", "sent", "kept"), [("ffa_lora", "lora_B", "lora_A"), ("fedsa_lora", "lora_A", "lora_B")]
)
def test_single_factor_strategies_send_one_factor_and_ffa_lora_never_trains_its_shared_a(
    world, tmp_path, exchanged, strategy, sent, kept
):
    one_expert = {"model.num_specialists": 0, "model.top_k": 1, "model.attention_lora": True}  # the papers' runs
    cfg = config(world, tmp_path / "out", strategy=strategy, **one_expert)
    federation = setup_federation(cfg, Accelerator(cpu=True))
    start = {i: {k: v.clone() for k, v in state.parameters.items()} for i, state in states(federation).items()}
    for round_index in (1, 2):
        rounds_module.run_round(federation, round_index, Accelerator(cpu=True))
    for updates in exchanged:
        assert all(update.shared and all(f".{sent}." in key for key in update.shared) for update in updates)
    kept_by_client = [{k: v for k, v in s.parameters.items() if f".{kept}." in k} for s in states(federation).values()]
    assert kept_by_client[0]
    if strategy == "ffa_lora":  # every client's A: the one shared initialisation, never trained
        for client_id, kept_state in enumerate(kept_by_client):
            assert all(
                torch.equal(v, start[0][k]) and torch.equal(v, start[client_id][k]) for k, v in kept_state.items()
            )
        assert any(not torch.equal(v, start[0][k]) for k, v in federation.shared.items())  # B trained and averaged
    else:  # FedSa-LoRA: each client's B is its own
        first, second = kept_by_client[0], kept_by_client[1]
        assert any(not torch.equal(first[k], second[k]) for k in first)


# ---- heterogeneous ranks: FlexLoRA and HetLoRA -----------------------------------------------------------------
RANKED = {"model.num_specialists": 0, "model.top_k": 1, "model.lora_r": "[2,4,4,4]"}  # the papers' runs: one expert


def expert_factors(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.role_state_dict("generalist").items() if ".lora_" in k}


@pytest.mark.parametrize("strategy", ["flexlora", "hetlora", "fedavg"])
def test_clients_of_lower_rank_train_send_and_take_back_their_leading_slices_only(world, tmp_path, strategy):
    federation = setup_federation(config(world, tmp_path / "out", strategy=strategy, **RANKED), Accelerator(cpu=True))
    assert federation.model.config.lora_r == 4
    for round_index in (1, 2):
        record = rounds_module.run_round(federation, round_index, Accelerator(cpu=True))
    rows = record["clients"]
    # rank 2 of 4 sends half of each A and B (the router is not shared: no router)
    assert rows[0]["params_sent"] * 2 == rows[1]["params_sent"]
    assert rows[0]["bytes_received"] * 2 == rows[1]["bytes_received"]
    state = states(federation)[0]
    assert set(state.lora_ranks.values()) <= {1, 2}  # HetLoRA may have pruned 2 to int(0.99 * 2) = 1
    activate_client(federation.model, state, federation.shared)
    held = expert_factors(federation.model)
    for key_a, rank in state.lora_ranks.items():
        key_b = key_a.replace(".lora_A.", ".lora_B.")
        assert not held[key_a][rank:].any() and not held[key_b][:, rank:].any()
        torch.testing.assert_close(held[key_a][:rank], federation.shared[key_a][:rank])
    if strategy == "flexlora":  # the global's leading slices: the best rank-2 approximation of its product
        key_a = next(iter(state.lora_ranks))
        key_b = key_a.replace(".lora_A.", ".lora_B.")
        full = federation.shared[key_b] @ federation.shared[key_a]
        u, s, vh = torch.linalg.svd(full)
        torch.testing.assert_close(held[key_b] @ held[key_a], (u[:, :2] * s[:2]) @ vh[:2], atol=1e-5, rtol=1e-4)


def test_results_record_each_clients_rank_and_its_trainable_and_active_parameters(world, tmp_path):
    cfg = config(world, tmp_path / "out", strategy="flexlora", rounds=1, save_models=False, **RANKED)
    results = run(cfg, Accelerator(cpu=True))
    clients = results["clients"]
    assert [c["lora_r"] for c in clients] == [2, 4, 4, 4]
    # one expert, no router: trainable = active, twice as many at rank 4 as at rank 2
    assert clients[0]["trainable_params"] == clients[0]["active_params"]
    assert clients[1]["trainable_params"] == 2 * clients[0]["trainable_params"]
    assert clients[1]["params_sent"] == clients[1]["trainable_params"]  # everything it trains is shared, once


def test_hetlora_self_pruning_shrinks_the_rank_of_a_tail_that_fell_below_the_global(world, tmp_path):
    extra = {**RANKED, "model.lora_r": 4, "rank_pruning_coef": 5.0}  # a strong regulariser drives the tails down
    federation = setup_federation(config(world, tmp_path / "out", strategy="hetlora", **extra), Accelerator(cpu=True))
    for round_index in (1, 2, 3):
        rounds_module.run_round(federation, round_index, Accelerator(cpu=True))
    ranks = [rank for state in states(federation).values() for rank in state.lora_ranks.values()]
    assert ranks and max(ranks) < 4  # round 1 never prunes (the global's B is zero), rounds 2 and 3 cut 4 to 3 to 2
    for state in states(federation).values():  # a cut rank stays cut: the client never takes the global's tail back
        activate_client(federation.model, state, federation.shared)
        held = expert_factors(federation.model)
        assert all(not held[key_a][rank:].any() for key_a, rank in state.lora_ranks.items())


def test_prune_ranks_cuts_an_adapter_whose_tail_shrank_by_hand():
    key_a, key_b = "m.mlp.base_mlp.c_fc.lora_A.generalist_0.weight", "m.mlp.base_mlp.c_fc.lora_B.generalist_0.weight"
    start = {key_a: torch.ones(4, 3), key_b: torch.ones(5, 4)}
    shrunk = {key_a: torch.ones(4, 3), key_b: torch.ones(5, 4)}
    shrunk[key_b][:, 3] = 0.5  # the tail at strength 0.75: rank index 3 (int(0.75 * 4) = 3)
    assert prune_ranks(shrunk, start, {}, 4, 0.75) == {key_a: 3}
    assert prune_ranks(start, start, {}, 4, 0.75) == {}  # an unchanged tail stays
    assert prune_ranks(shrunk, start, {key_a: 1}, 4, 0.75) == {key_a: 1}  # int(0.75 * 1) = 0: never below rank 1


@pytest.mark.slow
@pytest.mark.xdist_group("two_process_launches")
@pytest.mark.parametrize(
    "extra",
    [
        {**RANKED, "strategy": "flexlora", "rounds": 2},
        {**RANKED, "strategy": "hetlora", "rounds": 2},
        {"strategy": "pcl", "rounds": 5},  # PCL first combines in round 5
        {"strategy": "fd_lora", "rounds": 2},
        {"strategy": "ffa_lora", "rounds": 2, "model.num_specialists": 0, "model.top_k": 1},
        {"strategy": "fedsa_lora", "rounds": 2, "model.num_specialists": 0, "model.top_k": 1},
    ],
    ids=["flexlora", "hetlora", "pcl", "fd_lora", "ffa_lora", "fedsa_lora"],
)
def test_federated_lora_baselines_give_the_same_metrics_on_one_and_two_processes(world, tmp_path, extra):
    extra = {**extra, "save_models": False}
    # one process in this one (a launch costs a fresh interpreter), two through `accelerate launch`
    run(config(world, tmp_path / "p1", **extra), Accelerator(cpu=True))
    finished(launch(world, tmp_path / "p2", num_processes=2, **extra))
    assert_same_metrics(client_metrics(tmp_path / "p1"), client_metrics(tmp_path / "p2", num_processes=2))


# ---- PCL: each client combines every client's update itself ---------------------------------------------------
def test_pcl_combines_only_on_its_schedule_with_each_clients_own_trust_weights(
    world, tmp_path, exchanged, monkeypatch
):
    federation = setup_federation(config(world, tmp_path / "out", strategy="pcl", rounds=4), Accelerator(cpu=True))
    assert federation.shared == {}  # no global state, ever
    sooner = dataclasses.replace(federation.strategy, algorithms=(PCL(from_round=2, every=2),))
    federation.strategy = sooner
    for client in federation.clients:
        client.spec = dataclasses.replace(client.spec, strategy=sooner)
    scored = []
    trust = pcl_module.client_trust_weights

    def recorded(model, state, validation, updates, cfg, accelerator):
        scored.append((state.client_id, trust(model, state, validation, updates, cfg, accelerator)))
        return scored[-1][1]

    monkeypatch.setattr(pcl_module, "client_trust_weights", recorded)
    rows = {}
    for round_index in (1, 2, 3, 4):
        rows[round_index] = rounds_module.run_round(federation, round_index, Accelerator(cpu=True))["clients"]
    # rounds 1 and 3 send nothing; rounds 2 and 4 every client's experts, each received by the 3 others
    assert [bool(u.shared) for updates in exchanged for u in updates] == [False] * 4 + [True] * 4 + [False] * 4 + [
        True
    ] * 4
    assert all(row["bytes_sent"] == 0 == row["bytes_received"] for row in rows[1] + rows[3])
    assert all(row["bytes_received"] == 3 * row["bytes_sent"] > 0 for row in rows[2] + rows[4])
    assert [client_id for client_id, _ in scored] == [0, 1, 2, 3] * 2
    for client_id, (weights, perplexities) in scored:
        assert sum(weights) == pytest.approx(1.0)
        # its own experts fit its own validation split best: the largest weight is its own
        assert max(range(4), key=lambda j: weights[j]) == client_id
        assert perplexities.index(min(perplexities)) == client_id
    # after round 4 each client holds the trust-weighted mean of the four updates, with its own weights
    last = exchanged[-1]
    for client_id, (weights, _) in scored[-4:]:
        key = next(k for k in last[0].shared if ".lora_B." in k)
        expected = sum(w * update.shared[key].double() for w, update in zip(weights, last))
        torch.testing.assert_close(states(federation)[client_id].parameters[key].double(), expected)


def test_pcl_and_the_hub_refuse_each_other_saying_why(world, tmp_path):
    from comigs_hf.transports.hub import check_hub_strategy

    with pytest.raises(ValueError, match="has none: each client combines every client's tensors itself"):
        check_hub_strategy(get_strategy("pcl"))


# ---- FD-LoRA: a global and a local adapter, fused after the last round ---------------------------------------
def test_fd_lora_fuses_each_clients_experts_once_after_the_last_round(world, tmp_path, exchanged):
    cfg = config(world, tmp_path / "out", strategy="fd_lora", rounds=2)
    results = run(cfg, Accelerator(cpu=True))
    assert all(
        set(update.shared) and all(".generalist_0." in k for k in update.shared) for u in exchanged for update in u
    )
    for client in results["clients"]:
        weights = client["fusion_weights"]
        assert len(weights) == 2 and all(-1.0 <= w <= 1.0 for w in weights)
    # the saved client model mixes with its fusion weights, and evaluates to the reported figure
    client = results["clients"][0]
    saved = json.loads(
        (tmp_path / "out" / "clients" / client_folder_name(0, client["name"]) / "config.json").read_text()
    )
    assert saved["expert_weights"] == client["fusion_weights"]


def test_fd_lora_fusion_is_deterministic_under_a_seed_and_never_worse_than_training_mixing(world, tmp_path):
    from comigs_hf.algorithms.fd_lora import fusion_weights
    from comigs_hf.evaluation import evaluate_full_split

    federation = setup_federation(config(world, tmp_path / "out", strategy="fd_lora"), Accelerator(cpu=True))
    rounds_module.run_round(federation, 1, Accelerator(cpu=True))
    state, data = federation.clients[0].latest_state()[0], federation.clients[0].data
    (fusion,) = federation.strategy.algorithms
    searches = []
    for seed in (7, 7):
        activate_client(federation.model, state, federation.shared)
        searches.append(
            fusion_weights(
                federation.model, data.validation, fusion, federation.evaluation, Accelerator(cpu=True), seed
            )
        )
    assert searches[0] == searches[1]
    weights, objective = searches[0]
    activate_client(federation.model, state, federation.shared)  # mixing 1/2 each, as in training
    federation.model.eval()
    uniform = evaluate_full_split(federation.model, data.validation, federation.evaluation, Accelerator(cpu=True))
    assert objective <= uniform["test_loss"] + fusion.l1 * 1.0 + 1e-9
    federation.model.set_expert_weights(weights)
    fused = evaluate_full_split(federation.model, data.validation, federation.evaluation, Accelerator(cpu=True))
    assert objective == pytest.approx(fused["test_loss"] + fusion.l1 * sum(abs(w) for w in weights))
