"""The round protocol on Flower's Message API (the `flower` extra: `pip install 'comigs-hf[flower]'`).

`messages` defines what a train reply carries and checks an untrusted one before the server step
(`comigs_hf.server.aggregate_updates`) sees it.
"""

from .messages import arrays_to_shared, read_report, shared_to_arrays, update_from_reply, update_to_reply

__all__ = ["arrays_to_shared", "read_report", "shared_to_arrays", "update_from_reply", "update_to_reply"]
