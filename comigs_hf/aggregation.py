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

__all__ = [
    "AGGREGATORS",
    "aggregate_coordinate_median",
    "aggregate_krum",
    "aggregate_norm_weighted_mean",
    "aggregate_product_svd",
    "aggregate_trimmed_mean",
    "aggregate_weighted_mean",
    "get_aggregator",
    "lora_pairs",
    "lora_partner",
    "trust_weights",
]


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


def _stacked(states: Sequence[Mapping[str, torch.Tensor]], key: str) -> torch.Tensor:
    """`(n, *shape)`: client `i`'s tensor `key` in row `i`, in the accumulation dtype, on client 0's device."""
    first = states[0][key]
    return torch.stack([state[key].to(device=first.device, dtype=_accumulation_dtype(first)) for state in states])


def aggregate_coordinate_median(
    states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """Coordinate-wise median (Yin et al., 2018): per coordinate, the median of the clients' values (the mean of the
    two middle ones for an even count), so fewer than half the clients, however far off, cannot move it past the
    honest values.

    Like [`aggregate_trimmed_mean`] it counts clients, not tokens: `weights` is accepted so every rule shares one
    signature, and only its length is checked.

    Raises:
        `ValueError`: a weight count that differs from the client count, or any check of [`aggregate_weighted_mean`].
    """
    if len(weights) != len(states):
        raise ValueError(f"Got {len(weights)} weights for {len(states)} client states.")
    keys = _check_states(states)
    lower, upper = (len(states) - 1) // 2, len(states) // 2
    result = {}
    for key in keys:
        ordered = _stacked(states, key).sort(dim=0).values
        result[key] = ((ordered[lower] + ordered[upper]) / 2).to(states[0][key].dtype)
    return result


def aggregate_krum(
    states: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    num_byzantine: int = 1,
    num_selected: int = 1,
) -> dict[str, torch.Tensor]:
    """(Multi-)Krum (Blanchard et al., 2017): each client is scored by the summed squared distance, over all its
    tensors, to its `n - num_byzantine - 2` nearest other clients; the `num_selected` lowest-scored clients are
    averaged with their `weights` (Krum: the one most central client; Flower's `FedKrum` with `num_clients_to_keep`).

    An outlier is far from everyone, so it scores high and is left out, as long as `n > 2 * num_byzantine + 2`.

    Args:
        states (`Sequence[Mapping[str, torch.Tensor]]`): one state dict per client.
        weights (`Sequence[float]`): one non-negative weight per client, used among the selected ones.
        num_byzantine (`int`, *optional*, defaults to 1): the number of clients the rule must withstand.
        num_selected (`int`, *optional*, defaults to 1): how many clients are averaged.

    Raises:
        `ValueError`: fewer than `2 * num_byzantine + 3` clients, a `num_selected` outside `[1, n]`, or any check of
        [`aggregate_weighted_mean`].
    """
    count = len(states)
    for name, value, low in (("num_byzantine", num_byzantine, 0), ("num_selected", num_selected, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
    # no client fails as every rule does; one (the Strategy's probe, a round with a single update) is the mean
    if count <= 1:
        return aggregate_weighted_mean(states, weights)
    if count < 2 * num_byzantine + 3:
        raise ValueError(
            f"Krum with num_byzantine={num_byzantine} needs at least {2 * num_byzantine + 3} clients, got {count}."
        )
    if num_selected > count:
        raise ValueError(f"num_selected={num_selected} exceeds the {count} clients.")
    keys = _check_states(states)
    _normalise_weights(weights, count)
    distances = torch.zeros(count, count, dtype=torch.float64)
    for key in keys:
        flat = _stacked(states, key).flatten(1).double().cpu()  # (n, numel)
        distances += torch.cdist(flat, flat).square()
    neighbours = count - num_byzantine - 2
    # each row's smallest entries after its own zero on the diagonal
    scores = distances.sort(dim=1).values[:, 1 : neighbours + 1].sum(dim=1)
    selected = sorted(scores.argsort()[:num_selected].tolist())
    return aggregate_weighted_mean([states[i] for i in selected], [weights[i] for i in selected])


def lora_partner(key: str) -> str:
    """The other factor of `key`'s LoRA adapter: the `lora_B` name of a `lora_A` key and back (the same name with
    `.lora_B.` in place of `.lora_A.`); any other key is returned as it is."""
    if ".lora_A." in key:
        return key.replace(".lora_A.", ".lora_B.", 1)
    return key.replace(".lora_B.", ".lora_A.", 1)


def lora_pairs(keys: Sequence[str]) -> dict[str, str]:
    """Each LoRA `lora_A` key of `keys` with its `lora_B` partner (see [`lora_partner`]), for the rules that act on
    the product `B @ A` of one adapter; keys without a partner are left out.
    """
    present = set(keys)
    return {key: lora_partner(key) for key in keys if ".lora_A." in key and lora_partner(key) in present}


def aggregate_product_svd(
    states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """FlexLoRA (Bai et al., 2024): averages each adapter's full update `B @ A` and factorises the mean again by a
    truncated SVD, so that clients of any rank contribute their whole update and each takes back its best rank-r
    approximation.

    For every `lora_A` key with its `lora_B` partner (see [`lora_pairs`]): `M = sum_i w_i B_i @ A_i` (weights
    normalised), `M = U S V^T`, and the result is `A = V^T[:r]`, `B = U[:, :r] S[:r]` with `r` the factors' rank.
    Clients of a lower rank are zero-padded to `r`; their leading `r_i` rows of `A` and columns of `B` are the
    rank-`r_i` truncation of the same SVD, which is what `comigs_hf.trainer` gives them. The LoRA scaling is common
    to all clients, so it cancels from the mean and the factorisation. Every other key (a router) gets the weighted
    mean.

    `M` is never formed: with `B_cat = [w_1 B_1, ..., w_n B_n]` and `A_cat = [A_1; ...; A_n]`, `M = B_cat A_cat`,
    and two QR decompositions reduce its SVD to one of an `(n r) x (n r)` matrix.

    Args:
        states (`Sequence[Mapping[str, torch.Tensor]]`): one state dict per client, LoRA factors zero-padded to one
            rank.
        weights (`Sequence[float]`): one non-negative weight per client (FlexLoRA: its training tokens).

    Returns:
        `dict[str, torch.Tensor]`: new tensors in the first client's dtype and device, keyed in its order.

    Raises:
        `ValueError`: any of the checks of [`aggregate_weighted_mean`].
    """
    keys = _check_states(states)
    normalised = _normalise_weights(weights, len(states))
    result = aggregate_weighted_mean(states, weights)
    for key_a, key_b in lora_pairs(keys).items():
        first_a, first_b = states[0][key_a], states[0][key_b]
        dtype, rank = _accumulation_dtype(first_a), first_a.shape[0]
        kept = [(w, s) for w, s in zip(normalised, states) if w > 0]
        # (O, n*R) and (n*R, I): the mean update is their product
        stacked_b = torch.cat([w * s[key_b].to(first_b.device, dtype) for w, s in kept], dim=1)
        stacked_a = torch.cat([s[key_a].to(first_a.device, dtype) for _, s in kept], dim=0)
        q_b, r_b = torch.linalg.qr(stacked_b)  # (O, m), (m, n*R)
        q_a, r_a = torch.linalg.qr(stacked_a.T)  # (I, m'), (m', n*R)
        u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)  # the core (m, m'): M = q_b core q_a^T
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
        lead_a, lead_b = vh @ q_a.T, (q_b @ u) * s  # (<=R, I), (O, <=R)
        # fewer singular values than the rank (a small layer or rank-deficient mean): the rest is a zero update
        a = torch.zeros(first_a.shape, dtype=dtype, device=first_a.device)
        b = torch.zeros(first_b.shape, dtype=dtype, device=first_b.device)
        a[: lead_a.shape[0]], b[:, : lead_b.shape[1]] = lead_a, lead_b
        result[key_a], result[key_b] = a.to(first_a.dtype), b.to(first_b.dtype)
    return result


def aggregate_norm_weighted_mean(
    states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """HetLoRA's sparsity-weighted aggregation (Cho et al., 2024): each adapter's zero-padded factors are averaged
    with client `i` weighted by the Frobenius norm of its update, `||B_i @ A_i||_F`, normalised over the clients.

    Clients of lower rank hold zeros beyond it, so the mean is HetLoRA's zero-padded aggregation, and a client whose
    update shrank (rank self-pruning) counts for less. The norm is taken of the product (the update the client
    applies), as published; the reference code weights `A` and `B` each by its own norm. When every client's update
    of an adapter is zero (round 1, every `B` still zero), `weights` decide instead; every other key (a router) gets
    the `weights`-weighted mean.

    The weights follow the clients' own values: a client can buy weight by inflating its update, so a federation
    that does not trust its clients bounds updates with the strategy's `max_update_norm`.

    Args:
        states (`Sequence[Mapping[str, torch.Tensor]]`): one state dict per client, LoRA factors zero-padded to one
            rank.
        weights (`Sequence[float]`): one non-negative weight per client, used where the norms give none.

    Returns:
        `dict[str, torch.Tensor]`: new tensors in the first client's dtype and device, keyed in its order.

    Raises:
        `ValueError`: any of the checks of [`aggregate_weighted_mean`].
    """
    keys = _check_states(states)
    _normalise_weights(weights, len(states))
    result = aggregate_weighted_mean(states, weights)
    for key_a, key_b in lora_pairs(keys).items():
        norms = []
        for state in states:
            a, b = (state[key].to(_accumulation_dtype(state[key])) for key in (key_a, key_b))
            # ||B A||_F^2 = trace((B^T B)(A A^T)): two (R, R) products instead of the (O, I) update
            norms.append(float((b.T @ b).mul_(a @ a.T).sum().clamp_min(0.0)) ** 0.5)
        if sum(norms) > 0:
            pair = [{key: state[key] for key in (key_a, key_b)} for state in states]
            result.update(aggregate_weighted_mean(pair, norms))
    return result


def trust_weights(perplexities: Sequence[float]) -> list[float]:
    """PCL's trust weights of one client: `softmax(-perplexity)` over every client's shared tensors scored on its own
    validation split, so the tensors that fit its data best weigh most (a perplexity lower by 1 weighs e times more).

    A non-finite perplexity (a diverged client) gets weight 0; the softmax subtracts the largest score first, so no
    perplexity overflows it.

    Raises:
        `ValueError`: no perplexity, or none finite.
    """
    scores = [-float(p) if math.isfinite(float(p)) else -math.inf for p in perplexities]
    if not scores or max(scores) == -math.inf:
        raise ValueError(f"Trust weights need at least one finite perplexity, got {list(perplexities)}.")
    top = max(scores)
    exponentials = [math.exp(score - top) for score in scores]
    total = sum(exponentials)
    return [value / total for value in exponentials]


AGGREGATORS: dict[str, Callable[..., dict[str, torch.Tensor]]] = {
    "weighted_mean": aggregate_weighted_mean,
    "trimmed_mean": aggregate_trimmed_mean,
    "product_svd": aggregate_product_svd,
    "norm_weighted_mean": aggregate_norm_weighted_mean,
    "coordinate_median": aggregate_coordinate_median,
    "krum": aggregate_krum,
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
