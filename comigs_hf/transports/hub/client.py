"""The client side of Hub-mediated rounds: clients that never talk to each other federate through one Hub repository.

The repo replaces the Accelerate transport's collective; the protocol is the same. A client
([`~comigs_hf.client.Client`], as on every transport) pulls the global tagged `round-<t>`, runs its round
(`Client.train`, seeded as every transport seeds it), and uploads its update's shared tensors with
[`~comigs_hf.transports.hub.updates.submit_update`]; the aggregator runs the server step (`server.server_step`
inside [`~comigs_hf.transports.hub.aggregator.aggregate_round`]) and publishes `round-<t+1>`. With the same recipe,
the results equal the Accelerate run's.

```
coordinator   seed_hub_rounds(model, shared, repo_id)                  pushes the global tagged round-1
client i      run_hub_client_round(client, repo_id, round_index=t)     pulls round-<t>, trains, submits
coordinator   aggregate_round(repo_id, t, strategy=..., min_clients=N)   publishes round-<t+1>
client i      evaluate_hub_client(client, repo_id, round_index=t)      test metrics after round t
```

These take built objects (a client with its model and its own data); `comigs_hf.recipe` builds them from a recipe
config.

What leaves a client is its update's shared tensors (the generalist, clipped under differential privacy), written
as a PEFT adapter: its specialists, router, optimiser states, step counters and sampler stay in its state folder
(`comigs_hf.client`). What comes from the Hub is read with safetensors only and checked
([`~comigs_hf.adapters.read_generalist`]).

A client that dies after saving its state but before its upload landed is re-run with the same round: it finds the
round already trained from the same global and uploads the saved update again, without training twice.
"""

from __future__ import annotations

from typing import Any

import torch
from huggingface_hub import HfApi

from ...adapters import read_generalist
from ...client import Client
from ...modeling_comigs import CoMiGSForCausalLM
from ...ranks import lora_ranks, payload_bytes
from ...strategies import Strategy
from .federation import MANIFEST_NAME, FederationManifest, published_round_commit
from .repo import check_hub_strategy, push_generalist_to_hub, round_tag
from .updates import submit_update


def hub_client_id(client_id: int) -> str:
    """The folder name of client `client_id`'s updates in the repo (`updates/round-<t>/<name>`).

    Zero-padded because `aggregate_round` averages in the order of these names: padded, that is client order (as in
    the Accelerate rounds) up to 10,000 clients, so the float sums are taken in the same order.
    """
    return f"client-{client_id:04d}"


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
            ([`~comigs_hf.client.initial_shared_state`], as the Accelerate rounds draw it).
        repo_id (`str`): the shared repo, created if missing.
        strategy ([`~comigs_hf.strategies.Strategy`]): must share the generalist only.
        token (`str` or `bool`, *optional*): Hub token; defaults to `HF_TOKEN` or the stored login.
        private (`bool`, *optional*): visibility of a newly created repo.
        manifest ([`~comigs_hf.transports.hub.federation.FederationManifest`], *optional*): who takes part, written as
            `federation.json` into the same commit: only its client ids count, and where it names Hub users, only
            their commits (see `comigs_hf.transports.hub.federation`). Without one, any client id counts.

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
def _round_revision(repo_id: str, round_index: int, token: str | bool | None) -> str:
    """The commit of the global `round-<t>` once its tag is checked against the federation's manifest (read by sha,
    so a tag moved after the check changes nothing); the tag itself while it does not exist (the download says so).

    Raises:
        `ValueError`: the tag names a commit the federation's aggregator did not make.
    """
    return published_round_commit(HfApi(), repo_id, round_index, token) or round_tag(round_index)


def _check_round(client: Client, round_index: Any) -> None:
    rounds = client.spec.rounds
    if isinstance(round_index, bool) or not isinstance(round_index, int) or not 1 <= round_index <= rounds:
        raise ValueError(f"round_index must be in [1, rounds={rounds}], got {round_index!r}.")


def run_hub_client_round(
    client: Client, repo_id: str, round_index: int, *, token: str | bool | None = None
) -> dict[str, Any]:
    """One client's round through the Hub: pull the global `round-<t>`, run the client's round, submit its update.

    The update's shared tensors are uploaded under [`hub_client_id`]`(client_id)`, laid out as a PEFT adapter by the
    client's model, with the training split's token count as their weight. Calling again for a round already trained
    from the same global uploads the saved update again without training.

    Args:
        client ([`~comigs_hf.client.Client`]): the client, of the federation's layout, with its own data.
        repo_id (`str`): the shared repo, seeded with [`seed_hub_rounds`].
        round_index (`int`): the round to train, from 1 to the run's rounds; the client must have trained round
            `round_index - 1`.
        token (`str` or `bool`, *optional*): Hub token; defaults to `HF_TOKEN` or the stored login.

    Returns:
        `dict`: `round`, `client_id`, `name`, `train_tokens`, `train_loss`, `router_loss`, `tokens_seen`,
        `bytes_sent` (as a row of the Accelerate rounds' record) and `commit_sha` of the upload.

    Raises:
        `ValueError`: a strategy sharing more than the generalist, more than one generalist, a round out of order or
        out of `[1, rounds]`, or a state from another federation.
        `huggingface_hub.errors.RevisionNotFoundError`: `round-<t>` is not published yet.
    """
    model = client.model
    check_hub_strategy(client.spec.strategy, model.config.num_generalists)
    _check_round(client, round_index)
    saved = client.saved_rounds()
    done = saved[0] if saved else 0
    if done not in (round_index - 1, round_index):  # Hub clients take part in every round, in order
        raise ValueError(
            f"Client {client.client_id} has trained up to round {done} ({client.directory}), so it cannot train "
            f"round {round_index}: run round {done + 1} next."
        )
    if saved:  # another federation's state is refused before anything is downloaded
        client.read_state(done)
    revision = _round_revision(repo_id, round_index, token)
    update, _ = client.train(round_index, read_generalist(model, repo_id, revision=revision, token=token))
    record = {
        "round": round_index,
        "client_id": client.client_id,
        "name": client.spec.name,
        "train_tokens": update.train_tokens,
        **update.metrics,
        "bytes_sent": payload_bytes(update.shared, lora_ranks(update.shared)),
    }
    # what leaves the client is its update's tensors (clipped under differential privacy), laid out by the model
    folder = hub_client_id(client.client_id)
    sha = submit_update(model, repo_id, folder, round_index, update.train_tokens, tensors=update.shared, token=token)
    return {**record, "commit_sha": sha}


def evaluate_hub_client(
    client: Client, repo_id: str, round_index: int, *, token: str | bool | None = None
) -> dict[str, Any]:
    """Test metrics of a client after round `round_index`, as the Accelerate rounds evaluate them: its private state
    after that round with the global generalist aggregated from it (tag `round-<t+1>`); after the last round, its
    end-of-run step first (FD-LoRA's fusion).

    Args:
        client, repo_id, token: as in [`run_hub_client_round`].
        round_index (`int`): the round just aggregated; the client's saved state must be from that round.

    Returns:
        `dict`: `round`, `client_id`, `name` and [`~comigs_hf.evaluation.evaluate_client`]'s in-distribution
        figures (`test_loss`, `test_ppl`, `test_tokens`, `routing`, and the paper protocol's `paper_test_*`), and
        `fusion_weights` where the client fused its experts.

    Raises:
        `ValueError`: no saved state for that round, or a state from another federation.
        `huggingface_hub.errors.RevisionNotFoundError`: round `round_index` is not aggregated yet.
    """
    model = client.model
    check_hub_strategy(client.spec.strategy, model.config.num_generalists)
    saved = client.saved_rounds()
    if not saved or saved[0] != round_index:
        found = f"round {saved[0]}" if saved else "nothing"
        raise ValueError(
            f"Client {client.client_id} has {found} saved in {client.directory}; evaluating round {round_index} "
            "needs it."
        )
    revision = _round_revision(repo_id, round_index + 1, token)
    shared = read_generalist(model, repo_id, revision=revision, token=token)
    if round_index == client.spec.rounds:
        client.finish(shared)
    metrics = client.evaluate(round_index, shared)
    return {"round": round_index, "client_id": client.client_id, "name": client.spec.name, **metrics}


__all__ = [
    "evaluate_hub_client",
    "hub_client_id",
    "run_hub_client_round",
    "seed_hub_rounds",
]
