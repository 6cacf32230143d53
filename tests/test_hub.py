"""Generalists through the Hub: rounds as tags, model cards, opt-in client models, Hub-mediated aggregation.

Everything runs the real `huggingface_hub` client (and PEFT, transformers) over HTTP against `LocalHub`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import perturb_experts, tiny_gpt2
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, EvalResult, HfApi, ModelCard, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError
from peft import PeftModel
from safetensors.torch import load, load_file, save

from comigs_hf import CoMiGSForCausalLM
from comigs_hf.adapters import export_generalist, generalist_state_dict, load_generalist
from comigs_hf.algorithms import get_strategy
from comigs_hf.transports.hub import (
    FederationManifest,
    aggregate_round,
    pull_global,
    push_client_model_to_hub,
    push_generalist_to_hub,
    read_manifest,
    render_generalist_card,
    seed_hub_rounds,
    submit_update,
    template_path,
)
from comigs_hf.transports.hub.federation import ForgedRound, trusted_round_commit

try:  # default pytest import mode: `tests/` (no __init__.py) is on sys.path
    from hub_server import LocalHub, configure_hf_client
except ImportError:  # `tests` made a package, or --import-mode=importlib
    from tests.hub_server import LocalHub, configure_hf_client

REPO = "local-user/comigs-generalist"
TOKEN = "hf_comigsSecretTokenValue0123456789"


@pytest.fixture
def hub(local_hub: LocalHub) -> Iterator[LocalHub]:
    yield local_hub
    assert local_hub.unhandled == []  # the client called nothing the local server does not implement


def build(seed: int = 0, **kwargs) -> CoMiGSForCausalLM:
    options = {
        "num_generalists": 1,
        "num_specialists": 1,
        "lora_r": 4,
        "lora_alpha": 8,
        "top_k": 2,
        "base_model_name_or_path": "tiny-base",
        **kwargs,
    }
    model = CoMiGSForCausalLM.from_base(tiny_gpt2(), **options)
    perturb_experts(model, seed=seed)
    return model.eval()


def generalist_state_of(model: CoMiGSForCausalLM) -> dict[str, torch.Tensor]:
    """The model's generalist under its own parameter names (what `seed_hub_rounds` loads)."""
    return {k: v.detach().clone() for k, v in model.role_state_dict("generalist").items()}


def generalist(model: CoMiGSForCausalLM) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in generalist_state_dict(model).items()}


def assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, msg=key)


def num_commits(repo_id: str = REPO) -> int:
    return len(HfApi().list_repo_commits(repo_id))


def card_at(revision: str, repo_id: str = REPO) -> ModelCard:
    # `ModelCard.load` reads the default branch only: fetch the README of the tagged commit itself
    return ModelCard.load(hf_hub_download(repo_id, "README.md", revision=revision))


# ---- push / pull ---------------------------------------------------------------------------------------------


def test_pulling_round_1_after_round_2_gives_round_1_weights(hub):
    model = build(seed=1)
    first_sha = push_generalist_to_hub(model, REPO, round=1)
    round_1 = generalist(model)
    perturb_experts(model, seed=2)
    push_generalist_to_hub(model, REPO, round=2)
    round_2 = generalist(model)

    assert hub.resolve(REPO, "round-1").sha == first_sha
    target = build(seed=3)
    load_generalist(target, REPO, revision="round-1")
    assert_same(generalist(target), round_1)
    pull_global(target, REPO, round=2)
    assert_same(generalist(target), round_2)


def test_stock_peft_loads_the_pushed_generalist_at_its_round(hub, input_ids):
    model = build(seed=1)
    push_generalist_to_hub(model, REPO, round=1)
    perturb_experts(model, seed=2)
    push_generalist_to_hub(model, REPO, round=2)

    peft_model = PeftModel.from_pretrained(tiny_gpt2(), REPO, revision="round-1").eval()
    reference = build(seed=1)
    with torch.no_grad(), reference.route_all_to(0):
        expected = reference(input_ids).logits
    torch.testing.assert_close(peft_model(input_ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_republishing_a_round_is_a_no_op_and_other_content_under_its_tag_is_refused(hub):
    model = build(seed=1)
    sha = push_generalist_to_hub(model, REPO, round=1, num_clients=2, num_tokens=10)
    commits = num_commits()
    assert push_generalist_to_hub(model, REPO, round=1, num_clients=2, num_tokens=10) == sha
    assert num_commits() == commits

    perturb_experts(model, seed=2)
    with pytest.raises(ValueError, match=r"'round-1' already exists .* other content"):
        push_generalist_to_hub(model, REPO, round=1, num_clients=2, num_tokens=10)
    assert num_commits() == commits  # refused before committing
    assert hub.resolve(REPO, "round-1").sha == sha


def test_generalist_in_a_subfolder_loads_with_subfolder(hub):
    model = build(seed=1)
    push_generalist_to_hub(model, REPO, round=1, path_in_repo="experts/generalist_0")
    assert {"experts/generalist_0/adapter_model.safetensors", "experts/generalist_0/README.md"} <= set(
        HfApi().list_repo_files(REPO, revision="round-1")
    )
    target = build(seed=3)
    load_generalist(target, REPO, revision="round-1", subfolder="experts/generalist_0")
    assert_same(generalist(target), generalist(model))


# ---- model cards ---------------------------------------------------------------------------------------------


def test_card_metadata_round_trips_through_the_hub(hub):
    push_generalist_to_hub(
        build(seed=1),
        REPO,
        round=3,
        num_clients=5,
        num_tokens=12345,
        strategy="comigs",
        eval_results={"perplexity": 17.25},
        base_model_revision="abc1234",
    )
    card = card_at("round-3")
    data = card.data.to_dict()
    assert data["base_model"] == "tiny-base" and data["library_name"] == "peft"
    assert set(data["tags"]) == {"comigs", "federated-learning", "lora", "base_model:adapter:tiny-base"}
    assert data["comigs"] == {
        "expert": "generalist_0",
        "round": 3,
        "num_clients": 5,
        "num_tokens": 12345,
        "strategy": "comigs",
        "base_model_revision": "abc1234",
        "eval_results": {"perplexity": 17.25},
    }
    assert "| perplexity | 17.25 |" in card.text
    assert f'PeftModel.from_pretrained(base, "{REPO}", revision="round-3")' in card.text
    assert f'load_generalist(model, "{REPO}", revision="round-3")' in card.text


def test_card_with_eval_results_writes_a_model_index():
    result = EvalResult(
        task_type="text-generation",
        dataset_type="wikitext",
        dataset_name="WikiText",
        metric_type="perplexity",
        metric_value=9.5,
    )
    card = render_generalist_card(base_model="tiny-base", repo_id=REPO, round=2, eval_results=[result])
    reparsed = ModelCard(str(card))
    assert reparsed.data.eval_results[0].metric_value == 9.5
    assert reparsed.data.to_dict()["model-index"][0]["name"] == "comigs-generalist"


def test_card_of_a_local_base_omits_base_model_metadata():
    card = render_generalist_card(base_model="/checkpoints/base", round=1)
    data = ModelCard(str(card)).data.to_dict()
    assert "base_model" not in data and not any(tag.startswith("base_model:") for tag in data["tags"])
    assert "`/checkpoints/base`" in card.text  # still named in the body


def test_card_templates_live_in_model_cards():
    for name in ("generalist_card.md", "client_model_card.md"):
        path = Path(str(template_path(name)))
        assert path.read_text().startswith("{#") and path.parent.name in ("model_cards", "_model_cards")


# ---- client models -------------------------------------------------------------------------------------------


def test_client_model_push_is_refused_without_confirmation(hub):
    with pytest.raises(ValueError, match="private specialists and routers"):
        push_client_model_to_hub(build(), REPO)
    assert not HfApi().repo_exists(REPO)


@pytest.mark.parametrize("include_base", [None, True])
def test_client_model_push_with_confirmation_warns_and_uploads_model_and_card(hub, caplog, input_ids, include_base):
    model = build(seed=1)
    with caplog.at_level(logging.WARNING, logger="comigs_hf.transports.hub"):
        push_client_model_to_hub(
            model,
            REPO,
            confirm_private_data_publication=True,
            round=4,
            num_clients=3,
            num_tokens=99,
            include_base=include_base,
            license="apache-2.0",
            datasets=["fancyzhx/ag_news", "/private/data.csv"],  # a local path names nothing: left out
        )
    assert any("private specialists" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    files = set(HfApi().list_repo_files(REPO))
    assert {"config.json", "model.safetensors", "README.md", "modeling_comigs.py"} <= files
    data = ModelCard.load(REPO).data.to_dict()
    relation = "finetune" if include_base else "adapter"
    assert data["library_name"] == "transformers" and f"base_model:{relation}:tiny-base" in data["tags"]
    assert data["comigs"]["num_specialists"] == 1 and data["comigs"]["round"] == 4
    assert (data["license"], data["datasets"]) == ("apache-2.0", ["fancyzhx/ag_news"])
    weights = load_file(hf_hub_download(REPO, "model.safetensors"))
    assert ("model.transformer.wte.weight" in weights) is bool(
        include_base
    )  # by default the base is named, not uploaded

    from transformers import AutoModelForCausalLM

    # "tiny-base" is no real repo: the adapter-only upload takes its base from base_model=
    reloaded = AutoModelForCausalLM.from_pretrained(REPO, **({} if include_base else {"base_model": tiny_gpt2()}))
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(input_ids).logits, model(input_ids).logits)


# ---- Hub-mediated rounds -------------------------------------------------------------------------------------


CLIENT_TOKENS = {"alice": 100, "bob": 300, "carol": 600}
# alice and bob alone, as the Hub weighs them: bob's 300 capped at twice the lower median, 2 x 100
TWO_CAPPED = {"alice": 100, "bob": 200}


@pytest.fixture
def clients(hub) -> dict[str, CoMiGSForCausalLM]:
    """A seeded shared repo (global round-1) and one locally trained model per client (not yet submitted)."""
    push_generalist_to_hub(build(seed=0), REPO, round=1)
    return {client: build(seed=10 + i) for i, client in enumerate(CLIENT_TOKENS)}


def weighted_mean(models: dict[str, CoMiGSForCausalLM], tokens: dict[str, int]) -> dict[str, torch.Tensor]:
    """By hand, in float64: sum_i tokens_i * generalist_i / sum_i tokens_i."""
    states = {client: generalist(model) for client, model in models.items()}
    total = sum(tokens[client] for client in models)
    keys = next(iter(states.values())).keys()
    return {key: (sum(tokens[c] * states[c][key].double() for c in models) / total).float() for key in keys}


def global_round(round: int) -> dict[str, torch.Tensor]:
    return load_file(hf_hub_download(REPO, "adapter_model.safetensors", revision=f"round-{round}"))


def test_aggregated_generalist_is_the_token_weighted_mean_of_the_submitted_ones(clients):
    for client, model in clients.items():
        submit_update(model, REPO, client, round=1, num_tokens=CLIENT_TOKENS[client])
    report = aggregate_round(REPO, 1, min_clients=3, timeout_s=5, poll_interval_s=0.05)

    assert report.accepted_clients == ["alice", "bob", "carol"] and report.rejected == ()
    assert [u.weight for u in report.accepted] == pytest.approx([0.1, 0.3, 0.6])
    assert report.num_tokens == 1000 and report.tag == "round-2"
    expected = weighted_mean(clients, CLIENT_TOKENS)
    assert_same(global_round(2), expected)
    # clients start round 2 from it, through the generalist of their own model
    pull_global(clients["alice"], REPO, round=2)
    assert_same(generalist(clients["alice"]), expected)
    stored = json.loads(Path(hf_hub_download(REPO, "aggregation.json", revision="round-2")).read_text())
    assert stored["accepted"][2] == {"client_id": "carol", "num_tokens": 600, "weight": 0.6}
    assert card_at("round-2").data.to_dict()["comigs"]["num_clients"] == 3


def test_aggregator_proceeds_with_the_clients_that_came_after_the_timeout(clients, caplog):
    for client, model in clients.items():  # 4 expected, 3 submit
        submit_update(model, REPO, client, round=1, num_tokens=CLIENT_TOKENS[client])
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="comigs_hf.transports.hub"):
        report = aggregate_round(REPO, 1, min_clients=4, timeout_s=1.0, poll_interval_s=0.2)
    assert time.monotonic() - start >= 1.0
    assert report.accepted_clients == ["alice", "bob", "carol"] and report.min_clients == 4
    assert "3 of 4 expected clients" in caplog.text
    assert_same(global_round(2), weighted_mean(clients, CLIENT_TOKENS))


def test_aggregator_without_any_update_times_out_and_publishes_nothing(clients):
    commits = num_commits()
    with pytest.raises(TimeoutError, match="No valid round 1 update"):
        aggregate_round(REPO, 1, min_clients=2, timeout_s=0.2, poll_interval_s=0.05)
    assert num_commits() == commits and not HfApi().revision_exists(REPO, "round-2")


def _update_files(model: CoMiGSForCausalLM, client_id: str, tmp_path: Path) -> dict[str, bytes]:
    """What `submit_update` uploads for round 1, as bytes to corrupt."""
    folder = tmp_path / f"export-{client_id}"
    export_generalist(model, folder)
    files = {path.name: path.read_bytes() for path in folder.iterdir()}
    update = {"client_id": client_id, "round": 1, "num_tokens": 50, "base_model": "tiny-base"}
    return files | {"update.json": json.dumps(update).encode()}


def _with_first_tensor(files: dict[str, bytes], change) -> dict[str, bytes]:
    state = load(files["adapter_model.safetensors"])
    key = min(state)
    state[key] = change(state[key]).contiguous()
    return files | {"adapter_model.safetensors": save(state)}


def _upload(folder: str, files: dict[str, bytes]) -> None:
    operations = [CommitOperationAdd(f"updates/round-1/{folder}/{name}", data) for name, data in files.items()]
    HfApi().create_commit(REPO, operations=operations, commit_message=f"update {folder}")


def test_each_bad_update_is_rejected_with_its_reason_and_the_valid_ones_are_aggregated(clients, caplog, tmp_path):
    valid = {client: clients[client] for client in ("alice", "bob")}
    for client, model in valid.items():
        submit_update(model, REPO, client, round=1, num_tokens=CLIENT_TOKENS[client])

    def update(folder: str) -> dict[str, bytes]:  # a well-formed update of carol's weights under this client id
        return _update_files(clients["carol"], folder, tmp_path)

    def nan(t: torch.Tensor) -> torch.Tensor:
        return t.index_fill(0, torch.tensor([0]), float("nan"))

    bad = {
        "bad-json": (update("bad-json") | {"update.json": b"{not json"}, r"update\.json is not valid JSON"),
        "missing-file": (
            {k: v for k, v in update("missing-file").items() if k != "adapter_model.safetensors"},
            r"missing adapter_model\.safetensors",
        ),
        "not-lora": (
            update("not-lora") | {"adapter_config.json": b'{"peft_type": "IA3"}'},
            r"not a LoRA adapter .*'IA3'",
        ),
        "unreadable": (
            update("unreadable") | {"adapter_model.safetensors": b"\x07not a safetensors file"},
            r"cannot read adapter_model\.safetensors",
        ),
        "nan": (_with_first_tensor(update("nan"), nan), r"NaN or Inf"),
        "wrong-shape": (
            _with_first_tensor(update("wrong-shape"), lambda t: t[:2]),
            r"wrong shape for .*\(2, 32\), expected \(4, 32\)",
        ),
        "wrong-round": (
            update("wrong-round") | {"update.json": b'{"client_id": "wrong-round", "round": 2, "num_tokens": 50}'},
            r"for round 2, not round 1",
        ),
        "impostor": (update("alice"), r"duplicate: client_id 'alice' already submitted"),
    }
    for folder, (files, _) in bad.items():
        _upload(folder, files)

    with caplog.at_level(logging.WARNING, logger="comigs_hf.transports.hub"):
        report = aggregate_round(REPO, 1, min_clients=2, timeout_s=5, poll_interval_s=0.05)

    assert report.accepted_clients == ["alice", "bob"]
    assert sorted(report.rejected_reasons) == sorted(bad)
    for folder, (_, pattern) in bad.items():
        assert re.search(pattern, report.rejected_reasons[folder]), (folder, report.rejected_reasons[folder])
        assert f"update in updates/round-1/'{folder}': " in caplog.text
    assert_same(global_round(2), weighted_mean(valid, TWO_CAPPED))


def test_hostile_updates_are_rejected_and_never_stop_the_round(clients, tmp_path):
    for client in ("alice", "bob"):
        submit_update(clients[client], REPO, client, round=1, num_tokens=CLIENT_TOKENS[client])

    def update(folder: str, **fields) -> dict[str, bytes]:
        files = _update_files(clients["carol"], folder, tmp_path)
        record = {"client_id": folder, "round": 1, "num_tokens": 50, "base_model": "tiny-base"}
        return files | {"update.json": json.dumps(record | fields).encode()}

    def config(folder: str, **fields) -> dict[str, bytes]:
        files = update(folder)
        return files | {"adapter_config.json": json.dumps(json.loads(files["adapter_config.json"]) | fields).encode()}

    def retyped(folder: str, dtype: torch.dtype, value: float | None = None) -> dict[str, bytes]:
        state = load(update(folder)["adapter_model.safetensors"])
        state = {
            k: v.to(dtype) if value is None else torch.full(v.shape, value, dtype=dtype) for k, v in state.items()
        }
        return update(folder) | {"adapter_model.safetensors": save(state)}

    deep = b"[" * 200_000 + b"]" * 200_000
    unclosed = b'"' + b'\\"' * 400_000  # 800 kB of one unterminated string: linear time, not quadratic
    hostile = {
        "tokens-10e400": (
            update("tokens-10e400", num_tokens=10**400),
            r"num_tokens must be an integer in \[1, 2\*\*53\]",
        ),
        "digits-5000": (
            update("digits-5000") | {"update.json": b'{"num_tokens": 1' + b"0" * 5000 + b"}"},
            r"update\.json is not valid JSON",
        ),
        "deep-update": (
            update("deep-update") | {"update.json": deep},
            r"update\.json is nested more than 16 levels deep",
        ),
        "deep-config": (update("deep-config") | {"adapter_config.json": deep}, r"adapter_config\.json is nested"),
        "unclosed-string": (update("unclosed-string") | {"update.json": unclosed}, r"update\.json is not valid JSON"),
        "mixed-targets": (config("mixed-targets", target_modules=[1, "a"]), r"target_modules must be a string or"),
        "string-alpha": (config("string-alpha", lora_alpha="16"), r"lora_alpha must be a number in \(0, 1e6\]"),
        "list-config": (update("list-config") | {"adapter_config.json": b"[]"}, r"is a JSON list, not an object"),
        "not-utf8": (update("not-utf8") | {"adapter_config.json": b"\xff\xfe{}"}, r"is not UTF-8"),
        "float8": (retyped("float8", torch.float8_e4m3fn), r"is torch\.float8_e4m3fn, not a float16"),
        "float64-1e300": (
            retyped("float64-1e300", torch.float64, 1e300),
            r"dtype torch\.float64, expected torch\.float32",
        ),
        "bfloat16": (retyped("bfloat16", torch.bfloat16), r"dtype torch\.bfloat16, expected torch\.float32"),
        "finite-3e38": (retyped("finite-3e38", torch.float32, 3e38), r"holds values beyond \+-10000"),
        "id-newline": (update("id-newline", client_id="client-0000\n"), r"client_id is not a client id"),
    }
    for folder, (files, _) in hostile.items():
        _upload(folder, files)

    report = aggregate_round(REPO, 1, min_clients=2, timeout_s=5, poll_interval_s=0.05)
    assert report.accepted_clients == ["alice", "bob"]
    assert sorted(report.rejected_reasons) == sorted(hostile)
    for folder, (_, pattern) in hostile.items():
        assert re.search(pattern, report.rejected_reasons[folder]), (folder, report.rejected_reasons[folder])
    assert_same(global_round(2), weighted_mean({c: clients[c] for c in ("alice", "bob")}, TWO_CAPPED))


def test_self_reported_token_counts_are_capped_at_twice_the_median(hub):
    push_generalist_to_hub(build(seed=0), REPO, round=1)
    for i in range(4):
        submit_update(build(seed=20 + i), REPO, f"honest-{i}", round=1, num_tokens=100)
    submit_update(build(seed=30), REPO, "mallory", round=1, num_tokens=100 * 100)
    report = aggregate_round(REPO, 1, min_clients=5, timeout_s=5, poll_interval_s=0.05)
    weights = {update.client_id: update.weight for update in report.accepted}
    assert weights["mallory"] == pytest.approx(2 / 6)  # not 100 / 104


@pytest.mark.parametrize(
    ("rule", "influence"),
    [
        ({}, 0.2),  # the weighted mean gives it its share: the global moves by 0.2 x 50 = 10 honest updates
        ({"aggregation": "trimmed_mean", "aggregation_kwargs": {"trim_ratio": 0.2}}, 0.0),
        ({"max_update_norm": 20.0}, 0.0),  # refused: honest updates lie ~5 from the global here, mallory's ~250
    ],
    ids=["weighted-mean", "trimmed-mean", "norm-bound"],
)
def test_a_scaled_update_is_held_by_the_robust_rules(hub, tmp_path, rule, influence):
    seed = build(seed=0)
    push_generalist_to_hub(seed, REPO, round=1)
    start = generalist(seed)
    honest = [generalist(build(seed=20 + i)) for i in range(4)]
    for i in range(4):
        submit_update(build(seed=20 + i), REPO, f"honest-{i}", round=1, num_tokens=100)
    files = _update_files(build(seed=30), "mallory", tmp_path)
    sent = load(files["adapter_model.safetensors"])
    scaled = {key: (start[key] + 50 * (value - start[key])).contiguous() for key, value in sent.items()}
    record = {"client_id": "mallory", "round": 1, "num_tokens": 100, "base_model": "tiny-base"}  # honest count
    _upload("mallory", files | {"adapter_model.safetensors": save(scaled), "update.json": json.dumps(record).encode()})

    report = aggregate_round(
        REPO, 1, min_clients=5, timeout_s=5, poll_interval_s=0.05, strategy=get_strategy("comigs", **rule)
    )
    flat = {
        name: torch.cat([state[k].flatten() for k in sorted(start)])
        for name, state in {"global": global_round(2), "attacker": scaled}.items()
    }
    mean = torch.cat([sum(h[k] for h in honest).flatten() / 4 for k in sorted(start)])
    away = flat["attacker"] - mean
    measured = float((flat["global"] - mean) @ away / (away @ away))
    if "mallory" in report.accepted_clients:
        assert measured == pytest.approx(influence, abs=0.005)
    else:  # the global is the honest clients' own mean
        assert "exceeds 20.0" in report.rejected_reasons["mallory"] and abs(measured) < 1e-6


@pytest.mark.parametrize(
    "race_at",
    ["_untagged_publication", "_create_tag"],
    ids=["other-commits-first", "other-comes-between-commit-and-tag"],
)
def test_of_two_racing_aggregators_exactly_one_publishes_and_main_matches_the_tag(clients, monkeypatch, race_at):
    from comigs_hf.transports.hub import aggregator

    for client, model in clients.items():
        submit_update(model, REPO, client, round=1, num_tokens=CLIENT_TOKENS[client])
    real, other = getattr(aggregator, race_at), []

    def racing(*args, **kwargs):  # the first aggregator pauses here while a second one runs to the end
        if not other:
            other.append(None)
            other[0] = aggregate_round(REPO, 1, min_clients=3, timeout_s=5, poll_interval_s=0.05, strategy=uniform)
        return real(*args, **kwargs)

    uniform = get_strategy("comigs", weighting="uniform")  # the second one computes another global
    monkeypatch.setattr(aggregator, race_at, racing)
    first = aggregate_round(REPO, 1, min_clients=3, timeout_s=5, poll_interval_s=0.05)
    assert first == other[0] and first.commit_sha == other[0].commit_sha
    refs = HfApi().list_repo_refs(REPO)
    head = next(ref.target_commit for ref in refs.branches if ref.name == "main")
    assert next(ref.target_commit for ref in refs.tags if ref.name == "round-2") == head == first.commit_sha
    titles = [commit.title for commit in HfApi().list_repo_commits(REPO)]
    assert sum(title.startswith("Global generalist after round 1") for title in titles) == 1
    expected_weights = [1 / 3] * 3 if race_at == "_untagged_publication" else [0.1, 0.3, 0.6]
    assert [u.weight for u in first.accepted] == pytest.approx(expected_weights)  # whoever committed first


def test_rate_limits_and_server_errors_are_retried_with_backoff(clients, hub, monkeypatch, caplog):
    from comigs_hf.transports.hub import repo

    monkeypatch.setattr(repo, "RETRY_DELAYS_S", (0.01, 0.02, 0.04))
    hub.faults += [("POST", r"/commit/main$", 429), ("POST", r"/commit/main$", 503)]  # the first submit's
    submit_update(clients["alice"], REPO, "alice", round=1, num_tokens=100)
    hub.faults += [("POST", r"/commit/main$", 502), ("POST", r"/tag/", 429)]  # the aggregator's commit and tag
    with caplog.at_level(logging.WARNING, logger="comigs_hf.transports.hub"):
        report = aggregate_round(REPO, 1, min_clients=1, timeout_s=5, poll_interval_s=0.05)
    assert hub.faults == [] and report.accepted_clients == ["alice"]
    assert HfApi().revision_exists(REPO, "round-2")
    assert "the Hub answered 502; trying again" in caplog.text and "the Hub answered 429" in caplog.text


def test_expected_shapes_stand_in_for_a_missing_global_round(hub):
    models = {"alice": build(seed=1), "bob": build(seed=2), "rank-8": build(seed=3, lora_r=8)}
    HfApi().create_repo(REPO)
    for client, model in models.items():
        submit_update(model, REPO, client, round=1, num_tokens=10)
    shapes = {key: tuple(value.shape) for key, value in generalist(models["alice"]).items()}
    report = aggregate_round(REPO, 1, min_clients=2, timeout_s=2, poll_interval_s=0.05, expected_shapes=shapes)
    assert report.accepted_clients == ["alice", "bob"] and "wrong shape" in report.rejected_reasons["rank-8"]
    assert report.previous_commit is None


def test_reaggregating_a_finished_round_commits_nothing_and_returns_its_report(clients, tmp_path):
    for client, model in clients.items():
        submit_update(model, REPO, client, round=1, num_tokens=CLIENT_TOKENS[client])
    first = aggregate_round(REPO, 1, min_clients=3, timeout_s=5, poll_interval_s=0.05)
    commits = num_commits()
    with pytest.raises(ValueError, match="Round 1 of .* is closed: round-2 is published"):
        submit_update(build(seed=42), REPO, "late", round=1, num_tokens=10_000)  # too late for round 1
    _upload("late", _update_files(build(seed=42), "late", tmp_path))  # past the check, as an attacker would
    commits += 1
    again = aggregate_round(REPO, 1, min_clients=1, timeout_s=0, poll_interval_s=0.05)
    assert num_commits() == commits
    assert again == first and again.commit_sha == first.commit_sha
    assert_same(global_round(2), weighted_mean(clients, CLIENT_TOKENS))


def test_submit_refuses_a_client_id_that_is_not_a_folder_name(hub):
    with pytest.raises(ValueError, match="client_id"):
        submit_update(build(), REPO, "../alice", round=1, num_tokens=10)
    with pytest.raises(ValueError, match="num_tokens"):
        submit_update(build(), REPO, "alice", round=1, num_tokens=0)


# ---- authentication ------------------------------------------------------------------------------------------


def test_token_is_sent_on_every_write_and_never_logged_or_printed(tmp_path, monkeypatch, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    with LocalHub(token=TOKEN) as hub:
        configure_hf_client(monkeypatch, hub.url, tmp_path / "hf_home")
        with pytest.raises(HfHubHTTPError):  # the server enforces the token: anonymous pushes fail
            push_generalist_to_hub(build(seed=0), REPO, round=1)
        push_generalist_to_hub(build(seed=0), REPO, round=1, token=TOKEN)
        monkeypatch.setenv("HF_TOKEN", TOKEN)  # token=None: the standard HF_TOKEN / login
        submit_update(build(seed=1), REPO, "alice", round=1, num_tokens=10)
        submit_update(build(seed=2), REPO, "bob", round=1, num_tokens=10, token=TOKEN)
        aggregate_round(REPO, 1, min_clients=2, timeout_s=2, poll_interval_s=0.05)
        push_client_model_to_hub(build(seed=1), "local-user/client", confirm_private_data_publication=True)
        assert hub.unhandled == []

    writes = [r for r in hub.requests if r.method in ("POST", "PUT", "DELETE")]
    anonymous = [r for r in writes if r.authorization is None]
    assert len(anonymous) == 1 and anonymous[0] is writes[0]  # only the refused first attempt
    assert all(r.authorization == f"Bearer {TOKEN}" for r in writes[1:])
    captured = capsys.readouterr()
    logged = caplog.text + "".join(str(r.args) for r in caplog.records)
    assert caplog.records  # the capture is live: the client and comigs_hf did log
    for text in (logged, captured.out, captured.err):
        assert TOKEN not in text and TOKEN[3:15] not in text


# ---- the federation's manifest: who counts, whose commits count -------------------------------------------------
TOKENS = {
    "hf_coordinatorToken0001": "coordinator",
    "hf_aliceToken000000001": "alice",
    "hf_bobToken00000000001": "bob",
    "hf_malloryToken0000001": "mallory",
}
TOKEN_OF = {user: token for token, user in TOKENS.items()}


@pytest.fixture
def accounts(monkeypatch, tmp_path) -> Iterator[LocalHub]:
    """A local Hub with four accounts; each commit is authored by the account whose token made it."""
    with LocalHub(users=TOKENS) as hub:
        configure_hf_client(monkeypatch, hub.url, tmp_path / "hf_home")
        yield hub


def test_only_the_manifest_s_clients_count_towards_the_quorum(hub, tmp_path):
    manifest = FederationManifest(("alice", "bob"))
    seed_hub_rounds(
        build(seed=0), generalist_state_of(build(seed=0)), REPO, strategy=get_strategy("comigs"), manifest=manifest
    )
    submit_update(build(seed=10), REPO, "alice", round=1, num_tokens=100)
    for sybil in ("sybil-1", "sybil-2"):
        submit_update(build(seed=11), REPO, sybil, round=1, num_tokens=100)
    report = aggregate_round(REPO, 1, min_clients=2, timeout_s=0.3, poll_interval_s=0.05)
    assert report.accepted_clients == ["alice"]  # the quorum of 2 was not met by the Sybils: it timed out
    assert all("is not a client of this federation" in report.rejected_reasons[s] for s in ("sybil-1", "sybil-2"))


def test_other_writers_cannot_overwrite_delete_or_forge_what_the_manifest_s_users_committed(accounts, tmp_path):
    manifest = FederationManifest(("alice", "bob"), "coordinator", {"alice": "alice", "bob": "bob"})
    seed = build(seed=0)
    seed_sha = seed_hub_rounds(
        seed,
        generalist_state_of(seed),
        REPO,
        strategy=get_strategy("comigs"),
        manifest=manifest,
        token=TOKEN_OF["coordinator"],
    )
    honest = {"alice": build(seed=10), "bob": build(seed=11)}
    for client, model in honest.items():
        submit_update(model, REPO, client, round=1, num_tokens=CLIENT_TOKENS[client], token=TOKEN_OF[client])
    mallory = TOKEN_OF["mallory"]
    api = HfApi()
    # bob's folder overwritten with mallory's weights, alice's deleted, a fake round-2 tagged with a fake report
    forged = _update_files(build(seed=66), "bob", tmp_path)
    api.create_commit(
        REPO,
        operations=[CommitOperationAdd(f"updates/round-1/bob/{n}", d) for n, d in forged.items()],
        commit_message="Round 1 update from bob",
        token=mallory,
    )
    api.create_commit(
        REPO, operations=[CommitOperationDelete("updates/round-1/alice/")], commit_message="cleanup", token=mallory
    )
    fake = api.create_commit(
        REPO,
        operations=[CommitOperationAdd("aggregation.json", b'{"round": 1}')],
        commit_message="Global generalist after round 1 (9 clients)",
        token=mallory,
    )
    api.create_tag(REPO, tag="round-2", revision=fake.oid, token=mallory)

    report = aggregate_round(REPO, 1, min_clients=2, timeout_s=5, poll_interval_s=0.05, token=TOKEN_OF["coordinator"])
    assert report.accepted_clients == ["alice", "bob"]
    assert_same(global_round(2), weighted_mean(honest, TWO_CAPPED))  # mallory's writes changed nothing
    assert report.commit_sha != fake.oid

    # a client trusts round-2 only on the aggregator's commit publishing round 1: mallory moving the tag onto her
    # own commit, or back onto the aggregator's seed commit (a rollback), is refused
    manifest_read = read_manifest(api, REPO, None)
    for target, message in [
        (fake.oid, "by 'mallory', not by the federation's"),
        (seed_sha, "does not publish round 1"),
    ]:
        api.delete_tag(REPO, tag="round-2", token=mallory)
        api.create_tag(REPO, tag="round-2", revision=target, token=mallory)
        with pytest.raises(ForgedRound, match=f"round-2 of .* points at commit {target}.* {message}"):
            trusted_round_commit(api, REPO, 2, manifest_read, None)
    with pytest.raises(ValueError, match="published by the Hub user 'coordinator'.* this token belongs to 'mallory'"):
        aggregate_round(REPO, 2, min_clients=1, timeout_s=0, token=mallory)


# ---- an aggregator killed at several points --------------------------------------------------------------------
def _cli_process(*arguments: str) -> subprocess.Popen:
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-c", "from comigs_hf.cli import main; raise SystemExit(main())", *arguments]
    env = {**os.environ, "PYTHONPATH": str(root)}  # the local Hub's endpoint is in the environment already
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["waiting-for-the-quorum", "between-commit-and-tag"])
def test_an_aggregator_killed_mid_round_is_completed_by_the_next_run(clients, hub, point):
    for client, model in clients.items():
        submit_update(model, REPO, client, round=1, num_tokens=CLIENT_TOKENS[client])
    commits = num_commits()
    if point == "between-commit-and-tag":
        hub.faults.append(("POST", r"/tag/", 0))  # the tag request is held until the process is dead
        process = _cli_process("aggregate", REPO, "--round", "1", "--min-clients", "3", "--timeout", "60")
        assert hub.held.wait(timeout=120)
    else:  # a fourth client never comes: it polls
        process = _cli_process("aggregate", REPO, "--round", "1", "--min-clients", "4", "--timeout", "60")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any("/tree/" in r.path for r in hub.requests):
            time.sleep(0.05)
    process.kill()
    process.wait()
    hub.release.set()
    assert not HfApi().revision_exists(REPO, "round-2")
    killed_head = HfApi().list_repo_refs(REPO).branches[0].target_commit
    assert num_commits() == commits + (point == "between-commit-and-tag")

    # the next run would compute another global (uniform weights): what the killed run committed stands
    uniform = get_strategy("comigs", weighting="uniform")
    report = aggregate_round(REPO, 1, min_clients=3, timeout_s=5, poll_interval_s=0.05, strategy=uniform)
    assert report.accepted_clients == ["alice", "bob", "carol"]
    assert num_commits() == commits + 1  # the killed run's commit is adopted, not committed over
    assert HfApi().list_repo_refs(REPO).branches[0].target_commit == report.commit_sha
    if point == "between-commit-and-tag":
        assert report.commit_sha == killed_head
        assert_same(global_round(2), weighted_mean(clients, CLIENT_TOKENS))
    else:
        assert_same(global_round(2), weighted_mean(clients, dict.fromkeys(CLIENT_TOKENS, 1)))
