"""Generalists as standard PEFT LoRA adapters: export, PEFT parity, import and its refusals."""

import json

import pytest
import torch
from conftest import perturb_experts, tiny_gpt2
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from comigs_hf import CoMiGSForCausalLM
from comigs_hf.adapters import export_generalist, load_generalist, read_generalist


def build(make_base, **kwargs):
    options = dict(
        num_generalists=2, num_specialists=1, lora_r=4, lora_alpha=8, top_k=2, base_model_name_or_path="tiny-base"
    )
    options.update(kwargs)
    model = CoMiGSForCausalLM.from_base(make_base(), **options)
    perturb_experts(model)
    return model.eval()


@pytest.mark.parametrize(
    "attention", [{}, {"attention_lora": True}, {"attention_lora": True, "attention_lora_r": 6}], ids=str
)
def test_exported_generalist_in_stock_peft_matches_route_all_to(make_base, input_ids, tmp_path, attention):
    model = build(make_base, **attention)
    export_generalist(model, tmp_path, index=1)
    peft_model = PeftModel.from_pretrained(make_base(), tmp_path).eval()
    with model.route_all_to(1):
        expected = model(input_ids).logits
    assert (peft_model(input_ids).logits - expected).abs().max() <= 1e-5


def test_exported_adapter_targets_exactly_the_expert_projections(tmp_path):
    model = build(lambda: tiny_gpt2())
    export_generalist(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == [
        f"transformer.h.{i}.mlp.{p}" for i in (0, 1) for p in ("c_fc", "c_proj")
    ]
    assert config["use_rslora"] is True and config["r"] == 4 and config["base_model_name_or_path"] == "tiny-base"
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.transformer.h.0.mlp.c_fc.lora_A.weight" in keys
    assert not any("attn" in k for k in keys)


def test_load_generalist_is_the_inverse_of_export(make_base, tmp_path):
    source = build(make_base)
    export_generalist(source, tmp_path, index=1)
    target = build(make_base)
    target.reset_experts()
    load_generalist(target, tmp_path, index=0)
    exported = source.role_state_dict("generalist")
    loaded = target.role_state_dict("generalist")
    for key, value in exported.items():
        if "generalist_1" in key:
            torch.testing.assert_close(loaded[key.replace("generalist_1", "generalist_0")], value)


def test_any_peft_lora_adapter_on_the_same_targets_seeds_a_generalist(input_ids, tmp_path):
    # a plain (non-rsLoRA) PEFT adapter with another alpha: the update must be carried over unchanged
    peft_model = get_peft_model(
        tiny_gpt2(),
        LoraConfig(
            r=4, lora_alpha=32, target_modules=r".*\.mlp\.(c_fc|c_proj)", init_lora_weights=False, fan_in_fan_out=True
        ),
    )
    peft_model.eval()
    peft_model.save_pretrained(tmp_path)
    model = build(lambda: tiny_gpt2(), base_model_name_or_path=None)
    load_generalist(model, tmp_path, index=0)
    with model.route_all_to(0):
        torch.testing.assert_close(model(input_ids).logits, peft_model(input_ids).logits, rtol=1e-5, atol=1e-5)


def test_adapter_of_another_rank_is_refused_naming_both_ranks(tmp_path):
    export_generalist(build(lambda: tiny_gpt2(), lora_r=8), tmp_path)
    with pytest.raises(ValueError, match=r"r=8.*lora_r=4"):
        load_generalist(build(lambda: tiny_gpt2()), tmp_path)


def test_adapter_of_another_base_model_is_refused(tmp_path):
    export_generalist(build(lambda: tiny_gpt2(), base_model_name_or_path="other-base"), tmp_path)
    with pytest.raises(ValueError, match="other-base.*tiny-base"):
        load_generalist(build(lambda: tiny_gpt2()), tmp_path)


def test_adapter_on_other_targets_is_refused_naming_them(tmp_path):
    # a bare "c_proj" also catches attn.c_proj in GPT-2: exactly the mistake the exact target list avoids
    peft_model = get_peft_model(tiny_gpt2(), LoraConfig(r=4, target_modules=["c_fc", "c_proj"], fan_in_fan_out=True))
    peft_model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"target modules differ.*attn\.c_proj"):
        load_generalist(build(lambda: tiny_gpt2(), base_model_name_or_path=None), tmp_path)


@pytest.mark.parametrize("corruption, message", [("shape", "shape"), ("nan", "NaN"), ("garbage", "cannot read")])
def test_corrupt_adapter_is_refused_and_leaves_the_model_untouched(tmp_path, corruption, message):
    export_generalist(build(lambda: tiny_gpt2()), tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    state = load_file(weights)
    key = sorted(state)[-1]
    if corruption == "shape":
        state[key] = torch.zeros(3, 3)
    elif corruption == "nan":
        state[key] = torch.full_like(state[key], float("nan"))
    save_file(state, weights)
    if corruption == "garbage":
        weights.write_bytes(b"not a safetensors file")
    model = build(lambda: tiny_gpt2())
    before = model.role_state_dict("generalist")
    with pytest.raises(ValueError, match=message):
        load_generalist(model, tmp_path)
    assert all(torch.equal(v, model.get_parameter(k)) for k, v in before.items())


def test_missing_directory_and_non_lora_adapters_are_refused(tmp_path):
    model = build(lambda: tiny_gpt2())
    with pytest.raises(ValueError, match="does not exist"):
        load_generalist(model, tmp_path / "nowhere")
    export_generalist(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(ValueError, match="IA3"):
        load_generalist(model, tmp_path)


@pytest.mark.parametrize(
    ("config_bytes", "message"),
    [
        (b"[]", r"adapter_config\.json is a JSON list, not an object"),
        (b"\xff\xfe\x00", r"adapter_config\.json is not UTF-8"),
        (b"[" * 5000 + b"]" * 5000, r"nested more than 16 levels deep"),
        ({"lora_alpha": "16"}, r"lora_alpha must be a number in \(0, 1e6\], got '16'"),
        ({"lora_alpha": 1e39}, r"lora_alpha must be a number in \(0, 1e6\], got 1e\+39"),
        ({"r": "4"}, r"r must be an integer in \[1, 4096\], got '4'"),
        ({"use_rslora": "yes"}, r"use_rslora must be true or false"),
        ({"target_modules": [1, "a"]}, r"target_modules must be a string or a list of strings"),
        ({"alpha_pattern": {"c_fc": -1}}, r"alpha_pattern must be a map of module names .* to numbers"),
        ({"rank_pattern": {"(a+)+$": 4}}, r"rank_pattern must be a map of module names"),  # would backtrack
        ("int32", r"'base_model\.model\..*' is torch\.int32, not a float16/bfloat16/float32/float64 tensor"),
    ],
    ids=[
        "list",
        "not-utf8",
        "deep",
        "string-alpha",
        "huge-alpha",
        "string-rank",
        "string-rslora",
        "mixed-targets",
        "negative-alpha-pattern",
        "regex-rank-pattern",
        "int32-weights",
    ],
)
def test_a_malformed_adapter_is_refused_naming_the_field_and_leaves_the_model_untouched(
    tmp_path, config_bytes, message
):
    model = build(lambda: tiny_gpt2())
    export_generalist(model, tmp_path)
    config_path, weights = tmp_path / "adapter_config.json", tmp_path / "adapter_model.safetensors"
    if config_bytes == "int32":
        save_file({k: v.to(torch.int32) for k, v in load_file(weights).items()}, weights)
    elif isinstance(config_bytes, dict):
        config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **config_bytes}))
    else:
        config_path.write_bytes(config_bytes)
    perturb_experts(model, seed=3)
    before = {k: v.clone() for k, v in model.role_state_dict("generalist").items()}
    with pytest.raises(ValueError, match=message):
        load_generalist(model, tmp_path)
    assert all(torch.equal(v, model.get_parameter(k)) for k, v in before.items())


def test_export_of_a_missing_generalist_is_refused(tmp_path):
    with pytest.raises(ValueError, match="index 2"):
        export_generalist(build(lambda: tiny_gpt2()), tmp_path, index=2)


def test_an_attention_adapter_of_its_own_rank_round_trips_through_the_peft_format(tmp_path):
    model = build(lambda: tiny_gpt2(), attention_lora=True, attention_lora_r=6)
    export_generalist(model, tmp_path)
    assert set(json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"].values()) == {6}
    fresh = build(lambda: tiny_gpt2(), attention_lora=True, attention_lora_r=6)
    read = read_generalist(fresh, tmp_path)
    expected = {k: v for k, v in model.role_state_dict("generalist").items() if "generalist_1" not in k}
    assert read.keys() == expected.keys()
    assert all(torch.allclose(read[k], expected[k], atol=1e-7) for k in read)
