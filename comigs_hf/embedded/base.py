"""The embedded base: a byte-level BPE tokenizer and a small GPT-2 pretrained on the standard-library corpus, built
once and cached."""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import re
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from filelock import FileLock
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm.auto import tqdm
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from .corpus import build_pretraining_corpus

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
CACHE_NAME = "embedded-base-v1"
# what saved models and exported adapters name the embedded base by (not a Hub repo: the package builds it)
EMBEDDED_BASE_NAME = "comigs_hf/embedded-base"
_EMBEDDED_NAME_PATTERN = re.compile(r"comigs_hf/embedded-base(?:-(\d{1,6})-steps)?")
# the most pretraining steps a checkpoint's name may ask this machine to run (about 10 hours on 2 CPU cores)
MAX_EMBEDDED_BASE_STEPS = 100_000
BUILD_INFO_NAME = "build_info.json"


def default_cache_root() -> Path:
    """Return the root of comigs_hf's caches: `$COMIGS_HF_CACHE` if set, else `~/.cache/comigs_hf`."""
    return Path(os.environ.get("COMIGS_HF_CACHE") or Path.home() / ".cache" / "comigs_hf").expanduser()


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


def embedded_base_name(max_steps: int = EmbeddedBaseSettings.max_steps) -> str:
    """The name saved models give the embedded base pretrained for `max_steps` steps (the default's: plain
    `comigs_hf/embedded-base`), so a checkpoint names the base it was trained on."""
    return (
        EMBEDDED_BASE_NAME
        if max_steps == EmbeddedBaseSettings.max_steps
        else f"{EMBEDDED_BASE_NAME}-{max_steps}-steps"
    )


def resolve_embedded_base(name: str) -> str | None:
    """The local directory of the embedded base `name` names (built and cached on first use), or `None` when `name`
    is not an embedded base's name."""
    match = _EMBEDDED_NAME_PATTERN.fullmatch(name)
    if match is None:
        return None
    steps = int(match.group(1)) if match.group(1) else EmbeddedBaseSettings.max_steps
    if not 1 <= steps <= MAX_EMBEDDED_BASE_STEPS:
        raise ValueError(
            f"{name!r} asks for {steps} pretraining steps; the embedded base takes 1 to {MAX_EMBEDDED_BASE_STEPS}."
        )
    return str(build_embedded_base(max_steps=steps))


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
