"""The federated recipe: from one YAML config to a run, over Accelerate or through the Hub.

Launched as `recipes/federated.py` (a thin script around `main`) or `comigs run`:

    accelerate launch recipes/federated.py --config recipes/configs/demo.yaml
    accelerate launch --num_processes 2 recipes/federated.py --config recipes/configs/demo.yaml \
        strategy=fedavg rounds=5

On a CPU-only machine, `accelerate launch --multi_gpu --num_processes 2 ...` gives two processes on gloo (see
`default_accelerator`). Clients are spread over the processes; every process holds one frozen base. Outputs land in
`output_dir` (see the README).

This module is where a config becomes objects: the base and the CoMiGS model (`comigs_hf.model`), the clients' data
(`comigs_hf.data`), the strategy and the clients (`build_client`, the one builder of every transport); the transports
(`comigs_hf.transports`) take those objects, never the config. The Hub functions here build one client's model and its
own data only.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.state import AcceleratorState
from accelerate.tracking import get_available_trackers
from huggingface_hub import HfApi

from .client import Client, ClientSpec
from .client_state import client_folder_name, initial_shared_state
from .config import (
    RecipeConfig,
    build_strategy,
    check_client_layout,
    config_reference,
    config_to_dict,
    load_config,
)
from .data import ClientData, build_client_data, build_client_datasets, mixed_test_splits
from .evaluation import check_paper_protocol
from .model import build_model, load_base
from .modeling_comigs import CoMiGSForCausalLM
from .outputs import write_outputs
from .strategies import Strategy
from .trainer import TrainingConfig, check_accelerator
from .transports.accelerate import Federation, client_state_dir, run_federated, start_federation
from .transports.hub import (
    FederationManifest,
    check_hub_strategy,
    evaluate_hub_client,
    hub_client_id,
    run_hub_client_round,
    seed_hub_rounds,
)

logger = get_logger(__name__)

__all__ = [
    "build_client",
    "build_client_model",
    "evaluate_hub_round",
    "format_results",
    "main",
    "missing_trackers",
    "run",
    "run_hub_round",
    "seed_hub",
    "setup_federation",
]


def default_accelerator(**kwargs: Any) -> Accelerator:
    """An `Accelerator` of the user's accelerate config (device, processes, mixed precision) and environment;
    `kwargs` (trackers, project folder) choose no device or precision.

    A launch of several processes on a machine without an accelerator (`accelerate launch --multi_gpu
    --num_processes 2` on a CPU-only machine; Accelerate 1.15 refuses `--cpu` beside `--multi_gpu`, and `--cpu`
    alone starts one process) leaves Accelerate with no backend: each process would run alone, repeating every
    client's rounds and writing the same checkpoints as the others. The processes join one gloo group on the CPU
    instead."""
    accelerator = Accelerator(**kwargs)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes == 1:
        AcceleratorState._reset_state(reset_partial_state=True)  # nothing was set up: no group, no device
        accelerator = Accelerator(cpu=True, **kwargs)
        logger.warning(
            "no accelerator device for the %d launched processes: they join one gloo group on the CPU.",
            launched,
            main_process_only=True,
        )
    if launched > 1 and accelerator.num_processes != launched:  # an MPI launch may set no WORLD_SIZE
        raise RuntimeError(
            f"accelerate launched {launched} processes but they formed a group of {accelerator.num_processes}; "
            "check the accelerate config (accelerate env) and the launch flags."
        )
    return accelerator


# ---- one client, whatever the transport ----------------------------------------------------------------------------
def build_client_model(
    cfg: RecipeConfig, strategy: Strategy, num_specialists: int, accelerator: Accelerator, progress: bool = False
) -> tuple[CoMiGSForCausalLM, Any]:
    """The recipe's base wrapped into a CoMiGS model with `num_specialists` specialists (another client of the same
    process is swapped into it), on the accelerator's device, and the tokenizer."""
    check_accelerator(accelerator, cfg.training)  # before any download or build
    base, tokenizer, base_name = load_base(cfg.model, progress=progress)
    model = build_model(cfg.model, base, base_name, num_specialists, strategy.expert_mixing).to(accelerator.device)
    check_accelerator(accelerator, cfg.training, model)
    return model, tokenizer


def build_client(
    cfg: RecipeConfig,
    client_id: int,
    *,
    model: CoMiGSForCausalLM,
    data: ClientData,
    state_dir: str | os.PathLike,
    accelerator: Accelerator,
    strategy: Strategy,
    training: TrainingConfig | None = None,
    federation: str | None = None,
    mixed_test: list | None = None,
) -> Client:
    """Client `client_id` of the recipe, on any transport: its settings (its specialists, top-k and rank from the
    model section's per-client lists, its `init_from` folder), its own `data` and the process's `model`.

    Args:
        training ([`~comigs_hf.trainer.TrainingConfig`], *optional*): in place of the recipe's (a pooled client's).
        federation (`str`, *optional*): what names the federation beyond the recipe (a Hub repo id).
        mixed_test (`list[torch.Tensor]`, *optional*): every client's part of the out-of-distribution mixture,
            where the process holds every client's data.
    """
    num_specialists, top_k, lora_rank = cfg.model.client_layout(client_id)
    init_from = None if cfg.init_from is None else str(Path(cfg.init_from) / client_folder_name(client_id, data.name))
    spec = ClientSpec(
        client_id,
        data.name,
        num_specialists,
        strategy,
        training or cfg.training,
        cfg.rounds,
        cfg.seed,
        cfg.evaluation,
        top_k=top_k,
        lora_rank=lora_rank,
        federation=federation,
        init_from=init_from,
    )
    return Client(spec, model, data, state_dir, accelerator, mixed_test=mixed_test)


# ---- Accelerate ----------------------------------------------------------------------------------------------------
def setup_federation(cfg: RecipeConfig, accelerator: Accelerator) -> Federation:
    """Build the model, load and split every client's data, build the clients, and start (or resume) the run."""
    strategy = build_strategy(cfg).check_transport("accelerate")
    if cfg.secure_aggregation:
        raise ValueError(
            "secure_aggregation runs on Flower (comigs flower-sim, flwr run): Accelerate's processes are one "
            "organisation's, and its server step holds every update."
        )
    check_accelerator(accelerator, cfg.training)  # before any download or build
    for algorithm in strategy.algorithms:
        algorithm.check_requirements()
    with accelerator.main_process_first():
        base, tokenizer, base_name = load_base(cfg.model, progress=accelerator.is_main_process)
        datasets = build_client_datasets(cfg.data, tokenizer, cfg.seed)
    counts = check_client_layout(cfg, num_clients=len(datasets))
    # client 0's layout: the shared reference is drawn from it (see client.initial_shared_state)
    model = build_model(cfg.model, base, base_name, counts[0], strategy.expert_mixing).to(accelerator.device)
    check_accelerator(accelerator, cfg.training, model)
    check_paper_protocol([data.test for data in datasets], [data.name for data in datasets], cfg.evaluation)
    mixed_test = mixed_test_splits(datasets) if cfg.evaluation.out_of_distribution else None
    trainers, serving, training = datasets, list(range(len(datasets))), cfg.training
    for algorithm in strategy.algorithms:  # the centralised baseline trains one client for all
        pooled = algorithm.pool(trainers, training)
        if pooled is not None:
            trainers, serving, training = pooled
    if len(trainers) < accelerator.num_processes:
        logger.warning(
            "strategy %r trains %d client(s) on %d processes: the others wait for them.",
            strategy.name,
            len(trainers),
            accelerator.num_processes,
        )
    state_dir = client_state_dir(cfg.output_dir)
    clients = [
        build_client(
            cfg,
            client_id,
            model=model,
            data=data,
            state_dir=state_dir,
            accelerator=accelerator,
            strategy=strategy,
            training=training,
            mixed_test=mixed_test,
        )
        for client_id, data in enumerate(trainers)
    ]
    layout = {
        "num_specialists": counts,
        "top_k": [cfg.model.client_top_k(count) for count in counts],
        "lora_r": cfg.model.client_lora_ranks(len(datasets)),
    }
    federation = Federation(
        model,
        tokenizer,
        strategy,
        cfg,
        clients,
        datasets,
        serving,
        layout,
        cfg.evaluation,
        identity=config_to_dict(cfg),
    )
    return start_federation(federation, accelerator)


def run(cfg: RecipeConfig, accelerator: Accelerator) -> dict:
    """Run (or resume) the recipe's federation over Accelerate and write its outputs; returns `results.json`."""
    federation = run_federated(setup_federation(cfg, accelerator), accelerator)
    return write_outputs(federation, cfg, accelerator)


def format_results(results: dict) -> str:
    """One line per client with its test perplexity and traffic, then the mean."""
    lines = [
        f"strategy={results['strategy']} rounds={results['rounds']} seed={results['seed']}",
        f"{'client':<24}{'experts':>8}{'test loss':>11}{'test ppl':>10}{'sent MiB':>10}{'recv MiB':>10}",
    ]
    for client in results["clients"]:
        experts = f"{client['num_generalists']}+{client['num_specialists']}"
        lines.append(
            f"{client['name'][:23]:<24}{experts:>8}"
            f"{client['test_loss']:>11.4f}{client['test_ppl']:>10.2f}"
            f"{client['bytes_sent'] / 2**20:>10.2f}{client['bytes_received'] / 2**20:>10.2f}"
        )
    lines.append(f"{'mean':<32}{'':>11}{results['mean_test_ppl']:>10.2f}")
    return "\n".join(lines)


def missing_trackers(names: list[str]) -> list[str]:
    """The trackers among `names` that are not installed (`"all"` and `"none"` name no one tracker)."""
    available = {t.value for t in get_available_trackers()}
    return [name for name in names if name not in ("all", "none") and name not in available]


def _keys_help() -> str:
    lines = ["config keys (KEY=VALUE overrides; the README's configuration reference):"]
    for key, default, meaning in config_reference():
        lines += [
            f"  {key} (default: {default})",
            *textwrap.wrap(meaning, 100, initial_indent="      ", subsequent_indent="      "),
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, epilog=_keys_help(), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="YAML recipe (see recipes/configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value, dotted for sections: training.local_steps=5")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from error

    trackers = [t for t in cfg.trackers if t != "none"]
    accelerator = default_accelerator(log_with=trackers or None, project_dir=cfg.output_dir)
    for name in missing_trackers(trackers):  # Accelerate drops them without a word
        logger.warning("tracker %r is not installed, so this run does not log to it (pip install %s).", name, name)
    accelerator.init_trackers(f"comigs-{cfg.strategy}", config=_flat(config_to_dict(cfg)))
    results = run(cfg, accelerator)
    if accelerator.is_main_process:
        print(format_results(results))
        print(f"outputs: {cfg.output_dir}")
    accelerator.end_training()
    return results


def _flat(tree: dict, prefix: str = "") -> dict:
    # trackers take flat scalar hyper-parameters
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


# ---- Hub-mediated rounds -------------------------------------------------------------------------------------------
def _hub_client(
    cfg: RecipeConfig, client_id: int, repo_id: str, state_dir: str | os.PathLike, accelerator: Accelerator | None
) -> Client:
    """One client of Hub rounds: the recipe's model and its own data (no other client's source is opened)."""
    strategy = check_hub_strategy(build_strategy(cfg), cfg.model.num_generalists)
    accelerator = _one_process(accelerator)
    num_specialists, _, _ = cfg.model.client_layout(client_id)
    model, tokenizer = build_client_model(cfg, strategy, num_specialists, accelerator, progress=True)
    data = build_client_data(cfg.data, tokenizer, cfg.seed, client_id)
    check_paper_protocol([data.test], [data.name], cfg.evaluation)
    return build_client(
        cfg,
        client_id,
        model=model,
        data=data,
        state_dir=state_dir,
        accelerator=accelerator,
        strategy=strategy,
        federation=repo_id,
    )


def _one_process(accelerator: Accelerator | None) -> Accelerator:
    accelerator = accelerator if accelerator is not None else default_accelerator()
    if accelerator.num_processes != 1:
        raise ValueError(
            f"A Hub client or coordinator is one process, got {accelerator.num_processes}; run several clients as "
            "separate processes instead."
        )
    return accelerator


def seed_hub(
    cfg: RecipeConfig,
    repo_id: str,
    *,
    num_clients: int | None = None,
    client_users: Sequence[str] | None = None,
    aggregator_user: str | None = None,
    token: str | bool | None = None,
    private: bool | None = None,
    accelerator: Accelerator | None = None,
) -> str:
    """Push the recipe's round-1 global generalist, tagged `round-1`: the tensors the Accelerate rounds start from,
    with the federation's manifest (`comigs_hf.transports.hub.federation`): its clients `client-0000` ... fixed now.

    Needs the base model but no client data. Publishing again with the same config is a no-op.

    Args:
        num_clients (`int`, *optional*): the federation's clients; defaults to what the data section says, or to
            the number of `client_users`.
        client_users (`Sequence[str]`, *optional*): each client's Hub user, in client order: only their commits
            carry their updates.
        aggregator_user (`str`, *optional*): the Hub user that runs `aggregate_round`: only its commits publish
            rounds (with `client_users`, defaults to the user of `token`).

    Raises:
        `ValueError`: a recipe the Hub rounds cannot carry (see `comigs_hf.transports.hub.check_hub_strategy`), an
        unknown number of clients, or `round-1` already tagged on other content.
    """
    strategy = check_hub_strategy(build_strategy(cfg), cfg.model.num_generalists)
    num_clients = num_clients or cfg.data.num_clients_known() or (len(client_users) if client_users else None)
    if num_clients is None:
        raise ValueError(
            f"A Hub federation fixes its clients when it is seeded, but {cfg.data.describe_client_count()}: pass "
            "num_clients (comigs hub-seed --num-clients N)."
        )
    clients = [hub_client_id(i) for i in range(num_clients)]
    if client_users is not None and len(client_users) != num_clients:
        raise ValueError(f"client_users names {len(client_users)} Hub users for {num_clients} clients.")
    if client_users is not None or aggregator_user is not None:
        # the round-1 commit is the trust root: the aggregator's own commit, so that its check of the tag holds
        seeder = HfApi().whoami(token=token)["name"]
        if aggregator_user not in (None, seeder):
            raise ValueError(
                f"The federation's aggregator is {aggregator_user!r}, but this token belongs to {seeder!r}: seed with "
                "the aggregator's token (round-1 must be its commit)."
            )
        aggregator_user = seeder
    users = dict(zip(clients, client_users)) if client_users is not None else None
    manifest = FederationManifest(tuple(clients), aggregator_user, users)
    if cfg.init_from is not None:
        raise ValueError("init_from is not supported on Hub rounds: each client starts from its recipe's fresh state.")
    accelerator = _one_process(accelerator)
    num_specialists, top_k, _ = cfg.model.client_layout(0)
    model, _ = build_client_model(cfg, strategy, num_specialists, accelerator, progress=True)
    shared = initial_shared_state(model, strategy, num_specialists, cfg.seed, top_k)
    return seed_hub_rounds(model, shared, repo_id, strategy=strategy, token=token, private=private, manifest=manifest)


def run_hub_round(
    cfg: RecipeConfig,
    client_id: int,
    round_index: int,
    repo_id: str,
    state_dir: str | os.PathLike,
    *,
    token: str | bool | None = None,
    accelerator: Accelerator | None = None,
) -> dict[str, Any]:
    """Client `client_id`'s round `round_index` through the Hub, built from the recipe (see
    `comigs_hf.transports.hub.run_hub_client_round`); only this client's data source is opened."""
    if cfg.secure_aggregation:
        raise ValueError(
            "secure_aggregation runs on Flower (comigs flower-sim, flwr run): every Hub client's update is a file "
            "the aggregator reads."
        )
    client = _hub_client(cfg, client_id, repo_id, state_dir, accelerator)
    return run_hub_client_round(client, repo_id, round_index, token=token)


def evaluate_hub_round(
    cfg: RecipeConfig,
    client_id: int,
    round_index: int,
    repo_id: str,
    state_dir: str | os.PathLike,
    *,
    token: str | bool | None = None,
    accelerator: Accelerator | None = None,
) -> dict[str, Any]:
    """Client `client_id`'s test metrics after round `round_index` of Hub rounds (see
    `comigs_hf.transports.hub.evaluate_hub_client`)."""
    client = _hub_client(cfg, client_id, repo_id, state_dir, accelerator)
    return evaluate_hub_client(client, repo_id, round_index, token=token)


if __name__ == "__main__":  # `accelerate launch --module comigs_hf.recipe ...`, as `comigs table` launches runs
    main()
