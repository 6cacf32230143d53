"""Federated rounds over Accelerate: what leaves a client, and when.

N clients are spread over the P processes (client i runs on rank i % P). Each process holds one frozen base inside
one CoMiGS model; a client's private state (its experts, router, optimisers, sampler) lives on CPU and is swapped in
for its turn. Each round, for every client, in client order:

1. configure: load the client's private tensors and the current global shared tensors into the model;
2. train: local alternating expert/router steps (`trainer.py`, no collective);
3. partition: `partition_state_dict` splits the result; only the shared part goes into the client's update;
4. gather: updates (shared tensors + token counts) of all clients reach every rank through one `gather_object`;
5. aggregate: the strategy's rule, weighted by training tokens, gives the new global shared state (same on every
   rank, computed in client order so P does not change the numbers);
6. evaluate every `eval_every` rounds and at the end; checkpoint atomically.

Reading this file alone tells what crosses a process boundary: `_exchange` is the only collective carrying tensors.
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
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .aggregation import get_aggregator
from .config import RecipeConfig, build_strategy, client_num_specialists, validate_client_splits
from .data import ClientData, build_client_datasets
from .metrics import load_perplexity
from .modeling_comigs import CoMiGSForCausalLM
from .strategies import Strategy, aggregation_weights, partition_state_dict, payload_bytes
from .trainer import ClientState, activate_client, evaluate_client, train_client_round

ALL_ROLES = ("generalist", "specialist", "router")


@dataclass
class Federation:
    """The process-local view of a run: the model, every client's data, and the states of this rank's clients."""

    model: CoMiGSForCausalLM
    tokenizer: object
    clients: list[ClientData]
    num_specialists: list[int]
    strategy: Strategy
    states: dict[int, ClientState] = field(default_factory=dict)
    shared: dict[str, torch.Tensor] = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)  # one per finished round, see `run_round`
    start_round: int = 1


def derived_seed(seed: int, round_index: int, client_id: int) -> int:
    """A seed for one (round, client) pair, the same whichever process runs the client."""
    return (seed * 1_000_003 + round_index * 10_007 + client_id + 1) % (2**63)


def local_client_ids(num_clients: int, accelerator: Accelerator) -> list[int]:
    return list(range(accelerator.process_index, num_clients, accelerator.num_processes))


# ---- setup ---------------------------------------------------------------------------------------------------------
def load_base(cfg: RecipeConfig, accelerator: Accelerator):
    """The frozen base and its tokenizer; the embedded default is built once (main process first) and cached."""
    path = cfg.model.base_model
    if path == "embedded":
        from .embedded import build_embedded_base

        with accelerator.main_process_first():
            path = str(build_embedded_base(progress=accelerator.is_main_process))
    tokenizer = AutoTokenizer.from_pretrained(path, revision=cfg.model.revision)
    base = AutoModelForCausalLM.from_pretrained(
        path, revision=cfg.model.revision, dtype=getattr(torch, cfg.model.dtype)
    )
    name = cfg.model.base_model if cfg.model.base_model != "embedded" else "comigs_hf/embedded-base"
    return base.to(accelerator.device), tokenizer, name


def setup_federation(cfg: RecipeConfig, accelerator: Accelerator) -> Federation:
    """Build the model, load and split every client's data, and initialise (or resume) all states."""
    base, tokenizer, base_name = load_base(cfg, accelerator)
    with accelerator.main_process_first():
        clients = build_client_datasets(cfg.data, tokenizer, cfg.seed)
    validate_client_splits(
        clients, splits=("train", "test") if cfg.training.router_on_train else ("train", "validation", "test")
    )
    counts = client_num_specialists(cfg, num_clients=len(clients))
    strategy = build_strategy(cfg)
    if strategy.requires_equal_experts and len(set(counts)) > 1:
        raise ValueError(
            f"strategy {strategy.name!r} averages specialists/routers, so every client needs the same "
            f"number of specialists; model.num_specialists gives {counts}."
        )
    for client, count in zip(clients, counts):
        if cfg.model.top_k > cfg.model.num_generalists + count:
            raise ValueError(
                f"model.top_k={cfg.model.top_k} exceeds the {cfg.model.num_generalists + count} experts "
                f"of client {client.name!r}."
            )
    model = build_model(cfg, base, base_name, counts[0], accelerator)
    federation = Federation(model, tokenizer, clients, counts, strategy)
    if cfg.resume and latest_checkpoint(cfg.output_dir) is not None:
        load_checkpoint(federation, cfg, accelerator)
    else:
        initialise_states(federation, cfg, accelerator)
    return federation


def build_model(
    cfg: RecipeConfig, base: PreTrainedModel, base_name: str, num_specialists: int, accelerator: Accelerator
) -> CoMiGSForCausalLM:
    """The CoMiGS model around `base` as `cfg.model` describes it, holding `num_specialists` specialists (client 0's
    count: `initialise_states` draws the shared reference from this layout); also used by the Hub-round seed, which
    needs the model but no client data."""
    model = CoMiGSForCausalLM.from_base(
        base,
        base_model_name_or_path=base_name,
        num_generalists=cfg.model.num_generalists,
        num_specialists=num_specialists,
        lora_r=cfg.model.lora_r,
        lora_alpha=cfg.model.lora_alpha,
        lora_dropout=cfg.model.lora_dropout,
        use_rslora=cfg.model.use_rslora,
        top_k=cfg.model.top_k,
        recompute_activation=cfg.model.recompute_activation,
        router_aux_loss_coef=cfg.model.router_aux_loss_coef,
        generalist_importance=cfg.model.generalist_importance,
        target_modules=cfg.model.target_modules,
        attention_lora=cfg.model.attention_lora,
    ).to(accelerator.device)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def _fresh_parameters(model: CoMiGSForCausalLM, num_specialists: int, seed: int) -> dict[str, torch.Tensor]:
    model.set_num_specialists(num_specialists)  # draws from the global RNG when it adds experts: seed after it
    torch.manual_seed(seed)
    model.reset_experts()
    return {k: v.cpu() for k, v in model.role_state_dict(*ALL_ROLES).items()}


def initial_shared_state(
    model: CoMiGSForCausalLM, cfg: RecipeConfig, strategy: Strategy, num_specialists: int
) -> dict[str, torch.Tensor]:
    """The global shared tensors before round 1, drawn once with client 0's expert count (`num_specialists`); the
    Hub-round seed publishes exactly these."""
    reference = _fresh_parameters(model, num_specialists, derived_seed(cfg.seed, 0, -1))
    return partition_state_dict(reference, strategy)[0]


def initialise_states(federation: Federation, cfg: RecipeConfig, accelerator: Accelerator) -> None:
    """Seeded per client (whatever process holds it); shared tensors start equal on every client."""
    model, counts = federation.model, federation.num_specialists
    federation.shared = initial_shared_state(model, cfg, federation.strategy, counts[0])
    for client_id in local_client_ids(len(federation.clients), accelerator):
        parameters = _fresh_parameters(model, counts[client_id], derived_seed(cfg.seed, 0, client_id))
        generator = torch.Generator().manual_seed(derived_seed(cfg.seed, -1, client_id))
        federation.states[client_id] = ClientState(
            client_id,
            federation.clients[client_id].name,
            counts[client_id],
            parameters,
            generator=generator.get_state(),
        )


# ---- one round -----------------------------------------------------------------------------------------------------
def _exchange(accelerator: Accelerator, updates: list[dict]) -> list[dict]:
    """The only collective that carries tensors: every rank receives every client's update, in client order."""
    gathered = gather_object(updates) if accelerator.num_processes > 1 else list(updates)
    return sorted(gathered, key=lambda update: update["client_id"])


def run_round(federation: Federation, cfg: RecipeConfig, round_index: int, accelerator: Accelerator) -> dict:
    """Train every local client, exchange shared tensors, aggregate, and evaluate when due; returns the round's
    record (one row per client)."""
    model, strategy = federation.model, federation.strategy
    total_steps = cfg.rounds * cfg.training.local_steps
    updates = []
    local_ids = local_client_ids(len(federation.clients), accelerator)
    for client_id in tqdm(
        local_ids, desc=f"round {round_index} clients", leave=False, disable=not accelerator.is_local_main_process
    ):
        state = federation.states[client_id]
        activate_client(model, state, federation.shared)
        torch.manual_seed(derived_seed(cfg.seed, round_index, client_id))
        result = train_client_round(
            model, state, federation.clients[client_id], cfg.training, total_steps, accelerator
        )
        trained = {k: v.cpu() for k, v in model.role_state_dict(*ALL_ROLES).items()}
        shared, private = partition_state_dict(trained, strategy)
        state.parameters = {**state.parameters, **private}
        updates.append(
            {
                "client_id": client_id,
                "train_tokens": result.train_tokens,
                "train_loss": result.train_loss,
                "router_loss": result.router_loss,
                "shared": shared,
            }
        )
    everyone = _exchange(accelerator, updates)
    if strategy.shared_roles:
        aggregate = get_aggregator(strategy.aggregation)
        weights = aggregation_weights(strategy, [u["train_tokens"] for u in everyone])
        federation.shared = aggregate([u["shared"] for u in everyone], weights, **strategy.aggregation_kwargs)
    received = payload_bytes(federation.shared) if strategy.shared_roles else 0
    rows = [
        {
            **{k: v for k, v in update.items() if k != "shared"},
            "bytes_sent": payload_bytes(update["shared"]),
            "bytes_received": received,
        }
        for update in everyone
    ]
    if round_index % cfg.eval_every == 0 or round_index == cfg.rounds:
        for row, metrics in zip(rows, evaluate_clients(federation, cfg, accelerator)):
            row.update({k: v for k, v in metrics.items() if k != "client_id"})
    return {"round": round_index, "clients": rows}


def evaluate_clients(federation: Federation, cfg: RecipeConfig, accelerator: Accelerator) -> list[dict]:
    """Every client's test metrics with its current private state and the global shared state."""
    rows = []
    for client_id in local_client_ids(len(federation.clients), accelerator):
        activate_client(federation.model, federation.states[client_id], federation.shared)
        metric = load_perplexity(
            keep_in_memory=True,
            process_id=0,
            num_process=1,
            experiment_id=f"client-{client_id}-rank-{accelerator.process_index}",
        )
        rows.append(
            {
                "client_id": client_id,
                **evaluate_client(
                    federation.model, federation.clients[client_id].test, cfg.training, accelerator, metric
                ),
            }
        )
    rows = gather_object(rows) if accelerator.num_processes > 1 else rows  # metrics only: floats, no tensors
    return sorted(rows, key=lambda row: row["client_id"])


# ---- checkpoints ---------------------------------------------------------------------------------------------------
def latest_checkpoint(output_dir: str) -> Path | None:
    pointer = Path(output_dir) / "checkpoints" / "latest.json"
    if not pointer.is_file():
        return None
    return Path(output_dir) / "checkpoints" / json.loads(pointer.read_text())["directory"]


def save_checkpoint(federation: Federation, cfg: RecipeConfig, round_index: int, accelerator: Accelerator) -> None:
    """Write round `round_index` into a temporary directory, then publish it with atomic renames: a kill at any
    point leaves the previous complete checkpoint in place."""
    root = Path(cfg.output_dir) / "checkpoints"
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
        previous = latest_checkpoint(cfg.output_dir)
        pointer = root / "latest.json"
        (root / "latest.json.tmp").write_text(json.dumps({"directory": final.name, "round": round_index}))
        os.replace(root / "latest.json.tmp", pointer)
        if previous is not None and previous != final:
            shutil.rmtree(previous, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_checkpoint(federation: Federation, cfg: RecipeConfig, accelerator: Accelerator) -> None:
    """Restore the last complete round: global shared tensors, this rank's client states, metrics so far."""
    directory = latest_checkpoint(cfg.output_dir)
    saved = json.loads((directory / "state.json").read_text())
    federation.shared = load_file(directory / "global.safetensors")
    for client_id in local_client_ids(len(federation.clients), accelerator):
        # weights_only: tensors, numbers and plain containers, never arbitrary objects
        data = torch.load(directory / f"client-{client_id}.pt", weights_only=True)
        federation.states[client_id] = ClientState.from_checkpoint(data)
    federation.records = saved["records"]
    federation.start_round = saved["round"] + 1


# ---- the whole run -------------------------------------------------------------------------------------------------
def run_federated(cfg: RecipeConfig, accelerator: Accelerator) -> dict:
    """Run (or resume) all rounds and write the outputs; returns the results written to `results.json`."""
    federation = setup_federation(cfg, accelerator)
    progress = tqdm(
        range(federation.start_round, cfg.rounds + 1),
        desc=f"{cfg.strategy} rounds",
        disable=not accelerator.is_main_process,
        initial=federation.start_round - 1,
        total=cfg.rounds,
    )
    for round_index in progress:
        record = run_round(federation, cfg, round_index, accelerator)
        federation.records.append(record)
        accelerator.log(_round_scalars(record), step=round_index)
        save_checkpoint(federation, cfg, round_index, accelerator)
    from .outputs import write_outputs

    return write_outputs(federation, cfg, accelerator)


def _round_scalars(record: dict) -> dict:
    rows = record["clients"]
    scalars = {
        "train_loss": sum(r["train_loss"] for r in rows) / len(rows),
        "bytes_sent": sum(r["bytes_sent"] for r in rows),
    }
    if all("test_ppl" in r for r in rows):
        scalars["mean_test_ppl"] = sum(r["test_ppl"] for r in rows) / len(rows)
    return scalars
