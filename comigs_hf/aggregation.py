"""Aggregation rules: client state dicts and weights in, one state dict out.

Every rule is a pure function with the signature `(states, weights, **kwargs) -> dict[str, torch.Tensor]` and an entry
in `AGGREGATORS`, so a new rule is one function, one registry entry and one YAML value (`aggregation: <key>`); the
rounds loop never changes. Rules check their inputs and fail with a message naming the client index and the key,
because a silent shape broadcast or a NaN from one client would otherwise poison every client at the next broadcast.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch

__all__ = ["AGGREGATORS", "aggregate_trimmed_mean", "aggregate_weighted_mean", "get_aggregator"]


def _accumulation_dtype(tensor: torch.Tensor) -> torch.dtype:
    # float64 keeps the sum exact enough for any client count; MPS has no float64, so fall back to float32 there
    return torch.float32 if tensor.device.type == "mps" else torch.float64


def _check_states(states: Sequence[Mapping[str, torch.Tensor]]) -> list[str]:
    """Checks that all clients sent the same keys with the same shapes and only finite floating-point values.

    Returns:
        `list[str]`: the keys, in the order of the first client's state dict.
    """
    if len(states) == 0:
        raise ValueError("Cannot aggregate zero client states.")
    keys = list(states[0].keys())
    reference = set(keys)
    for index, state in enumerate(states):
        present = set(state.keys())
        missing = sorted(reference - present)
        unexpected = sorted(present - reference)
        if missing:
            raise ValueError(f"Client {index} is missing key {missing[0]!r} that client 0 sent (missing: {missing}).")
        if unexpected:
            raise ValueError(
                f"Client {index} sent key {unexpected[0]!r} that client 0 did not send (unexpected: {unexpected})."
            )
    for key in keys:
        first = states[0][key]
        for index, state in enumerate(states):
            tensor = state[key]
            if tensor.shape != first.shape:
                raise ValueError(
                    f"Key {key!r}: client {index} has shape {tuple(tensor.shape)} but client 0 has "
                    f"{tuple(first.shape)}."
                )
            if not tensor.is_floating_point():
                raise ValueError(
                    f"Key {key!r}: client {index} sent dtype {tensor.dtype}; only floating point is averaged."
                )
            if not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"Key {key!r}: client {index} sent non-finite values (NaN or inf).")
    return keys


def _normalise_weights(weights: Sequence[float], num_states: int) -> list[float]:
    if len(weights) != num_states:
        raise ValueError(f"Got {len(weights)} weights for {num_states} client states.")
    for index, weight in enumerate(weights):
        if not math.isfinite(float(weight)):
            raise ValueError(f"Weight of client {index} is not finite: {weight}.")
        if weight < 0:
            raise ValueError(f"Weight of client {index} is negative: {weight}.")
    total = float(sum(float(weight) for weight in weights))
    if total == 0.0:
        raise ValueError(f"All {num_states} client weights are zero; at least one client must count.")
    return [float(weight) / total for weight in weights]


def aggregate_weighted_mean(
    states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """Averages client state dicts key by key, weighting client `i` by `weights[i] / sum(weights)` (FedAvg).

    The sum is accumulated in float64 (float32 on MPS) and each result is cast back to the first client's dtype and
    placed on its device, so bfloat16 adapters do not lose precision to a long chain of low-precision additions.

    Args:
        states (`Sequence[Mapping[str, torch.Tensor]]`):
            One state dict per client, all with the same keys and shapes and only finite floating-point values.
        weights (`Sequence[float]`):
            One non-negative, finite weight per client (for example its number of training tokens); normalised here.

    Returns:
        `dict[str, torch.Tensor]`: new tensors (never views of the inputs), keyed in the first client's order.

    Raises:
        `ValueError`: naming the client index and key for mismatched key sets, shapes, non-floating dtypes or
        non-finite values, and the client index for non-finite or negative weights; also for all-zero weights.

    Example:

    ```python
    >>> import torch
    >>> from comigs_hf.aggregation import aggregate_weighted_mean
    >>> aggregate_weighted_mean([{"w": torch.tensor([0.0])}, {"w": torch.tensor([4.0])}], weights=[3, 1])
    {'w': tensor([1.])}

    ```
    """
    keys = _check_states(states)
    normalised = _normalise_weights(weights, len(states))
    result = {}
    for key in keys:
        first = states[0][key]
        accumulator = torch.zeros(first.shape, dtype=_accumulation_dtype(first), device=first.device)
        for weight, state in zip(normalised, states):
            if weight == 0.0:
                continue
            accumulator.add_(state[key].to(device=first.device, dtype=accumulator.dtype), alpha=weight)
        result[key] = accumulator.to(first.dtype)
    return result


def aggregate_trimmed_mean(
    states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], trim_ratio: float = 0.1
) -> dict[str, torch.Tensor]:
    """Coordinate-wise trimmed mean: per coordinate, drops the `floor(trim_ratio * n)` largest and smallest client
    values and averages the rest.

    As in Flower's `FedTrimmedAvg`, the kept values are averaged uniformly: trimming counts clients, so weighting the
    survivors by data size would let one large client dominate again. `weights` is accepted so every rule shares one
    signature, and only its length is checked.

    Args:
        states (`Sequence[Mapping[str, torch.Tensor]]`):
            One state dict per client, all with the same keys and shapes and only finite floating-point values.
        weights (`Sequence[float]`):
            One weight per client; unused beyond the length check.
        trim_ratio (`float`, *optional*, defaults to 0.1):
            Fraction of clients cut from each end, in `[0, 0.5)`. With fewer than `1 / trim_ratio` clients nothing is
            cut and the rule is the plain mean.

    Returns:
        `dict[str, torch.Tensor]`: new tensors in the first client's dtype and device, keyed in its order.

    Raises:
        `ValueError`: for a `trim_ratio` outside `[0, 0.5)`, a weight count that differs from the client count, or
        any of the state checks of [`aggregate_weighted_mean`].
    """
    if not 0.0 <= trim_ratio < 0.5:
        raise ValueError(f"trim_ratio must be in [0, 0.5) so that at least one client survives, got {trim_ratio}.")
    if len(weights) != len(states):
        raise ValueError(f"Got {len(weights)} weights for {len(states)} client states.")
    keys = _check_states(states)
    num_clients = len(states)
    cut = math.floor(trim_ratio * num_clients)
    result = {}
    for key in keys:
        first = states[0][key]
        # (n, *shape): one row per client, sorted per coordinate so the extremes sit at both ends
        stacked = torch.stack(
            [state[key].to(device=first.device, dtype=_accumulation_dtype(first)) for state in states]
        )
        kept = stacked.sort(dim=0).values[cut : num_clients - cut]
        result[key] = kept.mean(dim=0).to(first.dtype)
    return result


AGGREGATORS: dict[str, Callable[..., dict[str, torch.Tensor]]] = {
    "weighted_mean": aggregate_weighted_mean,
    "trimmed_mean": aggregate_trimmed_mean,
}


def get_aggregator(name: str) -> Callable[..., dict[str, torch.Tensor]]:
    """Looks up an aggregation rule in `AGGREGATORS`.

    Args:
        name (`str`): the registry key, e.g. `"weighted_mean"` or `"trimmed_mean"`.

    Returns:
        `Callable`: the rule, called as `rule(states, weights, **kwargs)`.

    Raises:
        `ValueError`: for an unknown name, listing the known ones.
    """
    try:
        return AGGREGATORS[name]
    except KeyError:
        raise ValueError(f"Unknown aggregation {name!r}; known: {', '.join(sorted(AGGREGATORS))}.") from None
