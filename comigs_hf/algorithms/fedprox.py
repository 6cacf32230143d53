"""FedProx (Li et al., 2020): each client's loss adds a proximal term that keeps its shared tensors near the global.

The worked example of adding a baseline. FedProx changes one thing of FedAvg: every local step minimises
`loss + (mu / 2) * ||w - w_global||^2` over the tensors the client received, so that clients whose data differ drift
less from the round's global. That is one point of the round protocol, `loss_penalty`, so the whole baseline is this
module and one line of `comigs_hf.algorithms.STRATEGIES`:

    "fedprox": Strategy(name="fedprox", shared_roles=_EXPERTS, router_training="none", algorithms=(FedProx(mu=0.01),)),

after which `strategy: fedprox` runs it on every transport (`tests/test_algorithms.py` runs it: with `mu=0` it is
FedAvg to the last bit, and a larger `mu` keeps every client's update nearer the global).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..modeling_comigs import CoMiGSForCausalLM
from .base import Algorithm


@dataclass(frozen=True)
class FedProx(Algorithm):
    """FedProx's proximal term.

    Args:
        mu (`float`, defaults to 0.01): the weight of `(1 / 2) ||w - w_global||^2`; 0 is FedAvg.
    """

    mu: float = 0.01

    def check(self, strategy) -> None:
        if isinstance(self.mu, bool) or not isinstance(self.mu, (int, float)) or not 0 <= self.mu < math.inf:
            raise ValueError(f"Strategy {strategy.name!r}: FedProx's mu must be a finite number >= 0, not {self.mu}.")
        if not strategy.shared_roles:
            raise ValueError(f"Strategy {strategy.name!r}: FedProx keeps shared tensors near the global; none are.")

    def loss_penalty(
        self, model: CoMiGSForCausalLM, state, shared: dict[str, torch.Tensor]
    ) -> Callable[[], torch.Tensor] | None:
        if self.mu == 0 or not shared:
            return None
        parameters = dict(model.named_parameters())
        pairs = [(parameters[key], value.to(parameters[key].device)) for key, value in shared.items()]

        def penalty() -> torch.Tensor:
            return self.mu / 2 * sum((live - start).square().sum() for live, start in pairs)

        return penalty


__all__ = ["FedProx"]
