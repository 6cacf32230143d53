"""Per-client text data: loading, partitioning, splitting, tokenising and packing.

`build_client_datasets` is the entry point: it loads records (`load_records`), assigns them to clients
(`partition_by_column`, `partition_dirichlet`, `partition_iid`), splits each client's records into train, validation
(which trains the router) and test (`split_records`), tokenises once with a disk cache (`tokenize_records`) and packs
each split into fixed-length blocks (`pack_blocks`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

FILE_FORMATS = ("csv", "json", "parquet", "text")
PARTITIONS = ("column", "dirichlet", "iid")
# Bump when the tokenised layout changes, so old cache files are not reused.
_TOKENIZE_VERSION = "comigs-tokenize-v1"


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


# ---------------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------------


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


def _per_client_sources(config: DataConfig) -> dict[str, object] | None:
    """Client value -> what to load for it (a Hub config name or local files), or None for a single load."""
    if config.configs_per_client is not None:
        return dict(config.configs_per_client)
    if (
        config.dataset in FILE_FORMATS
        and isinstance(config.data_files, dict)
        and config.split not in config.data_files
    ):
        return dict(config.data_files)
    return None


def load_records(config: DataConfig) -> datasets.Dataset:
    """Load the records that `config` describes and check the columns it needs.

    Args:
        config (`DataConfig`): the data section of the recipe.

    Returns:
        `datasets.Dataset`: the records, with `config.text_column` and, for column and Dirichlet partitions,
        `config.partition_column` (written by the loader when each client has its own config or file).

    Raises:
        `ValueError`: a local format without `data_files`, or a missing text or partition column.
    """
    if config.dataset == "embedded":
        from .embedded import load_embedded_records

        records = load_embedded_records(config.max_chars_per_domain)
    elif config.dataset in FILE_FORMATS and config.data_files is None:
        raise ValueError(f"dataset={config.dataset!r} reads local files: set data_files.")
    elif (sources := _per_client_sources(config)) is not None:
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
        _column_values(records, column)
    except KeyError:
        raise ValueError(
            f"{option}={column!r} is not a column of {source} (columns: {', '.join(records.column_names)})."
        ) from None


def _column_values(records: datasets.Dataset, column: str) -> list:
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


# ---------------------------------------------------------------------------------------------------------------------
# Partitioning and splitting (pure functions of their arguments)
# ---------------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------------
# Tokenising and packing
# ---------------------------------------------------------------------------------------------------------------------


def _tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # the serialised pipeline (vocab, merges, normalizer, ...) decides every id
        state = backend.to_str() + type(tokenizer).__name__ + str(tokenizer.eos_token_id)
        return hashlib.sha256(state.encode("utf-8")).hexdigest()
    return datasets.fingerprint.Hasher.hash(tokenizer)


def _records_fingerprint(records: datasets.Dataset, text_column: str) -> str:
    if records.cache_files:
        # loaded from (and transformed on) Arrow files: `datasets` derives it from the files and transforms
        return records._fingerprint
    # in memory (embedded, streamed): `datasets` would pick a random fingerprint, so hash the text itself
    digest = hashlib.sha256()
    for batch in records.select_columns([text_column]).iter(batch_size=1000):
        for text in batch[text_column]:
            digest.update(hashlib.sha256(text.encode("utf-8")).digest())
    return digest.hexdigest()


def tokenize_records(
    records: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    text_column: str = "text",
    cache_dir: str | Path | None = None,
) -> datasets.Dataset:
    """Tokenise every record and append the EOS token, caching the result on disk.

    The cache file's name is a hash of the records' fingerprint (or their text, for in-memory datasets), the text
    column and the tokenizer's serialised state, so a second run with the same inputs reads the file and never calls
    the tokenizer. The block size is not part of it: packing is a cheap step after the cache.

    Args:
        records (`datasets.Dataset`): records with a `text_column`.
        tokenizer (`PreTrainedTokenizerBase`): must define `eos_token_id`; special tokens are not otherwise added.
        text_column (`str`, *optional*, defaults to `"text"`): column to tokenise.
        cache_dir (`str` or `Path`, *optional*): where the cache file goes (None: the `datasets` cache).

    Returns:
        `datasets.Dataset`: one row per record with the single column `input_ids` (int32 ids ending with EOS).
    """
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError(f"{type(tokenizer).__name__} has no eos_token; documents could not be separated.")
    cache_dir = Path(cache_dir) if cache_dir is not None else Path(datasets.config.HF_DATASETS_CACHE) / "comigs_hf"
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(
        json.dumps(
            [
                _TOKENIZE_VERSION,
                _records_fingerprint(records, text_column),
                text_column,
                _tokenizer_fingerprint(tokenizer),
            ]
        ).encode()
    ).hexdigest()[:32]

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        ids = tokenizer(batch[text_column], add_special_tokens=False, verbose=False)["input_ids"]
        return {"input_ids": [document + [eos_id] for document in ids]}

    return records.select_columns([text_column]).map(
        tokenize,
        batched=True,
        remove_columns=[text_column],
        features=datasets.Features({"input_ids": datasets.List(datasets.Value("int32"))}),
        cache_file_name=str(cache_dir / f"tokenized-{key}.arrow"),
        load_from_cache_file=True,
        new_fingerprint=key,
        desc="Tokenizing",
    )


def pack_blocks(documents: Iterable[Sequence[int]], block_size: int) -> torch.LongTensor:
    """Concatenate token sequences and cut them into blocks of `block_size`, dropping the incomplete tail.

    Args:
        documents (`Iterable[Sequence[int]]`): token ids per document, each already ending with EOS.
        block_size (`int`): tokens per block.

    Returns:
        `torch.LongTensor` of shape `(num_blocks, block_size)`: `num_blocks` may be 0.
    """
    pieces = [np.asarray(document, dtype=np.int64) for document in documents]
    flat = np.concatenate(pieces) if pieces else np.empty(0, np.int64)
    num_blocks = len(flat) // block_size
    return torch.from_numpy(flat[: num_blocks * block_size].copy()).view(num_blocks, block_size)


# ---------------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------------


def _partition(config: DataConfig, records: datasets.Dataset, seed: int) -> tuple[list[str], list[np.ndarray]]:
    """Client names and record indices per client."""
    if config.partition == "iid":
        return [f"client_{i}" for i in range(config.num_clients)], partition_iid(
            len(records), config.num_clients, seed
        )
    labels = _column_values(records, config.partition_column)
    if config.partition == "dirichlet":
        # three records is the least that fills train, validation and test
        parts = partition_dirichlet(labels, config.num_clients, config.dirichlet_alpha, seed, min_records_per_client=3)
        return [f"client_{i}" for i in range(config.num_clients)], parts

    values = config.client_values
    if values is None:
        values = sorted(set(labels), key=lambda value: (type(value).__name__, value))
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
        if len(part) == 0:
            raise ValueError(f"Client {name!r} has no records: no row has {config.partition_column} == {value!r}.")
    return names, parts


def _train_token_caps(config: DataConfig, num_clients: int) -> list[int | None]:
    caps = config.max_train_tokens
    if caps is None or isinstance(caps, int):
        return [caps] * num_clients
    if len(caps) != num_clients:
        raise ValueError(f"max_train_tokens lists {len(caps)} caps for {num_clients} clients.")
    return list(caps)


def build_client_datasets(config: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> list[ClientData]:
    """Load, partition, split, tokenise and pack the clients' data.

    Deterministic for a given `config`, tokenizer and `seed`. Tokenisation is cached (see `tokenize_records`), so a
    second call costs only loading and packing.

    Args:
        config (`DataConfig`): the data section of the recipe.
        tokenizer (`PreTrainedTokenizerBase`): the base model's tokenizer; its EOS token separates documents.
        seed (`int`): seeds the partition (Dirichlet, IID) and each client's split.

    Returns:
        `list[ClientData]`: one entry per client, in client order.

    Raises:
        `ValueError`: a missing column, an empty client or split, or a cap below one block.
    """
    records = load_records(config)
    names, parts = _partition(config, records, seed)
    splits = [
        split_records(
            part,
            config.validation_fraction,
            config.test_fraction,
            seed=np.random.SeedSequence([seed, client]).generate_state(1)[0],
            max_records=config.max_records_per_client,
            client_name=name,
        )
        for client, (name, part) in enumerate(zip(names, parts))
    ]

    # Tokenise only the records some client uses, in dataset order: with no caps that is every record, so the
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

    clients = []
    for name, cap, (train, validation, test) in zip(names, _train_token_caps(config, len(names)), splits):
        client = ClientData(name=name, train=blocks(train), validation=blocks(validation), test=blocks(test))
        if cap is not None:
            if cap < config.block_size:
                raise ValueError(
                    f"max_train_tokens={cap} for client {name!r} is below one block of {config.block_size} tokens."
                )
            client.train = client.train[: cap // config.block_size]
        for split in ("train", "validation", "test"):
            if len(getattr(client, split)) == 0:
                raise ValueError(
                    f"Client {name!r} has no {split} block: its {split} records hold fewer than block_size="
                    f"{config.block_size} tokens. Use a smaller block_size or larger fractions."
                )
        clients.append(client)
    return clients


__all__ = [
    "AG_NEWS_LABELS",
    "SLIMPAJAMA_SOURCES",
    "ClientData",
    "DataConfig",
    "ag_news_config",
    "build_client_datasets",
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
