"""Collaboration strategies as data: which expert roles leave a client, and how the server combines them.

A strategy is a frozen record, not a subclass (compare Flower's one-class-per-algorithm): the baselines differ only in
which roles are shared, so `local`, `fedavg` and `comigs` are three presets of one dataclass and a new baseline is a
YAML change. `partition_state_dict` is the only function that decides what may leave a client.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from . import modeling_comigs
from .aggregation import AGGREGATORS
from .modeling_comigs import parameter_role

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
ROLES = frozenset(modeling_comigs.ROLES)
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
        try:
            # the rule checks its own arguments (trim_ratio, ...): run it once on a one-client dummy so a bad value
            # fails here, before any training, not at the end of the first round
            AGGREGATORS[self.aggregation]([{"probe": torch.zeros(1)}], [1.0], **self.aggregation_kwargs)
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"Strategy {self.name!r}: aggregation {self.aggregation!r} rejects aggregation_kwargs "
                f"{self.aggregation_kwargs}: {error}"
            ) from None
        object.__setattr__(self, "requires_equal_experts", bool(self.shared_roles & {"specialist", "router"}))


STRATEGIES: dict[str, Strategy] = {
    # every client trains alone: the lower bound of collaboration
    "local": Strategy(name="local", shared_roles=frozenset()),
    # every expert and the router averaged, as if the mixture were one FedAvg model
    "fedavg": Strategy(name="fedavg", shared_roles=ROLES),
    # CoMiGS: generalists averaged, specialists and router stay on the client
    "comigs": Strategy(name="comigs", shared_roles=frozenset({"generalist"})),
}


def get_strategy(
    name: str,
    *,
    aggregation: str | None = None,
    weighting: str | None = None,
    aggregation_kwargs: Mapping[str, Any] | None = None,
) -> Strategy:
    """Returns the preset strategy called `name`, with the given aggregation settings in place of its own.

    Args:
        name (`str`): a key of `STRATEGIES`.
        aggregation (`str`, *optional*): a key of `AGGREGATORS`; `None` keeps the preset's rule.
        weighting (`str`, *optional*): `"train_tokens"` or `"uniform"`; `None` keeps the preset's.
        aggregation_kwargs (`Mapping[str, Any]`, *optional*): arguments of the rule; empty or `None` keeps the
            preset's.

    Raises:
        `ValueError`: for an unknown name (listing the known ones), rule or weighting, or arguments the rule rejects.
    """
    try:
        preset = STRATEGIES[name]
    except KeyError:
        raise ValueError(f"Unknown strategy {name!r}; known: {', '.join(sorted(STRATEGIES))}.") from None
    return replace(
        preset,
        aggregation=aggregation if aggregation is not None else preset.aggregation,
        weighting=weighting if weighting is not None else preset.weighting,
        aggregation_kwargs=aggregation_kwargs or preset.aggregation_kwargs,
    )


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
            [`~comigs_hf.modeling_comigs.parameter_role`].

    Returns:
        `tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]`: `(shared, private)`, both in the input's key order.
        The tensors are the input objects, not copies: clone before mutating them.

    Raises:
        `ValueError`: if `role_of` returns a role outside `{"generalist", "specialist", "router", "base"}`.
    """
    role_of = role_of if role_of is not None else parameter_role
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
