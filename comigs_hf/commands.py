"""What each `comigs` subcommand does, given its parsed arguments (`comigs_hf.cli` builds the parser and reports
errors): a handler returns the exit status and raises [`UsageError`] for bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub.errors import HFValidationError, RevisionNotFoundError
from huggingface_hub.utils import validate_repo_id


class UsageError(Exception):
    """Bad input: reported as `<prog>: error: argument <name>: <message>`, exit status 2."""

    def __init__(self, argument: str | None, message: str):
        super().__init__(f"argument {argument}: {message}" if argument else message)


# ---- model loading ---------------------------------------------------------------------------------------------


def _load_model(source: str, argument: str = "model") -> Any:
    """A saved CoMiGS model, from a folder or a Hub repo id.

    Importing this module imported `comigs_hf`, which registered the `comigs` model type with the Auto classes.
    """
    from transformers import AutoModelForCausalLM

    from .modeling_comigs import CoMiGSForCausalLM

    path = Path(source)
    if not path.is_dir():
        if path.exists() or path.is_absolute() or source.startswith((".", "~")):
            raise UsageError(argument, f"{source!r} is not a directory holding a saved CoMiGS model")
        try:
            validate_repo_id(source)
        except HFValidationError:
            raise UsageError(argument, f"{source!r} is neither a directory nor a Hub repo id") from None
    elif not (path / "config.json").is_file():
        raise UsageError(argument, f"{source!r} has no config.json: not a saved model (see save_pretrained)")
    try:
        model = AutoModelForCausalLM.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise UsageError(argument, f"cannot load a CoMiGS model from {source!r}: {error}") from None
    if not isinstance(model, CoMiGSForCausalLM):
        raise UsageError(argument, f"{source!r} is a {type(model).__name__}, not a CoMiGS model")
    return model


def _check_index(model: Any, index: int) -> None:
    if not 0 <= index < model.config.num_generalists:
        raise UsageError(
            "--index",
            f"generalist {index} does not exist: the model has {model.config.num_generalists} "
            f"(indices 0 to {model.config.num_generalists - 1})",
        )


def _save_in_place(model: Any, directory: Path, **save_kwargs: Any) -> None:
    """`save_pretrained` into `directory` through a sibling temp folder and renames.

    The loaded weights may still be memory-mapped from the files being replaced: writing over them in place could
    corrupt the model mid-save, renaming leaves the old files' data alive until they are unmapped.
    """
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory.parent, prefix=f".{directory.name}-") as tmp:
        model.save_pretrained(tmp, **save_kwargs)
        for item in Path(tmp).iterdir():
            os.replace(item, directory / item.name)


# ---- subcommands -----------------------------------------------------------------------------------------------


def export_command(args: argparse.Namespace) -> int:
    from .adapters import export_generalist, merged_generalist_model

    model = _load_model(args.model)
    _check_index(model, args.index)
    if not args.merge_generalist:
        export_generalist(model, args.output_dir, index=args.index)
        print(f"Wrote generalist_{args.index} as a PEFT LoRA adapter to {args.output_dir}")
        return 0
    if Path(args.model).is_dir() and Path(args.output_dir).resolve() == Path(args.model).resolve():
        raise UsageError("output_dir", "is the client's own folder: the merged model would overwrite the client")
    _save_in_place(merged_generalist_model(model, args.index), Path(args.output_dir))
    tokenizer = _load_tokenizer(args.model)
    if tokenizer is not None:
        tokenizer.save_pretrained(args.output_dir)
    print(f"Wrote the base with generalist_{args.index} merged, a plain transformers model, to {args.output_dir}")
    return 0


def _load_tokenizer(source: str) -> Any:
    """The tokenizer saved beside a model, or `None` when there is none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError):
        return None


def push_command(args: argparse.Namespace) -> int:
    from .transports.hub import push_generalist_to_hub

    model = _load_model(args.model)
    _check_index(model, args.index)
    sha = push_generalist_to_hub(
        model,
        args.repo_id,
        index=args.index,
        round=args.round,
        num_clients=args.num_clients,
        num_tokens=args.num_tokens,
        strategy=args.strategy,
        private=args.private or None,
        commit_message=args.commit_message,
        path_in_repo=args.path_in_repo,
        base_model_revision=args.base_model_revision,
        license=args.license,
        datasets=args.dataset,
    )
    tag = f" (tag round-{args.round})" if args.round is not None else ""
    print(f"Pushed generalist_{args.index} to {args.repo_id} at commit {sha}{tag}")
    return 0


def pull_command(args: argparse.Namespace) -> int:
    from .adapters import load_generalist

    if not args.output and not Path(args.model).is_dir():
        raise UsageError("--output", "required when MODEL is a Hub repo id (where to save the updated model)")
    model = _load_model(args.model)
    _check_index(model, args.index)
    revision = f"round-{args.round}" if args.round is not None else args.revision
    try:
        load_generalist(model, args.repo_id, index=args.index, revision=revision, subfolder=args.subfolder)
    except RevisionNotFoundError:
        argument = "--round" if args.round is not None else "--revision"
        raise UsageError(argument, f"{revision!r} does not exist in {args.repo_id}") from None
    output = Path(args.output or args.model)
    # a full checkpoint stays full, an adapter-only one adapter-only
    _save_in_place(model, output, include_base=model.config.weights_include_base is not False)
    print(f"Loaded {args.repo_id}@{revision or 'main'} into generalist_{args.index}; saved to {output}")
    return 0


def summarize(model: Any) -> dict[str, Any]:
    """Config summary of a CoMiGS model: base, experts, LoRA settings, targets, parameter counts per role."""
    from .configuration_comigs import ROLES, parameter_role

    config = model.config
    counts: dict[str, int] = dict.fromkeys((*ROLES, "base"), 0)
    for name, param in model.named_parameters():
        counts[parameter_role(name)] += param.numel()
    return {
        "base_model": config.base_model_name_or_path,
        "base_model_type": getattr(config.text_config, "model_type", None),
        "experts": config.expert_names,
        "num_generalists": config.num_generalists,
        "num_specialists": config.num_specialists,
        "num_experts_per_tok": config.num_experts_per_tok,
        "lora_r": config.lora_r,
        "lora_alpha": config.lora_alpha,
        "use_rslora": config.use_rslora,
        "target_modules": list(config.target_modules or []),
        "attention_lora": config.attention_lora,
        "attention_target_modules": list(config.attention_target_modules or []) if config.attention_lora else [],
        "num_mixture_layers": len(model.mixtures),
        "parameters": counts,
    }


def inspect_command(args: argparse.Namespace) -> int:
    summary = summarize(_load_model(args.model))
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    counts = summary["parameters"]
    print(f"base model:       {summary['base_model'] or 'not recorded'} ({summary['base_model_type']})")
    print(f"experts:          {', '.join(summary['experts'])} (top-{summary['num_experts_per_tok']} per token)")
    print(
        f"LoRA:             r={summary['lora_r']}, lora_alpha={summary['lora_alpha']}, rsLoRA={summary['use_rslora']}"
    )
    print(f"target modules:   {', '.join(summary['target_modules'])} in {summary['num_mixture_layers']} blocks")
    if summary["attention_lora"]:
        print(f"attention LoRA:   {', '.join(summary['attention_target_modules'])} (shared, like a generalist)")
    print("parameters:")
    for role, note in (("generalist", "shared"), ("specialist", "private"), ("router", "private"), ("base", "frozen")):
        print(f"  {role:<11} {counts[role]:>12,}  {note}")
    return 0


def submit_command(args: argparse.Namespace) -> int:
    from .transports.hub import check_client_id, submit_update

    try:
        check_client_id(args.client_id)
    except ValueError as error:
        raise UsageError("--client-id", str(error)) from None
    model = _load_model(args.model)
    _check_index(model, args.index)
    sha = submit_update(model, args.repo_id, args.client_id, args.round, args.num_tokens, index=args.index)
    print(f"Submitted the round {args.round} update of {args.client_id} to {args.repo_id} (commit {sha})")
    return 0


def aggregate_command(args: argparse.Namespace) -> int:
    from .adapters import quote_untrusted
    from .transports.hub import aggregate_round

    if args.config is not None:
        from .config import build_strategy

        strategy = build_strategy(_recipe_config(args))
    else:
        from .algorithms import get_strategy

        try:
            strategy = get_strategy(args.strategy)
        except ValueError as error:
            raise UsageError("--strategy", str(error)) from None
    try:
        report = aggregate_round(
            args.repo_id,
            args.round,
            min_clients=args.min_clients,
            timeout_s=args.timeout,
            poll_interval_s=args.poll_interval,
            strategy=strategy,
        )
    except TimeoutError as error:
        print(f"comigs aggregate: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({**report.to_dict(), "commit_sha": report.commit_sha}, indent=2))
        return 0
    print(
        f"Round {report.round}: {len(report.accepted)} update(s) aggregated ({report.aggregation}) into "
        f"{report.tag} (commit {report.commit_sha}), {report.num_tokens} tokens"
    )
    # folder names and reasons carry other parties' text: printed as ASCII escapes, never raw to the terminal
    for update in report.accepted:
        print(
            f"  accepted {quote_untrusted(update.client_id)}: {update.num_tokens} tokens, weight {update.weight:.4f}"
        )
    for update in report.rejected:
        print(f"  rejected {quote_untrusted(update.client_id)}: {quote_untrusted(update.reason, 300)[1:-1]}")
    return 0


def _recipe_config(args: argparse.Namespace) -> Any:
    from .config import load_config

    try:
        return load_config(args.config, args.overrides)
    except FileNotFoundError as error:
        raise UsageError("--config", str(error)) from None


def hub_seed_command(args: argparse.Namespace) -> int:
    from .recipe import seed_hub

    users = args.client_users.split(",") if args.client_users else None
    try:
        sha = seed_hub(
            _recipe_config(args),
            args.repo_id,
            num_clients=args.num_clients,
            client_users=users,
            aggregator_user=args.aggregator_user,
            private=args.private or None,
        )
    except ValueError as error:
        raise UsageError(None, str(error)) from None
    print(f"Seeded {args.repo_id} with the round-1 global generalist (commit {sha}, tag round-1)")
    return 0


def hub_client_command(args: argparse.Namespace) -> int:
    from .recipe import run_hub_round

    record = run_hub_round(_recipe_config(args), args.client_id, args.round, args.repo_id, args.state_dir)
    if args.json:
        print(json.dumps(record, indent=2))
        return 0
    print(
        f"Client {record['client_id']} ({record['name']}) trained round {record['round']}: train loss "
        f"{record['train_loss']:.4f} over {record['train_tokens']} tokens; update at commit {record['commit_sha']}"
    )
    return 0


def flower_sim_command(args: argparse.Namespace) -> int:
    import importlib.util

    if importlib.util.find_spec("flwr") is None:
        raise UsageError(None, "Flower is not installed: pip install 'comigs-hf[flower]'")
    from .flower_app import run_flower_simulation
    from .recipe import format_results

    cfg = _recipe_config(args)
    results = run_flower_simulation(
        cfg, num_cpus_per_client=args.cpus_per_client, num_gpus_per_client=args.gpus_per_client
    )
    print(format_results(results))
    print(f"outputs: {cfg.output_dir}")
    return 0


def table_command(args: argparse.Namespace) -> int:
    from .tables import load_table_config, run_table, write_table

    path = Path(args.config)
    if not path.is_file():
        raise UsageError("--config", f"{path} does not exist")
    table = load_table_config(path)
    if args.recipe is not None:
        if not Path(args.recipe).is_file():
            raise UsageError("--recipe", f"{args.recipe} does not exist")
        table.recipe = str(Path(args.recipe).resolve())
    if args.columns:
        known = [column.name for column in table.columns]
        unknown = [name for name in args.columns if name not in known]
        if unknown:
            raise UsageError("--columns", f"{unknown} are not columns of {path.name} (its columns: {known})")
        table.columns = [column for column in table.columns if column.name in args.columns]
    output = Path(args.output) if args.output else Path("outputs") / "tables" / path.stem
    runs = run_table(table, output, seeds=args.seeds, extra_overrides=args.overrides)
    print(write_table(runs, output, table.title))
    print(f"tables: {output / 'table.md'}, {output / 'table.csv'}; curves: {output / 'curves.png'}")
    return 0


def run_command(argv: list[str]) -> int:
    """`comigs run ...`: the federated recipe, with its own parser and `--help`."""
    from .recipe import main as recipe_main

    recipe_main(argv)
    return 0


__all__ = [
    "UsageError",
    "summarize",
    "aggregate_command",
    "export_command",
    "flower_sim_command",
    "hub_client_command",
    "hub_seed_command",
    "inspect_command",
    "pull_command",
    "push_command",
    "run_command",
    "submit_command",
    "table_command",
]
