"""Collaboration strategies as data: which expert roles leave a client, how the router trains, and how the server
combines what it receives.

A strategy is a frozen record, not a subclass (compare Flower's one-class-per-algorithm): the paper's baselines differ
only in which roles are shared and in how (or whether) the router is trained, so every one of them is a preset of one
dataclass (see `STRATEGIES`) and a new baseline is a YAML change. `partition_state_dict` is the only function that
decides what may leave a client.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from . import modeling_comigs
from .aggregation import AGGREGATORS
from .modeling_comigs import is_attention_adapter, parameter_role

__all__ = [
    "ROLES",
    "STRATEGIES",
    "TOKEN_CAP_MEDIANS",
    "WEIGHTINGS",
    "Strategy",
    "LORA_FACTORS",
    "aggregation_weights",
    "get_strategy",
    "lora_factor",
    "partition_state_dict",
    "payload_bytes",
    "payload_parameters",
]

# roles that can be shared; "base" (the frozen backbone) is never sent, whatever the strategy
ROLES = frozenset(modeling_comigs.ROLES)
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
        shared_factors (`frozenset[str]`, *optional*, defaults to `{"lora_A", "lora_B"}`):
            Which LoRA factors of the shared roles' adapters leave the client (router weights, not LoRA, follow
            `shared_roles` alone): `{"lora_B"}` for FFA-LoRA, `{"lora_A"}` for FedSa-LoRA.
        frozen_factors (`frozenset[str]`, *optional*, defaults to none):
            LoRA factors that never train. They start equal on every client, drawn once from the federation's seed
            as the shared tensors are (FFA-LoRA freezes every `lora_A` at one shared initialisation).
        pool_clients (`bool`, *optional*, defaults to `False`):
            Centralised training, the upper bound without privacy: one model trains on the union of all clients'
            train and validation splits, with all their batches in one (`num_clients` x `batch_size` sequences per
            step, the reference's 256 for 4 x 64), and is evaluated on every client's test split. Nothing is
            communicated.

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
    router_training: str = "validation"
    pool_clients: bool = False
    max_update_norm: float | None = None
    shared_factors: frozenset[str] = LORA_FACTORS
    frozen_factors: frozenset[str] = frozenset()
    requires_equal_experts: bool = field(init=False)

    @property
    def expert_mixing(self) -> str:
        """The model's `expert_mixing`: `"uniform"` without a router, else `"router"`."""
        return "uniform" if self.router_training == "none" else "router"

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
        if self.pool_clients and self.shared_roles:
            raise ValueError(f"Strategy {self.name!r} pools the clients into one, so it has nobody to share with.")
        # one pooled model serves every client: they must agree on its layout
        equal = bool(self.shared_roles & {"specialist", "router"}) or self.pool_clients
        object.__setattr__(self, "requires_equal_experts", equal)


_EXPERTS = frozenset({"generalist", "specialist"})
_GENERALIST = frozenset({"generalist"})
_NOTHING = frozenset()

# The paper's methods and baselines, in the reference code's forms. The expert layout is the model section's (1G1S:
# num_generalists=1, num_specialists=1; 2G: num_generalists=2, num_specialists=0; 1GXS: num_specialists=X), the
# attention adapter, when the model has one, is shared with the generalists.
STRATEGIES: dict[str, Strategy] = {
    # CoMiGS: generalists averaged, specialists and router private, router on the validation split
    "comigs": Strategy(name="comigs", shared_roles=_GENERALIST),
    # ablation CoMiGS-tr: the router alternates on the train split
    "comigs_tr": Strategy(name="comigs_tr", shared_roles=_GENERALIST, router_training="train"),
    # 2S: nothing shared, the bi-level router kept (every expert is in effect a specialist)
    "comigs_2s": Strategy(name="comigs_2s", shared_roles=_NOTHING),
    # every client alone, its experts averaged without a router: the reference's Local
    "local": Strategy(name="local", shared_roles=_NOTHING, router_training="none"),
    # every expert averaged across clients, no router: the reference's FedAvg
    "fedavg": Strategy(name="fedavg", shared_roles=_EXPERTS, router_training="none"),
    # FFA-LoRA (Sun et al., 2024): every lora_A frozen at one shared initialisation, only lora_B trained and averaged
    # (the paper's runs: one expert, r = 16, everything shared). Implemented as published: the reference code's
    # `ffalora` still trains A.
    "ffa_lora": Strategy(
        name="ffa_lora",
        shared_roles=_EXPERTS,
        router_training="none",
        shared_factors=frozenset({"lora_B"}),
        frozen_factors=frozenset({"lora_A"}),
    ),
    # FedSa-LoRA (Guo et al., 2025): lora_A shared and averaged, lora_B private. Implemented as published: the
    # reference code's version averages both factors.
    "fedsa_lora": Strategy(
        name="fedsa_lora", shared_roles=_EXPERTS, router_training="none", shared_factors=frozenset({"lora_A"})
    ),
    # pFedMoE: the generalist averaged, router trained with the experts on the train split, one optimiser
    "pfedmoe": Strategy(name="pfedmoe", shared_roles=_GENERALIST, router_training="joint"),
    # Local-MoE and FedAvg-MoE: a private router trained jointly with the experts, or alternating on the train split
    "local_moe": Strategy(name="local_moe", shared_roles=_NOTHING, router_training="joint"),
    "local_moe_train": Strategy(name="local_moe_train", shared_roles=_NOTHING, router_training="train"),
    "fedavg_moe": Strategy(name="fedavg_moe", shared_roles=_EXPERTS, router_training="joint"),
    "fedavg_moe_train": Strategy(name="fedavg_moe_train", shared_roles=_EXPERTS, router_training="train"),
    # the upper bound: one mixture without router trained on every client's data, evaluated on each client's test
    "centralized": Strategy(name="centralized", shared_roles=_NOTHING, router_training="none", pool_clients=True),
    # the whole mixture averaged, routers included (not a reference baseline: it never averages routers)
    "fedavg_all": Strategy(name="fedavg_all", shared_roles=ROLES),
}


def get_strategy(
    name: str,
    *,
    aggregation: str | None = None,
    weighting: str | None = None,
    aggregation_kwargs: Mapping[str, Any] | None = None,
    max_update_norm: float | None = None,
) -> Strategy:
    """Returns the preset strategy called `name`, with the given aggregation settings in place of its own.

    Args:
        name (`str`): a key of `STRATEGIES`.
        aggregation (`str`, *optional*): a key of `AGGREGATORS`; `None` keeps the preset's rule.
        weighting (`str`, *optional*): one of `WEIGHTINGS`; `None` keeps the preset's.
        aggregation_kwargs (`Mapping[str, Any]`, *optional*): arguments of the rule; empty or `None` keeps the
            preset's.
        max_update_norm (`float`, *optional*): see [`Strategy`]; `None` keeps the preset's.

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
        max_update_norm=max_update_norm if max_update_norm is not None else preset.max_update_norm,
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


def payload_bytes(state: Mapping[str, torch.Tensor]) -> int:
    """Returns the number of bytes the tensors of `state` occupy (`numel * element_size` summed), for communication
    accounting."""
    return sum(tensor.numel() * tensor.element_size() for tensor in state.values())


def payload_parameters(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Returns the number of parameters in `state` by kind, for communication accounting.

    Returns:
        `dict[str, int]`: `experts` (the experts' LoRA factors), `attention` (the attention adapter), `router`, and
        `total`, their sum.
    """
    counts = {"experts": 0, "attention": 0, "router": 0}
    for name, tensor in state.items():
        role = parameter_role(name)
        kind = "router" if role == "router" else "attention" if is_attention_adapter(name) else "experts"
        if role != "base":
            counts[kind] += tensor.numel()
    return {**counts, "total": sum(counts.values())}


def aggregation_weights(strategy: Strategy, train_tokens: Iterable[int]) -> list[float]:
    """Returns one aggregation weight per client, following `strategy.weighting`.

    Args:
        strategy ([`Strategy`]): its `weighting` picks the rule.
        train_tokens (`Iterable[int]`): number of training tokens of each participating client.

    Returns:
        `list[float]`: the token counts as floats for `"train_tokens"`, capped at `TOKEN_CAP_MEDIANS` times their
        median for `"capped_train_tokens"`, all ones for `"uniform"`; the aggregation rules normalise them.
    """
    counts = [float(count) for count in train_tokens]
    if strategy.weighting == "uniform":
        return [1.0] * len(counts)
    if strategy.weighting == "capped_train_tokens" and counts:
        # the lower median: with two clients the plain median is their mean, which a huge claim drags along
        cap = TOKEN_CAP_MEDIANS * statistics.median_low(counts)
        return [min(count, cap) for count in counts]
    return counts
