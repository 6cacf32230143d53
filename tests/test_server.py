"""The server step: every update is checked against the round's reference, then combined through the registry."""

import pytest
import torch

from comigs_hf import aggregation
from comigs_hf.algorithms import get_strategy
from comigs_hf.server import InvalidUpdate, aggregate_updates, check_update, sample_clients
from comigs_hf.trainer import ClientUpdate

REFERENCE = {"a": torch.zeros(2), "b": torch.zeros(1, 2)}


def update(client_id, a, b, train_tokens=1, changes=None) -> ClientUpdate:
    shared = {"a": torch.tensor(a), "b": torch.tensor([b])}
    return ClientUpdate(client_id, 1, {**shared, **(changes or {})}, train_tokens)


def test_updates_are_averaged_by_the_tokens_of_their_training_split():
    updates = [
        update(0, [0.0, 4.0], [1.0, 1.0], train_tokens=300),
        update(1, [4.0, 0.0], [5.0, 1.0], train_tokens=100),
    ]
    combined = aggregate_updates(get_strategy("comigs"), updates, REFERENCE)
    torch.testing.assert_close(combined["a"], torch.tensor([1.0, 3.0]))  # (3 * 0 + 1 * 4) / 4, (3 * 4 + 0) / 4
    torch.testing.assert_close(combined["b"], torch.tensor([[2.0, 1.0]]))


def test_uniform_weighting_ignores_the_token_counts():
    updates = [
        update(0, [0.0, 4.0], [1.0, 1.0], train_tokens=300),
        update(1, [4.0, 0.0], [5.0, 1.0], train_tokens=100),
    ]
    combined = aggregate_updates(get_strategy("comigs", weighting="uniform"), updates, REFERENCE)
    torch.testing.assert_close(combined["a"], torch.tensor([2.0, 2.0]))


def test_every_registered_rule_is_reached_through_the_strategy():
    updates = [update(i, [float(v), 0.0], [0.0, 0.0], train_tokens=1 + 99 * i) for i, v in enumerate([1, 2, 100])]
    strategy = get_strategy("comigs", aggregation="trimmed_mean", aggregation_kwargs={"trim_ratio": 0.34})
    assert aggregate_updates(strategy, updates, REFERENCE)["a"].tolist() == [2.0, 0.0]  # the outlier is cut


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"a": torch.zeros(3)}, r"wrong shape for 'a': \(3,\), expected \(2,\)"),
        ({"a": torch.zeros(2, dtype=torch.float16)}, "'a' has dtype torch.float16, expected torch.float32"),
        ({"a": torch.zeros(2, dtype=torch.int64)}, "'a' has dtype torch.int64, expected torch.float32"),
        ({"a": torch.tensor([0.0, float("nan")])}, "'a' holds NaN or Inf"),
        ({"a": torch.tensor([float("inf"), 0.0])}, "'a' holds NaN or Inf"),
        ({"c": torch.zeros(1)}, r"unexpected \['c'\]"),
        ({"a": torch.tensor([3e38, 0.0])}, r"'a' holds values beyond \+-10000\."),  # finite, and absurd
    ],
)
def test_an_update_that_does_not_fit_the_reference_is_refused_naming_client_and_key(change, reason):
    bad = update("mallory", [0.0, 0.0], [0.0, 0.0], changes=change)
    with pytest.raises(InvalidUpdate, match=reason) as info:
        aggregate_updates(get_strategy("comigs"), [update(0, [0.0, 0.0], [0.0, 0.0]), bad], REFERENCE)
    assert info.value.client_id == "mallory" and "client 'mallory'" in str(info.value)


def test_a_missing_tensor_is_refused():
    bad = ClientUpdate(3, 1, {"a": torch.zeros(2)}, 1)
    with pytest.raises(InvalidUpdate, match=r"missing \['b'\]"):
        check_update(bad, REFERENCE)


@pytest.mark.parametrize("tokens", [0, -5, True, 2.5, 10**400, 2**53 + 1])
def test_a_token_count_that_is_no_training_split_is_refused(tokens):
    with pytest.raises(InvalidUpdate, match="train_tokens must be an integer in"):
        check_update(update(0, [0.0, 0.0], [0.0, 0.0], train_tokens=tokens), REFERENCE)


def test_a_round_without_updates_is_an_error():
    with pytest.raises(ValueError, match="without client updates"):
        aggregate_updates(get_strategy("comigs"), [], REFERENCE)


def test_a_result_that_is_not_finite_is_never_returned(monkeypatch):
    def aggregate_sum(states, weights):  # a rule that leaves the updates' range, as an SVD-based one could
        return {key: sum(state[key].double() for state in states) * 1e300 for key in states[0]}

    monkeypatch.setitem(aggregation.AGGREGATORS, "sum", aggregate_sum)
    updates = [update(0, [1.0, 1.0], [1.0, 1.0]), update(1, [1.0, 1.0], [1.0, 1.0])]
    with pytest.raises(ValueError, match=r"'sum' aggregate of 'a' over 2 updates is not finite or beyond \+-10000 in"):
        aggregate_updates(get_strategy("comigs", aggregation="sum"), updates, REFERENCE)


def test_the_result_keeps_the_reference_dtype():
    reference = {key: value.to(torch.bfloat16) for key, value in REFERENCE.items()}
    updates = [ClientUpdate(i, 1, {k: torch.full_like(v, i) for k, v in reference.items()}, 1) for i in range(3)]
    combined = aggregate_updates(get_strategy("comigs"), updates, reference)
    assert {value.dtype for value in combined.values()} == {torch.bfloat16}
    assert combined["a"].tolist() == [1.0, 1.0]


def test_capped_token_weights_keep_a_client_from_taking_the_average_over():
    honest = [update(i, [1.0, 1.0], [0.0, 0.0], train_tokens=100) for i in range(4)]
    attacker = update("mallory", [101.0, 1.0], [0.0, 0.0], train_tokens=100 * 100)  # claims 100x the tokens
    raw = aggregate_updates(get_strategy("comigs"), [*honest, attacker], REFERENCE)["a"][0].item()
    capped = aggregate_updates(get_strategy("comigs", weighting="capped_train_tokens"), [*honest, attacker], REFERENCE)
    # the attacker's share of the average: 100 / (100 + 4) raw, at most 2 medians of 6 capped
    assert (raw - 1) / 100 == pytest.approx(100 / 104)
    assert (capped["a"][0].item() - 1) / 100 == pytest.approx(2 / 6)


def test_an_update_too_far_from_the_global_is_refused_when_a_norm_bound_is_set():
    reference = {"a": torch.tensor([1.0, 1.0]), "b": torch.zeros(1, 2)}
    near, far = update(0, [1.0, 2.0], [0.0, 0.0]), update("mallory", [1.0, 6.0], [0.0, 0.0])  # distances 1 and 5
    strategy = get_strategy("comigs", max_update_norm=2.0)
    assert aggregate_updates(strategy, [near], reference)["a"].tolist() == [1.0, 2.0]
    with pytest.raises(InvalidUpdate, match=r"distance from the round's global, 5, exceeds 2") as info:
        aggregate_updates(strategy, [near, far], reference)
    assert info.value.client_id == "mallory"
    with pytest.raises(ValueError, match="needs the values"):
        check_update(near, {k: v.to("meta") for k, v in reference.items()}, max_update_norm=2.0)


def test_each_round_asks_a_seeded_draw_of_clients_per_round_clients_the_same_everywhere():
    assert sample_clients(5, None, 0, 1) == [0, 1, 2, 3, 4]
    draws = [sample_clients(10, 3, 0, t) for t in range(1, 21)]
    assert all(len(d) == 3 == len(set(d)) and d == sorted(d) and set(d) <= set(range(10)) for d in draws)
    assert len({tuple(d) for d in draws}) > 10  # anew each round
    assert draws == [sample_clients(10, 3, 0, t) for t in range(1, 21)]  # a pure function of (seed, round)
    assert draws != [sample_clients(10, 3, 1, t) for t in range(1, 21)]
    # each client is asked about 3/10 of the time
    counts = [sum(c in sample_clients(10, 3, 0, t) for t in range(1, 2001)) for c in range(10)]
    assert all(500 < n < 700 for n in counts), counts


@pytest.mark.parametrize("per_round", [0, 6])
def test_clients_per_round_outside_the_federation_is_refused(per_round):
    with pytest.raises(ValueError, match=r"clients_per_round must be in \[1, 5\]"):
        sample_clients(5, per_round, 0, 1)
