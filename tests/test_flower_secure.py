"""SecAgg+ on Flower: the server side holds only masked vectors and their sum, and the secure mean equals the plain
mean of the nodes' updates within one quantisation step. Real nodes and Flower's own secaggplus_mod and
SecAggPlusWorkflow, wired in one process (every message still goes through the mod and the workflow)."""

from __future__ import annotations

import numpy as np
import pytest
from accelerate import Accelerator
from federated_setup import tiny_overrides, write_tiny_world
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common import bytes_to_ndarray
from flwr.common.serde import message_from_proto, message_to_proto

from comigs_hf.client_state import initial_shared_state
from comigs_hf.config import build_strategy, load_config
from comigs_hf.flower_app import build_node
from comigs_hf.recipe import run
from comigs_hf.transports.flower import CoMiGSStrategy, SecureAggregation, secure_aggregation_mod, shared_to_arrays

CLIENTS = "[cooking,finance,science,sports]"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_tiny_world(tmp_path_factory.mktemp("secure-world"))


class _Wire:
    """The grid between the server and nodes 10 + i (client i): each message, serialised as Flower sends it, goes
    through the node's ClientApp stack (Flower's secaggplus_mod, then the node), and every reply the server receives
    is kept."""

    def __init__(self, nodes):
        self.nodes = {10 + node.client.client_id: node for node in nodes}
        self.contexts = {
            node_id: Context(run_id=1, node_id=node_id, node_config={}, state=RecordDict(), run_config={})
            for node_id in self.nodes
        }
        self.received: list[Message] = []

    def get_node_ids(self):
        return sorted(self.nodes)

    def _handle(self, message: Message) -> Message:
        node = self.nodes[message.metadata.dst_node_id]
        if message.metadata.message_type == MessageType.QUERY:
            return Message(node.describe(), reply_to=message)

        def train(msg, context):
            return Message(node.train(msg.content), reply_to=msg)

        return secure_aggregation_mod(message, self.contexts[message.metadata.dst_node_id], train)

    def send_and_receive(self, messages, timeout=None):
        # through Flower's wire format, as between machines: no object is shared between the server and a node
        wired = [message_from_proto(message_to_proto(message)) for message in messages]
        replies = [message_from_proto(message_to_proto(self._handle(message))) for message in wired]
        self.received += replies
        return replies


def _every_bytes(content: RecordDict) -> list[bytes]:
    found = [array.data for record in content.array_records.values() for array in record.values()]
    for record in content.config_records.values():
        for value in record.values():
            found += [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, bytes)]
    return found


def test_the_server_holds_only_masked_vectors_and_their_mean_is_the_plain_mean_within_a_step(
    world, tmp_path, in_a_run
):
    cfg = load_config(
        None, tiny_overrides(*world, tmp_path / "out", **{"data.client_values": CLIENTS, "secure_aggregation": True})
    )
    nodes = [build_node(cfg, client, tmp_path / "nodes") for client in range(4)]
    strategy = build_strategy(cfg)
    assert strategy.weighting == "uniform"  # secure aggregation's default: the server takes an equal-weight mean
    spec = nodes[0].client.spec
    start = initial_shared_state(nodes[0].client.model, strategy, spec.num_specialists, cfg.seed, spec.top_k)
    settings = SecureAggregation(clipping_range=1.0)
    server = CoMiGSStrategy(strategy, start, 4, rounds=cfg.rounds, eval_every=1, secure_aggregation=settings)
    wire = _Wire(nodes)
    assert server.configure_train(1, shared_to_arrays(start), ConfigRecord({}), wire) == []  # SecAgg+ ran inside
    server.aggregate_train(1, [])
    updates = []
    for node in nodes:  # what each node trained, from its own private state
        saved = node.client.read_state(1)["update"]["shared"]
        updates.append({key: saved[key].double() - start[key].double() for key in start})
    for key in start:
        plain = start[key].double() + sum(update[key] for update in updates) / 4
        error = (server.shared[key].double() - plain).abs()
        # one quantisation step, plus the float32 rounding of the published global
        assert float((error - settings.step - 1e-7 * plain.abs()).max()) <= 0, key
    assert max(float(update[key].abs().max()) for update in updates for key in start) > 100 * settings.step
    rows = server._round["clients"]
    assert [row["client_id"] for row in rows] == [0, 1, 2, 3] and all(row["train_loss"] > 0 for row in rows)

    # every reply the server received: no array, no byte string holding an update's float values, and the masked
    # vectors look nothing like the quantised updates
    sent = {}
    for reply in wire.received:
        assert all(len(record) == 0 for record in reply.content.array_records.values())
        found = _every_bytes(reply.content)
        for update in updates:
            raw = next(iter(update.values())).float().numpy().tobytes()[:64]
            assert not any(raw in blob for blob in found)
        configs = reply.content.config_records.get("secaggplus_configs", {})
        if "masked_params" in configs:
            sent[reply.metadata.src_node_id] = [bytes_to_ndarray(b) for b in configs["masked_params"]]
    assert sorted(sent) == [10, 11, 12, 13]
    for node_id, masked in sent.items():
        update = updates[node_id - 10]
        first = next(iter(update))
        quantised = np.round((update[first].numpy() + 1.0) * settings.quantization_range / 2.0)
        # masked[0] is the weight factor; the masked vector's entries are uniform over [0, 2**32)
        assert np.mean(masked[1].reshape(-1) == quantised.reshape(-1)) < 0.01


def test_secure_aggregation_refuses_what_needs_every_update_by_name(world, tmp_path):
    for extra, reason in [
        ({"aggregation": "coordinate_median"}, "equal-weight mean"),
        ({"weighting": "train_tokens"}, "equal-weight mean"),
        ({"max_update_norm": 1.0}, "cannot measure an update it never sees"),
        ({"strategy": "local"}, "no server mean of shared tensors"),
    ]:
        overrides = {"data.client_values": CLIENTS, "secure_aggregation": True, **extra}
        with pytest.raises(ValueError, match=reason):
            load_config(None, tiny_overrides(*world, tmp_path / "out", **overrides))


def test_secure_aggregation_is_refused_on_accelerate_naming_flower(world, tmp_path):
    cfg = load_config(None, tiny_overrides(*world, tmp_path / "out", secure_aggregation=True))
    with pytest.raises(ValueError, match="secure_aggregation runs on Flower"):
        run(cfg, Accelerator(cpu=True))
