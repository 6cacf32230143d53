"""The client step under every preset: what trains when, on which split, and what leaves the client; the reference
code's gradient leak against a hand-built two-step example; the paper's payload figures on a GPT-2 124M shape."""

from __future__ import annotations

import contextlib

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from conftest import tiny_gpt2
from transformers import GPT2Config, GPT2LMHeadModel

from comigs_hf import CoMiGSForCausalLM, parameter_role
from comigs_hf.algorithms import STRATEGIES, get_strategy
from comigs_hf.client import run_client_round
from comigs_hf.client_state import initial_client_state, initial_shared_state
from comigs_hf.data import ClientData
from comigs_hf.ranks import payload_parameters
from comigs_hf.strategies import partition_state_dict
from comigs_hf.trainer import TrainingConfig, _accumulated_step, check_accelerator, train_client_round

# train tokens are below 50, validation tokens 50 and above: every forward tells which split it read
DATA = ClientData(
    name="client",
    train=torch.randint(1, 50, (8, 16), generator=torch.Generator().manual_seed(0)),
    validation=torch.randint(50, 99, (8, 16), generator=torch.Generator().manual_seed(1)),
    test=torch.randint(1, 99, (4, 16), generator=torch.Generator().manual_seed(2)),
)
CFG = TrainingConfig(local_steps=4, router_update_every=2, router_steps=2, batch_size=4, micro_batch_size=2)
ACCELERATOR = Accelerator(cpu=True)


def client_model(strategy_name: str, **kwargs) -> CoMiGSForCausalLM:
    options = dict(num_generalists=1, num_specialists=1, lora_r=4, lora_alpha=8, top_k=2)
    options.update(kwargs)
    strategy = get_strategy(strategy_name)
    return CoMiGSForCausalLM.from_base(tiny_gpt2(), expert_mixing=strategy.expert_mixing, **options)


def trainable(model: CoMiGSForCausalLM, *roles: str) -> bool:
    return any(p.requires_grad for _, p in model.named_parameters_by_role(*roles))


def run_recorded(strategy_name: str, cfg: TrainingConfig = CFG, round_index: int = 1):
    """One round of one client; returns its update, its router before and after, and per forward: the split read
    and whether the experts and the router were trainable."""
    strategy = get_strategy(strategy_name)
    model = client_model(strategy_name)
    state = initial_client_state(model, 0, DATA.name, 1, seed=0)
    shared = initial_shared_state(model, strategy, 1, seed=0)
    records = []

    def record(module, args):
        split = "validation" if args[0].min() >= 50 else "train"
        records.append((split, trainable(module, "generalist", "specialist"), trainable(module, "router")))

    model.register_forward_pre_hook(record)
    router_before = {k: v.clone() for k, v in state.parameters.items() if parameter_role(k) == "router"}
    update = run_client_round(
        model,
        state,
        DATA,
        shared,
        strategy,
        cfg,
        round_index=round_index,
        total_rounds=round_index,
        seed=0,
        accelerator=ACCELERATOR,
    )
    return update, router_before, {k: v.cpu() for k, v in model.role_state_dict("router").items()}, records


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_each_preset_sends_exactly_its_shared_roles(name):
    update, *_ = run_recorded(name, round_index=5)  # a round PCL's clients combine in
    sent = {parameter_role(key) for key in update.shared}
    assert sent == set(STRATEGIES[name].shared_roles)
    assert all(torch.isfinite(t).all() for t in update.shared.values())


def test_pcl_clients_send_nothing_in_the_rounds_they_do_not_combine_in():
    assert run_recorded("pcl", round_index=4)[0].shared == {}


@pytest.mark.parametrize("name", [n for n, s in STRATEGIES.items() if s.router_training in ("validation", "train")])
def test_alternating_presets_train_the_router_alone_on_their_split(name):
    update, before, after, records = run_recorded(name)
    split = STRATEGIES[name].router_training
    router_steps = [r for r in records if r[2]]
    # 4 expert steps with a router phase every 2: 2 phases x 2 steps x 2 micro-batches
    assert len(router_steps) == 8 and all(r == (split, False, True) for r in router_steps)
    assert all(r == ("train", True, False) for r in records if not r[2])
    assert update.metrics["router_loss"] is not None
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("name", [n for n, s in STRATEGIES.items() if s.router_training == "joint"])
def test_joint_presets_train_experts_and_router_together_on_the_train_split(name):
    update, before, after, records = run_recorded(name)
    assert len(records) == 8 and all(r == ("train", True, True) for r in records)
    assert update.metrics["router_loss"] is None
    assert all(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("name", [n for n, s in STRATEGIES.items() if s.router_training == "none"])
def test_presets_without_router_never_train_it_nor_read_the_validation_split(name):
    update, before, after, records = run_recorded(name)
    assert len(records) == 8 and all(r == ("train", True, False) for r in records)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_joint_training_keeps_one_optimiser_holding_the_router():
    strategy = get_strategy("pfedmoe")
    model = client_model("pfedmoe")
    state = initial_client_state(model, 0, DATA.name, 1, seed=0)
    run_client_round(model, state, DATA, {}, strategy, CFG, round_index=1, total_rounds=2, seed=0,
                     accelerator=ACCELERATOR)  # fmt: skip
    assert len(state.expert_optimizer["param_groups"]) == 2 and state.router_optimizer == {}
    # the router's learning rate follows the experts' cosine: after 4 of 8 steps it is halfway down
    groups = state.expert_optimizer["param_groups"]
    assert groups[1]["lr"] / CFG.router_learning_rate == pytest.approx(groups[0]["lr"] / CFG.learning_rate)


# ---- the reference code's gradient leak ------------------------------------------------------------------------


def one_block(data: torch.Tensor) -> torch.Tensor:
    return data[:1]  # a split of one block: every sampled batch is that block


def gradients_at(model, snapshot, block, roles):
    """d loss(block) / d parameters of `roles`, with the model's expert and router tensors set to `snapshot`."""
    model.load_role_state_dict(snapshot)
    params = [p for _, p in model.named_parameters_by_role(*roles)]
    for param in params:
        param.requires_grad_(True)
    loss = model(block, labels=block).loss
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("leak", [False, True])
def test_the_gradient_leak_sums_the_other_phase_gradients_into_the_next_step(monkeypatch, leak):
    data = ClientData("client", one_block(DATA.train), one_block(DATA.validation), one_block(DATA.test))
    cfg = TrainingConfig(
        local_steps=1, router_update_every=1, router_steps=1, batch_size=1, micro_batch_size=1,
        max_grad_norm=None, reference_gradient_leak=leak,
    )  # fmt: skip
    model = client_model("comigs", top_k=1)
    state = initial_client_state(model, 0, data.name, 1, seed=0)
    steps = []  # per optimiser step: the role tensors before it and the gradients it applies
    original_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        names = {id(p): n for n, p in model.named_parameters()}
        grads = {names[id(p)]: p.grad.clone() for g in self.param_groups for p in g["params"] if p.grad is not None}
        steps.append((model.role_state_dict("generalist", "specialist", "router"), grads))
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    for _ in range(2):  # round 1: expert step, router step; round 2: expert step, router step
        train_client_round(model, state, data, cfg, 4, ACCELERATOR)
    monkeypatch.undo()
    (theta0, _), (theta1, router_grads), (theta2, expert_grads), _ = steps

    reference = client_model("comigs", top_k=1)
    router_names = [n for n, _ in reference.named_parameters_by_role("router")]
    expert_names = [n for n, _ in reference.named_parameters_by_role("generalist", "specialist")]
    validation_router = gradients_at(reference, theta1, data.validation, ["router"])
    train_router = gradients_at(reference, theta0, data.train, ["router"])
    for name, val, train in zip(router_names, validation_router, train_router):
        # the first router step: its validation gradient, plus under the leak the expert step's router gradient
        torch.testing.assert_close(router_grads[name], val + train if leak else val, rtol=1e-4, atol=1e-7)
    validation_experts = gradients_at(reference, theta1, data.validation, ["generalist", "specialist"])
    train_experts = gradients_at(reference, theta2, data.train, ["generalist", "specialist"])
    for name, val, train in zip(expert_names, validation_experts, train_experts):
        # the next round's expert step: its train gradient, plus under the leak the router phase's expert gradient
        torch.testing.assert_close(expert_grads[name], train + val if leak else train, rtol=1e-4, atol=1e-7)
    assert bool(state.leaked_gradients) is leak


def test_leaked_gradients_stay_with_their_client_when_clients_share_a_model():
    cfg = TrainingConfig(local_steps=1, router_update_every=1, router_steps=1, batch_size=2, micro_batch_size=2,
                         max_grad_norm=None, reference_gradient_leak=True)  # fmt: skip
    model = client_model("comigs")
    first = initial_client_state(model, 0, DATA.name, 1, seed=0)
    second = initial_client_state(model, 1, DATA.name, 1, seed=0)
    train_client_round(model, first, DATA, cfg, 2, ACCELERATOR)
    assert all(p.grad is None for p in model.parameters())  # nothing left on the shared model for the next client
    kept = {k: v.clone() for k, v in first.leaked_gradients.items()}
    train_client_round(model, second, DATA, cfg, 2, ACCELERATOR)
    assert kept.keys() == first.leaked_gradients.keys()
    assert all(torch.equal(kept[k], first.leaked_gradients[k]) for k in kept)


# ---- communication: the paper's figures on a GPT-2 124M shape -----------------------------------------------------


def gpt2_124m_upload(strategy_name: str) -> dict[str, int]:
    strategy = get_strategy(strategy_name)
    with torch.device("meta"):  # shapes only: nothing is allocated
        base = GPT2LMHeadModel(GPT2Config())
        model = CoMiGSForCausalLM.from_base(
            base, num_generalists=1, num_specialists=1, lora_r=8, attention_lora=True, attention_lora_r=8,
            expert_mixing=strategy.expert_mixing,
        )  # fmt: skip
    shared, _ = partition_state_dict(dict(model.named_parameters()), strategy)
    return payload_parameters(shared)


def test_payload_of_1g1s_with_attention_is_61_5_percent_of_the_two_expert_fedavg():
    comigs, fedavg = gpt2_124m_upload("comigs"), gpt2_124m_upload("fedavg")
    assert comigs == {"experts": 737_280, "attention": 442_368, "router": 0, "total": 1_179_648}
    assert fedavg == {"experts": 1_474_560, "attention": 442_368, "router": 0, "total": 1_916_928}
    assert round(100 * comigs["total"] / fedavg["total"], 1) == 61.5
    assert gpt2_124m_upload("local")["total"] == 0


class LossScalingAccelerator:
    """What `accelerator.backward` does under fp16 on a GPU (scale the loss, keep the scaler), runnable on CPU."""

    device = torch.device("cpu")

    def __init__(self, init_scale: float):
        self.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)

    def autocast(self):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()


def one_expert_step(accelerator, cfg: TrainingConfig = CFG) -> dict[str, torch.Tensor]:
    model = client_model("comigs")
    experts = [p for _, p in model.named_parameters_by_role("generalist", "specialist")]
    optimizer = torch.optim.SGD(experts, lr=1e-2)  # not Adam: its step hardly depends on the gradients' scale
    _accumulated_step(model, optimizer, experts, DATA.train, cfg, accelerator, torch.Generator().manual_seed(0))
    return {n: p.detach().clone() for n, p in model.named_parameters_by_role("generalist", "specialist")}


@pytest.mark.parametrize("max_grad_norm", [None, 1e-3])
def test_fp16_loss_scaling_steps_on_the_unscaled_gradients(max_grad_norm):
    cfg = TrainingConfig(batch_size=4, micro_batch_size=2, max_grad_norm=max_grad_norm)
    plain = one_expert_step(ACCELERATOR, cfg)
    scaled = one_expert_step(LossScalingAccelerator(init_scale=2.0**16), cfg)
    assert any(not torch.equal(v, client_model("comigs").state_dict()[k]) for k, v in plain.items())
    for name in plain:
        torch.testing.assert_close(scaled[name], plain[name], rtol=1e-5, atol=1e-7)


def test_fp16_loss_scaling_skips_a_step_whose_gradients_overflow():
    accelerator = LossScalingAccelerator(init_scale=1e38)  # the scaled loss is inf
    after = one_expert_step(accelerator)
    fresh = client_model("comigs").state_dict()
    assert all(torch.equal(value, fresh[name]) for name, value in after.items())
    assert accelerator.scaler.get_scale() < 1e38


def test_sharding_backends_fp8_and_the_leak_under_loss_scaling_are_refused_by_name():
    class Setup:
        def __init__(self, distributed_type=DistributedType.NO, mixed_precision="no", scaler=None):
            self.distributed_type, self.mixed_precision, self.scaler = distributed_type, mixed_precision, scaler

    check_accelerator(Setup(DistributedType.MULTI_GPU, "bf16"), CFG)
    with pytest.raises(ValueError, match="distributed type FSDP is not supported") as error:
        check_accelerator(Setup(DistributedType.FSDP, "fp8"), CFG)
    assert "mixed precision 'fp8' is not supported" in str(error.value)
    with pytest.raises(ValueError, match="DEEPSPEED"):
        check_accelerator(Setup(DistributedType.DEEPSPEED), CFG)
    leak = TrainingConfig(reference_gradient_leak=True)
    with pytest.raises(ValueError, match="reference_gradient_leak cannot run under fp16 loss scaling"):
        check_accelerator(Setup(mixed_precision="fp16", scaler=torch.amp.GradScaler("cpu")), leak)
