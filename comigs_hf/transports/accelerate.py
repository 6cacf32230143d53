"""Federated rounds over Accelerate: the round protocol when the clients are processes of one job.

N clients are spread over the P processes (client i runs on rank i % P). Each process holds one frozen base inside
one CoMiGS model; a client ([`~comigs_hf.client.Client`]) keeps its private state (its experts, router, optimisers,
sampler) on disk and is swapped in for its turn, so a process holds one client's state at a time, whatever N. Each
round:

1. every process runs each of its clients asked this round through the client step, `Client.train`, from the
   current global shared tensors; it returns a `ClientUpdate` whose `shared` tensors are all that leaves the client;
2. `_exchange`, the only collective carrying tensors, gives every rank every client's update, in client order;
3. every rank runs the server step, `server.server_step` (checks, then the strategy's rule and weighting, or an
   algorithm's own step), so all hold the same new global state and P does not change the numbers; each client that
   trained then takes its part of the outcome (`Client.receive`), and after the last round every client runs its
   end-of-run step (`Client.finish`);
4. clients are evaluated every `eval_every` rounds and after the last, right after their local steps (before the
   server aggregates, the reference code's point) and with the new global state, one client at a time; the round is
   checkpointed atomically (the global and the records; each client saved its own state in step 1).

Reading this file alone tells what crosses a process boundary: `_exchange` carries the updates, `gather_object` in
`evaluate_clients` carries metrics (floats), `_noise_seed` rank 0's secret seed of the server step's randomness (every
rank runs the server step and must draw the same privacy noise), and `load_checkpoint` each rank's choice of
checkpoint (an int).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..client import Client
from ..client_state import client_folder_name, fresh_parameters, initial_shared_state, saved_client_parameters
from ..data import ClientData
from ..evaluation import EvaluationConfig
from ..modeling_comigs import CoMiGSForCausalLM
from ..server import evaluation_row, sample_clients, server_step
from ..strategies import Strategy, partition_state_dict
from ..trainer import ClientUpdate

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


def client_state_dir(output_dir: str | os.PathLike) -> Path:
    """Where the clients of an Accelerate run keep their states: `<output_dir>/checkpoints/clients/`."""
    return Path(output_dir) / "checkpoints" / "clients"


@dataclass
class Federation:
    """The process-local view of a run: the model, its clients and every client's test data, the global state and
    the records.

    Args:
        clients (`list[Client]`): the clients that train, in order (each process trains those of its rank); they
            hold no state in memory.
        evaluated (`list[ClientData]`): the federation's clients, whose test splits are evaluated, in order.
        serving (`list[int]`): `serving[i]` is the training client whose state serves client `i`'s evaluation (`i`
            itself, unless a strategy pools every client into one).
        layout (`dict[str, list[int]]`): each evaluated client's `num_specialists`, `top_k` and `lora_r`.
    """

    model: CoMiGSForCausalLM
    tokenizer: object
    strategy: Strategy
    plan: RoundsConfig
    clients: list[Client]
    evaluated: list[ClientData]
    serving: list[int]
    layout: dict[str, list[int]]
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    shared: dict[str, torch.Tensor] = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)  # one per finished round, see `run_round`
    start_round: int = 1
    # the run's configuration minus what a resume may change (see `differing_keys`): stored with each checkpoint,
    # a resume under another one is refused naming the keys; `None` checks nothing
    identity: dict[str, Any] | None = None

    def local_clients(self, accelerator: Accelerator) -> list[Client]:
        """This rank's training clients: client i runs on rank i % P."""
        return self.clients[accelerator.process_index :: accelerator.num_processes]


def start_federation(federation: Federation, accelerator: Accelerator) -> Federation:
    """Fill in the global shared state: from the last checkpoint when `plan.resume` finds one (the clients' saved
    states then continue), else fresh (shared tensors drawn equal everywhere, every client's saved state cleared)."""
    plan, model, strategy = federation.plan, federation.model, federation.strategy
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
    if accelerator.is_main_process:  # a first round killed before its checkpoint may have left states of its own
        shutil.rmtree(client_state_dir(plan.output_dir), ignore_errors=True)
    accelerator.wait_for_everyone()
    first = federation.clients[0].spec
    if plan.init_from is None:
        federation.shared = initial_shared_state(model, strategy, first.num_specialists, plan.seed, first.top_k)
    else:  # every rank reads client 0's folder, so the shared tensors start equal everywhere
        fresh = fresh_parameters(model, first.num_specialists, plan.seed, first.top_k)
        reference = saved_client_parameters(Path(plan.init_from) / client_folder_name(0, first.name), fresh, model)
        federation.shared = partition_state_dict(reference, strategy)[0] if strategy.server_combines else {}
        for client in federation.local_clients(accelerator):  # each folder checked now, not at its first round
            client.fresh_state()
    return federation


# ---- one round -----------------------------------------------------------------------------------------------------
def _noise_seed(accelerator: Accelerator) -> int | None:
    """Rank 0's secret seed of the server step's randomness, on every rank (`None` in one process, which draws its
    own)."""
    if accelerator.num_processes == 1:
        return None
    return broadcast_object_list([secrets.randbits(63)])[0]


def _exchange(accelerator: Accelerator, updates: list[ClientUpdate]) -> list[ClientUpdate]:
    """The only collective that carries tensors: every rank receives every client's update, in client order."""
    gathered = gather_object(updates) if accelerator.num_processes > 1 else list(updates)
    return sorted(gathered, key=lambda update: update.client_id)


def run_round(federation: Federation, round_index: int, accelerator: Accelerator) -> dict:
    """Train this rank's clients among those asked this round (`sample_clients`: all of them by default),
    exchange their updates, run the server step, and evaluate every client when due; returns the round's record (a
    row per client that trained, and per client evaluated without training, see `server.evaluation_row`)."""
    plan, strategy = federation.plan, federation.strategy
    due = round_index % plan.eval_every == 0 or round_index == plan.rounds
    asked = set(sample_clients(len(federation.clients), plan.clients_per_round, plan.seed, round_index))
    trained = [client for client in federation.local_clients(accelerator) if client.client_id in asked]
    # a client serving its own evaluation alone measures its test figures right after its local steps
    evaluate = due and federation.serving == list(range(len(federation.clients)))
    evaluate = evaluate and (federation.evaluation.before_aggregation or not strategy.shared_roles)
    updates, before = [], {}
    progress = tqdm(
        trained, desc=f"round {round_index} clients", leave=False, disable=not accelerator.is_local_main_process
    )
    for client in progress:
        update, evaluation = client.train(round_index, federation.shared, evaluate=evaluate)
        updates.append(update)
        if evaluation is not None:
            before[client.client_id] = evaluation
    outcome = server_step(strategy, _exchange(accelerator, updates), federation.shared, _noise_seed(accelerator))
    for client in trained:
        client.receive(round_index, outcome)
    federation.shared = outcome.shared
    by_trainer = {row["client_id"]: row for row in outcome.rows}
    rows = [
        {**by_trainer[trainer], "client_id": client_id}
        for client_id, trainer in enumerate(federation.serving)
        if trainer in by_trainer
    ]
    if round_index == plan.rounds:
        for client in federation.local_clients(accelerator):
            client.finish(federation.shared)
    if due:  # every client is evaluated, those that sat the round out with their own state and the new global
        trained_rows = {row["client_id"]: row for row in rows}
        for metrics in evaluate_clients(federation, round_index, accelerator, before):
            if metrics["client_id"] in trained_rows:
                trained_rows[metrics["client_id"]].update({k: v for k, v in metrics.items() if k != "client_id"})
            else:
                rows.append(evaluation_row(metrics["client_id"], metrics))
        rows.sort(key=lambda row: row["client_id"])
    return {"round": round_index, "clients": rows}


def evaluate_clients(
    federation: Federation, round_index: int, accelerator: Accelerator, before: dict[int, dict] | None = None
) -> list[dict]:
    """Every client's test metrics with its current private state and the global shared state, beside `before`
    (this rank's clients' metrics after their local steps, keys suffixed `_before_aggregation`), one client at a
    time, each where the client that serves it trains.

    A strategy that shares nothing has nothing to aggregate: its figures after aggregation are those before."""
    before, shares = before or {}, bool(federation.strategy.shared_roles)
    local = {client.client_id for client in federation.local_clients(accelerator)}
    rows = []
    for client_id, trainer in enumerate(federation.serving):
        if trainer not in local:
            continue
        client = federation.clients[trainer]
        if trainer == client_id:
            after = client.evaluate(round_index, federation.shared)
        else:
            after = client.evaluate(
                round_index, federation.shared, test=federation.evaluated[client_id].test, evaluated_id=client_id
            )
        row = {"client_id": client_id, **after}
        if federation.evaluation.before_aggregation:
            # without sharing, the state after aggregation is the one right after the local steps
            measured = before.get(client_id, after if not shares else {})
            figures = {k: v for k, v in measured.items() if k.endswith(("_loss", "_ppl"))}
            row.update({f"{k}_before_aggregation": v for k, v in figures.items()})
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
    """Write round `round_index`'s global state and records into a temporary directory, then publish it with
    atomic renames: a kill at any point leaves the previous complete checkpoints in place. The last
    `KEPT_CHECKPOINTS` are kept; every client saved its own state when it trained (`comigs_hf.client`)."""
    output_dir = federation.plan.output_dir
    root = Path(output_dir) / "checkpoints"
    staging, final = root / f"round-{round_index}.tmp", root / f"round-{round_index}"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
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


def _read_checkpoint(directory: Path, clients: list[Client], identity: dict[str, Any] | None) -> tuple[dict, dict]:
    """A checkpoint's state and global, and the state of each of `clients` after its round, every file read; a
    checkpoint of another run configuration than `identity` is refused naming the keys that differ."""
    current = directory / "state.json"
    try:
        saved = json.loads(current.read_text())
        if not isinstance(saved, dict) or not isinstance(saved.get("round"), int):
            raise ValueError("not a checkpoint's state")
        current = directory / "global.safetensors"
        shared = load_file(current)
    except Exception as error:  # a truncated or garbage file: any reader's error, named with the file
        first_line = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        raise ValueError(f"{current} is unreadable ({type(error).__name__}: {first_line})") from None
    saved_identity = saved.get("identity")
    if identity is not None and saved_identity is not None:
        differ = differing_keys(saved_identity, identity, ignore=RESUMABLE_KEYS)
        if differ:
            raise RunMismatch(
                f"{directory} is a checkpoint of a run with other settings (differing keys: {', '.join(differ)}): "
                "resume with the same settings (only rounds, eval_every and the outputs' keys may change), or "
                "choose another output_dir."
            )
    for client in clients:  # one at a time: read, checked and dropped (the round trains from it again)
        client.latest_state(saved["round"])
    return saved, shared


class RunMismatch(ValueError):
    """A checkpoint of a run with other settings: a resume is refused, not sent to an older checkpoint."""


def load_checkpoint(federation: Federation, accelerator: Accelerator) -> None:
    """Restore the last complete round: the global shared tensors and the metrics so far; each client continues from
    its state saved at or before that round.

    A checkpoint with an unreadable file, or whose round a client's saved state cannot be read for, falls back to the
    one before (a warning names the file). A checkpoint of another run configuration is refused naming the keys that
    differ (see `RESUMABLE_KEYS` for those that may).

    Raises:
        `ValueError`: no checkpoint can be read, or the run's configuration differs from the checkpoint's.
    """
    plan = federation.plan
    local = federation.local_clients(accelerator)
    problems, candidates = [], complete_checkpoints(plan.output_dir)
    choice, loaded = len(candidates), None
    for index, directory in enumerate(candidates):
        try:
            loaded = _read_checkpoint(directory, local, federation.identity)
        except RunMismatch:
            raise
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
            loaded = _read_checkpoint(candidates[agreed], local, federation.identity)  # read by another rank
        choice = agreed
    if choice >= len(candidates) or loaded is None:
        where = Path(plan.output_dir) / "checkpoints"
        raise ValueError(f"No checkpoint in {where} that every process can read: {'; '.join(problems)}.")
    directory = candidates[choice]
    saved, shared = loaded
    if saved["round"] > plan.rounds:
        raise ValueError(
            f"{directory} holds round {saved['round']}, past rounds={plan.rounds}: resume with rounds >= "
            f"{saved['round']}."
        )
    federation.shared = shared
    federation.records = saved["records"]
    federation.start_round = saved["round"] + 1


# ---- the whole run -------------------------------------------------------------------------------------------------
def run_federated(federation: Federation, accelerator: Accelerator) -> Federation:
    """Run (or resume) the remaining rounds of a started federation (see [`start_federation`]), checkpointing each.

    Returns:
        [`Federation`]: the same object, holding every round's record and the final global state.
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
    "client_state_dir",
    "complete_checkpoints",
    "differing_keys",
    "evaluate_clients",
    "load_checkpoint",
    "run_federated",
    "run_round",
    "save_checkpoint",
    "start_federation",
]
