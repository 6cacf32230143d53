"""Generalists on the Hugging Face Hub: one commit per push, tagged `round-<t>`, and pulls by round.

A generalist travels as a standard PEFT LoRA adapter (`adapter_config.json` + `adapter_model.safetensors`), so
`PeftModel.from_pretrained(base, repo_id, revision="round-<t>")` loads it without comigs_hf. Every round is a git tag
`round-<t>` on the commit holding that round's global generalist.

Authentication is huggingface_hub's: `token=None` means the `HF_TOKEN` environment variable or the stored login.
Tokens are passed to the client and never formatted into a message, a log record or a file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import HfHubHTTPError

from ...adapters import ADAPTER_CONFIG_NAME, export_generalist, load_generalist
from ...checkpoint_comigs import check_publication_confirmed
from ...modeling_comigs import CoMiGSForCausalLM
from ...strategies import LORA_FACTORS, Strategy
from .cards import README_NAME, EvalResults, render_client_model_card, render_generalist_card

logger = logging.getLogger("comigs_hf.hub")


def round_tag(round: int) -> str:
    """The git tag of round `round`'s global generalist: `round-<t>`."""
    return f"round-{_check_round(round)}"


def _check_round(round: Any, name: str = "round") -> int:
    if isinstance(round, bool) or not isinstance(round, int) or round < 1:
        raise ValueError(f"`{name}` must be an integer >= 1 (rounds count from 1), got {round!r}.")
    return round


def _git_blob_sha(data: bytes) -> str:
    # what the Hub reports as `blob_id` for a regular (non-LFS) file
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _tag_target(api: HfApi, repo_id: str, tag: str, token: str | bool | None) -> str | None:
    """The commit `tag` points to, or `None` if there is no such tag."""
    refs = with_retries(lambda: api.list_repo_refs(repo_id, token=token), f"listing the refs of {repo_id}")
    return next((ref.target_commit for ref in refs.tags if ref.name == tag), None)


def _same_files(api: HfApi, repo_id: str, revision: str, files: Mapping[str, bytes], token: str | bool | None) -> bool:
    """Whether `revision` holds exactly these contents at these paths (LFS files compared by sha256)."""
    remote = {entry.path: entry for entry in api.get_paths_info(repo_id, list(files), revision=revision, token=token)}
    for path, data in files.items():
        entry = remote.get(path)
        if entry is None or not hasattr(entry, "blob_id"):
            return False
        if getattr(entry, "lfs", None) is not None:
            if entry.lfs.sha256 != hashlib.sha256(data).hexdigest():
                return False
        elif entry.blob_id != _git_blob_sha(data):
            return False
    return True


# answers worth another try after a pause: rate limits and server-side failures
RETRIED_STATUSES = frozenset({429, 500, 502, 503, 504})
RETRY_DELAYS_S = (0.5, 1.0, 2.0, 4.0, 8.0)


def _status(error: HfHubHTTPError) -> int | None:
    return error.response.status_code if error.response is not None else None


def with_retries(call: Callable[[], Any], what: str) -> Any:
    """`call()`, tried again after 0.5, 1, 2, 4 and 8 s while the Hub answers 429 or 5xx.

    Raises:
        `HfHubHTTPError`: any other answer, or the last retried one.
    """
    for delay in (*RETRY_DELAYS_S, None):
        try:
            return call()
        except HfHubHTTPError as error:
            if delay is None or _status(error) not in RETRIED_STATUSES:
                raise
            logger.warning("%s: the Hub answered %s; trying again in %.1f s.", what, _status(error), delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def main_head(api: HfApi, repo_id: str, token: str | bool | None) -> str:
    """The commit `main` points to."""
    refs = with_retries(lambda: api.list_repo_refs(repo_id, token=token), f"listing the refs of {repo_id}")
    return next(ref.target_commit for ref in refs.branches if ref.name == "main")


def _commit_and_tag(
    api: HfApi,
    repo_id: str,
    files: Mapping[str, bytes],
    *,
    tag: str | None,
    commit_message: str,
    token: str | bool | None,
) -> str:
    """One commit with `files` on `main`, then `tag` on it; returns the commit sha.

    An existing `tag` is fine when it already holds exactly `files` (a re-run: nothing is committed and its commit is
    returned) and an error otherwise, raised before anything is committed. Rate limits and server errors are retried.
    """
    if tag is not None:
        existing = _tag_target(api, repo_id, tag, token)
        if existing is not None:
            if _same_files(api, repo_id, existing, files, token):
                logger.info("%s of %s already holds this content (commit %s): nothing pushed.", tag, repo_id, existing)
                return existing
            raise ValueError(
                f"Tag {tag!r} already exists in {repo_id} on commit {existing} with other content; a round is "
                "published once. Push under another round, or delete the tag first if it is wrong."
            )
    operations = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=data) for path, data in files.items()]
    info = with_retries(
        lambda: api.create_commit(repo_id, operations=operations, commit_message=commit_message, token=token),
        f"committing to {repo_id}",
    )
    sha = info.oid
    if tag is not None:
        try:
            with_retries(lambda: api.create_tag(repo_id, tag=tag, revision=sha, token=token), f"tagging {tag}")
        except HfHubHTTPError:
            # another writer may have tagged between our check and now: fine only if it tagged this very content
            existing = _tag_target(api, repo_id, tag, token)
            if existing is None or not _same_files(api, repo_id, existing, files, token):
                raise
            sha = existing
    return sha


def _generalist_files(
    model: CoMiGSForCausalLM, index: int, tensors: Mapping[str, torch.Tensor] | None = None
) -> tuple[dict[str, bytes], dict[str, Any]]:
    """Adapter files of generalist `index` (name -> bytes), of the model's tensors or of `tensors` (see
    `comigs_hf.adapters.generalist_state_dict`), and its adapter config."""
    with tempfile.TemporaryDirectory(prefix="comigs-generalist-") as tmp:
        export_generalist(model, tmp, index=index, tensors=tensors)
        files = {path.name: path.read_bytes() for path in sorted(Path(tmp).iterdir()) if path.is_file()}
    return files, json.loads(files[ADAPTER_CONFIG_NAME])


def push_generalist_to_hub(
    model: CoMiGSForCausalLM,
    repo_id: str,
    *,
    index: int = 0,
    round: int | None = None,
    num_clients: int | None = None,
    num_tokens: int | None = None,
    strategy: str = "comigs",
    eval_results: EvalResults | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    path_in_repo: str | None = None,
    base_model_revision: str | None = None,
    license: str | None = None,
    datasets: Sequence[str] | None = None,
    extra_files: Mapping[str, bytes] | None = None,
) -> str:
    """Push generalist `index` as a standard PEFT LoRA adapter with a model card, in one commit tagged `round-<t>`.

    `PeftModel.from_pretrained(base, repo_id, revision="round-<t>")` and
    `model.load_generalist(repo_id, revision="round-<t>")` then load this round, whatever was pushed after it.

    Args:
        model ([`CoMiGSForCausalLM`]): the model holding the generalist.
        repo_id (`str`): the Hub model repo, created if missing.
        index (`int`, defaults to 0): which generalist.
        round (`int`, *optional*): tag the commit `round-<t>`. An existing tag holding the same content makes the
            call a no-op returning its commit; one holding other content is an error (raised before committing).
        num_clients (`int`, *optional*), num_tokens (`int`, *optional*), strategy (`str`, defaults to `"comigs"`),
        eval_results (`Mapping[str, float]` or `Sequence[EvalResult]`, *optional*), base_model_revision (`str`,
        *optional*), license (`str`, *optional*), datasets (`Sequence[str]`, *optional*): written into the card
        (counts only), see [`render_generalist_card`].
        private (`bool`, *optional*): visibility of a newly created repo.
        token (`str` or `bool`, *optional*): Hub token; defaults to `HF_TOKEN` or the stored login.
        commit_message (`str`, *optional*): defaults to `"CoMiGS generalist_<index>, round <t>"`.
        path_in_repo (`str`, *optional*): a folder for the adapter and card instead of the repo root (load with
            `subfolder=path_in_repo`).
        extra_files (`Mapping[str, bytes]`, *optional*): more files (repo path -> content) for the same commit, e.g.
            a federation's manifest.

    Returns:
        `str`: the sha of the commit holding the adapter (the tagged one).

    Raises:
        `ValueError`: a bad round or count, or `round-<t>` already tagged on other content.
    """
    if round is not None:
        _check_round(round)
    files, adapter_config = _generalist_files(model, index)
    api = HfApi()
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True, token=token).repo_id
    card = render_generalist_card(
        base_model=model.config.base_model_name_or_path,
        repo_id=repo_id,
        expert=f"generalist_{index}",
        round=round,
        num_clients=num_clients,
        num_tokens=num_tokens,
        strategy=strategy,
        eval_results=eval_results,
        lora_r=adapter_config["r"],
        lora_alpha=adapter_config["lora_alpha"],
        target_modules=adapter_config["target_modules"],
        base_model_revision=base_model_revision,
        subfolder=path_in_repo,
        license=license,
        datasets=datasets,
    )
    files[README_NAME] = str(card).encode()
    if path_in_repo:
        files = {f"{path_in_repo.strip('/')}/{name}": data for name, data in files.items()}
    files.update(extra_files or {})
    suffix = f", round {round}" if round is not None else ""
    sha = _commit_and_tag(
        api,
        repo_id,
        files,
        tag=round_tag(round) if round is not None else None,
        commit_message=commit_message or f"CoMiGS generalist_{index}{suffix}",
        token=token,
    )
    logger.info("generalist_%d is in %s at commit %s%s.", index, repo_id, sha, suffix)
    return sha


def push_client_model_to_hub(
    model: CoMiGSForCausalLM,
    repo_id: str,
    *,
    confirm_private_data_publication: bool = False,
    round: int | None = None,
    num_clients: int | None = None,
    num_tokens: int | None = None,
    strategy: str = "comigs",
    eval_results: EvalResults | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    base_model_revision: str | None = None,
    include_base: bool | None = None,
    license: str | None = None,
    datasets: Sequence[str] | None = None,
) -> str:
    """Push a whole client model (generalists, specialists, routers; the base by name) with its card: opt-in only.

    The specialists and routers are trained on the client's private data and never leave it in federated training;
    this call publishes them, so it refuses unless `confirm_private_data_publication=True`, and warns when it runs.
    Files are what `model.push_to_hub` uploads (`save_pretrained`, remote code included), committed together with
    the client card in one commit (`push_to_hub` would write its own card).

    Args:
        model ([`CoMiGSForCausalLM`]): the client model.
        repo_id (`str`): the Hub model repo, created if missing.
        confirm_private_data_publication (`bool`, defaults to `False`): must be `True`.
        round, num_clients, num_tokens, strategy, eval_results, base_model_revision, license, datasets: for the
            card ([`render_client_model_card`]).
        private (`bool`, *optional*): visibility of a newly created repo.
        token (`str` or `bool`, *optional*): Hub token; defaults to `HF_TOKEN` or the stored login.
        commit_message (`str`, *optional*): the commit message.
        include_base (`bool`, *optional*): upload the base's weights too (a full checkpoint); by default the repo
            holds the experts and routers and its config names the base (see `CoMiGSForCausalLM.save_pretrained`).

    Returns:
        `str`: the commit sha.

    Raises:
        `ValueError`: without `confirm_private_data_publication=True`.
    """
    check_publication_confirmed(confirm_private_data_publication, "push_client_model_to_hub")
    api = HfApi()
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True, token=token).repo_id
    logger.warning(
        "Publishing the whole client model to %s: this includes its private specialists (%d) and routers, trained on "
        "the client's private data.",
        repo_id,
        model.config.num_specialists,
    )
    with tempfile.TemporaryDirectory(prefix="comigs-client-") as tmp:
        model.save_pretrained(tmp, include_base=include_base)
        saved = json.loads(Path(tmp, "config.json").read_text())
        card = render_client_model_card(
            model,
            repo_id=repo_id,
            round=round,
            num_clients=num_clients,
            num_tokens=num_tokens,
            strategy=strategy,
            eval_results=eval_results,
            base_model_revision=base_model_revision,
            license=license,
            datasets=datasets,
            weights_include_base=saved["weights_include_base"],
        )
        card.save(os.path.join(tmp, README_NAME))
        info = api.upload_folder(
            folder_path=tmp,
            repo_id=repo_id,
            token=token,
            commit_message=commit_message or "CoMiGS client model (generalists, specialists, routers)",
        )
    return info.oid


def pull_global(
    model: CoMiGSForCausalLM, repo_id: str, round: int, index: int = 0, token: str | bool | None = None
) -> None:
    """Load the global generalist of round `round` (tag `round-<t>`) into generalist `index` of `model`."""
    load_generalist(model, repo_id, index=index, revision=round_tag(round), token=token)


def check_hub_strategy(strategy: Strategy, num_generalists: int | None = None) -> Strategy:
    """`strategy` as the Hub rounds run it, if they can carry it: they publish one generalist as a PEFT adapter at
    the repo root. Clients report their own token counts there, so `train_tokens` weighting becomes
    `capped_train_tokens` (no client weighs more than twice the median one).

    Raises:
        `ValueError`: an algorithm of the strategy the Hub cannot carry (see `Strategy.check_transport`), a strategy
        that shares something else than the generalists (specialists and routers are not PEFT adapters of the base
        and never leave a client here), or a model with more than one generalist.
    """
    strategy.check_transport("hub")
    if strategy.shared_roles != {"generalist"}:
        shared = ", ".join(sorted(strategy.shared_roles)) or "nothing"
        raise ValueError(
            f"Hub rounds share the generalist only (as a PEFT adapter), but strategy {strategy.name!r} shares "
            f"{shared}: specialists and routers never leave a client."
        )
    if strategy.shared_factors != LORA_FACTORS:
        raise ValueError(
            f"Hub rounds publish whole PEFT adapters, but strategy {strategy.name!r} shares only "
            f"{', '.join(sorted(strategy.shared_factors))} of them: run it over Accelerate."
        )
    if num_generalists is not None and num_generalists != 1:
        raise ValueError(
            f"Hub rounds carry one generalist per repo (the adapter at its root), but model.num_generalists is "
            f"{num_generalists}."
        )
    if strategy.weighting == "train_tokens":
        strategy = dataclasses.replace(strategy, weighting="capped_train_tokens")
    return strategy
