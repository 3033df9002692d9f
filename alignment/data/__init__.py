"""Data for prefuse's trainers: the bundled preference data set, a locally trained tokenizer, tokenisation
with ``datasets`` and the collators of every method (nothing is downloaded)."""

from prefuse.alignment.data.bundled import DATA_FILE, load_preference_data, read_records
from prefuse.alignment.data.collators import (
    PairedCollator,
    UnpairedCollator,
    check_tokenized_data,
    collator_for,
)
from prefuse.alignment.data.packing import PackedCollator, TokenBudgetBatchSampler, pack_batch
from prefuse.alignment.data.processing import encode_example, tokenize_preference_data
from prefuse.alignment.data.tokenizer import CHAT_TEMPLATE, build_tokenizer

__all__ = [
    "CHAT_TEMPLATE",
    "DATA_FILE",
    "PackedCollator",
    "PairedCollator",
    "TokenBudgetBatchSampler",
    "UnpairedCollator",
    "build_tokenizer",
    "check_tokenized_data",
    "collator_for",
    "encode_example",
    "load_preference_data",
    "pack_batch",
    "read_records",
    "tokenize_preference_data",
]
