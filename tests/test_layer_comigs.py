"""The mixture computes what the CoMiGS reference code's per-expert loop computes, in both of its pair layouts.

The reference (`benchmarks/reference_loop.py`) runs every expert as a full MLP copy with its LoRA on the tokens that
chose it (`torch.where`) and accumulates the weighted outputs; the mixture runs the base once per token and lays the
token/expert pairs out grouped by expert (training-sized batches) or in token order with gathered factors (decoding).
Both must give the reference's logits, loss and every gradient in float32.
"""

import copy
import sys
from pathlib import Path

import pytest
import torch
from conftest import BASES, VOCAB, tiny_llama

import comigs_hf.layer_comigs as layer_comigs
from comigs_hf import CoMiGSForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from reference_loop import use_reference_loop  # noqa: E402

# (GATHER_MAX_PAIRS, GROUPED_MM): every routing grouped by expert, run by torch's grouped matmul or by a loop over
# the experts, or every routing in token order with gathered factors
LAYOUTS = {"grouped-matmul": (0, True), "grouped-loop": (0, False), "gathered": (10**9, False)}


def use_layout(monkeypatch, layout: str) -> None:
    threshold, grouped_mm = LAYOUTS[layout]
    if grouped_mm and not layer_comigs.GROUPED_MM:
        pytest.skip("this torch has no torch.nn.functional.grouped_mm")
    monkeypatch.setattr(layer_comigs, "GATHER_MAX_PAIRS", threshold)
    monkeypatch.setattr(layer_comigs, "GROUPED_MM", grouped_mm)


def _trained_looking(make_base, **kwargs) -> CoMiGSForCausalLM:
    options = dict(num_generalists=1, num_specialists=3, lora_r=4, lora_alpha=8, router_aux_loss_coef=0.01)
    model = CoMiGSForCausalLM.from_base(make_base(0), **{**options, **kwargs})
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for name, parameter in model.named_parameters():
            if "lora_B" in name or "router" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model.train()


def _logits_loss_and_gradients(model: torch.nn.Module, input_ids: torch.Tensor):
    model.zero_grad(set_to_none=True)
    out = model(input_ids, labels=input_ids)
    out.loss.backward()
    # no gradient at all (None) counts as zero: a router under uniform mixing, an expert no token chose
    gradients = {id(p): torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()}
    return out.logits.detach(), out.loss.detach(), gradients


def assert_matches_the_reference_loop(model: CoMiGSForCausalLM, input_ids: torch.Tensor) -> None:
    reference = use_reference_loop(copy.deepcopy(model))
    logits, loss, gradients = _logits_loss_and_gradients(model, input_ids)
    ref_logits, ref_loss, ref_gradients = _logits_loss_and_gradients(reference, input_ids)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    # the deep copy keeps the parameters' order: pair them by position
    ours, theirs = list(gradients.values()), list(ref_gradients.values())
    assert len(ours) == len(theirs) > 0 and any(g.abs().sum() > 0 for g in theirs)
    for mine, expected in zip(ours, theirs):
        scale = expected.abs().max().clamp_min(1e-6)
        assert ((mine - expected).abs().max() / scale).item() < 1e-5


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("base", sorted(BASES))
def test_the_mixture_gives_the_reference_loops_outputs_and_gradients(base, top_k, layout, monkeypatch):
    use_layout(monkeypatch, layout)
    model = _trained_looking(BASES[base], top_k=top_k)
    input_ids = torch.randint(0, VOCAB, (3, 24), generator=torch.Generator().manual_seed(0))
    assert_matches_the_reference_loop(model, input_ids)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_uniform_mixing_with_fusion_weights_gives_the_reference_loops_outputs(layout, monkeypatch):
    use_layout(monkeypatch, layout)
    model = _trained_looking(BASES["gpt2"], top_k=1, expert_mixing="uniform")
    model.set_expert_weights([0.7, -0.2, 0.4, 0.3])  # fixed weights that do not sum to 1
    input_ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    assert_matches_the_reference_loop(model, input_ids)


def test_both_layouts_decode_the_same_tokens(monkeypatch):
    model = _trained_looking(BASES["llama"], top_k=2).eval()
    prompt = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))
    generated = {}
    for layout in LAYOUTS:
        use_layout(monkeypatch, layout)
        with torch.no_grad():
            generated[layout] = model.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(generated["grouped-matmul"], generated["gathered"])
    assert torch.equal(generated["grouped-loop"], generated["gathered"])


def test_only_the_experts_tokens_chose_run_in_the_grouped_loop(monkeypatch):
    use_layout(monkeypatch, "grouped-loop")
    model = _trained_looking(BASES["gpt2"], top_k=1)
    input_ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with model.route_all_to("specialist_1"):
        model(input_ids, labels=input_ids).loss.backward()
    layer = next(model.lora_layers())
    assert layer.lora_B["specialist_1"].weight.grad.abs().sum() > 0
    # the other experts' factors never ran, not even on zeros: LoRA work is paid by routed pairs only
    assert all(layer.lora_B[name].weight.grad is None for name in ("generalist_0", "specialist_0", "specialist_2"))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_ranks_and_widths_the_grouped_matmul_cannot_take_fall_back_to_the_loop_with_the_same_outputs(
    layout, monkeypatch
):
    # torch's CPU grouped matmul wants rows of whole multiples of 16 bytes: a rank of 6 in float32 is not
    use_layout(monkeypatch, layout)
    model = _trained_looking(lambda seed: tiny_llama(seed, intermediate_size=42), lora_r=6, top_k=2)
    input_ids = torch.randint(0, VOCAB, (3, 24), generator=torch.Generator().manual_seed(0))
    assert_matches_the_reference_loop(model, input_ids)


def test_decoding_follows_expert_weights_however_they_were_changed(monkeypatch):
    use_layout(monkeypatch, "gathered")
    model = _trained_looking(BASES["gpt2"], top_k=2).eval()
    input_ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))
    fresh = copy.deepcopy(model)
    with torch.no_grad():
        model(input_ids)  # a decoding-style call first
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.data.copy_(parameter * 3)  # through `.data`: no version bump, no new storage
        fresh.load_state_dict(model.state_dict())
        torch.testing.assert_close(model(input_ids).logits, fresh(input_ids).logits, rtol=0, atol=0)
