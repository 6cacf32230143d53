"""Shipped recipe configs: every YAML loads; the paper recipes document their launch, mean what their names say, run on
the tiny world, and their data sections run the real loading code on local files with the Hub datasets' schema.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import datasets
import pytest
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from federated_setup import tiny_overrides
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from comigs_hf.config import (
    RecipeConfig,
    build_strategy,
    client_num_specialists,
    config_from_dict,
    config_to_dict,
    load_config,
)
from comigs_hf.data import AG_NEWS_LABELS, ag_news_config, build_client_datasets, slimpajama_config, wikipedia_config
from comigs_hf.recipe import run

CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "configs"
SHIPPED = sorted(CONFIGS.glob("**/*.yaml"))  # demo.yaml and any later recipe included
ALL_ROLES = {"generalist", "specialist", "router"}
BLOCK_SIZE = 128
WORDS_PER_DOC = 40

# file -> strategy, generalists, specialists per client, top_k, roles that leave a client
PAPER = {
    "agnews_gpt2_comigs.yaml": ("comigs", 1, [1, 1, 1, 1], 2, {"generalist"}),
    "agnews_gpt2_fedavg_single.yaml": ("fedavg", 1, [0, 0, 0, 0], 1, {"generalist", "specialist"}),
    "agnews_gpt2_local_single.yaml": ("local", 1, [0, 0, 0, 0], 1, set()),
    "agnews_gpt2_2g.yaml": ("comigs", 2, [0, 0, 0, 0], 2, {"generalist"}),
    "agnews_gpt2_2s.yaml": ("comigs_2s", 1, [1, 1, 1, 1], 2, set()),
    "agnews_gpt2_hetero.yaml": ("comigs", 1, [1, 1, 3, 3], 2, {"generalist"}),
    "wikipedia_multilingual_gpt2.yaml": ("comigs", 1, [1, 1, 1, 1], 2, {"generalist"}),
    "slimpajama_llama3.2-1b.yaml": ("comigs", 1, [1, 1, 1, 1], 2, {"generalist"}),
}
DATA_PRESETS = {
    "agnews": ag_news_config(block_size=BLOCK_SIZE),
    "wikipedia": wikipedia_config(block_size=BLOCK_SIZE),
    "slimpajama": slimpajama_config(block_size=BLOCK_SIZE),
}


def paper_config(name: str, overrides: list[str] = ()) -> RecipeConfig:
    return load_config(CONFIGS / name, overrides)


def documented_commands(path: Path) -> list[list[str]]:
    """The `accelerate launch` / `comigs run` commands of the leading comment block, continuation lines joined and
    leading `VAR=value` environment settings dropped."""
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line[1:].strip())
    commands, current = [], ""
    for line in header:
        current += " " + line
        if current.endswith("\\"):
            current = current[:-1]
            continue
        words = [word for word in current.split() if not re.fullmatch(r"[A-Z_]+=\S*", word)]
        if words[:2] in (["accelerate", "launch"], ["comigs", "run"]):  # prose may hold unbalanced quotes
            commands.append([token for token in shlex.split(current) if not re.fullmatch(r"[A-Z_]+=\S*", token)])
        current = ""
    return commands


@pytest.mark.parametrize("path", SHIPPED, ids=[path.name for path in SHIPPED])
def test_every_shipped_yaml_loads_validates_and_round_trips(path):
    cfg = load_config(path)
    assert isinstance(cfg, RecipeConfig)
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_every_paper_recipe_is_shipped():
    assert set(PAPER) <= {path.name for path in SHIPPED}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_recipes_open_with_launch_and_override_commands_that_load(name):
    path = CONFIGS / name
    assert path.read_text().startswith("# ")
    commands = documented_commands(path)
    launches = [command for command in commands if f"recipes/configs/{name}" in command]
    assert any(command[:2] == ["accelerate", "launch"] for command in launches)
    assert any(command[:2] == ["comigs", "run"] for command in launches)
    with_overrides = 0
    for command in launches:
        overrides = command[command.index("--config") + 2 :]
        with_overrides += bool(overrides)
        assert isinstance(load_config(path, overrides), RecipeConfig), command
    assert with_overrides >= 1


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_recipes_hold_the_experts_and_sharing_their_names_say(name):
    strategy, num_generalists, counts, top_k, shared = PAPER[name]
    cfg = paper_config(name)
    assert (cfg.strategy, cfg.model.num_generalists, cfg.model.top_k) == (strategy, num_generalists, top_k)
    assert client_num_specialists(cfg) == counts
    assert build_strategy(cfg).shared_roles == shared


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_recipes_keep_the_reference_optimisation(name):
    cfg = paper_config(name)
    training, single_expert = cfg.training, PAPER[name][1] + max(PAPER[name][2]) == 1
    assert (cfg.rounds, training.local_steps, cfg.data.block_size) == (20, 10, BLOCK_SIZE)
    assert (training.batch_size, training.micro_batch_size) == (64, 8)
    assert (training.learning_rate, training.router_learning_rate) == (2e-3, 2e-3)
    # a single expert always gets weight 1: its baselines skip the router phases instead of spending steps on them
    assert (training.router_update_every, training.router_steps) == (30, 0 if single_expert else 10)
    assert (cfg.model.router_aux_loss_coef, cfg.model.generalist_importance) == (0.01, 0.5)


SINGLE_ADAPTER = {"agnews_gpt2_fedavg_single.yaml", "agnews_gpt2_local_single.yaml"}


@pytest.mark.parametrize("name", sorted(set(PAPER) - SINGLE_ADAPTER))
def test_paper_recipes_hold_the_reference_profile(name):
    model, training = paper_config(name).model, paper_config(name).training
    assert (model.attention_lora, model.attention_lora_r, model.base_dropout) == (True, 8, 0.0)
    assert (model.cap_top_k, model.router_aux_loss_variant) == (True, "reference")
    assert training.max_grad_norm is None
    assert training.reference_gradient_leak is False  # a documented opt-in, not part of the profile


@pytest.mark.parametrize("name", sorted(SINGLE_ADAPTER))
def test_single_adapter_baselines_keep_their_earlier_form(name):
    model, training = paper_config(name).model, paper_config(name).training
    assert (model.attention_lora, model.base_dropout, training.max_grad_norm) == (False, None, 1.0)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_data_sections_are_the_data_presets(name):
    preset = next(preset for prefix, preset in DATA_PRESETS.items() if name.startswith(prefix))
    assert paper_config(name).data == preset


def test_the_llama_recipe_holds_the_base_in_bfloat16_with_gradient_checkpointing():
    model = paper_config("slimpajama_llama3.2-1b.yaml").model
    assert (model.base_model, model.dtype, model.gradient_checkpointing) == (
        "meta-llama/Llama-3.2-1B",
        "bfloat16",
        True,
    )


# ---- the paper recipes on the tiny world -------------------------------------------------------------------------


def documented_mixed_precision(path: Path) -> str:
    """The `--mixed_precision` of the recipe's first `accelerate launch` command, `"no"` without one."""
    launch = next(command for command in documented_commands(path) if command[0] == "accelerate")
    return launch[launch.index("--mixed_precision") + 1] if "--mixed_precision" in launch else "no"


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_recipe_strategy_and_experts_run_a_round_on_the_tiny_world(world, tmp_path, name):
    raw = yaml.safe_load((CONFIGS / name).read_text())
    raw["data"] = {}  # the tiny world's 4 domains stand in for the recipe's 4 clients
    extra = {"rounds": 1, "save_models": False, "training.router_update_every": 1}
    cfg = config_from_dict(raw, tiny_overrides(*world, tmp_path / "out", **extra))
    # as launched: the bfloat16 recipe documents bf16 autocast, which its float32 routers need
    mixed_precision = documented_mixed_precision(CONFIGS / name)
    if mixed_precision == "no":
        results = run(cfg, Accelerator(cpu=True))
    else:
        # the process-wide Accelerate state fixes the precision once: reset it around this run (as accelerate's tests)
        AcceleratorState._reset_state(reset_partial_state=True)
        try:
            results = run(cfg, Accelerator(cpu=True, mixed_precision=mixed_precision))
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)
    _, _, counts, _, shared = PAPER[name]
    assert [client["num_specialists"] for client in results["clients"]] == counts
    assert all(client["test_loss"] > 0 for client in results["clients"])
    assert all((client["bytes_sent"] > 0) == bool(shared) for client in results["clients"])


# ---- the paper recipes' data sections on local files with the Hub schema -------------------------------------------


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")


def document(prefix: str, index: int) -> str:
    """Words unique to one document and marked by its client, so the clients' blocks can be told apart."""
    return " ".join(f"{prefix}{index}w{k}" for k in range(WORDS_PER_DOC))


def word_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    words = sorted({word for text in texts for word in text.split()})
    vocab = {"<eos>": 0, "<unk>": 1, **{word: i + 2 for i, word in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>")


def assert_clients_hold_only_their_words(clients, tokenizer, prefixes) -> None:
    words = {i: word for word, i in tokenizer.get_vocab().items()}
    for client, prefix in zip(clients, prefixes):
        assert client.train.shape[1] == BLOCK_SIZE and client.train.shape[0] > 0
        seen = {words[i] for i in client.train.flatten().tolist() if i != 0}
        assert seen and all(word.startswith(prefix) for word in seen), client.name


def test_agnews_recipe_data_section_splits_a_local_copy_by_topic(tmp_path):
    rows = [{"text": document(f"t{label}x", i), "label": label} for i in range(60) for label in range(4)]
    path = tmp_path / "ag_news.csv"
    datasets.Dataset.from_list(rows).to_csv(path, index=False)
    overrides = ["data.dataset=csv", f"data.data_files={path}", f"data.cache_dir={tmp_path / 'cache'}"]
    cfg = paper_config("agnews_gpt2_comigs.yaml", overrides)
    tokenizer = word_tokenizer([row["text"] for row in rows])
    clients = build_client_datasets(cfg.data, tokenizer, cfg.seed)
    assert [client.name for client in clients] == list(AG_NEWS_LABELS)
    assert_clients_hold_only_their_words(clients, tokenizer, [f"t{label}x" for label in range(4)])


@pytest.fixture
def hub_datasets(monkeypatch):
    """Answer `datasets.load_dataset(<hub id>, <config>, ...)` from local files; record each call's arguments."""
    calls, files = [], {}
    real_load_dataset = datasets.load_dataset

    def load_dataset(path, name=None, **kwargs):
        calls.append({"path": path, "name": name, **kwargs})
        kwargs.pop("revision", None)
        file = files[(path, name)]
        return real_load_dataset(file.suffix.lstrip(".").replace("jsonl", "json"), data_files=str(file), **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls, files


def test_wikipedia_recipe_data_section_streams_one_config_per_language(hub_datasets, tmp_path):
    calls, files = hub_datasets
    languages = ["en", "fr", "de", "it"]
    texts = []
    for language in languages:
        rows = [
            {
                "id": str(i),
                "url": f"https://{language}.wikipedia.org/{i}",
                "title": f"T{i}",
                "text": document(language, i),
            }
            for i in range(40)
        ]
        texts += [row["text"] for row in rows]
        files[("wikimedia/wikipedia", f"20231101.{language}")] = tmp_path / f"{language}.parquet"
        datasets.Dataset.from_list(rows).to_parquet(tmp_path / f"{language}.parquet")
    cfg = paper_config("wikipedia_multilingual_gpt2.yaml", [f"data.cache_dir={tmp_path / 'cache'}"])
    tokenizer = word_tokenizer(texts)
    clients = build_client_datasets(cfg.data, tokenizer, cfg.seed)
    assert [client.name for client in clients] == languages
    assert [(call["path"], call["name"], call["streaming"]) for call in calls] == [
        ("wikimedia/wikipedia", f"20231101.{language}", True) for language in languages
    ]
    assert_clients_hold_only_their_words(clients, tokenizer, languages)


def test_slimpajama_recipe_data_section_splits_the_stream_by_source(hub_datasets, tmp_path):
    calls, files = hub_datasets
    sources = ["RedPajamaArXiv", "RedPajamaBook", "RedPajamaGithub", "RedPajamaStackExchange", "RedPajamaC4"]
    rows = [
        {"text": document(source[len("RedPajama") :].lower() + "x", i), "meta": {"redpajama_set_name": source}}
        for i in range(40)
        for source in sources
    ]
    files[("DKYoon/SlimPajama-6B", None)] = tmp_path / "slimpajama.jsonl"
    (tmp_path / "slimpajama.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    cfg = paper_config("slimpajama_llama3.2-1b.yaml", [f"data.cache_dir={tmp_path / 'cache'}"])
    tokenizer = word_tokenizer([row["text"] for row in rows])
    clients = build_client_datasets(cfg.data, tokenizer, cfg.seed)
    assert [client.name for client in clients] == sources[:4]  # C4 is no client's
    assert [(call["path"], call["streaming"]) for call in calls] == [("DKYoon/SlimPajama-6B", True)]
    assert_clients_hold_only_their_words(clients, tokenizer, ["arxivx", "bookx", "githubx", "stackexchangex"])
