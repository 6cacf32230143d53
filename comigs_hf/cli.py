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
import logging
import sys
from collections.abc import Sequence
from typing import NoReturn

from huggingface_hub.errors import HfHubHTTPError, HFValidationError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.utils import validate_repo_id

from . import __version__
from .commands import (
    UsageError,
    aggregate_command,
    export_command,
    flower_sim_command,
    hub_client_command,
    hub_seed_command,
    inspect_command,
    pull_command,
    push_command,
    run_command,
    submit_command,
    table_command,
)


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
    export.set_defaults(handler=export_command)

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
    push.set_defaults(handler=push_command)

    pull = commands.add_parser("pull", help="load a generalist round from the Hub into a saved model and re-save it")
    pull.add_argument("model", help=model_help)
    pull.add_argument("repo_id", type=_repo_id, help="Hub repo holding the generalist")
    which = pull.add_mutually_exclusive_group(required=True)
    which.add_argument("--round", type=_positive_int, help="pull the tag round-ROUND")
    which.add_argument("--revision", help="pull any branch, tag or commit")
    pull.add_argument("--index", type=_non_negative_int, default=0, help=index_help)
    pull.add_argument("--subfolder", help="the adapter's folder in the repo")
    pull.add_argument("--output", help="save here instead of over MODEL")
    pull.set_defaults(handler=pull_command)

    inspect = commands.add_parser("inspect", help="print the config summary and parameter counts per role")
    inspect.add_argument("model", help=model_help)
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.set_defaults(handler=inspect_command)

    submit = commands.add_parser("submit", help="upload this client's round update to the shared repo")
    submit.add_argument("model", help=model_help)
    submit.add_argument("repo_id", type=_repo_id, help="the shared round repo")
    submit.add_argument("--client-id", required=True, help="this client's id (letters, digits, '.', '_', '-')")
    submit.add_argument("--round", type=_positive_int, required=True, help="the round trained")
    submit.add_argument("--num-tokens", type=_positive_int, required=True, help="training tokens this round")
    submit.add_argument("--index", type=_non_negative_int, default=0, help=index_help)
    submit.set_defaults(handler=submit_command)

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
    aggregate.set_defaults(handler=aggregate_command, overrides=[])

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
    hub_seed.set_defaults(handler=hub_seed_command)

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
    hub_client.set_defaults(handler=hub_client_command)

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
    flower_sim.set_defaults(handler=flower_sim_command)

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
    table.set_defaults(handler=table_command)
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
        return run_command(argv[1:])
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
    except UsageError as error:
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
