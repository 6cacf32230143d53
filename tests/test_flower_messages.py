"""A Flower train reply carries only the shared tensors, and an untrusted one is checked before its bytes are used."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from flwr.app import Array, RecordDict

from comigs_hf.algorithms import get_strategy
from comigs_hf.server import InvalidUpdate, aggregate_updates
from comigs_hf.trainer import ClientUpdate
from comigs_hf.transports.flower import update_from_reply, update_to_reply

REFERENCE = {
    "model.layers.0.mlp.experts.generalist_0.up_proj.lora_A.weight": torch.zeros(4, 8),
    "model.layers.0.mlp.experts.generalist_0.up_proj.lora_B.weight": torch.zeros(8, 4),
}


def _update(client_id: int = 1, scale: float = 1.0) -> ClientUpdate:
    generator = torch.Generator().manual_seed(client_id)
    shared = {k: torch.randn(v.shape, generator=generator) * scale for k, v in REFERENCE.items()}
    metrics = {"train_loss": 3.25, "router_loss": None, "tokens_seen": 2048, "routing": {"share": [0.5, 0.25]}}
    return ClientUpdate(client_id, 2, shared, 4096, metrics)


def test_reply_round_trips_the_update_exactly():
    update = _update()
    received, name, evaluation = update_from_reply(
        update_to_reply(update, "python"), REFERENCE, num_clients=4, round_index=2
    )
    assert name == "python" and evaluation is None
    assert received.client_id == 1 and received.round == 2 and received.train_tokens == 4096
    assert received.metrics == update.metrics
    assert set(received.shared) == set(REFERENCE)
    for key, tensor in update.shared.items():
        assert torch.equal(received.shared[key], tensor)


def test_reply_carries_only_the_shared_tensors():
    content = update_to_reply(_update(), "python")
    assert list(content.array_records) == ["arrays"]
    assert set(content.array_records["arrays"]) == set(REFERENCE)


def test_replies_aggregate_as_the_updates_they_carry():
    updates = [_update(0), _update(1, 2.0)]
    replies = [update_from_reply(update_to_reply(u, f"c{u.client_id}"), REFERENCE, 4, 2)[0] for u in updates]
    strategy = get_strategy("comigs")
    direct, carried = aggregate_updates(strategy, updates, REFERENCE), aggregate_updates(strategy, replies, REFERENCE)
    assert all(torch.equal(direct[k], carried[k]) for k in REFERENCE)


def _tampered(edit) -> RecordDict:
    content = update_to_reply(_update(), "python")
    edit(content)
    return content


KEY = next(iter(REFERENCE))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.array_records["arrays"].__setitem__("extra", Array(np.zeros(2, np.float32))), "unexpected"),
        (lambda c: c.array_records["arrays"].__delitem__(KEY), "missing"),
        (lambda c: c.array_records["arrays"].__setitem__(KEY, Array(np.zeros((4, 8), np.float64))), "declares"),
        (lambda c: c.array_records["arrays"].__setitem__(KEY, Array(np.zeros((8, 4), np.float32))), "declares"),
        # the declared layout matches, the bytes hold another shape: caught once read
        (
            lambda c: c.array_records["arrays"].__setitem__(
                KEY, Array("float32", (4, 8), "numpy.ndarray", Array(np.zeros(3, np.float32)).data)
            ),
            "holds",
        ),
        (
            lambda c: c.array_records["arrays"].__setitem__(KEY, Array("float32", (4, 8), "numpy.ndarray", b"x")),
            "unreadable",
        ),
        (
            lambda c: c.array_records["arrays"].__setitem__(
                KEY, Array("float32", (4, 8), "numpy.ndarray", b"\0" * (1 << 16))
            ),
            "more than its shape holds",
        ),
        (lambda c: c.metric_records["metrics"].__setitem__("client-id", 9), "client-id"),
        (lambda c: c.metric_records["metrics"].__setitem__("round", 1), "round 1"),
        (lambda c: c.metric_records["metrics"].__delitem__("num-examples"), "lacks"),
        (lambda c: c.config_records["report"].__setitem__("json", '{"name": "x", "metrics": {"a": NaN}}'), "NaN"),
        (lambda c: c.config_records["report"].__setitem__("json", json.dumps({"name": "x"})), "metrics"),
        (lambda c: c.config_records["report"].__setitem__("json", "x" * (2 << 20)), "at most"),
    ],
    ids=[
        "extra tensor",
        "missing tensor",
        "wrong dtype",
        "wrong shape",
        "bytes of another shape",
        "garbage bytes",
        "oversized bytes",
        "client id out of range",
        "wrong round",
        "no token count",
        "nan metric",
        "no metrics",
        "oversized report",
    ],
)
def test_tampered_reply_is_refused_naming_the_fault(edit, message):
    with pytest.raises(InvalidUpdate, match=message):
        update_from_reply(_tampered(edit), REFERENCE, num_clients=4, round_index=2)


def test_an_object_array_is_never_unpickled():
    import pickle

    payload = pickle.dumps(np.array([object()], dtype=object))
    content = _tampered(
        lambda c: c.array_records["arrays"].__setitem__(KEY, Array("float32", (4, 8), "numpy.ndarray", payload))
    )
    with pytest.raises(InvalidUpdate, match="unreadable"):
        update_from_reply(content, REFERENCE, num_clients=4, round_index=2)


def test_infinite_values_reach_the_server_check():
    update = _update()
    update.shared[KEY][0, 0] = math.inf
    received, _, _ = update_from_reply(update_to_reply(update, "python"), REFERENCE, 4, 2)
    with pytest.raises(InvalidUpdate, match="NaN or Inf"):
        aggregate_updates(get_strategy("comigs"), [received], REFERENCE)
