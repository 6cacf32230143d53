"""Tests for comigs_hf.data: partitions, splits, caps, packing, the tokenisation cache and the dataset loaders.

Every dataset is a small local file written here; Hub presets run through the same code with `datasets.load_dataset`
redirected to local files of the same schema. A word-level tokenizer built in code maps each word to one id.
"""

import json
import os

import datasets
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from comigs_hf.data import (
    AG_NEWS_LABELS,
    DataConfig,
    ag_news_config,
    build_client_data,
    build_client_datasets,
    load_records,
    pack_blocks,
    partition_by_column,
    partition_dirichlet,
    partition_iid,
    slimpajama_config,
    split_records,
    tokenize_records,
    wikipedia_config,
)

EOS = 0
WORDS_PER_DOC = 12


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")


def document(label: str, index: int) -> str:
    """Words unique to one document, so its tokens can be traced into the packed blocks."""
    return " ".join(f"{label}{index}w{k}" for k in range(WORDS_PER_DOC))


def make_tokenizer(texts, cls=PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    words = sorted({word for text in texts for word in text.split()})
    vocab = {"<eos>": EOS, "<unk>": 1, **{word: i + 2 for i, word in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return cls(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>")


class CountingTokenizer(PreTrainedTokenizerFast):
    calls = 0

    def __call__(self, *args, **kwargs):
        type(self).calls += 1
        return super().__call__(*args, **kwargs)


def ag_news_rows(per_label: int = 20) -> list[dict]:
    return [{"text": document(f"t{label}", i), "label": label} for i in range(per_label) for label in range(4)]


@pytest.fixture
def ag_news_csv(tmp_path):
    path = tmp_path / "ag_news.csv"
    datasets.Dataset.from_list(ag_news_rows()).to_csv(path, index=False)
    return str(path)


@pytest.fixture
def tokenizer():
    return make_tokenizer([row["text"] for row in ag_news_rows(per_label=50)])


def tokens_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# -- partitioners -----------------------------------------------------------------------------------------------------


def assert_exact_cover(parts, num_records):
    everything = np.concatenate(parts)
    assert len(everything) == num_records
    assert np.array_equal(np.sort(everything), np.arange(num_records))


def test_partition_by_column_gives_each_value_its_records():
    labels = ["b", "a", "c", "a", "b", "z"]
    parts = partition_by_column(labels, ["a", "b", "c"])
    assert [part.tolist() for part in parts] == [[1, 3], [0, 4], [2]]  # "z" belongs to no client


def test_partition_by_column_rejects_repeated_client_values():
    with pytest.raises(ValueError, match="twice"):
        partition_by_column([1, 2], [1, 1])


def test_partition_iid_assigns_every_record_once_in_near_equal_parts():
    parts = partition_iid(103, 4, seed=0)
    assert_exact_cover(parts, 103)
    assert sorted(len(part) for part in parts) == [25, 26, 26, 26]


def test_partition_iid_is_deterministic_for_a_seed():
    same = [part.tolist() for part in partition_iid(50, 3, seed=7)]
    assert same == [part.tolist() for part in partition_iid(50, 3, seed=7)]
    assert same != [part.tolist() for part in partition_iid(50, 3, seed=8)]


def test_partition_dirichlet_assigns_every_record_once():
    labels = np.repeat(np.arange(5), 40)
    parts = partition_dirichlet(labels, num_clients=4, alpha=0.3, seed=0)
    assert_exact_cover(parts, len(labels))


def test_partition_dirichlet_is_deterministic_for_a_seed():
    labels = np.repeat(np.arange(5), 40)
    first = [part.tolist() for part in partition_dirichlet(labels, 4, 0.5, seed=3)]
    assert first == [part.tolist() for part in partition_dirichlet(labels, 4, 0.5, seed=3)]
    assert first != [part.tolist() for part in partition_dirichlet(labels, 4, 0.5, seed=4)]


def mean_label_entropy(labels, parts) -> float:
    """Mean over non-empty clients of the entropy (bits) of the client's label histogram."""
    entropies = []
    for part in parts:
        if len(part):
            counts = np.bincount(labels[part], minlength=labels.max() + 1)
            p = counts[counts > 0] / counts.sum()
            entropies.append(-(p * np.log2(p)).sum())
    return float(np.mean(entropies))


def test_dirichlet_label_skew_grows_as_alpha_falls():
    labels = np.repeat(np.arange(4), 250)
    entropy = {
        alpha: np.mean([mean_label_entropy(labels, partition_dirichlet(labels, 8, alpha, seed)) for seed in range(5)])
        for alpha in (100.0, 1.0, 0.1)
    }
    assert entropy[100.0] > 1.9  # near-uniform: log2(4) = 2 bits
    assert entropy[100.0] > entropy[1.0] > entropy[0.1]
    assert entropy[0.1] < 0.8


def test_partition_dirichlet_redraws_until_clients_are_big_enough():
    labels = np.repeat(np.arange(3), 30)
    parts = partition_dirichlet(labels, 4, alpha=0.5, seed=0, min_records_per_client=5)
    assert min(len(part) for part in parts) >= 5
    with pytest.raises(ValueError, match="at least 40"):
        partition_dirichlet(labels, 4, alpha=0.5, seed=0, min_records_per_client=40, max_attempts=20)


# -- splits and caps --------------------------------------------------------------------------------------------------


def test_split_sizes_follow_the_fractions_and_do_not_overlap():
    train, validation, test = split_records(np.arange(100, 200), 0.1, 0.2, seed=0)
    assert (len(train), len(validation), len(test)) == (70, 10, 20)
    assert_exact_cover([train - 100, validation - 100, test - 100], 100)


def test_split_is_deterministic_for_a_seed():
    first = [split.tolist() for split in split_records(np.arange(40), 0.2, 0.2, seed=1)]
    assert first == [split.tolist() for split in split_records(np.arange(40), 0.2, 0.2, seed=1)]
    assert first != [split.tolist() for split in split_records(np.arange(40), 0.2, 0.2, seed=2)]


def test_small_fractions_still_leave_one_validation_and_one_test_record():
    train, validation, test = split_records(np.arange(5), 0.01, 0.01, seed=0)
    assert (len(train), len(validation), len(test)) == (3, 1, 1)


def test_split_that_would_be_empty_raises_naming_the_client():
    with pytest.raises(ValueError, match="'Sports' has 2 records"):
        split_records(np.arange(2), 0.1, 0.1, seed=0, client_name="Sports")


def test_max_records_caps_a_client_before_splitting():
    train, validation, test = split_records(np.arange(1000), 0.1, 0.1, seed=0, max_records=50)
    assert (len(train), len(validation), len(test)) == (40, 5, 5)


# -- tokenising and packing -------------------------------------------------------------------------------------------


def test_pack_blocks_concatenates_documents_and_drops_the_tail():
    blocks = pack_blocks([[1, 2, 0], [3, 4, 5, 0], [6, 0]], block_size=4)
    assert blocks.dtype == torch.long
    assert blocks.tolist() == [[1, 2, 0, 3], [4, 5, 0, 6]]
    assert pack_blocks([[1, 0]], block_size=4).shape == (0, 4)


def test_tokenized_records_end_with_eos_and_pack_with_eos_between_documents(tmp_path):
    tokenizer = make_tokenizer(["a b c d e f"])
    records = datasets.Dataset.from_dict({"text": ["a b c", "d", "e f"]})
    tokenized = tokenize_records(records, tokenizer, cache_dir=tmp_path)
    a, b, c, d, e, f = tokens_of(tokenizer, "a b c d e f")
    assert tokenized["input_ids"] == [[a, b, c, EOS], [d, EOS], [e, f, EOS]]
    assert pack_blocks(tokenized["input_ids"], 4).tolist() == [[a, b, c, EOS], [d, EOS, e, f]]  # final EOS dropped


def test_second_run_reads_the_tokenized_cache_without_calling_the_tokenizer(tmp_path, ag_news_csv):
    tokenizer = make_tokenizer([row["text"] for row in ag_news_rows()], cls=CountingTokenizer)
    config = ag_news_config(dataset="csv", data_files=ag_news_csv, block_size=8, cache_dir=str(tmp_path / "cache"))
    CountingTokenizer.calls = 0
    first = build_client_datasets(config, tokenizer, seed=0)
    assert CountingTokenizer.calls > 0
    CountingTokenizer.calls = 0
    second = build_client_datasets(config, tokenizer, seed=0)
    assert CountingTokenizer.calls == 0
    assert all(torch.equal(a.train, b.train) and torch.equal(a.test, b.test) for a, b in zip(first, second))
    assert list((tmp_path / "cache" / "comigs_hf").glob("tokenized-*.arrow"))


def test_in_memory_records_hit_the_cache_by_content(tmp_path):
    tokenizer = make_tokenizer(["a b c"], cls=CountingTokenizer)
    CountingTokenizer.calls = 0
    # two separate objects: `datasets` gives in-memory datasets random fingerprints
    tokenize_records(datasets.Dataset.from_dict({"text": ["a b", "c"]}), tokenizer, cache_dir=tmp_path)
    tokenize_records(datasets.Dataset.from_dict({"text": ["a b", "c"]}), tokenizer, cache_dir=tmp_path)
    assert CountingTokenizer.calls == 1
    tokenize_records(datasets.Dataset.from_dict({"text": ["a b", "c c"]}), tokenizer, cache_dir=tmp_path)
    assert CountingTokenizer.calls == 2


def test_another_tokenizer_does_not_reuse_the_cache(tmp_path):
    records = datasets.Dataset.from_dict({"text": ["a b", "c"]})
    first = tokenize_records(records, make_tokenizer(["a b c"]), cache_dir=tmp_path)
    second = tokenize_records(records, make_tokenizer(["0 a b c"]), cache_dir=tmp_path)  # shifts every id by one
    assert list(first["input_ids"]) == [[2, 3, 0], [4, 0]]
    assert list(second["input_ids"]) == [[3, 4, 0], [5, 0]]


def test_tokenizer_without_eos_is_rejected(tmp_path):
    tokenizer = make_tokenizer(["a"])
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="no eos_token"):
        tokenize_records(datasets.Dataset.from_dict({"text": ["a"]}), tokenizer, cache_dir=tmp_path)


# -- build_client_datasets --------------------------------------------------------------------------------------------


def test_ag_news_clients_are_named_by_topic_and_hold_only_their_topic(ag_news_csv, tokenizer, tmp_path):
    config = ag_news_config(dataset="csv", data_files=ag_news_csv, block_size=8, cache_dir=str(tmp_path))
    clients = build_client_datasets(config, tokenizer, seed=0)
    assert [client.name for client in clients] == list(AG_NEWS_LABELS)
    vocab = {i: word for word, i in tokenizer.get_vocab().items()}
    for label, client in enumerate(clients):
        for split in (client.train, client.validation, client.test):
            assert split.dtype == torch.long and split.shape[1] == 8 and len(split) > 0
            words = {vocab[i] for i in split.flatten().tolist() if i != EOS}
            assert all(word.startswith(f"t{label}") for word in words)
    # 20 records per topic: 16 train, 2 validation, 2 test; 13 tokens each (12 words + EOS)
    assert [client.num_train_tokens for client in clients] == [(16 * 13 // 8) * 8] * 4
    assert [len(client.test) for client in clients] == [2 * 13 // 8] * 4


def test_blocks_hold_whole_documents_in_order_separated_by_eos(ag_news_csv, tokenizer, tmp_path):
    config = ag_news_config(dataset="csv", data_files=ag_news_csv, block_size=13, cache_dir=str(tmp_path))
    client = build_client_datasets(config, tokenizer, seed=0)[0]
    # block_size equals a document plus its EOS, so every block is exactly one document
    vocab = {i: word for word, i in tokenizer.get_vocab().items()}
    for block in torch.cat([client.train, client.validation, client.test]).tolist():
        assert block[-1] == EOS
        words = [vocab[i] for i in block[:-1]]
        index = words[0][: -len("w0")]
        assert words == [f"{index}w{k}" for k in range(WORDS_PER_DOC)]
    seen = [tuple(block) for block in torch.cat([client.train, client.validation, client.test]).tolist()]
    assert len(seen) == len(set(seen)) == 20  # every record once across the three splits


def test_build_is_deterministic_for_a_seed(ag_news_csv, tokenizer, tmp_path):
    config = ag_news_config(dataset="csv", data_files=ag_news_csv, block_size=8, cache_dir=str(tmp_path))
    first = build_client_datasets(config, tokenizer, seed=1)
    again = build_client_datasets(config, tokenizer, seed=1)
    other = build_client_datasets(config, tokenizer, seed=2)
    assert all(torch.equal(a.train, b.train) for a, b in zip(first, again))
    assert not all(torch.equal(a.train, b.train) for a, b in zip(first, other))


def test_max_train_tokens_caps_training_blocks_only(ag_news_csv, tokenizer, tmp_path):
    base = ag_news_config(dataset="csv", data_files=ag_news_csv, block_size=8, cache_dir=str(tmp_path))
    full = build_client_datasets(base, tokenizer, seed=0)
    capped = build_client_datasets(
        ag_news_config(
            dataset="csv",
            data_files=ag_news_csv,
            block_size=8,
            cache_dir=str(tmp_path),
            max_train_tokens=[20, 40, 64, 10_000],
        ),
        tokenizer,
        seed=0,
    )
    assert [client.num_train_tokens for client in capped] == [16, 40, 64, full[3].num_train_tokens]
    assert torch.equal(capped[1].train, full[1].train[:5])
    assert all(torch.equal(a.test, b.test) and torch.equal(a.validation, b.validation) for a, b in zip(full, capped))


def test_max_train_tokens_below_one_block_raises(ag_news_csv, tokenizer, tmp_path):
    config = ag_news_config(
        dataset="csv", data_files=ag_news_csv, block_size=8, cache_dir=str(tmp_path), max_train_tokens=4
    )
    with pytest.raises(ValueError, match="below one block"):
        build_client_datasets(config, tokenizer, seed=0)


def test_max_train_tokens_list_must_match_the_clients(ag_news_csv, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="2 caps for 4 clients"):  # 4 client values: known at construction
        ag_news_config(
            dataset="csv", data_files=ag_news_csv, block_size=8, cache_dir=str(tmp_path), max_train_tokens=[64, 64]
        )
    config = DataConfig(  # one client per label, known only from the data
        dataset="csv",
        data_files=ag_news_csv,
        partition_column="label",
        block_size=8,
        cache_dir=str(tmp_path),
        max_train_tokens=[64, 64],
    )
    with pytest.raises(ValueError, match="2 caps for 4 clients"):
        build_client_datasets(config, tokenizer, seed=0)


def test_max_records_per_client_shrinks_every_split(ag_news_csv, tokenizer, tmp_path):
    config = ag_news_config(
        dataset="csv", data_files=ag_news_csv, block_size=13, cache_dir=str(tmp_path), max_records_per_client=10
    )
    clients = build_client_datasets(config, tokenizer, seed=0)
    assert [(len(c.train), len(c.validation), len(c.test)) for c in clients] == [(8, 1, 1)] * 4


def test_split_without_a_whole_block_raises_naming_client_and_split(ag_news_csv, tokenizer, tmp_path):
    config = ag_news_config(dataset="csv", data_files=ag_news_csv, block_size=64, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="'World' has no validation block"):
        build_client_datasets(config, tokenizer, seed=0)


def test_dirichlet_and_iid_clients_are_numbered(ag_news_csv, tokenizer, tmp_path):
    for partition in ("dirichlet", "iid"):
        config = DataConfig(
            dataset="csv",
            data_files=ag_news_csv,
            partition=partition,
            partition_column="label",
            num_clients=2,
            dirichlet_alpha=1.0,
            block_size=8,
            cache_dir=str(tmp_path),
        )
        clients = build_client_datasets(config, tokenizer, seed=0)
        assert [client.name for client in clients] == ["client_0", "client_1"]


# -- loading ----------------------------------------------------------------------------------------------------------


def write_records(path, rows, file_format):
    if file_format == "text":
        path.write_text("".join(row["text"] + "\n" for row in rows))
    elif file_format == "jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif file_format == "json":
        path.write_text(json.dumps(rows))  # one JSON array
    elif file_format == "csv":
        datasets.Dataset.from_list(rows).to_csv(path, index=False)
    else:
        datasets.Dataset.from_list(rows).to_parquet(path)


@pytest.mark.parametrize(
    ("file_format", "loader"),
    [("csv", "csv"), ("json", "json"), ("jsonl", "json"), ("parquet", "parquet"), ("text", "text")],
)
def test_local_formats_load_into_clients(tmp_path, tokenizer, file_format, loader):
    path = tmp_path / f"records.{file_format}"
    write_records(path, ag_news_rows(), file_format)
    partition = {"partition": "iid"} if file_format == "text" else {"partition_column": "label"}
    config = DataConfig(dataset=loader, data_files=str(path), block_size=8, cache_dir=str(tmp_path), **partition)
    assert len(load_records(config)) == 80
    clients = build_client_datasets(config, tokenizer, seed=0)
    expected = [f"client_{i}" for i in range(4)] if file_format == "text" else ["0", "1", "2", "3"]
    assert [client.name for client in clients] == expected


def test_class_label_columns_name_clients_by_class(tmp_path, tokenizer):
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=list(AG_NEWS_LABELS))}
    )
    path = tmp_path / "ag_news.parquet"
    datasets.Dataset.from_list(ag_news_rows(), features=features).to_parquet(path)
    config = DataConfig(
        dataset="parquet", data_files=str(path), partition_column="label", block_size=8, cache_dir=str(tmp_path)
    )
    assert [client.name for client in build_client_datasets(config, tokenizer, seed=0)] == list(AG_NEWS_LABELS)


def test_missing_text_column_raises_naming_it(ag_news_csv, tmp_path):
    config = ag_news_config(dataset="csv", data_files=ag_news_csv, text_column="body", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"text_column='body' is not a column .*columns: text, label"):
        load_records(config)


def test_missing_partition_column_raises_naming_it(ag_news_csv, tmp_path):
    config = DataConfig(dataset="csv", data_files=ag_news_csv, partition_column="topic", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="partition_column='topic' is not a column"):
        load_records(config)


def test_client_value_without_records_raises_naming_it(ag_news_csv, tokenizer, tmp_path):
    config = DataConfig(
        dataset="csv", data_files=ag_news_csv, partition_column="label", client_values=[0, 7], cache_dir=str(tmp_path)
    )
    with pytest.raises(ValueError, match="'7' has no records: no row has label == 7"):
        build_client_datasets(config, tokenizer, seed=0)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"partition": "shards"}, "partition must be one of"),
        ({"dataset": "csv", "partition": "column"}, "needs a partition_column"),
        ({"validation_fraction": 0.0}, "must both lie in"),
        ({"validation_fraction": 0.5, "test_fraction": 0.5}, "below 1"),
        ({"client_values": [0, 1], "client_names": ["a"]}, "client_names has 1 entries"),
        (
            {"dataset": "json", "partition_column": "language", "configs_per_client": {"en": "x"}},
            "configs_per_client names Hub configs",
        ),
    ],
)
def test_bad_config_fails_at_construction(fields, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(**fields)


def test_local_format_without_files_raises():
    with pytest.raises(ValueError, match="set data_files"):
        load_records(DataConfig(dataset="parquet", partition="iid"))


# -- the paper's settings on local files of the same schema -----------------------------------------------------------


@pytest.fixture
def hub_from_local(monkeypatch):
    """Redirect `datasets.load_dataset(<hub id>, name, ...)` to local files; record each call's arguments."""
    calls, files = [], {}
    real_load_dataset = datasets.load_dataset

    def load_dataset(path, name=None, **kwargs):
        calls.append({"path": path, "name": name, **kwargs})
        file = files[(path, name)]
        kwargs.pop("revision", None)
        return real_load_dataset(file.suffix.lstrip(".").replace("jsonl", "json"), data_files=str(file), **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls, files


def test_ag_news_preset_loads_the_hub_dataset_by_label(hub_from_local, tmp_path, tokenizer):
    calls, files = hub_from_local
    files[("fancyzhx/ag_news", None)] = tmp_path / "ag_news.parquet"
    write_records(files[("fancyzhx/ag_news", None)], ag_news_rows(), "parquet")
    clients = build_client_datasets(ag_news_config(block_size=8, cache_dir=str(tmp_path)), tokenizer, seed=0)
    assert [client.name for client in clients] == list(AG_NEWS_LABELS)
    assert calls[0]["path"] == "fancyzhx/ag_news" and calls[0]["split"] == "train"


def wikipedia_rows(language: str, count: int = 20) -> list[dict]:
    return [
        {"id": str(i), "url": f"https://{language}.wikipedia.org/{i}", "title": f"T{i}", "text": document(language, i)}
        for i in range(count)
    ]


def test_wikipedia_preset_loads_one_config_per_language(hub_from_local, tmp_path):
    calls, files = hub_from_local
    languages = ("en", "fr", "de", "it")
    for language in languages:
        files[("wikimedia/wikipedia", f"20231101.{language}")] = tmp_path / f"{language}.parquet"
        write_records(tmp_path / f"{language}.parquet", wikipedia_rows(language, count=30), "parquet")
    tokenizer = make_tokenizer([row["text"] for language in languages for row in wikipedia_rows(language, 30)])
    config = wikipedia_config(block_size=8, cache_dir=str(tmp_path), max_source_records=20)
    clients = build_client_datasets(config, tokenizer, seed=0)
    assert [client.name for client in clients] == list(languages)
    assert [call["name"] for call in calls] == [f"20231101.{language}" for language in languages]
    assert all(call["streaming"] for call in calls)
    vocab = {i: word for word, i in tokenizer.get_vocab().items()}
    for language, client in zip(languages, clients):
        words = {vocab[i] for i in client.train.flatten().tolist() if i != EOS}
        assert all(word.startswith(language) for word in words)
        # max_source_records=20 read per language: 16 train records of 13 tokens
        assert client.num_train_tokens == 16 * 13 // 8 * 8


@pytest.mark.parametrize("file_format", ["jsonl", "parquet"])
def test_wikipedia_preset_reads_local_files_per_language(tmp_path, file_format):
    languages = ("en", "fr", "de", "it")
    data_files = {}
    for language in languages:
        data_files[language] = str(tmp_path / f"{language}.{file_format}")
        write_records(tmp_path / f"{language}.{file_format}", wikipedia_rows(language), file_format)
    tokenizer = make_tokenizer([row["text"] for language in languages for row in wikipedia_rows(language)])
    loader = "json" if file_format == "jsonl" else file_format
    config = wikipedia_config(dataset=loader, data_files=data_files, block_size=8, cache_dir=str(tmp_path))
    records = load_records(config)
    assert records.column_names == ["text", "language"]
    assert records["language"] == [language for language in languages for _ in range(20)]
    clients = build_client_datasets(config, tokenizer, seed=0)
    assert [client.name for client in clients] == list(languages)


def per_language_files(tmp_path) -> tuple[dict[str, str], PreTrainedTokenizerFast]:
    languages = ("en", "fr", "de", "it")
    data_files = {}
    for language in languages:
        data_files[language] = str(tmp_path / f"{language}.jsonl")
        write_records(tmp_path / f"{language}.jsonl", wikipedia_rows(language), "jsonl")
    return data_files, make_tokenizer([row["text"] for language in languages for row in wikipedia_rows(language)])


@pytest.mark.parametrize("per_client_files", [True, False], ids=["a-file-per-client", "one-shared-file"])
def test_a_client_built_alone_equals_the_client_built_with_the_others(tmp_path, per_client_files):
    data_files, tokenizer = per_language_files(tmp_path)
    if per_client_files:
        config = wikipedia_config(dataset="json", data_files=data_files, block_size=8, cache_dir=str(tmp_path))
    else:
        shared = tmp_path / "all.jsonl"
        rows = [dict(row, language=language) for language in data_files for row in wikipedia_rows(language)]
        write_records(shared, rows, "jsonl")
        config = DataConfig(
            dataset="json",
            data_files=str(shared),
            partition_column="language",
            block_size=8,
            cache_dir=str(tmp_path),
            max_train_tokens=[16, 24, 32, 40],
        )
    together = build_client_datasets(config, tokenizer, seed=3)
    for client_id, expected in enumerate(together):
        alone = build_client_data(config, tokenizer, seed=3, client_id=client_id)
        assert alone.name == expected.name
        for split in ("train", "validation", "test"):
            assert torch.equal(getattr(alone, split), getattr(expected, split)), (client_id, split)


def test_a_client_with_its_own_file_never_opens_another_client_s_file(tmp_path):
    data_files, tokenizer = per_language_files(tmp_path)
    config = wikipedia_config(dataset="json", data_files=data_files, block_size=8, cache_dir=str(tmp_path))
    expected = build_client_datasets(config, tokenizer, seed=0)[2]  # "de"
    for language, path in data_files.items():
        if language != "de":
            os.remove(path)
    alone = build_client_data(config, tokenizer, seed=0, client_id=2)
    assert alone.name == "de" and torch.equal(alone.train, expected.train)
    with pytest.raises(FileNotFoundError):
        build_client_data(config, tokenizer, seed=0, client_id=0)


def test_a_client_id_outside_the_partition_is_rejected(tmp_path):
    data_files, tokenizer = per_language_files(tmp_path)
    config = wikipedia_config(dataset="json", data_files=data_files, block_size=8, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"client ids \[4\] are out of range: the data section has 4 clients"):
        build_client_data(config, tokenizer, seed=0, client_id=4)


def slimpajama_rows(per_source: int = 20) -> list[dict]:
    sources = ("RedPajamaArXiv", "RedPajamaBook", "RedPajamaGithub", "RedPajamaStackExchange", "RedPajamaC4")
    return [
        {"text": document(source[len("RedPajama") :].lower(), i), "meta": {"redpajama_set_name": source}}
        for i in range(per_source)
        for source in sources
    ]


@pytest.mark.parametrize("file_format", ["jsonl", "parquet"])
def test_slimpajama_preset_splits_by_the_nested_source_name(tmp_path, file_format):
    path = tmp_path / f"slimpajama.{file_format}"
    write_records(path, slimpajama_rows(), file_format)
    tokenizer = make_tokenizer([row["text"] for row in slimpajama_rows()])
    loader = "json" if file_format == "jsonl" else file_format
    config = slimpajama_config(dataset=loader, data_files=str(path), block_size=8, cache_dir=str(tmp_path))
    clients = build_client_datasets(config, tokenizer, seed=0)
    assert [client.name for client in clients] == [
        "RedPajamaArXiv",
        "RedPajamaBook",
        "RedPajamaGithub",
        "RedPajamaStackExchange",
    ]
    vocab = {i: word for word, i in tokenizer.get_vocab().items()}
    for client, prefix in zip(clients, ("arxiv", "book", "github", "stackexchange")):
        words = {vocab[i] for i in client.train.flatten().tolist() if i != EOS}
        assert all(word.startswith(prefix) for word in words)  # RedPajamaC4 went to no client


def test_dotted_partition_column_reads_json_strings(tmp_path):
    rows = [{"text": row["text"], "meta": json.dumps(row["meta"])} for row in slimpajama_rows()]
    path = tmp_path / "slimpajama.jsonl"
    write_records(path, rows, "jsonl")
    config = slimpajama_config(dataset="json", data_files=str(path), block_size=8, cache_dir=str(tmp_path))
    clients = build_client_datasets(config, make_tokenizer([row["text"] for row in rows]), seed=0)
    assert len(clients) == 4


def test_missing_nested_partition_field_raises(tmp_path):
    path = tmp_path / "slimpajama.jsonl"
    write_records(path, [{"text": "a", "meta": {"source": "x"}}], "jsonl")
    config = slimpajama_config(dataset="json", data_files=str(path), cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="partition_column='meta.redpajama_set_name' is not a column"):
        load_records(config)


def test_per_language_files_can_feed_a_dirichlet_partition(tmp_path):
    languages = ("en", "fr", "de", "it")
    data_files = {language: str(tmp_path / f"{language}.jsonl") for language in languages}
    for language in languages:
        write_records(tmp_path / f"{language}.jsonl", wikipedia_rows(language), "jsonl")
    tokenizer = make_tokenizer([row["text"] for language in languages for row in wikipedia_rows(language)])
    config = wikipedia_config(
        dataset="json",
        data_files=data_files,
        partition="dirichlet",
        num_clients=2,
        dirichlet_alpha=1.0,
        block_size=8,
        cache_dir=str(tmp_path),
    )
    clients = build_client_datasets(config, tokenizer, seed=0)
    assert [client.name for client in clients] == ["client_0", "client_1"]
