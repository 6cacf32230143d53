"""Loading a recipe's records through `datasets`: the embedded corpus, Hub datasets and local files."""

from __future__ import annotations

import json
from collections.abc import Sequence

import datasets

from ..embedded.corpus import load_embedded_records
from .config import FILE_FORMATS, DataConfig


def _load_one(config: DataConfig, data_files=None, name: str | None = None) -> datasets.Dataset:
    """One `datasets.load_dataset` call, materialising at most `max_source_records` records."""
    if config.dataset in FILE_FORMATS:
        kwargs = {"path": config.dataset, "data_files": data_files}
    else:
        kwargs = {"path": config.dataset, "name": name, "revision": config.revision}
    loaded = datasets.load_dataset(
        **kwargs, split=config.split, cache_dir=config.cache_dir, streaming=config.streaming
    )
    cap = config.max_source_records
    if config.streaming:
        stream = loaded.take(cap) if cap is not None else loaded
        return datasets.Dataset.from_list(list(stream), features=loaded.features)
    return loaded.select(range(cap)) if cap is not None and cap < len(loaded) else loaded


def load_records(config: DataConfig, client_values: Sequence | None = None) -> datasets.Dataset:
    """Load the records that `config` describes and check the columns it needs.

    Args:
        config (`DataConfig`): the data section of the recipe.
        client_values (`Sequence`, *optional*):
            With one source per client (`configs_per_client`, or `data_files` keyed by client value), open only the
            sources of these client values; the others are never read. `None` opens every source.

    Returns:
        `datasets.Dataset`: the records, with `config.text_column` and, for column and Dirichlet partitions,
        `config.partition_column` (written by the loader when each client has its own config or file).

    Raises:
        `ValueError`: a local format without `data_files`, or a missing text or partition column.
    """
    if config.dataset == "embedded":
        records = load_embedded_records(config.max_chars_per_domain)
    elif config.dataset in FILE_FORMATS and config.data_files is None:
        raise ValueError(f"dataset={config.dataset!r} reads local files: set data_files.")
    elif (sources := config.per_client_sources()) is not None:
        if client_values is not None:
            sources = {value: sources[value] for value in client_values if value in sources}
        parts = []
        for value, source in sources.items():
            if config.dataset in FILE_FORMATS:
                part = _load_one(config, data_files=source)
            else:
                part = _load_one(config, name=source)
            _check_column(part, config.text_column, "text_column", f"{config.dataset} ({source})")
            # only the text travels: sources often disagree on their other columns' types
            part = part.select_columns([config.text_column])
            if config.partition_column is not None:  # an IID partition does not need to know the source
                part = part.add_column(config.partition_column, [value] * len(part))
            parts.append(part)
        records = datasets.concatenate_datasets(parts)
    else:
        records = _load_one(config, data_files=config.data_files, name=config.dataset_config_name)

    _check_column(records, config.text_column, "text_column", config.dataset)
    if config.partition in ("column", "dirichlet"):
        _check_column(records, config.partition_column, "partition_column", config.dataset)
    return records


def _check_column(records: datasets.Dataset, column: str, option: str, source: str) -> None:
    try:
        column_values(records, column)
    except KeyError:
        raise ValueError(
            f"{option}={column!r} is not a column of {source} (columns: {', '.join(records.column_names)})."
        ) from None


def column_values(records: datasets.Dataset, column: str) -> list:
    """Values of `column`; a dotted name reaches into nested (struct, dict or JSON-string) columns."""
    if column in records.column_names:
        return list(records[column])
    top, _, rest = column.partition(".")
    if not rest or top not in records.column_names:
        raise KeyError(column)
    values = list(records[top])
    for key in rest.split("."):
        # a JSON object stored as a string (some SlimPajama exports) is read like a struct
        values = [json.loads(v) if isinstance(v, str) else v for v in values]
        if not all(isinstance(v, dict) and key in v for v in values):
            raise KeyError(column)
        values = [v[key] for v in values]
    return values
