"""FD-LoRA (Qi et al., 2024): a global adapter and a local one, fused by each client after the last round.

Under the `fd_lora` preset the generalist (averaged) and the specialist (private) are mixed equally while training
(`router_training="none"`); after the last round each client chooses fixed weights `w` for its experts, in
`[-bound, bound]` each, on its validation loss plus `l1 * ||w||_1`, searched by nevergrad's NGOpt with `budget`
evaluations ([`fusion_weights`]). The weights mix the experts' MLP outputs (`CoMiGSForCausalLM.set_expert_weights`,
saved with the model); the paper adds the weighted adapters inside one MLP, which is equal on its linear output
projection.
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from dataclasses import dataclass

import torch
from accelerate import Accelerator

from ..client_state import activate_client
from ..evaluation import EvaluationConfig, evaluate_full_split
from ..modeling_comigs import CoMiGSForCausalLM
from ..trainer import derived_seed
from .base import Algorithm


@dataclass(frozen=True)
class FDLoRAFusion(Algorithm):
    """FD-LoRA's adaptive fusion after the last round.

    Args:
        budget (`int`): evaluations of the search (the paper: 10).
        l1 (`float`, defaults to 0.05): the L1 penalty of the fusion weights.
        bound (`float`, defaults to 1.0): the fusion weights' bound.
    """

    budget: int
    l1: float = 0.05
    bound: float = 1.0

    def check(self, strategy) -> None:
        budget = self.budget
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise ValueError(
                f"Strategy {strategy.name!r}: FD-LoRA's fusion budget must be an integer >= 1, not {budget!r}."
            )
        if strategy.router_training != "none":
            raise ValueError(
                f"Strategy {strategy.name!r}: FD-LoRA's fusion fixes the experts' mixing weights, but the router "
                f"mixes them (router_training={strategy.router_training!r}); fusion needs router_training 'none'."
            )
        if not (0 <= self.l1 < math.inf and 0 < self.bound < math.inf):
            raise ValueError(
                f"Strategy {strategy.name!r}: FD-LoRA's l1 must be finite and >= 0 and its bound finite and > 0, got "
                f"{self.l1} and {self.bound}."
            )

    def check_requirements(self) -> None:
        require_nevergrad()

    def finish(self, client, state, shared: dict[str, torch.Tensor]) -> bool:
        """Fuse the client's experts once, with the final global (a client that already fused keeps its weights)."""
        if state.expert_weights is not None:
            return False
        activate_client(client.model, state, shared)
        seed = fusion_seed(client.spec.seed, client.spec.client_id)
        weights, _ = fusion_weights(
            client.model, client.data.validation, self, client.spec.evaluation, client.accelerator, seed
        )
        state.expert_weights = weights
        return True


def fusion_seed(seed: int, client_id: int) -> int:
    """The seed of a client's FD-LoRA fusion search, whichever transport runs it (round -2 of
    [`~comigs_hf.trainer.derived_seed`], which no round, initialisation or sampler uses)."""
    return derived_seed(seed, -2, client_id)


def require_nevergrad() -> None:
    """Raise, before any training, when FD-LoRA's fusion search cannot run.

    Raises:
        `ImportError`: nevergrad is not installed, with the command that installs it.
    """
    if importlib.util.find_spec("nevergrad") is None:
        raise ImportError(
            "FD-LoRA's fusion search uses nevergrad, which is not installed: pip install 'comigs-hf[fusion]'."
        )


def fusion_weights(
    model: CoMiGSForCausalLM,
    validation: torch.Tensor,
    fusion: FDLoRAFusion,
    cfg: EvaluationConfig,
    accelerator: Accelerator,
    seed: int,
) -> tuple[list[float], float]:
    """FD-LoRA's adaptive fusion for the client the model holds: fixed expert weights `w` in
    `[-fusion.bound, fusion.bound]^E` minimising the validation loss (the full split's, capped at
    `cfg.batches` micro-batches) plus `fusion.l1 * ||w||_1`, searched by nevergrad's NGOpt with
    `fusion.budget` evaluations from the weights the client trained with (1/E each).

    The search is deterministic under `seed`, and never returns worse than its starting point: when nothing it
    tried scores better, the training weights stay.

    Returns:
        `tuple[list[float], float]`: the weights (router order) and their objective. The model is left mixing with
        them (see `CoMiGSForCausalLM.set_expert_weights`).
    """
    require_nevergrad()
    import nevergrad as ng
    import numpy as np

    num_experts, bound = model.config.num_experts, fusion.bound
    start = [1.0 / num_experts] * num_experts
    scores: dict[tuple[float, ...], float] = {}

    def objective(weights) -> float:
        key = tuple(float(w) for w in weights)
        if key not in scores:
            model.set_expert_weights(list(key))
            loss = evaluate_full_split(model, validation, cfg, accelerator)["test_loss"]
            scores[key] = loss + fusion.l1 * sum(abs(w) for w in key)
        return scores[key]

    # sigma a quarter of the range: the bounds sit 4 standard deviations apart, as nevergrad advises (>= 3)
    parametrization = ng.p.Array(init=np.array(start), lower=-bound, upper=bound).set_mutation(sigma=bound / 2)
    parametrization.random_state = np.random.RandomState(seed % 2**32)
    optimizer = ng.optimizers.NGOpt(parametrization=parametrization, budget=fusion.budget)
    model.eval()
    try:
        with warnings.catch_warnings():  # its backends' notes on their own settings, not the caller's business
            warnings.simplefilter("ignore")
            recommended = optimizer.minimize(objective).value
        best = min([tuple(start), tuple(float(w) for w in recommended)], key=objective)
        model.set_expert_weights(list(best))
    finally:
        model.train()
    return list(best), scores[best]


__all__ = ["FDLoRAFusion", "fusion_seed", "fusion_weights", "require_nevergrad"]
