"""A client's private state: drawn before round 1 (the same whichever process or transport draws it), read from a
saved client (`init_from`), and swapped into the model of its process.

The state itself, [`~comigs_hf.trainer.ClientState`], is what the local steps update; [`~comigs_hf.client.Client`]
keeps it on disk between its rounds.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .checkpoint_comigs import read_adapter_tensors
from .configuration_comigs import ROLES
from .modeling_comigs import CoMiGSForCausalLM
from .ranks import expert_adapter_keys, truncate_to_ranks
from .strategies import Strategy, lora_factor, partition_state_dict
from .trainer import ClientState, derived_seed


def fresh_parameters(
    model: CoMiGSForCausalLM, num_specialists: int, seed: int, top_k: int | None = None
) -> dict[str, torch.Tensor]:
    """Freshly initialised expert and router tensors for a client with `num_specialists` specialists (mixing `top_k`
    experts per token; `None` keeps the model's)."""
    model.set_num_specialists(num_specialists, top_k)  # draws from the global RNG when it adds experts: seed after
    torch.manual_seed(seed)
    model.reset_experts()
    return {k: v.cpu() for k, v in model.role_state_dict(*ROLES).items()}


def initial_shared_state(
    model: CoMiGSForCausalLM, strategy: Strategy, num_specialists: int, seed: int, top_k: int | None = None
) -> dict[str, torch.Tensor]:
    """The global shared tensors before round 1, drawn once with client 0's expert count (`num_specialists`) and
    top-k, the same for every transport (none when the server combines nothing: each client starts from its own)."""
    if not strategy.server_combines:
        return {}
    reference = fresh_parameters(model, num_specialists, derived_seed(seed, 0, -1), top_k)
    return partition_state_dict(reference, strategy)[0]


def initial_client_state(
    model: CoMiGSForCausalLM,
    client_id: int,
    name: str,
    num_specialists: int,
    seed: int,
    top_k: int | None = None,
    frozen_factors: frozenset[str] = frozenset(),
    lora_rank: int | None = None,
) -> ClientState:
    """Client `client_id`'s state before round 1: seeded by its id, whatever process or transport holds it; the
    LoRA factors in `frozen_factors` (the strategy's, never trained) drawn as the shared tensors are, so that every
    client holds the same. A `lora_rank` below the model's keeps every expert adapter to that rank (see
    [`~comigs_hf.ranks.truncate_to_ranks`]).

    Raises:
        `ValueError`: a `lora_rank` above the model's `lora_r` or below 1.
    """
    full = model.config.lora_r
    if lora_rank is not None and not 1 <= lora_rank <= full:
        raise ValueError(
            f"Client {client_id}: lora_rank must be in [1, {full}] (the model's lora_r), got {lora_rank}."
        )
    parameters = fresh_parameters(model, num_specialists, derived_seed(seed, 0, client_id), top_k)
    if frozen_factors:
        common = fresh_parameters(model, num_specialists, derived_seed(seed, 0, -1), top_k)
        parameters |= {k: v for k, v in common.items() if lora_factor(k) in frozen_factors}
    ranks = {}
    if lora_rank is not None and lora_rank < full:
        ranks = {key: lora_rank for key in expert_adapter_keys(parameters)}
        parameters = truncate_to_ranks(parameters, ranks)
    generator = torch.Generator().manual_seed(derived_seed(seed, -1, client_id))
    return ClientState(
        client_id, name, num_specialists, parameters, generator=generator.get_state(), top_k=top_k, lora_ranks=ranks
    )


def client_folder_name(client_id: int, name: str) -> str:
    """The folder a run saves client `client_id` in (under `clients/`) and `init_from` reads it from."""
    return f"{client_id}-{re.sub(r'[^A-Za-z0-9._-]+', '_', name).strip('_') or 'client'}"


# what a saved client must share with the run that starts from it, beyond its tensors' names and shapes
_SAVED_CLIENT_FIELDS = ("base_model_name_or_path", "num_generalists", "lora_alpha", "use_rslora", "attention_lora_r")


def saved_client_parameters(
    directory: str | Path, fresh: dict[str, torch.Tensor], model: CoMiGSForCausalLM
) -> dict[str, torch.Tensor]:
    """A saved client's experts, attention adapter and routers (a `save_pretrained` folder, adapter-only or a
    single-file full checkpoint), in the layout, dtype and device of `fresh` (a client's [`fresh_parameters`] on
    `model`, whose config the saved one must match: base, generalists, scaling).

    Raises:
        `ValueError`: naming the folder: no saved client there, another base, number of experts or LoRA scaling, or
        tensors whose names, shapes, dtypes or values do not fit.
    """
    directory = Path(directory)
    weights, config = directory / "model.safetensors", directory / "config.json"
    if not (weights.is_file() and config.is_file()):
        raise ValueError(
            f"{directory} holds no saved client (config.json and a single-file model.safetensors; a sharded full "
            "checkpoint is not read here)."
        )
    saved = json.loads(config.read_text())
    wanted = len({match.group(1) for key in fresh if (match := re.search(r"\.specialist_(\d+)\.", key))})
    if saved.get("num_specialists") != wanted:
        raise ValueError(
            f"{directory} holds a client with {saved.get('num_specialists')} specialists, this run gives it {wanted}."
        )
    for name in _SAVED_CLIENT_FIELDS:
        if saved.get(name) != getattr(model.config, name):
            raise ValueError(
                f"{directory} holds a client with {name}={saved.get(name)!r}, this run's is "
                f"{getattr(model.config, name)!r}."
            )
    state = read_adapter_tensors(str(weights), str(directory), {k: tuple(v.shape) for k, v in fresh.items()}, True)
    for key, value in state.items():
        if not torch.isfinite(value).all():
            raise ValueError(f"{str(directory)!r}: {key!r} holds NaN or infinite values.")
    return {key: state[key].to(dtype=value.dtype, device=value.device) for key, value in fresh.items()}


def activate_client(model: CoMiGSForCausalLM, state: ClientState, shared: dict[str, torch.Tensor]) -> None:
    """Swap a client into the model: its expert count and top-k, its private tensors, then the global shared ones,
    each adapter cut to the client's rank (the leading slices of the global's factors)."""
    model.set_num_specialists(state.num_specialists, state.top_k)
    model.load_role_state_dict(truncate_to_ranks({**state.parameters, **shared}, state.lora_ranks))
    if model.config.expert_mixing == "uniform":
        model.set_expert_weights(state.expert_weights)


__all__ = [
    "activate_client",
    "client_folder_name",
    "fresh_parameters",
    "initial_client_state",
    "initial_shared_state",
    "saved_client_parameters",
]
