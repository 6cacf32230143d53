"""Heterogeneous LoRA ranks: the rank each adapter actually uses, cutting adapters to a rank, and what an update of
those ranks weighs when it is sent.

One model serves every client, so it holds the largest rank; a client of rank r keeps its experts' A rows and B
columns beyond r at zero. Training keeps them there (their gradients are zero: each multiplies the other), the LoRA
scaling is the model's for every client, and the leading r slices of an SVD-factorised global are its best rank-r
approximation (FlexLoRA).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from .aggregation import lora_partner
from .configuration_comigs import EXPERT_ROLES, is_attention_adapter, parameter_role
from .strategies import lora_factor


def expert_adapter_keys(names: Iterable[str]) -> list[str]:
    """The `lora_A` parameter names of the experts' adapters among `names` (not the attention adapter's): one per
    adapter, the keys of [`ClientState`]'s `lora_ranks`."""
    return [
        n
        for n in names
        if lora_factor(n) == "lora_A" and parameter_role(n) in EXPERT_ROLES and not is_attention_adapter(n)
    ]


def truncate_to_ranks(tensors: dict[str, torch.Tensor], ranks: dict[str, int]) -> dict[str, torch.Tensor]:
    """`tensors` with each adapter in `ranks` cut to its rank: rows of `lora_A` and columns of `lora_B` from the
    rank on are zero (copies; the other tensors are passed through)."""
    result = dict(tensors)
    for key_a, rank in ranks.items():
        key_b = lora_partner(key_a)
        if key_a in result:
            result[key_a] = result[key_a].clone()
            result[key_a][rank:] = 0
        if key_b in result:
            result[key_b] = result[key_b].clone()
            result[key_b][:, rank:] = 0
    return result


def lora_ranks(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """The rank each LoRA adapter of `state` actually uses, keyed by its `lora_A` name: its factors' rank minus the
    trailing ranks where both `A`'s row and `B`'s column are zero (the padding of a client whose rank is below the
    model's, see [`truncate_to_ranks`]). Adapters with one factor in `state` are left out."""
    ranks = {}
    for name, tensor in state.items():
        partner = lora_partner(name)
        if ".lora_A." not in name or partner not in state:
            continue
        used = tensor.ne(0).any(dim=1) | state[partner].ne(0).any(dim=0)  # (R,)
        ranks[name] = int(used.nonzero().max()) + 1 if bool(used.any()) else 0
    return ranks


def _sent_numel(name: str, tensor: torch.Tensor, ranks: Mapping[str, int]) -> int:
    rank = ranks.get(name if lora_factor(name) == "lora_A" else lora_partner(name))
    if rank is None or tensor.dim() != 2:
        return tensor.numel()
    return rank * (tensor.shape[1] if lora_factor(name) == "lora_A" else tensor.shape[0])


def payload_bytes(state: Mapping[str, torch.Tensor], ranks: Mapping[str, int] | None = None) -> int:
    """Returns the number of bytes the tensors of `state` occupy (`numel * element_size` summed), for communication
    accounting; with `ranks` (see [`lora_ranks`]) an adapter counts its leading `rank` rows of `A` and columns of
    `B` only, what a client of that rank sends or receives."""
    ranks = ranks or {}
    return sum(_sent_numel(name, tensor, ranks) * tensor.element_size() for name, tensor in state.items())


def payload_parameters(state: Mapping[str, torch.Tensor], ranks: Mapping[str, int] | None = None) -> dict[str, int]:
    """Returns the number of parameters in `state` by kind, for communication accounting (with `ranks`, as in
    [`payload_bytes`]).

    Returns:
        `dict[str, int]`: `experts` (the experts' LoRA factors), `attention` (the attention adapter), `router`, and
        `total`, their sum.
    """
    counts = {"experts": 0, "attention": 0, "router": 0}
    for name, tensor in state.items():
        role = parameter_role(name)
        kind = "router" if role == "router" else "attention" if is_attention_adapter(name) else "experts"
        if role != "base":
            counts[kind] += _sent_numel(name, tensor, ranks or {})
    return {**counts, "total": sum(counts.values())}


__all__ = ["expert_adapter_keys", "lora_ranks", "payload_bytes", "payload_parameters", "truncate_to_ranks"]
