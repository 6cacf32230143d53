"""A Hub round's uploads read from the repo and settled against the round's reference: each update checked alone (its
files, their sizes, its config, its tensors read with safetensors only), then against the global the round started
from (the server step's checks), one update per client; what the aggregator accepts, and why it rejects the rest.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from safetensors.torch import load_file

from ...adapters import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    check_float_tensors,
    check_lora_config,
    quote_untrusted,
    read_untrusted_json,
)
from ...server import InvalidUpdate, check_update
from .federation import MANIFEST_NAME, FederationManifest, client_commits, trusted_round_commit
from .repo import round_tag, with_retries
from .report import RejectedUpdate
from .updates import _LORA_FIELDS, UPDATE_NAME, UPDATES_FOLDER, _Candidate, _parse_update, _Rejected

logger = logging.getLogger("comigs_hf.hub")

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
