"""PCL, personalised collaborative learning: no server average, each client combines every client's tensors itself.

In the rounds `from_round`, `from_round + every`, ... every client sends its shared tensors, receives every
client's, scores each on its own validation split (beside its own private tensors) and replaces its own with their
mean under trust weights `softmax(-validation perplexity)` ([`~comigs_hf.aggregation.trust_weights`]); in the other
rounds nothing is sent and every client keeps what it trained. This reveals every client's shared tensors (under the
`pcl` preset its whole model) to every other client, so neither secure aggregation nor a trusted server can hide
them: use it only among clients that may see each other's models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from accelerate import Accelerator

from ..aggregation import get_aggregator, trust_weights
from ..client_state import activate_client
from ..evaluation import EvaluationConfig, evaluate_full_split
from ..modeling_comigs import CoMiGSForCausalLM
from ..server import RoundOutcome, check_update, round_row
from ..strategies import partition_state_dict
from ..trainer import ClientState, ClientUpdate
from .base import Algorithm


@dataclass(frozen=True)
class PCL(Algorithm):
    """PCL's combination on the clients.

    Args:
        from_round (`int`, defaults to 5): the first round whose updates are combined (the reference: round 5).
        every (`int`, defaults to 2): rounds between combinations (the reference: every 2).
    """

    from_round: int = 5
    every: int = 2

    equal_experts_because = "scores every client's tensors in each client's own model"
    server_combines = False
    refused_transports = {
        "hub": (
            "Hub rounds publish one server aggregate per round, but this strategy has none: each client combines "
            "every client's tensors itself, which a Hub repo would have to publish to every client. Run it over "
            "Accelerate."
        ),
        "flower": (
            "each client combines every other client's update itself; Flower's nodes exchange messages with the "
            "server only. Run it over Accelerate."
        ),
    }

    def check(self, strategy) -> None:
        for key in ("from_round", "every"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Strategy {strategy.name!r}: PCL's {key} must be an integer >= 1, not {value!r}.")
        if not strategy.shared_roles:
            raise ValueError(f"Strategy {strategy.name!r}: PCL combines shared tensors, but none are.")

    def combines_in_round(self, round_index: int) -> bool:
        """Whether the updates of round `round_index` are combined: `from_round`, then every `every` rounds."""
        return round_index >= self.from_round and (round_index - self.from_round) % self.every == 0

    def outgoing(
        self, shared: dict[str, torch.Tensor], start: dict[str, torch.Tensor], round_index: int
    ) -> dict[str, torch.Tensor]:
        return shared if self.combines_in_round(round_index) else {}

    def server_step(self, strategy, updates: list, reference: dict[str, torch.Tensor], noise_seed: int | None):
        """No global: in a combination round every client receives every client's update."""
        rows = [round_row(update, {}) for update in updates]
        if not any(update.shared for update in updates):
            return RoundOutcome(shared={}, rows=rows)
        for row in rows:  # each client received every other client's tensors
            row["bytes_received"] = sum(
                other["bytes_sent"] for other in rows if other["client_id"] != row["client_id"]
            )
        return RoundOutcome(shared={}, rows=rows, relayed=list(updates))

    def receive(self, client, state, round_index: int, outcome: RoundOutcome) -> bool:
        """Replace the client's shared tensors with every client's, combined under its own trust weights."""
        if not outcome.relayed:
            return False
        strategy = client.spec.strategy
        own = partition_state_dict(state.parameters, strategy)[0]
        weights, _ = client_trust_weights(
            client.model, state, client.data.validation, outcome.relayed, client.spec.evaluation, client.accelerator
        )
        state.parameters.update(combine_for_client(strategy, outcome.relayed, own, weights))
        return True


def client_trust_weights(
    model: CoMiGSForCausalLM,
    state: ClientState,
    validation: torch.Tensor,
    updates: Sequence[ClientUpdate],
    cfg: EvaluationConfig,
    accelerator: Accelerator,
) -> tuple[list[float], list[float]]:
    """PCL's trust weights of one client: each update's shared tensors, swapped into the client's model beside its
    private ones, scored on the client's validation split (the full split's perplexity, capped at `cfg.batches`
    micro-batches), then [`~comigs_hf.aggregation.trust_weights`].

    Leaves the model holding the client with the last update's tensors: activate it again before using it.

    Returns:
        `tuple[list[float], list[float]]`: the weights and the perplexities, in the updates' order.
    """
    perplexities = []
    model.eval()
    try:
        for update in updates:
            activate_client(model, state, update.shared)
            perplexities.append(evaluate_full_split(model, validation, cfg, accelerator)["test_ppl"])
    finally:
        model.train()
    return trust_weights(perplexities), perplexities


def combine_for_client(
    strategy, updates: list, own: dict[str, torch.Tensor], weights: list[float]
) -> dict[str, torch.Tensor]:
    """PCL's step, which each client runs for itself: every client's update is checked against the client's own
    shared tensors `own` as the server checks against a global, then combined by the strategy's rule with the
    client's `weights` (its trust weights) in place of the strategy's weighting.

    Raises:
        [`~comigs_hf.server.InvalidUpdate`]: an update does not fit the client's own layout or values.
        `ValueError`: no update, or a weight count that differs from the update count.
    """
    if not updates or len(weights) != len(updates):
        raise ValueError(f"Got {len(weights)} trust weights for {len(updates)} updates; need one per update.")
    for update in updates:
        check_update(update, own, strategy.max_update_norm)
    rule = get_aggregator(strategy.aggregation)
    combined = rule([update.shared for update in updates], list(weights), **strategy.aggregation_kwargs)
    return {key: combined[key].to(expected.dtype) for key, expected in own.items()}


__all__ = ["PCL", "client_trust_weights", "combine_for_client"]
