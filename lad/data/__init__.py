"""Training data: read rows, encode them as prompt/answer token ids, batch them."""

from .collate import batch_indices, collate
from .formats import EncodeStats, Example, encode_rows, find_token, prompt_ids
from .sources import DataError, Rows, load_rows

__all__ = [
    "DataError",
    "EncodeStats",
    "Example",
    "Rows",
    "batch_indices",
    "collate",
    "encode_rows",
    "find_token",
    "load_rows",
    "prompt_ids",
]
