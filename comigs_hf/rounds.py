"""Federated rounds over Accelerate: the round protocol when the clients are processes of one job.

N clients are spread over the P processes (client i runs on rank i % P). Each process holds one frozen base inside
one CoMiGS model; a client's private state (its experts, router, optimisers, sampler) lives on CPU and is swapped in
for its turn. Each round:

1. every process runs each of its clients through the client step, `trainer.run_client_round`, from the current
   global shared tensors; it returns a `ClientUpdate` holding only the strategy's shared tensors;
2. `_exchange`, the only collective carrying tensors, gives every rank every client's update, in client order;
3. every rank runs the server step, `server.aggregate_updates` (checks, then the strategy's rule and weighting), so
   all hold the same new global state and P does not change the numbers; a strategy without a server (PCL,
   `aggregator: clients`) has each client combine the updates itself (`server.combine_for_client`) instead, and
   FD-LoRA's clients fuse their experts after the last round (`evaluation.fusion_weights`);
4. clients are evaluated every `eval_every` rounds and after the last, right after their local steps (before the
   server aggregates, the reference code's point) and with the new global state; the round is checkpointed
   atomically.

Reading this file alone tells what crosses a process boundary: `_exchange` carries the updates, `gather_object` in
`evaluate_clients` carries metrics (floats), and `_noise_seed` rank 0's secret seed of a round's privacy noise (every
rank runs the server step and must add the same noise).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .data import ClientData
from .evaluation import (
    EvaluationConfig,
    client_trust_weights,
    evaluate_client,
    evaluation_seed,
    fusion_seed,
    fusion_weights,
)
from .modeling_comigs import CoMiGSForCausalLM
from .server import aggregate_updates, combine_for_client, evaluation_row, round_row, sample_clients
from .strategies import Strategy, partition_state_dict
from .trainer import (
    ClientState,
    ClientUpdate,
    TrainingConfig,
    activate_client,
    client_folder_name,
    fresh_parameters,
    initial_client_state,
    initial_shared_state,
    run_client_round,
    saved_client_parameters,
)

logger = logging.getLogger("comigs_hf.rounds")


@dataclass
class RoundsConfig:
    """How many rounds, how often to evaluate, the seed, and where a run keeps its outputs and checkpoints."""

    rounds: int = field(default=20, metadata={"help": "Communication rounds, counted from 1."})
    eval_every: int = field(default=5, metadata={"help": "Evaluate every this many rounds (and after the last)."})
    seed: int = field(default=0, metadata={"help": "Seed of data partitioning, initialisation and sampling."})
    clients_per_round: int | None = field(
        default=None,
        metadata={
            "help": "Clients that train each round, drawn anew every round from the seed (Flower's fraction_train "
            "x clients); None: every client."
        },
    )
    output_dir: str = field(default="outputs/run", metadata={"help": "Where results, logs and checkpoints go."})
    resume: bool = field(default=False, metadata={"help": "Continue from the last checkpoint in output_dir."})
    init_from: str | None = field(
        default=None,
        metadata={
            "help": "A run's clients/ folder: each client starts from its saved experts and routers, the shared "
            "tensors from client 0's (a resumed checkpoint wins)."
        },
    )

    def __post_init__(self) -> None:
        problems = [
            f"{key} must be >= 1, got {getattr(self, key)}."
            for key in ("rounds", "eval_every")
            if getattr(self, key) < 1
        ]
        if self.clients_per_round is not None and self.clients_per_round < 1:
            problems.append(f"clients_per_round must be >= 1 (or null: every client), got {self.clients_per_round}.")
        if problems:
            raise ValueError("\n".join(problems))


@dataclass
class Federation:
    """The process-local view of a run: the model, every client's data, and the states of this rank's clients."""

    model: CoMiGSForCausalLM
    tokenizer: object
    clients: list[ClientData]
    num_specialists: list[int]
    strategy: Strategy
    training: TrainingConfig
    plan: RoundsConfig
    top_k: list[int] | None = None  # experts each client mixes per token; None: the model's for every client
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    mixed_test: list[torch.Tensor] | None = None  # each client's part of the out-of-distribution mixture
    pooled: ClientData | None = None  # under a pooling strategy, the one client that trains (see `training_data`)
    states: dict[int, ClientState] = field(default_factory=dict)
    shared: dict[str, torch.Tensor] = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)  # one per finished round, see `run_round`
    start_round: int = 1
    # the run's configuration minus what a resume may change (see `differing_keys`): stored with each checkpoint,
    # a resume under another one is refused naming the keys; `None` checks nothing
    identity: dict[str, Any] | None = None
    lora_ranks: list[int] | None = None  # each client's expert rank; None: the model's lora_r for every client


def local_client_ids(num_clients: int, accelerator: Accelerator) -> list[int]:
    return list(range(accelerator.process_index, num_clients, accelerator.num_processes))


def training_data(federation: Federation) -> list[ClientData]:
    """The clients that train, in order: every client, or the one pooled client of the centralised baseline (which
    then serves every client's evaluation)."""
    return [federation.pooled] if federation.pooled is not None else federation.clients


def _trainer_of(federation: Federation, client_id: int) -> int:
    return 0 if federation.pooled is not None else client_id


def start_federation(federation: Federation, accelerator: Accelerator) -> Federation:
    """Fill in the global shared state and this rank's client states: from the last checkpoint when `plan.resume`
    finds one, else fresh (seeded per client, whatever process holds it; shared tensors start equal everywhere)."""
    plan = federation.plan
    saved = complete_checkpoints(plan.output_dir)
    if plan.resume and saved:
        load_checkpoint(federation, accelerator)
        return federation
    if saved:
        raise ValueError(
            f"{plan.output_dir} holds the checkpoints of a run (last: {saved[0].name}): pass resume=true to continue "
            "it, or choose another output_dir (starting afresh would overwrite them)."
        )
    if plan.resume:
        logger.warning("resume=true, but %s holds no checkpoint: starting at round 1.", plan.output_dir)
    model, counts = federation.model, federation.num_specialists
    top_k = federation.top_k or [None] * len(counts)
    ranks = federation.lora_ranks or [None] * len(counts)
    trainers = training_data(federation)
    if plan.init_from is None:
        federation.shared = initial_shared_state(model, federation.strategy, counts[0], plan.seed, top_k[0])
    else:  # every rank reads client 0's folder, so the shared tensors start equal everywhere
        saved = Path(plan.init_from) / client_folder_name(0, trainers[0].name)
        reference = saved_client_parameters(saved, fresh_parameters(model, counts[0], plan.seed, top_k[0]), model)
        federation.shared = partition_state_dict(reference, federation.strategy)[0]
    if federation.strategy.aggregator == "clients":  # no global state: every client starts from its own draw
        federation.shared = {}
    for client_id in local_client_ids(len(trainers), accelerator):
        name = trainers[client_id].name
        state = initial_client_state(
            model,
            client_id,
            name,
            counts[client_id],
            plan.seed,
            top_k[client_id],
            frozen_factors=federation.strategy.frozen_factors,
            lora_rank=ranks[client_id],
        )
        if plan.init_from is not None:
            folder = Path(plan.init_from) / client_folder_name(client_id, name)
            state.parameters = saved_client_parameters(folder, state.parameters, model)
        federation.states[client_id] = state
    return federation


# ---- one round -----------------------------------------------------------------------------------------------------
def _noise_seed(strategy: Strategy, accelerator: Accelerator) -> int | None:
    """Rank 0's secret seed of this round's privacy noise, on every rank (`None`: no noise, or one process, which
    draws its own)."""
    if strategy.dp_noise_multiplier == 0 or accelerator.num_processes == 1:
        return None
    return broadcast_object_list([secrets.randbits(63)])[0]


def _exchange(accelerator: Accelerator, updates: list[ClientUpdate]) -> list[ClientUpdate]:
    """The only collective that carries tensors: every rank receives every client's update, in client order."""
    gathered = gather_object(updates) if accelerator.num_processes > 1 else list(updates)
    return sorted(gathered, key=lambda update: update.client_id)


def run_round(federation: Federation, round_index: int, accelerator: Accelerator) -> dict:
    """Train this rank's clients among those asked this round (`sample_clients`: all of them by default),
    exchange their updates, aggregate, and evaluate every client when due; returns the round's record (a row per
    client that trained, and per client evaluated without training, see `server.evaluation_row`)."""
    plan, strategy = federation.plan, federation.strategy
    due = round_index % plan.eval_every == 0 or round_index == plan.rounds
    updates, before = [], {}
    trainers = training_data(federation)
    local_ids = local_client_ids(len(trainers), accelerator)
    asked = set(sample_clients(len(trainers), plan.clients_per_round, plan.seed, round_index))
    for client_id in tqdm(
        [client_id for client_id in local_ids if client_id in asked],
        desc=f"round {round_index} clients",
        leave=False,
        disable=not accelerator.is_local_main_process,
    ):
        updates.append(
            run_client_round(
                federation.model,
                federation.states[client_id],
                trainers[client_id],
                federation.shared,
                strategy,
                federation.training,
                round_index=round_index,
                total_rounds=plan.rounds,
                seed=plan.seed,
                accelerator=accelerator,
            )
        )
        wanted = federation.evaluation.before_aggregation or not strategy.shared_roles
        if due and wanted and federation.pooled is None:
            before[client_id] = _evaluate_held(federation, client_id, round_index, accelerator)
    if strategy.aggregator == "clients":
        rows = _combine_on_clients(federation, round_index, updates, accelerator)
    else:
        everyone = _exchange(accelerator, updates)
        if strategy.shared_roles:
            federation.shared = aggregate_updates(
                strategy, everyone, federation.shared, _noise_seed(strategy, accelerator)
            )
        rows = [round_row(update, federation.shared if strategy.shared_roles else {}) for update in everyone]
    if federation.pooled is not None:  # one model trained for everyone: each client's row carries its figures
        rows = [{**rows[0], "client_id": client_id} for client_id in range(len(federation.clients))]
    if round_index == plan.rounds and strategy.fusion_budget:  # FD-LoRA: each client fuses its experts once
        for client_id in local_ids:
            state = federation.states[client_id]
            activate_client(federation.model, state, federation.shared)
            weights, _ = fusion_weights(
                federation.model,
                trainers[client_id].validation,
                strategy,
                federation.evaluation,
                accelerator,
                fusion_seed(plan.seed, client_id),
            )
            state.expert_weights = weights
    if due:  # every client is evaluated, those that sat the round out with their own state and the new global
        trained = {row["client_id"]: row for row in rows}
        for metrics in evaluate_clients(federation, round_index, accelerator, before):
            if metrics["client_id"] in trained:
                trained[metrics["client_id"]].update({k: v for k, v in metrics.items() if k != "client_id"})
            else:
                rows.append(evaluation_row(metrics["client_id"], metrics))
        rows.sort(key=lambda row: row["client_id"])
    return {"round": round_index, "clients": rows}


def _combine_on_clients(
    federation: Federation, round_index: int, updates: list[ClientUpdate], accelerator: Accelerator
) -> list[dict]:
    """PCL's round end (`strategy.aggregator == "clients"`): no server average. In a combination round every rank
    receives every client's update, and each of its clients replaces its own shared tensors with their mean under
    its trust weights (scored on its own validation split); in the other rounds only the metrics travel and every
    client keeps what it trained. Returns the round's rows."""
    strategy = federation.strategy
    for update in updates:  # without a global state, a client's shared tensors are its own until combined
        federation.states[update.client_id].parameters.update(update.shared)
    if not strategy.combines_in_round(round_index):
        everyone = _exchange(accelerator, [replace(update, shared={}) for update in updates])
        return [round_row(update, {}) for update in everyone]
    everyone = _exchange(accelerator, updates)
    for update in updates:
        state, data = federation.states[update.client_id], federation.clients[update.client_id]
        weights, _ = client_trust_weights(
            federation.model, state, data.validation, everyone, federation.evaluation, accelerator
        )
        state.parameters.update(combine_for_client(strategy, everyone, update.shared, weights))
    rows = [round_row(update, {}) for update in everyone]
    for row in rows:  # each client received every other client's tensors
        row["bytes_received"] = sum(other["bytes_sent"] for other in rows if other["client_id"] != row["client_id"])
    return rows


def _evaluate_held(federation: Federation, client_id: int, round_index: int, accelerator: Accelerator) -> dict:
    """The test metrics of the client the model holds (see `comigs_hf.evaluation.evaluate_client`)."""
    return evaluate_client(
        federation.model,
        federation.clients[client_id].test,
        federation.evaluation,
        accelerator,
        seed=evaluation_seed(federation.plan.seed, round_index, client_id),
        mixed_test=federation.mixed_test,
    )


def evaluate_clients(
    federation: Federation, round_index: int, accelerator: Accelerator, before: dict[int, dict] | None = None
) -> list[dict]:
    """Every client's test metrics with its current private state and the global shared state, beside `before`
    (this rank's clients' metrics after their local steps, keys suffixed `_before_aggregation`).

    A strategy that shares nothing has nothing to aggregate: its figures after aggregation are those before."""
    before, shares = before or {}, bool(federation.strategy.shared_roles)
    rows = []
    # each client is evaluated where the state that serves it lives (under pooling: the one trainer's rank)
    for client_id in range(len(federation.clients)):
        trainer = _trainer_of(federation, client_id)
        if trainer not in federation.states:
            continue
        if not shares and client_id in before:
            after = before[client_id]
        else:
            activate_client(federation.model, federation.states[trainer], federation.shared)
            after = _evaluate_held(federation, client_id, round_index, accelerator)
        row = {"client_id": client_id, **after}
        if federation.states[trainer].expert_weights is not None:
            row["fusion_weights"] = list(federation.states[trainer].expert_weights)
        if federation.evaluation.before_aggregation:
            # without sharing, the state after aggregation is the one right after the local steps
            trained = before.get(client_id, after if not shares else {})
            row.update({f"{k}_before_aggregation": v for k, v in trained.items() if k.endswith(("_loss", "_ppl"))})
        rows.append(row)
    rows = gather_object(rows) if accelerator.num_processes > 1 else rows  # metrics only: floats, no tensors
    return sorted(rows, key=lambda row: row["client_id"])


# ---- checkpoints ---------------------------------------------------------------------------------------------------
# what a resume may change: how far to go, how often to evaluate, where to log and what to write at the end
RESUMABLE_KEYS = frozenset(
    {
        "rounds",
        "eval_every",
        "resume",
        "output_dir",
        "init_from",
        "trackers",
        "plots",
        "save_models",
        "save_base",
        "min_train_nodes",
    }
)
KEPT_CHECKPOINTS = 2  # the last two complete rounds: a corrupt last one falls back to the one before


def differing_keys(left: dict, right: dict, ignore: frozenset[str] = frozenset(), prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two nested config dicts (`ignore`: top-level keys to skip)."""
    keys = []
    for key in sorted(set(left) | set(right)):
        if not prefix and key in ignore:
            continue
        a, b = left.get(key), right.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += differing_keys(a, b, prefix=f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


def complete_checkpoints(output_dir: str) -> list[Path]:
    """The complete checkpoints of `output_dir`, newest first: its `round-<t>` folders by round (a folder is only
    ever renamed into place once complete; `latest.json`, written after, is a pointer for people and scripts)."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    rounds = {}
    for path in root.iterdir():
        number = path.name.removeprefix("round-")
        if path.is_dir() and number.isdecimal() and path.name == f"round-{int(number)}":
            rounds[path] = int(number)
    return sorted(rounds, key=rounds.get, reverse=True)


def save_checkpoint(federation: Federation, round_index: int, accelerator: Accelerator) -> None:
    """Write round `round_index` into a temporary directory, then publish it with atomic renames: a kill at any
    point leaves the previous complete checkpoints in place. The last `KEPT_CHECKPOINTS` are kept."""
    output_dir = federation.plan.output_dir
    root = Path(output_dir) / "checkpoints"
    staging, final = root / f"round-{round_index}.tmp", root / f"round-{round_index}"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    for client_id, state in federation.states.items():
        torch.save(state.to_checkpoint(), staging / f"client-{client_id}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_file({k: v.contiguous() for k, v in federation.shared.items()}, staging / "global.safetensors")
        state = {"round": round_index, "records": federation.records, "identity": federation.identity}
        (staging / "state.json").write_text(json.dumps(state))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        (root / "latest.json.tmp").write_text(json.dumps({"directory": final.name, "round": round_index}))
        os.replace(root / "latest.json.tmp", root / "latest.json")
        for old in complete_checkpoints(output_dir)[KEPT_CHECKPOINTS:]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _read_checkpoint(directory: Path, num_clients: int, local: list[int]) -> tuple[dict, dict, dict]:
    # every rank reads every client's file, so all ranks agree on which checkpoint is readable; each keeps its own
    current = directory / "state.json"
    try:
        saved = json.loads(current.read_text())
        if not isinstance(saved, dict) or not isinstance(saved.get("round"), int):
            raise ValueError("not a checkpoint's state")
        current = directory / "global.safetensors"
        shared = load_file(current)
        states = {}
        for client_id in range(num_clients):
            current = directory / f"client-{client_id}.pt"
            # weights_only: tensors, numbers and plain containers, never arbitrary objects
            state = ClientState.from_checkpoint(torch.load(current, weights_only=True))
            if client_id in local:
                states[client_id] = state
    except Exception as error:  # a truncated or garbage file: any reader's error, named with the file
        first_line = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        raise ValueError(f"{current} is unreadable ({type(error).__name__}: {first_line})") from None
    return saved, shared, states


def load_checkpoint(federation: Federation, accelerator: Accelerator) -> None:
    """Restore the last complete round: global shared tensors, this rank's client states, metrics so far.

    A checkpoint with an unreadable file falls back to the one before (a warning names the file). A checkpoint of
    another run configuration is refused naming the keys that differ (see `RESUMABLE_KEYS` for those that may).

    Raises:
        `ValueError`: no checkpoint can be read, or the run's configuration differs from the checkpoint's.
    """
    plan = federation.plan
    num_clients = len(training_data(federation))
    local = local_client_ids(num_clients, accelerator)
    problems, candidates = [], complete_checkpoints(plan.output_dir)
    choice, loaded = len(candidates), None
    for index, directory in enumerate(candidates):
        try:
            loaded = _read_checkpoint(directory, num_clients, local)
        except ValueError as error:
            problems.append(str(error))
            logger.warning("Checkpoint %s: %s; trying the one before.", directory.name, error)
            continue
        choice = index
        break
    if accelerator.num_processes > 1:
        # every rank must resume from the same round: the newest checkpoint that all of them could read
        agreed = max(gather_object([choice]))
        if agreed != choice and agreed < len(candidates):
            loaded = _read_checkpoint(candidates[agreed], num_clients, local)  # read by another rank: raises if not
        choice = agreed
    if choice >= len(candidates) or loaded is None:
        where = Path(plan.output_dir) / "checkpoints"
        raise ValueError(f"No checkpoint in {where} that every process can read: {'; '.join(problems)}.")
    directory = candidates[choice]
    saved, shared, states = loaded
    identity = saved.get("identity")
    if federation.identity is not None and identity is not None:
        differ = differing_keys(identity, federation.identity, ignore=RESUMABLE_KEYS)
        if differ:
            raise ValueError(
                f"{directory} is a checkpoint of a run with other settings (differing keys: {', '.join(differ)}): "
                "resume with the same settings (only rounds, eval_every and the outputs' keys may change), or "
                "choose another output_dir."
            )
    if saved["round"] > plan.rounds:
        raise ValueError(
            f"{directory} holds round {saved['round']}, past rounds={plan.rounds}: resume with rounds >= "
            f"{saved['round']}."
        )
    federation.shared = shared
    federation.states.update(states)
    federation.records = saved["records"]
    federation.start_round = saved["round"] + 1


# ---- the whole run -------------------------------------------------------------------------------------------------
def run_federated(federation: Federation, accelerator: Accelerator) -> Federation:
    """Run (or resume) the remaining rounds of a started federation (see [`start_federation`]), checkpointing each.

    Returns:
        [`Federation`]: the same object, holding every round's record, the final global state and this rank's
        client states.
    """
    plan = federation.plan
    progress = tqdm(
        range(federation.start_round, plan.rounds + 1),
        desc=f"{federation.strategy.name} rounds",
        disable=not accelerator.is_main_process,
        initial=federation.start_round - 1,
        total=plan.rounds,
    )
    for round_index in progress:
        record = run_round(federation, round_index, accelerator)
        federation.records.append(record)
        accelerator.log(_round_scalars(record), step=round_index)
        save_checkpoint(federation, round_index, accelerator)
    return federation


def _round_scalars(record: dict) -> dict:
    rows = [row for row in record["clients"] if row.get("trained", True)]
    scalars = {
        "train_loss": sum(r["train_loss"] for r in rows) / len(rows),
        "bytes_sent": sum(r["bytes_sent"] for r in rows),
    }
    evaluated = record["clients"]
    if all("test_ppl" in r for r in evaluated):
        scalars["mean_test_ppl"] = sum(r["test_ppl"] for r in evaluated) / len(evaluated)
    return scalars


__all__ = [
    "KEPT_CHECKPOINTS",
    "RESUMABLE_KEYS",
    "Federation",
    "RoundsConfig",
    "evaluate_clients",
    "complete_checkpoints",
    "differing_keys",
    "load_checkpoint",
    "run_federated",
    "run_round",
    "save_checkpoint",
    "start_federation",
]
