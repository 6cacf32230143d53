"""Who takes part in a Hub-mediated federation, fixed when it is seeded, and which commits can be trusted.

The round-1 commit holds `federation.json`:

```
{"format": "comigs-federation-v1",
 "clients": ["client-0000", ...],                 the only ids whose updates count, towards the quorum too
 "aggregator": "org-bot" | null,                  the Hub user whose commits publish the rounds
 "client_users": {"client-0000": "alice", ...} | null}   the Hub user whose commits carry each client's updates
```

Anyone with write access to the repo can write anywhere in it. Where the manifest names Hub users, the Hub's own
record of who made each commit decides: a round tag counts only on a commit of the aggregator's user, and a client's
update is read at the newest commit its user made for it, so another writer overwriting or deleting the folder
later changes nothing. Without users (a Hub that reports no authors, or a federation sharing one account) only the
ids are enforced.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

from ...adapters import quote_untrusted, read_untrusted_json
from .repo import _tag_target, round_tag, with_retries

logger = logging.getLogger("comigs_hf.hub")

MANIFEST_NAME = "federation.json"
MANIFEST_FORMAT = "comigs-federation-v1"
MAX_CLIENTS = 10_000
# Hub user and organisation names: letters, digits, '-', '_', '.', at most 96 characters
_HUB_USER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
# client ids name update folders: the same conservative characters, matched whole (no trailing newline)
_CLIENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


def check_client_id(client_id: object) -> str:
    """`client_id` if it can name a client's update folder: 1-96 letters, digits, `.`, `_`, `-`, starting with a
    letter or digit (nothing else, not even a trailing newline).

    Raises:
        `ValueError`: naming the rule.
    """
    if not isinstance(client_id, str) or _CLIENT_ID.fullmatch(client_id) is None:
        raise ValueError(
            f"`client_id` must be 1-96 letters, digits, '.', '_' or '-' starting with a letter or digit, "
            f"got {client_id!r}."
        )
    return client_id


def _check_user(value: Any, field: str) -> str:
    if not isinstance(value, str) or _HUB_USER.fullmatch(value) is None:
        raise ValueError(f"{MANIFEST_NAME}: {field} must be a Hub user name, got {quote_untrusted(value)}.")
    return value


@dataclass(frozen=True)
class FederationManifest:
    """The federation's members, fixed in its round-1 commit.

    Args:
        clients (`tuple[str, ...]`): the client ids (update folder names) whose updates count.
        aggregator (`str`, *optional*): the Hub user whose commits publish rounds; `None` checks no authorship.
        client_users (`dict[str, str]`, *optional*): each client id's Hub user; `None` checks no authorship.
    """

    clients: tuple[str, ...]
    aggregator: str | None = None
    client_users: Mapping[str, str] | None = None

    def __post_init__(self) -> None:
        if not self.clients or len(self.clients) > MAX_CLIENTS:
            raise ValueError(f"{MANIFEST_NAME}: clients must list 1 to {MAX_CLIENTS} client ids.")
        for client_id in self.clients:
            check_client_id(client_id)
        if len(set(self.clients)) != len(self.clients):
            raise ValueError(f"{MANIFEST_NAME}: clients lists an id twice.")
        if self.aggregator is not None:
            _check_user(self.aggregator, "aggregator")
        if self.client_users is not None:
            if not isinstance(self.client_users, Mapping) or set(self.client_users) != set(self.clients):
                raise ValueError(
                    f"{MANIFEST_NAME}: client_users must name a Hub user for every client, and only them."
                )
            for client_id, user in self.client_users.items():
                _check_user(user, f"client_users[{client_id!r}]")

    def to_json(self) -> bytes:
        data = {
            "format": MANIFEST_FORMAT,
            "clients": list(self.clients),
            "aggregator": self.aggregator,
            "client_users": dict(self.client_users) if self.client_users is not None else None,
        }
        return json.dumps(data, indent=2).encode()

    @classmethod
    def from_json(cls, data: bytes) -> FederationManifest:
        """Parse and check another party's manifest.

        Raises:
            `ValueError`: naming what is wrong.
        """
        stored = read_untrusted_json(data, MANIFEST_NAME)
        if not isinstance(stored, dict) or stored.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"{MANIFEST_NAME} is not a {MANIFEST_FORMAT} manifest.")
        clients, users = stored.get("clients"), stored.get("client_users")
        if not isinstance(clients, list):
            raise ValueError(f"{MANIFEST_NAME}: clients must be a list of client ids.")
        if users is not None and not isinstance(users, dict):
            raise ValueError(f"{MANIFEST_NAME}: client_users must map client ids to Hub users.")
        return cls(tuple(clients), stored.get("aggregator"), users)


class ForgedRound(ValueError):
    """A round tag on a commit the federation's aggregator did not make, or on one publishing another round."""


def commit_author(api: HfApi, repo_id: str, sha: str, token: str | bool | None) -> str | None:
    """The Hub user who made commit `sha` (its first author), `None` when the Hub reports none."""
    commits = with_retries(lambda: api.list_repo_commits(repo_id, revision=sha, token=token), "listing commits")
    return first_author(commits[0]) if commits else None


def first_author(commit: Any) -> str | None:
    """Who made a listed commit: its first author (one rule everywhere; co-author lists are not trusted)."""
    return commit.authors[0] if commit.authors else None


def read_manifest(api: HfApi, repo_id: str, token: str | bool | None) -> FederationManifest | None:
    """The manifest of the round-1 commit, `None` for a federation seeded without one (ids are then not checked).

    Raises:
        `ValueError`: a malformed manifest, or a round-1 commit that is not the manifest's aggregator's.
    """
    commit = _tag_target(api, repo_id, round_tag(1), token)
    if commit is None:
        return None
    try:
        path = hf_hub_download(repo_id, MANIFEST_NAME, revision=commit, token=token)
    except EntryNotFoundError:
        logger.warning("%s has no %s: any client id counts and no authorship is checked.", repo_id, MANIFEST_NAME)
        return None
    manifest = FederationManifest.from_json(Path(path).read_bytes())
    _check_made_by(api, repo_id, round_tag(1), commit, manifest.aggregator, token)
    return manifest


def _check_made_by(api: HfApi, repo_id: str, what: str, sha: str, user: str | None, token: str | bool | None) -> None:
    if user is None:
        return
    author = commit_author(api, repo_id, sha, token)
    if author is None:
        raise ValueError(
            f"{what} of {repo_id} points at commit {sha}, whose author the Hub does not report: cannot check that "
            f"the federation's aggregator {user!r} made it."
        )
    if author != user:
        raise ForgedRound(
            f"{what} of {repo_id} points at commit {sha} by {quote_untrusted(author)}, not by the federation's "
            f"aggregator {user!r}: it is not a round this federation published."
        )


def trusted_round_commit(
    api: HfApi, repo_id: str, round: int, manifest: FederationManifest | None, token: str | bool | None
) -> str | None:
    """The commit tag `round-<t>` names (read once), if the manifest's aggregator made it and, from round 2 on, its
    `aggregation.json` reports round t - 1 (`None`: no such tag).

    Raises:
        [`ForgedRound`]: the tag names someone else's commit, or one publishing another round (a rollback).
        `ValueError`: the Hub reports no author to check.
    """
    tag = round_tag(round)
    commit = _tag_target(api, repo_id, tag, token)
    if commit is None or manifest is None or manifest.aggregator is None:
        return commit
    _check_made_by(api, repo_id, tag, commit, manifest.aggregator, token)
    if round > 1:
        try:
            path = with_retries(
                lambda: hf_hub_download(repo_id, "aggregation.json", revision=commit, token=token), f"reading {tag}"
            )
            stored = read_untrusted_json(Path(path).read_bytes(), f"{tag} aggregation.json")
        except (EntryNotFoundError, ValueError):
            stored = None
        if not isinstance(stored, dict) or stored.get("round") != round - 1 or stored.get("tag") != tag:
            raise ForgedRound(
                f"{tag} of {repo_id} points at commit {commit}, which does not publish round {round - 1}: a moved tag."
            )
    return commit


def check_aggregator_identity(api: HfApi, manifest: FederationManifest | None, token: str | bool | None) -> None:
    """Refuse to aggregate under another Hub user than the manifest's aggregator: its commits would not count.

    Raises:
        `ValueError`: the token's user is not the manifest's aggregator, or cannot be told.
    """
    if manifest is None or manifest.aggregator is None:
        return
    try:
        user = api.whoami(token=token)["name"]
    except (HfHubHTTPError, KeyError, OSError) as error:
        raise ValueError(
            f"This federation's rounds are published by the Hub user {manifest.aggregator!r}, and the token's user "
            f"cannot be told ({type(error).__name__})."
        ) from None
    if user != manifest.aggregator:
        raise ValueError(
            f"This federation's rounds are published by the Hub user {manifest.aggregator!r} ({MANIFEST_NAME}), but "
            f"this token belongs to {user!r}: aggregate with the aggregator's token."
        )


def published_round_commit(api: HfApi, repo_id: str, round: int, token: str | bool | None) -> str | None:
    """[`trusted_round_commit`] under the repo's own manifest ([`read_manifest`])."""
    return trusted_round_commit(api, repo_id, round, read_manifest(api, repo_id, token), token)


def client_commits(
    api: HfApi, repo_id: str, head: str, round: int, manifest: FederationManifest, token: str | bool | None
) -> dict[str, str]:
    """Client id -> the newest commit its own Hub user made for its round-`round` update (the title
    `submit_update` writes), for the clients that made one; needs `manifest.client_users`."""
    assert manifest.client_users is not None
    titles = {f"Round {round} update from {client_id}": client_id for client_id in manifest.clients}
    found: dict[str, str] = {}
    commits = with_retries(lambda: api.list_repo_commits(repo_id, revision=head, token=token), "listing commits")
    for commit in commits:  # newest first
        client_id = titles.get(commit.title)
        if (
            client_id is not None
            and client_id not in found
            and first_author(commit) == manifest.client_users[client_id]
        ):
            found[client_id] = commit.commit_id
    return found


def delete_forged_tag(api: HfApi, repo_id: str, tag: str, error: ForgedRound, token: str | bool | None) -> None:
    """Remove a round tag that names another writer's commit, so the aggregator can publish the round itself."""
    logger.warning("%s; deleting the tag.", error)
    try:
        with_retries(lambda: api.delete_tag(repo_id, tag=tag, token=token), f"deleting {tag}")
    except HfHubHTTPError as failure:
        if failure.response is None or failure.response.status_code != 404:
            raise


__all__ = [
    "MANIFEST_NAME",
    "check_client_id",
    "FederationManifest",
    "ForgedRound",
    "check_aggregator_identity",
    "client_commits",
    "commit_author",
    "first_author",
    "published_round_commit",
    "delete_forged_tag",
    "read_manifest",
    "trusted_round_commit",
]
