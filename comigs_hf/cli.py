"""The `comigs` command: export, push, pull and inspect generalists, and run Hub-mediated federated rounds.

```
comigs export MODEL OUTPUT_DIR [--index I]                   generalist -> PEFT adapter folder
comigs push MODEL REPO_ID [--round T] [--index I] ...        generalist -> Hub (one commit, tagged round-T)
comigs pull MODEL REPO_ID --round T [--index I] [--output D] Hub round-T generalist -> saved model, re-saved
comigs inspect MODEL [--json]                                config summary, parameters per role
comigs submit MODEL REPO_ID --client-id C --round T --num-tokens N
comigs aggregate REPO_ID --round T --min-clients K [--config YAML | --strategy S] [--timeout S] [--poll-interval S]
comigs hub-seed --repo-id R [--num-clients N] [--config YAML] [KEY=VALUE ...]   round-1 global + manifest -> Hub
comigs hub-client --repo-id R --client-id I --round T --state-dir D [--config YAML] [KEY=VALUE ...]
comigs run [ARGS ...]                                        the federated recipe, comigs_hf.recipe.main(ARGS)
comigs table --config TABLE [--seeds S ...] [--output D] [--recipe R] [KEY=VALUE ...]   strategies x seeds -> tables
```

`MODEL` is a saved CoMiGS model (a folder written by `save_pretrained`, or a Hub repo id), loaded with
`AutoModelForCausalLM.from_pretrained` once comigs_hf has registered the `comigs` model type. Hub commands
authenticate as huggingface_hub does (`HF_TOKEN` or `hf auth login`); there is deliberately no `--token` option, so
a token never lands in shell history or a process listing, and none is ever printed. Bad input exits with status 2
and a message naming the argument; a Hub or network failure exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from huggingface_hub.errors import HfHubHTTPError, HFValidationError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.utils import validate_repo_id

from . import __version__


class _UsageError(Exception):
    """Bad input: reported as `<prog>: error: argument <name>: <message>`, exit status 2."""

    def __init__(self, argument: str | None, message: str):
        super().__init__(f"argument {argument}: {message}" if argument else message)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def _seconds(text: str, positive: bool = False) -> float:
    kind = "a positive" if positive else "a non-negative"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {kind} number of seconds, got {text!r}") from None
    if not 0 <= value < float("inf") or (positive and value == 0):  # the comparison also refuses nan
        raise argparse.ArgumentTypeError(f"expected {kind} number of seconds, got {text}")
    return value


def _non_negative_seconds(text: str) -> float:
    return _seconds(text)


def _positive_seconds(text: str) -> float:
    return _seconds(text, positive=True)


def _repo_id(text: str) -> str:
    try:
        validate_repo_id(text)
    except HFValidationError as error:
        raise argparse.ArgumentTypeError(f"not a Hub repo id ({error})") from None
    return text


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
            raise _UsageError(argument, f"{source!r} is not a directory holding a saved CoMiGS model")
        try:
            validate_repo_id(source)
        except HFValidationError:
            raise _UsageError(argument, f"{source!r} is neither a directory nor a Hub repo id") from None
    elif not (path / "config.json").is_file():
        raise _UsageError(argument, f"{source!r} has no config.json: not a saved model (see save_pretrained)")
    try:
        model = AutoModelForCausalLM.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise _UsageError(argument, f"cannot load a CoMiGS model from {source!r}: {error}") from None
    if not isinstance(model, CoMiGSForCausalLM):
        raise _UsageError(argument, f"{source!r} is a {type(model).__name__}, not a CoMiGS model")
    return model


def _check_index(model: Any, index: int) -> None:
    if not 0 <= index < model.config.num_generalists:
        raise _UsageError(
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


def _export(args: argparse.Namespace) -> int:
    from .adapters import export_generalist, merged_generalist_model

    model = _load_model(args.model)
    _check_index(model, args.index)
    if not args.merge_generalist:
        export_generalist(model, args.output_dir, index=args.index)
        print(f"Wrote generalist_{args.index} as a PEFT LoRA adapter to {args.output_dir}")
        return 0
    if Path(args.model).is_dir() and Path(args.output_dir).resolve() == Path(args.model).resolve():
        raise _UsageError("output_dir", "is the client's own folder: the merged model would overwrite the client")
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


def _push(args: argparse.Namespace) -> int:
    from .hub import push_generalist_to_hub

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


def _pull(args: argparse.Namespace) -> int:
    from .adapters import load_generalist

    if not args.output and not Path(args.model).is_dir():
        raise _UsageError("--output", "required when MODEL is a Hub repo id (where to save the updated model)")
    model = _load_model(args.model)
    _check_index(model, args.index)
    revision = f"round-{args.round}" if args.round is not None else args.revision
    try:
        load_generalist(model, args.repo_id, index=args.index, revision=revision, subfolder=args.subfolder)
    except RevisionNotFoundError:
        argument = "--round" if args.round is not None else "--revision"
        raise _UsageError(argument, f"{revision!r} does not exist in {args.repo_id}") from None
    output = Path(args.output or args.model)
    # a full checkpoint stays full, an adapter-only one adapter-only
    _save_in_place(model, output, include_base=model.config.weights_include_base is not False)
    print(f"Loaded {args.repo_id}@{revision or 'main'} into generalist_{args.index}; saved to {output}")
    return 0


def summarize(model: Any) -> dict[str, Any]:
    """Config summary of a CoMiGS model: base, experts, LoRA settings, targets, parameter counts per role."""
    from .modeling_comigs import ROLES, parameter_role

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


def _inspect(args: argparse.Namespace) -> int:
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


def _submit(args: argparse.Namespace) -> int:
    from .hub import check_client_id, submit_update

    try:
        check_client_id(args.client_id)
    except ValueError as error:
        raise _UsageError("--client-id", str(error)) from None
    model = _load_model(args.model)
    _check_index(model, args.index)
    sha = submit_update(model, args.repo_id, args.client_id, args.round, args.num_tokens, index=args.index)
    print(f"Submitted the round {args.round} update of {args.client_id} to {args.repo_id} (commit {sha})")
    return 0


def _aggregate(args: argparse.Namespace) -> int:
    from .adapters import quote_untrusted
    from .hub import aggregate_round

    if args.config is not None:
        from .config import build_strategy

        strategy = build_strategy(_recipe_config(args))
    else:
        from .algorithms import get_strategy

        try:
            strategy = get_strategy(args.strategy)
        except ValueError as error:
            raise _UsageError("--strategy", str(error)) from None
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
        raise _UsageError("--config", str(error)) from None


def _hub_seed(args: argparse.Namespace) -> int:
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
        raise _UsageError(None, str(error)) from None
    print(f"Seeded {args.repo_id} with the round-1 global generalist (commit {sha}, tag round-1)")
    return 0


def _hub_client(args: argparse.Namespace) -> int:
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


def _flower_sim(args: argparse.Namespace) -> int:
    import importlib.util

    if importlib.util.find_spec("flwr") is None:
        raise _UsageError(None, "Flower is not installed: pip install 'comigs-hf[flower]'")
    from .flower_app import run_flower_simulation
    from .recipe import format_results

    cfg = _recipe_config(args)
    results = run_flower_simulation(
        cfg, num_cpus_per_client=args.cpus_per_client, num_gpus_per_client=args.gpus_per_client
    )
    print(format_results(results))
    print(f"outputs: {cfg.output_dir}")
    return 0


def _table(args: argparse.Namespace) -> int:
    from .tables import load_table_config, run_table, write_table

    path = Path(args.config)
    if not path.is_file():
        raise _UsageError("--config", f"{path} does not exist")
    table = load_table_config(path)
    if args.recipe is not None:
        if not Path(args.recipe).is_file():
            raise _UsageError("--recipe", f"{args.recipe} does not exist")
        table.recipe = str(Path(args.recipe).resolve())
    if args.columns:
        known = [column.name for column in table.columns]
        unknown = [name for name in args.columns if name not in known]
        if unknown:
            raise _UsageError("--columns", f"{unknown} are not columns of {path.name} (its columns: {known})")
        table.columns = [column for column in table.columns if column.name in args.columns]
    output = Path(args.output) if args.output else Path("outputs") / "tables" / path.stem
    runs = run_table(table, output, seeds=args.seeds, extra_overrides=args.overrides)
    print(write_table(runs, output, table.title))
    print(f"tables: {output / 'table.md'}, {output / 'table.csv'}; curves: {output / 'curves.png'}")
    return 0


def _run(argv: list[str]) -> int:
    """`comigs run ...`: the federated recipe, with its own parser and `--help`."""
    from .recipe import main as recipe_main

    recipe_main(argv)
    return 0


# ---- parser ----------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The `comigs` argument parser (`run` only lists here: its arguments go to the recipe's own parser)."""
    parser = argparse.ArgumentParser(
        prog="comigs",
        description=__doc__.split("\n\n")[0],
        epilog="Hub commands authenticate with HF_TOKEN or `hf auth login`.",
    )
    parser.add_argument("--version", action="version", version=f"comigs_hf {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    model_help = "saved CoMiGS model: a save_pretrained folder or a Hub repo id"
    index_help = "which generalist (default: 0)"

    export = commands.add_parser("export", help="write a generalist as a PEFT LoRA adapter folder")
    export.add_argument("model", help=model_help)
    export.add_argument("output_dir", help="folder for adapter_config.json and adapter_model.safetensors")
    export.add_argument("--index", type=_non_negative_int, default=0, help=index_help)
    export.add_argument(
        "--merge-generalist",
        action="store_true",
        help="write a plain transformers model of the base with the generalist merged in (servable anywhere)",
    )
    export.set_defaults(handler=_export)

    push = commands.add_parser("push", help="push a generalist to the Hub as a PEFT adapter with a model card")
    push.add_argument("model", help=model_help)
    push.add_argument("repo_id", type=_repo_id, help="Hub model repo (created if missing)")
    push.add_argument("--index", type=_non_negative_int, default=0, help=index_help)
    push.add_argument("--round", type=_positive_int, help="tag the commit round-ROUND")
    push.add_argument("--num-clients", type=_non_negative_int, help="contributing clients, for the card")
    push.add_argument("--num-tokens", type=_non_negative_int, help="training tokens over all clients, for the card")
    push.add_argument("--strategy", default="comigs", help="federated strategy, for the card (default: comigs)")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--path-in-repo", help="folder in the repo instead of its root")
    push.add_argument("--commit-message")
    push.add_argument("--base-model-revision", help="commit of the base model, for the card")
    push.add_argument("--license", help="the card's license (a Hub licence id such as apache-2.0, or other)")
    push.add_argument("--dataset", action="append", help="Hub id of a dataset trained on, for the card (repeatable)")
    push.set_defaults(handler=_push)

    pull = commands.add_parser("pull", help="load a generalist round from the Hub into a saved model and re-save it")
    pull.add_argument("model", help=model_help)
    pull.add_argument("repo_id", type=_repo_id, help="Hub repo holding the generalist")
    which = pull.add_mutually_exclusive_group(required=True)
    which.add_argument("--round", type=_positive_int, help="pull the tag round-ROUND")
    which.add_argument("--revision", help="pull any branch, tag or commit")
    pull.add_argument("--index", type=_non_negative_int, default=0, help=index_help)
    pull.add_argument("--subfolder", help="the adapter's folder in the repo")
    pull.add_argument("--output", help="save here instead of over MODEL")
    pull.set_defaults(handler=_pull)

    inspect = commands.add_parser("inspect", help="print the config summary and parameter counts per role")
    inspect.add_argument("model", help=model_help)
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.set_defaults(handler=_inspect)

    submit = commands.add_parser("submit", help="upload this client's round update to the shared repo")
    submit.add_argument("model", help=model_help)
    submit.add_argument("repo_id", type=_repo_id, help="the shared round repo")
    submit.add_argument("--client-id", required=True, help="this client's id (letters, digits, '.', '_', '-')")
    submit.add_argument("--round", type=_positive_int, required=True, help="the round trained")
    submit.add_argument("--num-tokens", type=_positive_int, required=True, help="training tokens this round")
    submit.add_argument("--index", type=_non_negative_int, default=0, help=index_help)
    submit.set_defaults(handler=_submit)

    aggregate = commands.add_parser("aggregate", help="average a round's updates into the next global generalist")
    aggregate.add_argument("repo_id", type=_repo_id, help="the shared round repo")
    aggregate.add_argument("--round", type=_positive_int, required=True, help="the round to aggregate")
    aggregate.add_argument("--min-clients", type=_positive_int, required=True, help="valid updates to wait for")
    aggregate.add_argument(
        "--timeout", type=_non_negative_seconds, default=600.0, help="seconds to wait for them (default: 600)"
    )
    aggregate.add_argument(
        "--poll-interval", type=_positive_seconds, default=10.0, help="seconds between checks (default: 10)"
    )
    which_strategy = aggregate.add_mutually_exclusive_group()
    which_strategy.add_argument(
        "--strategy",
        default="comigs",
        help="strategy preset whose rule and weighting combine the updates (default: comigs)",
    )
    which_strategy.add_argument(
        "--config", help="YAML recipe: its strategy, aggregation, aggregation_kwargs and weighting combine the updates"
    )
    aggregate.add_argument("--json", action="store_true", help="print the report as JSON")
    aggregate.set_defaults(handler=_aggregate, overrides=[])

    recipe_help = "YAML recipe (see recipes/configs/); the same on every client"
    overrides_help = "recipe overrides, last on the line, dotted for sections: training.local_steps=5"
    hub_seed = commands.add_parser("hub-seed", help="push a recipe's initial global generalist, tagged round-1")
    # an option, not a positional: argparse takes no trailing KEY=VALUE positionals after options otherwise
    hub_seed.add_argument("--repo-id", type=_repo_id, required=True, help="the shared round repo (created if missing)")
    hub_seed.add_argument("--config", help=recipe_help)
    hub_seed.add_argument("--private", action="store_true", help="create the repo private")
    hub_seed.add_argument(
        "--num-clients", type=_positive_int, help="the federation's clients (default: what the recipe's data says)"
    )
    hub_seed.add_argument(
        "--client-users",
        metavar="USER,USER,...",
        help="each client's Hub user, in client order: only their commits carry their updates",
    )
    hub_seed.add_argument(
        "--aggregator-user", metavar="USER", help="the Hub user that aggregates (default with --client-users: yours)"
    )
    hub_seed.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=overrides_help)
    hub_seed.set_defaults(handler=_hub_seed)

    hub_client = commands.add_parser("hub-client", help="one client's round: pull round-T, train locally, submit")
    hub_client.add_argument("--repo-id", type=_repo_id, required=True, help="the shared round repo")
    hub_client.add_argument(
        "--client-id",
        type=_non_negative_int,
        required=True,
        help="this client's position in the recipe's data partition",
    )
    hub_client.add_argument("--round", type=_positive_int, required=True, help="the round to train")
    hub_client.add_argument(
        "--state-dir", required=True, help="private folder for this client's specialists, router and optimiser states"
    )
    hub_client.add_argument("--config", help=recipe_help)
    hub_client.add_argument("--json", action="store_true", help="print the round's record as JSON")
    hub_client.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=overrides_help)
    hub_client.set_defaults(handler=_hub_client)

    commands.add_parser("run", help="the federated recipe over Accelerate (comigs run --help)", add_help=False)

    flower_sim = commands.add_parser(
        "flower-sim", help="the federated recipe in Flower's simulation engine, one virtual SuperNode per client"
    )
    flower_sim.add_argument("--config", help=recipe_help)
    flower_sim.add_argument(
        "--cpus-per-client", type=float, default=1.0, help="CPU cores each client's Ray actor takes (default: 1)"
    )
    flower_sim.add_argument(
        "--gpus-per-client", type=float, default=0.0, help="share of a GPU each client's Ray actor takes (default: 0)"
    )
    flower_sim.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=overrides_help)
    flower_sim.set_defaults(handler=_flower_sim)

    table = commands.add_parser(
        "table", help="run every strategy x seed of a table config (skipping finished runs) and write its tables"
    )
    table.add_argument("--config", required=True, help="table config (see recipes/tables/)")
    table.add_argument(
        "--seeds", type=int, nargs="+", help="seeds to run (default: the table's); put KEY=VALUE overrides before it"
    )
    table.add_argument("--output", help="folder of the runs and tables (default: outputs/tables/<config name>)")
    table.add_argument("--recipe", help="another recipe for the same columns, e.g. another dataset's")
    table.add_argument("--columns", nargs="+", help="run and tabulate only these columns (default: all)")
    table.add_argument("overrides", nargs="*", help="KEY=VALUE applied to every run (e.g. rounds=5)")
    table.set_defaults(handler=_table)
    return parser


def _fail(parser: argparse.ArgumentParser, command: str | None, message: str) -> NoReturn:
    prog = f"{parser.prog} {command}" if command else parser.prog
    parser.exit(2, f"{prog}: error: {message}\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `comigs` command.

    Args:
        argv (`Sequence[str]`, *optional*): the arguments after the program name; defaults to `sys.argv[1:]`.

    Returns:
        `int`: the exit status (0 on success, 1 when the Hub or the network failed). Bad input raises `SystemExit(2)`
        with a message naming the argument, as argparse does.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] == "run":
        # the recipe parses its own options (`--config` and KEY=VALUE overrides)
        return _run(argv[1:])
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    # our own progress and rejection messages, without every HTTP request the client logs at INFO
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if logging.getLogger("comigs_hf").level == logging.NOTSET:
        logging.getLogger("comigs_hf").setLevel(logging.INFO)
    try:
        return args.handler(args)
    except _UsageError as error:
        _fail(parser, args.command, str(error))
    except RepositoryNotFoundError:
        repo_id = getattr(args, "repo_id", None) or getattr(args, "model", None)
        _fail(parser, args.command, f"argument repo_id: {repo_id!r} not found, or not readable with this login")
    except RevisionNotFoundError as error:
        _fail(parser, args.command, f"a revision does not exist in the repo ({error})")
    except HfHubHTTPError as error:
        print(f"{parser.prog} {args.command}: error: the Hub answered {error}", file=sys.stderr)
        return 1
    except ValueError as error:
        _fail(parser, args.command, str(error))


if __name__ == "__main__":
    sys.exit(main())
