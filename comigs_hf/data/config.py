"""The data section of a recipe, one client's packed blocks, and the paper's data settings."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..embedded.corpus import DOMAINS

FILE_FORMATS = ("csv", "json", "parquet", "text")
PARTITIONS = ("column", "dirichlet", "iid")


@dataclass
class DataConfig:
    """Where the text comes from and how it is cut into clients.

    `dataset` is `"embedded"` (the offline default built from the Python standard library), a Hub dataset id, or a
    local file format understood by `datasets.load_dataset` (`"csv"`, `"json"` (also JSON Lines), `"parquet"`,
    `"text"`) with `data_files` naming the files. `ag_news_config`, `wikipedia_config` and `slimpajama_config` return
    the paper's settings.
    """

    dataset: str = field(
        default="embedded",
        metadata={"help": '"embedded", a Hub dataset id, or a local format: "csv", "json", "parquet", "text".'},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub config name (`name=`)."})
    data_files: list[str] | dict[str, str | list[str]] | str | None = field(
        default=None,
        metadata={
            "help": "Local files. A dict whose keys do not include `split` maps client values to files: each is "
            "loaded alone and its key written to `partition_column` (e.g. Wikipedia, {language: path})."
        },
    )
    revision: str | None = field(default=None, metadata={"help": "Hub dataset revision (branch, tag or commit)."})
    split: str = field(default="train", metadata={"help": 'Split to load; slicing ("train[:10%]") works.'})
    configs_per_client: dict[str, str] | None = field(
        default=None,
        metadata={
            "help": "Hub datasets only: client value -> config name. Each config is loaded alone and the client "
            "value written to `partition_column` (Wikipedia: {'en': '20231101.en', ...})."
        },
    )
    streaming: bool = field(
        default=False,
        metadata={"help": "Stream from the Hub and read only `max_source_records` per source (large corpora)."},
    )
    max_source_records: int | None = field(
        default=None,
        metadata={"help": "Records read from each source (the dataset, or each per-client config or file)."},
    )
    text_column: str = field(default="text", metadata={"help": "Column holding the documents."})
    partition: str = field(
        default="column",
        metadata={
            "help": 'How records are assigned to clients: "column" (one client per value of `partition_column`), '
            '"dirichlet" (label skew over `partition_column`), "iid".'
        },
    )
    partition_column: str | None = field(
        default=None,
        metadata={
            "help": 'Column for "column" and "dirichlet"; dots reach into nested columns ("meta.redpajama_set_name"). '
            'Defaults to "domain" for the embedded dataset.'
        },
    )
    client_values: list | None = field(
        default=None,
        metadata={
            "help": 'With partition="column": the column values, one per client, in client order (None: sorted '
            "unique values). Records with other values are left out."
        },
    )
    client_names: list[str] | None = field(
        default=None,
        metadata={
            "help": 'With partition="column": display names, one per client value (None: the class label names if '
            "the column is a `ClassLabel`, else the values)."
        },
    )
    num_clients: int = field(default=4, metadata={"help": 'Number of clients for "dirichlet" and "iid".'})
    dirichlet_alpha: float = field(
        default=0.5, metadata={"help": "Dirichlet concentration: smaller values give more label skew."}
    )
    validation_fraction: float = field(
        default=0.1, metadata={"help": "Fraction of each client's records held out for the router (validation)."}
    )
    test_fraction: float = field(
        default=0.1, metadata={"help": "Fraction of each client's records held out for evaluation (test)."}
    )
    max_train_tokens: int | list[int] | None = field(
        default=None,
        metadata={
            "help": "Cap on each client's training tokens (an int for all, or a list per client), rounded down to "
            "whole blocks; validation and test are not capped. None keeps everything."
        },
    )
    max_records_per_client: int | None = field(
        default=None, metadata={"help": "Cap on each client's records, taken before the train/validation/test split."}
    )
    block_size: int = field(default=128, metadata={"help": "Tokens per packed training sequence."})
    cache_dir: str | None = field(
        default=None,
        metadata={"help": "Cache for downloads and tokenised records (None: the `datasets` cache)."},
    )
    max_chars_per_domain: int | None = field(
        default=300_000, metadata={"help": "Embedded dataset only: characters kept per stdlib domain."}
    )

    def __post_init__(self):
        if self.partition not in PARTITIONS:
            raise ValueError(f"partition must be one of {PARTITIONS}, got {self.partition!r}.")
        if self.dataset == "embedded" and self.partition_column is None:
            self.partition_column = "domain"
        if self.partition in ("column", "dirichlet") and self.partition_column is None:
            raise ValueError(f"partition={self.partition!r} needs a partition_column.")
        if not (0 < self.validation_fraction < 1 and 0 < self.test_fraction < 1):
            raise ValueError(
                f"validation_fraction ({self.validation_fraction}) and test_fraction ({self.test_fraction}) must both "
                "lie in (0, 1): every client needs validation and test records."
            )
        if self.validation_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"validation_fraction ({self.validation_fraction}) + test_fraction ({self.test_fraction}) must be "
                "below 1 to leave training records."
            )
        if self.block_size < 1 or self.num_clients < 1 or self.dirichlet_alpha <= 0:
            raise ValueError(
                f"block_size ({self.block_size}) and num_clients ({self.num_clients}) must be positive and "
                f"dirichlet_alpha ({self.dirichlet_alpha}) above 0."
            )
        if self.client_names is not None and self.client_values is None:
            raise ValueError("client_names needs client_values, to say which name belongs to which value.")
        if self.client_names is not None and len(self.client_names) != len(self.client_values):
            raise ValueError(
                f"client_names has {len(self.client_names)} entries but client_values has {len(self.client_values)}."
            )
        if self.configs_per_client is not None and self.dataset in FILE_FORMATS + ("embedded",):
            raise ValueError(
                f"configs_per_client names Hub configs, but dataset={self.dataset!r}; for local files per client give "
                "data_files as {client value: path}."
            )
        count = self.num_clients_known()
        if count is not None:
            self.train_token_caps(count)  # raises for a per-client list of the wrong length

    def per_client_sources(self) -> dict[str, object] | None:
        """Client value -> what to load for it (a Hub config name or local files), or `None` for a single source."""
        if self.configs_per_client is not None:
            return dict(self.configs_per_client)
        if self.dataset in FILE_FORMATS and isinstance(self.data_files, dict) and self.split not in self.data_files:
            return dict(self.data_files)
        return None

    def num_clients_known(self) -> int | None:
        """The number of clients this section produces, or `None` when only loading the data can tell.

        `num_clients` for `"iid"` and `"dirichlet"` partitions; for `"column"` partitions the number of
        `client_values`, of per-client configs or files, or of the embedded dataset's domains. A column partition of a
        dataset without listed values has one client per distinct value, which only the loaded data reveals.
        """
        return self._client_count()[0]

    def _client_count(self) -> tuple[int | None, str]:
        if self.partition != "column":
            return self.num_clients, f"data.num_clients is {self.num_clients}"
        if self.client_values is not None:
            return len(self.client_values), f"data.client_values has {len(self.client_values)} entries"
        sources = self.per_client_sources()
        if sources is not None:
            key = "configs_per_client" if self.configs_per_client is not None else "data_files"
            return len(sources), f"data.{key} has {len(sources)} per-client entries"
        if self.dataset == "embedded" and self.partition_column == "domain":
            return len(DOMAINS), f"the embedded dataset has {len(DOMAINS)} domains"
        return None, "the number of clients is only known after loading the data"

    def describe_client_count(self) -> str:
        """Where the number of clients comes from, for messages: `"data.num_clients is 4"`, ..."""
        return self._client_count()[1]

    def train_token_caps(self, num_clients: int) -> list[int | None]:
        """`max_train_tokens` as one cap (or `None`) per client.

        Raises:
            `ValueError`: a per-client list that does not have `num_clients` entries.
        """
        caps = self.max_train_tokens
        if caps is None or isinstance(caps, int):
            return [caps] * num_clients
        if len(caps) != num_clients:
            raise ValueError(f"max_train_tokens lists {len(caps)} caps for {num_clients} clients.")
        return list(caps)


@dataclass
class ClientData:
    """One client's packed token blocks.

    Args:
        name (`str`): the partition column's value (or its class name) for column partitions, else `client_{i}`.
        train (`torch.LongTensor` of shape `(num_blocks, block_size)`): blocks for the experts' local steps.
        validation (`torch.LongTensor` of shape `(num_blocks, block_size)`): held-out blocks that train the router.
        test (`torch.LongTensor` of shape `(num_blocks, block_size)`): held-out blocks for evaluation.
    """

    name: str
    train: torch.LongTensor
    validation: torch.LongTensor
    test: torch.LongTensor

    @property
    def num_train_tokens(self) -> int:
        """Number of training tokens, `num_blocks * block_size`."""
        return self.train.numel()


# ---------------------------------------------------------------------------------------------------------------------
# The paper's settings
# ---------------------------------------------------------------------------------------------------------------------

AG_NEWS_LABELS = ("World", "Sports", "Business", "Sci/Tech")


def ag_news_config(**overrides) -> DataConfig:
    """AG News split by topic into 4 clients (World, Sports, Business, Sci/Tech).

    Args:
        overrides: `DataConfig` fields to change, e.g. `dataset="csv", data_files="ag_news.csv"` for a local copy
            with columns `text` and `label` (0-3).

    Returns:
        `DataConfig`: clients named after the topics, in label order.
    """
    config = {
        "dataset": "fancyzhx/ag_news",
        "partition": "column",
        "partition_column": "label",
        "client_values": [0, 1, 2, 3],
        "client_names": list(AG_NEWS_LABELS),
    }
    return DataConfig(**{**config, **overrides})


def wikipedia_config(
    languages: Sequence[str] = ("en", "fr", "de", "it"), date: str = "20231101", **overrides
) -> DataConfig:
    """Multilingual Wikipedia, one client per language, streaming the first records of each language's config.

    Args:
        languages (`Sequence[str]`, *optional*, defaults to `("en", "fr", "de", "it")`): one client each.
        date (`str`, *optional*, defaults to `"20231101"`): dump date of `wikimedia/wikipedia`'s configs.
        overrides: `DataConfig` fields to change. `dataset="parquet", data_files={"en": "en.parquet", ...}` reads
            local files with Wikipedia's columns (`text`, ...) instead of the Hub.

    Returns:
        `DataConfig`: one Hub config per language (or one file, with a local format), written to a `language` column.
    """
    config = {
        "dataset": "wikimedia/wikipedia",
        "configs_per_client": {language: f"{date}.{language}" for language in languages},
        "streaming": True,
        "max_source_records": 20_000,
        "partition": "column",
        "partition_column": "language",
        "client_values": list(languages),
    }
    if overrides.get("dataset", config["dataset"]) in FILE_FORMATS:
        config.pop("configs_per_client")
    return DataConfig(**{**config, **overrides})


SLIMPAJAMA_SOURCES = ("RedPajamaArXiv", "RedPajamaBook", "RedPajamaGithub", "RedPajamaStackExchange")


def slimpajama_config(sources: Sequence[str] = SLIMPAJAMA_SOURCES, **overrides) -> DataConfig:
    """SlimPajama-6B split by source (`meta.redpajama_set_name`), streaming its first 200,000 records.

    Args:
        sources (`Sequence[str]`, *optional*): `redpajama_set_name` values, one client each.
        overrides: `DataConfig` fields to change, e.g. `dataset="json", data_files="slimpajama.jsonl"` for local
            records `{"text": ..., "meta": {"redpajama_set_name": ...}}`.

    Returns:
        `DataConfig`: clients named after the sources; records of other sources (C4, CommonCrawl, ...) are left out.
    """
    config = {
        "dataset": "DKYoon/SlimPajama-6B",
        "streaming": True,
        "max_source_records": 200_000,
        "partition": "column",
        "partition_column": "meta.redpajama_set_name",
        "client_values": list(sources),
    }
    return DataConfig(**{**config, **overrides})
