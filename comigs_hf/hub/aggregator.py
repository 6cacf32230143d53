"""The aggregator of Hub-mediated rounds: wait for a round's updates, check them, run the server step, publish.

Round `t` starts from the global tagged `round-<t>`; clients upload their updates under `updates/round-<t>/`
(`comigs_hf.hub.updates`), and [`aggregate_round`] combines the valid ones through the server step
(`comigs_hf.server.server_step`) into the global tagged `round-<t+1>`, with `aggregation.json` reporting what
was accepted and what was rejected, and why.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError
from safetensors.torch import load_file, save

from ..adapters import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    check_float_tensors,
    check_lora_config,
    quote_untrusted,
    read_untrusted_json,
)
from ..algorithms import get_strategy
from ..server import InvalidUpdate, check_update, server_step
from ..strategies import Strategy, aggregation_weights
from .cards import README_NAME, render_generalist_card
from .federation import (
    MANIFEST_NAME,
    FederationManifest,
    ForgedRound,
    check_aggregator_identity,
    client_commits,
    delete_forged_tag,
    first_author,
    read_manifest,
    trusted_round_commit,
)
from .repo import check_hub_strategy, main_head, round_tag, with_retries
from .updates import _LORA_FIELDS, UPDATE_NAME, UPDATES_FOLDER, _Candidate, _parse_update, _Rejected

logger = logging.getLogger("comigs_hf.hub")

REPORT_NAME = "aggregation.json"
_SMALL_FILE_LIMIT = 1 << 20  # update.json and adapter_config.json are a few hundred bytes


@dataclass
class _Reference:
    """What updates of this round must agree with; fields left `None` are settled by majority among the updates.

    `tensors` are the global round-t tensors (their values bound `max_update_norm`), or, settled among the updates,
    names, shapes and dtypes on the meta device.
    """

    config: dict[str, Any] | None = None
    tensors: dict[str, torch.Tensor] | None = None
    base_model: str | None = None
    commit: str | None = None
    shapes: dict[str, tuple[int, ...]] | None = None  # what updates must have; `expected_shapes` when given


def _lora_signature(config: Mapping[str, Any]) -> str:
    targets = config.get("target_modules")
    fields = {name: config.get(name) for name in _LORA_FIELDS}
    fields["target_modules"] = sorted(targets) if isinstance(targets, list) else targets
    return json.dumps(fields, sort_keys=True)


def _check_against(candidate: _Candidate, reference: _Reference) -> None:
    """Checks of an upload's format against the round's reference: base model and LoRA settings (the tensors
    themselves are the server step's to check)."""
    if reference.base_model and candidate.base_model and candidate.base_model != reference.base_model:
        raise _Rejected(f"trained on base model {candidate.base_model!r}, the global's is {reference.base_model!r}.")
    if reference.config is not None:
        ours, theirs = json.loads(_lora_signature(reference.config)), json.loads(_lora_signature(candidate.config))
        differing = [name for name in _LORA_FIELDS if ours[name] != theirs[name]]
        if differing:
            name = differing[0]
            raise _Rejected(f"adapter_config {name}={theirs[name]!r} differs from the global's {ours[name]!r}.")


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


def _majority(candidates: list[_Candidate], key: Any) -> Any:
    """The most common `key(candidate)`; ties go to the first candidate (sorted by folder) holding one."""
    counts = Counter(key(candidate) for candidate in candidates)
    best = max(counts.values())
    return next(key(candidate) for candidate in candidates if counts[key(candidate)] == best)


def _settle(
    candidates: list[_Candidate], reference: _Reference, max_update_norm: float | None = None
) -> tuple[list[_Candidate], list[RejectedUpdate], dict[str, torch.Tensor] | None]:
    """Format checks, majority where the reference is silent, the server step's tensor checks (with the strategy's
    norm bound), then one update per client; also returns the reference tensors the accepted updates were checked
    against."""
    rejected: list[RejectedUpdate] = []

    def keep(pool: list[_Candidate], check: Any) -> list[_Candidate]:
        kept = []
        for candidate in pool:
            try:
                check(candidate)
                kept.append(candidate)
            except _Rejected as reason:
                rejected.append(RejectedUpdate(candidate.folder, str(reason)))
            except InvalidUpdate as invalid:
                rejected.append(RejectedUpdate(candidate.folder, invalid.reason))
        return kept

    pool = keep(candidates, lambda c: _check_against(c, reference))
    # no global round-t to compare with: the updates most of the clients agree on define the round's format
    settled = _Reference(reference.config, reference.tensors, reference.base_model, shapes=reference.shapes)
    if pool and settled.tensors is None:
        fitting = [c for c in pool if settled.shapes is None or _shapes(c.update.shared) == settled.shapes]
        voters = fitting or pool
        signature = _majority(voters, lambda c: c.signature)
        winner = next(c for c in voters if c.signature == signature)
        settled.tensors = _meta(winner.update.shared)
        if settled.shapes is not None and not fitting:
            # nobody sent the expected shapes: check against them, in the majority's dtype
            dtype = next(iter(settled.tensors.values())).dtype
            settled.tensors = {k: torch.empty(s, dtype=dtype, device="meta") for k, s in settled.shapes.items()}
    pool = keep(pool, lambda c: check_update(c.update, settled.tensors, max_update_norm))
    if pool and settled.config is None:
        signature = _majority(pool, lambda c: _lora_signature(c.config))
        settled.config = next(c.config for c in pool if _lora_signature(c.config) == signature)
    pool = keep(pool, lambda c: _check_against(c, settled))

    by_client: dict[str, list[_Candidate]] = {}
    for candidate in pool:
        by_client.setdefault(candidate.client_id, []).append(candidate)
    accepted = []
    for client_id, claims in by_client.items():
        # the folder named after the client is its own upload: other folders claiming the id do not displace it
        own = next((candidate for candidate in claims if candidate.folder == client_id), None)
        for candidate in claims:
            if candidate is own:
                accepted.append(candidate)
                continue
            if own is not None:
                reason = f"duplicate: client_id {client_id!r} already submitted in folder {client_id!r}."
            elif len(claims) > 1:
                folders = ", ".join(repr(c.folder) for c in claims)
                reason = f"duplicate: client_id {client_id!r} claimed by several folders ({folders})."
            else:
                reason = f"{UPDATE_NAME} client_id {client_id!r} does not match its folder {candidate.folder!r}."
            rejected.append(RejectedUpdate(candidate.folder, reason))
    accepted.sort(key=lambda c: c.client_id)
    return accepted, sorted(rejected, key=lambda r: (r.client_id, r.reason)), settled.tensors


def _shapes(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(tensor.shape) for key, tensor in tensors.items()}


def _meta(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # names, shapes and dtypes without the values: all a reference needs
    return {key: torch.empty(tensor.shape, dtype=tensor.dtype, device="meta") for key, tensor in tensors.items()}


def _max_weights_bytes(shapes: Mapping[str, Sequence[int]] | None) -> int | None:
    # float64 is the widest dtype an honest update can use; anything larger is not worth downloading
    if shapes is None:
        return None
    return 8 * sum(math.prod(shape) for shape in shapes.values()) + (1 << 20)


class _UpdateScanner:
    """Lists the updates of a round at a commit and parses each (cached by the folder's blob ids across polls).

    With a manifest, only its clients' folders count; where it names the clients' Hub users, each client's update
    is read at the newest commit its user made for it, whatever was written over it since.
    """

    def __init__(
        self,
        api: HfApi,
        repo_id: str,
        round: int,
        token: str | bool | None,
        max_weights: int | None,
        manifest: FederationManifest | None = None,
    ):
        self.api, self.repo_id, self.round, self.token, self.max_weights = api, repo_id, round, token, max_weights
        self.manifest = manifest
        self.prefix = f"{UPDATES_FOLDER}/{round_tag(round)}"
        self._cache: dict[tuple, _Candidate | RejectedUpdate] = {}

    def _folders(self, commit: str, path: str) -> dict[str, dict[str, Any]]:
        """Update folder -> its update files (tree entries) under `path` at `commit`."""
        try:
            entries = list(
                self.api.list_repo_tree(
                    self.repo_id, path_in_repo=path, recursive=True, revision=commit, token=self.token
                )
            )
        except EntryNotFoundError:
            return {}
        folders: dict[str, dict[str, Any]] = {}
        for entry in entries:
            if not hasattr(entry, "blob_id"):
                continue  # a folder
            folder, _, name = entry.path[len(self.prefix) + 1 :].partition("/")
            if not name:
                continue  # a stray file next to the client folders, not an update
            folders.setdefault(folder, {})
            if name in (UPDATE_NAME, ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME):
                folders[folder][name] = entry
        return folders

    def scan(self, commit: str) -> tuple[list[_Candidate], list[RejectedUpdate]]:
        folders = self._folders(commit, self.prefix)
        revisions = dict.fromkeys(folders, commit)
        rejected = []
        manifest = self.manifest
        if manifest is not None:
            for folder in sorted(set(folders) - set(manifest.clients)):
                reason = f"{quote_untrusted(folder)} is not a client of this federation ({MANIFEST_NAME})."
                rejected.append(RejectedUpdate(folder, reason))
                del folders[folder]
            if manifest.client_users is not None:
                own = client_commits(self.api, self.repo_id, commit, self.round, manifest, self.token)
                for folder in sorted(set(folders) - set(own)):
                    user = manifest.client_users[folder]
                    rejected.append(RejectedUpdate(folder, f"no commit of its Hub user {user!r} carries it."))
                folders, revisions = {}, own
                for folder, sha in own.items():
                    folders.update(self._folders(sha, f"{self.prefix}/{folder}"))
        candidates = []
        for folder in sorted(folders):
            files = folders[folder]
            signature = (folder, *sorted((name, entry.blob_id) for name, entry in files.items()))
            if signature not in self._cache:
                self._cache[signature] = self._parse(folder, files, revisions[folder])
            result = self._cache[signature]
            (rejected if isinstance(result, RejectedUpdate) else candidates).append(result)
        return candidates, rejected

    def _parse(self, folder: str, files: Mapping[str, Any], commit: str) -> _Candidate | RejectedUpdate:
        try:
            for name, entry in files.items():
                limit = self.max_weights if name == ADAPTER_WEIGHTS_NAME else _SMALL_FILE_LIMIT
                if limit is not None and entry.size > limit:
                    raise _Rejected(f"{name} is {entry.size} bytes, more than the {limit} this round's update needs.")
            # a download that fails (network, server) propagates: the aggregator can be re-run, and nothing is
            # cached as rejected for a fault of ours
            paths = {
                name: Path(
                    with_retries(
                        functools.partial(
                            hf_hub_download, self.repo_id, entry.path, revision=commit, token=self.token
                        ),
                        f"downloading {entry.path}",
                    )
                )
                for name, entry in files.items()
            }
            try:
                candidate = _parse_update(folder, paths, self.round)
            except (_Rejected, MemoryError, OSError):
                raise  # OSError, MemoryError: this machine's fault (disk, memory), not the client's
            except Exception as error:  # whatever else another party's files provoke is theirs: a rejection
                raise _Rejected(f"its files could not be checked ({type(error).__name__}).") from None
        except _Rejected as reason:
            result = RejectedUpdate(folder, str(reason))
            logger.warning(
                "Rejected the round %d update in %s/%s: %s", self.round, self.prefix, quote_untrusted(folder), reason
            )
            return result
        return candidate


def _reference(
    api: HfApi,
    repo_id: str,
    round: int,
    expected_shapes: Mapping[str, Sequence[int]] | None,
    token: str | bool | None,
    manifest: FederationManifest | None = None,
) -> _Reference:
    """The global tagged `round-<t>` (config, shapes, base model), overridden by `expected_shapes` when given."""
    reference = _Reference()
    commit = trusted_round_commit(api, repo_id, round, manifest, token)
    if commit is not None:
        reference.commit = commit
        try:
            config_path, weights_path = (
                with_retries(
                    functools.partial(hf_hub_download, repo_id, name, revision=commit, token=token), f"reading {name}"
                )
                for name in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME)
            )
        except EntryNotFoundError:
            logger.warning(
                "%s of %s holds no adapter at the root: updates are checked against each other.",
                round_tag(round),
                repo_id,
            )
        else:
            where = f"{repo_id}@{round_tag(round)}"
            reference.config = check_lora_config(
                read_untrusted_json(Path(config_path).read_bytes(), f"{where} {ADAPTER_CONFIG_NAME}")
            )
            tensors = load_file(weights_path)
            check_float_tensors(tensors, f"{where} {ADAPTER_WEIGHTS_NAME}")
            reference.tensors = tensors
            reference.shapes = _shapes(reference.tensors)
            reference.base_model = reference.config.get("base_model_name_or_path")
    if expected_shapes is not None:
        reference.shapes = {key: tuple(shape) for key, shape in expected_shapes.items()}
        reference.tensors = None  # settled among the updates of these shapes
    return reference


def _existing_report(
    api: HfApi, repo_id: str, round: int, token: str | bool | None, manifest: FederationManifest | None = None
) -> AggregationReport | None:
    """The report of round `round`'s publication, tagged `round-<t+1>`, or `None` while there is none (a forged tag
    is deleted first)."""
    tag = round_tag(round + 1)
    try:
        commit = trusted_round_commit(api, repo_id, round + 1, manifest, token)  # the tag read once
    except ForgedRound as forged:  # pre-created or moved by another writer: not a round we published
        delete_forged_tag(api, repo_id, tag, forged, token)
        return None
    if commit is None:
        return None
    try:
        path = with_retries(
            lambda: hf_hub_download(repo_id, REPORT_NAME, revision=commit, token=token), f"reading {tag}"
        )
    except EntryNotFoundError:
        raise ValueError(
            f"{tag} already exists in {repo_id} (commit {commit}) but was not produced by aggregate_round (no "
            f"{REPORT_NAME}): refusing to aggregate over it."
        ) from None
    try:
        stored = read_untrusted_json(Path(path).read_bytes(), f"{tag} {REPORT_NAME}")
        report = AggregationReport.from_dict(stored, commit_sha=commit)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(
            f"{tag} of {repo_id} (commit {commit}) holds an {REPORT_NAME} that is no aggregation report "
            f"({type(error).__name__}): refusing to aggregate over it."
        ) from None
    if report.round != round or report.tag != tag:
        raise ValueError(
            f"{tag} of {repo_id} (commit {commit}) reports round {report.round}, not round {round}: a moved tag; "
            "refusing to aggregate over it."
        )
    return report


def aggregate_round(
    repo_id: str,
    round: int,
    *,
    min_clients: int,
    timeout_s: float,
    poll_interval_s: float = 10.0,
    token: str | bool | None = None,
    expected_shapes: Mapping[str, Sequence[int]] | None = None,
    strategy: Strategy | str = "comigs",
) -> AggregationReport:
    """Wait for the round-`round` updates, aggregate them with the strategy's rule, publish `round-<t+1>`.

    Polls `updates/round-<t>/` until `min_clients` valid updates are in or `timeout_s` passes, then proceeds with
    what arrived (at least one). Each update is checked: files present and readable (safetensors only), a LoRA
    config agreeing with the global's (rank, alpha, rsLoRA, targets), `update.json` for this round with a positive
    `num_tokens`, the same base model, then the server step's checks ([`~comigs_hf.server.check_update`]: the
    global's tensor names, shapes and dtype, finite values), and one update per client. Failing updates are logged
    (`comigs_hf.hub` warnings) and listed in the report; they never block the others. Without a global `round-<t>`,
    or with `expected_shapes`, the format most updates share (of those shapes) is the reference.

    The accepted updates are combined by the server step, [`~comigs_hf.server.server_step`], with the
    strategy's rule and weighting (the recipe's `aggregation`, `aggregation_kwargs` and `weighting`, so
    `trimmed_mean` works here as in the Accelerate rounds). The result is committed at the repo root as a PEFT
    adapter with its card and `aggregation.json`, in one commit tagged `round-<t+1>`. If that tag already exists,
    nothing is committed and its stored report is returned.

    Args:
        repo_id (`str`): the shared repo.
        round (`int`): the round whose updates to aggregate.
        min_clients (`int`): valid updates to wait for.
        timeout_s (`float`): how long to wait for them, in seconds.
        poll_interval_s (`float`, defaults to 10): seconds between listings of the updates.
        token (`str` or `bool`, *optional*): Hub token; defaults to `HF_TOKEN` or the stored login.
        expected_shapes (`Mapping[str, Sequence[int]]`, *optional*): PEFT key to shape, instead of the global's.
        strategy ([`~comigs_hf.strategies.Strategy`] or `str`, defaults to `"comigs"`): the recipe's strategy, or
            the name of a preset; it must share the generalist only (see `check_hub_strategy`).

    Returns:
        [`AggregationReport`]: accepted and rejected updates and the new commit.

    Raises:
        `TimeoutError`: no valid update arrived in time.
        `ValueError`: bad arguments, a strategy the Hub rounds cannot carry, `round-<t+1>` existing without an
        aggregation report, or an aggregate that is not finite (nothing is published then).
    """
    round_tag(round)  # checks it
    strategy = check_hub_strategy(get_strategy(strategy) if isinstance(strategy, str) else strategy)
    if isinstance(min_clients, bool) or not isinstance(min_clients, int) or min_clients < 1:
        raise ValueError(f"`min_clients` must be a positive integer, got {min_clients!r}.")
    if timeout_s < 0 or poll_interval_s <= 0:
        raise ValueError(f"`timeout_s` must be >= 0 and `poll_interval_s` > 0, got {timeout_s} and {poll_interval_s}.")
    api = HfApi()
    tag = round_tag(round + 1)
    manifest = read_manifest(api, repo_id, token)
    check_aggregator_identity(api, manifest, token)
    existing = _existing_report(api, repo_id, round, token, manifest)
    if existing is not None:
        logger.info(
            "%s already aggregated into %s (commit %s): nothing to do.", round_tag(round), tag, existing.commit_sha
        )
        return existing

    reference = _reference(api, repo_id, round, expected_shapes, token, manifest)
    if strategy.max_update_norm is not None and reference.tensors is None:
        raise ValueError(
            f"max_update_norm bounds each update's distance from the global {round_tag(round)}, but {repo_id} has "
            "none to compare with (no adapter at the tag, or expected_shapes given)."
        )
    scanner = _UpdateScanner(api, repo_id, round, token, _max_weights_bytes(reference.shapes), manifest)
    deadline = time.monotonic() + timeout_s
    while True:
        candidates, rejected = scanner.scan(main_head(api, repo_id, token))
        accepted, late_rejected, reference_tensors = _settle(candidates, reference, strategy.max_update_norm)
        remaining = deadline - time.monotonic()
        if len(accepted) >= min_clients or remaining <= 0:
            break
        time.sleep(min(poll_interval_s, remaining))
    rejected = sorted([*rejected, *late_rejected], key=lambda r: (r.client_id, r.reason))
    for update in late_rejected:
        logger.warning(
            "Rejected the round %d update in %s/%s: %s",
            round,
            scanner.prefix,
            quote_untrusted(update.client_id),
            update.reason,
        )
    if not accepted:
        reasons = "; ".join(f"{r.client_id}: {r.reason}" for r in rejected) or "none arrived"
        raise TimeoutError(f"No valid round {round} update in {repo_id} after {timeout_s} s ({reasons}).")
    if len(accepted) < min_clients:
        logger.warning(
            "Round %d: %d of %d expected clients after %s s; aggregating those.",
            round,
            len(accepted),
            min_clients,
            timeout_s,
        )

    updates = [candidate.update for candidate in accepted]
    state = server_step(strategy, updates, reference_tensors).shared
    weights = aggregation_weights(strategy, [update.train_tokens for update in updates])
    total = sum(update.train_tokens for update in updates)
    report = AggregationReport(
        round=round,
        tag=tag,
        accepted=tuple(
            AcceptedUpdate(u.client_id, u.train_tokens, weight / sum(weights)) for u, weight in zip(updates, weights)
        ),
        rejected=tuple(rejected),
        num_tokens=total,
        min_clients=min_clients,
        previous_commit=reference.commit,
        aggregation=strategy.aggregation,
    )
    config = dict(reference.config or accepted[0].config)
    base_model = reference.base_model or config.get("base_model_name_or_path") or accepted[0].base_model
    card = render_generalist_card(
        base_model=base_model,
        repo_id=repo_id,
        round=round + 1,
        num_clients=len(accepted),
        num_tokens=total,
        strategy=strategy.name,
        lora_r=config.get("r"),
        lora_alpha=config.get("lora_alpha"),
        target_modules=config.get("target_modules") if isinstance(config.get("target_modules"), list) else None,
    )
    weights_bytes = save({key: value.contiguous() for key, value in state.items()}, metadata={"format": "pt"})
    files = {
        ADAPTER_WEIGHTS_NAME: weights_bytes,
        ADAPTER_CONFIG_NAME: json.dumps(config, indent=2, sort_keys=True).encode(),
        README_NAME: str(card).encode(),
        REPORT_NAME: json.dumps(report.to_dict(), indent=2).encode(),
    }
    published = _publish(
        api,
        repo_id,
        round,
        files,
        manifest,
        commit_message=f"{_COMMIT_TITLE.format(round=round)} ({len(accepted)} clients)",
        token=token,
    )
    if published.to_dict() != report.to_dict():
        logger.info("%s was aggregated into %s by another aggregator (commit %s).", round, tag, published.commit_sha)
    else:
        logger.info(
            "Aggregated %d round %d updates of %s into %s (commit %s).",
            len(accepted),
            round,
            repo_id,
            tag,
            published.commit_sha,
        )
    return published


_COMMIT_TITLE = "Global generalist after round {round}"
_PUBLISH_ATTEMPTS = 8


def _publish(
    api: HfApi,
    repo_id: str,
    round: int,
    files: Mapping[str, bytes],
    manifest: FederationManifest | None,
    commit_message: str,
    token: str | bool | None,
) -> AggregationReport:
    """Publish round `round`'s global: a commit on `main` whose parent is the head just read, then the tag on it.

    Of several aggregators racing, the first commit wins: the others' commits are refused (the parent moved), and
    they find that commit, tag it if its aggregator has not yet, and return its report. So exactly one global is
    published per round, `main` never holds an untagged one, and the tag never points anywhere else.
    """
    tag = round_tag(round + 1)
    for _ in range(_PUBLISH_ATTEMPTS):
        existing = _existing_report(api, repo_id, round, token, manifest)
        if existing is not None:
            return existing
        head = main_head(api, repo_id, token)
        untagged = _untagged_publication(api, repo_id, round, head, manifest, token)
        if untagged is not None:  # another aggregator committed and has not tagged yet (or died before it did)
            _create_tag(api, repo_id, tag, untagged, token)
            continue
        operations = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=data) for path, data in files.items()]
        try:
            info = with_retries(
                functools.partial(
                    api.create_commit,
                    repo_id,
                    operations=operations,
                    commit_message=commit_message,
                    parent_commit=head,
                    token=token,
                ),
                f"committing round {round}'s global to {repo_id}",
            )
        except HfHubHTTPError as error:
            if error.response is None or error.response.status_code not in (409, 412):
                raise
            logger.info("main of %s moved while publishing round %d: looking again.", repo_id, round)
            continue
        _create_tag(api, repo_id, tag, info.oid, token)
    raise RuntimeError(
        f"Could not publish round {round} of {repo_id} in {_PUBLISH_ATTEMPTS} attempts: main kept moving."
    )


def _create_tag(api: HfApi, repo_id: str, tag: str, sha: str, token: str | bool | None) -> None:
    try:
        with_retries(lambda: api.create_tag(repo_id, tag=tag, revision=sha, token=token), f"tagging {tag}")
    except HfHubHTTPError as error:
        if error.response is None or error.response.status_code != 409:
            raise  # 409: tagged meanwhile; the caller reads which commit it names


def _untagged_publication(
    api: HfApi, repo_id: str, round: int, head: str, manifest: FederationManifest | None, token: str | bool | None
) -> str | None:
    """The commit publishing round `round` if `main` holds one that no tag names yet (its `aggregation.json`, carried
    into later commits, says so, and the manifest's aggregator made it), else `None`."""
    try:
        path = hf_hub_download(repo_id, REPORT_NAME, revision=head, token=token)
        stored = read_untrusted_json(Path(path).read_bytes(), REPORT_NAME)
    except (EntryNotFoundError, ValueError):
        return None
    if not isinstance(stored, dict) or stored.get("round") != round:
        return None
    title = _COMMIT_TITLE.format(round=round) + " ("
    aggregator = manifest.aggregator if manifest is not None else None
    commits = with_retries(lambda: api.list_repo_commits(repo_id, revision=head, token=token), "listing commits")
    return next(
        (
            commit.commit_id
            for commit in commits
            if commit.title.startswith(title) and (aggregator is None or first_author(commit) == aggregator)
        ),
        None,
    )


__all__ = ["AcceptedUpdate", "AggregationReport", "RejectedUpdate", "aggregate_round"]
