"""What an aggregation of a Hub round reports (`aggregation.json`, committed with the global it publishes): every
update accepted with its weight, every update rejected with why.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

REPORT_NAME = "aggregation.json"


@dataclass(frozen=True)
class AcceptedUpdate:
    """A client update that entered the aggregate, with its normalised weight under the strategy's weighting."""

    client_id: str
    num_tokens: int
    weight: float


@dataclass(frozen=True)
class RejectedUpdate:
    """A client update left out of the average (`client_id` is its folder name) and why."""

    client_id: str
    reason: str


@dataclass(frozen=True)
class AggregationReport:
    """What [`aggregate_round`] averaged into the global generalist of round `round + 1`.

    Stored as `aggregation.json` in the commit it describes (without `commit_sha`, which the tag gives).

    Attributes:
        round (`int`): the round whose updates were aggregated.
        tag (`str`): the tag of the new global, `round-<t+1>`.
        accepted (`tuple[AcceptedUpdate, ...]`): the averaged updates, by client id.
        rejected (`tuple[RejectedUpdate, ...]`): the updates left out, by folder, with the reason.
        num_tokens (`int`): training tokens over the accepted updates.
        min_clients (`int`): the quorum that was awaited.
        previous_commit (`str`, *optional*): the commit of the global `round-<t>` the updates were checked against.
        aggregation (`str`, defaults to `"weighted_mean"`): the rule (a key of `AGGREGATORS`) that combined them.
        commit_sha (`str`, *optional*): the commit of the new global.
    """

    round: int
    tag: str
    accepted: tuple[AcceptedUpdate, ...]
    rejected: tuple[RejectedUpdate, ...]
    num_tokens: int
    min_clients: int
    previous_commit: str | None = None
    aggregation: str = "weighted_mean"
    commit_sha: str | None = field(default=None, compare=False)

    @property
    def accepted_clients(self) -> list[str]:
        return [update.client_id for update in self.accepted]

    @property
    def rejected_reasons(self) -> dict[str, str]:
        return {update.client_id: update.reason for update in self.rejected}

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("commit_sha")
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], commit_sha: str | None = None) -> AggregationReport:
        """A stored report, every field's type checked (it comes from the repo, which other writers can touch).

        Raises:
            `ValueError`, `KeyError`, `TypeError`: a field missing or of the wrong type.
        """
        _check_types(data, {"round": int, "tag": str, "num_tokens": int, "min_clients": int, "aggregation": str})
        for update in data["accepted"]:
            _check_types(update, {"client_id": str, "num_tokens": int, "weight": (int, float)})
        for update in data["rejected"]:
            _check_types(update, {"client_id": str, "reason": str})
        if not isinstance(data.get("previous_commit"), (str, type(None))):
            raise TypeError("previous_commit is not a string")
        return cls(
            round=data["round"],
            tag=data["tag"],
            accepted=tuple(AcceptedUpdate(**update) for update in data["accepted"]),
            rejected=tuple(RejectedUpdate(**update) for update in data["rejected"]),
            num_tokens=data["num_tokens"],
            min_clients=data["min_clients"],
            previous_commit=data.get("previous_commit"),
            aggregation=data.get("aggregation", "weighted_mean"),
            commit_sha=commit_sha,
        )


def _check_types(data: Any, fields: Mapping[str, type | tuple[type, ...]]) -> None:
    if not isinstance(data, Mapping):
        raise TypeError(f"expected an object, got {type(data).__name__}")
    for name, kind in fields.items():
        value = data.get(name, "weighted_mean" if name == "aggregation" else None)
        if isinstance(value, bool) or not isinstance(value, kind):
            raise TypeError(f"{name} is {type(value).__name__}")


__all__ = ["REPORT_NAME", "AcceptedUpdate", "AggregationReport", "RejectedUpdate"]
