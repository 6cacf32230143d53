"""The recipe's model section: the embedded base's strength, the base's dropout, per-client top-k, and the expert
mixing a strategy asks for."""

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from transformers import GPT2Config, GPT2LMHeadModel

import comigs_hf.model
from comigs_hf.model import ModelConfig, build_model, load_base


def dropout_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=2, n_positions=64))  # 0.1 dropout


@pytest.mark.parametrize("base_dropout", [None, 0.0])
def test_base_dropout_zero_makes_training_forwards_deterministic(input_ids, base_dropout):
    model = build_model(ModelConfig(base_dropout=base_dropout), dropout_gpt2(), "tiny", 1).train()
    first, second = model(input_ids).logits, model(input_ids).logits
    assert torch.equal(first, second) is (base_dropout == 0.0)
    if base_dropout == 0.0:  # the config says so too, so a saved client reloads without dropout
        config = model.config.text_config
        assert (config.resid_pdrop, config.embd_pdrop, config.attn_pdrop) == (0.0, 0.0, 0.0)


def test_base_dropout_reaches_the_rates_llama_attention_reads_in_forward():
    base = tiny_llama()
    base.config.attention_dropout = 0.3
    for layer in base.model.layers:
        layer.self_attn.attention_dropout = 0.3
    build_model(ModelConfig(base_dropout=0.0, top_k=1, num_specialists=0), base, "tiny", 0)
    assert all(layer.self_attn.attention_dropout == 0.0 for layer in base.model.layers)
    assert base.config.attention_dropout == 0.0


def test_embedded_base_steps_choose_the_embedded_base_that_is_built(monkeypatch):
    built = []

    def record(**settings):
        built.append(settings)
        raise RuntimeError("recorded")

    monkeypatch.setattr(comigs_hf.model, "build_embedded_base", record)
    with pytest.raises(RuntimeError, match="recorded"):
        load_base(ModelConfig(embedded_base_steps=300), progress=False)
    assert built == [{"max_steps": 300, "progress": False}]


def test_embedded_base_steps_on_another_base_are_refused():
    with pytest.raises(ValueError, match=r"embedded_base_steps=300 applies to base_model: embedded only"):
        ModelConfig(base_model="gpt2", embedded_base_steps=300)
    with pytest.raises(ValueError, match=r"embedded_base_steps must be in \[1, 100000\]"):
        ModelConfig(embedded_base_steps=0)


def test_base_dropout_out_of_range_is_refused():
    with pytest.raises(ValueError, match=r"base_dropout must be in \[0, 1\) or null"):
        ModelConfig(base_dropout=1.0)


def test_cap_top_k_caps_each_client_at_its_expert_count():
    capped = ModelConfig(num_specialists=[0, 1, 3], top_k=2, cap_top_k=True)
    assert [capped.client_top_k(n) for n in (0, 1, 3)] == [1, 2, 2]
    assert build_model(capped, tiny_gpt2(), "tiny", 0).config.num_experts_per_tok == 1


def test_build_model_takes_the_strategy_mixing():
    model = build_model(ModelConfig(), tiny_gpt2(), "tiny", 1, expert_mixing="uniform")
    assert model.config.expert_mixing == "uniform"
    assert all(mixture.router.mixing == "uniform" for mixture in model.mixtures)
