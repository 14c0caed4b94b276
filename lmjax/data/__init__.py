"""Data: corpus (built-in or user files) -> sentencepiece tokenizer -> packed grain batches.

`build_data(cfg)` is the one entry point of the trainer; see `pipeline.py` for the batch layout.
"""

from lmjax.data.corpus import Corpus, DataError, Document, load_corpus
from lmjax.data.pipeline import Data, PackedSplit, TrainIterator, build_data
from lmjax.data.tokenizer import Tokenizer, TokenizerError, get_tokenizer, load_tokenizer, tokenizer_train_command, train_tokenizer

__all__ = [
    "Corpus",
    "Data",
    "DataError",
    "Document",
    "PackedSplit",
    "Tokenizer",
    "TokenizerError",
    "TrainIterator",
    "build_data",
    "get_tokenizer",
    "load_corpus",
    "load_tokenizer",
    "tokenizer_train_command",
    "train_tokenizer",
]
