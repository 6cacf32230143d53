"""The paper's method and its baselines: one registry of strategy presets, and one module per algorithm that needs
more than the common strategy record.

Every preset is a [`~comigs_hf.strategies.Strategy`] record; a baseline that needs behaviour of its own (HetLoRA's
rank pruning, PCL's combination on the clients, FD-LoRA's fusion, centralised pooling, FedProx's proximal term) holds
an [`Algorithm`] from its own module here, plugged into the round protocol at named points (see `base.py`); so does
differential privacy, which any server average may add. No transport and no round loop names an algorithm: adding a
baseline is one module and one line of `STRATEGIES` (see `fedprox.py`, the worked example).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from ..strategies import ROLES, Strategy
from .base import Algorithm
from .centralized import Centralized
from .fd_lora import FDLoRAFusion
from .fedprox import FedProx
from .hetlora import HetLoRA
from .pcl import PCL
from .privacy import DifferentialPrivacy

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
        algorithms=(HetLoRA(strength=0.99, coef=0.005),),
    ),
    # PCL (personalised collaborative learning): no server average; from round 5, every 2 rounds, each client
    # replaces its experts with the mean of every client's under trust weights softmax(-its validation perplexity
    # of them). The reference's runs: two experts (1G1S layout), no router, no balancing loss.
    "pcl": Strategy(name="pcl", shared_roles=_EXPERTS, router_training="none", algorithms=(PCL(),)),
    # FD-LoRA (Qi et al., 2024): a global adapter (the generalist, averaged) and a local one (the specialist) mixed
    # equally in training; after the last round each client fuses them with weights in [-1, 1]^2 chosen on its
    # validation loss with an L1 penalty 0.05, by nevergrad's NGOpt with 10 evaluations. The weights mix the two
    # experts' MLP outputs; the paper adds the weighted adapters inside one MLP (equal on its linear output projection)
    "fd_lora": Strategy(
        name="fd_lora", shared_roles=_GENERALIST, router_training="none", algorithms=(FDLoRAFusion(budget=10),)
    ),
    # pFedMoE: the generalist averaged, router trained with the experts on the train split, one optimiser
    "pfedmoe": Strategy(name="pfedmoe", shared_roles=_GENERALIST, router_training="joint"),
    # Local-MoE and FedAvg-MoE: a private router trained jointly with the experts, or alternating on the train split
    "local_moe": Strategy(name="local_moe", shared_roles=_NOTHING, router_training="joint"),
    "local_moe_train": Strategy(name="local_moe_train", shared_roles=_NOTHING, router_training="train"),
    "fedavg_moe": Strategy(name="fedavg_moe", shared_roles=_EXPERTS, router_training="joint"),
    "fedavg_moe_train": Strategy(name="fedavg_moe_train", shared_roles=_EXPERTS, router_training="train"),
    # the upper bound: one mixture without router trained on every client's data, evaluated on each client's test
    "centralized": Strategy(
        name="centralized", shared_roles=_NOTHING, router_training="none", algorithms=(Centralized(),)
    ),
    # the whole mixture averaged, routers included (not a reference baseline: it never averages routers)
    "fedavg_all": Strategy(name="fedavg_all", shared_roles=ROLES),
    # FedProx (Li et al., 2020): FedAvg's layout, each client's loss adding (mu / 2) ||w - w_global||^2 over the
    # shared tensors it trains (not a reference baseline: the worked example of adding one, fedprox.py)
    "fedprox": Strategy(name="fedprox", shared_roles=_EXPERTS, router_training="none", algorithms=(FedProx(mu=0.01),)),
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
    """Returns the preset strategy called `name`, with the given settings in place of its own.

    Args:
        name (`str`): a key of `STRATEGIES`.
        aggregation (`str`, *optional*): a key of `AGGREGATORS`; `None` keeps the preset's rule.
        weighting (`str`, *optional*): one of `WEIGHTINGS`; `None` keeps the preset's.
        aggregation_kwargs (`Mapping[str, Any]`, *optional*): arguments of the rule; empty or `None` keeps the
            preset's.
        max_update_norm (`float`, *optional*): see [`Strategy`]; `None` keeps the preset's.
        rank_pruning_coef (`float`, *optional*): HetLoRA's regulariser (see [`HetLoRA`]); `None` keeps the
            preset's. Above 0, only for a strategy that prunes ranks.
        max_client_weight (`float`, *optional*): see [`Strategy`]; `None` keeps the preset's.
        dp_clipping_norm, dp_noise_multiplier (`float`, *optional*): differential privacy (see
            [`DifferentialPrivacy`]), added to the strategy's algorithms; `None` keeps the preset's. With a clipping
            norm and no `weighting` given, the weighting is `"uniform"`, which differential privacy needs.

    Raises:
        `ValueError`: for an unknown name (listing the known ones), rule or weighting, arguments the rule rejects, a
        pruning coefficient without pruning, or noise without a clipping norm.
    """
    try:
        preset = STRATEGIES[name]
    except KeyError:
        raise ValueError(f"Unknown strategy {name!r}; known: {', '.join(sorted(STRATEGIES))}.") from None
    algorithms = list(preset.algorithms)
    if rank_pruning_coef is not None:
        pruning = [index for index, algorithm in enumerate(algorithms) if isinstance(algorithm, HetLoRA)]
        if not pruning and rank_pruning_coef > 0:
            raise ValueError(
                f"Strategy {name!r}: rank_pruning_coef={rank_pruning_coef} regularises the tail that HetLoRA's rank "
                "pruning cuts, but this strategy prunes no rank."
            )
        for index in pruning:
            algorithms[index] = replace(algorithms[index], coef=rank_pruning_coef)
    privacy = next((algorithm for algorithm in algorithms if isinstance(algorithm, DifferentialPrivacy)), None)
    clipping = dp_clipping_norm if dp_clipping_norm is not None else privacy.clipping_norm if privacy else None
    noise = dp_noise_multiplier if dp_noise_multiplier is not None else privacy.noise_multiplier if privacy else 0.0
    if clipping is None and noise:
        raise ValueError(
            f"Strategy {name!r}: dp_noise_multiplier={noise} scales the noise to dp_clipping_norm, which is null: "
            "set dp_clipping_norm too."
        )
    if clipping is not None:
        algorithms = [algorithm for algorithm in algorithms if algorithm is not privacy]
        algorithms.append(DifferentialPrivacy(clipping_norm=clipping, noise_multiplier=noise))
        if weighting is None:
            weighting = "uniform"
    return replace(
        preset,
        aggregation=aggregation if aggregation is not None else preset.aggregation,
        weighting=weighting if weighting is not None else preset.weighting,
        aggregation_kwargs=aggregation_kwargs or preset.aggregation_kwargs,
        max_update_norm=max_update_norm if max_update_norm is not None else preset.max_update_norm,
        max_client_weight=max_client_weight if max_client_weight is not None else preset.max_client_weight,
        algorithms=tuple(algorithms),
    )


__all__ = [
    "STRATEGIES",
    "Algorithm",
    "Centralized",
    "DifferentialPrivacy",
    "FDLoRAFusion",
    "FedProx",
    "HetLoRA",
    "PCL",
    "get_strategy",
]
