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
import re
import sysconfig
import tokenize
from pathlib import Path

import datasets

DOMAINS = ("code", "docstrings", "reference", "comments")

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
