"""The `comigs` command, run in-process on saved tiny models and against `LocalHub` for the Hub subcommands."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch
from conftest import perturb_experts, tiny_gpt2
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, hf_hub_download
from safetensors.torch import load_file

from comigs_hf import CoMiGSForCausalLM
from comigs_hf.adapters import generalist_state_dict
from comigs_hf.cli import main
from comigs_hf.commands import summarize

try:  # default pytest import mode: `tests/` (no __init__.py) is on sys.path
    from hub_server import LocalHub, configure_hf_client
except ImportError:  # `tests` made a package, or --import-mode=importlib
    from tests.hub_server import LocalHub, configure_hf_client

REPO = "local-user/comigs-cli"
TOKEN = "hf_cliSecretTokenValue9876543210"


def build(seed: int = 0) -> CoMiGSForCausalLM:
    model = CoMiGSForCausalLM.from_base(
        tiny_gpt2(),
        num_generalists=1,
        num_specialists=2,
        lora_r=4,
        lora_alpha=8,
        top_k=2,
        base_model_name_or_path="tiny-base",
    )
    perturb_experts(model, seed=seed)
    return model.eval()


@pytest.fixture
def saved(tmp_path):
    """Save a tiny CoMiGS model (experts seeded with `seed`) and return its folder: a full checkpoint, since its base
    ("tiny-base") cannot be loaded by name."""

    def save(seed: int = 0, name: str = "model"):
        build(seed).save_pretrained(tmp_path / name, include_base=True)
        return tmp_path / name

    return save


def generalist_of(directory) -> dict[str, torch.Tensor]:
    return generalist_state_dict(CoMiGSForCausalLM.from_pretrained(directory))


def assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, msg=key)


def test_export_writes_the_generalist_as_a_peft_adapter(saved, tmp_path):
    model_dir = saved(seed=1)
    assert main(["export", str(model_dir), str(tmp_path / "adapter")]) == 0
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert_same(load_file(tmp_path / "adapter" / "adapter_model.safetensors"), generalist_of(model_dir))


def test_inspect_prints_experts_roles_and_their_parameter_counts(saved, capsys):
    model_dir = saved()
    assert main(["inspect", str(model_dir)]) == 0
    out = capsys.readouterr().out
    assert "generalist_0, specialist_0, specialist_1 (top-2 per token)" in out
    assert "tiny-base (gpt2)" in out and "mlp.c_fc, mlp.c_proj" in out
    counts = summarize(CoMiGSForCausalLM.from_pretrained(model_dir))["parameters"]
    assert counts["specialist"] == 2 * counts["generalist"] > 0
    for role in ("generalist", "specialist", "router", "base"):
        assert f"{counts[role]:,}" in out

    assert main(["inspect", str(model_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"] == counts


def test_push_then_pull_loads_round_1_into_a_saved_model_and_resaves_it(local_hub, saved, capsys):
    first, second, target = saved(seed=1, name="first"), saved(seed=2, name="second"), saved(seed=3, name="target")
    card = ["--license", "apache-2.0", "--dataset", "fancyzhx/ag_news"]
    assert main(["push", str(first), REPO, "--round", "1", "--num-clients", "3", "--num-tokens", "42", *card]) == 0
    data = ModelCard.load(hf_hub_download(REPO, "README.md", revision="round-1")).data.to_dict()
    assert (data["license"], data["datasets"]) == ("apache-2.0", ["fancyzhx/ag_news"])
    assert main(["push", str(second), REPO, "--round", "2"]) == 0
    assert "tag round-2" in capsys.readouterr().out
    assert sorted(t.name for t in HfApi().list_repo_refs(REPO).tags) == ["round-1", "round-2"]

    assert main(["pull", str(target), REPO, "--round", "1"]) == 0
    assert_same(generalist_of(target), generalist_of(first))
    private = CoMiGSForCausalLM.from_pretrained(target).role_state_dict("specialist", "router")
    assert_same(private, build(seed=3).role_state_dict("specialist", "router"))  # only the generalist changed


def seed_and_submit(saved, tokens: dict[str, int]) -> None:
    """Round 1 of a Hub federation through the CLI: a seed pushed as round-1, one submit per client."""
    assert main(["push", str(saved(seed=0, name="seed")), REPO, "--round", "1"]) == 0
    for i, (client, count) in enumerate(tokens.items()):
        arguments = ["--client-id", client, "--round", "1", "--num-tokens", str(count)]
        assert main(["submit", str(saved(seed=10 + i, name=client)), REPO, *arguments]) == 0


def aggregate(min_clients: int, *extra: str) -> int:
    command = f"aggregate {REPO} --round 1 --min-clients {min_clients} --timeout 5 --poll-interval 0.05"
    return main([*command.split(), *extra])


def test_submit_and_aggregate_run_a_hub_round(local_hub, saved, capsys):
    seed_and_submit(saved, {"alice": 100, "bob": 300})
    capsys.readouterr()
    assert aggregate(2, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert [u["client_id"] for u in report["accepted"]] == ["alice", "bob"] and report["tag"] == "round-2"
    assert HfApi().revision_exists(REPO, "round-2")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["export", "{missing}", "{out}"], "argument model: .* is not a directory"),
        (["export", "{model}", "{out}", "--index", "1"], "argument --index: generalist 1 does not exist"),
        (["export", "{model}", "{out}", "--index", "-1"], "argument --index: expected a non-negative integer"),
        (["push", "{model}", "{repo}", "--round", "0"], "argument --round: expected a positive integer, got 0"),
        (["push", "{model}", "not a repo id!"], "argument repo_id: not a Hub repo id"),
        (["pull", "{model}", "{repo}"], "one of the arguments --round --revision is required"),
        (
            ["submit", "{model}", "{repo}", "--client-id", "../x", "--round", "1", "--num-tokens", "5"],
            "argument --client-id: `client_id` must be",
        ),
        (["aggregate", "{repo}", "--round", "1", "--min-clients", "0"], "argument --min-clients: expected a positive"),
        (
            ["aggregate", "{repo}", "--round", "1", "--min-clients", "1", "--poll-interval", "0"],
            "argument --poll-interval: expected a positive number of seconds",
        ),
        (["frobnicate"], "argument COMMAND: invalid choice: 'frobnicate'"),
    ],
)
def test_bad_input_exits_2_naming_the_argument(saved, tmp_path, capsys, arguments, message):
    values = {"missing": str(tmp_path / "missing"), "out": str(tmp_path / "out"), "repo": REPO}
    if any("{model}" in a for a in arguments):
        values["model"] = str(saved())
    with pytest.raises(SystemExit) as exit_info:
        main([a.format(**values) for a in arguments])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_pulling_a_round_that_does_not_exist_exits_2_naming_round(local_hub, saved, capsys):
    model_dir = saved()
    assert main(["push", str(model_dir), REPO, "--round", "1"]) == 0
    with pytest.raises(SystemExit) as exit_info:
        main(["pull", str(model_dir), REPO, "--round", "7"])
    assert exit_info.value.code == 2 and "argument --round: 'round-7' does not exist" in capsys.readouterr().err


def test_run_hands_its_arguments_to_the_recipe_parser(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "run" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--help"])
    assert exit_info.value.code == 0 and "--config" in capsys.readouterr().out


def test_aggregate_uses_the_recipe_s_rule(local_hub, saved, tmp_path, capsys):
    seed_and_submit(saved, {"alice": 100, "bob": 200, "carol": 300})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("aggregation: trimmed_mean\naggregation_kwargs: {trim_ratio: 0.34}\n")
    capsys.readouterr()
    assert aggregate(3, "--config", str(recipe)) == 0
    assert "aggregated (trimmed_mean) into round-2" in capsys.readouterr().out
    # three clients, one cut from each end: the coordinate-wise median
    states = [generalist_of(saved(seed=10 + i, name=f"again-{i}")) for i in range(3)]
    median = {key: torch.stack([state[key] for state in states]).median(dim=0).values for key in states[0]}
    pulled = load_file(hf_hub_download(REPO, "adapter_model.safetensors", revision="round-2"))
    assert_same(pulled, median)


def test_aggregate_prints_other_parties_folder_names_as_escapes(local_hub, saved, capsys):
    seed_and_submit(saved, {"alice": 100})
    hostile = "\x1b[2Jcl\u0456ent"  # an ANSI clear-screen and a Cyrillic look-alike of "i"
    operation = CommitOperationAdd(f"updates/round-1/{hostile}/update.json", b"{}")
    HfApi().create_commit(REPO, operations=[operation], commit_message="hostile folder")
    capsys.readouterr()
    assert aggregate(1) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\u0456" not in out
    assert "rejected '\\x1b[2Jcl\\u0456ent': missing adapter_config.json." in out


def test_cli_authenticates_from_hf_token_and_never_prints_it(saved, tmp_path, monkeypatch, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    model_dir = saved()
    with LocalHub(token=TOKEN) as hub:
        configure_hf_client(monkeypatch, hub.url, tmp_path / "hf_home")
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        assert main(["push", str(model_dir), REPO, "--round", "1"]) == 0
        assert main(["submit", str(model_dir), REPO, "--client-id", "alice", "--round", "1", "--num-tokens", "9"]) == 0
        assert main(["aggregate", REPO, "--round", "1", "--min-clients", "1", "--timeout", "2"]) == 0
        assert main(["pull", str(model_dir), REPO, "--round", "2"]) == 0
    assert all(r.authorization == f"Bearer {TOKEN}" for r in hub.requests if r.method == "POST")
    captured = capsys.readouterr()
    assert "round-2" in captured.out
    for text in (captured.out, captured.err, caplog.text):
        assert TOKEN not in text
