"""Evaluation: the full split and the paper protocol on hand-computed cases, the out-of-distribution mixture, and
the figures every evaluated round reports (before and after aggregation, in and out of distribution)."""

from __future__ import annotations

import math

import pytest
import torch
from accelerate import Accelerator
from conftest import VOCAB, perturb_experts, tiny_gpt2
from federated_setup import tiny_overrides

from comigs_hf import CoMiGSForCausalLM
from comigs_hf.config import load_config
from comigs_hf.data import ClientData, interleave_blocks, mixed_test_blocks, mixed_test_splits, pool_client_data
from comigs_hf.evaluation import (
    EvaluationConfig,
    check_paper_protocol,
    evaluate_client,
    evaluate_full_split,
    evaluate_random_windows,
)
from comigs_hf.recipe import run

ACCELERATOR = Accelerator(cpu=True)
BLOCKS = torch.randint(1, VOCAB, (6, 12), generator=torch.Generator().manual_seed(3))


def model(seed: int = 0) -> CoMiGSForCausalLM:
    built = CoMiGSForCausalLM.from_base(tiny_gpt2(seed), num_specialists=1, lora_r=4, top_k=2)
    perturb_experts(built, seed=seed)
    return built.eval()


def test_a_model_with_uniform_logits_has_the_vocabulary_size_as_perplexity_under_both_protocols():
    uniform = model()
    torch.nn.init.zeros_(uniform.get_output_embeddings().weight)  # every next token gets probability 1/V
    cfg = EvaluationConfig(batch_size=4, paper_batches=3, paper_batch_size=5)
    assert evaluate_full_split(uniform, BLOCKS, cfg, ACCELERATOR)["test_ppl"] == pytest.approx(VOCAB, rel=1e-5)
    paper = evaluate_random_windows(uniform, BLOCKS, cfg, ACCELERATOR, seed=0)
    assert paper["paper_test_ppl"] == pytest.approx(VOCAB, rel=1e-5)


def test_the_paper_protocol_is_the_reference_codes_get_batch_and_mean_batch_loss():
    held, cfg = model(), EvaluationConfig(batch_size=2, paper_batches=4, paper_batch_size=3)
    paper = evaluate_random_windows(held, BLOCKS, cfg, ACCELERATOR, seed=11)
    # the reference's loop: ix = randint(len(data) - L); x = data[i:i+L]; y = data[i+1:i+1+L]; loss per batch
    data, length, generator = BLOCKS.flatten(), BLOCKS.shape[1], torch.Generator().manual_seed(11)
    losses = []
    for _ in range(4):
        ix = torch.randint(len(data) - length, (3,), generator=generator)
        x = torch.stack([data[i : i + length] for i in ix])
        y = torch.stack([data[i + 1 : i + 1 + length] for i in ix])
        with torch.no_grad():
            logits = held(x).logits
        losses.append(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()).item())
    assert paper["paper_test_loss"] == pytest.approx(sum(losses) / 4, rel=1e-5)
    assert paper["paper_test_ppl"] == pytest.approx(math.exp(sum(losses) / 4), rel=1e-5)
    # e^(mean batch loss) is not the perplexity of the tokens it saw: the two protocols are different figures
    assert paper["paper_test_ppl"] != pytest.approx(evaluate_full_split(held, BLOCKS, cfg, ACCELERATOR)["test_ppl"])


def test_the_paper_windows_follow_the_seed():
    held, cfg = model(), EvaluationConfig(batch_size=4, paper_batches=2, paper_batch_size=4)
    same = [evaluate_random_windows(held, BLOCKS, cfg, ACCELERATOR, seed=5)["paper_test_loss"] for _ in range(2)]
    other = evaluate_random_windows(held, BLOCKS, cfg, ACCELERATOR, seed=6)["paper_test_loss"]
    assert same[0] == same[1] != other


def test_the_mixed_test_split_takes_as_many_blocks_from_every_client_interleaved():
    sizes = [3, 2, 4]
    clients = [
        ClientData(f"c{i}", torch.zeros(1, 2), torch.zeros(1, 2), torch.full((n, 2), i)) for i, n in enumerate(sizes)
    ]
    assert [split.shape[0] for split in mixed_test_splits(clients)] == [2, 2, 2]
    mixed = mixed_test_blocks(clients)
    assert mixed[:, 0].tolist() == [0, 1, 2, 0, 1, 2]
    pooled = pool_client_data(clients)
    assert (pooled.name, pooled.train.shape[0], pooled.validation.shape[0]) == ("pooled", 3, 3)
    assert torch.equal(pooled.test, mixed)


def test_out_of_distribution_figures_are_those_of_the_mixture_and_no_window_crosses_clients():
    held, cfg = model(), EvaluationConfig(batch_size=3, paper_batches=3, paper_batch_size=4)
    splits = [torch.full((2, 12), 5), torch.full((2, 12), 7)]  # two clients whose text cannot be confused
    windows = []
    held.register_forward_pre_hook(lambda module, args: windows.append(args[0]))
    metrics = evaluate_client(held, BLOCKS, cfg, ACCELERATOR, seed=1, mixed_test=splits)
    alone = evaluate_full_split(held, interleave_blocks(splits), cfg, ACCELERATOR)
    assert metrics["ood_test_ppl"] == alone["test_ppl"]
    paper_windows = [w for w in windows if w.shape[1] == 12 and set(w.unique().tolist()) <= {5, 7}]
    assert paper_windows and all(len(set(row.tolist())) == 1 for w in paper_windows for row in w)
    assert {row[0].item() for w in paper_windows for row in w} == {5, 7}  # both clients drawn
    assert "ood_routing" not in metrics and "routing" in metrics


def test_a_test_split_too_short_for_one_window_is_refused_naming_the_client():
    with pytest.raises(ValueError, match=r"Client 'tiny' has 1 test block\(s\) of 12 tokens"):
        check_paper_protocol([BLOCKS[:1]], ["tiny"], EvaluationConfig())
    check_paper_protocol([BLOCKS[:1]], ["tiny"], EvaluationConfig(paper_batches=0))  # no windows, no need


# ---- what the rounds report ---------------------------------------------------------------------------------------

FIGURES = ["test_ppl", "paper_test_ppl", "ood_test_ppl", "ood_paper_test_ppl"]


def run_tiny(world, tmp_path, **extra):
    cfg = load_config(None, tiny_overrides(*world, tmp_path / "out", save_models=False, rounds=2, **extra))
    return run(cfg, Accelerator(cpu=True)), cfg


def test_every_round_reports_every_figure_before_and_after_aggregation(world, tmp_path):
    results, _ = run_tiny(world, tmp_path)
    for client in results["clients"]:
        for figure in FIGURES:
            assert client[figure] > 1 and client[f"{figure}_before_aggregation"] > 1
        # comigs averages the generalist: after aggregation the client holds another model
        assert client["test_ppl"] != client["test_ppl_before_aggregation"]
    assert results["mean_ood_test_ppl"] == pytest.approx(sum(c["ood_test_ppl"] for c in results["clients"]) / 4)
    rows = (tmp_path / "out" / "curves.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 4 and "ood_paper_test_ppl_before_aggregation" in rows[0]


def test_without_sharing_the_figures_before_and_after_aggregation_are_the_same(world, tmp_path):
    results, _ = run_tiny(world, tmp_path, strategy="local")
    for client in results["clients"]:
        assert all(client[figure] == client[f"{figure}_before_aggregation"] for figure in FIGURES)


def test_the_centralised_baseline_trains_one_model_on_every_clients_data(world, tmp_path):
    results, _ = run_tiny(world, tmp_path / "pooled", strategy="centralized")
    separate, _ = run_tiny(world, tmp_path / "local", strategy="local")
    total = sum(c["train_tokens"] for c in separate["clients"])
    assert all(c["train_tokens"] == total and c["bytes_sent"] == 0 for c in results["clients"])
    # one model: its figure on the mixture of all test splits is the same for every client
    assert len({c["ood_test_ppl"] for c in results["clients"]}) == 1
    assert len({c["test_ppl"] for c in results["clients"]}) == 4
