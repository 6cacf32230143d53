import re
from pathlib import Path

import pytest
import yaml

from comigs_hf.config import (
    RecipeConfig,
    build_strategy,
    client_num_specialists,
    config_from_dict,
    config_to_dict,
    load_config,
    validate_config,
)
from comigs_hf.data import DataConfig
from comigs_hf.model import ModelConfig
from comigs_hf.trainer import TrainingConfig

SHIPPED_YAML = sorted((Path(__file__).resolve().parents[1] / "recipes" / "configs").glob("**/*.yaml"))


def write_yaml(tmp_path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_defaults_are_valid_and_typed():
    cfg = load_config(None)
    assert cfg == RecipeConfig()
    assert isinstance(cfg.model, ModelConfig)
    assert isinstance(cfg.training, TrainingConfig)
    assert isinstance(cfg.data, DataConfig)
    assert cfg.training.adam_betas == (0.9, 0.95)
    assert cfg.trackers == ["tensorboard"]


def test_dotted_override_sets_a_section_field():
    cfg = load_config(None, ["training.local_steps=5", "model.lora_r=4"])
    assert cfg.training.local_steps == 5
    assert cfg.model.lora_r == 4


def test_bare_override_sets_a_top_level_field():
    cfg = load_config(None, ["strategy=fedavg", "rounds=5", "output_dir=/tmp/run 1"])
    assert (cfg.strategy, cfg.rounds, cfg.output_dir) == ("fedavg", 5, "/tmp/run 1")


def test_list_override_gives_per_client_specialist_counts():
    cfg = load_config(None, ["model.num_specialists=[0,1,2,3]", "model.top_k=1"])
    assert cfg.model.num_specialists == [0, 1, 2, 3]
    assert client_num_specialists(cfg) == [0, 1, 2, 3]


def test_single_specialist_count_is_broadcast_to_every_client():
    cfg = load_config(None, ["model.num_specialists=2", "data.partition=iid", "data.num_clients=3"])
    assert client_num_specialists(cfg) == [2, 2, 2]


@pytest.mark.parametrize(
    ("overrides", "num_clients"),
    [
        ([], 4),  # the embedded dataset: one client per domain
        (["data.partition=iid", "data.num_clients=3"], 3),
        (["data.partition=dirichlet", "data.partition_column=label", "data.num_clients=5"], 5),
        (["data.client_values=[code, reference]"], 2),
        (["data.dataset=json", "data.partition_column=label"], None),
        (["data.dataset=json", "data.partition_column=lang", "data.data_files={en: en.jsonl, de: de.jsonl}"], 2),
    ],
)
def test_expected_client_count_follows_the_partition(overrides, num_clients):
    assert load_config(None, overrides).data.num_clients_known() == num_clients


def test_shared_specialist_count_needs_the_client_count_once_data_decides_it():
    cfg = load_config(None, ["data.dataset=json", "data.partition_column=label", "model.num_specialists=2"])
    with pytest.raises(ValueError, match="model.num_specialists=2 applies to every client.*pass num_clients"):
        client_num_specialists(cfg)
    assert client_num_specialists(cfg, num_clients=3) == [2, 2, 2]


def test_per_client_list_is_checked_against_the_loaded_client_count():
    cfg = load_config(None, ["data.dataset=json", "data.partition_column=label", "model.num_specialists=[1, 2]"])
    assert client_num_specialists(cfg) == [1, 2]
    with pytest.raises(ValueError, match=re.escape("model.num_specialists has 2 entries [1, 2] but there are 3")):
        client_num_specialists(cfg, num_clients=3)


def test_overrides_apply_on_top_of_the_yaml_file(tmp_path):
    path = write_yaml(tmp_path, "strategy: local\nrounds: 3\ntraining:\n  local_steps: 7\n  batch_size: 16\n")
    cfg = load_config(path, ["training.local_steps=2", "rounds=4"])
    assert (cfg.strategy, cfg.rounds) == ("local", 4)
    assert (cfg.training.local_steps, cfg.training.batch_size) == (2, 16)


def test_yaml_lists_become_tuples_for_tuple_fields(tmp_path):
    cfg = load_config(write_yaml(tmp_path, "training:\n  adam_betas: [0.8, 0.99]\n"))
    assert cfg.training.adam_betas == (0.8, 0.99)
    assert isinstance(cfg.training.adam_betas, tuple)


def test_tuple_of_the_wrong_length_is_rejected():
    with pytest.raises(ValueError, match=r"'training.adam_betas' expects tuple\[float, float\], got \[0.9\]"):
        load_config(None, ["training.adam_betas=[0.9]"])


def test_int_is_accepted_for_a_float_field():
    cfg = load_config(None, ["model.lora_alpha=32", "training.max_grad_norm=2"])
    assert cfg.model.lora_alpha == 32.0
    assert isinstance(cfg.model.lora_alpha, float)
    assert isinstance(cfg.training.max_grad_norm, float)


def test_exponent_without_a_dot_is_read_as_a_float(tmp_path):
    # PyYAML (YAML 1.1) reads 2e-3 as the string "2e-3"
    cfg = load_config(
        write_yaml(tmp_path, "training:\n  learning_rate: 5e-4\n"), ["training.router_learning_rate=1e-3"]
    )
    assert cfg.training.learning_rate == 5e-4
    assert cfg.training.router_learning_rate == 1e-3


def test_null_override_gives_none():
    cfg = load_config(None, ["training.max_grad_norm=null", "model.revision=", "evaluation.batches=4"])
    assert cfg.training.max_grad_norm is None
    assert cfg.model.revision is None
    assert cfg.evaluation.batches == 4


def test_data_section_accepts_its_union_types():
    cfg = load_config(
        None,
        [
            "data.dataset=json",
            "data.partition_column=label",
            "data.data_files={train: a.jsonl, test: b.jsonl}",
            "data.max_train_tokens=[10, 20, 30, 40]",
            "data.client_values=[a, b, c, d]",
        ],
    )
    assert cfg.data.data_files == {"train": "a.jsonl", "test": "b.jsonl"}
    assert cfg.data.max_train_tokens == [10, 20, 30, 40]
    assert load_config(None, ["data.data_files=a.csv"]).data.data_files == "a.csv"
    assert load_config(None, ["data.data_files=[a.csv, b.csv]"]).data.data_files == ["a.csv", "b.csv"]


def test_dotted_override_reaches_into_a_dict_field():
    cfg = load_config(None, ["data.dataset=csv", "data.partition=iid", "data.data_files.train=a.csv"])
    assert cfg.data.data_files == {"train": "a.csv"}
    cfg = load_config(None, ["aggregation=trimmed_mean", "aggregation_kwargs.trim_ratio=0.2"])
    assert cfg.aggregation_kwargs == {"trim_ratio": 0.2}


def test_empty_yaml_file_gives_the_defaults(tmp_path):
    assert load_config(write_yaml(tmp_path, "# nothing\n")) == RecipeConfig()
    assert load_config(write_yaml(tmp_path, "model:\ntraining:\n")) == RecipeConfig()


def test_yaml_file_that_is_not_a_mapping_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="must be a mapping at the top level, got list"):
        load_config(write_yaml(tmp_path, "- strategy\n- comigs\n"))


def test_unknown_key_names_the_dotted_key_suggests_and_lists_valid_keys():
    with pytest.raises(ValueError) as excinfo:
        load_config(None, ["training.local_step=5"])
    message = str(excinfo.value)
    assert "Unknown config key 'training.local_step'" in message
    assert "Did you mean 'training.local_steps'?" in message
    assert "Valid keys of training: learning_rate, weight_decay" in message


def test_unknown_key_in_a_yaml_section_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="Unknown config key 'model.num_experts'"):
        load_config(write_yaml(tmp_path, "model:\n  num_experts: 4\n"))


def test_section_key_given_at_the_top_level_points_to_its_section():
    with pytest.raises(ValueError, match="Unknown config key 'router_steps'. Did you mean 'training.router_steps'?"):
        load_config(None, ["router_steps=5"])


def test_section_that_is_not_a_mapping_is_rejected():
    with pytest.raises(ValueError, match="'model': expected a mapping of ModelConfig fields, got 3"):
        load_config(None, ["model=3"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("training.local_steps=abc", "'training.local_steps' expects int, got 'abc' (str)"),
        ("training.local_steps=2.5", "'training.local_steps' expects int, got 2.5 (float)"),
        ("model.use_rslora=maybe", "'model.use_rslora' expects bool, got 'maybe' (str)"),
        ("training.learning_rate=true", "'training.learning_rate' expects float, got True (bool)"),
        ("trackers=tensorboard", "'trackers' expects list[str], got 'tensorboard' (str)"),
        ("model.num_specialists=[1, x]", "'model.num_specialists' expects int | list[int], got [1, 'x'] (list)"),
        ("model.num_specialists=1.5", "'model.num_specialists' expects int | list[int], got 1.5 (float)"),
        ("data.num_clients=[4]", "'data.num_clients' expects int, got [4] (list)"),
    ],
)
def test_wrong_type_names_the_key_the_expected_type_and_the_value(override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(None, [override])


def test_number_given_for_a_string_field_suggests_quoting():
    with pytest.raises(ValueError, match=r"'model.revision' expects str \| None, got 1234 \(int\) \(quote it"):
        load_config(None, ["model.revision=1234"])
    assert load_config(None, ["model.revision='1234'"]).model.revision == "1234"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("training.local_steps", "is not of the form key=value"),
        ("=5", "is not of the form key=value"),
        ("training..local_steps=5", "has an empty component"),
        ("model.num_specialists=[0, 1", "the value is not valid YAML"),
    ],
)
def test_malformed_override_is_rejected(override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(None, [override])


def test_override_below_a_plain_value_is_rejected():
    with pytest.raises(ValueError, match=re.escape("'strategy' is a plain value, not a section with keys")):
        load_config(None, ["strategy=comigs", "strategy.name=comigs"])


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        (
            ["strategy=scaffold"],
            ["strategy: Unknown strategy 'scaffold'", "known: centralized, comigs, comigs_2s, comigs_tr, "],
        ),
        (["model.num_generalists=0"], ["model: `num_generalists` must be at least 1, got 0"]),
        (
            ["model.num_specialists=[1, 1, 1]"],
            ["model.num_specialists has 3 entries [1, 1, 1] but the embedded dataset has 4 domains"],
        ),
        (
            ["data.partition=iid", "data.num_clients=2", "model.num_specialists=[1, 1, 1]"],
            ["model.num_specialists has 3 entries [1, 1, 1] but data.num_clients is 2"],
        ),
        (
            ["data.client_values=[code, reference]", "model.num_specialists=[1, 1, 1]"],
            ["model.num_specialists has 3 entries [1, 1, 1] but data.client_values has 2 entries"],
        ),
        (["model.num_specialists=-1"], ["model: specialist counts must be >= 0: num_specialists is -1"]),
        (["model.num_specialists=[1, -1, 1, 1]"], ["model: specialist counts must be >= 0: num_specialists[1] is -1"]),
        (
            ["model.num_specialists=[0, 1, 0, 3]"],
            ["model: num_specialists=0 (clients [0, 2])", "`num_experts_per_tok` (top-k, 2) must be between 1 and"],
        ),
        (["model.top_k=0"], ["model: `num_experts_per_tok` (top-k, 0) must be between 1"]),
        (
            ["strategy=fedavg", "model.num_specialists=[1, 1, 2, 2]", "model.top_k=1"],
            ["strategy 'fedavg' averages generalist, specialist", "model.num_specialists=[1, 1, 2, 2]"],
        ),
        (
            ["training.batch_size=10", "training.micro_batch_size=4"],
            ["training: batch_size=10 must be a multiple of micro_batch_size=4"],
        ),
        (["training.micro_batch_size=0"], ["training: batch_size and micro_batch_size must be >= 1, got 64 and 0"]),
        (["training.router_update_every=0"], ["training: router_update_every must be >= 1", "router_steps=10"]),
        (["training.router_steps=-1"], ["training: router_steps must be >= 0"]),
        (["training.local_steps=0"], ["training: local_steps must be >= 1"]),
        (["rounds=0"], ["rounds must be >= 1, got 0"]),
        (["eval_every=0"], ["eval_every must be >= 1, got 0"]),
        (
            ["data.partition=iid", "data.max_train_tokens=[10, 20]"],
            ["data: max_train_tokens lists 2 caps for 4 clients"],
        ),
        (["training.learning_rate=0"], ["training: learning_rate must be a finite number > 0, got 0.0"]),
        (["training.router_learning_rate=-1e-3"], ["training: router_learning_rate must be a finite number > 0"]),
        (["training.adam_betas=[0.9, 1.0]"], ["training: adam_betas[1] must be in [0, 1), got 1.0"]),
        (["training.min_lr_ratio=2"], ["training: min_lr_ratio must be in [0, 1]"]),
        (["training.max_grad_norm=0"], ["training: max_grad_norm must be > 0 or null"]),
        (["evaluation.batches=0"], ["evaluation: batches must be >= 1 or null"]),
        (["evaluation.paper_batches=-1"], ["evaluation: paper_batches must be >= 0"]),
        (["model.lora_r=0"], ["model: `lora_r` must be at least 1"]),
        (["model.lora_alpha=0"], ["model: `lora_alpha` must be above 0"]),
        (["model.lora_dropout=1"], ["model: `lora_dropout` must be in [0, 1)"]),
        (["model.target_modules=[mlp.c_fc]"], ["model: `target_modules` needs at least an input and an output"]),
        (["model.generalist_importance=1.0"], ["model: `generalist_importance` must be in (0, 1)"]),
        (["model.dtype=float64"], ["model: dtype: unknown dtype 'float64'", "float32, bfloat16, float16"]),
        (
            ["trackers=[tensorboard, neptune]"],
            ["trackers: unknown tracker(s) ['neptune']", "tensorboard, wandb, trackio"],
        ),
        (
            ["aggregation=median"],
            [
                "strategy:",
                "unknown aggregation 'median'; known: coordinate_median, krum, norm_weighted_mean, product_svd",
            ],
        ),
        (
            ["weighting=by_size"],
            ["strategy:", "unknown weighting 'by_size'; known: train_tokens, capped_train_tokens, uniform"],
        ),
        (
            ["aggregation=trimmed_mean", "aggregation_kwargs={trim_ratio: 0.5}"],
            [
                "aggregation 'trimmed_mean' rejects aggregation_kwargs {'trim_ratio': 0.5}",
                "trim_ratio must be in [0, 0.5)",
            ],
        ),
        (["aggregation_kwargs={trim_ratio: 0.1}"], ["aggregation 'weighted_mean' rejects", "trim_ratio"]),
    ],
)
def test_impossible_combination_is_rejected_naming_the_key(overrides, fragments):
    with pytest.raises(ValueError) as excinfo:
        load_config(None, overrides)
    for fragment in fragments:
        assert fragment in str(excinfo.value)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["data.validation_fraction=1.0"], "validation_fraction"),
        (["data.test_fraction=-0.1"], "test_fraction"),
        (["data.validation_fraction=0.5", "data.test_fraction=0.5"], "validation_fraction"),
        (["data.partition=iid", "data.num_clients=0"], "num_clients"),
    ],
)
def test_impossible_data_section_is_rejected_naming_the_section_and_field(overrides, field):
    # DataConfig checks some of these itself on construction; either way the message locates the key
    with pytest.raises(ValueError) as excinfo:
        load_config(None, overrides)
    message = str(excinfo.value)
    assert f"data.{field}" in message or (message.startswith("data: ") and field in message)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ValueError) as excinfo:
        load_config(None, ["rounds=0", "eval_every=0", "model.dtype=float8"])
    message = str(excinfo.value)
    assert message.startswith("Invalid recipe config:")
    assert "rounds must be" in message and "eval_every must be" in message and "model: dtype" in message


def test_a_section_built_in_code_is_checked_at_construction():
    with pytest.raises(ValueError, match="`num_generalists` must be at least 1"):
        ModelConfig(num_generalists=0)
    with pytest.raises(ValueError, match="local_steps must be >= 1"):
        TrainingConfig(local_steps=0)


def test_validate_config_rejects_sections_that_disagree_built_in_code():
    cfg = RecipeConfig(strategy="fedavg", model=ModelConfig(num_specialists=[1, 1, 2, 2], top_k=1))
    with pytest.raises(ValueError, match="strategy 'fedavg' averages generalist, specialist"):
        validate_config(cfg)


def test_frozen_router_may_have_no_update_interval():
    cfg = load_config(None, ["training.router_steps=0", "training.router_update_every=0"])
    assert cfg.training.router_steps == 0


def test_fedavg_accepts_equal_expert_counts_given_per_client():
    cfg = load_config(None, ["strategy=fedavg", "model.num_specialists=[2, 2, 2, 2]"])
    assert build_strategy(cfg).requires_equal_experts


def test_comigs_accepts_unequal_expert_counts():
    cfg = load_config(None, ["model.num_specialists=[1, 1, 2, 3]"])
    assert client_num_specialists(cfg) == [1, 1, 2, 3]


def test_build_strategy_applies_the_aggregation_settings():
    cfg = load_config(None, ["aggregation=trimmed_mean", "aggregation_kwargs={trim_ratio: 0.25}", "weighting=uniform"])
    strategy = build_strategy(cfg)
    assert strategy.name == "comigs"
    assert strategy.shared_roles == {"generalist"}
    assert (strategy.aggregation, strategy.weighting) == ("trimmed_mean", "uniform")
    assert strategy.aggregation_kwargs == {"trim_ratio": 0.25}


def test_build_strategy_keeps_the_preset_when_nothing_is_set():
    assert build_strategy(load_config(None, ["strategy=local"])).aggregation == "weighted_mean"


def test_config_round_trips_through_a_plain_dict_and_yaml(tmp_path):
    cfg = load_config(
        None, ["strategy=fedavg", "model.num_specialists=[2, 2, 2, 2]", "training.adam_betas=[0.8, 0.9]"]
    )
    as_dict = config_to_dict(cfg)
    assert as_dict["training"]["adam_betas"] == [0.8, 0.9]
    path = tmp_path / "saved.yaml"
    path.write_text(yaml.safe_dump(as_dict))
    assert load_config(path) == cfg
    assert config_from_dict(as_dict) == cfg


@pytest.mark.parametrize("path", SHIPPED_YAML, ids=[path.name for path in SHIPPED_YAML])
def test_every_shipped_yaml_loads(path):
    assert isinstance(load_config(path), RecipeConfig)


@pytest.mark.parametrize(
    ("override", "moved_to"),
    [("training.eval_batches=4", "evaluation.batches"), ("training.router_on_train=true", "strategy=comigs_tr")],
)
def test_a_key_that_moved_names_its_new_place(override, moved_to):
    with pytest.raises(ValueError, match=f"It moved: use {moved_to}"):
        load_config(None, [override])


def test_the_centralised_baseline_needs_one_layout_and_says_why():
    with pytest.raises(ValueError, match="'centralized' trains one model for every client, so every client needs"):
        load_config(None, ["strategy=centralized", "model.num_specialists=[1, 1, 2, 2]"])
