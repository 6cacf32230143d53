"""Centralised training, the upper bound without privacy: one model trains on the union of every client's data.

The one training client holds every client's train and validation splits (`comigs_hf.data.pool_client_data`) and
takes all their batches in one (`num_clients` x `batch_size` sequences per step, the reference's 256 for 4 x 64); its
state serves every client's evaluation on that client's own test split. Nothing is communicated.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..data import ClientData, pool_client_data
from ..trainer import TrainingConfig
from .base import Algorithm


@dataclass(frozen=True)
class Centralized(Algorithm):
    """Pooling every client's data into one training client."""

    equal_experts_because = "trains one model for every client"
    refused_transports = {
        "hub": "trains one model on every client's data pooled together; a Hub client holds its own data only. "
        "Run it over Accelerate.",
        "flower": "trains one model on every client's data pooled together; a Flower node holds its own data only. "
        "Run it over Accelerate.",
    }

    def check(self, strategy) -> None:
        if strategy.shared_roles:
            raise ValueError(f"Strategy {strategy.name!r} pools the clients into one, so it has nobody to share with.")

    def check_participation(self, clients_per_round: int | None) -> None:
        if clients_per_round is not None:
            raise ValueError(
                f"clients_per_round={clients_per_round} samples the clients that train, but a centralised strategy "
                "trains one model on everyone's pooled data: leave it null."
            )

    def pool(
        self, clients: list[ClientData], training: TrainingConfig
    ) -> tuple[list[ClientData], list[int], TrainingConfig]:
        """One training client for all, which takes all their batches, so that it sees as many tokens per step."""
        pooled = replace(training, batch_size=training.batch_size * len(clients))
        return [pool_client_data(clients)], [0] * len(clients), pooled


__all__ = ["Centralized"]
