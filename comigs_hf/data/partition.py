"""Who gets which records: partitions of a dataset over clients and each client's train/validation/test split.

Pure functions of their arguments (labels, sizes, seeds), so every partition is reproducible and testable by hand.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def partition_by_column(labels: Sequence, client_values: Sequence) -> list[np.ndarray]:
    """Give each client the records whose label equals its value.

    Args:
        labels (`Sequence`): one label per record.
        client_values (`Sequence`): one distinct value per client, in client order.

    Returns:
        `list[np.ndarray]`: per client, the sorted record indices. Records whose label is not among `client_values`
        belong to no client.
    """
    client_of = {}
    for client, value in enumerate(client_values):
        if value in client_of:
            raise ValueError(f"client_values lists {value!r} twice.")
        client_of[value] = client
    members = [[] for _ in client_values]
    for index, label in enumerate(labels):
        client = client_of.get(label)
        if client is not None:
            members[client].append(index)
    return [np.asarray(indices, dtype=np.int64) for indices in members]


def partition_dirichlet(
    labels: Sequence,
    num_clients: int,
    alpha: float,
    seed: int,
    min_records_per_client: int = 0,
    max_attempts: int = 1000,
) -> list[np.ndarray]:
    """Label-skewed partition: each label's records are spread over clients by a Dirichlet(alpha) draw.

    The standard non-IID benchmark split (Hsu et al., 2019): for every label, proportions `p ~ Dir(alpha * 1)` over
    clients cut that label's shuffled records. Small `alpha` concentrates each label on few clients. Draws leaving a
    client with fewer than `min_records_per_client` records are redrawn from the same generator.

    Args:
        labels (`Sequence`): one label per record.
        num_clients (`int`): number of clients.
        alpha (`float`): Dirichlet concentration, above 0.
        seed (`int`): seeds the draw; equal seeds give equal partitions.
        min_records_per_client (`int`, *optional*, defaults to 0): smallest acceptable client.
        max_attempts (`int`, *optional*, defaults to 1000): draws tried before giving up.

    Returns:
        `list[np.ndarray]`: per client, the sorted record indices; every record is in exactly one.
    """
    if alpha <= 0 or num_clients < 1:
        raise ValueError(f"alpha ({alpha}) must be above 0 and num_clients ({num_clients}) at least 1.")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    by_label = [np.flatnonzero(labels == label) for label in np.unique(labels)]
    for _ in range(max_attempts):
        members = [[] for _ in range(num_clients)]
        for indices in by_label:
            indices = rng.permutation(indices)
            proportions = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(indices)).astype(np.int64)
            for client, chunk in enumerate(np.split(indices, cuts)):
                members[client].append(chunk)
        parts = [np.sort(np.concatenate(chunks)) if chunks else np.empty(0, np.int64) for chunks in members]
        if min(len(part) for part in parts) >= min_records_per_client:
            return [part.astype(np.int64) for part in parts]
    raise ValueError(
        f"No Dirichlet(alpha={alpha}) draw in {max_attempts} gave all {num_clients} clients at least "
        f"{min_records_per_client} of {len(labels)} records; raise dirichlet_alpha or use fewer clients."
    )


def partition_iid(num_records: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """Shuffle the records and deal them into `num_clients` parts whose sizes differ by at most one.

    Args:
        num_records (`int`): number of records.
        num_clients (`int`): number of clients.
        seed (`int`): seeds the shuffle.

    Returns:
        `list[np.ndarray]`: per client, the sorted record indices; every record is in exactly one.
    """
    order = np.random.default_rng(seed).permutation(num_records)
    return [np.sort(part).astype(np.int64) for part in np.array_split(order, num_clients)]


def split_records(
    indices: np.ndarray,
    validation_fraction: float,
    test_fraction: float,
    seed: int,
    max_records: int | None = None,
    client_name: str = "client",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shuffle one client's records and cut them into train, validation and test.

    Validation and test get `round(fraction * n)` records, at least one each; train keeps the rest.

    Args:
        indices (`np.ndarray`): the client's record indices.
        validation_fraction (`float`): share held out for the router.
        test_fraction (`float`): share held out for evaluation.
        seed (`int`): seeds the shuffle.
        max_records (`int`, *optional*): keep only this many (shuffled) records before splitting.
        client_name (`str`, *optional*, defaults to `"client"`): named in errors.

    Returns:
        `tuple[np.ndarray, np.ndarray, np.ndarray]`: train, validation and test indices, in shuffled order.

    Raises:
        `ValueError`: a split would be empty.
    """
    order = np.random.default_rng(seed).permutation(np.asarray(indices, dtype=np.int64))
    if max_records is not None:
        order = order[:max_records]
    num_validation = max(1, round(validation_fraction * len(order)))
    num_test = max(1, round(test_fraction * len(order)))
    num_train = len(order) - num_validation - num_test
    if num_train < 1:
        raise ValueError(
            f"Client {client_name!r} has {len(order)} records, too few for non-empty train, validation and test "
            f"splits (validation_fraction={validation_fraction}, test_fraction={test_fraction})."
        )
    return order[:num_train], order[num_train : num_train + num_validation], order[num_train + num_validation :]
