"""Every experts implementation of the mixture computes what its eager definition, a loop over the experts, computes.

The eager loop (`experts_implementation="eager"`, the CoMiGS reference code's mixture) runs every expert as the whole
MLP with its LoRA on the tokens that chose it (`torch.where`) and accumulates the weighted outputs; the fast layouts
(`experts_comigs.py`) run the base once per token and lay the token/expert pairs out grouped by expert (training-sized
batches, torch's grouped matmul or a loop over the experts) or in token order with masked factors (decoding). Each is
picked through the config, as transformers' MoE models pick theirs, and must give the eager loop's logits, loss and
every gradient in float32.
"""

import copy

import pytest
import torch
from conftest import BASES, VOCAB, tiny_llama
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LogitsProcessor, LogitsProcessorList

from comigs_hf import CoMiGSForCausalLM, experts_comigs
from comigs_hf.experts_comigs import EXPERTS_IMPLEMENTATIONS

# every implementation but the definition itself: "auto" takes token order for these small calls' decoding steps
# and grouping for their training-sized batches
FAST = [name for name in EXPERTS_IMPLEMENTATIONS if name != "eager"]
GROUPED = ["grouped", "grouped_loop"]


def _trained_looking(make_base, **kwargs) -> CoMiGSForCausalLM:
    options = dict(num_generalists=1, num_specialists=3, lora_r=4, lora_alpha=8, router_aux_loss_coef=0.01)
    if kwargs.get("experts_implementation") == "grouped" and not experts_comigs.GROUPED_MM:
        pytest.skip("this torch has no torch.nn.functional.grouped_mm")
    model = CoMiGSForCausalLM.from_base(make_base(0), **{**options, **kwargs})
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for name, parameter in model.named_parameters():
            if "lora_B" in name or "router" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model.train()


def _logits_loss_and_gradients(model: torch.nn.Module, input_ids: torch.Tensor):
    model.zero_grad(set_to_none=True)
    if input_ids.shape[1] > 1:
        out = model(input_ids, labels=input_ids)
        loss = out.loss
    else:  # one token has no next token in the batch: predict the token after its id
        out = model(input_ids)
        loss = torch.nn.functional.cross_entropy(out.logits[:, -1], (input_ids[:, -1] + 1) % VOCAB)
    loss.backward()
    # no gradient at all (None) counts as zero: a router under uniform mixing, an expert no token chose
    gradients = {id(p): torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()}
    return out.logits.detach(), loss.detach(), gradients


def eager_copy(model: CoMiGSForCausalLM) -> CoMiGSForCausalLM:
    eager = copy.deepcopy(model)
    eager.set_experts_implementation("eager")
    return eager


def assert_matches_the_eager_loop(model: CoMiGSForCausalLM, input_ids: torch.Tensor) -> None:
    reference = eager_copy(model)
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


@pytest.mark.parametrize("implementation", FAST)
@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("base", sorted(BASES))
def test_every_experts_implementation_gives_the_eager_loops_outputs_and_gradients(base, top_k, implementation):
    model = _trained_looking(BASES[base], top_k=top_k, experts_implementation=implementation)
    input_ids = torch.randint(0, VOCAB, (3, 24), generator=torch.Generator().manual_seed(0))
    assert_matches_the_eager_loop(model, input_ids)


class _RecordOps(TorchDispatchMode):
    """Records every op run under it: its name (no in-place `_`), its first argument and its output's shape."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else None
        self.calls.append((func.overloadpacket.__name__.rstrip("_"), args[0] if args else None, shape))
        return out


@pytest.mark.parametrize("implementation", GROUPED)
@pytest.mark.parametrize("base", sorted(BASES))
def test_top1_moves_token_rows_to_their_experts_and_back_by_gathers_alone(base, implementation):
    # with one pair per token, grouping by expert permutes the rows: backward gathers them back, where
    # index_select's own backward would zero-fill a buffer of the tokens' rows and scatter-add into it
    model = _trained_looking(BASES[base], top_k=1, experts_implementation=implementation)
    input_ids = torch.randint(0, VOCAB, (3, 24), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids, labels=input_ids).loss
    with _RecordOps() as recorded:
        loss.backward()
    scatters = [shape for name, _, shape in recorded.calls if name in ("index_add", "scatter_add")]
    assert [shape for shape in scatters if shape[0] == input_ids.numel()] == []


@pytest.mark.parametrize("implementation", GROUPED)
@pytest.mark.parametrize("top_k", [1, 2])
def test_gate_and_up_projections_share_one_gather_of_the_hidden_states(top_k, implementation):
    # Llama's MLP hands the same hidden states to gate_proj and up_proj: their rows in layout order are made once
    # per mixture call (and kept once for backward), and dropped when the call ends
    model = _trained_looking(BASES["llama"], top_k=top_k, experts_implementation=implementation)
    mlp_inputs = set()
    for mixture in model.mixtures:
        mixture.register_forward_pre_hook(lambda module, args: mlp_inputs.add(args[0].data_ptr()))
    input_ids = torch.randint(0, VOCAB, (3, 24), generator=torch.Generator().manual_seed(0))
    with _RecordOps() as recorded:
        model(input_ids, labels=input_ids)
    gathers = [source for name, source, _ in recorded.calls if name == "index_select"]
    assert sum(source.data_ptr() in mlp_inputs for source in gathers) == len(model.mixtures) == 2
    assert all(mixture._active.pairs is None for mixture in model.mixtures)


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("base", sorted(BASES))
def test_one_token_in_token_order_gives_the_eager_loops_outputs_and_gradients(base, top_k):
    # a single token (decoding at batch 1) has every chosen factor's codes broadcast over its pairs
    model = _trained_looking(BASES[base], top_k=top_k, experts_implementation="token_order")
    for seed in range(3):
        input_ids = torch.randint(0, VOCAB, (1, 1), generator=torch.Generator().manual_seed(seed))
        assert_matches_the_eager_loop(model, input_ids)


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("base", sorted(BASES))
def test_greedy_decoding_gives_the_eager_loops_logits_at_every_step(base, top_k):
    model = _trained_looking(BASES[base], top_k=top_k).eval()
    reference = eager_copy(model)
    prompt = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    options = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    ours, theirs = model.generate(prompt, **options), reference.generate(prompt, **options)
    assert torch.equal(ours.sequences, theirs.sequences)
    for step, expected in zip(ours.logits, theirs.logits, strict=True):
        torch.testing.assert_close(step, expected, rtol=1e-5, atol=1e-5)


def test_a_model_first_run_under_inference_mode_still_trains_in_token_order():
    experts_comigs._expert_blocks.cache_clear()  # so that the inference-mode call below builds the masks
    model = _trained_looking(BASES["gpt2"], top_k=2, experts_implementation="token_order")
    input_ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model(input_ids)
    model(input_ids, labels=input_ids).loss.backward()  # reuses the masks: they must not be inference tensors
    assert next(model.lora_layers()).lora_B["generalist_0"].weight.grad.abs().sum() > 0


PATCHES = [("forward hook", "auto"), ("forward replaced on the instance", "auto"), ("hook on every module", "eager")]


@pytest.mark.parametrize(("patch", "implementation"), PATCHES)
def test_a_hooked_or_patched_base_projection_still_runs_through_its_call(patch, implementation):
    # the fast layouts call a plain nn.Linear/Conv1D's matmul directly, but never past a hook of its own or an
    # accelerate-style patch; hooks on every module see its call in the eager loop
    model = _trained_looking(BASES["gpt2"], top_k=2, experts_implementation=implementation).eval()
    layer = model.mixtures[0]._projections[0].base_layer
    input_ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))
    silenced = copy.deepcopy(model)  # what a base projection answering zeros gives
    with torch.no_grad():
        unpatched = model(input_ids).logits
        silenced.mixtures[0]._projections[0].base_layer.weight.zero_()
        silenced.mixtures[0]._projections[0].base_layer.bias.zero_()
        expected = silenced(input_ids).logits
        if patch == "forward hook":
            layer.register_forward_hook(lambda module, args, output: output * 0)
        elif patch == "hook on every module":

            def silence(module, args, output):
                return output * 0 if module is layer else output

            handle = torch.nn.modules.module.register_module_forward_hook(silence)
        else:
            original = layer.forward
            layer.forward = lambda x: original(x) * 0
        try:
            patched = model(input_ids).logits
        finally:
            if patch == "hook on every module":
                handle.remove()
    assert not torch.allclose(unpatched, expected)
    torch.testing.assert_close(patched, expected, rtol=1e-6, atol=1e-6)


def test_generate_stacks_each_projections_factors_once_for_the_whole_call():
    model = _trained_looking(BASES["llama"], top_k=2).eval()
    prompt = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    stacks_at_each_step = []

    class RecordStacks(LogitsProcessor):
        def __call__(self, input_ids, scores):
            stacks_at_each_step.append(dict(model._routing_state.stacked_factors))
            return scores

    model.generate(prompt, max_new_tokens=5, do_sample=False, logits_processor=LogitsProcessorList([RecordStacks()]))
    projections = {projection for mixture in model.mixtures for projection in mixture._projections}
    assert len(stacks_at_each_step) == 5 and set(stacks_at_each_step[0]) == projections
    for step in stacks_at_each_step[1:]:  # the very tensors of the first step: nothing re-stacked per token
        assert all(step[p][0] is stacks_at_each_step[0][p][0] for p in projections)
    assert model._routing_state.stacked_factors is None  # nothing kept past the call


def test_generate_follows_expert_weights_changed_between_calls():
    model = _trained_looking(BASES["gpt2"], top_k=2).eval()
    prompt = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    options = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    fresh = copy.deepcopy(model)
    model.generate(prompt, **options)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.data.copy_(parameter * 3)
    fresh.load_state_dict(model.state_dict())
    for ours, expected in zip(model.generate(prompt, **options).logits, fresh.generate(prompt, **options).logits):
        torch.testing.assert_close(ours, expected, rtol=0, atol=0)


@pytest.mark.parametrize("implementation", FAST)
def test_uniform_mixing_with_fusion_weights_gives_the_eager_loops_outputs(implementation):
    model = _trained_looking(BASES["gpt2"], top_k=1, expert_mixing="uniform", experts_implementation=implementation)
    model.set_expert_weights([0.7, -0.2, 0.4, 0.3])  # fixed weights that do not sum to 1
    input_ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    assert_matches_the_eager_loop(model, input_ids)


def test_every_experts_implementation_decodes_the_same_tokens():
    model = _trained_looking(BASES["llama"], top_k=2).eval()
    prompt = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))
    generated = {}
    for implementation in EXPERTS_IMPLEMENTATIONS:
        model.set_experts_implementation(implementation)
        with torch.no_grad():
            generated[implementation] = model.generate(prompt, max_new_tokens=8, do_sample=False)
    for implementation in FAST:
        assert torch.equal(generated[implementation], generated["eager"]), implementation


@pytest.mark.parametrize("implementation", ["grouped_loop", "eager"])
def test_only_the_experts_tokens_chose_run_in_the_loops(implementation):
    model = _trained_looking(BASES["gpt2"], top_k=1, experts_implementation=implementation)
    input_ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with model.route_all_to("specialist_1"):
        model(input_ids, labels=input_ids).loss.backward()
    layer = next(model.lora_layers())
    assert layer.lora_B["specialist_1"].weight.grad.abs().sum() > 0
    # the other experts' factors never ran, not even on zeros: LoRA work is paid by routed pairs only
    assert all(layer.lora_B[name].weight.grad is None for name in ("generalist_0", "specialist_0", "specialist_2"))


@pytest.mark.parametrize("implementation", FAST)
def test_ranks_and_widths_the_grouped_matmul_cannot_take_fall_back_to_the_loop_with_the_same_outputs(implementation):
    # torch's CPU grouped matmul wants rows of whole multiples of 16 bytes: a rank of 6 in float32 is not
    make_base = lambda seed: tiny_llama(seed, intermediate_size=42)  # noqa: E731
    model = _trained_looking(make_base, lora_r=6, top_k=2, experts_implementation=implementation)
    input_ids = torch.randint(0, VOCAB, (3, 24), generator=torch.Generator().manual_seed(0))
    assert_matches_the_eager_loop(model, input_ids)


def test_decoding_follows_expert_weights_however_they_were_changed():
    model = _trained_looking(BASES["gpt2"], top_k=2, experts_implementation="token_order").eval()
    input_ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))
    fresh = copy.deepcopy(model)
    with torch.no_grad():
        model(input_ids)  # a decoding-style call first
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.data.copy_(parameter * 3)  # through `.data`: no version bump, no new storage
        fresh.load_state_dict(model.state_dict())
        torch.testing.assert_close(model(input_ids).logits, fresh(input_ids).logits, rtol=0, atol=0)


def test_an_unknown_experts_implementation_is_refused_naming_the_known_ones():
    with pytest.raises(ValueError, match="experts_implementation='fast' is not a CoMiGS mixture layout; choose one"):
        _trained_looking(BASES["gpt2"], experts_implementation="fast")
    model = _trained_looking(BASES["gpt2"])
    with pytest.raises(ValueError, match="grouped_loop"):
        model.set_experts_implementation("grouped_mm")
    assert model.config._experts_implementation == "auto"


def test_the_experts_implementation_is_the_mixtures_alone_and_a_reload_may_choose_another(tmp_path):
    model = _trained_looking(BASES["llama"], experts_implementation="grouped_loop")
    assert model.config._experts_implementation == "grouped_loop"
    assert model.config.text_config._experts_implementation is None  # the base's own loader would refuse the name
    model.config.base_model_name_or_path = None
    model.save_pretrained(tmp_path / "client", include_base=True)
    reloaded = CoMiGSForCausalLM.from_pretrained(tmp_path / "client", experts_implementation="eager")
    assert reloaded.config._experts_implementation == "eager"
    assert CoMiGSForCausalLM.from_pretrained(tmp_path / "client").config._experts_implementation == "auto"
