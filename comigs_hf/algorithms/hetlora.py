"""HetLoRA (Cho et al., 2024): clients of different ranks, and rank self-pruning with a regulariser on the tail.

Each client's expert adapters start at its own rank (`model.lora_r`, one per client: see `comigs_hf.ranks`). Every
expert step's loss adds `coef` times the norm of each adapter's tail, `||A[k:r]|| ||B[:, k:r]||` with
`k = int(strength * r)`, which drives the tail toward zero; after its local steps a client cuts an adapter of rank `r`
to rank `k` when that tail fell below the tail of the tensors it began the round with. The server's side is the
`norm_weighted_mean` aggregation rule (zero-padded factors averaged with weights `||B_i A_i||_F`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..aggregation import lora_partner
from ..configuration_comigs import EXPERT_ROLES
from ..modeling_comigs import CoMiGSForCausalLM
from ..ranks import expert_adapter_keys, truncate_to_ranks
from .base import Algorithm


def _tail_norm(a: torch.Tensor, b: torch.Tensor, rank: int, strength: float) -> torch.Tensor:
    """HetLoRA's tail of a rank-`rank` adapter: `||A[k:rank]|| ||B[:, k:rank]||` with `k = int(strength * rank)`."""
    cut = int(strength * rank)
    return torch.linalg.vector_norm(a[cut:rank]) * torch.linalg.vector_norm(b[:, cut:rank])


def prune_ranks(
    trained: dict[str, torch.Tensor],
    start: dict[str, torch.Tensor],
    ranks: dict[str, int],
    full_rank: int,
    strength: float,
) -> dict[str, int]:
    """HetLoRA's rank self-pruning: the new ranks after a round, each expert adapter cut from rank `r` to
    `int(strength * r)` (never below 1) when its tail (see `_tail_norm`) in `trained` is smaller than in `start`, the
    tensors the client began the round with."""
    pruned = dict(ranks)
    for key_a in expert_adapter_keys(trained):
        key_b = lora_partner(key_a)
        rank = ranks.get(key_a, full_rank)
        cut = int(strength * rank)
        if cut < 1:
            continue
        after = _tail_norm(trained[key_a], trained[key_b], rank, strength)
        before = _tail_norm(start[key_a], start[key_b], rank, strength)
        if after < before:
            pruned[key_a] = cut
    return pruned


@dataclass(frozen=True)
class HetLoRA(Algorithm):
    """HetLoRA's rank self-pruning and its regulariser.

    Args:
        strength (`float`): the pruning strength `gamma` in (0, 1): a rank `r` is cut to `int(gamma * r)`.
        coef (`float`, defaults to 0): the weight of the tail norms added to the training loss (the paper sweeps
            0.05, 0.005, 0.0005; the recipe key `rank_pruning_coef`); 0 prunes without regularising.
    """

    strength: float
    coef: float = 0.0

    def check(self, strategy) -> None:
        if isinstance(self.strength, bool) or not 0 < self.strength < 1:
            raise ValueError(f"Strategy {strategy.name!r}: HetLoRA's strength must be in (0, 1), not {self.strength}.")
        coef = self.coef
        if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not 0 <= coef < math.inf:
            raise ValueError(
                f"Strategy {strategy.name!r}: rank_pruning_coef must be a finite number >= 0, not {coef}."
            )

    def loss_penalty(
        self, model: CoMiGSForCausalLM, state, shared: dict[str, torch.Tensor]
    ) -> Callable[[], torch.Tensor] | None:
        """`coef` times the sum of every expert adapter's tail norm at its current rank (the model's `lora_r` where
        the client's `lora_ranks` has none), as a function of the model's live parameters."""
        if self.coef == 0:
            return None
        params = dict(model.named_parameters_by_role(*EXPERT_ROLES))
        full, ranks = model.config.lora_r, state.lora_ranks
        pairs = [
            (params[key_a], params[lora_partner(key_a)], ranks.get(key_a, full))
            for key_a in expert_adapter_keys(params)
        ]

        def penalty() -> torch.Tensor:
            return self.coef * sum(_tail_norm(a, b, rank, self.strength) for a, b, rank in pairs)

        return penalty

    def after_local_training(
        self, model: CoMiGSForCausalLM, state, trained: dict[str, torch.Tensor], start: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Cut the adapters whose tail shrank (`prune_ranks`); the cut tails leave the model too, so that what it
        evaluates is what it sends."""
        ranks = prune_ranks(trained, start, state.lora_ranks, model.config.lora_r, self.strength)
        if ranks == state.lora_ranks:
            return trained
        state.lora_ranks = ranks
        trained = truncate_to_ranks(trained, ranks)
        model.load_role_state_dict(trained)
        return trained


__all__ = ["HetLoRA", "prune_ranks"]
