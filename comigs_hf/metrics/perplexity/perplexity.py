"""Perplexity from per-example negative log-likelihood sums and token counts, as an `evaluate` metric.

Unlike the Hub's `perplexity` metric, this one never runs a model: evaluation already computes the losses, so the
metric only pools them. Pooling sums before dividing weights every token equally, which a mean of per-example
perplexities would not.
"""

import math

import datasets
import evaluate

_DESCRIPTION = """
Perplexity of a causal language model, computed from losses the caller already has: each example contributes the sum
of its per-token negative log-likelihoods (natural log) and the number of tokens it was summed over. The result is
exp(total_nll / total_tokens), so every token counts equally whatever the example lengths.
"""

_KWARGS_DESCRIPTION = """
Args:
    nll_sum (`list[float]`): per example, the summed negative log-likelihood of its predicted tokens, in nats.
    num_tokens (`list[int]`): per example, how many tokens `nll_sum` covers (non-negative).
Returns:
    perplexity (`float`): exp(mean_loss); `inf` if that overflows.
    mean_loss (`float`): total nll_sum / total num_tokens, the token-level cross-entropy.
    num_tokens (`int`): total number of tokens.
Examples:
    >>> perplexity = evaluate.load("comigs_hf/metrics/perplexity")
    >>> perplexity.compute(nll_sum=[6.0, 2.0], num_tokens=[3, 1])
    {'perplexity': 7.38905609893065, 'mean_loss': 2.0, 'num_tokens': 4}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Perplexity(evaluate.Metric):
    """Perplexity pooled over tokens from per-example loss sums."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"nll_sum": datasets.Value("float64"), "num_tokens": datasets.Value("int64")}),
            reference_urls=["https://huggingface.co/docs/transformers/perplexity"],
        )

    def _compute(self, nll_sum, num_tokens):
        if len(nll_sum) == 0:
            raise ValueError("No examples were added: perplexity is undefined.")
        for index, (nll, count) in enumerate(zip(nll_sum, num_tokens)):
            if math.isnan(nll):
                raise ValueError(f"nll_sum of example {index} is NaN.")
            if count < 0:
                raise ValueError(f"num_tokens of example {index} is negative: {count}.")
        total_tokens = int(sum(num_tokens))
        if total_tokens == 0:
            raise ValueError("The examples hold zero tokens in total: perplexity is undefined.")
        # fsum: thousands of float64 partial sums would otherwise lose digits to cancellation
        mean_loss = math.fsum(nll_sum) / total_tokens
        try:
            perplexity = math.exp(mean_loss)
        except OverflowError:
            perplexity = math.inf
        return {"perplexity": perplexity, "mean_loss": mean_loss, "num_tokens": total_tokens}
