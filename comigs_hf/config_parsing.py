"""YAML mappings and `key=value` overrides merged onto nested dataclasses through OmegaConf's structured configs, with
errors that name the dotted key: an unknown key with the closest valid one (or where it moved), a value of the wrong
type with the type the field expects, a number where YAML read a name.

`comigs_hf.config` applies it to the recipe's dataclasses (`RecipeConfig` and its sections).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException


@functools.cache
def type_hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of a dataclass's fields."""
    return typing.get_type_hints(cls)


def section_type(cls: type | None, key: str) -> type | None:
    """The dataclass type of field `key` of `cls` when that field is a section, else `None`."""
    if cls is None or key not in {f.name for f in dataclasses.fields(cls)}:
        return None
    hint = type_hints(cls)[key]
    return hint if dataclasses.is_dataclass(hint) else None


@dataclass(frozen=True)
class ConfigSchema:
    """A root dataclass whose fields may be sections (dataclasses of their own), as OmegaConf merges values onto it.

    Args:
        root (`type`): the top-level dataclass.
        moved_keys (`Mapping[str, str]`): dotted keys that moved, and where to (an old config gets the new place).
    """

    root: type
    moved_keys: Mapping[str, str] = field(default_factory=dict)

    def schema_at(self, path: Sequence[str]) -> tuple[type | None, int]:
        """The dataclass holding `path`'s last section-level key, and how many components name sections."""
        cls, depth = self.root, 0
        for part in path[:-1]:
            section = section_type(cls, part)
            if section is None:
                break
            cls, depth = section, depth + 1
        return cls, depth

    def unknown_key_message(self, path: Sequence[str]) -> str:
        cls, depth = self.schema_at(path)
        prefix = "".join(f"{part}." for part in path[:depth])
        key = path[depth]
        valid = [f.name for f in dataclasses.fields(cls) if f.init]
        message = f"Unknown config key {prefix + key!r}."
        if prefix + key in self.moved_keys:
            return message + f" It moved: use {self.moved_keys[prefix + key]}."
        close = difflib.get_close_matches(key, valid, n=1)
        if close:
            message += f" Did you mean {prefix + close[0]!r}?"
        else:
            # a section key written at the wrong level, e.g. `local_steps=5` for `training.local_steps=5`
            for name in valid:
                section = section_type(cls, name)
                if section is not None and key in {f.name for f in dataclasses.fields(section)}:
                    message += f" Did you mean {prefix + name + '.' + key!r}?"
                    break
        return message + f" Valid keys of {prefix.rstrip('.') or 'the top level'}: {', '.join(valid)}."

    def field_at(self, path: Sequence[str]) -> tuple[str | None, type | None]:
        """The annotation of the field `path` names and its dataclass when it is a section; `(None, None)` when `path`
        reaches into a dict-valued field (`data.data_files.train`) or below a plain one."""
        cls, depth = self.schema_at(path)
        if depth < len(path) - 1:
            return None, None
        annotation = next((f.type for f in dataclasses.fields(cls) if f.name == path[-1]), None)
        return annotation, section_type(cls, path[-1])

    def type_message(self, path: Sequence[str], value: Any) -> str:
        cls, depth = self.schema_at(path)
        if depth < len(path) - 1 and section_type(cls, path[depth]) is None and path[depth] in type_hints(cls):
            parent = ".".join(path[: depth + 1])
            return f"Config key {parent!r} is a plain value, not a section with keys (got {'.'.join(path)!r})."
        annotation, _ = self.field_at(path)
        return f"Config key {'.'.join(path)!r} expects {annotation}, got {value!r} ({type(value).__name__})."

    def leaves(
        self, mapping: Mapping, cls: type | None = None, path: tuple[str, ...] = ()
    ) -> list[tuple[tuple[str, ...], Any]]:
        """`(path, value)` for every value of a parsed YAML mapping, descending into sections only (a dict-valued field
        such as `data.data_files` is one value)."""
        cls, leaves = cls or self.root, []
        for key, value in mapping.items():
            section = section_type(cls, str(key))
            here = (*path, str(key))
            if section is not None and isinstance(value, Mapping):
                leaves.extend(self.leaves(value, section, here))
            elif section is None or value is not None:  # `model:` with nothing below keeps the section's defaults
                leaves.append((here, value))
        return leaves

    def merge(self, merged: Any, path: Sequence[str], value: Any) -> Any:
        """`merged` with `value` at `path`, type-checked by OmegaConf; a `ValueError` naming the key otherwise."""
        dotted = ".".join(path)
        annotation, section = self.field_at(path)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and annotation in ("str", "str | None"):
            # YAML read a number where a name was meant (a revision `1234`, a sha `1e100`): never guess its text
            raise ValueError(
                f"Config key {dotted!r} expects {annotation}, got {value!r} ({type(value).__name__}) (quote it in "
                "YAML to make it a string)."
            )
        if section is not None and not isinstance(value, Mapping):
            raise ValueError(
                f"{dotted!r}: expected a mapping of {section.__name__} fields, got {value!r} ({type(value).__name__})."
            )
        nested = value
        for part in reversed(path):
            nested = {part: nested}
        try:
            return OmegaConf.merge(merged, nested)
        except ConfigKeyError:
            raise ValueError(self.unknown_key_message(path)) from None
        except OmegaConfBaseException:
            raise ValueError(self.type_message(path, value)) from None


def parse_override(override: str) -> tuple[list[str], Any]:
    """`key=value` as the key's dotted components and the value parsed as YAML (`5` an int, `null` None, `[0,1]` a
    list)."""
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"Override {override!r} is not of the form key=value (e.g. training.local_steps=5).")
    parts = key.split(".")
    if any(not part for part in parts):
        raise ValueError(f"Override {override!r} has an empty component in its key {key!r}.")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ValueError(f"Override {override!r}: the value is not valid YAML ({error}).") from None
    return parts, value


__all__ = ["ConfigSchema", "parse_override", "section_type", "type_hints"]
