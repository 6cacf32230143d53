"""Federated rounds over Accelerate: the round protocol when the clients are processes of one job.

N clients are spread over the P processes (client i runs on rank i % P). Each process holds one frozen base inside
one CoMiGS model; a client's private state (its experts, router, optimisers, sampler) lives on CPU and is swapped in
for its turn. Each round:

1. every process runs each of its clients through the client step, `trainer.run_client_round`, from the current
   global shared tensors; it returns a `ClientUpdate` holding only the strategy's shared tensors;
2. `_exchange`, the only collective carrying tensors, gives every rank every client's update, in client order;
3. every rank runs the server step, `server.aggregate_updates` (checks, then the strategy's rule and weighting), so
   all hold the same new global state and P does not change the numbers;
4. clients are evaluated every `eval_every` rounds and after the last, right after their local steps (before the
   server aggregates, the reference code's point) and with the new global state; the round is checkpointed
   atomically.

Reading this file alone tells what crosses a process boundary: `_exchange` carries the updates, `gather_object` in
`evaluate_clients` carries metrics (floats).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .data import ClientData
from .evaluation import EvaluationConfig, evaluate_client, evaluation_seed
from .modeling_comigs import CoMiGSForCausalLM
from .server import aggregate_updates
from .strategies import Strategy, partition_state_dict, payload_bytes, payload_parameters
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


@dataclass
class RoundsConfig:
    """How many rounds, how often to evaluate, the seed, and where a run keeps its outputs and checkpoints."""

    rounds: int = field(default=20, metadata={"help": "Communication rounds, counted from 1."})
    eval_every: int = field(default=5, metadata={"help": "Evaluate every this many rounds (and after the last)."})
    seed: int = field(default=0, metadata={"help": "Seed of data partitioning, initialisation and sampling."})
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
    if plan.resume and latest_checkpoint(plan.output_dir) is not None:
        load_checkpoint(federation, accelerator)
        return federation
    model, counts = federation.model, federation.num_specialists
    top_k = federation.top_k or [None] * len(counts)
    trainers = training_data(federation)
    if plan.init_from is None:
        federation.shared = initial_shared_state(model, federation.strategy, counts[0], plan.seed, top_k[0])
    else:  # every rank reads client 0's folder, so the shared tensors start equal everywhere
        saved = Path(plan.init_from) / client_folder_name(0, trainers[0].name)
        reference = saved_client_parameters(saved, fresh_parameters(model, counts[0], plan.seed, top_k[0]), model)
        federation.shared = partition_state_dict(reference, federation.strategy)[0]
    for client_id in local_client_ids(len(trainers), accelerator):
        name = trainers[client_id].name
        state = initial_client_state(model, client_id, name, counts[client_id], plan.seed, top_k[client_id])
        if plan.init_from is not None:
            folder = Path(plan.init_from) / client_folder_name(client_id, name)
            state.parameters = saved_client_parameters(folder, state.parameters, model)
        federation.states[client_id] = state
    return federation


# ---- one round -----------------------------------------------------------------------------------------------------
def _exchange(accelerator: Accelerator, updates: list[ClientUpdate]) -> list[ClientUpdate]:
    """The only collective that carries tensors: every rank receives every client's update, in client order."""
    gathered = gather_object(updates) if accelerator.num_processes > 1 else list(updates)
    return sorted(gathered, key=lambda update: update.client_id)


def run_round(federation: Federation, round_index: int, accelerator: Accelerator) -> dict:
    """Train every local client, exchange their updates, aggregate, and evaluate when due; returns the round's
    record (one row per client)."""
    plan, strategy = federation.plan, federation.strategy
    due = round_index % plan.eval_every == 0 or round_index == plan.rounds
    updates, before = [], {}
    trainers = training_data(federation)
    local_ids = local_client_ids(len(trainers), accelerator)
    for client_id in tqdm(
        local_ids, desc=f"round {round_index} clients", leave=False, disable=not accelerator.is_local_main_process
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
    everyone = _exchange(accelerator, updates)
    if strategy.shared_roles:
        federation.shared = aggregate_updates(strategy, everyone, federation.shared)
    received = payload_bytes(federation.shared) if strategy.shared_roles else 0
    rows = [_round_row(update, received) for update in everyone]
    if federation.pooled is not None:  # one model trained for everyone: each client's row carries its figures
        rows = [{**rows[0], "client_id": client_id} for client_id in range(len(federation.clients))]
    if due:
        for row, metrics in zip(rows, evaluate_clients(federation, round_index, accelerator, before)):
            row.update({k: v for k, v in metrics.items() if k != "client_id"})
    return {"round": round_index, "clients": rows}


def _round_row(update: ClientUpdate, bytes_received: int) -> dict:
    """A client's row of the round's record: its training metrics and what it sent (bytes, parameters)."""
    parameters = payload_parameters(update.shared)
    return {
        "client_id": update.client_id,
        "train_tokens": update.train_tokens,
        **update.metrics,
        "bytes_sent": payload_bytes(update.shared),
        "bytes_received": bytes_received,
        "params_sent": parameters["total"],
        "expert_params_sent": parameters["experts"],
    }


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
        if federation.evaluation.before_aggregation:
            # without sharing, the state after aggregation is the one right after the local steps
            trained = before.get(client_id, after if not shares else {})
            row.update({f"{k}_before_aggregation": v for k, v in trained.items() if k.endswith(("_loss", "_ppl"))})
        rows.append(row)
    rows = gather_object(rows) if accelerator.num_processes > 1 else rows  # metrics only: floats, no tensors
    return sorted(rows, key=lambda row: row["client_id"])


# ---- checkpoints ---------------------------------------------------------------------------------------------------
def latest_checkpoint(output_dir: str) -> Path | None:
    pointer = Path(output_dir) / "checkpoints" / "latest.json"
    if not pointer.is_file():
        return None
    return Path(output_dir) / "checkpoints" / json.loads(pointer.read_text())["directory"]


def save_checkpoint(federation: Federation, round_index: int, accelerator: Accelerator) -> None:
    """Write round `round_index` into a temporary directory, then publish it with atomic renames: a kill at any
    point leaves the previous complete checkpoint in place."""
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
        (staging / "state.json").write_text(json.dumps({"round": round_index, "records": federation.records}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        previous = latest_checkpoint(output_dir)
        pointer = root / "latest.json"
        (root / "latest.json.tmp").write_text(json.dumps({"directory": final.name, "round": round_index}))
        os.replace(root / "latest.json.tmp", pointer)
        if previous is not None and previous != final:
            shutil.rmtree(previous, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_checkpoint(federation: Federation, accelerator: Accelerator) -> None:
    """Restore the last complete round: global shared tensors, this rank's client states, metrics so far."""
    directory = latest_checkpoint(federation.plan.output_dir)
    saved = json.loads((directory / "state.json").read_text())
    federation.shared = load_file(directory / "global.safetensors")
    for client_id in local_client_ids(len(training_data(federation)), accelerator):
        # weights_only: tensors, numbers and plain containers, never arbitrary objects
        data = torch.load(directory / f"client-{client_id}.pt", weights_only=True)
        federation.states[client_id] = ClientState.from_checkpoint(data)
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
    rows = record["clients"]
    scalars = {
        "train_loss": sum(r["train_loss"] for r in rows) / len(rows),
        "bytes_sent": sum(r["bytes_sent"] for r in rows),
    }
    if all("test_ppl" in r for r in rows):
        scalars["mean_test_ppl"] = sum(r["test_ppl"] for r in rows) / len(rows)
    return scalars


__all__ = [
    "Federation",
    "RoundsConfig",
    "evaluate_clients",
    "load_checkpoint",
    "run_federated",
    "run_round",
    "save_checkpoint",
    "start_federation",
]
