"""The server step of the round protocol: check every client update against the global state, then combine them.

Every transport calls [`server_step`] with the updates that reached it and the global shared state the round started
from (the reference), and sends what its [`RoundOutcome`] says: the new global, and (for an algorithm whose clients
combine the updates themselves) every client's update. The default step is [`aggregate_updates`]: each update must
hold exactly the reference's tensor names, with its shapes and dtype and only finite values, and a positive token
count; the strategy's rule from the `AGGREGATORS` registry then combines them with the strategy's weighting, and the
strategy's algorithms may change the result (differential privacy's noise). A result that is not finite is never
returned: an overflow in the average is an error, not a new global state.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .aggregation import get_aggregator
from .ranks import lora_ranks, payload_bytes, payload_parameters
from .strategies import Strategy, aggregation_weights
from .trainer import ClientUpdate

# a token count above this is no honest training split (it would overflow the float weights' exact integers)
MAX_TRAIN_TOKENS = 2**53
# no trained LoRA factor or router weight comes near this; finite values up to 3e38 would pass a finiteness check
# and, averaged in, leave a global no client can train from
MAX_ABS_VALUE = 1e4


class InvalidUpdate(ValueError):
    """A client update that does not fit the round's reference; `client_id` names the client, the message why."""

    def __init__(self, client_id: int | str, reason: str):
        super().__init__(f"update of client {client_id!r}: {reason}")
        self.client_id = client_id
        self.reason = reason


def check_update(
    update: ClientUpdate, reference: Mapping[str, torch.Tensor], max_update_norm: float | None = None
) -> None:
    """Checks one update against the reference: tensor names, shapes, dtype, finite values of at most
    `MAX_ABS_VALUE` in magnitude, its token count, and (with `max_update_norm`) its distance from the reference.

    Args:
        update ([`~comigs_hf.trainer.ClientUpdate`]): what a client sent.
        reference (`Mapping[str, torch.Tensor]`): the global shared state the round started from (on the meta
            device when only its layout is known).
        max_update_norm (`float`, *optional*): the largest L2 norm of `update - reference` over all shared tensors;
            it needs the reference's values.

    Raises:
        [`InvalidUpdate`]: naming the client and the first key (or field) at fault.
        `ValueError`: `max_update_norm` with a reference that has no values.
    """
    tokens = update.train_tokens
    if isinstance(tokens, bool) or not isinstance(tokens, int) or not 0 < tokens <= MAX_TRAIN_TOKENS:
        raise InvalidUpdate(update.client_id, f"train_tokens must be an integer in [1, 2**53], got {tokens!r}.")
    missing = sorted(set(reference) - set(update.shared))
    unexpected = sorted(set(update.shared) - set(reference))
    if missing or unexpected:
        raise InvalidUpdate(update.client_id, f"wrong tensors: missing {missing[:3]}, unexpected {unexpected[:3]}.")
    for key, expected in reference.items():
        tensor = update.shared[key]
        if tuple(tensor.shape) != tuple(expected.shape):
            raise InvalidUpdate(
                update.client_id, f"wrong shape for {key!r}: {tuple(tensor.shape)}, expected {tuple(expected.shape)}."
            )
        if tensor.dtype != expected.dtype:
            raise InvalidUpdate(update.client_id, f"{key!r} has dtype {tensor.dtype}, expected {expected.dtype}.")
        if not bool(torch.isfinite(tensor).all()):
            raise InvalidUpdate(update.client_id, f"{key!r} holds NaN or Inf values.")
        if tensor.numel() and float(tensor.abs().max()) > MAX_ABS_VALUE:
            raise InvalidUpdate(update.client_id, f"{key!r} holds values beyond +-{MAX_ABS_VALUE:g}.")
    if max_update_norm is not None:
        if any(tensor.is_meta for tensor in reference.values()):
            raise ValueError("max_update_norm needs the values of the global state the round started from.")
        squared = sum(float((update.shared[k].double() - v.double()).square().sum()) for k, v in reference.items())
        distance = squared**0.5
        if distance > max_update_norm:
            raise InvalidUpdate(
                update.client_id, f"its distance from the round's global, {distance:.4g}, exceeds {max_update_norm}."
            )


@dataclass
class RoundOutcome:
    """What the server step gives back after a round.

    Args:
        shared (`dict[str, torch.Tensor]`): the new global shared state (empty when there is none).
        rows (`list[dict]`): each update's row of the round's record (see [`round_row`]), in the updates' order.
        relayed (`list[ClientUpdate]`): the updates every client that trained receives beside the global (an
            algorithm whose clients combine them themselves, PCL); empty otherwise.
    """

    shared: dict[str, torch.Tensor]
    rows: list[dict]
    relayed: list[ClientUpdate] = field(default_factory=list)


def server_step(
    strategy: Strategy,
    updates: Sequence[ClientUpdate],
    reference: Mapping[str, torch.Tensor],
    noise_seed: int | None = None,
) -> RoundOutcome:
    """The round's server step, whatever the transport: an algorithm's own (`Algorithm.server_step`) where the
    strategy has one, else [`aggregate_updates`] when it shares tensors (the reference stays the global when it
    shares none).

    Args:
        strategy ([`~comigs_hf.strategies.Strategy`]): what is shared and how it is combined.
        updates (`Sequence[ClientUpdate]`): the updates that reached the server, sorted by client id.
        reference (`Mapping[str, torch.Tensor]`): the global shared state the round started from.
        noise_seed (`int`, *optional*): a secret seed of the step's randomness shared by the processes that run it
            together (see [`aggregate_updates`]).
    """
    for algorithm in strategy.algorithms:
        outcome = algorithm.server_step(strategy, list(updates), dict(reference), noise_seed)
        if outcome is not None:
            return outcome
    shared = aggregate_updates(strategy, updates, reference, noise_seed) if strategy.shared_roles else dict(reference)
    received = shared if strategy.shared_roles else {}
    return RoundOutcome(shared=shared, rows=[round_row(update, received) for update in updates])


def aggregate_updates(
    strategy: Strategy,
    updates: Sequence[ClientUpdate],
    reference: Mapping[str, torch.Tensor],
    noise_seed: int | None = None,
) -> dict[str, torch.Tensor]:
    """The new global shared state: the strategy's rule over the checked updates.

    The updates are combined in the order given (transports pass them sorted by client id, so the float sums do not
    depend on which process or transport carried them). Weights follow `strategy.weighting`: each update's
    `train_tokens`, or uniform. The strategy's algorithms then change the combined tensors where they need to
    (`Algorithm.after_aggregation`: differential privacy's noise, from `noise_seed` or the operating system's
    randomness, the one step of a run that no recipe seed reproduces).

    Args:
        strategy ([`~comigs_hf.strategies.Strategy`]): its `aggregation` (a key of `AGGREGATORS`),
            `aggregation_kwargs` and `weighting`.
        updates (`Sequence[ClientUpdate]`): at least one.
        reference (`Mapping[str, torch.Tensor]`): the global shared state the round started from; the result has its
            names, shapes and dtypes.
        noise_seed (`int`, *optional*): the seed of the step's randomness (the privacy noise), a secret shared by
            processes that run this step together (the Accelerate ranks); `None` draws one from the operating system.

    Returns:
        `dict[str, torch.Tensor]`: the new global shared state, keyed like the reference.

    Raises:
        [`InvalidUpdate`]: an update does not fit the reference (see [`check_update`]).
        `ValueError`: no update, or a combined tensor that is not finite (an overflow).
    """
    if not updates:
        raise ValueError("Cannot aggregate a round without client updates.")
    for update in updates:
        check_update(update, reference, strategy.max_update_norm)
    rule = get_aggregator(strategy.aggregation)
    weights = aggregation_weights(strategy, [update.train_tokens for update in updates])
    combined = rule([update.shared for update in updates], weights, **strategy.aggregation_kwargs)
    return _published(strategy, combined, reference, len(updates), noise_seed)


def apply_mean_update(
    strategy: Strategy,
    mean_update: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    num_updates: int,
    noise_seed: int | None = None,
) -> dict[str, torch.Tensor]:
    """The new global shared state from the mean of `num_updates` updates (`shared - reference`) combined elsewhere:
    secure aggregation, where the server only ever holds their sum. The rest is [`aggregate_updates`]'s: the
    algorithms' changes for `num_updates` updates (the privacy noise), and the refusal of a result that is not finite
    or beyond the value bound.

    Raises:
        `ValueError`: a combined tensor that is not finite or beyond `MAX_ABS_VALUE`, or missing keys.
    """
    missing = sorted(set(reference) - set(mean_update))
    if missing:
        raise ValueError(f"The mean update lacks {missing[:5]}.")
    combined = {key: reference[key].double() + mean_update[key].double() for key in reference}
    return _published(strategy, combined, reference, num_updates, noise_seed)


def _published(
    strategy: Strategy,
    combined: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    num_updates: int,
    noise_seed: int | None,
) -> dict[str, torch.Tensor]:
    combined = {key: combined[key] for key in reference}
    for algorithm in strategy.algorithms:  # differential privacy's noise (every update was clipped: checked above)
        combined = algorithm.after_aggregation(combined, num_updates, noise_seed)
    result = {}
    for key, expected in reference.items():
        tensor = combined[key].to(expected.dtype)
        if not bool(torch.isfinite(tensor).all()) or (tensor.numel() and float(tensor.abs().max()) > MAX_ABS_VALUE):
            raise ValueError(
                f"The {strategy.aggregation!r} aggregate of {key!r} over {num_updates} updates is not finite or "
                f"beyond +-{MAX_ABS_VALUE:g} in {expected.dtype}: refusing to publish it."
            )
        result[key] = tensor
    return result


def sample_clients(num_clients: int, clients_per_round: int | None, seed: int, round_index: int) -> list[int]:
    """The clients asked to train round `round_index`, in order: every client when `clients_per_round` is `None`,
    else a uniform draw without replacement seeded by `(seed, round_index)` only, so that every transport and every
    process (and a resumed run) asks the same clients.

    Raises:
        `ValueError`: `clients_per_round` outside `[1, num_clients]`.
    """
    if clients_per_round is None:
        return list(range(num_clients))
    if not 1 <= clients_per_round <= num_clients:
        raise ValueError(f"clients_per_round must be in [1, {num_clients}] (the clients), got {clients_per_round}.")
    # a string seed: Python hashes it with SHA-512, the same on every machine and version
    draw = random.Random(f"comigs-clients-{seed}-{round_index}")
    return sorted(draw.sample(range(num_clients), clients_per_round))


def evaluation_row(client_id: int, metrics: Mapping[str, object]) -> dict:
    """The row of a client evaluated in a round it did not train (partial participation): its test metrics with the
    round's global and its own private state; it sent nothing."""
    return {"client_id": client_id, "trained": False, **{k: v for k, v in metrics.items() if k != "client_id"}}


def round_row(update: ClientUpdate, received: dict[str, torch.Tensor]) -> dict:
    """A client's row of the round's record: its training metrics and what it sent and receives (bytes,
    parameters), counted at the ranks its adapters use (a client below the model's rank sends and takes back the
    leading slices only)."""
    ranks = lora_ranks(update.shared)
    parameters = payload_parameters(update.shared, ranks)
    return {
        "client_id": update.client_id,
        "trained": True,
        "train_tokens": update.train_tokens,
        **update.metrics,
        "bytes_sent": payload_bytes(update.shared, ranks),
        "bytes_received": payload_bytes(received, ranks),
        "params_sent": parameters["total"],
        "expert_params_sent": parameters["experts"],
    }


def check_secure_aggregation(strategy: Strategy, clipping_range: float) -> None:
    """Refuse what secure aggregation cannot do: the server sees only the sum of the updates, so it can take only
    their equal-weight mean, and cannot check any one of them.

    Raises:
        `ValueError`: naming the keys.
    """
    problems = []
    if not strategy.server_combines or not strategy.shared_roles:
        problems.append(f"strategy {strategy.name!r} has no server mean of shared tensors to secure")
    if strategy.aggregation != "weighted_mean" or strategy.weighting != "uniform":
        problems.append(
            f"aggregation {strategy.aggregation!r} with weighting {strategy.weighting!r}: the server can only take "
            "the equal-weight mean of updates it never sees (aggregation: weighted_mean, weighting: uniform)"
        )
    if strategy.max_client_weight is not None:
        problems.append("max_client_weight: every client weighs the same under secure aggregation; leave it null")
    if strategy.max_update_norm is not None and not strategy.clients_bound_updates:
        problems.append(
            "max_update_norm: the server cannot measure an update it never sees; bound updates with "
            "dp_clipping_norm (each client clips its own) or secure_clipping_range"
        )
    if isinstance(clipping_range, bool) or not 0 < clipping_range < 1e6:
        problems.append(f"secure_clipping_range must be in (0, 1e6), got {clipping_range}")
    if problems:
        raise ValueError("secure_aggregation: " + "; ".join(problems) + ".")


__all__ = [
    "MAX_ABS_VALUE",
    "MAX_TRAIN_TOKENS",
    "InvalidUpdate",
    "RoundOutcome",
    "aggregate_updates",
    "apply_mean_update",
    "check_secure_aggregation",
    "check_update",
    "evaluation_row",
    "round_row",
    "sample_clients",
    "server_step",
]
