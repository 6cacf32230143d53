"""Secure aggregation on Flower: SecAgg+ (Bell et al., 2020) over the shared update, with Flower's own protocol.

With `secure_aggregation: true`, the train phase of a round is Flower's `SecAggPlusWorkflow` (server side, four
exchanges: keys, key shares, masked vectors, unmasking) against Flower's `secaggplus_mod` around each node's train
handler ([`secure_aggregation_mod`]). Each node sends its update `shared - global` (not its tensors: an update is
small, so the quantisation grid is fine), quantised to `quantization_range` levels over
`[-clipping_range, clipping_range]` and masked; the server unmasks only the sum, so no server-side code ever holds
one client's update, and takes the mean with equal weights (every node's weight is 1).

The price, stated: each coordinate of the secure mean differs from the plain mean by less than one quantisation step,
`2 * clipping_range / quantization_range` (stochastic rounding: each node's error is below one step and unbiased,
and the mean of `m` such errors is below one step too); a node refuses to send an update with a coordinate beyond
`clipping_range` (the quantiser would clip it silently). The server cannot check an update it never sees: the norm
bound (`max_update_norm`, or `dp_clipping_norm`'s) is left to the clients, and the robust rules, which need every
update, are refused.

Train messages and replies use Flower's FitIns/FitRes record names, which `secaggplus_mod` reads; what they carry
is this package's: named arrays checked as [`~comigs_hf.transports.flower.messages.arrays_to_shared`] checks them,
and the reply's metrics and report in `fitres.metrics`, read as any reply's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitIns, FitRes, Parameters, Status, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from ...server import InvalidUpdate
from ...trainer import ClientUpdate
from .messages import SECURE_TRAIN_ARRAYS as TRAIN_ARRAYS
from .messages import SECURE_TRAIN_CONFIG as TRAIN_CONFIG
from .messages import shared_to_arrays

REPLY_ARRAYS = "fitres.parameters"  # FitRes's, which secaggplus_mod masks


@dataclass(frozen=True)
class SecureAggregation:
    """SecAgg+'s settings (Flower's `SecAggPlusWorkflow` arguments).

    Args:
        clipping_range (`float`): each coordinate of an update must lie in `[-clipping_range, clipping_range]`.
        quantization_range (`int`): quantisation levels over that interval (2**22: a step of 4.8e-7 at range 1).
        num_shares (`float`): the share of a round's nodes each node splits its secret among (1.0: all of them).
        reconstruction_threshold (`float`): the share of those shares that recovers a dropped node's mask.
        timeout (`float`, *optional*): seconds to wait for each of the four exchanges.
    """

    clipping_range: float = 1.0
    quantization_range: int = 2**22
    num_shares: float = 1.0
    reconstruction_threshold: float = 0.5
    timeout: float | None = None

    @property
    def step(self) -> float:
        """The quantisation step, the bound on each coordinate's error of the secure mean."""
        return 2 * self.clipping_range / self.quantization_range


def is_secure_train(content: RecordDict) -> bool:
    """Whether a train message is a secure round's (FitIns record names)."""
    return TRAIN_ARRAYS in content.array_records


def secure_train_content(arrays: ArrayRecord, config: Mapping) -> RecordDict:
    """A secure round's train message: the global and the round's settings under the FitIns record names."""
    return RecordDict({TRAIN_ARRAYS: arrays, TRAIN_CONFIG: ConfigRecord(dict(config))})


def secure_reply(
    update: ClientUpdate, reference: Mapping[str, torch.Tensor], plain: RecordDict, bound: float
) -> RecordDict:
    """A node's reply for `secaggplus_mod`: its update `update.shared - reference` (in sorted key order) as
    FitRes parameters, and the metrics and report of `plain` (the reply a plain round would send) as FitRes metrics.

    Raises:
        `ValueError`: a coordinate of the update lies beyond `bound` (the clipping range), which the quantiser would
        clip without a word.
    """
    # sorted names: the order the server reads the unmasked sum in (legacy parameters carry no names)
    delta = {key: (update.shared[key].double() - reference[key].double()).float() for key in sorted(reference)}
    largest = max((float(t.abs().max()) for t in delta.values() if t.numel()), default=0.0)
    if largest > bound:
        raise ValueError(
            f"Client {update.client_id}'s update has a coordinate of {largest:.4g}, beyond the secure aggregation "
            f"clipping_range {bound}: raise secure_clipping_range (the quantisation step grows with it)."
        )
    metrics = {key: value for key, value in plain.metric_records["metrics"].items()}
    result = FitRes(
        Status(Code.OK, ""), Parameters([], ""), 1, {**metrics, "report": plain.config_records["report"]["json"]}
    )
    content = compat.fitres_to_recorddict(result, keep_input=True)
    content.array_records[REPLY_ARRAYS] = shared_to_arrays(delta)
    return content


def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's `secaggplus_mod` for the messages of a secure round, and nothing for the others: one ClientApp
    serves recipes with and without secure aggregation."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def plain_reply_of(metrics: Mapping) -> RecordDict:
    """The records a plain reply would hold (`metrics`, `report`), from a secure reply's FitRes metrics, to be read
    and checked as any reply's."""
    values = dict(metrics)
    report = values.pop("report", None)
    if not isinstance(report, str):
        raise InvalidUpdate("?", "the secure reply carries no report.")
    numbers = {key: value for key, value in values.items() if isinstance(value, (int, float))}
    return RecordDict({"metrics": MetricRecord(numbers), "report": ConfigRecord({"json": report})})


class _Node(ClientProxy):
    # the workflow addresses nodes through legacy client proxies: it only reads `node_id`
    def __init__(self, node_id: int):
        super().__init__(str(node_id))
        self.node_id = node_id

    def get_properties(self, *args, **kwargs):  # pragma: no cover - never called by the workflow
        raise NotImplementedError

    get_parameters = fit = evaluate = reconnect = get_properties


class _TrainPhase(LegacyStrategy):
    """What `SecAggPlusWorkflow` asks of a legacy strategy: the nodes of the round (configure_fit) and a place to
    hand the unmasked mean to (aggregate_fit)."""

    def __init__(self, node_ids: list[int], config: Mapping):
        self.node_ids, self.config = node_ids, dict(config)
        self.results: list[tuple[ClientProxy, FitRes]] = []
        self.failures: list = []

    def configure_fit(self, server_round, parameters, client_manager):
        return [(_Node(node), FitIns(parameters, dict(self.config))) for node in self.node_ids]

    def aggregate_fit(self, server_round, results, failures):
        self.results, self.failures = list(results), list(failures)
        return (results[0][1].parameters if results else None), {}

    def initialize_parameters(self, client_manager):  # pragma: no cover - the workflow alone is run
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):  # pragma: no cover
        return []

    def aggregate_evaluate(self, server_round, results, failures):  # pragma: no cover
        return None, {}

    def evaluate(self, server_round, parameters):  # pragma: no cover
        return None


class _Workflow(SecAggPlusWorkflow):
    # the messages of the masked-vector stage carry this package's named records, not legacy Parameters
    def __init__(self, contents: dict[int, RecordDict], settings: SecureAggregation):
        super().__init__(
            settings.num_shares,
            settings.reconstruction_threshold,
            max_weight=1.0,
            clipping_range=settings.clipping_range,
            quantization_range=settings.quantization_range,
            timeout=settings.timeout,
        )
        self.contents = contents

    def setup_stage(self, grid, context, state) -> bool:
        proceed = super().setup_stage(grid, context, state)
        state.nid_to_fitins = {node: self.contents[node] for node in state.nid_to_fitins}
        return proceed


@dataclass
class SecureRound:
    """The outcome of a secure train phase: the mean update (keyed by name, in the global's dtypes) over the nodes
    whose masked vectors were unmasked, and each such node's FitRes metrics."""

    mean: dict[str, torch.Tensor] | None
    metrics: dict[int, dict]  # node id -> FitRes metrics
    failures: int


def run_secure_round(
    grid: Grid,
    server_round: int,
    contents: dict[int, RecordDict],
    reference: Mapping[str, torch.Tensor],
    settings: SecureAggregation,
) -> SecureRound:
    """Run SecAgg+ for one round's train phase over the nodes of `contents` (node id -> its train message)."""
    config = next(iter(contents.values())).config_records[TRAIN_CONFIG]
    phase = _TrainPhase(sorted(contents), config)
    state = RecordDict(
        {
            MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round}),
            MAIN_PARAMS_RECORD: next(iter(contents.values())).array_records[TRAIN_ARRAYS],
        }
    )
    context = LegacyContext(
        Context(run_id=0, node_id=0, node_config={}, state=state, run_config={}),
        strategy=phase,
        client_manager=SimpleClientManager(),
    )
    _Workflow(contents, settings)(grid, context)
    if not phase.results:
        return SecureRound(None, {}, len(phase.failures))
    arrays = parameters_to_ndarrays(phase.results[0][1].parameters)  # the server's own unmasked sum, not a node's
    if len(arrays) != len(reference):
        raise InvalidUpdate("secure aggregate", f"holds {len(arrays)} arrays, expected {len(reference)}.")
    mean = {}
    for key, array in zip(sorted(reference), arrays):  # the nodes' order (see secure_reply)
        expected = reference[key]
        if tuple(array.shape) != tuple(expected.shape):
            raise InvalidUpdate(
                "secure aggregate", f"{key!r} has shape {array.shape}, expected {tuple(expected.shape)}."
            )
        mean[key] = torch.from_numpy(np.ascontiguousarray(array)).to(expected.dtype)
    metrics = {proxy.node_id: dict(result.metrics) for proxy, result in phase.results}
    return SecureRound(mean, metrics, len(phase.failures))


__all__ = [
    "SecureAggregation",
    "SecureRound",
    "is_secure_train",
    "plain_reply_of",
    "run_secure_round",
    "secure_aggregation_mod",
    "secure_reply",
    "secure_train_content",
]
