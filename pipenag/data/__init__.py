"""Data: corpora, tokenizers, memory-mapped token shards and deterministic batches.

    python -m pipenag.data.batches --data.source=builtin --data.tokenizer=bytes
    pipenag data prepare --config configs/tiny.toml --out data/tiny   # then --data.source=shards:data/tiny

The names below are imported on first use (PEP 562), so that `python -m pipenag.data.<module>`
runs a module that the package has not imported yet.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "BatchStream": "batches",
    "DataBundle": "batches",
    "build_data": "batches",
    "fixed_batches": "batches",
    "tokenize_corpus": "batches",
    "ShardSet": "shards",
    "TokenShards": "shards",
    "open_shards": "shards",
    "prepare_shards": "shards",
    "write_shards": "shards",
    "Corpus": "corpus",
    "corpus_from_hf_splits": "corpus",
    "load_corpus": "corpus",
    "split_documents": "corpus",
    "BPETokenizer": "tokenizer",
    "ByteTokenizer": "tokenizer",
    "build_tokenizer": "tokenizer",
    "cache_root": "tokenizer",
    "encode_chunks": "tokenizer",
    "load_tokenizer_file": "tokenizer",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from pipenag.data.batches import BatchStream, DataBundle, build_data, fixed_batches, tokenize_corpus
    from pipenag.data.corpus import Corpus, corpus_from_hf_splits, load_corpus, split_documents
    from pipenag.data.shards import ShardSet, TokenShards, open_shards, prepare_shards, write_shards
    from pipenag.data.tokenizer import (BPETokenizer, ByteTokenizer, build_tokenizer, cache_root, encode_chunks,
                                        load_tokenizer_file)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pipenag.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"pipenag.data.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
