"""The package behaves as transformers, PEFT and Accelerate users expect: a loaded client trains (with transformers'
Trainer too), checkpoints hold the adapters and name their base, publishing a client takes an explicit confirmation,
and the recipe runs on the user's accelerate setup and says which trackers it cannot log to."""

import json
import re

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import LoggerType
from conftest import BASES, VOCAB, perturb_experts
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from comigs_hf import CoMiGSForCausalLM, parameter_role, recipe
from comigs_hf.checkpoint_comigs import BASE_RESOLVERS, set_base_dropout
from comigs_hf.cli import main as comigs
from comigs_hf.embedded import embedded_base_name, resolve_embedded_base
from comigs_hf.recipe import default_accelerator, missing_trackers
from comigs_hf.trainer import TrainingConfig, check_accelerator


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def saved_keys(directory) -> set[str]:
    with safe_open(str(directory / "model.safetensors"), framework="pt") as handle:
        return set(handle.keys())


@pytest.fixture
def client(make_base, tmp_path):
    """A trained-looking client over a base saved on disk (so its config can name it), and that base's folder."""
    make_base().save_pretrained(tmp_path / "base")
    model = CoMiGSForCausalLM.from_base(tmp_path / "base", num_specialists=2, top_k=2, attention_lora=True)
    perturb_experts(model)
    return model.eval(), tmp_path / "base"


def test_a_loaded_client_freezes_only_the_base(client, tmp_path):
    model, _ = client
    model.save_pretrained(tmp_path / "client")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "client")
    expected = {n for n, _ in loaded.named_parameters() if parameter_role(n) != "base"}
    assert trainable(loaded) == trainable(model) == expected
    assert any(".router." in n for n in expected) and any("attention" in n for n in expected)


def test_transformers_trainer_lowers_the_loss_of_a_loaded_client(client, tmp_path):
    client[0].save_pretrained(tmp_path / "client")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "client")
    ids = torch.randint(1, VOCAB, (8, 16), generator=torch.Generator().manual_seed(1))
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    with torch.no_grad():
        before = loaded(ids, labels=ids).loss.item()
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        max_steps=12,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    Trainer(model=loaded, args=args, train_dataset=dataset).train()
    with torch.no_grad():
        after = loaded(ids, labels=ids).loss.item()
    assert after < before - 0.1, (before, after)


def test_checkpoints_hold_only_the_adapters_and_name_their_base(client, tmp_path, input_ids):
    model, base_dir = client
    model.save_pretrained(tmp_path / "client")
    adapters = {n for n in model.state_dict() if parameter_role(n) != "base"}
    assert saved_keys(tmp_path / "client") == adapters
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "client")
    assert (loaded.config.base_model_name_or_path, loaded.config.weights_include_base) == (str(base_dir), False)
    torch.testing.assert_close(loaded(input_ids).logits, model(input_ids).logits, rtol=0, atol=0)
    loaded.save_pretrained(tmp_path / "again")  # saving a loaded client again stays adapter-only
    assert saved_keys(tmp_path / "again") == adapters


def test_an_adapter_checkpoint_reloads_with_the_dropout_it_trained_with(make_base, tmp_path):
    base = make_base()
    set_base_dropout(base, 0.1)  # the pretrained base's rates
    base.save_pretrained(tmp_path / "base")
    set_base_dropout(base, 0.0)  # the recipe's `model.base_dropout: 0.0`
    model = CoMiGSForCausalLM.from_base(base, base_model_name_or_path=str(tmp_path / "base"), num_specialists=1)
    model.save_pretrained(tmp_path / "client")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "client")
    # GPT-2's nn.Dropout modules, Llama's attention_dropout rate read in forward
    in_forward = [m.p for m in loaded.modules() if isinstance(m, torch.nn.Dropout)]
    in_forward += [v for m in loaded.modules() for k, v in vars(m).items() if "dropout" in k and isinstance(v, float)]
    assert in_forward and set(in_forward) == {0.0}
    rates = {k: v for k, v in loaded.config.text_config.to_dict().items() if "drop" in k and isinstance(v, float)}
    assert rates and set(rates.values()) == {0.0}


def test_a_full_checkpoint_loads_without_its_base(client, tmp_path, input_ids):
    model, base_dir = client
    model.save_pretrained(tmp_path / "full", include_base=True)
    for item in base_dir.iterdir():
        item.unlink()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "full")
    assert loaded.config.weights_include_base is True
    torch.testing.assert_close(loaded(input_ids).logits, model(input_ids).logits, rtol=0, atol=0)


def test_base_model_argument_overrides_the_named_base(client, make_base, tmp_path, input_ids):
    model, base_dir = client
    model.save_pretrained(tmp_path / "client")
    moved = tmp_path / "moved"
    base_dir.rename(moved)
    with pytest.raises(OSError, match="base"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "client")
    from_path = CoMiGSForCausalLM.from_pretrained(tmp_path / "client", base_model=moved)
    from_model = CoMiGSForCausalLM.from_pretrained(tmp_path / "client", base_model=make_base())
    for loaded in (from_path, from_model):
        torch.testing.assert_close(loaded(input_ids).logits, model(input_ids).logits, rtol=0, atol=0)
    other = "llama" if model.config.text_config.model_type == "gpt2" else "gpt2"
    with pytest.raises(ValueError, match="trained on a base with model_type=.*, but the base loaded for it has"):
        CoMiGSForCausalLM.from_pretrained(tmp_path / "client", base_model=BASES[other]())


@pytest.mark.parametrize(
    "tamper, message",
    [
        ("base_tensor", "marked adapter-only but its weights hold the base tensor"),
        ("unknown", "is not an expert, attention adapter or router of this model"),
        ("shape", r"has shape \(2, 2\), expected"),
        ("integer", "not a floating-point tensor"),
        ("missing", "lacks 1 of the model's expert and router tensors"),
        ("nan", "holds NaN or infinite values"),
    ],
)
def test_a_tampered_adapter_checkpoint_is_refused_by_name(client, tmp_path, tamper, message):
    model, _ = client
    model.save_pretrained(tmp_path / "client")
    path = str(tmp_path / "client" / "model.safetensors")
    state = load_file(path)
    key = sorted(state)[0]
    if tamper == "base_tensor":
        state["model.lm_head.weight"] = torch.zeros(2, 2)
    elif tamper == "unknown":
        lora_key = next(k for k in sorted(state) if ".lora_A." in k)
        state[re.sub(r"\.lora_A\.\w+?\.weight$", ".lora_A.specialist_7.weight", lora_key)] = state[lora_key].clone()
    elif tamper == "shape":
        state[key] = torch.zeros(2, 2)
    elif tamper == "integer":
        state[key] = state[key].long()
    elif tamper == "missing":
        del state[key]
    else:
        state[key] = torch.full_like(state[key], float("nan"))
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(tmp_path / "client")
    mine = AutoModelForCausalLM.from_pretrained(model.config.base_model_name_or_path)
    modules = [type(m).__name__ for m in mine.modules()]
    with pytest.raises(ValueError, match=message):
        CoMiGSForCausalLM.from_pretrained(tmp_path / "client", base_model=mine)
    assert [type(m).__name__ for m in mine.modules()] == modules  # a refused file leaves the caller's base as it was


def test_base_resolvers_map_names_that_are_not_hub_ids_to_local_bases(client, tmp_path, input_ids, monkeypatch):
    model, base_dir = client
    model.config.base_model_name_or_path = "my-org/offline-base"
    model.save_pretrained(tmp_path / "client")
    resolvers = [lambda name: str(base_dir) if name == "my-org/offline-base" else None, *BASE_RESOLVERS]
    monkeypatch.setattr("comigs_hf.checkpoint_comigs.BASE_RESOLVERS", resolvers)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "client")
    torch.testing.assert_close(loaded(input_ids).logits, model(input_ids).logits, rtol=0, atol=0)


def test_embedded_base_names_say_how_long_it_was_pretrained():
    assert embedded_base_name() == "comigs_hf/embedded-base"
    assert embedded_base_name(300) == "comigs_hf/embedded-base-300-steps"
    assert resolve_embedded_base("gpt2") is None and resolve_embedded_base("comigs_hf/embedded-base-x") is None
    with pytest.raises(ValueError, match="asks for 999999 pretraining steps"):  # a checkpoint's name is untrusted
        resolve_embedded_base("comigs_hf/embedded-base-999999-steps")
    assert any(resolver("comigs_hf/elsewhere") is None for resolver in BASE_RESOLVERS)
    assert [r.__name__ for r in BASE_RESOLVERS] == ["_resolve_packaged_base"]  # registered by importing comigs_hf


@pytest.mark.parametrize("call", ["push_to_hub", "save_pretrained"])
def test_publishing_a_client_through_transformers_needs_the_same_confirmation(client, tmp_path, call):
    model, _ = client
    with pytest.raises(ValueError, match="private specialists and routers"):
        if call == "push_to_hub":
            model.push_to_hub("someone/client")
        else:
            model.save_pretrained(tmp_path / "client", push_to_hub=True, repo_id="someone/client")
    assert not (tmp_path / "client").exists()


# ---- Accelerate -------------------------------------------------------------------------------------------------


@pytest.fixture
def fresh_accelerate_state():
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_the_recipe_takes_the_users_accelerate_setup(fresh_accelerate_state, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --mixed_precision` sets
    built = []
    monkeypatch.setattr(recipe, "Accelerator", lambda **kwargs: built.append(kwargs) or Accelerator(**kwargs))
    accelerator = default_accelerator()
    assert built == [{}]  # no device, precision or process choice of its own: an MPS or XPU user keeps theirs
    assert accelerator.mixed_precision == "bf16"
    check_accelerator(accelerator, TrainingConfig())


def test_trackers_that_are_not_installed_are_named(monkeypatch):
    monkeypatch.setattr(recipe, "get_available_trackers", lambda: [LoggerType.TENSORBOARD])
    assert missing_trackers(["tensorboard", "wandb", "all", "none"]) == ["wandb"]


# ---- serving ------------------------------------------------------------------------------------------------------


def test_the_merged_generalist_is_a_plain_model_computing_the_generalist_route(client, tmp_path, input_ids):
    model, _ = client
    model.save_pretrained(tmp_path / "client")
    assert comigs(["export", str(tmp_path / "client"), str(tmp_path / "served"), "--merge-generalist"]) == 0
    config = json.loads((tmp_path / "served" / "config.json").read_text())
    assert config["model_type"] == model.config.text_config.model_type and "auto_map" not in config
    assert not list((tmp_path / "served").glob("*.py"))  # no remote code: any engine of the base architecture
    served = AutoModelForCausalLM.from_pretrained(tmp_path / "served")
    assert type(served).__module__.startswith("transformers.models.")
    with model.route_all_to("generalist_0"), torch.no_grad():
        expected = model(input_ids).logits
    torch.testing.assert_close(served(input_ids).logits, expected, rtol=1e-5, atol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(model.config.base_model_name_or_path)
    with torch.no_grad():  # the generalist is in: the base alone computes something else
        assert not torch.allclose(base(input_ids).logits, expected, atol=1e-3)


# ---- precision ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("include_base", [False, True])
def test_loading_in_bfloat16_keeps_the_adapters_in_float32(client, tmp_path, input_ids, include_base):
    model, _ = client
    model.save_pretrained(tmp_path / "client", include_base=include_base)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "client", dtype=torch.bfloat16)
    dtypes = {parameter_role(n) == "base": p.dtype for n, p in loaded.named_parameters()}
    assert dtypes == {True: torch.bfloat16, False: torch.float32}
    for name, value in loaded.role_state_dict("generalist", "specialist", "router").items():
        assert torch.equal(value, model.state_dict()[name]), name  # loaded as saved, never rounded to bf16
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits.float(), model(input_ids).logits, rtol=0.05, atol=0.05)


def test_training_under_bfloat16_autocast_steps_the_float32_adapters(client, input_ids):
    model, _ = client
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids, labels=input_ids)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_from_base_forwards_from_pretrained_arguments(make_base, tmp_path, input_ids):
    make_base().save_pretrained(tmp_path / "base")
    model = CoMiGSForCausalLM.from_base(
        tmp_path / "base",
        dtype=torch.bfloat16,
        attn_implementation="eager",
        local_files_only=True,
        cache_dir=tmp_path / "cache",
        base_kwargs={"low_cpu_mem_usage": True},
        num_specialists=1,
        top_k=2,
    )
    assert model.config.text_config._attn_implementation == "eager"
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert torch.isfinite(model(input_ids).logits).all()


class PackedLinear(torch.nn.Module):
    """A quantised linear's shape: its weight holds packed integers, its features are attributes (as bitsandbytes')."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = torch.nn.Parameter(torch.zeros(linear.weight.numel() // 2, 1, dtype=torch.uint8), False)
        self.linear = linear

    def forward(self, x):
        return self.linear(x)


def test_adapter_shapes_and_dtype_come_from_the_layer_not_a_packed_weight(input_ids):
    base = BASES["llama"]()
    for layer in base.model.layers:
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(layer.mlp, name, PackedLinear(getattr(layer.mlp, name)))
    model = CoMiGSForCausalLM.from_base(base, num_specialists=1, top_k=2)
    layer = model.mixtures[0]._projections[0]
    assert (layer.in_features, layer.out_features) == (32, 64)
    assert {p.dtype for n, p in model.named_parameters() if parameter_role(n) != "base"} == {torch.float32}
    torch.testing.assert_close(model(input_ids).logits, BASES["llama"]()(input_ids).logits, rtol=0, atol=1e-5)
