"""Per-client text data: loading, partitioning, splitting, tokenising and packing.

[`build_client_datasets`] is the entry point: it loads records ([`load_records`]), assigns them to clients
([`partition_by_column`], [`partition_dirichlet`], [`partition_iid`]), splits each client's records into train,
validation (which trains the router) and test ([`split_records`]), tokenises once with a disk cache
([`tokenize_records`]) and packs each split into fixed-length blocks ([`pack_blocks`]).

A client touches only its own data: when every client has its own source (a `data_files` or `configs_per_client`
mapping of a column partition), building client `i` opens client `i`'s source and no other
([`build_client_data`]), so a Hub client or a Flower node needs nothing but its own file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import datasets
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from .config import (
    AG_NEWS_LABELS,
    FILE_FORMATS,
    PARTITIONS,
    SLIMPAJAMA_SOURCES,
    ClientData,
    DataConfig,
    ag_news_config,
    slimpajama_config,
    wikipedia_config,
)
from .loading import column_values, load_records
from .partition import partition_by_column, partition_dirichlet, partition_iid, split_records
from .tokens import pack_blocks, tokenize_records


def _value_order(value: object) -> tuple[str, object]:
    # sorts mixed-type column values deterministically: by type name, then value
    return type(value).__name__, value


def _check_client_ids(client_ids: Sequence[int] | None, num_clients: int) -> list[int]:
    if client_ids is None:
        return list(range(num_clients))
    bad = [i for i in client_ids if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < num_clients]
    if bad:
        raise ValueError(
            f"client ids {bad} are out of range: the data section has {num_clients} clients (0 .. {num_clients - 1})."
        )
    return list(client_ids)


def _partition(config: DataConfig, records: datasets.Dataset, seed: int) -> tuple[list[str], list[np.ndarray]]:
    """Client names and record indices per client, from records holding every client's data."""
    if config.partition == "iid":
        return [f"client_{i}" for i in range(config.num_clients)], partition_iid(
            len(records), config.num_clients, seed
        )
    labels = column_values(records, config.partition_column)
    if config.partition == "dirichlet":
        # three records is the least that fills train, validation and test
        parts = partition_dirichlet(labels, config.num_clients, config.dirichlet_alpha, seed, min_records_per_client=3)
        return [f"client_{i}" for i in range(config.num_clients)], parts

    values = config.client_values
    if values is None:
        values = sorted(set(labels), key=_value_order)
    if config.client_names is not None:
        names = list(config.client_names)
    else:
        feature = records.features.get(config.partition_column)
        if isinstance(feature, datasets.ClassLabel):
            names = [feature.int2str(int(value)) for value in values]
        else:
            names = [str(value) for value in values]
    parts = partition_by_column(labels, values)
    for name, value, part in zip(names, values, parts):
        _check_not_empty(config, name, value, part)
    return names, parts


def _check_not_empty(config: DataConfig, name: str, value: object, part: np.ndarray) -> None:
    if len(part) == 0:
        raise ValueError(f"Client {name!r} has no records: no row has {config.partition_column} == {value!r}.")


def _pack_clients(
    config: DataConfig,
    records: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    seed: int,
    members: list[tuple[int, str, np.ndarray]],
    num_clients: int,
) -> list[ClientData]:
    """Split, tokenise and pack the clients `members` (`(client index, name, record indices)`) of `records`."""
    splits = [
        split_records(
            part,
            config.validation_fraction,
            config.test_fraction,
            seed=np.random.SeedSequence([seed, client]).generate_state(1)[0],
            max_records=config.max_records_per_client,
            client_name=name,
        )
        for client, name, part in members
    ]
    # Tokenise only the records these clients use, in dataset order: with no caps that is every record, so the
    # cache is shared across seeds.
    used = np.unique(np.concatenate([np.concatenate(split) for split in splits]))
    subset = records if len(used) == len(records) else records.select(used)
    cache_dir = Path(config.cache_dir) / "comigs_hf" if config.cache_dir is not None else None
    column = tokenize_records(subset, tokenizer, config.text_column, cache_dir).data.column("input_ids")
    column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    offsets, values = np.asarray(column.offsets), np.asarray(column.values)

    def blocks(indices: np.ndarray) -> torch.LongTensor:
        rows = np.searchsorted(used, indices)
        return pack_blocks((values[offsets[row] : offsets[row + 1]] for row in rows), config.block_size)

    caps = config.train_token_caps(num_clients)
    clients = []
    for (client, name, _), (train, validation, test) in zip(members, splits):
        data = ClientData(name=name, train=blocks(train), validation=blocks(validation), test=blocks(test))
        cap = caps[client]
        if cap is not None:
            if cap < config.block_size:
                raise ValueError(
                    f"max_train_tokens={cap} for client {name!r} is below one block of {config.block_size} tokens."
                )
            data.train = data.train[: cap // config.block_size]
        for split in ("train", "validation", "test"):
            if len(getattr(data, split)) == 0:
                raise ValueError(
                    f"Client {name!r} has no {split} block: its {split} records hold fewer than block_size="
                    f"{config.block_size} tokens. Use a smaller block_size or larger fractions."
                )
        clients.append(data)
    return clients


def build_client_datasets(
    config: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    seed: int,
    client_ids: Sequence[int] | None = None,
) -> list[ClientData]:
    """Load, partition, split, tokenise and pack the clients' data.

    Deterministic for a given `config`, tokenizer and `seed`, and the same for a client whether it is built alone
    or with the others. Tokenisation is cached (see [`tokenize_records`]), so a second call costs only loading and
    packing.

    Args:
        config ([`DataConfig`]): the data section of the recipe.
        tokenizer (`PreTrainedTokenizerBase`): the base model's tokenizer; its EOS token separates documents.
        seed (`int`): seeds the partition (Dirichlet, IID) and each client's split.
        client_ids (`Sequence[int]`, *optional*):
            Build only these clients (positions in the partition). With one source per client (a column partition
            whose `data_files` or `configs_per_client` map client values to sources) only their sources are opened;
            otherwise the shared source is read and partitioned as a whole. `None` builds every client.

    Returns:
        `list[ClientData]`: one entry per requested client, in the order requested.

    Raises:
        `ValueError`: a missing column, an empty client or split, a cap below one block, or a client id out of range.
    """
    sources = config.per_client_sources()
    if config.partition == "column" and sources is not None:
        values = list(config.client_values) if config.client_values is not None else sorted(sources, key=_value_order)
        names = list(config.client_names) if config.client_names is not None else [str(value) for value in values]
        clients = []
        for client in _check_client_ids(client_ids, len(values)):
            name, value = names[client], values[client]
            if value not in sources:
                _check_not_empty(config, name, value, np.empty(0, np.int64))
            records = load_records(config, client_values=[value])  # this client's source, no other
            part = partition_by_column(column_values(records, config.partition_column), [value])[0]
            _check_not_empty(config, name, value, part)
            clients += _pack_clients(config, records, tokenizer, seed, [(client, name, part)], len(values))
        return clients
    records = load_records(config)
    names, parts = _partition(config, records, seed)
    members = [(client, names[client], parts[client]) for client in _check_client_ids(client_ids, len(names))]
    return _pack_clients(config, records, tokenizer, seed, members, len(names))


def build_client_data(config: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int, client_id: int) -> ClientData:
    """One client's data, as [`build_client_datasets`] builds it, opening only that client's source where it has one.

    Args:
        config ([`DataConfig`]), tokenizer (`PreTrainedTokenizerBase`), seed (`int`): as in
            [`build_client_datasets`].
        client_id (`int`): the client's position in the partition.

    Returns:
        [`ClientData`]: its blocks.
    """
    return build_client_datasets(config, tokenizer, seed, client_ids=[client_id])[0]


def mixed_test_splits(clients: Sequence[ClientData]) -> list[torch.LongTensor]:
    """Every client's part of the out-of-distribution test set, a uniform mixture of all clients' test splits: each
    client's first blocks, as many as the smallest test split holds, so no client weighs more than another."""
    if not clients:
        raise ValueError("The out-of-distribution test set needs at least one client.")
    count = min(client.test.shape[0] for client in clients)
    return [client.test[:count] for client in clients]


def interleave_blocks(splits: Sequence[torch.LongTensor]) -> torch.LongTensor:
    """Equal-size splits `(num_blocks, block_size)` interleaved block by block, so any prefix stays a uniform mix."""
    return torch.stack(list(splits), dim=1).flatten(0, 1)  # (num_blocks * num_splits, block_size)


def mixed_test_blocks(clients: Sequence[ClientData]) -> torch.LongTensor:
    """The out-of-distribution test set as one tensor: [`mixed_test_splits`] interleaved client by client."""
    return interleave_blocks(mixed_test_splits(clients))


def pool_client_data(clients: Sequence[ClientData]) -> ClientData:
    """The centralised baseline's one client: every client's train and validation blocks, and the uniform mixture of
    their test splits ([`mixed_test_blocks`])."""
    return ClientData(
        name="pooled",
        train=torch.cat([client.train for client in clients]),
        validation=torch.cat([client.validation for client in clients]),
        test=mixed_test_blocks(clients),
    )


__all__ = [
    "AG_NEWS_LABELS",
    "FILE_FORMATS",
    "PARTITIONS",
    "SLIMPAJAMA_SOURCES",
    "ClientData",
    "DataConfig",
    "ag_news_config",
    "build_client_data",
    "build_client_datasets",
    "interleave_blocks",
    "mixed_test_blocks",
    "mixed_test_splits",
    "pool_client_data",
    "load_records",
    "pack_blocks",
    "partition_by_column",
    "partition_dirichlet",
    "partition_iid",
    "slimpajama_config",
    "split_records",
    "tokenize_records",
    "wikipedia_config",
]
