"""Holds `perplexity.py`, an `evaluate` metric script loaded by path (see `comigs_hf.metrics.load_perplexity`).

This file only makes the folder a package, so that packaging tools install the script with the rest of `comigs_hf`.
"""
