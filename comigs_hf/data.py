"""Per-client text data: loading, partitioning, splitting, tokenising and packing."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DataConfig:
    """Where the text comes from and how it is cut into clients.

    `dataset` is `"embedded"` (the offline default built from the Python standard library), a Hub dataset id, or a
    local file format understood by `datasets.load_dataset` (`"csv"`, `"json"`, `"parquet"`, `"text"`) with
    `data_files` naming the files.
    """

    dataset: str = "embedded"
    dataset_config_name: str | None = None
    data_files: list[str] | dict[str, str] | str | None = None
    revision: str | None = None
    split: str = "train"
    text_column: str = "text"
    # how records are assigned to clients: "column" (one client per value), "dirichlet" (label skew), "iid"
    partition: str = "column"
    partition_column: str | None = None
    # with partition="column": the column values, one per client, in client order (None: sorted unique values)
    client_values: list | None = None
    num_clients: int = 4
    dirichlet_alpha: float = 0.5
    # fractions of each client's records held out for the router (validation) and for evaluation (test)
    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    # cap on each client's training tokens (an int for all, or a list per client); None keeps everything
    max_train_tokens: int | list[int] | None = None
    max_records_per_client: int | None = None
    block_size: int = 128
    cache_dir: str | None = None
    extra: dict = field(default_factory=dict)
