"""The offline default: text domains from the Python standard library and a tiny GPT-2 base pretrained on them.

Every Python installation carries its standard library, so this needs no network. The library's modules are split
once, by a hash of their path, into a pretraining portion (mixed domains, used for the tokenizer and the base) and a
client portion (`build_domain_corpora`), so no client record, test records included, is ever seen in pretraining.

Domains:

- `code`: top-level statements of stdlib modules, docstrings and comments removed, original formatting kept.
- `docstrings`: module, class and function docstrings (`ast.get_docstring`): English prose about APIs.
- `reference`: sections of the language reference shipped in `pydoc_data.topics` (reST-like, grammar rules).
- `comments`: the `#` comments of each module, in order: terse notes, often with code fragments.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import io
import json
import math
import os
import platform
import re
import shutil
import sysconfig
import tempfile
import time
import tokenize
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import torch
from filelock import FileLock
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm.auto import tqdm
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
DOMAINS = ("code", "docstrings", "reference", "comments")
CACHE_NAME = "embedded-base-v1"
BUILD_INFO_NAME = "build_info.json"

# Fraction of stdlib modules (and of reference sections) reserved for pretraining; the rest feeds the clients.
PRETRAINING_FRACTION = 0.3
# Packages skipped entirely: generated codec tables and data dictionaries are not code anyone writes, tests are absent
# from some installs (Debian, slim images), and `pydoc_data` is the `reference` domain itself.
_SKIPPED_DIRS = {
    "site-packages",
    "dist-packages",
    "test",
    "tests",
    "idle_test",
    "__pycache__",
    "encodings",
    "pydoc_data",
}
_HEADING_UNDERLINE = re.compile(r"^([*=\-~^])\1{2,}$")
_DECORATIVE_COMMENT = re.compile(r"^#[\s#*=\-~_+]*$")


def default_cache_root() -> Path:
    """Return the root of comigs_hf's caches: `$COMIGS_HF_CACHE` if set, else `~/.cache/comigs_hf`."""
    return Path(os.environ.get("COMIGS_HF_CACHE") or Path.home() / ".cache" / "comigs_hf").expanduser()


def _stable_fraction(key: str) -> float:
    """Map a string to [0, 1) reproducibly across processes and platforms (unlike `hash`)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64


def _stdlib_modules() -> list[tuple[str, Path]]:
    """List `(relative path, path)` of the stdlib's `.py` files in sorted order, skipping tests and data packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    modules = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        parts = relative.split("/")
        if (
            _SKIPPED_DIRS.intersection(parts[:-1])
            or parts[0].startswith("config-")
            or parts[-1].startswith("_sysconfigdata")
        ):
            continue
        modules.append((relative, path))
    return modules


def _docstring_nodes(tree: ast.Module) -> list[ast.AST]:
    """Modules, classes and functions that have a docstring, in source order."""
    # only statement lists can hold a def; skipping expressions makes this 10x cheaper than `ast.walk`
    found, stack = [], [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and (
            ast.get_docstring(node, clean=False) is not None
        ):
            found.append(node)
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            children = getattr(node, field, None)
            if isinstance(children, list):
                stack.extend(children)
    return sorted(found, key=lambda node: getattr(node, "lineno", 0))


def _split_module(source: str) -> tuple[list[str], list[str], str]:
    """Cut one module's source into code records, docstring records and one comments record."""
    tree = ast.parse(source)
    lines = source.splitlines()
    dropped = set()  # 0-based line numbers removed from the code domain
    docstrings = []
    for node in _docstring_nodes(tree):
        docstrings.append(ast.get_docstring(node, clean=True))
        expr = node.body[0]
        first, last = expr.lineno - 1, expr.end_lineno - 1
        # ast offsets count UTF-8 bytes
        if lines[first].encode()[: expr.col_offset].strip() or lines[last].encode()[expr.end_col_offset :].strip():
            continue  # shares a line with code (`def f(): "doc"`): left in the code
        if len(node.body) == 1 and not isinstance(node, ast.Module):
            # a body that was only a docstring still needs a statement
            lines[first] = lines[first][: expr.col_offset] + "pass"
            dropped.update(range(first + 1, last + 1))
        else:
            dropped.update(range(first, last + 1))

    comments, previous_row = [], None
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type != tokenize.COMMENT:
            continue
        row, col = token.start
        text = token.string.strip()
        if text.startswith("#!") or "coding" in text[:25] and re.search(r"coding[:=]", text):
            keep = False
        else:
            keep = not _DECORATIVE_COMMENT.match(text)
        if keep:
            # a blank line separates comment blocks that were not on consecutive lines
            if comments and previous_row is not None and row > previous_row + 1:
                comments.append("")
            comments.append(text)
            previous_row = row
        if lines[row - 1][:col].strip():
            lines[row - 1] = lines[row - 1][:col].rstrip()
        else:
            dropped.add(row - 1)

    code = []
    group: list[str] = []
    for statement in tree.body:
        first = min([statement.lineno] + [d.lineno for d in getattr(statement, "decorator_list", [])]) - 1
        kept = [lines[i] for i in range(first, statement.end_lineno) if i not in dropped]
        text = re.sub(r"\n\s*\n(\s*\n)+", "\n\n", "\n".join(kept)).strip("\n")
        if not text.strip():
            continue
        if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if group:
                code.append("\n".join(group))
                group = []
            code.append(text)
        else:
            # imports and assignments are too short alone: consecutive ones make one record
            group.append(text)
    if group:
        code.append("\n".join(group))
    return code, docstrings, "\n".join(comments).strip("\n")


def _reference_sections() -> list[str]:
    """Split each `pydoc_data.topics` entry into its sections (a heading underlined with `*`, `=`, `-`, ...)."""
    from pydoc_data.topics import topics

    sections = []
    for key in sorted(topics):
        lines = topics[key].strip("\n").splitlines()
        starts = [
            i
            for i in range(len(lines) - 1)
            if lines[i].strip()
            and _HEADING_UNDERLINE.match(lines[i + 1].strip())
            and len(lines[i + 1].strip()) == len(lines[i].strip())
        ]
        starts = sorted(set([0] + starts))
        for begin, end in zip(starts, starts[1:] + [len(lines)]):
            text = "\n".join(lines[begin:end]).strip("\n")
            if text.strip():
                sections.append(text)
    return sections


@functools.lru_cache(maxsize=1)
def _all_records() -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """Parse the stdlib once per process: domain -> (client records, pretraining records), deduplicated."""
    client = {domain: [] for domain in DOMAINS}
    pretraining = {domain: [] for domain in DOMAINS}
    for relative, path in _stdlib_modules():
        try:
            with tokenize.open(path) as handle:
                source = handle.read()
            code, docstrings, comments = _split_module(source)
        except (SyntaxError, UnicodeDecodeError, tokenize.TokenError, ValueError):
            continue  # a few installs ship files for other Python versions; they are not needed
        target = pretraining if _stable_fraction(relative) < PRETRAINING_FRACTION else client
        target["code"].extend(code)
        target["docstrings"].extend(docstrings)
        if comments:
            target["comments"].append(comments)
    for section in _reference_sections():
        # sections repeat across topics ("compound" holds "for"), so assign by text, not by topic
        target = pretraining if _stable_fraction(section) < PRETRAINING_FRACTION else client
        target["reference"].append(section)

    # Empty docstrings carry nothing; exact duplicates ("Return self.") would leak between train and test splits
    # or between domains.
    seen = set()

    def first_occurrences(texts: list[str]) -> list[str]:
        unique = []
        for text in texts:
            if text.strip() and text not in seen:
                seen.add(text)
                unique.append(text)
        return unique

    # client records first (all domains), then pretraining: the order decides which copy a duplicate keeps
    for records in (client, pretraining):
        for domain in DOMAINS:
            records[domain] = first_occurrences(records[domain])
    return {domain: (tuple(client[domain]), tuple(pretraining[domain])) for domain in DOMAINS}


def _cap_chars(records: tuple[str, ...], max_chars: int | None) -> list[str]:
    """Keep a pseudo-random but reproducible subset of `records` totalling at most `max_chars`, in original order."""
    if max_chars is None:
        return list(records)
    chosen, total = set(), 0
    # hash order spreads the subset over the whole library instead of its alphabetical head
    for index in sorted(range(len(records)), key=lambda i: _stable_fraction(records[i])):
        if total + len(records[index]) <= max_chars:
            chosen.add(index)
            total += len(records[index])
    return [records[i] for i in sorted(chosen)]


def build_domain_corpora(max_chars_per_domain: int | None = 300_000) -> dict[str, list[str]]:
    """Build the clients' four text domains from the Python standard library.

    Deterministic for a given Python installation: modules are read in sorted order and subsets are chosen by a hash
    of the text. No record is shared between domains or with `build_pretraining_corpus`.

    Args:
        max_chars_per_domain (`int`, *optional*, defaults to 300000):
            Cap on the characters kept per domain (whole records only); `None` keeps everything.

    Returns:
        `dict[str, list[str]]`: domain name (`"code"`, `"docstrings"`, `"reference"`, `"comments"`) to its records.
    """
    return {domain: _cap_chars(records[0], max_chars_per_domain) for domain, records in _all_records().items()}


def build_pretraining_corpus(max_chars_per_domain: int | None = 750_000) -> list[str]:
    """Build the base model's pretraining text: stdlib modules and reference sections disjoint from the clients'.

    Args:
        max_chars_per_domain (`int`, *optional*, defaults to 750000):
            Cap on the characters taken from each domain; `None` keeps everything.

    Returns:
        `list[str]`: the records of all four domains, interleaved in a reproducible order.
    """
    records = [
        text
        for _, (_, pretraining) in _all_records().items()
        for text in _cap_chars(pretraining, max_chars_per_domain)
    ]
    return sorted(records, key=_stable_fraction)


def load_embedded_records(max_chars_per_domain: int | None = 300_000) -> datasets.Dataset:
    """Return the client corpora of `build_domain_corpora` as one dataset with columns `text` and `domain`.

    Args:
        max_chars_per_domain (`int`, *optional*, defaults to 300000):
            Cap on the characters kept per domain; `None` keeps everything.

    Returns:
        `datasets.Dataset`: one row per record, domains in the order of `DOMAINS`.
    """
    corpora = build_domain_corpora(max_chars_per_domain)
    texts = [text for domain in DOMAINS for text in corpora[domain]]
    domains = [domain for domain in DOMAINS for _ in corpora[domain]]
    return datasets.Dataset.from_dict({"text": texts, "domain": domains})


def build_tokenizer(
    texts: Iterable[str], vocab_size: int = 4096, model_max_length: int = 256
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (GPT-2's scheme: no unknown tokens) and wrap it for transformers.

    Args:
        texts (`Iterable[str]`):
            Training text, e.g. `build_pretraining_corpus()`.
        vocab_size (`int`, *optional*, defaults to 4096):
            Vocabulary size, special tokens and the 256 byte symbols included.
        model_max_length (`int`, *optional*, defaults to 256):
            Longest sequence the model takes, recorded in the tokenizer.

    Returns:
        `PreTrainedTokenizerFast`: `<|endoftext|>` (id 0) is the BOS and EOS token, `<|pad|>` (id 1) the pad token.
    """
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=model_max_length,
    )


@dataclass(frozen=True)
class EmbeddedBaseSettings:
    """Everything that decides the embedded base's weights; a cache is reused only when these match."""

    vocab_size: int = 4096
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    n_positions: int = 256
    max_steps: int = 1200
    batch_size: int = 4
    learning_rate: float = 3e-3
    pretraining_chars_per_domain: int | None = 750_000
    seed: int = 0


def _pack_pretraining_blocks(tokenizer: PreTrainedTokenizerFast, texts: list[str], block_size: int) -> torch.Tensor:
    """Tokenize, join documents with EOS and cut into `(num_blocks, block_size)`, dropping the tail."""
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    flat = [token for document in ids for token in (*document, tokenizer.eos_token_id)]
    num_blocks = len(flat) // block_size
    if num_blocks == 0:
        raise ValueError(f"The pretraining text has {len(flat)} tokens, fewer than one block of {block_size}.")
    return torch.tensor(flat[: num_blocks * block_size], dtype=torch.long).view(num_blocks, block_size)


def _pretrain(model: GPT2LMHeadModel, blocks: torch.Tensor, settings: EmbeddedBaseSettings, progress: bool) -> float:
    """Train `model` in place for `settings.max_steps` steps; return the mean loss of the last 20 steps."""
    generator = torch.Generator().manual_seed(settings.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.learning_rate,
        betas=(0.9, 0.95),
    )
    warmup = max(1, settings.max_steps // 20)

    def lr_factor(step: int) -> float:
        # linear warmup, then cosine decay to 10% of the peak
        if step < warmup:
            return (step + 1) / warmup
        progress_fraction = (step - warmup) / max(1, settings.max_steps - warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress_fraction))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model.train()
    order = torch.empty(0, dtype=torch.long)
    losses = []
    bar = tqdm(range(settings.max_steps), desc="pretraining embedded base", disable=not progress)
    for _ in bar:
        if len(order) < settings.batch_size:  # a fresh shuffle each epoch
            order = torch.cat([order, torch.randperm(len(blocks), generator=generator)])
        batch, order = blocks[order[: settings.batch_size]], order[settings.batch_size :]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return sum(losses[-20:]) / len(losses[-20:])


def _is_complete(model_dir: Path) -> bool:
    files = (BUILD_INFO_NAME, "config.json", "tokenizer.json")
    return all((model_dir / name).is_file() for name in files) and any(model_dir.glob("model*.safetensors"))


def _read_settings(model_dir: Path) -> dict:
    return json.loads((model_dir / BUILD_INFO_NAME).read_text())["settings"]


def build_embedded_base(
    cache_dir: str | os.PathLike | None = None,
    *,
    vocab_size: int = 4096,
    n_layer: int = 4,
    n_embd: int = 128,
    n_head: int = 4,
    n_positions: int = 256,
    max_steps: int = 1200,
    batch_size: int = 4,
    learning_rate: float = 3e-3,
    pretraining_chars_per_domain: int | None = 750_000,
    seed: int = 0,
    num_threads: int | None = 2,
    progress: bool = True,
) -> Path:
    """Return the directory of the embedded base model, pretraining and caching it on first use.

    The base is a GPT-2-shaped causal LM with its own byte-level BPE tokenizer, both trained on
    `build_pretraining_corpus` (all four domains mixed, no client record). With the defaults it takes 2-3 minutes on
    2 CPU cores. The build is written to a temporary sibling directory and moved into place with `os.replace`, so an
    interrupted build leaves no partial cache; a file lock keeps concurrent processes from building twice.

    Args:
        cache_dir (`str` or `os.PathLike`, *optional*):
            Where the model lives. Defaults to `<root>/embedded-base-v1` for the default settings and
            `<root>/embedded-base-v1-<hash>` for others, `<root>` being `$COMIGS_HF_CACHE` or `~/.cache/comigs_hf`.
        vocab_size (`int`, *optional*, defaults to 4096):
            Tokenizer vocabulary size.
        n_layer (`int`, *optional*, defaults to 4):
            Number of transformer blocks.
        n_embd (`int`, *optional*, defaults to 128):
            Hidden size.
        n_head (`int`, *optional*, defaults to 4):
            Attention heads per block.
        n_positions (`int`, *optional*, defaults to 256):
            Context length, also the pretraining sequence length.
        max_steps (`int`, *optional*, defaults to 1200):
            Optimizer steps.
        batch_size (`int`, *optional*, defaults to 4):
            Sequences per step.
        learning_rate (`float`, *optional*, defaults to 3e-3):
            Peak AdamW learning rate (linear warmup, cosine decay to a tenth).
        pretraining_chars_per_domain (`int`, *optional*, defaults to 750000):
            Characters of pretraining text per domain; `None` takes all.
        seed (`int`, *optional*, defaults to 0):
            Seeds the initialisation and the batch order.
        num_threads (`int`, *optional*, defaults to 2):
            CPU threads for the build (restored afterwards); `None` leaves torch's setting.
        progress (`bool`, *optional*, defaults to `True`):
            Show a progress bar and print the final loss.

    Returns:
        `pathlib.Path`: a directory that `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`
        load, with `build_info.json` recording the settings, final loss and build time.

    Raises:
        `ValueError`: `cache_dir` holds a base built with other settings, or something that is not a base.
    """
    settings = EmbeddedBaseSettings(
        vocab_size=vocab_size,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_positions=n_positions,
        max_steps=max_steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        pretraining_chars_per_domain=pretraining_chars_per_domain,
        seed=seed,
    )
    if cache_dir is None:
        name = CACHE_NAME
        if settings != EmbeddedBaseSettings():
            digest = hashlib.sha256(json.dumps(asdict(settings), sort_keys=True).encode()).hexdigest()[:10]
            name = f"{CACHE_NAME}-{digest}"
        model_dir = default_cache_root() / name
    else:
        model_dir = Path(cache_dir).expanduser()
    model_dir.parent.mkdir(parents=True, exist_ok=True)

    with FileLock(str(model_dir) + ".lock"):
        if _is_complete(model_dir):
            cached = _read_settings(model_dir)
            if cached != asdict(settings):
                raise ValueError(
                    f"{model_dir} holds an embedded base built with {cached}, not the requested {asdict(settings)}; "
                    "pass another cache_dir or delete it."
                )
            return model_dir
        if model_dir.exists():
            # builds land whole (os.replace), so this directory is not one of ours: never delete it
            raise ValueError(f"{model_dir} exists but holds no complete embedded base; pass another cache_dir.")
        staging = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}-", dir=model_dir.parent))
        try:
            _build_into(staging, settings, num_threads, progress)
            staging.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared like ~/.cache/huggingface
            os.replace(staging, model_dir)
        finally:
            if staging.exists():
                shutil.rmtree(staging)
    return model_dir


def _build_into(directory: Path, settings: EmbeddedBaseSettings, num_threads: int | None, progress: bool) -> None:
    """Train tokenizer and model for `settings` and save both, plus `build_info.json`, into `directory`."""
    start = time.perf_counter()
    texts = build_pretraining_corpus(settings.pretraining_chars_per_domain)
    tokenizer = build_tokenizer(texts, settings.vocab_size, settings.n_positions)
    blocks = _pack_pretraining_blocks(tokenizer, texts, settings.n_positions)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=settings.n_positions,
        n_embd=settings.n_embd,
        n_layer=settings.n_layer,
        n_head=settings.n_head,
        # no dropout: under two epochs it only slows learning, and it keeps later fine-tuning deterministic
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        # the caller's random state is left as it was
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            model = GPT2LMHeadModel(config)
            final_loss = _pretrain(model, blocks, settings, progress)
    finally:
        torch.set_num_threads(previous_threads)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    seconds = time.perf_counter() - start
    info = {
        "settings": asdict(settings),
        "final_loss": final_loss,
        "build_seconds": round(seconds, 1),
        "num_parameters": model.num_parameters(),
        "pretraining_chars": sum(map(len, texts)),
        "pretraining_tokens": blocks.numel(),
        "python_version": platform.python_version(),
        "torch_version": torch.__version__,
    }
    # written last: its presence marks the directory complete
    (directory / BUILD_INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
    if progress:
        print(
            f"Embedded base: {info['num_parameters']:,} parameters, final pretraining loss {final_loss:.3f} after "
            f"{settings.max_steps} steps on {info['pretraining_tokens']:,} tokens ({seconds:.0f} s)."
        )
