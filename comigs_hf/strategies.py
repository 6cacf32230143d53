"""Collaboration strategies as data: which expert roles leave a client, how the router trains, and how the server
combines what it receives.

A strategy is a frozen record, not a subclass (compare Flower's one-class-per-algorithm): the paper's baselines differ
only in which roles are shared and in how (or whether) the router is trained, so every one of them is a preset of one
dataclass (see `STRATEGIES`) and a new baseline is a YAML change. `partition_state_dict` is the only function that
decides what may leave a client.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from . import modeling_comigs
from .aggregation import AGGREGATORS, lora_partner
from .modeling_comigs import is_attention_adapter, parameter_role

__all__ = [
    "ROLES",
    "STRATEGIES",
    "TOKEN_CAP_MEDIANS",
    "WEIGHTINGS",
    "Strategy",
    "LORA_FACTORS",
    "aggregation_weights",
    "capped_shares",
    "get_strategy",
    "lora_factor",
    "partition_state_dict",
    "lora_ranks",
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
# who combines the updates: the server into one global state every round, or (PCL) each client for itself
AGGREGATORS_OF_UPDATES = ("server", "clients")


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
        rank_pruning (`float`, *optional*):
            HetLoRA's rank self-pruning strength `gamma` in (0, 1): after its local steps, a client cuts an expert
            adapter of rank `r` to rank `int(gamma * r)` when the norm of its tail, `||B[:, k:r]|| ||A[k:r]||` with
            `k = int(gamma * r)`, fell below the tail of the tensors it started the round from. `None`: ranks never
            change.
        rank_pruning_coef (`float`, *optional*, defaults to 0):
            Weight of the tail norms above added to the training loss (HetLoRA's regulariser, which drives the
            tails toward zero so that pruning loses little); needs `rank_pruning`.
        aggregator (`str`, *optional*, defaults to `"server"`):
            `"server"`: the server combines the updates into one global shared state each round. `"clients"`:
            personalised collaborative learning (PCL), no server average: in the rounds `combine_from_round`,
            `combine_from_round + combine_every`, ... every client receives every client's shared tensors, scores
            each on its own validation split and replaces its own with their mean under trust weights
            `softmax(-validation perplexity)` (see [`~comigs_hf.aggregation.trust_weights`]); in the other rounds
            nothing is sent. This reveals every client's shared tensors (under the `pcl` preset its whole model) to
            every other client, so neither secure aggregation nor a trusted server can hide them: use it only among
            clients that may see each other's models.
        combine_from_round (`int`, *optional*, defaults to 5):
            With `aggregator="clients"`, the first round whose updates are combined (the reference: round 5).
        combine_every (`int`, *optional*, defaults to 2):
            With `aggregator="clients"`, rounds between combinations (the reference: every 2).
        fusion_budget (`int`, *optional*, defaults to 0):
            FD-LoRA's adaptive fusion: after the last round each client chooses fixed weights for its experts
            (`w` in `[-fusion_bound, fusion_bound]` per expert, its global and local adapter under the `fd_lora`
            preset) on its validation loss plus `fusion_l1 * ||w||_1`, with nevergrad's NGOpt and this many
            evaluations (see [`~comigs_hf.evaluation.fusion_weights`]); needs uniform mixing
            (`router_training="none"`). 0: no fusion.
        fusion_l1 (`float`, *optional*, defaults to 0.05):
            The L1 penalty of the fusion weights.
        fusion_bound (`float`, *optional*, defaults to 1.0):
            The fusion weights' bound.
        dp_clipping_norm (`float`, *optional*):
            Differential privacy (DP-FedAvg, see `comigs_hf.privacy`): each client clips its update (the change of
            its shared tensors over the round) to this L2 norm over all of them, and the server refuses an update
            beyond it (`max_update_norm` becomes the smaller of the two, with a 1e-4 relative margin for rounding).
            Needs a server average with equal weights (`aggregation="weighted_mean"`, `weighting="uniform"`), so
            that the noise covers any one client. `None`: no clipping.
        dp_noise_multiplier (`float`, *optional*, defaults to 0):
            The server adds Gaussian noise of standard deviation `dp_noise_multiplier * dp_clipping_norm / m` to
            the mean of a round's `m` updates; needs `dp_clipping_norm`. 0: clipping only, no privacy guarantee.
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
    max_client_weight: float | None = None
    shared_factors: frozenset[str] = LORA_FACTORS
    frozen_factors: frozenset[str] = frozenset()
    rank_pruning: float | None = None
    rank_pruning_coef: float = 0.0
    aggregator: str = "server"
    combine_from_round: int = 5
    combine_every: int = 2
    fusion_budget: int = 0
    fusion_l1: float = 0.05
    fusion_bound: float = 1.0
    dp_clipping_norm: float | None = None
    dp_noise_multiplier: float = 0.0
    requires_equal_experts: bool = field(init=False)

    @property
    def expert_mixing(self) -> str:
        """The model's `expert_mixing`: `"uniform"` without a router, else `"router"`."""
        return "uniform" if self.router_training == "none" else "router"

    def combines_in_round(self, round_index: int) -> bool:
        """Whether the updates of round `round_index` are combined: every round with a server, the PCL schedule
        (`combine_from_round`, then every `combine_every` rounds) with `aggregator="clients"`."""
        if self.aggregator == "server":
            return True
        start = self.combine_from_round
        return round_index >= start and (round_index - start) % self.combine_every == 0

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
        strength, coef = self.rank_pruning, self.rank_pruning_coef
        if strength is not None and (isinstance(strength, bool) or not 0 < strength < 1):
            raise ValueError(f"Strategy {self.name!r}: rank_pruning must be in (0, 1) or null, not {strength}.")
        if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not 0 <= coef < math.inf:
            raise ValueError(f"Strategy {self.name!r}: rank_pruning_coef must be a finite number >= 0, not {coef}.")
        if coef > 0 and strength is None:
            raise ValueError(
                f"Strategy {self.name!r}: rank_pruning_coef={coef} regularises the tail that rank_pruning cuts, "
                "but rank_pruning is null."
            )
        if self.aggregator not in AGGREGATORS_OF_UPDATES:
            raise ValueError(
                f"Strategy {self.name!r}: unknown aggregator {self.aggregator!r}; known: "
                f"{', '.join(AGGREGATORS_OF_UPDATES)}."
            )
        for key in ("combine_from_round", "combine_every"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Strategy {self.name!r}: {key} must be an integer >= 1, not {value!r}.")
        budget = self.fusion_budget
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
            raise ValueError(f"Strategy {self.name!r}: fusion_budget must be an integer >= 0, not {budget!r}.")
        if budget and self.router_training != "none":
            raise ValueError(
                f"Strategy {self.name!r}: fusion_budget={budget} fixes the experts' mixing weights, but the router "
                f"mixes them (router_training={self.router_training!r}); fusion needs router_training 'none'."
            )
        if not (0 <= self.fusion_l1 < math.inf and 0 < self.fusion_bound < math.inf):
            raise ValueError(
                f"Strategy {self.name!r}: fusion_l1 must be finite and >= 0 and fusion_bound finite and > 0, got "
                f"{self.fusion_l1} and {self.fusion_bound}."
            )
        if self.aggregator == "clients" and not self.shared_roles:
            raise ValueError(f"Strategy {self.name!r}: aggregator 'clients' combines shared tensors, but none are.")
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
        self._check_privacy()
        if self.pool_clients and self.shared_roles:
            raise ValueError(f"Strategy {self.name!r} pools the clients into one, so it has nobody to share with.")
        # one pooled model serves every client: they must agree on its layout
        # (and each client scores every client's tensors in its own model under PCL)
        equal = bool(self.shared_roles & {"specialist", "router"}) or self.pool_clients or self.aggregator == "clients"
        object.__setattr__(self, "requires_equal_experts", equal)

    def _check_privacy(self) -> None:
        norm, noise = self.dp_clipping_norm, self.dp_noise_multiplier
        if norm is not None and (isinstance(norm, bool) or not isinstance(norm, (int, float)) or not 0 < norm < 1e30):
            raise ValueError(f"Strategy {self.name!r}: dp_clipping_norm must be a number > 0 or null, not {norm}.")
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0 <= noise < 1e30:
            raise ValueError(f"Strategy {self.name!r}: dp_noise_multiplier must be a finite number >= 0, not {noise}.")
        if norm is None:
            if noise > 0:
                raise ValueError(
                    f"Strategy {self.name!r}: dp_noise_multiplier={noise} scales the noise to dp_clipping_norm, which "
                    "is null: set dp_clipping_norm too."
                )
            return
        needs = {
            "a server average (aggregator 'server')": self.aggregator == "server",
            "shared tensors": bool(self.shared_roles),
            "aggregation 'weighted_mean' (the noise covers one client's share of a mean)": (
                self.aggregation == "weighted_mean"
            ),
            "weighting 'uniform' (each clipped update weighs 1/m)": self.weighting == "uniform",
        }
        missing = [need for need, met in needs.items() if not met]
        if missing:
            raise ValueError(
                f"Strategy {self.name!r}: differential privacy (dp_clipping_norm={norm}) needs {'; '.join(missing)}; "
                f"this one has aggregator {self.aggregator!r}, shares {sorted(self.shared_roles) or 'nothing'}, "
                f"aggregation {self.aggregation!r}, weighting {self.weighting!r}."
            )
        bound = norm * (1 + 1e-4)  # an honest client's clipped norm, rounded in its own dtype, stays below this
        if self.max_update_norm is None or self.max_update_norm > bound:
            object.__setattr__(self, "max_update_norm", bound)


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
    # FlexLoRA (Bai et al., 2024): clients of different ranks (model.lora_r, one per client); the server averages
    # the full updates B @ A weighted by training tokens and each client takes back the truncated SVD at its rank.
    # The paper's runs: one expert (num_specialists 0), top-1.
    "flexlora": Strategy(name="flexlora", shared_roles=_GENERALIST, router_training="none", aggregation="product_svd"),
    # HetLoRA (Cho et al., 2024): zero-padded factors averaged with weights ||B_i @ A_i||_F, each client keeps the
    # leading slices of its rank, and rank self-pruning (strength 0.99; the paper's regulariser sweep 0.05, 0.005,
    # 0.0005 is the recipe key rank_pruning_coef)
    "hetlora": Strategy(
        name="hetlora",
        shared_roles=_GENERALIST,
        router_training="none",
        aggregation="norm_weighted_mean",
        rank_pruning=0.99,
        rank_pruning_coef=0.005,
    ),
    # PCL (personalised collaborative learning): no server average; from round 5, every 2 rounds, each client
    # replaces its experts with the mean of every client's under trust weights softmax(-its validation perplexity
    # of them). The reference's runs: two experts (1G1S layout), no router, no balancing loss.
    "pcl": Strategy(name="pcl", shared_roles=_EXPERTS, router_training="none", aggregator="clients"),
    # FD-LoRA (Qi et al., 2024): a global adapter (the generalist, averaged) and a local one (the specialist) mixed
    # equally in training; after the last round each client fuses them with weights in [-1, 1]^2 chosen on its
    # validation loss with an L1 penalty 0.05, by nevergrad's NGOpt with 10 evaluations. The weights mix the two
    # experts' MLP outputs; the paper adds the weighted adapters inside one MLP (equal on its linear output projection)
    "fd_lora": Strategy(name="fd_lora", shared_roles=_GENERALIST, router_training="none", fusion_budget=10),
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
    rank_pruning_coef: float | None = None,
    max_client_weight: float | None = None,
    dp_clipping_norm: float | None = None,
    dp_noise_multiplier: float | None = None,
) -> Strategy:
    """Returns the preset strategy called `name`, with the given aggregation settings in place of its own.

    Args:
        name (`str`): a key of `STRATEGIES`.
        aggregation (`str`, *optional*): a key of `AGGREGATORS`; `None` keeps the preset's rule.
        weighting (`str`, *optional*): one of `WEIGHTINGS`; `None` keeps the preset's.
        aggregation_kwargs (`Mapping[str, Any]`, *optional*): arguments of the rule; empty or `None` keeps the
            preset's.
        max_update_norm (`float`, *optional*): see [`Strategy`]; `None` keeps the preset's.
        rank_pruning_coef (`float`, *optional*): see [`Strategy`]; `None` keeps the preset's.
        max_client_weight (`float`, *optional*): see [`Strategy`]; `None` keeps the preset's.
        dp_clipping_norm, dp_noise_multiplier (`float`, *optional*): see [`Strategy`]; `None` keeps the preset's.
            With a clipping norm and no `weighting` given, the weighting is `"uniform"`, which differential privacy
            needs.

    Raises:
        `ValueError`: for an unknown name (listing the known ones), rule or weighting, or arguments the rule rejects.
    """
    try:
        preset = STRATEGIES[name]
    except KeyError:
        raise ValueError(f"Unknown strategy {name!r}; known: {', '.join(sorted(STRATEGIES))}.") from None
    clipping = dp_clipping_norm if dp_clipping_norm is not None else preset.dp_clipping_norm
    if weighting is None and clipping is not None:
        weighting = "uniform"
    return replace(
        preset,
        aggregation=aggregation if aggregation is not None else preset.aggregation,
        weighting=weighting if weighting is not None else preset.weighting,
        dp_clipping_norm=clipping,
        dp_noise_multiplier=dp_noise_multiplier if dp_noise_multiplier is not None else preset.dp_noise_multiplier,
        aggregation_kwargs=aggregation_kwargs or preset.aggregation_kwargs,
        max_update_norm=max_update_norm if max_update_norm is not None else preset.max_update_norm,
        rank_pruning_coef=rank_pruning_coef if rank_pruning_coef is not None else preset.rank_pruning_coef,
        max_client_weight=max_client_weight if max_client_weight is not None else preset.max_client_weight,
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


def lora_ranks(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """The rank each LoRA adapter of `state` actually uses, keyed by its `lora_A` name: its factors' rank minus the
    trailing ranks where both `A`'s row and `B`'s column are zero (the padding of a client whose rank is below the
    model's, see `comigs_hf.trainer.truncate_to_ranks`). Adapters with one factor in `state` are left out."""
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
