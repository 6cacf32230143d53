import math

import pytest
import torch

from comigs_hf.aggregation import (
    AGGREGATORS,
    aggregate_coordinate_median,
    aggregate_krum,
    aggregate_norm_weighted_mean,
    aggregate_product_svd,
    aggregate_trimmed_mean,
    aggregate_weighted_mean,
    get_aggregator,
    trust_weights,
)
from comigs_hf.algorithms import get_strategy
from comigs_hf.strategies import aggregation_weights, capped_shares


def test_weighted_mean_matches_hand_computation():
    states = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 6.0])}]
    # (1 * 1 + 3 * 3) / 4 = 2.5 and (1 * 2 + 3 * 6) / 4 = 5
    result = aggregate_weighted_mean(states, weights=[1, 3])
    torch.testing.assert_close(result["w"], torch.tensor([2.5, 5.0]))


def test_weights_are_normalised():
    states = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 6.0])}]
    torch.testing.assert_close(
        aggregate_weighted_mean(states, [100, 300])["w"], aggregate_weighted_mean(states, [0.25, 0.75])["w"]
    )


def test_zero_weight_client_does_not_count():
    states = [{"w": torch.tensor([1.0])}, {"w": torch.tensor([50.0])}]
    torch.testing.assert_close(aggregate_weighted_mean(states, [1, 0])["w"], torch.tensor([1.0]))


def test_result_keeps_the_first_clients_key_order_and_dtype():
    states = [
        {"b": torch.ones(2, dtype=torch.bfloat16), "a": torch.ones(1, dtype=torch.float16)},
        {"a": torch.zeros(1, dtype=torch.float16), "b": torch.zeros(2, dtype=torch.bfloat16)},
    ]
    result = aggregate_weighted_mean(states, [1, 1])
    assert list(result) == ["b", "a"]
    assert result["b"].dtype == torch.bfloat16
    assert result["a"].dtype == torch.float16


def test_low_precision_states_are_accumulated_in_float64():
    # a bfloat16 running sum starting at 256 / 4 = 64 (spacing 0.5) would drop every 1 / 4 and return 64
    values = [256.0, 1.0, 1.0, 1.0]
    states = [{"w": torch.tensor([value], dtype=torch.bfloat16)} for value in values]
    expected = torch.tensor([sum(values) / 4], dtype=torch.float64).to(torch.bfloat16)
    assert torch.equal(aggregate_weighted_mean(states, [1, 1, 1, 1])["w"], expected)


def test_result_never_aliases_an_input():
    state = {"w": torch.tensor([1.0, 2.0])}
    result = aggregate_weighted_mean([state], [1])
    result["w"].add_(10)
    torch.testing.assert_close(state["w"], torch.tensor([1.0, 2.0]))


def test_missing_key_is_rejected_naming_client_and_key():
    states = [{"a": torch.zeros(1), "b": torch.zeros(1)}, {"a": torch.zeros(1)}]
    with pytest.raises(ValueError, match="Client 1 is missing key 'b'"):
        aggregate_weighted_mean(states, [1, 1])


def test_unexpected_key_is_rejected_naming_client_and_key():
    states = [{"a": torch.zeros(1)}, {"a": torch.zeros(1), "extra": torch.zeros(1)}]
    with pytest.raises(ValueError, match="Client 1 sent key 'extra'"):
        aggregate_weighted_mean(states, [1, 1])


def test_mismatched_shapes_are_rejected_naming_the_key():
    states = [{"router.weight": torch.zeros(2, 4)}, {"router.weight": torch.zeros(3, 4)}]
    with pytest.raises(
        ValueError, match=r"Key 'router.weight': client 1 has shape \(3, 4\) but client 0 has \(2, 4\)"
    ):
        aggregate_weighted_mean(states, [1, 1])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_rejected_naming_client_and_key(bad):
    states = [{"w": torch.zeros(2)}, {"w": torch.tensor([0.0, bad])}]
    with pytest.raises(ValueError, match="Key 'w': client 1 sent non-finite values"):
        aggregate_weighted_mean(states, [1, 1])


def test_non_finite_values_are_rejected_even_from_a_zero_weight_client():
    states = [{"w": torch.zeros(1)}, {"w": torch.tensor([float("nan")])}]
    with pytest.raises(ValueError, match="client 1 sent non-finite"):
        aggregate_weighted_mean(states, [1, 0])


def test_integer_tensors_are_rejected():
    with pytest.raises(ValueError, match="Key 'steps': client 0 sent dtype torch.int64"):
        aggregate_weighted_mean([{"steps": torch.tensor([3])}], [1])


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ([1.0, float("nan")], "Weight of client 1 is not finite"),
        ([float("inf"), 1.0], "Weight of client 0 is not finite"),
        ([1.0, -1.0], "Weight of client 1 is negative"),
        ([0, 0], "All 2 client weights are zero"),
        ([1.0], "Got 1 weights for 2 client states"),
    ],
)
def test_bad_weights_are_rejected(weights, message):
    states = [{"w": torch.zeros(1)}, {"w": torch.ones(1)}]
    with pytest.raises(ValueError, match=message):
        aggregate_weighted_mean(states, weights)


@pytest.mark.parametrize("rule", sorted(AGGREGATORS))
def test_no_states_is_an_error(rule):
    with pytest.raises(ValueError, match="zero client states"):
        get_aggregator(rule)([], [])


def test_trimmed_mean_matches_hand_computation():
    # per coordinate, trim_ratio 0.2 of 5 clients cuts one value at each end
    columns = [[1.0, 2.0, 3.0, 4.0, 100.0], [3.0, -50.0, 2.0, 1.0, 0.0]]
    states = [{"w": torch.tensor([first, second])} for first, second in zip(*columns)]
    result = aggregate_trimmed_mean(states, [1] * 5, trim_ratio=0.2)
    # (2 + 3 + 4) / 3 = 3 and (0 + 1 + 2) / 3 = 1
    torch.testing.assert_close(result["w"], torch.tensor([3.0, 1.0]))


def test_trimmed_mean_averages_survivors_uniformly_whatever_the_weights():
    states = [{"w": torch.tensor([value])} for value in [1.0, 2.0, 3.0, 4.0, 100.0]]
    result = aggregate_trimmed_mean(states, [1000, 1, 1, 1, 1000], trim_ratio=0.2)
    torch.testing.assert_close(result["w"], torch.tensor([3.0]))


def test_trimmed_mean_without_trimming_is_the_plain_mean():
    states = [{"w": torch.tensor([value], dtype=torch.bfloat16)} for value in [1.0, 2.0, 6.0]]
    result = aggregate_trimmed_mean(states, [1, 1, 1], trim_ratio=0.0)
    assert result["w"].dtype == torch.bfloat16
    torch.testing.assert_close(result["w"], torch.tensor([3.0], dtype=torch.bfloat16))


def test_trimmed_mean_cuts_nothing_with_too_few_clients():
    states = [{"w": torch.tensor([0.0])}, {"w": torch.tensor([10.0])}]
    # floor(0.2 * 2) = 0
    torch.testing.assert_close(aggregate_trimmed_mean(states, [1, 1], trim_ratio=0.2)["w"], torch.tensor([5.0]))


@pytest.mark.parametrize("trim_ratio", [0.5, -0.1])
def test_trimmed_mean_rejects_a_ratio_leaving_no_client(trim_ratio):
    with pytest.raises(ValueError, match=r"trim_ratio must be in \[0, 0.5\)"):
        aggregate_trimmed_mean([{"w": torch.zeros(1)}], [1], trim_ratio=trim_ratio)


def test_trimmed_mean_shares_the_state_checks():
    states = [{"w": torch.zeros(1)}, {"w": torch.tensor([float("nan")])}]
    with pytest.raises(ValueError, match="Key 'w': client 1 sent non-finite values"):
        aggregate_trimmed_mean(states, [1, 1])


def test_registry_holds_both_rules():
    assert get_aggregator("weighted_mean") is aggregate_weighted_mean
    assert get_aggregator("trimmed_mean") is aggregate_trimmed_mean


def test_unknown_rule_lists_the_known_ones():
    with pytest.raises(
        ValueError,
        match="Unknown aggregation 'median'; known: coordinate_median, krum, norm_weighted_mean, product_svd",
    ):
        get_aggregator("median")


def _adapter(a: list[list[float]], b: list[list[float]]) -> dict[str, torch.Tensor]:
    return {"m.lora_A.e.weight": torch.tensor(a), "m.lora_B.e.weight": torch.tensor(b)}


def test_product_svd_refactorises_the_weighted_mean_update_by_hand():
    # client 0: B A = [[2, 0], [0, 0]]; client 1 (rank 1 of 2, zero-padded): B A = [[0, 0], [0, 4]]
    first = _adapter([[1.0, 0.0], [0.0, 0.0]], [[2.0, 0.0], [0.0, 0.0]])
    second = _adapter([[0.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [4.0, 0.0]])
    result = aggregate_product_svd([first, second], weights=[3, 1])
    a, b = result["m.lora_A.e.weight"], result["m.lora_B.e.weight"]
    # mean 0.75 * [[2, 0], [0, 0]] + 0.25 * [[0, 0], [0, 4]] = diag(1.5, 1): singular values 1.5 then 1
    torch.testing.assert_close(b @ a, torch.tensor([[1.5, 0.0], [0.0, 1.0]]))
    torch.testing.assert_close(a @ a.T, torch.eye(2))  # A = V^T: orthonormal rows
    # a rank-1 client takes the leading slices: the best rank-1 approximation, diag(1.5, 0)
    torch.testing.assert_close(b[:, :1] @ a[:1], torch.tensor([[1.5, 0.0], [0.0, 0.0]]))


def test_product_svd_keeps_rank_and_averages_other_keys():
    torch.manual_seed(0)
    states = [
        {**_adapter(torch.randn(3, 6).tolist(), torch.randn(5, 3).tolist()), "router.weight": torch.full((2, 2), v)}
        for v in (1.0, 3.0)
    ]
    result = aggregate_product_svd(states, weights=[1, 1])
    assert result["m.lora_A.e.weight"].shape == (3, 6) and result["m.lora_B.e.weight"].shape == (5, 3)
    torch.testing.assert_close(result["router.weight"], torch.full((2, 2), 2.0))
    mean = sum(s["m.lora_B.e.weight"] @ s["m.lora_A.e.weight"] for s in states) / 2
    u, s, vh = torch.linalg.svd(mean)
    best = (u[:, :3] * s[:3]) @ vh[:3]  # the mean has rank up to 5, the result its best rank-3 approximation
    torch.testing.assert_close(result["m.lora_B.e.weight"] @ result["m.lora_A.e.weight"], best)


def test_norm_weighted_mean_weights_by_the_update_norm_by_hand():
    # ||B A||_F: client 0 has B A = [[3]] (norm 3), client 1 [[1]] (norm 1): weights 0.75 and 0.25
    first = _adapter([[1.0]], [[3.0]])
    second = _adapter([[1.0]], [[1.0]])
    result = aggregate_norm_weighted_mean([first, second], weights=[1, 100])
    torch.testing.assert_close(result["m.lora_A.e.weight"], torch.tensor([[1.0]]))
    torch.testing.assert_close(result["m.lora_B.e.weight"], torch.tensor([[0.75 * 3 + 0.25 * 1]]))


def test_norm_weighted_mean_zero_pads_lower_ranks_and_falls_back_on_zero_updates():
    # client 1 has rank 1 of 2: its second row of A and column of B are zero, so they pull the mean toward zero
    first = _adapter([[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0]])
    second = _adapter([[1.0, 0.0], [0.0, 0.0]], [[1.0, 0.0]])
    result = aggregate_norm_weighted_mean([first, second], weights=[1, 1])
    norm_0, norm_1 = 2**0.5, 1.0
    w0 = norm_0 / (norm_0 + norm_1)
    torch.testing.assert_close(result["m.lora_B.e.weight"], torch.tensor([[1.0, w0]]))
    # round 1: every B is zero, so no update has a norm and the given weights decide
    zero_b = [_adapter([[2.0]], [[0.0]]), _adapter([[4.0]], [[0.0]])]
    torch.testing.assert_close(
        aggregate_norm_weighted_mean(zero_b, [1, 3])["m.lora_A.e.weight"], torch.tensor([[3.5]])
    )


def test_trust_weights_are_the_softmax_of_minus_the_perplexities_by_hand():
    # softmax(-[10, 11, inf]): e^0 / (1 + e^-1) and e^-1 / (1 + e^-1); a diverged client weighs nothing
    weights = trust_weights([10.0, 11.0, float("inf")])
    assert weights == pytest.approx([1 / (1 + math.exp(-1)), math.exp(-1) / (1 + math.exp(-1)), 0.0])
    assert trust_weights([1e6, 1e6 + 1]) == pytest.approx([1 / (1 + math.exp(-1)), 1 - 1 / (1 + math.exp(-1))])
    with pytest.raises(ValueError, match="at least one finite perplexity"):
        trust_weights([float("nan")])


# ---- robust rules: one malicious client among honest ones ----------------------------------------------------
HONEST = [1.0, 2.0, 3.0, 4.0]  # four honest clients' values of one coordinate
ATTACK = 1000.0  # the fifth client's


def _clients(values: list[float]) -> list[dict[str, torch.Tensor]]:
    return [{"w": torch.tensor([value, -value])} for value in values]


def test_coordinate_median_ignores_one_far_client_by_hand():
    # median of 1, 2, 3, 4, 1000 is 3 (the weighted mean would be 202); of the four honest values, (2 + 3) / 2
    result = aggregate_coordinate_median(_clients([*HONEST, ATTACK]), weights=[1, 1, 1, 1, 100])
    torch.testing.assert_close(result["w"], torch.tensor([3.0, -3.0]))
    torch.testing.assert_close(aggregate_coordinate_median(_clients(HONEST), [1] * 4)["w"], torch.tensor([2.5, -2.5]))


def test_krum_selects_the_most_central_clients_and_never_the_attacker_by_hand():
    states = _clients([*HONEST, ATTACK])
    # n = 5, f = 1: each client's score sums its 2 nearest squared distances (per coordinate pair: 2 * d^2);
    # client 1 (value 2): neighbours 1 and 3, 2 * (1 + 1) = 4; client 2 (value 3): 2 and 4, also 4; clients 0 and
    # 3: 2 * (1 + 4) = 10; the attacker: 2 * (996^2 + 997^2). Krum keeps client 1 (the first of the ties)
    torch.testing.assert_close(aggregate_krum(states, [1] * 5, num_byzantine=1)["w"], torch.tensor([2.0, -2.0]))
    # multi-Krum: the 3 lowest scores (clients 1, 2 and 0 or 3) averaged with their weights
    three = aggregate_krum(states, [1, 1, 3, 1, 1], num_byzantine=1, num_selected=3)["w"]
    assert three[0] < 4 and three[0] > 1  # an honest mean, far from the attacker's 1000
    with pytest.raises(ValueError, match="needs at least 5 clients, got 4"):
        aggregate_krum(_clients(HONEST), [1] * 4, num_byzantine=1)


def test_client_weight_cap_shares_the_excess_by_hand():
    # 8 : 1 : 1 capped at one half: 0.5, then the other half split 1 : 1
    assert capped_shares([8, 1, 1], 0.5) == pytest.approx([0.5, 0.25, 0.25])
    # a cap under 1 / n cannot hold: everyone weighs 1 / n
    assert capped_shares([8, 1, 1], 0.1) == pytest.approx([1 / 3] * 3)
    # cutting the first pushes the second over: both capped, the rest split by weight
    assert capped_shares([10, 5, 1, 1], 0.4) == pytest.approx([0.4, 0.4, 0.1, 0.1])
    strategy = get_strategy("fedavg", max_client_weight=0.3)
    attacker_claims = aggregation_weights(strategy, [100, 100, 100, 100_000])
    assert attacker_claims[3] == pytest.approx(0.3)
