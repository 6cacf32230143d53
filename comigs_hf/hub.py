"""Generalists shared through the Hugging Face Hub: push and pull by round, model cards, Hub-mediated rounds.

A generalist travels as a standard PEFT LoRA adapter (`adapter_config.json` + `adapter_model.safetensors`), so
`PeftModel.from_pretrained(base, repo_id, revision="round-<t>")` loads it without comigs_hf. Every round is a git tag
`round-<t>` on the commit holding that round's global generalist.

Hub-mediated rounds use one shared model repo:

```
README.md, adapter_config.json, adapter_model.safetensors   global generalist, tagged round-<t>
aggregation.json                                             report of the aggregation that produced it
updates/round-<t>/<client_id>/adapter_config.json            a client's generalist after local training in round t
updates/round-<t>/<client_id>/adapter_model.safetensors
updates/round-<t>/<client_id>/update.json                    {"client_id", "round", "num_tokens", "base_model"}
```

Round `t` starts from the global tagged `round-<t>` (seed it with `push_generalist_to_hub(model, repo_id, round=1)`),
clients [`submit_update`] for round `t`, and [`aggregate_round`] averages them, weighted by training tokens, into the
global tagged `round-<t+1>`. Client uploads are untrusted: they are read with safetensors only and checked (format,
round, shapes, finiteness, duplicates) before anything is averaged.

Authentication is huggingface_hub's: `token=None` means the `HF_TOKEN` environment variable or the stored login.
Tokens are passed to the client and never formatted into a message, a log record or a file.

Card templates are Jinja files named `generalist_card.md` and `client_model_card.md`. They are looked up in the
installed package first (`comigs_hf/_model_cards/`, where the wheel maps the repository's top-level `model_cards/`
folder), then in `model_cards/` next to the package (a source checkout or an editable install).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import logging
import math
import os
import re
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError
from huggingface_hub.utils import validate_repo_id
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .adapters import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
from .aggregation import aggregate_weighted_mean

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

    from .modeling_comigs import CoMiGSForCausalLM

logger = logging.getLogger("comigs_hf.hub")

README_NAME = "README.md"
UPDATE_NAME = "update.json"
REPORT_NAME = "aggregation.json"
UPDATES_FOLDER = "updates"
GENERALIST_TEMPLATE = "generalist_card.md"
CLIENT_MODEL_TEMPLATE = "client_model_card.md"
CARD_TAGS = ("comigs", "federated-learning", "lora")
# LoRA fields that change what a tensor means: updates are only averaged when they agree on all of them
_LORA_FIELDS = ("peft_type", "r", "lora_alpha", "use_rslora", "fan_in_fan_out", "target_modules")
_CLIENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_SMALL_FILE_LIMIT = 1 << 20  # update.json and adapter_config.json are a few hundred bytes

EvalResults = Mapping[str, float] | Sequence[EvalResult]


def round_tag(round: int) -> str:
    """The git tag of round `round`'s global generalist: `round-<t>`."""
    return f"round-{_check_round(round)}"


def _check_round(round: Any, name: str = "round") -> int:
    if isinstance(round, bool) or not isinstance(round, int) or round < 1:
        raise ValueError(f"`{name}` must be an integer >= 1 (rounds count from 1), got {round!r}.")
    return round


def _check_count(value: Any, name: str) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"`{name}` must be a non-negative integer, got {value!r}.")
    return value


# ---- model cards -----------------------------------------------------------------------------------------------


def template_path(name: str) -> Traversable:
    """Where the card template `name` is: in the installed package, else in the source checkout's `model_cards/`.

    Returns:
        `Traversable`: a `pathlib.Path` except inside a zipped install (use `importlib.resources.as_file`).

    Raises:
        `FileNotFoundError`: naming both places searched.
    """
    packaged = importlib.resources.files("comigs_hf").joinpath("_model_cards", name)
    if packaged.is_file():
        return packaged
    source = Path(__file__).resolve().parent.parent / "model_cards" / name
    if source.is_file():
        return source
    raise FileNotFoundError(
        f"Model card template {name!r} not found in comigs_hf/_model_cards/ nor in {source.parent}."
    )


def _render(card_data: ModelCardData, template: str, **template_kwargs: Any) -> ModelCard:
    with importlib.resources.as_file(template_path(template)) as path:
        return ModelCard.from_template(card_data, template_path=str(path), **template_kwargs)


def hub_base_model(name: str | None) -> str | None:
    """`name` if it reads as a Hub repo id (not a local path), else `None`: only Hub ids go into `base_model`."""
    if not name or os.path.isabs(name) or os.path.exists(name) or name.startswith((".", "~")):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _eval_rows(
    eval_results: EvalResults | None,
) -> tuple[list[dict], dict[str, float] | None, list[EvalResult] | None]:
    """Table rows, plain metadata figures (from a mapping) and model-index entries (from `EvalResult`s)."""
    if not eval_results:
        return [], None, None
    if isinstance(eval_results, Mapping):
        figures = {str(name): float(value) for name, value in eval_results.items()}
        rows = [{"metric": name, "value": f"{value:.4g}", "dataset": None} for name, value in figures.items()]
        return rows, figures, None
    results = list(eval_results)
    if not all(isinstance(result, EvalResult) for result in results):
        raise ValueError("`eval_results` must be a mapping of metric name to value or a sequence of `EvalResult`.")
    rows = [
        {"metric": r.metric_name or r.metric_type, "value": r.metric_value, "dataset": r.dataset_name} for r in results
    ]
    return rows, None, results


def _comigs_metadata(**fields: Any) -> dict[str, Any]:
    return {key: value for key, value in fields.items() if value is not None}


def render_generalist_card(
    *,
    base_model: str | None,
    repo_id: str | None = None,
    expert: str = "generalist_0",
    round: int | None = None,
    num_clients: int | None = None,
    num_tokens: int | None = None,
    strategy: str = "comigs",
    eval_results: EvalResults | None = None,
    lora_r: int | None = None,
    lora_alpha: float | None = None,
    target_modules: Sequence[str] | None = None,
    base_model_revision: str | None = None,
    subfolder: str | None = None,
) -> ModelCard:
    """Render the model card of a generalist adapter from `model_cards/generalist_card.md`.

    The YAML metadata holds `base_model` (Hub ids only), `library_name: peft`, the tags `comigs`,
    `federated-learning`, `lora` and `base_model:adapter:<base>`, a `comigs` section with the round, the number of
    contributing clients and tokens and the strategy, and a `model-index` when `eval_results` are `EvalResult`s.
    Only counts are written: nothing about the clients' data.

    Args:
        base_model (`str`, *optional*): Hub id or path of the base model.
        repo_id (`str`, *optional*): the repo the card lives in, for the loading snippets.
        expert (`str`, defaults to `"generalist_0"`): the CoMiGS expert the adapter holds.
        round (`int`, *optional*): the federated round; the snippets then pin `revision="round-<t>"`.
        num_clients (`int`, *optional*): clients whose updates were averaged into this generalist.
        num_tokens (`int`, *optional*): training tokens over those clients.
        strategy (`str`, defaults to `"comigs"`): the federated strategy.
        eval_results (`Mapping[str, float]` or `Sequence[EvalResult]`, *optional*):
            Metric name to value (a table plus `comigs.eval_results`), or `EvalResult`s (a table plus `model-index`).
        lora_r (`int`, *optional*), lora_alpha (`float`, *optional*), target_modules (`Sequence[str]`, *optional*):
            The adapter's LoRA settings, shown in the card.
        base_model_revision (`str`, *optional*): the base model's commit.
        subfolder (`str`, *optional*): the adapter's folder inside the repo, for the snippets.

    Returns:
        `ModelCard`: the rendered card (`card.save(path)` or commit `str(card)` as `README.md`).
    """
    hub_id = hub_base_model(base_model)
    rows, figures, results = _eval_rows(eval_results)
    card_data = ModelCardData(
        base_model=hub_id,
        library_name="peft",
        pipeline_tag="text-generation",
        tags=[*CARD_TAGS, *([f"base_model:adapter:{hub_id}"] if hub_id else [])],
        model_name=(repo_id or "comigs-generalist").split("/")[-1] if results else None,
        eval_results=results,
        comigs=_comigs_metadata(
            expert=expert,
            round=round,
            num_clients=_check_count(num_clients, "num_clients"),
            num_tokens=_check_count(num_tokens, "num_tokens"),
            strategy=strategy,
            base_model_revision=base_model_revision,
            eval_results=figures,
        ),
    )
    return _render(
        card_data,
        GENERALIST_TEMPLATE,
        base_model=base_model,
        repo_id=repo_id,
        expert=expert,
        round=round,
        num_clients=num_clients,
        num_tokens=num_tokens,
        strategy=strategy,
        eval_rows=rows,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        target_modules=list(target_modules or []),
        base_model_revision=base_model_revision,
        subfolder=subfolder,
    )


def render_client_model_card(
    model: CoMiGSForCausalLM,
    *,
    repo_id: str | None = None,
    round: int | None = None,
    num_clients: int | None = None,
    num_tokens: int | None = None,
    strategy: str = "comigs",
    eval_results: EvalResults | None = None,
    base_model_revision: str | None = None,
) -> ModelCard:
    """Render the model card of a whole client model (base, generalists, private specialists and routers).

    Same metadata as [`render_generalist_card`], with `library_name: transformers`, the `mixture-of-experts` tag and
    the `base_model:finetune:<base>` relation (the checkpoint holds the base weights), and a privacy notice: the
    specialists and routers were trained on the client's private data.

    Args:
        model ([`CoMiGSForCausalLM`]): the client model (only its config is read).
        repo_id, round, num_clients, num_tokens, strategy, eval_results, base_model_revision:
            As in [`render_generalist_card`]; `num_clients` is the size of the federation.

    Returns:
        `ModelCard`: the rendered card.
    """
    config = model.config
    base_model = config.base_model_name_or_path
    hub_id = hub_base_model(base_model)
    rows, figures, results = _eval_rows(eval_results)
    card_data = ModelCardData(
        base_model=hub_id,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=[*CARD_TAGS, "mixture-of-experts", *([f"base_model:finetune:{hub_id}"] if hub_id else [])],
        model_name=(repo_id or "comigs-client-model").split("/")[-1] if results else None,
        eval_results=results,
        comigs=_comigs_metadata(
            round=round,
            num_clients=_check_count(num_clients, "num_clients"),
            num_tokens=_check_count(num_tokens, "num_tokens"),
            strategy=strategy,
            num_generalists=config.num_generalists,
            num_specialists=config.num_specialists,
            base_model_revision=base_model_revision,
            eval_results=figures,
        ),
    )
    return _render(
        card_data,
        CLIENT_MODEL_TEMPLATE,
        base_model=base_model,
        repo_id=repo_id,
        round=round,
        num_clients=num_clients,
        num_tokens=num_tokens,
        strategy=strategy,
        eval_rows=rows,
        experts=config.expert_names,
        num_generalists=config.num_generalists,
        num_specialists=config.num_specialists,
        lora_r=config.lora_r,
        lora_alpha=config.lora_alpha,
        top_k=config.num_experts_per_tok,
        base_model_revision=base_model_revision,
    )


# ---- commits and tags ------------------------------------------------------------------------------------------


def _git_blob_sha(data: bytes) -> str:
    # what the Hub reports as `blob_id` for a regular (non-LFS) file
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _tag_target(api: HfApi, repo_id: str, tag: str, token: str | bool | None) -> str | None:
    """The commit `tag` points to, or `None` if there is no such tag."""
    return next((ref.target_commit for ref in api.list_repo_refs(repo_id, token=token).tags if ref.name == tag), None)


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
    returned) and an error otherwise, raised before anything is committed.
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
    info = api.create_commit(repo_id, operations=operations, commit_message=commit_message, token=token)
    sha = info.oid
    if tag is not None:
        try:
            api.create_tag(repo_id, tag=tag, revision=sha, token=token)
        except HfHubHTTPError:
            # another writer may have tagged between our check and now: fine only if it tagged this very content
            existing = _tag_target(api, repo_id, tag, token)
            if existing is None or not _same_files(api, repo_id, existing, files, token):
                raise
            sha = existing
    return sha


def _generalist_files(model: CoMiGSForCausalLM, index: int) -> tuple[dict[str, bytes], dict[str, Any]]:
    """Adapter files of generalist `index` (name -> bytes) and its adapter config."""
    with tempfile.TemporaryDirectory(prefix="comigs-generalist-") as tmp:
        model.export_generalist(tmp, index=index)
        files = {path.name: path.read_bytes() for path in sorted(Path(tmp).iterdir()) if path.is_file()}
    return files, json.loads(files[ADAPTER_CONFIG_NAME])


# ---- push / pull -----------------------------------------------------------------------------------------------


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
        *optional*): written into the card (counts only), see [`render_generalist_card`].
        private (`bool`, *optional*): visibility of a newly created repo.
        token (`str` or `bool`, *optional*): Hub token; defaults to `HF_TOKEN` or the stored login.
        commit_message (`str`, *optional*): defaults to `"CoMiGS generalist_<index>, round <t>"`.
        path_in_repo (`str`, *optional*): a folder for the adapter and card instead of the repo root (load with
            `subfolder=path_in_repo`).

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
    )
    files[README_NAME] = str(card).encode()
    if path_in_repo:
        files = {f"{path_in_repo.strip('/')}/{name}": data for name, data in files.items()}
    suffix = f", round {round}" if round is not None else ""
    sha = _commit_and_tag(
        api, repo_id, files, tag=round_tag(round) if round is not None else None,
        commit_message=commit_message or f"CoMiGS generalist_{index}{suffix}", token=token,
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
) -> str:
    """Push a whole client model (base, generalists, specialists, routers) with its card: opt-in only.

    The specialists and routers are trained on the client's private data and never leave it in federated training;
    this call publishes them, so it refuses unless `confirm_private_data_publication=True`, and warns when it runs.
    Files are what `model.push_to_hub` uploads (`save_pretrained`, remote code included), committed together with
    the client card in one commit (`push_to_hub` would write its own card).

    Args:
        model ([`CoMiGSForCausalLM`]): the client model.
        repo_id (`str`): the Hub model repo, created if missing.
        confirm_private_data_publication (`bool`, defaults to `False`): must be `True`.
        round, num_clients, num_tokens, strategy, eval_results, base_model_revision: for the card
            ([`render_client_model_card`]).
        private (`bool`, *optional*): visibility of a newly created repo.
        token (`str` or `bool`, *optional*): Hub token; defaults to `HF_TOKEN` or the stored login.
        commit_message (`str`, *optional*): the commit message.

    Returns:
        `str`: the commit sha.

    Raises:
        `ValueError`: without `confirm_private_data_publication=True`.
    """
    if confirm_private_data_publication is not True:
        raise ValueError(
            "push_client_model_to_hub publishes the whole client model, including its private specialists and "
            "routers, which were trained on the client's private data and can reveal it. Share only the generalist "
            "with push_generalist_to_hub, or pass confirm_private_data_publication=True to publish everything."
        )
    api = HfApi()
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True, token=token).repo_id
    logger.warning(
        "Publishing the whole client model to %s: this includes its private specialists (%d) and routers, trained on "
        "the client's private data.", repo_id, model.config.num_specialists,
    )
    card = render_client_model_card(
        model, repo_id=repo_id, round=round, num_clients=num_clients, num_tokens=num_tokens, strategy=strategy,
        eval_results=eval_results, base_model_revision=base_model_revision,
    )
    with tempfile.TemporaryDirectory(prefix="comigs-client-") as tmp:
        model.save_pretrained(tmp)
        card.save(os.path.join(tmp, README_NAME))
        info = api.upload_folder(
            folder_path=tmp, repo_id=repo_id, token=token,
            commit_message=commit_message or "CoMiGS client model (generalists, specialists, routers)",
        )
    return info.oid


def pull_global(
    model: CoMiGSForCausalLM, repo_id: str, round: int, index: int = 0, token: str | bool | None = None
) -> None:
    """Load the global generalist of round `round` (tag `round-<t>`) into generalist `index` of `model`."""
    model.load_generalist(repo_id, index=index, revision=round_tag(round), token=token)


# ---- Hub-mediated rounds ---------------------------------------------------------------------------------------


def update_folder(round: int, client_id: str) -> str:
    """Path of a client's update for round `round` in the shared repo: `updates/round-<t>/<client_id>`."""
    return f"{UPDATES_FOLDER}/{round_tag(round)}/{client_id}"


def submit_update(
    model: CoMiGSForCausalLM,
    repo_id: str,
    client_id: str,
    round: int,
    num_tokens: int,
    *,
    index: int = 0,
    token: str | bool | None = None,
) -> str:
    """Upload this client's generalist after local training in round `round`, for [`aggregate_round`].

    Writes `updates/round-<t>/<client_id>/` (PEFT adapter plus `update.json` with the client id, round, number of
    training tokens and base model) in one commit. Submitting again for the same round replaces the update.

    Args:
        model ([`CoMiGSForCausalLM`]): the client model.
        repo_id (`str`): the shared repo (it must exist: the coordinator creates it with the round-1 seed).
        client_id (`str`): letters, digits, `.`, `_`, `-`; the folder name.
        round (`int`): the round trained (starting from the global tagged `round-<t>`).
        num_tokens (`int`): training tokens this round, the aggregation weight; at least 1.
        index (`int`, defaults to 0): which generalist.
        token (`str` or `bool`, *optional*): Hub token; defaults to `HF_TOKEN` or the stored login.

    Returns:
        `str`: the commit sha.
    """
    _check_round(round)
    if not isinstance(client_id, str) or not _CLIENT_ID.match(client_id):
        raise ValueError(
            f"`client_id` must be 1-96 letters, digits, '.', '_' or '-' starting with a letter or digit, "
            f"got {client_id!r}."
        )
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
        raise ValueError(f"`num_tokens` must be a positive integer (the aggregation weight), got {num_tokens!r}.")
    files, _ = _generalist_files(model, index)
    update = {"client_id": client_id, "round": round, "num_tokens": num_tokens,
              "base_model": model.config.base_model_name_or_path}
    files[UPDATE_NAME] = json.dumps(update, indent=2).encode()
    folder = update_folder(round, client_id)
    info = HfApi().create_commit(
        repo_id,
        operations=[CommitOperationAdd(f"{folder}/{name}", data) for name, data in files.items()],
        commit_message=f"Round {round} update from {client_id}",
        token=token,
    )
    logger.info("Submitted the round %d update of %s to %s (commit %s).", round, client_id, repo_id, info.oid)
    return info.oid


@dataclass(frozen=True)
class AcceptedUpdate:
    """A client update that entered the average, with its normalised weight."""

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
        commit_sha (`str`, *optional*): the commit of the new global.
    """

    round: int
    tag: str
    accepted: tuple[AcceptedUpdate, ...]
    rejected: tuple[RejectedUpdate, ...]
    num_tokens: int
    min_clients: int
    previous_commit: str | None = None
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
        return cls(
            round=data["round"],
            tag=data["tag"],
            accepted=tuple(AcceptedUpdate(**update) for update in data["accepted"]),
            rejected=tuple(RejectedUpdate(**update) for update in data["rejected"]),
            num_tokens=data["num_tokens"],
            min_clients=data["min_clients"],
            previous_commit=data.get("previous_commit"),
            commit_sha=commit_sha,
        )


class _Rejected(Exception):
    """An update fails a check; the message is the reason recorded in the report."""


@dataclass
class _Candidate:
    folder: str
    client_id: str
    num_tokens: int
    base_model: str | None
    config: dict[str, Any]
    state: dict[str, torch.Tensor]

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {key: tuple(tensor.shape) for key, tensor in self.state.items()}


@dataclass
class _Reference:
    """What updates of this round must agree with; fields left `None` are settled by majority among the updates."""

    config: dict[str, Any] | None = None
    shapes: dict[str, tuple[int, ...]] | None = None
    base_model: str | None = None
    commit: str | None = None


def _lora_signature(config: Mapping[str, Any]) -> str:
    targets = config.get("target_modules")
    fields = {name: config.get(name) for name in _LORA_FIELDS}
    fields["target_modules"] = sorted(targets) if isinstance(targets, list) else targets
    return json.dumps(fields, sort_keys=True)


def _read_json(path: Path, name: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _Rejected(f"{name} is not valid JSON ({error}).") from None


def _parse_update(folder: str, paths: Mapping[str, Path], round: int) -> _Candidate:
    """Checks of an update on its own: files, JSON, LoRA config, round, token count, tensors (safetensors only)."""
    for name in (UPDATE_NAME, ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME):
        if name not in paths:
            raise _Rejected(f"missing {name}.")
    update = _read_json(paths[UPDATE_NAME], UPDATE_NAME)
    if not isinstance(update, dict):
        raise _Rejected(f"{UPDATE_NAME} is not a JSON object.")
    client_id, update_round, num_tokens = update.get("client_id"), update.get("round"), update.get("num_tokens")
    if not isinstance(client_id, str) or not client_id:
        raise _Rejected(f"{UPDATE_NAME} has no client_id.")
    if update_round != round or isinstance(update_round, bool):
        raise _Rejected(f"{UPDATE_NAME} is for round {update_round!r}, not round {round}.")
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
        raise _Rejected(f"{UPDATE_NAME} num_tokens must be a positive integer, got {num_tokens!r}.")
    base_model = update.get("base_model")
    config = _read_json(paths[ADAPTER_CONFIG_NAME], ADAPTER_CONFIG_NAME)
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        peft_type = config.get("peft_type") if isinstance(config, dict) else None
        raise _Rejected(f"not a LoRA adapter ({ADAPTER_CONFIG_NAME} peft_type is {peft_type!r}).")
    try:
        state = load_file(paths[ADAPTER_WEIGHTS_NAME])
    except (SafetensorError, OSError, ValueError) as error:
        raise _Rejected(f"cannot read {ADAPTER_WEIGHTS_NAME} ({error}).") from None
    if not state:
        raise _Rejected(f"{ADAPTER_WEIGHTS_NAME} holds no tensors.")
    for key, tensor in state.items():
        if not tensor.is_floating_point():
            raise _Rejected(f"{key!r} has dtype {tensor.dtype}, not floating point.")
        if not bool(torch.isfinite(tensor).all()):
            raise _Rejected(f"{key!r} holds NaN or Inf values.")
    base_model = base_model if isinstance(base_model, str) else None
    return _Candidate(folder, client_id, num_tokens, base_model, config, state)


def _check_against(candidate: _Candidate, reference: _Reference) -> None:
    """Checks of an update against the round's reference: base model, LoRA settings, keys and shapes."""
    if reference.base_model and candidate.base_model and candidate.base_model != reference.base_model:
        raise _Rejected(f"trained on base model {candidate.base_model!r}, the global's is {reference.base_model!r}.")
    if reference.config is not None:
        ours, theirs = json.loads(_lora_signature(reference.config)), json.loads(_lora_signature(candidate.config))
        differing = [name for name in _LORA_FIELDS if ours[name] != theirs[name]]
        if differing:
            name = differing[0]
            raise _Rejected(f"adapter_config {name}={theirs[name]!r} differs from the global's {ours[name]!r}.")
    if reference.shapes is not None:
        shapes = candidate.shapes
        missing, unexpected = sorted(set(reference.shapes) - set(shapes)), sorted(set(shapes) - set(reference.shapes))
        if missing or unexpected:
            raise _Rejected(f"wrong tensors: missing {missing[:3]}, unexpected {unexpected[:3]}.")
        for key, shape in reference.shapes.items():
            if shapes[key] != tuple(shape):
                raise _Rejected(f"wrong shape for {key!r}: {shapes[key]}, expected {tuple(shape)}.")


def _majority(candidates: list[_Candidate], key: Any) -> Any:
    """The most common `key(candidate)`; ties go to the first candidate (sorted by folder) holding one."""
    counts = Counter(key(candidate) for candidate in candidates)
    best = max(counts.values())
    return next(key(candidate) for candidate in candidates if counts[key(candidate)] == best)


def _settle(candidates: list[_Candidate], reference: _Reference) -> tuple[list[_Candidate], list[RejectedUpdate]]:
    """Reference checks, majority where the reference is silent, then one update per client."""
    rejected: list[RejectedUpdate] = []

    def keep(pool: list[_Candidate], check: Any) -> list[_Candidate]:
        kept = []
        for candidate in pool:
            try:
                check(candidate)
                kept.append(candidate)
            except _Rejected as reason:
                rejected.append(RejectedUpdate(candidate.folder, str(reason)))
        return kept

    pool = keep(candidates, lambda c: _check_against(c, reference))
    # no global round-t to compare with: the updates most of the clients agree on define the round's format
    settled = _Reference(reference.config, reference.shapes, reference.base_model)
    if pool and settled.shapes is None:
        shapes = _majority(pool, lambda c: json.dumps(sorted(c.shapes.items())))
        settled.shapes = {key: tuple(shape) for key, shape in json.loads(shapes)}
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
    return sorted(accepted, key=lambda c: c.client_id), sorted(rejected, key=lambda r: (r.client_id, r.reason))


def _max_weights_bytes(shapes: Mapping[str, Sequence[int]] | None) -> int | None:
    # float64 is the widest dtype an honest update can use; anything larger is not worth downloading
    if shapes is None:
        return None
    return 8 * sum(math.prod(shape) for shape in shapes.values()) + (1 << 20)


class _UpdateScanner:
    """Lists the updates of a round at a commit and parses each (cached by the folder's blob ids across polls)."""

    def __init__(self, api: HfApi, repo_id: str, round: int, token: str | bool | None, max_weights: int | None):
        self.api, self.repo_id, self.round, self.token, self.max_weights = api, repo_id, round, token, max_weights
        self.prefix = f"{UPDATES_FOLDER}/{round_tag(round)}"
        self._cache: dict[tuple, _Candidate | RejectedUpdate] = {}

    def scan(self, commit: str) -> tuple[list[_Candidate], list[RejectedUpdate]]:
        try:
            entries = list(self.api.list_repo_tree(
                self.repo_id, path_in_repo=self.prefix, recursive=True, revision=commit, token=self.token
            ))
        except EntryNotFoundError:
            return [], []
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
        candidates, rejected = [], []
        for folder in sorted(folders):
            files = folders[folder]
            signature = (folder, *sorted((name, entry.blob_id) for name, entry in files.items()))
            if signature not in self._cache:
                self._cache[signature] = self._parse(folder, files, commit)
            result = self._cache[signature]
            (rejected if isinstance(result, RejectedUpdate) else candidates).append(result)
        return candidates, rejected

    def _parse(self, folder: str, files: Mapping[str, Any], commit: str) -> _Candidate | RejectedUpdate:
        try:
            for name, entry in files.items():
                limit = self.max_weights if name == ADAPTER_WEIGHTS_NAME else _SMALL_FILE_LIMIT
                if limit is not None and entry.size > limit:
                    raise _Rejected(f"{name} is {entry.size} bytes, more than the {limit} this round's update needs.")
            paths = {
                name: Path(hf_hub_download(self.repo_id, entry.path, revision=commit, token=self.token))
                for name, entry in files.items()
            }
            candidate = _parse_update(folder, paths, self.round)
        except _Rejected as reason:
            result = RejectedUpdate(folder, str(reason))
            logger.warning("Rejected the round %d update in %s/%s: %s", self.round, self.prefix, folder, reason)
            return result
        return candidate


def _reference(api: HfApi, repo_id: str, round: int, expected_shapes: Mapping[str, Sequence[int]] | None,
               token: str | bool | None) -> _Reference:
    """The global tagged `round-<t>` (config, shapes, base model), overridden by `expected_shapes` when given."""
    reference = _Reference()
    commit = _tag_target(api, repo_id, round_tag(round), token)
    if commit is not None:
        reference.commit = commit
        try:
            config_path = hf_hub_download(repo_id, ADAPTER_CONFIG_NAME, revision=commit, token=token)
            weights_path = hf_hub_download(repo_id, ADAPTER_WEIGHTS_NAME, revision=commit, token=token)
        except EntryNotFoundError:
            logger.warning("%s of %s holds no adapter at the root: updates are checked against each other.",
                           round_tag(round), repo_id)
        else:
            reference.config = json.loads(Path(config_path).read_text())
            reference.shapes = {key: tuple(t.shape) for key, t in load_file(weights_path).items()}
            reference.base_model = reference.config.get("base_model_name_or_path")
    if expected_shapes is not None:
        reference.shapes = {key: tuple(shape) for key, shape in expected_shapes.items()}
    return reference


def _existing_report(api: HfApi, repo_id: str, tag: str, token: str | bool | None) -> AggregationReport | None:
    commit = _tag_target(api, repo_id, tag, token)
    if commit is None:
        return None
    try:
        path = hf_hub_download(repo_id, REPORT_NAME, revision=commit, token=token)
    except EntryNotFoundError:
        raise ValueError(
            f"{tag} already exists in {repo_id} (commit {commit}) but was not produced by aggregate_round (no "
            f"{REPORT_NAME}): refusing to aggregate over it."
        ) from None
    return AggregationReport.from_dict(json.loads(Path(path).read_text()), commit_sha=commit)


def aggregate_round(
    repo_id: str,
    round: int,
    *,
    min_clients: int,
    timeout_s: float,
    poll_interval_s: float = 10.0,
    token: str | bool | None = None,
    expected_shapes: Mapping[str, Sequence[int]] | None = None,
    strategy: str = "comigs",
) -> AggregationReport:
    """Wait for the round-`round` updates, average them weighted by training tokens, publish `round-<t+1>`.

    Polls `updates/round-<t>/` until `min_clients` valid updates are in or `timeout_s` passes, then proceeds with
    what arrived (at least one). Each update is checked: files present and readable (safetensors only), a LoRA
    config agreeing with the global's (rank, alpha, rsLoRA, targets), `update.json` for this round with a positive
    `num_tokens`, the same base model, the global's tensor names and shapes (or `expected_shapes`), finite values,
    one update per client. Failing updates are logged (`comigs_hf.hub` warnings) and listed in the report; they never
    block the others. Without a global `round-<t>` nor `expected_shapes`, the format most updates share is the
    reference.

    The average ([`~comigs_hf.aggregation.aggregate_weighted_mean`]) is committed at the repo root as a PEFT
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
        strategy (`str`, defaults to `"comigs"`): the strategy named in the card.

    Returns:
        [`AggregationReport`]: accepted and rejected updates and the new commit.

    Raises:
        `TimeoutError`: no valid update arrived in time.
        `ValueError`: bad arguments, or `round-<t+1>` exists without an aggregation report.
    """
    _check_round(round)
    if isinstance(min_clients, bool) or not isinstance(min_clients, int) or min_clients < 1:
        raise ValueError(f"`min_clients` must be a positive integer, got {min_clients!r}.")
    if timeout_s < 0 or poll_interval_s <= 0:
        raise ValueError(f"`timeout_s` must be >= 0 and `poll_interval_s` > 0, got {timeout_s} and {poll_interval_s}.")
    api = HfApi()
    tag = round_tag(round + 1)
    existing = _existing_report(api, repo_id, tag, token)
    if existing is not None:
        logger.info("%s already aggregated into %s (commit %s): nothing to do.", round_tag(round), tag,
                    existing.commit_sha)
        return existing

    reference = _reference(api, repo_id, round, expected_shapes, token)
    scanner = _UpdateScanner(api, repo_id, round, token, _max_weights_bytes(reference.shapes))
    deadline = time.monotonic() + timeout_s
    while True:
        branches = api.list_repo_refs(repo_id, token=token).branches
        head = next(ref.target_commit for ref in branches if ref.name == "main")
        candidates, rejected = scanner.scan(head)
        accepted, late_rejected = _settle(candidates, reference)
        remaining = deadline - time.monotonic()
        if len(accepted) >= min_clients or remaining <= 0:
            break
        time.sleep(min(poll_interval_s, remaining))
    rejected = sorted([*rejected, *late_rejected], key=lambda r: (r.client_id, r.reason))
    for update in late_rejected:
        logger.warning("Rejected the round %d update in %s/%s: %s", round, scanner.prefix, update.client_id,
                       update.reason)
    if not accepted:
        reasons = "; ".join(f"{r.client_id}: {r.reason}" for r in rejected) or "none arrived"
        raise TimeoutError(f"No valid round {round} update in {repo_id} after {timeout_s} s ({reasons}).")
    if len(accepted) < min_clients:
        logger.warning("Round %d: %d of %d expected clients after %s s; aggregating those.", round, len(accepted),
                       min_clients, timeout_s)

    weights = [candidate.num_tokens for candidate in accepted]
    state = aggregate_weighted_mean([candidate.state for candidate in accepted], weights)
    total = sum(weights)
    report = AggregationReport(
        round=round,
        tag=tag,
        accepted=tuple(AcceptedUpdate(c.client_id, c.num_tokens, c.num_tokens / total) for c in accepted),
        rejected=tuple(rejected),
        num_tokens=total,
        min_clients=min_clients,
        previous_commit=reference.commit,
    )
    config = dict(reference.config or accepted[0].config)
    base_model = reference.base_model or config.get("base_model_name_or_path") or accepted[0].base_model
    card = render_generalist_card(
        base_model=base_model, repo_id=repo_id, round=round + 1, num_clients=len(accepted), num_tokens=total,
        strategy=strategy, lora_r=config.get("r"), lora_alpha=config.get("lora_alpha"),
        target_modules=config.get("target_modules") if isinstance(config.get("target_modules"), list) else None,
    )
    weights_bytes = save({key: value.contiguous() for key, value in state.items()}, metadata={"format": "pt"})
    files = {
        ADAPTER_WEIGHTS_NAME: weights_bytes,
        ADAPTER_CONFIG_NAME: json.dumps(config, indent=2, sort_keys=True).encode(),
        README_NAME: str(card).encode(),
        REPORT_NAME: json.dumps(report.to_dict(), indent=2).encode(),
    }
    # another aggregator may have finished this round while we waited: its report stands
    existing = _existing_report(api, repo_id, tag, token)
    if existing is not None:
        logger.info("%s was aggregated into %s meanwhile (commit %s).", round_tag(round), tag, existing.commit_sha)
        return existing
    sha = _commit_and_tag(api, repo_id, files, tag=tag, token=token,
                          commit_message=f"Global generalist after round {round} ({len(accepted)} clients)")
    logger.info("Aggregated %d round %d updates of %s into %s (commit %s).", len(accepted), round, repo_id, tag, sha)
    return AggregationReport.from_dict(report.to_dict(), commit_sha=sha)


__all__ = [
    "AcceptedUpdate",
    "AggregationReport",
    "RejectedUpdate",
    "aggregate_round",
    "hub_base_model",
    "pull_global",
    "push_client_model_to_hub",
    "push_generalist_to_hub",
    "render_client_model_card",
    "render_generalist_card",
    "round_tag",
    "submit_update",
    "template_path",
    "update_folder",
]
