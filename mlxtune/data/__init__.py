"""The data path: file → records (`formats`) → rendered text + supervision mask (`template`) → batches (`batching`)."""

from mlxtune.data.formats import Record, find_splits, read_records
from mlxtune.data.template import FALLBACK_CHAT_TEMPLATE, TokenizedExample, tokenize_records
from mlxtune.data.dataset import Datasets, load_datasets

__all__ = [
    "Record",
    "find_splits",
    "read_records",
    "FALLBACK_CHAT_TEMPLATE",
    "TokenizedExample",
    "tokenize_records",
    "Datasets",
    "load_datasets",
]
