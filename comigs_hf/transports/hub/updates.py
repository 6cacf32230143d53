"""What a client uploads in a Hub-mediated round, and the checks an upload passes on its own.

```
updates/round-<t>/<client_id>/adapter_config.json            the client's generalist after local training in round t
updates/round-<t>/<client_id>/adapter_model.safetensors
updates/round-<t>/<client_id>/update.json                    {"client_id", "round", "num_tokens", "base_model"}
```

Uploads are untrusted: they are read with safetensors only, and the tensors are checked against the round's global
state by the server step (`comigs_hf.server.check_update`) before anything is averaged.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import CommitOperationAdd, HfApi
from safetensors import SafetensorError
from safetensors.torch import load_file

from ...adapters import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    check_float_tensors,
    check_lora_config,
    quote_untrusted,
    read_untrusted_json,
)
from ...modeling_comigs import CoMiGSForCausalLM
from ...server import MAX_TRAIN_TOKENS
from ...trainer import ClientUpdate
from .federation import ForgedRound, check_client_id, published_round_commit
from .repo import _generalist_files, round_tag, with_retries

logger = logging.getLogger("comigs_hf.hub")

UPDATE_NAME = "update.json"
UPDATES_FOLDER = "updates"
# LoRA fields that change what a tensor means: updates are only averaged when they agree on all of them
_LORA_FIELDS = ("peft_type", "r", "lora_alpha", "use_rslora", "fan_in_fan_out", "target_modules")


def update_folder(round: int, client_id: str) -> str:
    """Path of a client's update for round `round` in the shared repo: `updates/round-<t>/<client_id>`."""
    return f"{UPDATES_FOLDER}/{round_tag(round)}/{client_id}"


def submit_update(
    model: CoMiGSForCausalLM,
    repo_id: str,
    client_id: str,
    round: int,
    num_tokens: int,
    *,
    index: int = 0,
    tensors: Mapping[str, torch.Tensor] | None = None,
    token: str | bool | None = None,
) -> str:
    """Upload this client's generalist after local training in round `round`, for
    [`~comigs_hf.transports.hub.aggregator.aggregate_round`].

    Writes `updates/round-<t>/<client_id>/` (PEFT adapter plus `update.json` with the client id, round, number of
    training tokens and base model) in one commit. Submitting again for the same round replaces the update.

    Args:
        model ([`CoMiGSForCausalLM`]): the client model: its generalist is uploaded, or only its layout with
            `tensors`.
        repo_id (`str`): the shared repo (it must exist: the coordinator creates it with the round-1 seed).
        client_id (`str`): letters, digits, `.`, `_`, `-`; the folder name.
        round (`int`): the round trained (starting from the global tagged `round-<t>`).
        num_tokens (`int`): training tokens this round, the aggregation weight; at least 1.
        index (`int`, defaults to 0): which generalist.
        tensors (`Mapping[str, torch.Tensor]`, *optional*): the generalist's tensors to upload, keyed by the model's
            parameter names: a client round's update (`ClientUpdate.shared`), what leaves the client, clipped under
            differential privacy. `None`: the model's own.
        token (`str` or `bool`, *optional*): Hub token; defaults to `HF_TOKEN` or the stored login.

    Returns:
        `str`: the commit sha.
    """
    round_tag(round)  # checks it
    check_client_id(client_id)
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or not 1 <= num_tokens <= MAX_TRAIN_TOKENS:
        raise ValueError(
            f"`num_tokens` must be an integer in [1, 2**53] (the aggregation weight), got {num_tokens!r}."
        )
    files, _ = _generalist_files(model, index, tensors)
    update = {
        "client_id": client_id,
        "round": round,
        "num_tokens": num_tokens,
        "base_model": model.config.base_model_name_or_path,
    }
    files[UPDATE_NAME] = json.dumps(update, indent=2).encode()
    folder = update_folder(round, client_id)
    api = HfApi()
    closed = round_tag(round + 1)
    if _round_closed(api, repo_id, round, token):
        raise ValueError(
            f"Round {round} of {repo_id} is closed: {closed} is published. Pull it and train round {round + 1}."
        )
    operations = [CommitOperationAdd(f"{folder}/{name}", data) for name, data in files.items()]
    info = with_retries(
        lambda: api.create_commit(
            repo_id, operations=operations, commit_message=f"Round {round} update from {client_id}", token=token
        ),
        f"submitting the round {round} update of {client_id}",
    )
    if _round_closed(api, repo_id, round, token):  # the aggregator may have closed it just now
        logger.warning(
            "Round %d of %s was aggregated while this update was uploaded; it may not be in %s (its "
            "aggregation.json lists the clients it took).",
            round,
            repo_id,
            closed,
        )
    logger.info("Submitted the round %d update of %s to %s (commit %s).", round, client_id, repo_id, info.oid)
    return info.oid


def _round_closed(api: HfApi, repo_id: str, round: int, token: str | bool | None) -> bool:
    # only a publication the federation trusts closes a round: a tag another writer made does not block submits
    try:
        return published_round_commit(api, repo_id, round + 1, token) is not None
    except ForgedRound as forged:
        logger.warning("%s", forged)
        return False


class _Rejected(Exception):
    """An update fails a check; the message is the reason recorded in the report."""


@dataclass
class _Candidate:
    """A parsed upload: its folder, LoRA config and base model, and the update the server step checks."""

    folder: str
    base_model: str | None
    config: dict[str, Any]
    update: ClientUpdate

    @property
    def client_id(self) -> str:
        return self.update.client_id

    @property
    def signature(self) -> str:
        """Tensor names, shapes and dtypes, for a majority vote where the round has no global to compare with."""
        return json.dumps(sorted((key, list(t.shape), str(t.dtype)) for key, t in self.update.shared.items()))


def _read_json(path: Path, name: str) -> Any:
    try:
        return read_untrusted_json(path.read_bytes(), name)
    except ValueError as error:
        raise _Rejected(str(error)) from None


def _parse_update(folder: str, paths: Mapping[str, Path], round: int) -> _Candidate:
    """Checks of an update on its own: files, bounded JSON, typed fields, LoRA config, round, token count, readable
    safetensors of float tensors."""
    for name in (UPDATE_NAME, ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME):
        if name not in paths:
            raise _Rejected(f"missing {name}.")
    update = _read_json(paths[UPDATE_NAME], UPDATE_NAME)
    if not isinstance(update, dict):
        raise _Rejected(f"{UPDATE_NAME} is not a JSON object.")
    client_id, update_round, num_tokens = update.get("client_id"), update.get("round"), update.get("num_tokens")
    try:
        check_client_id(client_id)
    except ValueError:
        raise _Rejected(f"{UPDATE_NAME} client_id is not a client id (1-96 letters, digits, '.', '_', '-').") from None
    if update_round != round or not isinstance(update_round, int) or isinstance(update_round, bool):
        raise _Rejected(f"{UPDATE_NAME} is for round {quote_untrusted(update_round)}, not round {round}.")
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or not 1 <= num_tokens <= MAX_TRAIN_TOKENS:
        raise _Rejected(
            f"{UPDATE_NAME} num_tokens must be an integer in [1, 2**53], got {quote_untrusted(num_tokens, 40)}"
        )
    base_model = update.get("base_model")
    if base_model is not None and not isinstance(base_model, str):
        raise _Rejected(f"{UPDATE_NAME} base_model must be a string, got {quote_untrusted(base_model)}.")
    try:
        config = check_lora_config(_read_json(paths[ADAPTER_CONFIG_NAME], ADAPTER_CONFIG_NAME))
    except ValueError as error:
        raise _Rejected(str(error)) from None
    try:
        state = load_file(paths[ADAPTER_WEIGHTS_NAME])
    except (SafetensorError, OSError, ValueError) as error:
        raise _Rejected(f"cannot read {ADAPTER_WEIGHTS_NAME} ({str(error)[:200]}).") from None
    if not state:
        raise _Rejected(f"{ADAPTER_WEIGHTS_NAME} holds no tensors.")
    try:
        check_float_tensors(state, ADAPTER_WEIGHTS_NAME)
    except ValueError as error:
        raise _Rejected(str(error)) from None
    return _Candidate(folder, base_model, config, ClientUpdate(client_id, round, state, num_tokens))
