"""The aggregator of Hub-mediated rounds: wait for a round's updates, check them, run the server step, publish.

Round `t` starts from the global tagged `round-<t>`; clients upload their updates under `updates/round-<t>/`
(`comigs_hf.transports.hub.updates`), and [`aggregate_round`] combines the valid ones through the server step
(`comigs_hf.server.server_step`) into the global tagged `round-<t+1>`, with `aggregation.json` reporting what
was accepted and what was rejected, and why.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError
from safetensors.torch import save

from ...adapters import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    quote_untrusted,
    read_untrusted_json,
)
from ...algorithms import get_strategy
from ...server import server_step
from ...strategies import Strategy, aggregation_weights
from .cards import README_NAME, render_generalist_card
from .federation import (
    FederationManifest,
    ForgedRound,
    check_aggregator_identity,
    delete_forged_tag,
    first_author,
    read_manifest,
    trusted_round_commit,
)
from .repo import check_hub_strategy, main_head, round_tag, with_retries
from .report import REPORT_NAME, AcceptedUpdate, AggregationReport, RejectedUpdate
from .scan import _max_weights_bytes, _reference, _settle, _UpdateScanner

logger = logging.getLogger("comigs_hf.hub")


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
    (warnings of the `comigs_hf.hub` logger) and listed in the report; they never block the others. Without a global
    `round-<t>`, or with `expected_shapes`, the format most updates share (of those shapes) is the reference.

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
