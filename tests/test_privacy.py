"""Differential privacy of the shared update: the client clips, the server refuses what is not clipped and adds
noise of the stated scale to the mean, and the accountant's epsilon matches the RDP bound computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from conftest import tiny_gpt2
from federated_setup import finished, launch, tiny_overrides
from safetensors.torch import load_file

from comigs_hf import CoMiGSForCausalLM, parameter_role
from comigs_hf.algorithms import get_strategy
from comigs_hf.algorithms.privacy import clip_update, privacy_spent, update_norm
from comigs_hf.client import run_client_round
from comigs_hf.client_state import initial_client_state, initial_shared_state
from comigs_hf.config import load_config
from comigs_hf.data import ClientData
from comigs_hf.recipe import run
from comigs_hf.server import InvalidUpdate, aggregate_updates
from comigs_hf.trainer import ClientUpdate, TrainingConfig

REFERENCE = {"a": torch.ones(3), "b": torch.zeros(2, 2)}


def shifted(delta_a: list[float], delta_b: list[list[float]]) -> dict[str, torch.Tensor]:
    return {"a": REFERENCE["a"] + torch.tensor(delta_a), "b": REFERENCE["b"] + torch.tensor(delta_b)}


def test_an_update_beyond_the_clipping_norm_is_scaled_onto_it_along_its_direction():
    shared = shifted([3.0, 0.0, 0.0], [[0.0, 4.0], [0.0, 0.0]])  # ||update|| = 5
    clipped = clip_update(shared, REFERENCE, 1.0)
    assert update_norm(clipped, REFERENCE) == pytest.approx(1.0, rel=1e-6)
    torch.testing.assert_close(clipped["a"] - REFERENCE["a"], torch.tensor([0.6, 0.0, 0.0]))
    torch.testing.assert_close(clipped["b"] - REFERENCE["b"], torch.tensor([[0.0, 0.8], [0.0, 0.0]]))


def test_an_update_within_the_clipping_norm_leaves_the_client_unchanged():
    shared = shifted([0.3, 0.0, 0.0], [[0.0, 0.4], [0.0, 0.0]])
    clipped = clip_update(shared, REFERENCE, 1.0)
    assert all(torch.equal(clipped[key], shared[key]) for key in shared)


def test_the_client_step_sends_an_update_clipped_to_the_norm():
    data = ClientData(
        name="client",
        train=torch.randint(1, 99, (8, 16), generator=torch.Generator().manual_seed(0)),
        validation=torch.randint(1, 99, (8, 16), generator=torch.Generator().manual_seed(1)),
        test=torch.randint(1, 99, (4, 16), generator=torch.Generator().manual_seed(2)),
    )
    cfg = TrainingConfig(local_steps=4, router_update_every=2, router_steps=1, batch_size=4, micro_batch_size=2)
    norms = {}
    for clipping in (None, 1e-3):
        strategy = get_strategy("comigs", dp_clipping_norm=clipping)
        model = CoMiGSForCausalLM.from_base(tiny_gpt2(), num_generalists=1, num_specialists=1, lora_r=4, top_k=2)
        state = initial_client_state(model, 0, data.name, 1, seed=0)
        shared = initial_shared_state(model, strategy, 1, seed=0)
        update = run_client_round(
            model,
            state,
            data,
            shared,
            strategy,
            cfg,
            round_index=1,
            total_rounds=1,
            seed=0,
            accelerator=Accelerator(cpu=True),
        )
        norms[clipping] = update_norm(update.shared, shared)
    assert norms[None] > 1e-2  # the unclipped update is well beyond the bound
    assert norms[1e-3] == pytest.approx(1e-3, rel=1e-5)


def _update(client_id: int, shared: dict) -> ClientUpdate:
    return ClientUpdate(client_id, 1, shared, train_tokens=100 * (client_id + 1))


def test_the_server_adds_noise_of_std_z_times_c_over_m_to_the_equal_weight_mean():
    reference = {"a": torch.zeros(200_000), "b": torch.zeros(1, 2)}
    strategy = get_strategy("comigs", dp_clipping_norm=2.0, dp_noise_multiplier=1.5)
    assert strategy.weighting == "uniform"  # what the noise scale assumes; token counts would not matter
    updates = [_update(i, {key: value.clone() for key, value in reference.items()}) for i in range(4)]
    torch.manual_seed(0)
    first = aggregate_updates(strategy, updates, reference)["a"]
    torch.manual_seed(0)
    second = aggregate_updates(strategy, updates, reference)["a"]
    assert float(first.std()) == pytest.approx(1.5 * 2.0 / 4, rel=0.01)  # z C / m = 0.75; the estimate's sd ~0.2%
    assert abs(float(first.mean())) < 0.01
    assert not torch.equal(first, second)  # no public seed regenerates the noise


def test_without_noise_the_clipped_updates_are_averaged_with_equal_weights():
    strategy = get_strategy("comigs", dp_clipping_norm=10.0)
    updates = [_update(0, shifted([1.0, 0, 0], [[0, 0], [0, 0]])), _update(1, shifted([3.0, 0, 0], [[0, 0], [0, 0]]))]
    combined = aggregate_updates(strategy, updates, REFERENCE)
    torch.testing.assert_close(combined["a"], torch.tensor([3.0, 1.0, 1.0]))  # 1 + (1 + 3) / 2, not token-weighted


def test_the_server_refuses_an_update_that_was_not_clipped():
    strategy = get_strategy("comigs", dp_clipping_norm=1.0, dp_noise_multiplier=1.0)
    honest = _update(0, clip_update(shifted([3.0, 0, 0], [[0, 0], [0, 0]]), REFERENCE, 1.0))
    unclipped = _update(1, shifted([1.5, 0, 0], [[0, 0], [0, 0]]))
    aggregate_updates(strategy, [honest], REFERENCE)
    with pytest.raises(InvalidUpdate, match="client 1.*1.5"):
        aggregate_updates(strategy, [honest, unclipped], REFERENCE)


def _epsilon_by_hand(noise_multiplier: float, rounds: int, delta: float) -> float:
    # each round is a Gaussian mechanism of sensitivity 1 and std z: RDP alpha / (2 z^2) at every order alpha,
    # composed by addition; converted to (epsilon, delta) with Balle et al.'s (2020) bound, minimised over the orders
    orders = np.array([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)), dtype=float)
    rdp = rounds * orders / (2 * noise_multiplier**2)
    epsilon = rdp - (math.log(delta) + np.log(orders)) / (orders - 1) + np.log((orders - 1) / orders)
    return float(epsilon.min())


def test_epsilon_per_round_is_the_rdp_bound_of_the_composed_gaussian_mechanism():
    epsilons = privacy_spent(1.1, 3, delta=1e-5)
    assert epsilons == pytest.approx([_epsilon_by_hand(1.1, t, 1e-5) for t in (1, 2, 3)], rel=1e-9)
    assert epsilons[0] < epsilons[1] < epsilons[2]
    assert privacy_spent(0.0, 2) == [math.inf, math.inf]  # clipping alone promises nothing


@pytest.mark.parametrize(
    ("name", "options", "reason"),
    [
        ("comigs", {"weighting": "train_tokens"}, "weighting 'uniform'"),
        ("comigs", {"aggregation": "coordinate_median"}, "aggregation 'weighted_mean'"),
        ("pcl", {}, "a server average"),
        ("local", {}, "shared tensors"),
    ],
)
def test_differential_privacy_needs_an_equal_weight_server_mean_of_shared_tensors(name, options, reason):
    with pytest.raises(ValueError, match=reason):
        get_strategy(name, dp_clipping_norm=1.0, **options)


def test_noise_without_a_clipping_norm_is_refused():
    with pytest.raises(ValueError, match="set dp_clipping_norm too"):
        get_strategy("comigs", dp_noise_multiplier=1.0)


def test_the_clipping_norm_bounds_the_updates_the_server_accepts():
    assert get_strategy("comigs", dp_clipping_norm=0.5).max_update_norm == pytest.approx(0.5 * (1 + 1e-4))
    assert get_strategy("comigs", dp_clipping_norm=0.5, max_update_norm=0.1).max_update_norm == 0.1


def test_a_private_run_records_epsilon_after_every_round_in_results(world, tmp_path):
    extra = {"dp_clipping_norm": 0.05, "dp_noise_multiplier": 0.8, "dp_delta": 1e-4, "rounds": 2, "eval_every": 2}
    cfg = load_config(None, tiny_overrides(*world, tmp_path / "out", save_models=False, **extra))
    results = run(cfg, Accelerator(cpu=True))
    privacy = results["privacy"]
    assert privacy["epsilon_per_round"] == pytest.approx([_epsilon_by_hand(0.8, t, 1e-4) for t in (1, 2)])
    assert privacy["epsilon"] == privacy["epsilon_per_round"][-1]
    assert (privacy["clipping_norm"], privacy["noise_multiplier"], privacy["delta"]) == (0.05, 0.8, 1e-4)
    assert results["weighting"] == "uniform" and all(math.isfinite(c["test_loss"]) for c in results["clients"])


def test_every_process_adds_the_same_noise_so_that_all_clients_share_one_global(world, tmp_path):
    # every Accelerate rank runs the server step: each drawing its own noise would split the federation in two
    extra = {"dp_clipping_norm": 0.05, "dp_noise_multiplier": 1.0, "rounds": 1, "plots": False}
    finished(launch(world, tmp_path / "p2", num_processes=2, **extra))
    generalists = []
    for path in sorted((tmp_path / "p2" / "clients").glob("*/model.safetensors")):
        tensors = load_file(path)
        generalists.append({k: v for k, v in tensors.items() if parameter_role(k) == "generalist"})
    assert len(generalists) == 4 and generalists[0]
    for other in generalists[1:]:
        assert other.keys() == generalists[0].keys()
        assert all(torch.equal(other[key], generalists[0][key]) for key in other)
