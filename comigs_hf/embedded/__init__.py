"""The offline default: text domains from the Python standard library (`corpus`) and a tiny GPT-2 base pretrained on
a disjoint part of them (`base`). Nothing is downloaded: every Python installation carries its standard library."""

from .base import EmbeddedBaseSettings, build_embedded_base, build_tokenizer, default_cache_root
from .corpus import DOMAINS, build_domain_corpora, build_pretraining_corpus, load_embedded_records

__all__ = [
    "DOMAINS",
    "EmbeddedBaseSettings",
    "build_domain_corpora",
    "build_embedded_base",
    "build_pretraining_corpus",
    "build_tokenizer",
    "default_cache_root",
    "load_embedded_records",
]
