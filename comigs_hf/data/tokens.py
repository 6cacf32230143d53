"""Text to token blocks: tokenisation with a disk cache, and packing into fixed-length blocks."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import datasets
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

# Bump when the tokenised layout changes, so old cache files are not reused.
_TOKENIZE_VERSION = "comigs-tokenize-v1"


def _tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # the serialised pipeline (vocab, merges, normalizer, ...) decides every id
        state = backend.to_str() + type(tokenizer).__name__ + str(tokenizer.eos_token_id)
        return hashlib.sha256(state.encode("utf-8")).hexdigest()
    return datasets.fingerprint.Hasher.hash(tokenizer)


def _records_fingerprint(records: datasets.Dataset, text_column: str) -> str:
    if records.cache_files:
        # loaded from (and transformed on) Arrow files: `datasets` derives it from the files and transforms
        return records._fingerprint
    # in memory (embedded, streamed): `datasets` would pick a random fingerprint, so hash the text itself
    digest = hashlib.sha256()
    for batch in records.select_columns([text_column]).iter(batch_size=1000):
        for text in batch[text_column]:
            digest.update(hashlib.sha256(text.encode("utf-8")).digest())
    return digest.hexdigest()


def tokenize_records(
    records: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    text_column: str = "text",
    cache_dir: str | Path | None = None,
) -> datasets.Dataset:
    """Tokenise every record and append the EOS token, caching the result on disk.

    The cache file's name is a hash of the records' fingerprint (or their text, for in-memory datasets), the text
    column and the tokenizer's serialised state, so a second run with the same inputs reads the file and never calls
    the tokenizer. The block size is not part of it: packing is a cheap step after the cache.

    Args:
        records (`datasets.Dataset`): records with a `text_column`.
        tokenizer (`PreTrainedTokenizerBase`): must define `eos_token_id`; special tokens are not otherwise added.
        text_column (`str`, *optional*, defaults to `"text"`): column to tokenise.
        cache_dir (`str` or `Path`, *optional*): where the cache file goes (None: the `datasets` cache).

    Returns:
        `datasets.Dataset`: one row per record with the single column `input_ids` (int32 ids ending with EOS).
    """
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError(f"{type(tokenizer).__name__} has no eos_token; documents could not be separated.")
    cache_dir = Path(cache_dir) if cache_dir is not None else Path(datasets.config.HF_DATASETS_CACHE) / "comigs_hf"
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(
        json.dumps(
            [
                _TOKENIZE_VERSION,
                _records_fingerprint(records, text_column),
                text_column,
                _tokenizer_fingerprint(tokenizer),
            ]
        ).encode()
    ).hexdigest()[:32]

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        ids = tokenizer(batch[text_column], add_special_tokens=False, verbose=False)["input_ids"]
        return {"input_ids": [document + [eos_id] for document in ids]}

    return records.select_columns([text_column]).map(
        tokenize,
        batched=True,
        remove_columns=[text_column],
        features=datasets.Features({"input_ids": datasets.List(datasets.Value("int32"))}),
        cache_file_name=str(cache_dir / f"tokenized-{key}.arrow"),
        load_from_cache_file=True,
        new_fingerprint=key,
        desc="Tokenizing",
    )


def pack_blocks(documents: Iterable[Sequence[int]], block_size: int) -> torch.LongTensor:
    """Concatenate token sequences and cut them into blocks of `block_size`, dropping the incomplete tail.

    Args:
        documents (`Iterable[Sequence[int]]`): token ids per document, each already ending with EOS.
        block_size (`int`): tokens per block.

    Returns:
        `torch.LongTensor` of shape `(num_blocks, block_size)`: `num_blocks` may be 0.
    """
    pieces = [np.asarray(document, dtype=np.int64) for document in documents]
    flat = np.concatenate(pieces) if pieces else np.empty(0, np.int64)
    num_blocks = len(flat) // block_size
    return torch.from_numpy(flat[: num_blocks * block_size].copy()).view(num_blocks, block_size)
