"""Collaboration strategies as data: which expert roles leave a client, how the router trains, and how the server
combines what it receives.

A strategy is a frozen record, not a subclass (compare Flower's one-class-per-algorithm): the paper's baselines differ
mostly in which roles are shared and in how (or whether) the router is trained, so most of them are presets of one
dataclass (see `STRATEGIES`) and a new one is a YAML change. What a baseline needs beyond the record (HetLoRA's rank
pruning, PCL's combination on the clients, FD-LoRA's fusion, centralised pooling, differential privacy) is an
algorithm of `comigs_hf.algorithms`, held in `Strategy.algorithms` and plugged into the round protocol at named
points. `partition_state_dict` decides which tensors may leave a client; the algorithms' `outgoing` point then what
of them does.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import configuration_comigs
from .aggregation import AGGREGATORS
from .configuration_comigs import parameter_role

__all__ = [
    "ROLES",
    "TOKEN_CAP_MEDIANS",
    "WEIGHTINGS",
    "Strategy",
    "LORA_FACTORS",
    "aggregation_weights",
    "capped_shares",
    "lora_factor",
    "partition_state_dict",
]

# roles that can be shared; "base" (the frozen backbone) is never sent, whatever the strategy
ROLES = frozenset(configuration_comigs.ROLES)
WEIGHTINGS = ("train_tokens", "capped_train_tokens", "uniform")
LORA_FACTORS = frozenset({"lora_A", "lora_B"})
# `capped_train_tokens`: no client weighs more than this many times the median client, whatever it reports
TOKEN_CAP_MEDIANS = 2.0
# how the router learns: alternating with the experts on the validation split (CoMiGS's bi-level problem) or on the
# train split (CoMiGS-tr), jointly with the experts in one optimiser (pFedMoE, Local-MoE), or not at all (no router:
# the experts' outputs are averaged)
ROUTER_TRAININGS = ("validation", "train", "joint", "none")


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
            `"capped_train_tokens"` the same with each count capped at `TOKEN_CAP_MEDIANS` (2) times the median
            count (self-reported counts cannot take the average over; the Hub rounds' default), `"uniform"` weights
            every client equally.
        aggregation_kwargs (`dict[str, Any]`, *optional*):
            Extra keyword arguments of the aggregation rule, e.g. `{"trim_ratio": 0.2}` for `"trimmed_mean"`.
        router_training (`str`, *optional*, defaults to `"validation"`):
            `"validation"`: expert steps on the train split alternate with router phases on the validation split
            (the bi-level problem of CoMiGS); `"train"`: the same alternation with router phases on the train split;
            `"joint"`: experts and router take every step together in one optimiser on the train split; `"none"`: no
            router, every token gets the plain average of all experts' outputs.
        max_update_norm (`float`, *optional*):
            The server step refuses an update whose shared tensors lie farther than this (L2 norm over all of them)
            from the global state the round started from; `None` bounds only each value (see
            `comigs_hf.server.MAX_ABS_VALUE`).
        max_client_weight (`float`, *optional*):
            The largest share of the aggregate any one client may have, in (0, 1]: after `weighting`, a heavier
            client is cut to it and the excess goes to the others in proportion to their weights (with fewer than
            `1 / max_client_weight` clients, each weighs `1 / n`). `None`: no cap.
        shared_factors (`frozenset[str]`, *optional*, defaults to `{"lora_A", "lora_B"}`):
            Which LoRA factors of the shared roles' adapters leave the client (router weights, not LoRA, follow
            `shared_roles` alone): `{"lora_B"}` for FFA-LoRA, `{"lora_A"}` for FedSa-LoRA.
        frozen_factors (`frozenset[str]`, *optional*, defaults to none):
            LoRA factors that never train. They start equal on every client, drawn once from the federation's seed
            as the shared tensors are (FFA-LoRA freezes every `lora_A` at one shared initialisation).
        algorithms (`tuple[Algorithm, ...]`, *optional*):
            What the strategy needs beyond this record, each an [`~comigs_hf.algorithms.Algorithm`] plugged into the
            round protocol at named points, in this order (HetLoRA's pruning, PCL's combination, FD-LoRA's fusion,
            centralised pooling, differential privacy).

    Attributes:
        requires_equal_experts (`bool`):
            Derived: `True` when specialists or the router are shared, because their tensors (one router row per
            expert, one adapter per specialist index) must have the same names and shapes on every client, or when
            an algorithm compares or merges every client's experts.
    """

    name: str
    shared_roles: frozenset[str]
    aggregation: str = "weighted_mean"
    weighting: str = "train_tokens"
    # excluded from the hash so the frozen record stays hashable while holding a dict
    aggregation_kwargs: dict[str, Any] = field(default_factory=dict, hash=False)
    router_training: str = "validation"
    max_update_norm: float | None = None
    max_client_weight: float | None = None
    shared_factors: frozenset[str] = LORA_FACTORS
    frozen_factors: frozenset[str] = frozenset()
    algorithms: tuple[Any, ...] = ()
    requires_equal_experts: bool = field(init=False)

    @property
    def expert_mixing(self) -> str:
        """The model's `expert_mixing`: `"uniform"` without a router, else `"router"`."""
        return "uniform" if self.router_training == "none" else "router"

    @property
    def server_combines(self) -> bool:
        """Whether the server combines the shared tensors into one global each round (PCL's clients combine them
        themselves)."""
        return all(algorithm.server_combines for algorithm in self.algorithms)

    @property
    def clients_bound_updates(self) -> bool:
        """Whether each client bounds its own update (differential privacy's clipping)."""
        return any(algorithm.clients_bound_updates for algorithm in self.algorithms)

    def check_transport(self, transport: str) -> Strategy:
        """`self` if `transport` (`"accelerate"`, `"hub"`, `"flower"`) can carry every algorithm of the strategy.

        Raises:
            `ValueError`: naming the algorithm and why the transport cannot carry it.
        """
        for algorithm in self.algorithms:
            reason = algorithm.refused_transports.get(transport)
            if reason is not None:
                raise ValueError(f"Strategy {self.name!r} ({algorithm.name}): {reason}")
        return self

    def check_participation(self, clients_per_round: int | None) -> None:
        """Refuse a partial participation an algorithm cannot run with (`ValueError` naming it)."""
        for algorithm in self.algorithms:
            algorithm.check_participation(clients_per_round)

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
        object.__setattr__(self, "shared_factors", frozenset(self.shared_factors))
        object.__setattr__(self, "frozen_factors", frozenset(self.frozen_factors))
        for field_name in ("shared_factors", "frozen_factors"):
            unknown = sorted(getattr(self, field_name) - LORA_FACTORS)
            if unknown:
                raise ValueError(
                    f"Strategy {self.name!r}: {field_name} contains {unknown}; LoRA factors are lora_A and lora_B."
                )
        if not self.shared_factors and self.shared_roles:
            raise ValueError(f"Strategy {self.name!r} shares roles but no LoRA factor of them (shared_factors).")
        if self.frozen_factors == LORA_FACTORS:
            raise ValueError(f"Strategy {self.name!r} freezes both LoRA factors: nothing would train.")
        bound = self.max_update_norm
        if bound is not None and (isinstance(bound, bool) or not isinstance(bound, (int, float)) or not bound > 0):
            raise ValueError(
                f"Strategy {self.name!r}: max_update_norm must be a positive number or null, not {bound}."
            )
        cap = self.max_client_weight
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float)) or not 0 < cap <= 1):
            raise ValueError(f"Strategy {self.name!r}: max_client_weight must be in (0, 1] or null, not {cap}.")
        if self.router_training not in ROUTER_TRAININGS:
            raise ValueError(
                f"Strategy {self.name!r}: unknown router_training {self.router_training!r}; "
                f"known: {', '.join(ROUTER_TRAININGS)}."
            )
        if self.router_training == "none" and "router" in self.shared_roles:
            raise ValueError(f"Strategy {self.name!r} shares the router but has none (router_training='none').")
        try:
            # the rule checks its own arguments (trim_ratio, ...): run it once on a one-client dummy so a bad value
            # fails here, before any training, not at the end of the first round
            AGGREGATORS[self.aggregation]([{"probe": torch.zeros(1)}], [1.0], **self.aggregation_kwargs)
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"Strategy {self.name!r}: aggregation {self.aggregation!r} rejects aggregation_kwargs "
                f"{self.aggregation_kwargs}: {error}"
            ) from None
        object.__setattr__(self, "algorithms", tuple(self.algorithms))
        for algorithm in self.algorithms:
            algorithm.check(self)
            object.__setattr__(self, "max_update_norm", algorithm.update_bound(self.max_update_norm))
        # one router row per expert and one adapter per specialist index must match on every client; and some
        # algorithms compare or merge every client's experts
        equal = bool(self.shared_roles & {"specialist", "router"}) or any(
            algorithm.equal_experts_because for algorithm in self.algorithms
        )
        object.__setattr__(self, "requires_equal_experts", equal)


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
        factor = lora_factor(name)
        sent = role in strategy.shared_roles and (factor is None or factor in strategy.shared_factors)
        (shared if sent else private)[name] = tensor
    return shared, private


def lora_factor(name: str) -> str | None:
    """`"lora_A"` or `"lora_B"` for a LoRA factor's parameter name, `None` for anything else (router weights)."""
    for factor in LORA_FACTORS:
        if f".{factor}." in name:
            return factor
    return None


def aggregation_weights(strategy: Strategy, train_tokens: Iterable[int]) -> list[float]:
    """Returns one aggregation weight per client, following `strategy.weighting`.

    Args:
        strategy ([`Strategy`]): its `weighting` picks the rule.
        train_tokens (`Iterable[int]`): number of training tokens of each participating client.

    Returns:
        `list[float]`: the token counts as floats for `"train_tokens"`, capped at `TOKEN_CAP_MEDIANS` times their
        median for `"capped_train_tokens"`, all ones for `"uniform"`; the aggregation rules normalise them. With
        `strategy.max_client_weight`, the shares after [`capped_shares`].
    """
    counts = [float(count) for count in train_tokens]
    if strategy.weighting == "uniform":
        weights = [1.0] * len(counts)
    elif strategy.weighting == "capped_train_tokens" and counts:
        # the lower median: with two clients the plain median is their mean, which a huge claim drags along
        cap = TOKEN_CAP_MEDIANS * statistics.median_low(counts)
        weights = [min(count, cap) for count in counts]
    else:
        weights = counts
    if strategy.max_client_weight is not None and weights and sum(weights) > 0:
        weights = capped_shares(weights, strategy.max_client_weight)
    return weights


def capped_shares(weights: Sequence[float], cap: float) -> list[float]:
    """`weights` as shares summing to 1 with none above `cap` (at least `1 / n`): each client over the cap is cut
    to it and the excess goes to the others in proportion to their weights, until none is over.

    Example: weights 8, 1, 1 at cap 0.5 give 0.5, 0.25, 0.25.
    """
    cap = max(cap, 1.0 / len(weights))
    total = sum(weights)
    shares = [w / total for w in weights]
    fixed: set[int] = set()
    while True:
        over = [i for i, share in enumerate(shares) if share > cap * (1 + 1e-12) and i not in fixed]
        if not over:
            return shares
        fixed.update(over)
        free = [i for i in range(len(shares)) if i not in fixed]
        rest = sum(weights[i] for i in free)
        left = 1.0 - cap * len(fixed)
        shares = [
            cap if i in fixed else (weights[i] / rest * left if rest > 0 else left / len(free))
            for i in range(len(shares))
        ]
