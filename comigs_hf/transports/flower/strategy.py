"""The server side of the round protocol on Flower: a `flwr.serverapp.strategy.Strategy` around the server step.

[`CoMiGSStrategy`] is driven by Flower's own round loop (`Strategy.start`), so Flower's strategy wrappers (its
differential-privacy ones, for instance) compose with it. Each round:

1. `configure_train` learns which client each newly connected node serves (a query message; two nodes claiming one
   client are refused) and sends the global shared tensors and the round to the nodes of the clients asked this
   round (`server.sample_clients`: every client, or `clients_per_round` of them drawn as the Accelerate rounds draw);
2. `aggregate_train` reads each reply as an untrusted update (`messages.update_from_reply`, then
   `server.check_update`): a failed, malformed or misattributed reply is dropped with a warning, and the round goes
   on while at least `min_train_nodes` updates arrived; the server step (`server.server_step`) runs over them
   in client order, as on every transport, and each client's row of the round's record is
   `server.round_row`'s;
3. `configure_evaluate` and `aggregate_evaluate` collect every client's test metrics with the new global in the
   rounds the recipe evaluates (every `eval_every` rounds and the last), beside the metrics the train replies
   carried from right after the local steps.

The records then have the Accelerate rounds' form: `{"round": t, "clients": [row, ...]}`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy as FlowerStrategy

from ...evaluation import EvaluationConfig
from ...server import (
    InvalidUpdate,
    apply_mean_update,
    check_secure_aggregation,
    check_update,
    evaluation_row,
    round_row,
    sample_clients,
    server_step,
)
from ...strategies import Strategy
from ...trainer import ClientUpdate
from .messages import (
    arrays_to_shared,
    evaluation_from_reply,
    identity_from_reply,
    report_from_train_reply,
    shared_to_arrays,
    update_from_reply,
)
from .node import check_flower_strategy
from .secure import SecureAggregation, SecureRound, plain_reply_of, run_secure_round, secure_train_content

logger = logging.getLogger("comigs_hf.flower")


class FederationIncomplete(RuntimeError):
    """Too few nodes joined, or too few replied in a round, for the federation to go on; the message says who."""


class CoMiGSStrategy(FlowerStrategy):
    """The round protocol's server on Flower: the recipe's strategy, its server step and its records.

    Args:
        strategy ([`~comigs_hf.strategies.Strategy`]): what is shared and how it is combined.
        initial_shared (`Mapping[str, torch.Tensor]`): the global shared state before round 1
            ([`~comigs_hf.trainer.initial_shared_state`], as the Accelerate rounds draw it).
        num_clients (`int`): the federation's clients; node replies must claim an id in `[0, num_clients)`.
        rounds (`int`): rounds in the run.
        eval_every (`int`): evaluate every this many rounds, and after the last.
        evaluation ([`~comigs_hf.evaluation.EvaluationConfig`]): whether rows carry the figures measured right after
            the local steps (`before_aggregation`).
        clients_per_round (`int`, *optional*): clients asked to train each round, drawn by
            [`~comigs_hf.server.sample_clients`] as the Accelerate rounds draw them (Flower's `fraction_train` times
            the clients). Defaults to every client.
        seed (`int`): the recipe's seed, which the draw of each round's clients follows.
        min_train_nodes (`int`, *optional*): the fewest updates a round aggregates; fewer raise
            [`FederationIncomplete`]. Defaults to every client asked.
        timeout (`float`): seconds to wait for nodes to join before round 1, and for query replies.
        secure_aggregation ([`~comigs_hf.transports.flower.secure.SecureAggregation`], *optional*): run each
            round's train phase as SecAgg+ (see `comigs_hf.transports.flower.secure`): the server holds only the sum
            of the updates, and takes their equal-weight mean. `None`: plain replies, each checked.
    """

    def __init__(
        self,
        strategy: Strategy,
        initial_shared: Mapping[str, torch.Tensor],
        num_clients: int,
        *,
        rounds: int,
        eval_every: int,
        evaluation: EvaluationConfig | None = None,
        clients_per_round: int | None = None,
        seed: int = 0,
        min_train_nodes: int | None = None,
        timeout: float = 600.0,
        secure_aggregation: SecureAggregation | None = None,
    ):
        self.strategy = check_flower_strategy(strategy)
        self.shared = dict(initial_shared)
        self.num_clients = num_clients
        self.rounds, self.eval_every = rounds, eval_every
        self.evaluation = evaluation or EvaluationConfig()
        self.clients_per_round, self.seed = clients_per_round, seed
        sample_clients(num_clients, clients_per_round, seed, 1)  # checks clients_per_round
        asked = num_clients if clients_per_round is None else clients_per_round
        self.min_train_nodes = asked if min_train_nodes is None else min_train_nodes
        if not 1 <= self.min_train_nodes <= asked:
            raise ValueError(
                f"min_train_nodes must be in [1, {asked}] (the clients asked each round), got {min_train_nodes}."
            )
        self.timeout = timeout
        self.secure = secure_aggregation
        if self.secure is not None:
            check_secure_aggregation(self.strategy, self.secure.clipping_range)
            if self.min_train_nodes < 2:
                raise ValueError("Secure aggregation needs min_train_nodes >= 2: one node's sum is its update.")
        self._secure_round: SecureRound | None = None
        self.nodes: dict[int, int] = {}  # node id -> the client it serves
        self.names: dict[int, str] = {}  # client id -> its data partition's name
        self.records: list[dict] = []
        self._sent: dict[int, int] = {}  # node id -> client id, this phase's messages
        self._round: dict = {}
        self._before: dict[int, dict] = {}

    # ---- nodes -----------------------------------------------------------------------------------------------------
    def serving_nodes(self, grid: Grid) -> dict[int, int]:
        """Client id -> the connected node serving it; asks every node not seen before which client it serves, and
        before round 1 waits (up to `timeout`) until every client has a node.

        Raises:
            [`FederationIncomplete`]: before round 1, some clients have no node after `timeout` seconds.
        """
        deadline = time.monotonic() + self.timeout
        while True:
            connected = set(grid.get_node_ids())
            new = sorted(connected - set(self.nodes))
            if new:
                self._identify(grid, new, connected)
            serving = {client: node for node, client in self.nodes.items() if node in connected}
            if self.records or len(serving) == self.num_clients:
                return serving
            if time.monotonic() > deadline:
                absent = sorted(set(range(self.num_clients)) - set(serving))
                raise FederationIncomplete(
                    f"After {self.timeout:g} s, {len(serving)} of {self.num_clients} clients have a node; no node "
                    f"serves clients {absent[:10]} (start their SuperNodes with partition-id set)."
                )
            time.sleep(0.5)

    def _identify(self, grid: Grid, node_ids: list[int], connected: set[int]) -> None:
        queries = [
            Message(content=RecordDict({"config": ConfigRecord({})}), message_type=MessageType.QUERY, dst_node_id=node)
            for node in node_ids
        ]
        for reply in grid.send_and_receive(queries, timeout=self.timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                logger.warning("node %s did not say which client it serves: %s", node, reply.error.reason)
                continue
            try:
                client, name = identity_from_reply(reply.content, self.num_clients)
            except InvalidUpdate as error:
                logger.warning("node %s: %s", node, error)
                continue
            holder = next((n for n, c in self.nodes.items() if c == client and n in connected and n != node), None)
            if holder is not None:
                logger.warning("node %s claims client %d, which node %s serves: ignored.", node, client, holder)
                continue
            self.nodes = {n: c for n, c in self.nodes.items() if c != client}  # a restarted node has a new id
            self.nodes[node] = client
            self.names[client] = name

    def _messages(self, serving: dict[int, int], clients: Iterable[int], content: RecordDict, kind: str) -> list:
        self._sent = {serving[client]: client for client in clients}
        return [Message(content=content, message_type=kind, dst_node_id=node) for node in self._sent]

    def _global(self, arrays: ArrayRecord) -> dict[str, torch.Tensor]:
        # what the round loop hands back: ours, or changed by a wrapping strategy (Flower's DP wrappers add noise)
        return arrays_to_shared(arrays, self.shared, "the server's round loop")

    def _replies(self, replies: Iterable[Message], round_index: int, phase: str) -> Iterable[tuple[int, Message]]:
        """The replies that came back without error from the nodes this phase wrote to, with the client each
        serves; the others are logged."""
        answered = set()
        for reply in replies:
            node = reply.metadata.src_node_id
            answered.add(node)
            client = self._sent.get(node)
            if client is None:
                logger.warning("round %d %s: node %s replied unasked: ignored.", round_index, phase, node)
            elif reply.has_error():
                logger.warning("round %d %s: client %d failed: %s", round_index, phase, client, reply.error.reason)
            else:
                yield client, reply
        for node in sorted(set(self._sent) - answered):
            logger.warning("round %d %s: client %d did not reply in time.", round_index, phase, self._sent[node])

    def _due(self, round_index: int) -> bool:
        return round_index % self.eval_every == 0 or round_index == self.rounds

    # ---- the four phases -------------------------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The serving nodes of the clients asked this round get the global and the round (and whether to report
        their test metrics right after the local steps); an asked client without a node is logged and skipped."""
        self.shared = self._global(arrays)
        serving = self.serving_nodes(grid)
        wanted = self.evaluation.before_aggregation or not self.strategy.shared_roles
        settings = ConfigRecord({**config, "round": server_round, "evaluate": self._due(server_round) and wanted})
        content = RecordDict({"arrays": arrays, "config": settings})
        asked = sample_clients(self.num_clients, self.clients_per_round, self.seed, server_round)
        absent = [client for client in asked if client not in serving]
        if absent:
            logger.warning("round %d: clients %s are asked to train but have no node connected.", server_round, absent)
        messages = self._messages(serving, [c for c in asked if c in serving], content, MessageType.TRAIN)
        if self.secure is None:
            return messages
        # SecAgg+'s four exchanges run here, over the grid; Flower's loop then sends nothing and aggregate_train
        # takes the unmasked mean
        if len(self._sent) < self.min_train_nodes:
            raise FederationIncomplete(
                f"Round {server_round}: {len(self._sent)} asked clients have a node, fewer than "
                f"min_train_nodes={self.min_train_nodes}."
            )
        settings["clipping-range"] = self.secure.clipping_range
        contents = {node: secure_train_content(arrays, settings) for node in self._sent}
        self._secure_round = run_secure_round(grid, server_round, contents, self.shared, self.secure)
        return []

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The server step over the updates that arrived and passed every check, in client order.

        Raises:
            [`FederationIncomplete`]: fewer than `min_train_nodes` usable updates.
        """
        if self.secure is not None:
            return self._aggregate_secure(server_round)
        updates, before, refused = {}, {}, []
        for client, reply in self._replies(replies, server_round, "train"):
            try:
                update, name, evaluation = update_from_reply(
                    reply.content, self.shared, self.num_clients, server_round
                )
                if update.client_id != client:
                    raise InvalidUpdate(client, f"its node replied as client {update.client_id}.")
                check_update(update, self.shared, self.strategy.max_update_norm)
            except InvalidUpdate as error:
                logger.warning("round %d: %s Dropped.", server_round, error)
                refused.append(client)
                continue
            updates[client], before[client] = update, evaluation
            self.names.setdefault(client, name)
        if len(updates) < self.min_train_nodes:
            raise FederationIncomplete(
                f"Round {server_round}: {len(updates)} usable updates (clients {sorted(updates)}), fewer than "
                f"min_train_nodes={self.min_train_nodes}; refused: {refused}, sent: {sorted(self._sent.values())}."
            )
        outcome = server_step(self.strategy, [updates[client] for client in sorted(updates)], self.shared)
        self.shared = outcome.shared
        return self._record_train(server_round, outcome.rows, before)

    def _aggregate_secure(self, server_round: int) -> tuple[ArrayRecord, MetricRecord]:
        """A secure round: the unmasked mean of the updates becomes the new global through the server step's
        `apply_mean_update`; each node's reply holds only its metrics and report, read as any reply's."""
        outcome, self._secure_round = self._secure_round, None
        if outcome is None or outcome.mean is None or len(outcome.metrics) < self.min_train_nodes:
            unmasked = 0 if outcome is None else len(outcome.metrics)
            raise FederationIncomplete(
                f"Round {server_round}: secure aggregation unmasked {unmasked} updates, fewer than "
                f"min_train_nodes={self.min_train_nodes}; sent: {sorted(self._sent.values())}."
            )
        updates, before = {}, {}
        for node, metrics in outcome.metrics.items():
            client = self._sent.get(node)
            try:
                if client is None:
                    raise InvalidUpdate("?", f"node {node} was not asked.")
                claimed, tokens, name, round_metrics, evaluation = report_from_train_reply(
                    plain_reply_of(metrics), self.num_clients, server_round
                )
                if claimed != client:
                    raise InvalidUpdate(client, f"its node replied as client {claimed}.")
                # sized like the update for the round's record; the server never holds the update itself
                update = ClientUpdate(client, server_round, dict(self.shared), tokens, round_metrics)
                check_update(update, self.shared)  # its token count; the tensors are the global's
            except InvalidUpdate as error:  # its update is in the sum regardless: only its row is missing
                logger.warning("round %d: %s Its metrics are left out.", server_round, error)
                continue
            updates[client], before[client] = update, evaluation
            self.names.setdefault(client, name)
        self.shared = apply_mean_update(self.strategy, outcome.mean, self.shared, len(outcome.metrics))
        rows = [round_row(updates[client], self.shared) for client in sorted(updates)]
        return self._record_train(server_round, rows, before)

    def _record_train(
        self, server_round: int, rows: list[dict], before: dict[int, dict | None]
    ) -> tuple[ArrayRecord, MetricRecord]:
        self._round = {"round": server_round, "clients": rows}
        self._before = {client: metrics for client, metrics in before.items() if metrics is not None}
        rows = self._round["clients"]
        totals = {
            "train-loss": sum(row["train_loss"] for row in rows) / len(rows),
            "bytes-sent": sum(row["bytes_sent"] for row in rows),
            "clients": len(rows),
        }
        return shared_to_arrays(self.shared), MetricRecord(totals)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """In the rounds the recipe evaluates, every serving node gets the new global (those that did not train
        too, as in the Accelerate rounds); none in the others."""
        self.shared = self._global(arrays)
        if not self._due(server_round):
            self._sent = {}
            return []
        serving = self.serving_nodes(grid)
        content = RecordDict({"arrays": arrays, "config": ConfigRecord({**config, "round": server_round})})
        return self._messages(serving, sorted(serving), content, MessageType.EVALUATE)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Each trained client's row takes its test metrics (and, with `before_aggregation`, those right after its
        local steps, suffixed `_before_aggregation`), a client evaluated without training gets an evaluation row;
        the round's record is complete."""
        after = {}
        for client, reply in self._replies(replies, server_round, "evaluate"):
            try:
                claimed, _, metrics = evaluation_from_reply(reply.content, self.num_clients, server_round)
                if claimed != client:
                    raise InvalidUpdate(client, f"its node replied as client {claimed}.")
            except InvalidUpdate as error:
                logger.warning("round %d: %s Ignored.", server_round, error)
                continue
            after[client] = metrics
        shares = bool(self.strategy.shared_roles)
        for row in self._round["clients"]:
            client = row["client_id"]
            if client not in after:
                continue
            row.update({key: value for key, value in after[client].items() if key != "client_id"})
            if self.evaluation.before_aggregation:
                trained = self._before.get(client, after[client] if not shares else {})
                row.update({f"{k}_before_aggregation": v for k, v in trained.items() if k.endswith(("_loss", "_ppl"))})
        trained = {row["client_id"] for row in self._round["clients"]}
        self._round["clients"] += [evaluation_row(c, after[c]) for c in sorted(after) if c not in trained]
        self._round["clients"].sort(key=lambda row: row["client_id"])
        self.records.append(self._round)
        ppls = [metrics["test_ppl"] for metrics in after.values() if "test_ppl" in metrics]
        return MetricRecord({"mean-test-ppl": sum(ppls) / len(ppls)}) if ppls else None

    def summary(self) -> None:
        logger.info(
            "CoMiGS round protocol: strategy %s (shares %s, aggregation %s), %d clients, %s asked a round, at least "
            "%d updates a round, %s",
            self.strategy.name,
            sorted(self.strategy.shared_roles) or "nothing",
            self.strategy.aggregation,
            self.num_clients,
            self.clients_per_round or "all",
            self.min_train_nodes,
            "SecAgg+ (the server holds only the sum)" if self.secure else "plain updates (each checked)",
        )


__all__ = ["CoMiGSStrategy", "FederationIncomplete"]
