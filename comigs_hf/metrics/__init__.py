"""`evaluate` metric modules shipped inside the package, since Hub metric scripts cannot be fetched offline."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import evaluate

__all__ = ["PERPLEXITY_PATH", "load_perplexity"]

# the script itself, not its folder: `evaluate.load` then takes the local-file branch and never consults the Hub
PERPLEXITY_PATH = Path(__file__).resolve().parent / "perplexity" / "perplexity.py"


def load_perplexity(**kwargs: Any) -> evaluate.EvaluationModule:
    """Loads the shipped perplexity metric, which turns summed negative log-likelihoods and token counts into
    perplexity without running a model.

    Works offline (`HF_HUB_OFFLINE=1`, `HF_EVALUATE_OFFLINE=1`): the script is read from the installed package and
    copied into `evaluate`'s module cache, nothing is downloaded.

    Args:
        kwargs (`dict[str, Any]`, *optional*):
            Passed to `evaluate.load`, e.g. `experiment_id`, `keep_in_memory`, `num_process` and `process_id`.

    Returns:
        `evaluate.EvaluationModule`: call `.compute(nll_sum=[...], num_tokens=[...])` or `.add_batch(...)`.

    Example:

    ```python
    >>> from comigs_hf.metrics import load_perplexity
    >>> perplexity = load_perplexity(keep_in_memory=True)
    >>> perplexity.compute(nll_sum=[6.0, 2.0], num_tokens=[3, 1])["mean_loss"]
    2.0

    ```
    """
    # imported here: `evaluate` pulls in `datasets`, which callers that only need the path should not pay for
    import evaluate

    return evaluate.load(str(PERPLEXITY_PATH), **kwargs)
