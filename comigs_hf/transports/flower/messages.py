"""What travels in a Flower message of the round protocol, and the checks a reply passes before it is used.

A client's reply to a train message is one `RecordDict`:

- `"arrays"`, an `ArrayRecord`: the strategy's shared tensors after local training (the `ClientUpdate`'s `shared`),
  nothing else: specialists, router, optimiser and sampler state stay on the node;
- `"metrics"`, a `MetricRecord`: `num-examples` (the training split's token count, FedAvg's weight), `client-id`
  and `round`;
- `"report"`, a `ConfigRecord`: the client's name, its round metrics and, in a round evaluated before aggregation,
  its test metrics right after the local steps, as JSON (floats round-trip exactly).

A reply to an evaluate message carries the same `"metrics"` (without `num-examples`) and a report whose metrics are
the test figures; a reply to a query message (the server learning which client a node serves) carries only
`client-id` and the name. The server's messages carry the global shared tensors as `"arrays"` and the round as a
`ConfigRecord` `"config"`; a node checks those arrays against its own layout ([`global_from_message`]).

A reply comes from another organisation's machine, so [`update_from_reply`] trusts nothing in it: every array's
name, declared dtype and shape are checked against the round's reference before its bytes are read, its byte size is
bounded, it is read with numpy's `allow_pickle=False` (never unpickled) and checked again once read; the report is
bounded in size and holds only finite numbers, `None`, strings of bounded length and lists or mappings of those.
`comigs_hf.server.check_update` then checks values as for every transport.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from ...server import MAX_ABS_VALUE, InvalidUpdate
from ...trainer import ClientUpdate

# an npy header is at most a few hundred bytes (numpy pads it to 64-byte multiples; 4 KiB bounds any version)
NPY_HEADER_BYTES = 4096
MAX_REPORT_BYTES = 1 << 20  # a round's metrics, routing shares included, are a few KiB
MAX_REPORT_DEPTH = 4
MAX_NAME_LENGTH = 256
# a secure round's train message uses Flower's FitIns record names, which its secaggplus_mod reads
SECURE_TRAIN_ARRAYS, SECURE_TRAIN_CONFIG = "fitins.parameters", "fitins.config"


def shared_to_arrays(shared: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """The shared tensors as the `ArrayRecord` a message carries (CPU, contiguous; names kept)."""
    return ArrayRecord({key: Array(tensor.detach().cpu().contiguous()) for key, tensor in shared.items()})


def arrays_to_shared(
    arrays: ArrayRecord, reference: Mapping[str, torch.Tensor], sender: int | str
) -> dict[str, torch.Tensor]:
    """The tensors of an untrusted `ArrayRecord`, checked against `reference` (names, dtype, shape, byte size)
    before and after their bytes are read.

    Args:
        arrays (`ArrayRecord`): what arrived.
        reference (`Mapping[str, torch.Tensor]`): the tensors expected, by name (values unused: meta tensors do).
        sender (`int` or `str`): who sent it, for errors.

    Raises:
        [`~comigs_hf.server.InvalidUpdate`]: naming the sender and the first array at fault.
    """
    missing = sorted(set(reference) - set(arrays))
    unexpected = sorted(set(arrays) - set(reference))
    if missing or unexpected:
        raise InvalidUpdate(sender, f"wrong tensors: missing {missing[:3]}, unexpected {unexpected[:3]}.")
    shared = {}
    for key, expected in reference.items():
        array = arrays[key]
        dtype = str(expected.dtype).removeprefix("torch.")
        shape = tuple(expected.shape)
        if not isinstance(array, Array) or array.stype != "numpy.ndarray":
            raise InvalidUpdate(sender, f"{key!r} is not a numpy-serialised array.")
        if array.dtype != dtype or tuple(array.shape) != shape:
            raise InvalidUpdate(
                sender, f"{key!r} declares {array.dtype} {tuple(array.shape)}, expected {dtype} {shape}."
            )
        if len(array.data) > expected.numel() * expected.element_size() + NPY_HEADER_BYTES:
            raise InvalidUpdate(sender, f"{key!r} carries {len(array.data)} bytes, more than its shape holds.")
        try:
            value = array.numpy()  # np.load(allow_pickle=False): an object array is refused, never unpickled
        except Exception as error:  # a truncated or garbage payload: numpy's reader says why
            raise InvalidUpdate(sender, f"{key!r} is unreadable ({type(error).__name__}).") from None
        if str(value.dtype) != dtype or tuple(value.shape) != shape:
            raise InvalidUpdate(sender, f"{key!r} holds {value.dtype} {tuple(value.shape)}, expected {dtype} {shape}.")
        shared[key] = torch.from_numpy(np.ascontiguousarray(value))
    return shared


def global_from_message(content: RecordDict, reference: Mapping[str, torch.Tensor]) -> tuple[int, dict]:
    """The round and the global shared tensors of a server's train or evaluate message, checked against the node's
    own layout `reference` as a reply is checked on the server (the server is another organisation's machine too).

    Raises:
        [`~comigs_hf.server.InvalidUpdate`]: naming `"server"` and what is wrong.
    """
    secure = SECURE_TRAIN_ARRAYS in content.array_records  # a secure round's train message: FitIns record names
    try:
        round_index = content.config_records[SECURE_TRAIN_CONFIG if secure else "config"]["round"]
        arrays = content.array_records[SECURE_TRAIN_ARRAYS if secure else "arrays"]
    except KeyError as error:
        raise InvalidUpdate("server", f"the message lacks {error}.") from None
    if isinstance(round_index, bool) or not isinstance(round_index, int) or round_index < 1:
        raise InvalidUpdate("server", f"round must be an integer >= 1, got {round_index!r}.")
    shared = arrays_to_shared(arrays, reference, "server")
    for key, tensor in shared.items():
        if not bool(torch.isfinite(tensor).all()) or (tensor.numel() and float(tensor.abs().max()) > MAX_ABS_VALUE):
            raise InvalidUpdate("server", f"{key!r} holds NaN, Inf or values beyond +-{MAX_ABS_VALUE:g}.")
    return round_index, shared


def _report_record(name: str, metrics: Mapping[str, Any], **extra: Any) -> ConfigRecord:
    return ConfigRecord({"json": json.dumps({"name": name, "metrics": dict(metrics), **extra}, allow_nan=False)})


def update_to_reply(update: ClientUpdate, name: str, evaluation: Mapping[str, Any] | None = None) -> RecordDict:
    """The reply content of a client's train message: its update, its round metrics and (`evaluation`) its test
    metrics right after the local steps (see the module doc)."""
    return RecordDict(
        {
            "arrays": shared_to_arrays(update.shared),
            "metrics": MetricRecord(
                {"num-examples": update.train_tokens, "client-id": int(update.client_id), "round": update.round}
            ),
            "report": _report_record(name, update.metrics, evaluation=dict(evaluation) if evaluation else None),
        }
    )


def evaluation_to_reply(client_id: int, round_index: int, name: str, metrics: Mapping[str, Any]) -> RecordDict:
    """The reply content of a client's evaluate message: its test metrics after round `round_index`'s aggregation."""
    return RecordDict(
        {
            "metrics": MetricRecord({"client-id": client_id, "round": round_index}),
            "report": _report_record(name, metrics),
        }
    )


def identity_to_reply(client_id: int, name: str) -> RecordDict:
    """The reply content of a query message: which client the node serves."""
    return RecordDict({"metrics": MetricRecord({"client-id": client_id}), "report": _report_record(name, {})})


def _check_report_value(value: Any, where: str, depth: int = 0) -> None:
    if depth > MAX_REPORT_DEPTH:
        raise ValueError(f"{where} nests deeper than {MAX_REPORT_DEPTH} levels")
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"{where} is not finite")
        return
    if isinstance(value, str):
        if len(value) > MAX_NAME_LENGTH:
            raise ValueError(f"{where} is a string longer than {MAX_NAME_LENGTH}")
        return
    if isinstance(value, list):
        for index, item in enumerate(value):
            _check_report_value(item, f"{where}[{index}]", depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            _check_report_value(item, f"{where}.{key}", depth + 1)
        return
    raise ValueError(f"{where} has type {type(value).__name__}")


def _refuse_constant(constant: str) -> None:
    # JSON's NaN and Infinity are refused, not read as floats
    raise ValueError(f"the report holds {constant}")


def read_report(content: RecordDict, sender: int | str) -> dict[str, Any]:
    """The `"report"` of a reply: a mapping of bounded size holding finite numbers, `None`, short strings and lists
    or mappings of those, with a `"name"` string and a `"metrics"` mapping.

    Raises:
        [`~comigs_hf.server.InvalidUpdate`]: naming the sender and what is wrong.
    """
    try:
        text = content.config_records["report"]["json"]
        if not isinstance(text, str) or len(text) > MAX_REPORT_BYTES:
            raise ValueError(f"the report is not a string of at most {MAX_REPORT_BYTES} characters")
        report = json.loads(text, parse_constant=_refuse_constant)
        if not isinstance(report, dict) or not isinstance(report.get("name"), str):
            raise ValueError("the report has no name")
        if not isinstance(report.get("metrics"), dict):
            raise ValueError("the report has no metrics mapping")
        _check_report_value(report, "report")
    except (KeyError, TypeError, ValueError) as error:
        raise InvalidUpdate(sender, f"unreadable report ({error}).") from None
    return report


def update_from_reply(
    content: RecordDict, reference: Mapping[str, torch.Tensor], num_clients: int, round_index: int
) -> tuple[ClientUpdate, str, dict | None]:
    """The [`ClientUpdate`], client name and test metrics before aggregation (`None` when not evaluated) of an
    untrusted train reply, every field checked (see the module doc).

    Args:
        content (`RecordDict`): the reply's content.
        reference (`Mapping[str, torch.Tensor]`): the round's global shared state (its layout is what may arrive).
        num_clients (`int`): client ids must lie in `[0, num_clients)`.
        round_index (`int`): the round the reply must be for.

    Raises:
        [`~comigs_hf.server.InvalidUpdate`]: naming the sender (its claimed id, or `"?"`) and what is wrong.
    """
    client_id, tokens, name, metrics, evaluation = report_from_train_reply(content, num_clients, round_index)
    arrays = content.array_records.get("arrays")
    if arrays is None:
        raise InvalidUpdate(client_id, "the reply carries no 'arrays' record.")
    shared = arrays_to_shared(arrays, reference, client_id)
    return ClientUpdate(client_id, round_index, shared, tokens, metrics), name, evaluation


def report_from_train_reply(
    content: RecordDict, num_clients: int, round_index: int
) -> tuple[int, int, str, dict, dict | None]:
    """What a train reply says beside its tensors, checked: client id, training tokens, name, round metrics and test
    metrics before aggregation (`None` when not evaluated). A secure round's reply has nothing else the server
    may read.

    Raises:
        [`~comigs_hf.server.InvalidUpdate`]: naming the sender and what is wrong.
    """
    client_id = _sender(content, num_clients, round_index)
    try:
        tokens = content.metric_records["metrics"]["num-examples"]
    except KeyError as error:
        raise InvalidUpdate(client_id, f"the reply lacks {error}.") from None
    report = read_report(content, client_id)
    evaluation = report.get("evaluation")
    if evaluation is not None and not isinstance(evaluation, dict):
        raise InvalidUpdate(client_id, "unreadable report (its evaluation is not a mapping).")
    return client_id, tokens, report["name"], dict(report["metrics"]), evaluation


def _sender(content: RecordDict, num_clients: int, round_index: int | None) -> int:
    # the client id a reply claims, in range, and (for a train or evaluate reply) the round it is for
    try:
        metrics = content.metric_records["metrics"]
        client_id = metrics["client-id"]
        round_claimed = metrics["round"] if round_index is not None else None
    except KeyError as error:
        raise InvalidUpdate("?", f"the reply lacks {error}.") from None
    if isinstance(client_id, bool) or not isinstance(client_id, int) or not 0 <= client_id < num_clients:
        raise InvalidUpdate("?", f"client-id must be an integer in [0, {num_clients}), got {client_id!r}.")
    if round_claimed != round_index:
        raise InvalidUpdate(client_id, f"the reply is for round {round_claimed!r}, this is round {round_index}.")
    return client_id


def evaluation_from_reply(content: RecordDict, num_clients: int, round_index: int) -> tuple[int, str, dict]:
    """The client id, name and test metrics of an untrusted evaluate reply.

    Raises:
        [`~comigs_hf.server.InvalidUpdate`]: naming the sender and what is wrong.
    """
    client_id = _sender(content, num_clients, round_index)
    report = read_report(content, client_id)
    return client_id, report["name"], dict(report["metrics"])


def identity_from_reply(content: RecordDict, num_clients: int) -> tuple[int, str]:
    """The client id and name an untrusted query reply claims.

    Raises:
        [`~comigs_hf.server.InvalidUpdate`]: naming the sender and what is wrong.
    """
    client_id = _sender(content, num_clients, None)
    return client_id, read_report(content, client_id)["name"]


__all__ = [
    "arrays_to_shared",
    "evaluation_from_reply",
    "evaluation_to_reply",
    "global_from_message",
    "identity_from_reply",
    "identity_to_reply",
    "read_report",
    "report_from_train_reply",
    "shared_to_arrays",
    "update_from_reply",
    "update_to_reply",
]
