"""Collaboration strategies as data: which expert roles leave a client, and how the server combines them.

A strategy is a frozen record, not a subclass (compare Flower's one-class-per-algorithm): the baselines differ only in
which roles are shared, so `local`, `fedavg` and `comigs` are three presets of one dataclass and a new baseline is a
YAML change. `partition_state_dict` is the only function that decides what may leave a client.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .aggregation import AGGREGATORS

__all__ = [
    "ROLES",
    "STRATEGIES",
    "Strategy",
    "aggregation_weights",
    "get_strategy",
    "partition_state_dict",
    "payload_bytes",
]

# roles that can be shared; "base" (the frozen backbone) is never sent, whatever the strategy
ROLES = frozenset({"generalist", "specialist", "router"})
WEIGHTINGS = ("train_tokens", "uniform")


@dataclass(frozen=True)
class Strategy:
    """What a client shares each round and how the server aggregates it.

    Args:
        name (`str`):
            Name used in logs, results and model cards.
        shared_roles (`frozenset[str]`):
            Subset of `{"generalist", "specialist", "router"}`; any iterable is accepted and frozen.
        aggregation (`str`, *optional*, defaults to `"weighted_mean"`):
            Key of [`~comigs_hf.aggregation.AGGREGATORS`].
        weighting (`str`, *optional*, defaults to `"train_tokens"`):
            `"train_tokens"` weights each client by its number of training tokens (FedAvg's example count),
            `"uniform"` weights every client equally.
        aggregation_kwargs (`dict[str, Any]`, *optional*):
            Extra keyword arguments of the aggregation rule, e.g. `{"trim_ratio": 0.2}` for `"trimmed_mean"`.

    Attributes:
        requires_equal_experts (`bool`):
            Derived: `True` when specialists or the router are shared, because their tensors (one router row per
            expert, one adapter per specialist index) must have the same names and shapes on every client.
    """

    name: str
    shared_roles: frozenset[str]
    aggregation: str = "weighted_mean"
    weighting: str = "train_tokens"
    # excluded from the hash so the frozen record stays hashable while holding a dict
    aggregation_kwargs: dict[str, Any] = field(default_factory=dict, hash=False)
    requires_equal_experts: bool = field(init=False)

    def __post_init__(self) -> None:
        # frozen dataclass: normalise through object.__setattr__
        object.__setattr__(self, "shared_roles", frozenset(self.shared_roles))
        object.__setattr__(self, "aggregation_kwargs", dict(self.aggregation_kwargs))
        unknown = sorted(self.shared_roles - ROLES)
        if unknown:
            raise ValueError(
                f"Strategy {self.name!r}: shared_roles contains {unknown}; roles are {', '.join(sorted(ROLES))}."
            )
        if self.aggregation not in AGGREGATORS:
            raise ValueError(
                f"Strategy {self.name!r}: unknown aggregation {self.aggregation!r}; "
                f"known: {', '.join(sorted(AGGREGATORS))}."
            )
        if self.weighting not in WEIGHTINGS:
            raise ValueError(
                f"Strategy {self.name!r}: unknown weighting {self.weighting!r}; known: {', '.join(WEIGHTINGS)}."
            )
        object.__setattr__(self, "requires_equal_experts", bool(self.shared_roles & {"specialist", "router"}))


STRATEGIES: dict[str, Strategy] = {
    # every client trains alone: the lower bound of collaboration
    "local": Strategy(name="local", shared_roles=frozenset()),
    # every expert and the router averaged, as if the mixture were one FedAvg model
    "fedavg": Strategy(name="fedavg", shared_roles=frozenset({"generalist", "specialist", "router"})),
    # CoMiGS: generalists averaged, specialists and router stay on the client
    "comigs": Strategy(name="comigs", shared_roles=frozenset({"generalist"})),
}


def get_strategy(name: str) -> Strategy:
    """Returns the preset strategy called `name`.

    Raises:
        `ValueError`: for an unknown name, listing the known ones.
    """
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"Unknown strategy {name!r}; known: {', '.join(sorted(STRATEGIES))}.") from None


def _default_role_of(name: str) -> str:
    # imported on first use so that strategies.py never forms an import cycle with the model code
    from .modeling_comigs import parameter_role

    return parameter_role(name)


def partition_state_dict(
    state: Mapping[str, torch.Tensor],
    strategy: Strategy,
    role_of: Callable[[str], str] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Splits a client's state dict into what the strategy shares and what stays on the client.

    This is the only place deciding what may leave a client. Tensors whose role is `"base"` (the frozen backbone)
    appear in neither result: they are skipped rather than rejected so that a full `model.state_dict()` can be passed
    directly, and they are identical on every client anyway.

    Args:
        state (`Mapping[str, torch.Tensor]`):
            Parameter name to tensor, e.g. `model.state_dict()` or the trainable parameters only.
        strategy ([`Strategy`]):
            Decides which roles are shared.
        role_of (`Callable[[str], str]`, *optional*):
            Maps a parameter name to `"generalist"`, `"specialist"`, `"router"` or `"base"`; defaults to
            `comigs_hf.modeling_comigs.parameter_role`.

    Returns:
        `tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]`: `(shared, private)`, both in the input's key order.
        The tensors are the input objects, not copies: clone before mutating them.

    Raises:
        `ValueError`: if `role_of` returns a role outside `{"generalist", "specialist", "router", "base"}`.
    """
    role_of = role_of if role_of is not None else _default_role_of
    shared, private = {}, {}
    for name, tensor in state.items():
        role = role_of(name)
        if role == "base":
            continue
        if role not in ROLES:
            raise ValueError(f"Parameter {name!r} has role {role!r}; expected one of {sorted(ROLES | {'base'})}.")
        (shared if role in strategy.shared_roles else private)[name] = tensor
    return shared, private


def payload_bytes(state: Mapping[str, torch.Tensor]) -> int:
    """Returns the number of bytes the tensors of `state` occupy (`numel * element_size` summed), for communication
    accounting."""
    return sum(tensor.numel() * tensor.element_size() for tensor in state.values())


def aggregation_weights(strategy: Strategy, train_tokens: Iterable[int]) -> list[float]:
    """Returns one aggregation weight per client, following `strategy.weighting`.

    Args:
        strategy ([`Strategy`]): its `weighting` picks the rule.
        train_tokens (`Iterable[int]`): number of training tokens of each participating client.

    Returns:
        `list[float]`: the token counts as floats for `"train_tokens"`, all ones for `"uniform"`; the aggregation
        rules normalise them.
    """
    counts = [float(count) for count in train_tokens]
    if strategy.weighting == "uniform":
        return [1.0] * len(counts)
    return counts
