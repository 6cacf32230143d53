"""The points of the round protocol where an algorithm plugs in, and their defaults (nothing happens).

A [`~comigs_hf.strategies.Strategy`] holds what the paper's method and its baselines have in common; what one of them
needs beyond it is an [`Algorithm`]: a frozen record of its settings whose methods the protocol calls at these points,
in the order of `Strategy.algorithms`:

| point | called | by |
|---|---|---|
| `check(strategy)` | when the strategy is built | `Strategy` |
| `check_requirements()` | before anything is built (optional packages) | the recipe |
| `pool(clients, training)` | when the federation is built | the recipe |
| `loss_penalty(model, state, shared)` | each local expert step's loss gets its term | `Client.train` |
| `after_local_training(model, state, trained, start)` | after the local steps, before the split | `Client.train` |
| `outgoing(shared, start, round_index)` | on the shared tensors that leave the client | `Client.train` |
| `server_step(strategy, updates, reference, noise_seed)` | in place of the server's aggregation | `server_step` |
| `after_aggregation(combined, num_updates, noise_seed)` | on the new global, before it is checked | `server_step` |
| `receive(client, state, round_index, outcome)` | on each client that trained, after the server step | transports |
| `finish(client, state, shared)` | on every client after the last round | transports |
| `report(rounds, delta)` | entries of `results.json` | outputs |

The class attributes say what the transports and checks need to know without naming any algorithm: whether every
client must hold the same experts, whether the server still combines the updates, whether clients bound their own
updates, and which transports cannot carry it (and why). This layer knows no transport and no config file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch


@dataclass(frozen=True)
class Algorithm:
    """One algorithm's settings and its behaviour at the round protocol's points (see the module's table). Subclass
    it as a frozen dataclass and override the points the algorithm uses."""

    # why every client must hold the same experts (their tensors are compared or merged across clients); None: no need
    equal_experts_because: ClassVar[str | None] = None
    # the server combines the shared tensors into one global each round (False: clients combine them themselves)
    server_combines: ClassVar[bool] = True
    # each client bounds its own update (the server can then check the bound without seeing the update)
    clients_bound_updates: ClassVar[bool] = False
    # transport name -> why it cannot carry this algorithm
    refused_transports: ClassVar[dict[str, str]] = {}

    @property
    def name(self) -> str:
        return type(self).__name__

    # ---- construction --------------------------------------------------------------------------------------------
    def check(self, strategy: Any) -> None:
        """Refuse, by raising `ValueError`, a strategy record this algorithm cannot run with."""

    def check_requirements(self) -> None:
        """Raise `ImportError` naming the extra to install when an optional package it needs is missing."""

    def check_participation(self, clients_per_round: int | None) -> None:
        """Refuse, by raising `ValueError`, a partial participation it cannot run with."""

    def update_bound(self, bound: float | None) -> float | None:
        """The largest distance an update may lie from the round's global (`None`: no bound), given the bound the
        strategy would set without this algorithm."""
        return bound

    def pool(self, clients: list, training: Any) -> tuple[list, list[int], Any] | None:
        """`(training clients, serving, training config)` when the clients that train are not the federation's own
        (`serving[i]`: the training client whose state serves client `i`), `None` otherwise."""
        return None

    # ---- the client step -----------------------------------------------------------------------------------------
    def loss_penalty(
        self, model: Any, state: Any, shared: dict[str, torch.Tensor]
    ) -> Callable[[], torch.Tensor] | None:
        """A regulariser of the live parameters added to every expert step's loss (`None`: none); `shared` is the
        global the round began from."""
        return None

    def after_local_training(
        self, model: Any, state: Any, trained: dict[str, torch.Tensor], start: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The client's tensors after its local steps, changed as the algorithm needs (the model holds them too)."""
        return trained

    def outgoing(
        self, shared: dict[str, torch.Tensor], start: dict[str, torch.Tensor], round_index: int
    ) -> dict[str, torch.Tensor]:
        """What of the shared tensors after training leaves the client (`start`: the global the round began from)."""
        return shared

    def receive(self, client: Any, state: Any, round_index: int, outcome: Any) -> bool:
        """The client's step after the server's (on a client that trained this round); returns whether `state`
        changed."""
        return False

    def finish(self, client: Any, state: Any, shared: dict[str, torch.Tensor]) -> bool:
        """The client's step after the last round, with the final global; returns whether `state` changed."""
        return False

    # ---- the server step -----------------------------------------------------------------------------------------
    def server_step(self, strategy: Any, updates: list, reference: dict[str, torch.Tensor], noise_seed: int | None):
        """A `comigs_hf.server.RoundOutcome` in place of the server's aggregation, or `None` to let it aggregate."""
        return None

    def after_aggregation(
        self, combined: dict[str, torch.Tensor], num_updates: int, noise_seed: int | None
    ) -> dict[str, torch.Tensor]:
        """The new global after the aggregation rule, before it is checked and published."""
        return combined

    # ---- outputs -------------------------------------------------------------------------------------------------
    def report(self, rounds: int, delta: float) -> dict[str, Any]:
        """Entries of `results.json` this algorithm adds."""
        return {}


__all__ = ["Algorithm"]
