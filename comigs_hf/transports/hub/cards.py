"""Model cards of generalists and client models, rendered from the templates in `model_cards/`.

Card templates are Jinja files named `generalist_card.md` and `client_model_card.md`. They are looked up in the
installed package first (`comigs_hf/_model_cards/`, where the wheel maps the repository's top-level `model_cards/`
folder), then in `model_cards/` next to the package (a source checkout or an editable install).
"""

from __future__ import annotations

import importlib.resources
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from ...modeling_comigs import CoMiGSForCausalLM

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

README_NAME = "README.md"
GENERALIST_TEMPLATE = "generalist_card.md"
CLIENT_MODEL_TEMPLATE = "client_model_card.md"
CARD_TAGS = ("comigs", "federated-learning", "lora")

EvalResults = Mapping[str, float] | Sequence[EvalResult]


def _check_count(value: Any, name: str) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"`{name}` must be a non-negative integer, got {value!r}.")
    return value


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
    source = Path(__file__).resolve().parents[3] / "model_cards" / name
    if source.is_file():
        return source
    raise FileNotFoundError(
        f"Model card template {name!r} not found in comigs_hf/_model_cards/ nor in {source.parent}."
    )


def _render(card_data: ModelCardData, template: str, **template_kwargs: Any) -> ModelCard:
    with importlib.resources.as_file(template_path(template)) as path:
        return ModelCard.from_template(card_data, template_path=str(path), **template_kwargs)


def hub_base_model(name: str | None) -> str | None:
    """`name` if it reads as a Hub repo id (not a local path, nor a base this package builds such as
    `comigs_hf/embedded-base`), else `None`: only Hub ids go into `base_model`."""
    if not name or os.path.isabs(name) or os.path.exists(name) or name.startswith((".", "~", "comigs_hf/")):
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


def _dataset_ids(datasets: Sequence[str] | None) -> list[str] | None:
    """The card's `datasets`: Hub dataset ids only (a local file or folder names nothing others can find)."""
    if isinstance(datasets, str):
        raise ValueError(f"`datasets` must be a list of Hub dataset ids, got the string {datasets!r}.")
    ids = [name for name in datasets or () if hub_base_model(name)]
    return ids or None


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
    license: str | None = None,
    datasets: Sequence[str] | None = None,
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
        license (`str`, *optional*): the card's `license` (a Hub licence id such as `apache-2.0`, or `other`).
        datasets (`Sequence[str]`, *optional*): the Hub ids of the datasets trained on, for the card's `datasets`.

    Returns:
        `ModelCard`: the rendered card (`card.save(path)` or commit `str(card)` as `README.md`).
    """
    hub_id = hub_base_model(base_model)
    rows, figures, results = _eval_rows(eval_results)
    card_data = ModelCardData(
        base_model=hub_id,
        license=license,
        datasets=_dataset_ids(datasets),
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
    license: str | None = None,
    datasets: Sequence[str] | None = None,
    weights_include_base: bool = False,
) -> ModelCard:
    """Render the model card of a whole client model (generalists, private specialists and routers).

    Same metadata as [`render_generalist_card`], with `library_name: transformers`, the `mixture-of-experts` tag and
    the `base_model:adapter:<base>` relation (`base_model:finetune:<base>` when the checkpoint holds the base
    weights), and a privacy notice: the specialists and routers were trained on the client's private data.

    Args:
        model ([`CoMiGSForCausalLM`]): the client model (only its config is read).
        repo_id, round, num_clients, num_tokens, strategy, eval_results, base_model_revision, license, datasets:
            As in [`render_generalist_card`]; `num_clients` is the size of the federation.
        weights_include_base (`bool`, defaults to `False`): whether the uploaded checkpoint holds the base.

    Returns:
        `ModelCard`: the rendered card.
    """
    config = model.config
    base_model = config.base_model_name_or_path
    hub_id = hub_base_model(base_model)
    rows, figures, results = _eval_rows(eval_results)
    relation = "finetune" if weights_include_base else "adapter"
    card_data = ModelCardData(
        base_model=hub_id,
        license=license,
        datasets=_dataset_ids(datasets),
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=[*CARD_TAGS, "mixture-of-experts", *([f"base_model:{relation}:{hub_id}"] if hub_id else [])],
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
        weights_include_base=weights_include_base,
    )
