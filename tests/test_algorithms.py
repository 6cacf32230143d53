"""An algorithm is one module: no transport and no round loop names one, and adding a baseline is one module plus one
registry line (FedProx, the worked example, runs here)."""

from __future__ import annotations

import ast
import dataclasses
import gc
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from federated_setup import tiny_overrides

import comigs_hf.algorithms as algorithms
from comigs_hf.algorithms import STRATEGIES, Algorithm, FedProx
from comigs_hf.algorithms.privacy import update_norm
from comigs_hf.config import load_config
from comigs_hf.recipe import setup_federation
from comigs_hf.trainer import ClientState
from comigs_hf.transports import accelerate as rounds_module

PACKAGE = Path(algorithms.__file__).resolve().parents[1]
# the round loop and every transport: what they may call is the protocol's points, never an algorithm
TRANSPORT_FILES = sorted((PACKAGE / "transports").rglob("*.py"))
# what used to be read by the transports: one flag per baseline on the strategy record
RETIRED_FLAGS = {
    "fusion_budget",
    "fusion_l1",
    "fusion_bound",
    "pool_clients",
    "pooled",
    "rank_pruning",
    "rank_pruning_coef",
    "combine_from_round",
    "combine_every",
    "combines_in_round",
    "dp_clipping_norm",
    "dp_noise_multiplier",
}


def algorithm_names() -> set[str]:
    """Every algorithm's class, module and setting (its dataclass fields) by name."""
    names = set(RETIRED_FLAGS)
    for value in vars(algorithms).values():
        if isinstance(value, type) and issubclass(value, Algorithm) and value is not Algorithm:
            names |= {value.__name__, value.__module__.rsplit(".", 1)[1]}
            names |= {f.name for f in dataclasses.fields(value)}
    return names


def identifiers(path: Path) -> set[str]:
    """The names a module's code reads: its names, attributes and imports (not its docstrings or comments)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Name):
            found.add(node.id)
        elif isinstance(node, ast.Attribute):
            found.add(node.attr)
        elif isinstance(node, ast.alias):
            found |= set(node.name.split("."))
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= set(node.module.split("."))
    return found


@pytest.mark.parametrize("path", TRANSPORT_FILES, ids=lambda path: str(path.relative_to(PACKAGE / "transports")))
def test_no_transport_nor_the_round_loop_names_an_algorithm(path):
    # an algorithm's settings that are also plain words (FD-LoRA's `bound`, PCL's `every`) count only as attributes
    words = {"bound", "every", "budget"}
    named = identifiers(path) & algorithm_names()
    assert named <= words, f"{path.name} names {sorted(named - words)}"
    attributes = {node.attr for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Attribute)}
    assert not attributes & words & algorithm_names(), f"{path.name} reads {sorted(attributes & words)}"


def test_the_check_sees_an_algorithm_named_in_a_transport(tmp_path):
    branch = tmp_path / "accelerate.py"
    branch.write_text("if strategy.fusion_budget:\n    fuse()\nfrom .algorithms.pcl import PCL\n")
    assert {"fusion_budget", "PCL", "pcl"} <= identifiers(branch) & algorithm_names()


# ---- the worked example: FedProx, one module and one registry line ---------------------------------------------
def fedprox_federation(world, output_dir, mu: float):
    cfg = load_config(None, tiny_overrides(*world, output_dir, strategy="fedprox", rounds=2, save_models=False))
    federation = setup_federation(cfg, Accelerator(cpu=True))
    strategy = dataclasses.replace(federation.strategy, algorithms=(FedProx(mu=mu),))
    federation.strategy = strategy
    for client in federation.clients:
        client.spec = dataclasses.replace(client.spec, strategy=strategy)
    return federation


def exchanged_updates(federation, monkeypatch) -> list[list]:
    """The two rounds' updates as the collective carried them."""
    seen = []
    exchange = rounds_module._exchange
    with monkeypatch.context() as patched:
        patched.setattr(rounds_module, "_exchange", lambda a, u: seen.append(exchange(a, u)) or seen[-1])
        for round_index in (1, 2):
            rounds_module.run_round(federation, round_index, Accelerator(cpu=True))
    return seen


def test_fedprox_is_a_registry_line_and_runs_on_the_round_protocol(world, tmp_path):
    assert STRATEGIES["fedprox"].algorithms == (FedProx(mu=0.01),)
    cfg = load_config(None, tiny_overrides(*world, tmp_path / "out", strategy="fedprox", rounds=1))
    federation = setup_federation(cfg, Accelerator(cpu=True))
    record = rounds_module.run_round(federation, 1, Accelerator(cpu=True))
    assert all(row["bytes_sent"] > 0 and row["test_loss"] > 0 for row in record["clients"])


def test_fedprox_without_its_term_is_fedavg_to_the_last_bit(world, tmp_path, monkeypatch):
    fedprox = exchanged_updates(fedprox_federation(world, tmp_path / "prox", mu=0.0), monkeypatch)
    cfg = load_config(None, tiny_overrides(*world, tmp_path / "avg", strategy="fedavg", rounds=2, save_models=False))
    fedavg = exchanged_updates(setup_federation(cfg, Accelerator(cpu=True)), monkeypatch)
    assert len(fedprox) == len(fedavg) == 2
    for ours, theirs in zip(fedprox, fedavg):
        for update, expected in zip(ours, theirs, strict=True):
            assert update.shared.keys() == expected.shared.keys()
            assert all(torch.equal(update.shared[key], value) for key, value in expected.shared.items())


def test_fedprox_keeps_every_clients_update_nearer_the_global(world, tmp_path, monkeypatch):
    distances = {}
    for mu in (0.0, 50.0):
        federation = fedprox_federation(world, tmp_path / f"mu-{mu}", mu)
        start = dict(federation.shared)
        (updates,) = exchanged_updates(federation, monkeypatch)[:1]
        distances[mu] = [update_norm(update.shared, start) for update in updates]
    assert all(near < far for near, far in zip(distances[50.0], distances[0.0])), distances


# ---- memory flat in the number of clients ---------------------------------------------------------------------
def test_the_accelerate_rounds_hold_no_more_client_states_than_clients_per_round(world, tmp_path, monkeypatch):
    cfg = load_config(None, tiny_overrides(*world, tmp_path / "out", rounds=2, clients_per_round=2))
    federation = setup_federation(cfg, Accelerator(cpu=True))
    held = []
    exchange = rounds_module._exchange

    def counted(accelerator, updates):  # mid-round: every asked client trained, none yet evaluated
        gc.collect()
        held.append(sum(type(thing) is ClientState for thing in gc.get_objects()))
        return exchange(accelerator, updates)

    monkeypatch.setattr(rounds_module, "_exchange", counted)
    for round_index in (1, 2):
        rounds_module.run_round(federation, round_index, Accelerator(cpu=True))
    assert len(held) == 2 and max(held) <= cfg.clients_per_round
    gc.collect()
    assert sum(type(thing) is ClientState for thing in gc.get_objects()) == 0  # between rounds, none
