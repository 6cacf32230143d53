"""The CoMiGS architecture on tiny GPT-2 and Llama bases."""

import copy
import json
import os

import pytest
import torch
from conftest import VOCAB, assert_loads_as_remote_code, perturb_experts, tiny_gpt2
from transformers import AutoConfig, AutoModelForCausalLM, BertConfig, BertModel
from transformers.activations import ACT2FN

from comigs_hf import CoMiGSConfig, CoMiGSForCausalLM, parameter_role
from comigs_hf.experts_comigs import CoMiGSPairActivation, keeps_several_tensors
from comigs_hf.layer_comigs import CoMiGSRouting, load_balancing_loss


def build(make_base, seed=0, **kwargs):
    options = dict(num_generalists=1, num_specialists=2, lora_r=4, lora_alpha=8, top_k=2)
    options.update(kwargs)
    model = CoMiGSForCausalLM.from_base(make_base(seed), **options)
    perturb_experts(model, seed=seed)
    return model.eval()


@pytest.mark.parametrize(
    "name, role",
    [
        ("model.transformer.h.0.mlp.base_mlp.c_fc.lora_A.generalist_0.weight", "generalist"),
        ("model.model.layers.1.mlp.base_mlp.down_proj.lora_B.specialist_3.weight", "specialist"),
        ("model.model.layers.1.mlp.router.weight", "router"),
        ("model.transformer.h.0.attn.c_attn.lora_A.attention.weight", "generalist"),
        ("model.transformer.h.0.mlp.base_mlp.c_fc.base_layer.weight", "base"),
        ("model.lm_head.weight", "base"),
    ],
)
def test_parameter_role_names_the_three_groups(name, role):
    assert parameter_role(name) == role


def test_fresh_experts_leave_base_logits_unchanged(make_base, input_ids):
    reference = make_base()(input_ids).logits
    model = CoMiGSForCausalLM.from_base(make_base(), num_generalists=1, num_specialists=2, top_k=2).eval()
    torch.testing.assert_close(model(input_ids).logits, reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_batched_mixture_equals_weighted_sum_of_whole_expert_mlps(make_base, top_k):
    model = build(make_base, top_k=top_k)
    mixture = model.mixtures[0]
    hidden = torch.randn(2, 5, model.get_input_embeddings().weight.shape[1])
    routing = mixture.router(hidden)
    per_expert = []
    for expert in range(model.config.num_experts):
        forced = CoMiGSRouting(routing.router_logits, torch.full((2, 5, 1), expert), torch.ones(2, 5, 1))
        per_expert.append(mixture.run_routed(forced, hidden))
    per_expert = torch.stack(per_expert, dim=-2)  # (B, T, E, H)
    chosen = per_expert.gather(-2, routing.expert_index.unsqueeze(-1).expand(-1, -1, -1, per_expert.shape[-1]))
    naive = (routing.expert_weight.unsqueeze(-1) * chosen).sum(dim=-2)
    torch.testing.assert_close(mixture(hidden), naive, rtol=1e-5, atol=1e-6)


def test_top2_weights_sum_to_one_and_top1_weight_is_the_full_softmax_probability(make_base):
    hidden = torch.randn(3, 7, 32)
    top2 = build(make_base, top_k=2).mixtures[0].router(hidden)
    torch.testing.assert_close(top2.expert_weight.sum(-1), torch.ones(3, 7))
    top1 = build(make_base, top_k=1).mixtures[0].router(hidden)
    probability = top1.router_logits.softmax(-1).gather(-1, top1.expert_index)
    torch.testing.assert_close(top1.expert_weight, probability)
    assert (top1.expert_weight < 1).all()


def test_top_k_picks_the_highest_router_logits(make_base):
    routing = build(make_base, top_k=2).mixtures[0].router(torch.randn(2, 4, 32))
    expected = routing.router_logits.topk(2, dim=-1).indices
    assert torch.equal(routing.expert_index, expected)


def test_base_is_frozen_and_bitwise_unchanged_after_an_optimizer_step(make_base, input_ids):
    model = build(make_base).train()
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if parameter_role(n) == "base"}
    expert_before = {n: p.detach().clone() for n, p in model.named_parameters() if parameter_role(n) != "base"}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(input_ids, labels=input_ids).loss.backward()
    optimizer.step()
    for name, param in model.named_parameters():
        if parameter_role(name) == "base":
            assert not param.requires_grad and param.grad is None, name
            assert torch.equal(param, base_before[name]), name
    assert any(not torch.equal(p, expert_before[n]) for n, p in model.named_parameters() if n in expert_before)


def test_gradients_reach_every_expert_and_router_and_nothing_else(make_base, input_ids):
    model = build(make_base, top_k=2).train()
    model(input_ids, labels=input_ids).loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if parameter_role(n) != "base"}
    assert all(model.get_parameter(n).grad is not None for n in trainable)


def test_top1_lm_loss_alone_still_trains_the_router(make_base, input_ids):
    model = build(make_base, top_k=1, router_aux_loss_coef=0.0).train()
    model(input_ids, labels=input_ids).loss.backward()
    router_grads = [p.grad for n, p in model.named_parameters() if parameter_role(n) == "router"]
    assert all(g is not None and g.abs().sum() > 0 for g in router_grads)


def test_loss_is_lm_loss_plus_weighted_aux_loss(make_base, input_ids):
    model = build(make_base, router_aux_loss_coef=0.5)
    out = model(input_ids, labels=input_ids)
    lm_loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), input_ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, lm_loss + 0.5 * out.aux_loss)


@pytest.mark.parametrize("variant", ["switch", "reference"])
def test_inference_computes_no_balancing_loss_and_hooks_no_block_unless_asked(make_base, input_ids, variant):
    model = build(make_base, router_aux_loss_variant=variant)
    with torch.no_grad():
        assert model(input_ids).aux_loss is None  # decoding and evaluation: no balancing loss
        asked = model(input_ids, output_aux_loss=True).aux_loss
        assert asked is not None and torch.isfinite(asked)
        torch.testing.assert_close(model(input_ids, labels=input_ids).aux_loss, asked)
    assert model(input_ids).aux_loss is not None  # gradients on: training computes it
    # the reference variant's block outputs are recorded by hooks that live only during the passes that need them
    assert all(not block._forward_hooks for block in model._blocks)


def test_load_balancing_loss_is_one_at_the_target_share_and_higher_when_collapsed():
    target = torch.tensor([0.5, 0.25, 0.25])
    # logits whose softmax is the target, and top-1 counts matching it (2 of 4 tokens on expert 0, 1 each on 1, 2)
    logits = target.log().expand(1, 4, 3).clone()
    balanced = CoMiGSRouting(logits, torch.tensor([[[0], [0], [1], [2]]]), torch.ones(1, 4, 1))
    torch.testing.assert_close(load_balancing_loss([balanced], target), torch.tensor(1.0))
    collapsed_logits = torch.tensor([8.0, 0.0, 0.0]).expand(1, 4, 3)
    collapsed = CoMiGSRouting(collapsed_logits, torch.zeros(1, 4, 1, dtype=torch.long), torch.ones(1, 4, 1))
    assert load_balancing_loss([collapsed], target) > 1.9


def test_routing_stats_count_every_token_copy_and_ignore_padding(make_base, input_ids):
    model = build(make_base, top_k=2)
    mask = torch.ones_like(input_ids)
    mask[0, -3:] = 0
    stats = model(input_ids, attention_mask=mask, output_routing_stats=True).routing_stats
    assert len(stats) == model.config.text_config.num_hidden_layers
    for layer in stats:
        assert layer["tokens"].sum() == 2 * mask.sum()
        torch.testing.assert_close(layer["weight"].sum(), torch.tensor(1.0))


def test_route_all_to_sends_every_token_to_one_expert_with_weight_one(make_base, input_ids):
    model = build(make_base)
    with model.route_all_to("specialist_1"):
        stats = model(input_ids, output_routing_stats=True).routing_stats
    for layer in stats:
        assert layer["tokens"].tolist() == [0, 0, input_ids.numel()]
        assert layer["weight"].tolist() == [0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="specialist_7"):
        with model.route_all_to("specialist_7"):
            pass


def test_save_and_auto_load_round_trip_config_and_logits(make_base, input_ids, tmp_path):
    model = build(make_base, attention_lora=True, top_k=1)
    model.save_pretrained(tmp_path)
    loaded_config = AutoConfig.from_pretrained(tmp_path).to_dict()
    assert loaded_config.pop("_name_or_path") == str(tmp_path)
    assert loaded_config.pop("weights_include_base") is True  # a base built in memory has no name to load it by
    ignored = ("_name_or_path", "weights_include_base")
    assert loaded_config == {k: v for k, v in model.config.to_dict().items() if k not in ignored}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, CoMiGSForCausalLM)
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    torch.testing.assert_close(loaded(input_ids).logits, model(input_ids).logits, rtol=0, atol=0)
    assert not any(p.requires_grad for n, p in loaded.named_parameters() if parameter_role(n) == "base")


def test_greedy_generation_is_identical_with_and_without_kv_cache(make_base, input_ids):
    model = build(make_base)
    cached = model.generate(input_ids, max_new_tokens=10, do_sample=False, use_cache=True)
    uncached = model.generate(input_ids, max_new_tokens=10, do_sample=False, use_cache=False)
    assert cached.shape == (2, input_ids.shape[1] + 10)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("checkpoint", ["full", "adapter-only"])
def test_saved_model_loads_as_remote_code_where_comigs_hf_cannot_be_imported(tmp_path, input_ids, checkpoint):
    if checkpoint == "full":  # a base built in memory has no name: its checkpoint holds it
        model = build(lambda seed: tiny_gpt2(seed))
    else:
        tiny_gpt2().save_pretrained(tmp_path / "base")
        model = build(lambda seed: str(tmp_path / "base"))
    model.save_pretrained(tmp_path / "model")
    saved = json.loads((tmp_path / "model" / "config.json").read_text())
    assert saved["weights_include_base"] is (checkpoint == "full")
    shipped = sorted(f for f in os.listdir(tmp_path / "model") if f.endswith(".py"))
    assert shipped == [
        "checkpoint_comigs.py",
        "configuration_comigs.py",
        "experts_comigs.py",
        "layer_comigs.py",
        "modeling_comigs.py",
    ]
    with torch.no_grad():
        expected = model(input_ids).logits
    assert_loads_as_remote_code(tmp_path / "model", {"input_ids": input_ids}, expected, tmp_path)


def test_bfloat16_forward_and_backward(make_base, input_ids):
    model = build(make_base).to(torch.bfloat16).train()
    out = model(input_ids, labels=input_ids)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad.dtype == torch.bfloat16 for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("upcast_adapters", [True, False])
def test_a_half_precision_base_keeps_float32_adapters_and_routers_unless_told(make_base, input_ids, upcast_adapters):
    model = CoMiGSForCausalLM.from_base(
        make_base().to(torch.bfloat16),
        num_specialists=2,
        top_k=2,
        attention_lora=True,
        upcast_adapters=upcast_adapters,
    )
    adapter_dtype = torch.float32 if upcast_adapters else torch.bfloat16
    dtypes = {parameter_role(n) == "base": p.dtype for n, p in model.named_parameters()}
    assert dtypes == {True: torch.bfloat16, False: adapter_dtype}
    model.set_num_specialists(3)
    assert {p.dtype for n, p in model.named_parameters() if parameter_role(n) != "base"} == {adapter_dtype}
    perturb_experts(model)
    out = model.train()(input_ids, labels=input_ids)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad.dtype == adapter_dtype for p in model.parameters() if p.requires_grad)


def assert_same_gradients(left, right, input_ids, rtol, atol):
    """One LM-loss backward through each model gives equal gradients on every trainable parameter."""
    for model in (left, right):
        model.zero_grad()
        model(input_ids, labels=input_ids).loss.backward()
    for (name, a), (_, b) in zip(left.named_parameters(), right.named_parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, rtol=rtol, atol=atol, msg=name)


def test_gradient_checkpointing_gives_the_same_gradients(make_base, input_ids):
    plain = build(make_base).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.activation_checkpointing_enable()
    assert_same_gradients(plain, checkpointed, input_ids, rtol=1e-4, atol=1e-6)


def test_set_num_specialists_keeps_existing_experts_and_adds_fresh_ones(make_base, input_ids):
    model = build(make_base, num_specialists=1, top_k=2)
    before = model.role_state_dict("generalist", "specialist")
    model.set_num_specialists(3)
    after = model.role_state_dict("generalist", "specialist")
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert {k for k in after if "specialist_2" in k} and model.mixtures[0].router.weight.shape[0] == 4
    assert model(input_ids).logits.shape == (2, input_ids.shape[1], VOCAB)


def test_load_role_state_dict_checks_everything_before_writing(make_base):
    model = build(make_base)
    state = model.role_state_dict("generalist")
    key = next(iter(state))
    before = model.get_parameter(key).detach().clone()
    bad = {k: v + 1 for k, v in state.items()}
    bad[sorted(bad)[-1]] = torch.full_like(state[sorted(bad)[-1]], float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        model.load_role_state_dict(bad)
    assert torch.equal(model.get_parameter(key), before)
    with pytest.raises(ValueError, match="shape"):
        model.load_role_state_dict({key: torch.zeros(1)})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_generalists=1, num_specialists=1, top_k=3), "num_experts_per_tok"),
        (dict(num_generalists=0, num_specialists=2), "num_generalists"),
        (dict(num_specialists=-1), "num_specialists"),
        (dict(target_modules=["mlp.w1", "mlp.w2"]), r"mlp\.w1"),
    ],
)
def test_bad_configuration_raises_a_value_error_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CoMiGSForCausalLM.from_base(tiny_gpt2(), **kwargs)


def test_base_without_known_mlp_lists_what_was_searched():
    base = tiny_gpt2()
    for block in base.transformer.h:
        block.ffn = block.mlp
        del block.mlp
    with pytest.raises(ValueError, match=r"searched for .*mlp\.c_fc.*mlp\.gate_proj"):
        CoMiGSForCausalLM.from_base(base)


def test_base_that_is_not_a_causal_lm_is_refused():
    encoder = BertModel(
        BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    )
    with pytest.raises(ValueError, match="causal language model.*BertModel"):
        CoMiGSForCausalLM.from_base(encoder)


def test_config_without_specialists_targets_the_generalists_uniformly():
    config = CoMiGSConfig(text_config=tiny_gpt2().config, num_generalists=2, num_specialists=0, num_experts_per_tok=1)
    model = CoMiGSForCausalLM(config)
    torch.testing.assert_close(model.load_balancing_target(), torch.tensor([0.5, 0.5]))


def test_set_num_specialists_refuses_too_few_experts_and_changes_nothing(make_base):
    model = build(make_base, num_specialists=2, top_k=2)
    before = model.role_state_dict("generalist", "specialist", "router")
    with pytest.raises(ValueError, match="num_experts_per_tok=2"):
        model.set_num_specialists(0)
    assert model.config.num_specialists == 2
    assert model.role_state_dict("generalist", "specialist", "router").keys() == before.keys()


def test_no_grad_forward_follows_in_place_expert_updates(make_base, input_ids):
    model = build(make_base)
    with torch.no_grad():
        before = model(input_ids).logits
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(2)  # as an optimizer step or load_state_dict would, in place
        after = model(input_ids).logits
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, model(input_ids).logits.detach(), rtol=0, atol=0)


def test_no_grad_forward_follows_expert_data_replaced_as_vector_to_parameters_does(make_base, input_ids):
    model = build(make_base)
    experts = [p for n, p in model.named_parameters() if "lora_" in n]
    with torch.no_grad():
        model(input_ids)  # a decoding-style call first
        vector = torch.nn.utils.parameters_to_vector(experts)
        torch.nn.utils.vector_to_parameters(vector * 2, experts)  # `param.data = ...`: no version bump
        after = model(input_ids).logits
    fresh = build(make_base)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(after, fresh(input_ids).logits, rtol=0, atol=0)


def _unwrap_activations(model):
    for mixture in model.mixtures:
        for name, child in list(mixture.base_mlp.named_children()):
            if isinstance(child, CoMiGSPairActivation):
                setattr(mixture.base_mlp, name, child.activation)


def _saved_bytes(model, input_ids) -> int:
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids, labels=input_ids).loss.backward()
    return sum(storages.values())


def _quick_gelu_gpt2(seed: int = 0):
    # x * sigmoid(1.702 x): a composite activation that keeps two tensors and has no fused kernel
    base = tiny_gpt2(seed)
    for block in base.transformer.h:
        block.mlp.act = ACT2FN["quick_gelu"]
    base.config.activation_function = "quick_gelu"
    return base


def test_composite_activation_is_recomputed_with_equal_gradients_and_less_kept_memory(input_ids):
    recomputed = build(_quick_gelu_gpt2).train()
    assert recomputed.mixtures[0].base_mlp.act.recompute
    kept = copy.deepcopy(recomputed)
    _unwrap_activations(kept)
    assert _saved_bytes(recomputed, input_ids) < _saved_bytes(kept, input_ids)
    assert_same_gradients(recomputed, kept, input_ids, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "activation, wrapped",
    [("gelu_new", True), ("quick_gelu", True), ("silu", False), ("relu", False), ("gelu", False)],
)
def test_only_activations_that_keep_several_tensors_are_recomputed(activation, wrapped):
    assert keeps_several_tensors(ACT2FN[activation]) is wrapped


def test_gpt2_tanh_gelu_runs_as_one_fused_kernel_keeping_one_tensor_with_the_same_outputs(input_ids):
    model = build(lambda seed: tiny_gpt2(seed)).train()  # GPT-2's gelu_new: a dozen element-wise ops
    assert model.mixtures[0].base_mlp.act.fused_tanh_gelu
    composite = copy.deepcopy(model)
    for mixture in composite.mixtures:
        mixture.base_mlp.act = ACT2FN["gelu_new"]
    torch.testing.assert_close(model(input_ids).logits, composite(input_ids).logits, rtol=1e-5, atol=1e-6)
    assert _saved_bytes(model, input_ids) < _saved_bytes(composite, input_ids)
    assert_same_gradients(model, composite, input_ids, rtol=1e-4, atol=1e-6)


def test_recomputation_follows_the_top_k_of_the_client_swapped_in(input_ids):
    recomputed = build(_quick_gelu_gpt2, top_k=1).train()
    kept = build(_quick_gelu_gpt2, top_k=1, recompute_activation=False).train()
    # top-1: one copy per token, nothing to recompute
    assert _saved_bytes(recomputed, input_ids) == _saved_bytes(kept, input_ids)
    for model in (recomputed, kept):
        model.set_num_specialists(2, num_experts_per_tok=2)
    assert _saved_bytes(recomputed, input_ids) < _saved_bytes(kept, input_ids)


def test_activation_recomputation_can_be_switched_off():
    model = build(_quick_gelu_gpt2, top_k=2, recompute_activation=False)
    assert not isinstance(model.mixtures[0].base_mlp.act, CoMiGSPairActivation)


# ---- the reference profile: uniform mixing, the attention adapter's rank, the reference balancing loss -----------


def test_uniform_mixing_averages_every_experts_output_and_has_nothing_to_balance(make_base, input_ids):
    model = build(make_base, num_specialists=2, top_k=1, expert_mixing="uniform")
    mixture = model.mixtures[0]
    hidden = torch.randn(2, 5, model.get_input_embeddings().weight.shape[-1])
    outputs = []
    for expert in model.config.expert_names:
        with model.route_all_to(expert):
            outputs.append(mixture(hidden))
    torch.testing.assert_close(mixture(hidden), torch.stack(outputs).mean(dim=0), rtol=1e-5, atol=1e-6)
    model.train()
    out = model(input_ids, labels=input_ids)
    out.loss.backward()
    assert out.aux_loss.item() == 0.0
    assert all(p.grad is None for _, p in model.named_parameters_by_role("router"))


def test_attention_adapter_has_its_own_rank_and_scaling(make_base):
    model = build(make_base, lora_r=4, lora_alpha=8, attention_lora=True, attention_lora_r=6)
    attention = [layer for layer in model.lora_layers() if layer.role == "shared"]
    experts = [layer for layer in model.lora_layers() if layer.role != "shared"]
    assert attention and all(layer.r == 6 and layer.scaling == pytest.approx(8 / 6**0.5) for layer in attention)
    assert all(layer.r == 4 and layer.scaling == pytest.approx(8 / 4**0.5) for layer in experts)
    assert all(layer.lora_A["attention"].weight.shape[0] == 6 for layer in attention)


def reference_balancing_loss(logits: torch.Tensor, top_k: int, importance: float) -> torch.Tensor:
    """The reference code's per-token balancing loss of one layer, written from its definition: (N, E) logits."""
    num_experts = logits.shape[-1]
    if top_k == 1:
        logits = logits.softmax(dim=-1)
    weights, index = logits.topk(top_k, dim=-1)
    masked = torch.zeros_like(logits).scatter(1, index, weights)
    select = masked.softmax(dim=-1) if top_k > 1 else masked
    mask = torch.nn.functional.one_hot(index, num_experts).float()
    mask = mask[:, 0] if top_k == 1 else mask.mean(dim=1)
    density, proxy = mask.mean(dim=0), select.mean(dim=0)
    factors = torch.ones(num_experts)
    factors[1:] *= (num_experts - 1) / (1 - importance)
    factors[0] /= importance
    factors /= num_experts
    return (proxy * density * factors).mean() * num_experts**2


@pytest.mark.parametrize(("num_specialists", "top_k"), [(2, 1), (2, 2), (1, 2)])
def test_reference_balancing_loss_scores_the_block_outputs_as_the_reference_does(
    make_base, input_ids, num_specialists, top_k
):
    model = build(make_base, num_specialists=num_specialists, top_k=top_k, router_aux_loss_variant="reference")
    blocks = model.model.transformer.h if hasattr(model.model, "transformer") else model.model.model.layers
    outputs = []
    handles = [
        b.register_forward_hook(lambda m, a, o: outputs.append(o[0] if isinstance(o, tuple) else o)) for b in blocks
    ]
    aux = model(input_ids).aux_loss
    for handle in handles:
        handle.remove()
    expected = [
        reference_balancing_loss(F_linear(hidden, mixture.router.weight).flatten(0, 1), top_k, 0.5)
        for hidden, mixture in zip(outputs, model.mixtures)
    ]
    torch.testing.assert_close(aux, torch.stack(expected).mean(), rtol=1e-5, atol=1e-6)
    if top_k < model.config.num_experts:  # with every expert chosen the loss is 1 whatever the router does
        # the switch variant scores the MLP inputs instead: another figure on the same pass
        model.config.router_aux_loss_variant = "switch"
        assert not torch.allclose(model(input_ids).aux_loss, aux)


def F_linear(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(hidden, weight).float()


def test_reference_balancing_loss_sends_gradients_into_the_experts_through_the_block_output(make_base, input_ids):
    model = build(make_base, router_aux_loss_variant="reference")
    model.train()
    model(input_ids).aux_loss.backward()
    expert_grads = [p.grad for _, p in model.named_parameters_by_role("specialist")]
    assert any(g is not None and g.abs().sum() > 0 for g in expert_grads)


def test_set_num_specialists_can_change_the_top_k_with_the_expert_count(make_base, input_ids):
    model = build(make_base, num_specialists=2, top_k=2)
    model.set_num_specialists(0, num_experts_per_tok=1)
    assert (model.config.num_specialists, model.config.num_experts_per_tok) == (0, 1)
    assert all(mixture.router.top_k == 1 for mixture in model.mixtures)
    assert model(input_ids).logits.shape == (2, input_ids.shape[1], VOCAB)
    model.set_num_specialists(0, num_experts_per_tok=1)  # the same layout again is a no-op
    model.set_num_specialists(1, num_experts_per_tok=2)
    assert all(mixture.router.top_k == 2 and mixture.router.weight.shape[0] == 2 for mixture in model.mixtures)


def test_fixed_expert_weights_mix_expert_outputs_and_survive_a_reload(input_ids, tmp_path):
    model = CoMiGSForCausalLM.from_base(tiny_gpt2(), num_specialists=1, expert_mixing="uniform").eval()
    perturb_experts(model)
    with model.route_all_to("generalist_0"):
        generalist = model(input_ids).logits
    with model.route_all_to("specialist_0"):
        specialist = model(input_ids).logits
    uniform = model(input_ids).logits
    model.set_expert_weights([1.0, 0.0])  # the generalist alone
    torch.testing.assert_close(model(input_ids).logits, generalist)
    model.set_expert_weights([0.0, 1.0])
    torch.testing.assert_close(model(input_ids).logits, specialist)
    model.set_expert_weights([0.7, -0.4])
    fused = model(input_ids).logits
    model.save_pretrained(tmp_path / "fused")
    reloaded = CoMiGSForCausalLM.from_pretrained(tmp_path / "fused").eval()
    assert reloaded.config.expert_weights == [0.7, -0.4]
    torch.testing.assert_close(reloaded(input_ids).logits, fused)
    model.set_expert_weights(None)
    torch.testing.assert_close(model(input_ids).logits, uniform)


@pytest.mark.parametrize(
    ("kwargs", "weights", "message"),
    [
        ({"expert_mixing": "router"}, [0.5, 0.5], "need `expert_mixing='uniform'`"),
        ({"expert_mixing": "uniform"}, [1.0], "one finite weight per expert"),
        ({"expert_mixing": "uniform"}, [1.0, float("nan")], "one finite weight per expert"),
    ],
)
def test_bad_expert_weights_are_refused_and_leave_the_mixing_alone(kwargs, weights, message):
    model = CoMiGSForCausalLM.from_base(tiny_gpt2(), num_specialists=1, **kwargs)
    with pytest.raises(ValueError, match=message):
        model.set_expert_weights(weights)
    assert model.config.expert_weights is None
