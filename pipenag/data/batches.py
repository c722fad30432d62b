"""Token streams and deterministic, resumable batches of training windows.

    python -m pipenag.data.batches --data.tokenizer=bytes

Batch i of a BatchStream is a function of (seed, i) alone: a fresh generator seeded with
seed * 1_000_003 + i picks its window starts. Resuming therefore only needs the number of
batches already drawn (`state_dict()["position"]`), and any engine (the single-process
simulator or one process per stage) can ask for microbatch j directly with `get(j)`. The ids
are a tensor in memory or, for data.source="shards:DIR", memory-mapped shards (TokenShards):
the same tokens give the same batches either way.
"""

from __future__ import annotations

import io
import sys
from dataclasses import dataclass
from typing import Optional

import torch

from pipenag.config import DataConfig
from pipenag.data.corpus import Corpus, load_corpus
from pipenag import atomic
from pipenag.data.shards import SOURCE_PREFIX, TokenShards, open_shards
from pipenag.data.tokenizer import ByteTokenizer, build_tokenizer, cache_root

_SEED_STRIDE = 1_000_003  # batch i of seed s uses generator seed s * stride + i
_SEED_MOD = 1 << 63  # torch generator seeds must fit in 64 bits


def tokenize_corpus(corpus: Corpus, tokenizer,
                    cache_dir: Optional[str] = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Encode both splits as 1-D LongTensors; BPE results are cached on disk.

    Args:
        corpus: the Corpus to encode.
        tokenizer: a ByteTokenizer or BPETokenizer (anything with name and encode_tensor).
        cache_dir: cache folder ("" = $PIPENAG_CACHE or ~/.cache/pipenag; None = no cache).
            The file is keyed by corpus.fingerprint and tokenizer.name. Bytes are not cached:
            encoding them is faster than reading a file.
    Returns:
        (train_ids, val_ids), each (N,) int64.
    """
    use_cache = cache_dir is not None and not isinstance(tokenizer, ByteTokenizer)
    path = None
    if use_cache:
        path = cache_root(cache_dir) / "tokens" / f"{corpus.fingerprint}-{tokenizer.name}.pt"
        if path.is_file():
            saved = torch.load(path, map_location="cpu", weights_only=True)
            return saved["train"].long(), saved["val"].long()
    train_ids = tokenizer.encode_tensor(corpus.train)
    val_ids = tokenizer.encode_tensor(corpus.val)
    if path is not None:
        buf = io.BytesIO()
        # int32 halves the file; every vocabulary here is far below 2**31.
        torch.save({"train": train_ids.to(torch.int32), "val": val_ids.to(torch.int32)}, buf)
        atomic.write_bytes(path, buf.getvalue())
    return train_ids, val_ids


def _check_ids(ids: torch.Tensor | TokenShards, block_size: int, batch_size: int) -> None:
    if not isinstance(ids, (torch.Tensor, TokenShards)) or ids.dim() != 1:
        raise ValueError(f"ids must be a 1-D tensor of token ids, got {type(ids).__name__} "
                         f"of shape {tuple(getattr(ids, 'shape', ()))}")
    if block_size < 1:
        raise ValueError(f"block_size={block_size}: must be >= 1")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    if ids.numel() < block_size + 1:
        raise ValueError(f"the token stream has {ids.numel()} tokens, fewer than block_size + 1 = "
                         f"{block_size + 1}; use a larger corpus (data.max_chars) or a smaller "
                         "model.block_size")


class BatchStream:
    """Random windows of `block_size` + 1 tokens, `batch_size` per batch, reproducible by index.

    Args:
        ids: (N,) token ids, N >= block_size + 1: a tensor, or TokenShards (read by window).
        block_size: tokens per training sequence T.
        batch_size: sequences per batch B.
        seed: the stream's seed.
    """

    def __init__(self, ids: torch.Tensor | TokenShards, block_size: int, batch_size: int, seed: int) -> None:
        _check_ids(ids, block_size, batch_size)
        self.ids = ids if isinstance(ids, TokenShards) else ids.long()
        self.block_size = block_size
        self.batch_size = batch_size
        self.seed = int(seed)
        self.position = 0
        self._offsets = torch.arange(block_size + 1)  # (T+1,)

    def get(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch number `index` (0-based) without moving the stream: (x, y), each (B, T)."""
        if index < 0:
            raise ValueError(f"index={index}: must be >= 0")
        gen = torch.Generator()
        gen.manual_seed((self.seed * _SEED_STRIDE + index) % _SEED_MOD)
        # Start s is valid when s + block_size <= N - 1, i.e. s < N - block_size.
        starts = torch.randint(0, self.ids.numel() - self.block_size, (self.batch_size,), generator=gen)
        if isinstance(self.ids, TokenShards):
            windows = self.ids.windows(starts, self.block_size + 1)  # (B, T+1), only these tokens read
        else:
            windows = self.ids[starts[:, None] + self._offsets]  # (B, T+1)
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()  # (B, T), (B, T)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch: (x, y), each (B, T), y[:, t] the token after x[:, t]."""
        batch = self.get(self.position)
        self.position += 1
        return batch

    __next__ = next

    def __iter__(self) -> "BatchStream":
        return self

    def state_dict(self) -> dict:
        return {"seed": self.seed, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        position = int(state["position"])
        if position < 0:
            raise ValueError(f"position={position}: must be >= 0")
        self.seed = int(state["seed"])
        self.position = position


def fixed_batches(ids: torch.Tensor, block_size: int, batch_size: int, num_batches: int,
                  seed: int = 1234) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same `num_batches` (x, y) batches on every call: a validation set of windows.

    Args:
        ids: (N,) token ids, N >= block_size + 1.
        block_size, batch_size: shape of each batch, (batch_size, block_size).
        num_batches: how many batches.
        seed: the windows' seed (independent of the training stream's).
    Returns:
        A list of (x, y) pairs.
    """
    if num_batches < 1:
        raise ValueError(f"num_batches={num_batches}: must be >= 1")
    stream = BatchStream(ids, block_size, batch_size, seed)
    return [stream.get(i) for i in range(num_batches)]


@dataclass
class DataBundle:
    corpus: Corpus
    """The loaded and split text (for a shards: source, the original corpus's fingerprint and
    document counts, with empty texts: the tokens are in the shards)."""
    tokenizer: object
    """A ByteTokenizer or BPETokenizer."""
    train: BatchStream
    """Training batches of shape (data.microbatch_size, block_size)."""
    train_ids: torch.Tensor | TokenShards
    """(N,) training tokens (TokenShards, memory-mapped, for a shards: source)."""
    val_ids: torch.Tensor | TokenShards
    """(N,) validation tokens; use fixed_batches for evaluation."""
    vocab_size: int
    """The tokenizer's vocabulary size."""
    fingerprint: str
    """The corpus fingerprint (record it with the run)."""


def build_data(cfg: DataConfig, block_size: int, seed: int) -> DataBundle:
    """Corpus, tokenizer, token ids and the training stream, from the data config.

    Args:
        cfg: the data config.
        block_size: the model's context length.
        seed: the training stream's seed.
    Returns:
        A DataBundle.
    Raises:
        ValueError: a bad source, a missing optional package, a split shorter than
            block_size + 1 tokens, or shards that fail open_shards' checks.
    """
    if cfg.source.startswith(SOURCE_PREFIX):
        shards = open_shards(cfg)
        corpus, tokenizer, train_ids, val_ids = shards.corpus(), shards.tokenizer, shards.train, shards.val
    else:
        corpus = load_corpus(cfg)
        tokenizer = build_tokenizer(cfg, corpus)
        train_ids, val_ids = tokenize_corpus(corpus, tokenizer, cfg.cache_dir)
    if val_ids.numel() < block_size + 1:
        raise ValueError(f"the validation split has {val_ids.numel()} tokens, fewer than "
                         f"block_size + 1 = {block_size + 1}; raise data.max_chars or "
                         f"data.val_fraction={cfg.val_fraction}")
    stream = BatchStream(train_ids, block_size, cfg.microbatch_size, seed)
    return DataBundle(corpus=corpus, tokenizer=tokenizer, train=stream, train_ids=train_ids,
                      val_ids=val_ids, vocab_size=tokenizer.vocab_size, fingerprint=corpus.fingerprint)


def main(argv: list[str]) -> None:
    from pipenag.config import load_config

    cfg = load_config(overrides=argv)
    data = build_data(cfg.data, cfg.model.block_size, cfg.train.seed)
    x, y = data.train.next()
    print(f"corpus {data.fingerprint}: train {data.train_ids.numel():,} tokens, "
          f"val {data.val_ids.numel():,} tokens, vocab {data.vocab_size} ({data.tokenizer.name})")
    print(f"batch x {tuple(x.shape)} y {tuple(y.shape)}; first row:")
    print(repr(data.tokenizer.decode(x[0].tolist())))


if __name__ == "__main__":
    main(sys.argv[1:])
