"""Hub-mediated rounds: clients that never talk to each other federate through one Hub repository.

The Hub repo replaces `rounds._exchange`. With the same recipe config, the rounds below give the global generalist and
the client metrics that `rounds.run_federated` gives, because each piece is the one `rounds.py` uses: the client view
comes from `setup_federation`, the round-1 global from `initial_shared_state`, training from `train_client_round`
seeded with `derived_seed(cfg.seed, t, client_id)`, and the average from `aggregate_round` (token-weighted mean,
accumulated in float64, in client order).

```
coordinator   seed_hub_rounds(cfg, repo_id)                                 pushes the global tagged round-1
client i      run_hub_client_round(cfg, i, t, repo_id, state_dir)           pulls round-<t>, trains, submits
coordinator   aggregate_round(repo_id, t, min_clients=N, timeout_s=...)     publishes round-<t+1>
client i      evaluate_hub_client(cfg, i, t, repo_id, state_dir)            test metrics after round t
```

Only the generalist leaves a client (strategy `comigs`, one generalist): its specialists, router, optimiser states,
step counters and sampler stay in `state_dir/client-<i>.pt`, replaced atomically after each round and read back with
`torch.load(..., weights_only=True)`. What comes from the Hub is read with safetensors only (`load_generalist`).

A client that dies after saving its state but before its upload landed is re-run with the same round: it finds the
round already trained and uploads the saved update again, without training twice.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from .config import RecipeConfig, build_strategy
from .hub import pull_global, push_generalist_to_hub, round_tag, submit_update
from .metrics import load_perplexity
from .rounds import (
    ALL_ROLES,
    Federation,
    build_model,
    derived_seed,
    initial_shared_state,
    load_base,
    setup_federation,
)
from .strategies import Strategy, partition_state_dict, payload_bytes
from .trainer import ClientState, activate_client, evaluate_client, train_client_round

__all__ = [
    "client_state_path",
    "evaluate_hub_client",
    "hub_client_id",
    "run_hub_client_round",
    "seed_hub_rounds",
]

STATE_FORMAT = "comigs-hub-client-v1"
# a client's state must come from the same federation: these recipe values change what a round computes
_RUN_KEYS = ("repo_id", "seed", "rounds", "name", "num_specialists")


def hub_client_id(client_id: int) -> str:
    """The folder name of client `client_id`'s updates in the repo (`updates/round-<t>/<name>`).

    Zero-padded because `aggregate_round` averages in the order of these names: padded, that is client order (as in
    `run_round`) up to 10,000 clients, so the float sums are taken in the same order.
    """
    return f"client-{client_id:04d}"


def client_state_path(state_dir: str | os.PathLike, client_id: int) -> Path:
    """Where client `client_id` keeps its private state between rounds: `state_dir/client-<client_id>.pt`."""
    return Path(state_dir) / f"client-{client_id}.pt"


def _check_hub_recipe(cfg: RecipeConfig) -> Strategy:
    """The strategy, if `aggregate_round` can carry it: only one generalist shared, averaged by training tokens."""
    strategy = build_strategy(cfg)
    if strategy.shared_roles != {"generalist"}:
        shared = ", ".join(sorted(strategy.shared_roles)) or "nothing"
        raise ValueError(
            f"Hub rounds share the generalist only (strategy 'comigs'), but strategy {cfg.strategy!r} shares "
            f"{shared}: specialists and routers never leave a client."
        )
    if strategy.aggregation != "weighted_mean" or strategy.weighting != "train_tokens":
        raise ValueError(
            f"Hub rounds aggregate with aggregate_round (weighted_mean over training tokens), but the recipe asks for "
            f"aggregation={strategy.aggregation!r} with weighting={strategy.weighting!r}."
        )
    if cfg.model.num_generalists != 1:
        raise ValueError(
            f"Hub rounds carry one generalist per repo (the adapter at its root), but model.num_generalists is "
            f"{cfg.model.num_generalists}."
        )
    return strategy


def _accelerator(accelerator: Accelerator | None) -> Accelerator:
    accelerator = accelerator if accelerator is not None else Accelerator(cpu=not torch.cuda.is_available())
    if accelerator.num_processes != 1:
        raise ValueError(
            f"A Hub client or coordinator is one process, got {accelerator.num_processes}; run several clients as "
            "separate processes instead."
        )
    return accelerator


def _first_count(cfg: RecipeConfig) -> int:
    counts = cfg.model.num_specialists
    return counts if isinstance(counts, int) else counts[0]


# ---- coordinator -----------------------------------------------------------------------------------------------


def seed_hub_rounds(
    cfg: RecipeConfig,
    repo_id: str,
    *,
    token: str | bool | None = None,
    private: bool | None = None,
    accelerator: Accelerator | None = None,
) -> str:
    """Push the global generalist that round 1 starts from, tagged `round-1`: the same tensors as the shared state
    `rounds.initialise_states` draws, so Hub rounds and `run_federated` start equal.

    Needs the base model but no client data. Publishing again with the same config is a no-op.

    Args:
        cfg ([`RecipeConfig`]): the recipe every client runs.
        repo_id (`str`): the shared repo, created if missing.
        token (`str` or `bool`, *optional*): Hub token; defaults to `HF_TOKEN` or the stored login.
        private (`bool`, *optional*): visibility of a newly created repo.
        accelerator (`Accelerator`, *optional*): one process; defaults to the GPU when there is one.

    Returns:
        `str`: the sha of the commit tagged `round-1`.

    Raises:
        `ValueError`: a recipe the Hub rounds cannot carry (see [`run_hub_client_round`]), or `round-1` already
        tagged on other content.
    """
    strategy = _check_hub_recipe(cfg)
    accelerator = _accelerator(accelerator)
    base, _, base_name = load_base(cfg, accelerator)
    num_specialists = _first_count(cfg)
    model = build_model(cfg, base, base_name, num_specialists, accelerator)
    # drawing the reference leaves it in the model; loading it again states what is pushed
    model.load_role_state_dict(initial_shared_state(model, cfg, strategy, num_specialists))
    return push_generalist_to_hub(model, repo_id, round=1, strategy=cfg.strategy, private=private, token=token)


# ---- client ----------------------------------------------------------------------------------------------------


def _run_values(cfg: RecipeConfig, repo_id: str, name: str, num_specialists: int) -> dict[str, Any]:
    return {"repo_id": repo_id, "seed": cfg.seed, "rounds": cfg.rounds, "name": name,
            "num_specialists": num_specialists}


def _load_saved(path: Path, client_id: int) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    # weights_only: tensors, numbers, strings and plain containers, never arbitrary objects
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or saved.get("format") != STATE_FORMAT or saved.get("client_id") != client_id:
        raise ValueError(f"{path} is not the Hub-round state of client {client_id} (format {STATE_FORMAT!r}).")
    return saved


def _check_saved(saved: dict[str, Any], expected: dict[str, Any], path: Path) -> None:
    differing = [f"{key}={saved['run'].get(key)!r}, now {expected[key]!r}" for key in _RUN_KEYS
                 if saved["run"].get(key) != expected[key]]
    if differing:
        raise ValueError(f"{path} belongs to another federation or recipe: {'; '.join(differing)}.")


def _save_atomically(path: Path, payload: dict[str, Any]) -> None:
    """Write next to `path`, flush to disk, rename over it: a kill leaves the previous round's state whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(staging, "wb") as handle:
        torch.save(payload, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staging, path)


def _client_view(cfg: RecipeConfig, client_id: int, accelerator: Accelerator) -> Federation:
    """`setup_federation` for one client: its data, fresh state and the model; the other clients' states dropped."""
    # the Hub client's resume point is its state_dir, never the Accelerate run's checkpoints in output_dir
    federation = setup_federation(dataclasses.replace(cfg, resume=False), accelerator)
    if not 0 <= client_id < len(federation.clients):
        raise ValueError(f"client_id must be in [0, {len(federation.clients)}), got {client_id}.")
    federation.states = {client_id: federation.states[client_id]}
    federation.shared = {}  # round t's global comes from the Hub
    return federation


def run_hub_client_round(
    cfg: RecipeConfig,
    client_id: int,
    round_index: int,
    repo_id: str,
    state_dir: str | os.PathLike,
    *,
    token: str | bool | None = None,
    accelerator: Accelerator | None = None,
) -> dict[str, Any]:
    """One client's round through the Hub: pull the global `round-<t>`, train as `run_round` does, submit.

    The client's private state (specialists, router, optimiser states, step counters, sampler) starts fresh in round
    1 exactly as `initialise_states` draws it, and is read from `state_dir` in later rounds; it is saved atomically
    after training, then the generalist is uploaded with [`~comigs_hf.hub.submit_update`] under
    [`hub_client_id`]`(client_id)`, weighted by its training tokens. Calling again for a round already trained
    uploads the saved update again without training (for a client killed between saving and uploading).

    Args:
        cfg ([`RecipeConfig`]): the recipe, the same on every client and for the whole run (`rounds` sets the
            learning-rate schedule, `seed` the sampling).
        client_id (`int`): the client's position in the data partition.
        round_index (`int`): the round to train, from 1 to `cfg.rounds`; the client must have trained round
            `round_index - 1`.
        repo_id (`str`): the shared repo, seeded with [`seed_hub_rounds`].
        state_dir (`str` or `os.PathLike`): the client's private folder (several clients may share one).
        token (`str` or `bool`, *optional*): Hub token; defaults to `HF_TOKEN` or the stored login.
        accelerator (`Accelerator`, *optional*): one process; defaults to the GPU when there is one.

    Returns:
        `dict`: `round`, `client_id`, `name`, `train_tokens`, `train_loss`, `router_loss`, `bytes_sent` (as a row of
        `run_round`'s record) and `commit_sha` of the upload.

    Raises:
        `ValueError`: a strategy sharing more than the generalist, another aggregation rule or weighting, more than
        one generalist, a round out of order or out of `[1, cfg.rounds]`, or a state from another federation.
        `huggingface_hub.errors.RevisionNotFoundError`: `round-<t>` is not published yet.
    """
    strategy = _check_hub_recipe(cfg)
    if isinstance(round_index, bool) or not isinstance(round_index, int) or not 1 <= round_index <= cfg.rounds:
        raise ValueError(f"round_index must be in [1, rounds={cfg.rounds}], got {round_index!r}.")
    path = client_state_path(state_dir, client_id)
    saved = _load_saved(path, client_id)
    done = saved["round"] if saved is not None else 0
    if done not in (round_index - 1, round_index):
        raise ValueError(
            f"Client {client_id} has trained up to round {done} ({path}), so it cannot train round {round_index}: "
            f"run round {done + 1} next."
        )
    accelerator = _accelerator(accelerator)
    federation = _client_view(cfg, client_id, accelerator)
    model, data = federation.model, federation.clients[client_id]
    expected = _run_values(cfg, repo_id, data.name, federation.num_specialists[client_id])
    if saved is not None:
        _check_saved(saved, expected, path)
        state = ClientState.from_checkpoint(saved["state"])
    else:
        state = federation.states[client_id]

    if done == round_index:
        # trained and saved by an earlier call whose upload may not have landed: the state holds its generalist
        record = saved["record"]
        activate_client(model, state, {})
    else:
        activate_client(model, state, {})
        pull_global(model, repo_id, round_index, token=token)
        torch.manual_seed(derived_seed(cfg.seed, round_index, client_id))
        total_steps = cfg.rounds * cfg.training.local_steps
        result = train_client_round(model, state, data, cfg.training, total_steps, accelerator)
        trained = {k: v.cpu() for k, v in model.role_state_dict(*ALL_ROLES).items()}
        shared, _ = partition_state_dict(trained, strategy)
        # unlike run_round, the trained generalist stays in the saved state too (the next round's pull overwrites
        # it): a re-run of this round re-uploads it from there
        state.parameters = trained
        record = {
            "round": round_index,
            "client_id": client_id,
            "name": data.name,
            "train_tokens": result.train_tokens,
            "train_loss": result.train_loss,
            "router_loss": result.router_loss,
            "bytes_sent": payload_bytes(shared),
        }
        _save_atomically(path, {"format": STATE_FORMAT, "client_id": client_id, "round": round_index,
                                "run": expected, "record": record, "state": state.to_checkpoint()})
    sha = submit_update(model, repo_id, hub_client_id(client_id), round_index, record["train_tokens"], token=token)
    return {**record, "commit_sha": sha}


def evaluate_hub_client(
    cfg: RecipeConfig,
    client_id: int,
    round_index: int,
    repo_id: str,
    state_dir: str | os.PathLike,
    *,
    token: str | bool | None = None,
    accelerator: Accelerator | None = None,
) -> dict[str, Any]:
    """Test metrics of a client after round `round_index`, as `run_round` evaluates them: its private state after
    that round with the global generalist aggregated from it (tag `round-<t+1>`).

    Args:
        cfg, client_id, repo_id, state_dir, token, accelerator: as in [`run_hub_client_round`].
        round_index (`int`): the round just aggregated; the client's saved state must be from that round.

    Returns:
        `dict`: `round`, `client_id`, `name` and [`~comigs_hf.trainer.evaluate_client`]'s `test_loss`, `test_ppl`,
        `test_tokens` and `routing`.

    Raises:
        `ValueError`: no saved state for that round, or a state from another federation.
        `huggingface_hub.errors.RevisionNotFoundError`: round `round_index` is not aggregated yet.
    """
    _check_hub_recipe(cfg)
    path = client_state_path(state_dir, client_id)
    saved = _load_saved(path, client_id)
    if saved is None or saved["round"] != round_index:
        found = f"round {saved['round']}" if saved is not None else "nothing"
        raise ValueError(f"Client {client_id} has {found} saved in {path}; evaluating round {round_index} needs it.")
    accelerator = _accelerator(accelerator)
    federation = _client_view(cfg, client_id, accelerator)
    model, data = federation.model, federation.clients[client_id]
    _check_saved(saved, _run_values(cfg, repo_id, data.name, federation.num_specialists[client_id]), path)
    activate_client(model, ClientState.from_checkpoint(saved["state"]), {})
    pull_global(model, repo_id, round_index + 1, token=token)
    metric = load_perplexity(keep_in_memory=True, process_id=0, num_process=1,
                             experiment_id=f"hub-client-{client_id}-{round_tag(round_index + 1)}")
    metrics = evaluate_client(model, data.test, cfg.training, accelerator, metric)
    return {"round": round_index, "client_id": client_id, "name": data.name, **metrics}
