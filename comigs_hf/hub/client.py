"""The client side of Hub-mediated rounds: clients that never talk to each other federate through one Hub repository.

The repo replaces the Accelerate transport's collective; the protocol is the same. A client pulls the global tagged
`round-<t>`, runs the client step (`trainer.run_client_round`, seeded as every transport seeds it), and uploads the
update's generalist with [`~comigs_hf.hub.updates.submit_update`]; the aggregator runs the server step
(`server.aggregate_updates` inside [`~comigs_hf.hub.aggregator.aggregate_round`]) and publishes `round-<t+1>`. With
the same recipe, the results equal the Accelerate run's.

```
coordinator   seed_hub_rounds(model, shared, repo_id)                      pushes the global tagged round-1
client i      run_hub_client_round(model, data, client, round_index=t)     pulls round-<t>, trains, submits
coordinator   aggregate_round(repo_id, t, strategy=..., min_clients=N)     publishes round-<t+1>
client i      evaluate_hub_client(model, data, client, round_index=t)      test metrics after round t
```

These take built objects (a model, the client's own data); `comigs_hf.recipe` builds them from a recipe config.

Only the generalist leaves a client: its specialists, router, optimiser states, step counters and sampler stay in
`state_dir/client-<i>.pt`, replaced atomically after each round and read back with
`torch.load(..., weights_only=True)`. What comes from the Hub is read with safetensors only and checked
([`~comigs_hf.adapters.read_generalist`]).

A client that dies after saving its state but before its upload landed is re-run with the same round: it finds the
round already trained and uploads the saved update again, without training twice.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from huggingface_hub import HfApi

from ..adapters import read_generalist
from ..data import ClientData
from ..evaluation import EvaluationConfig, evaluate_client, evaluation_seed, fusion_seed, fusion_weights
from ..modeling_comigs import CoMiGSForCausalLM
from ..strategies import Strategy, lora_ranks, payload_bytes
from ..trainer import (
    ClientState,
    TrainingConfig,
    activate_client,
    check_saved_run,
    initial_client_state,
    run_client_round,
    save_state_atomically,
)
from .federation import MANIFEST_NAME, FederationManifest, published_round_commit
from .repo import check_hub_strategy, push_generalist_to_hub, round_tag
from .updates import submit_update

STATE_FORMAT = "comigs-hub-client-v2"
# a client's state must come from the same federation: these values change what a round computes
_RUN_KEYS = ("repo_id", "seed", "rounds", "name", "num_specialists", "lora_rank")


@dataclass(frozen=True)
class HubClient:
    """Who a client is in a Hub-mediated federation and the run it belongs to (the same on every client).

    Args:
        repo_id (`str`): the shared repo, seeded with [`seed_hub_rounds`].
        client_id (`int`): the client's position in the data partition.
        num_specialists (`int`): its specialists.
        state_dir (`str` or `os.PathLike`): its private folder (several clients may share one).
        strategy ([`~comigs_hf.strategies.Strategy`]): must share the generalist only.
        training ([`~comigs_hf.trainer.TrainingConfig`]): local optimisation.
        rounds (`int`): rounds in the run (sets the learning-rate schedule).
        seed (`int`): the run's seed.
        token (`str` or `bool`, *optional*): Hub token; defaults to `HF_TOKEN` or the stored login.
        evaluation ([`~comigs_hf.evaluation.EvaluationConfig`], *optional*): what an evaluation measures (in
            distribution only: a Hub client holds no other client's test data).
        lora_rank (`int`, *optional*): its experts' rank when below the model's (FlexLoRA, HetLoRA); `None`: the
            model's `lora_r`.
    """

    repo_id: str
    client_id: int
    num_specialists: int
    state_dir: str | os.PathLike
    strategy: Strategy
    training: TrainingConfig
    rounds: int
    seed: int
    token: str | bool | None = None
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    lora_rank: int | None = None

    @property
    def state_path(self) -> Path:
        return client_state_path(self.state_dir, self.client_id)

    @property
    def folder(self) -> str:
        return hub_client_id(self.client_id)


def hub_client_id(client_id: int) -> str:
    """The folder name of client `client_id`'s updates in the repo (`updates/round-<t>/<name>`).

    Zero-padded because `aggregate_round` averages in the order of these names: padded, that is client order (as in
    the Accelerate rounds) up to 10,000 clients, so the float sums are taken in the same order.
    """
    return f"client-{client_id:04d}"


def client_state_path(state_dir: str | os.PathLike, client_id: int) -> Path:
    """Where client `client_id` keeps its private state between rounds: `state_dir/client-<client_id>.pt`."""
    return Path(state_dir) / f"client-{client_id}.pt"


# ---- coordinator -----------------------------------------------------------------------------------------------


def seed_hub_rounds(
    model: CoMiGSForCausalLM,
    shared: dict[str, torch.Tensor],
    repo_id: str,
    *,
    strategy: Strategy,
    token: str | bool | None = None,
    private: bool | None = None,
    manifest: FederationManifest | None = None,
) -> str:
    """Push the global generalist that round 1 starts from, tagged `round-1`, with the federation's manifest.

    Args:
        model ([`CoMiGSForCausalLM`]): a model of the federation's layout; `shared` is loaded into it.
        shared (`dict[str, torch.Tensor]`): the initial global shared state
            ([`~comigs_hf.trainer.initial_shared_state`], as the Accelerate rounds draw it).
        repo_id (`str`): the shared repo, created if missing.
        strategy ([`~comigs_hf.strategies.Strategy`]): must share the generalist only.
        token (`str` or `bool`, *optional*): Hub token; defaults to `HF_TOKEN` or the stored login.
        private (`bool`, *optional*): visibility of a newly created repo.
        manifest ([`~comigs_hf.hub.federation.FederationManifest`], *optional*): who takes part, written as
            `federation.json` into the same commit: only its client ids count, and where it names Hub users, only
            their commits (see `comigs_hf.hub.federation`). Without one, any client id counts.

    Returns:
        `str`: the sha of the commit tagged `round-1`. Publishing the same state again is a no-op.
    """
    check_hub_strategy(strategy, model.config.num_generalists)
    model.load_role_state_dict(shared)
    extra = {MANIFEST_NAME: manifest.to_json()} if manifest is not None else None
    return push_generalist_to_hub(
        model, repo_id, round=1, strategy=strategy.name, private=private, token=token, extra_files=extra
    )


# ---- client ----------------------------------------------------------------------------------------------------


def _run_values(client: HubClient, name: str) -> dict[str, Any]:
    return {
        "repo_id": client.repo_id,
        "seed": client.seed,
        "rounds": client.rounds,
        "name": name,
        "num_specialists": client.num_specialists,
        "lora_rank": client.lora_rank,
    }


def _load_saved(client: HubClient) -> dict[str, Any] | None:
    path = client.state_path
    if not path.is_file():
        return None
    # weights_only: tensors, numbers, strings and plain containers, never arbitrary objects
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if (
        not isinstance(saved, dict)
        or saved.get("format") != STATE_FORMAT
        or saved.get("client_id") != client.client_id
    ):
        raise ValueError(f"{path} is not the Hub-round state of client {client.client_id} (format {STATE_FORMAT!r}).")
    return saved


def _check_saved(saved: dict[str, Any], expected: dict[str, Any], path: Path) -> None:
    check_saved_run(saved["run"], expected, _RUN_KEYS, path)


def _round_revision(client: HubClient, round_index: int) -> str:
    """The commit of the global `round-<t>` once its tag is checked against the federation's manifest (read by sha,
    so a tag moved after the check changes nothing); the tag itself while it does not exist (the download says so).

    Raises:
        `ValueError`: the tag names a commit the federation's aggregator did not make.
    """
    return published_round_commit(HfApi(), client.repo_id, round_index, client.token) or round_tag(round_index)


def _check_round(client: HubClient, round_index: Any) -> None:
    if isinstance(round_index, bool) or not isinstance(round_index, int) or not 1 <= round_index <= client.rounds:
        raise ValueError(f"round_index must be in [1, rounds={client.rounds}], got {round_index!r}.")


def run_hub_client_round(
    model: CoMiGSForCausalLM,
    data: ClientData,
    client: HubClient,
    round_index: int,
    accelerator: Accelerator,
) -> dict[str, Any]:
    """One client's round through the Hub: pull the global `round-<t>`, run the client step, submit its update.

    The client's private state starts fresh in round 1 exactly as the Accelerate rounds draw it
    ([`~comigs_hf.trainer.initial_client_state`]) and is read from `client.state_dir` in later rounds; the state and
    the update are saved atomically after training, then the generalist is uploaded under
    [`hub_client_id`]`(client_id)` with the training split's token count as its weight. Calling again for a round
    already trained uploads the saved update again without training.

    Args:
        model ([`CoMiGSForCausalLM`]): a model of the federation's layout; the client is swapped into it.
        data ([`~comigs_hf.data.ClientData`]): this client's data, and no other's.
        client ([`HubClient`]): who the client is and the run's settings.
        round_index (`int`): the round to train, from 1 to `client.rounds`; the client must have trained round
            `round_index - 1`.
        accelerator (`Accelerator`): one process.

    Returns:
        `dict`: `round`, `client_id`, `name`, `train_tokens`, `train_loss`, `router_loss`, `tokens_seen`,
        `bytes_sent` (as a row of the Accelerate rounds' record) and `commit_sha` of the upload.

    Raises:
        `ValueError`: a strategy sharing more than the generalist, more than one generalist, a round out of order or
        out of `[1, rounds]`, or a state from another federation.
        `huggingface_hub.errors.RevisionNotFoundError`: `round-<t>` is not published yet.
    """
    check_hub_strategy(client.strategy, model.config.num_generalists)
    _check_round(client, round_index)
    saved = _load_saved(client)
    done = saved["round"] if saved is not None else 0
    if done not in (round_index - 1, round_index):
        raise ValueError(
            f"Client {client.client_id} has trained up to round {done} ({client.state_path}), so it cannot train "
            f"round {round_index}: run round {done + 1} next."
        )
    expected = _run_values(client, data.name)
    if saved is not None:
        _check_saved(saved, expected, client.state_path)
        state = ClientState.from_checkpoint(saved["state"])
    else:
        state = initial_client_state(
            model,
            client.client_id,
            data.name,
            client.num_specialists,
            client.seed,
            frozen_factors=client.strategy.frozen_factors,
            lora_rank=client.lora_rank,
        )

    if done == round_index:
        # trained and saved by an earlier call whose upload may not have landed: put its update back into the model
        record = saved["record"]
        activate_client(model, state, saved["shared"])
    else:
        shared = read_generalist(
            model, client.repo_id, revision=_round_revision(client, round_index), token=client.token
        )
        update = run_client_round(
            model,
            state,
            data,
            shared,
            client.strategy,
            client.training,
            round_index=round_index,
            total_rounds=client.rounds,
            seed=client.seed,
            accelerator=accelerator,
        )
        record = {
            "round": round_index,
            "client_id": client.client_id,
            "name": data.name,
            "train_tokens": update.train_tokens,
            **update.metrics,
            "bytes_sent": payload_bytes(update.shared, lora_ranks(update.shared)),
        }
        save_state_atomically(
            client.state_path,
            {
                "format": STATE_FORMAT,
                "client_id": client.client_id,
                "round": round_index,
                "run": expected,
                "record": record,
                "state": state.to_checkpoint(),
                "shared": update.shared,
            },
        )
    sha = submit_update(model, client.repo_id, client.folder, round_index, record["train_tokens"], token=client.token)
    return {**record, "commit_sha": sha}


def evaluate_hub_client(
    model: CoMiGSForCausalLM,
    data: ClientData,
    client: HubClient,
    round_index: int,
    accelerator: Accelerator,
) -> dict[str, Any]:
    """Test metrics of a client after round `round_index`, as the Accelerate rounds evaluate them: its private state
    after that round with the global generalist aggregated from it (tag `round-<t+1>`).

    Args:
        model, data, client, accelerator: as in [`run_hub_client_round`].
        round_index (`int`): the round just aggregated; the client's saved state must be from that round.

    Returns:
        `dict`: `round`, `client_id`, `name` and [`~comigs_hf.evaluation.evaluate_client`]'s in-distribution
        figures (`test_loss`, `test_ppl`, `test_tokens`, `routing`, and the paper protocol's `paper_test_*`).

    Raises:
        `ValueError`: no saved state for that round, or a state from another federation.
        `huggingface_hub.errors.RevisionNotFoundError`: round `round_index` is not aggregated yet.
    """
    check_hub_strategy(client.strategy, model.config.num_generalists)
    saved = _load_saved(client)
    if saved is None or saved["round"] != round_index:
        found = f"round {saved['round']}" if saved is not None else "nothing"
        raise ValueError(
            f"Client {client.client_id} has {found} saved in {client.state_path}; evaluating round {round_index} "
            "needs it."
        )
    _check_saved(saved, _run_values(client, data.name), client.state_path)
    shared = read_generalist(
        model, client.repo_id, revision=_round_revision(client, round_index + 1), token=client.token
    )
    activate_client(model, ClientState.from_checkpoint(saved["state"]), shared)
    fused = {}
    if client.strategy.fusion_budget and round_index == client.rounds:  # FD-LoRA, as the Accelerate rounds fuse
        weights, _ = fusion_weights(
            model,
            data.validation,
            client.strategy,
            client.evaluation,
            accelerator,
            fusion_seed(client.seed, client.client_id),
        )
        fused = {"fusion_weights": weights}
    seed = evaluation_seed(client.seed, round_index, client.client_id)
    metrics = evaluate_client(model, data.test, client.evaluation, accelerator, seed=seed)
    return {"round": round_index, "client_id": client.client_id, "name": data.name, **metrics, **fused}


__all__ = [
    "HubClient",
    "client_state_path",
    "evaluate_hub_client",
    "hub_client_id",
    "run_hub_client_round",
    "seed_hub_rounds",
]
