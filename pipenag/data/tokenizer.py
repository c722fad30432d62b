"""Tokenizers: raw UTF-8 bytes, a byte-level BPE trained on the training split, or GPT-2's.

    python -m pipenag.data.tokenizer bpe 2048

Both kinds expose `name`, `vocab_size`, `encode(str) -> list[int]`, `decode(list[int]) -> str`
and `encode_tensor(str) -> LongTensor`. The BPE tokenizer (the optional `tokenizers` package,
GPT-2 style byte-level pre-tokenization, no special tokens) is trained on the training text
only, so validation text stays unseen, and saved under the cache folder keyed by the corpus
fingerprint and the vocabulary size: the next run with the same corpus loads it. "gpt2" is
GPT-2's byte-level BPE (50257 tokens), fetched once from the Hugging Face Hub (openai-community/gpt2
tokenizer.json) into the cache; offline, download that file elsewhere and point
data.tokenizer_path at it. A tokenizer_path loads through `load_tokenizer_file` for "bpe" too.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Iterator

import torch

from pipenag import atomic
from pipenag.config import DataConfig
from pipenag.data.corpus import Corpus

_ENCODE_CHUNK_CHARS = 1 << 16  # texts are encoded in pieces cut at line ends


def cache_root(cache_dir: str = "") -> Path:
    """The cache folder: `cache_dir`, else $PIPENAG_CACHE, else ~/.cache/pipenag."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get("PIPENAG_CACHE", "")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "pipenag"


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, nothing to train, every string round-trips."""

    name = "bytes"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8", errors="surrogatepass"))

    def encode_tensor(self, text: str) -> torch.Tensor:
        data = bytearray(text.encode("utf-8", errors="surrogatepass"))
        if not data:
            return torch.zeros(0, dtype=torch.long)
        return torch.frombuffer(data, dtype=torch.uint8).long()  # (N,)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class BPETokenizer:
    """A `tokenizers.Tokenizer` (byte-level BPE) behind the same interface as ByteTokenizer.

    Args:
        tokenizer: a trained tokenizers.Tokenizer.
        kind: "bpe" or "gpt2" (the data.tokenizer it stands for); starts the name.
    """

    def __init__(self, tokenizer, kind: str = "bpe") -> None:
        self.tokenizer = tokenizer
        self.kind = kind
        self.vocab_size = tokenizer.get_vocab_size()
        # The name includes a hash of the merges, so that token caches can never mix two
        # different BPE models that share a vocabulary size.
        digest = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:8]
        self.name = f"bpe{self.vocab_size}-{digest}" if kind == "bpe" else f"{kind}-{self.vocab_size}-{digest}"

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for enc in self.tokenizer.encode_batch(list(_pieces(text))):
            ids.extend(enc.ids)
        return ids

    def encode_tensor(self, text: str) -> torch.Tensor:
        return torch.tensor(self.encode(text), dtype=torch.long)  # (N,)

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    @classmethod
    def from_file(cls, path: str | Path, kind: str = "bpe") -> "BPETokenizer":
        return cls(_tokenizers().Tokenizer.from_file(str(path)), kind)


def load_tokenizer_file(path: str | Path, kind: str = "bpe") -> BPETokenizer:
    """A tokenizer.json (Hugging Face `tokenizers` format) as a BPETokenizer.

    Args:
        path: the file (GPT-2's tokenizer.json, or one a "bpe" run saved).
        kind: "bpe" or "gpt2", recorded in the tokenizer's name.
    Raises:
        ValueError: naming the file, when it is missing or not a tokenizer.json.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"data.tokenizer_path={str(path)!r}: no such file (expected a tokenizer.json)")
    tk = _tokenizers()
    try:
        return BPETokenizer(tk.Tokenizer.from_file(str(path)), kind)
    except Exception as e:  # the Rust loader raises a bare Exception for malformed JSON
        raise ValueError(f"data.tokenizer_path={str(path)!r}: not a tokenizers tokenizer.json "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def encode_chunks(tokenizer, text: str, pieces_per_chunk: int = 64) -> Iterator[torch.Tensor]:
    """`tokenizer.encode_tensor(text)` in consecutive pieces, for texts too large to encode at once.

    The pieces are groups of the line-end cuts that BPETokenizer.encode makes anyway, so the
    concatenation of the yielded (n,) LongTensors equals encode_tensor(text) exactly.
    """
    group: list[str] = []
    for piece in _pieces(text):
        group.append(piece)
        if len(group) == pieces_per_chunk:
            yield tokenizer.encode_tensor("".join(group))
            group = []
    if group:
        yield tokenizer.encode_tensor("".join(group))


def train_bpe(text: str, vocab_size: int) -> BPETokenizer:
    """Train a byte-level BPE with `vocab_size` tokens (the 256 bytes + merges) on `text`.

    The text is fed in fixed pieces and the Rust trainer breaks count ties by token id, so the
    result depends only on the text and the vocabulary size.
    """
    tk = _tokenizers()
    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(_pieces(text), trainer=trainer, length=None)
    return BPETokenizer(tokenizer)


def build_tokenizer(cfg: DataConfig, corpus: Corpus):
    """The tokenizer named by `cfg.tokenizer`; a BPE is loaded from the cache or trained.

    Args:
        cfg: the data config (tokenizer, tokenizer_path, bpe_vocab_size, cache_dir).
        corpus: the BPE is trained on corpus.train only.
    Returns:
        A ByteTokenizer or a BPETokenizer.
    Raises:
        ValueError: "bpe" or "gpt2" without the `tokenizers` package, a bad tokenizer_path, a
            "bpe" file of another size than bpe_vocab_size, or "gpt2" offline without a file.
    """
    if cfg.tokenizer == "bytes":
        return ByteTokenizer()
    if cfg.tokenizer not in ("bpe", "gpt2"):
        raise ValueError(f"data.tokenizer={cfg.tokenizer!r}: must be \"bytes\", \"bpe\" or \"gpt2\"")
    _tokenizers()  # fail before any work when the package is missing
    if cfg.tokenizer == "gpt2":
        return _gpt2_tokenizer(cfg)
    if cfg.tokenizer_path:
        bpe = load_tokenizer_file(cfg.tokenizer_path, "bpe")
        if bpe.vocab_size != cfg.bpe_vocab_size:
            raise ValueError(f"data.tokenizer_path={cfg.tokenizer_path!r}: a vocabulary of {bpe.vocab_size} tokens, "
                             f"but data.bpe_vocab_size={cfg.bpe_vocab_size}; set one to match the other")
        return bpe
    path = cache_root(cfg.cache_dir) / "tokenizers" / f"bpe{cfg.bpe_vocab_size}-{corpus.fingerprint}.json"
    if path.is_file():
        return BPETokenizer.from_file(path)
    bpe = train_bpe(corpus.train, cfg.bpe_vocab_size)
    atomic.write_bytes(path, bpe.tokenizer.to_str().encode("utf-8"))
    return bpe


GPT2_URL = "https://huggingface.co/openai-community/gpt2/resolve/main/tokenizer.json"


def _gpt2_tokenizer(cfg: DataConfig) -> BPETokenizer:
    """GPT-2's tokenizer: data.tokenizer_path, else the cached copy, else fetched and cached."""
    if cfg.tokenizer_path:
        return load_tokenizer_file(cfg.tokenizer_path, "gpt2")
    path = cache_root(cfg.cache_dir) / "tokenizers" / "gpt2.json"
    if path.is_file():
        return load_tokenizer_file(path, "gpt2")
    try:
        tokenizer = _fetch_gpt2()
    except Exception as e:  # offline: huggingface_hub raises its own types after retrying
        raise ValueError(f'data.tokenizer="gpt2": could not fetch GPT-2\'s vocabulary ({type(e).__name__}); '
                         f"download {GPT2_URL} and set data.tokenizer_path=/path/to/tokenizer.json "
                         f"(or save it as {path})") from None
    atomic.write_bytes(path, tokenizer.to_str().encode("utf-8"))
    return BPETokenizer(tokenizer, "gpt2")


def _fetch_gpt2():
    """GPT-2's tokenizers.Tokenizer from the Hugging Face Hub (needs network access)."""
    return _tokenizers().Tokenizer.from_pretrained("openai-community/gpt2")


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ValueError('data.tokenizer="bpe" (and "gpt2") needs the `tokenizers` package: '
                         "pip install pipenag[bpe] (or pip install tokenizers), "
                         'or use data.tokenizer="bytes"') from None
    return tokenizers


def _pieces(text: str, size: int = _ENCODE_CHUNK_CHARS) -> Iterator[str]:
    """Consecutive pieces of about `size` characters that end at a line end where possible.

    Cutting right after a newline keeps nearly all pre-tokenizer words intact, and the pieces
    concatenate back to `text`, so decode(encode(text)) == text.
    """
    pos = 0
    while pos < len(text):
        end = text.find("\n", pos + size)
        end = len(text) if end < 0 else end + 1
        yield text[pos:end]
        pos = end


def main(argv: list[str]) -> None:
    from pipenag.data.corpus import load_corpus

    kind = argv[0] if argv else "bpe"
    vocab = int(argv[1]) if len(argv) > 1 else DataConfig.bpe_vocab_size
    cfg = DataConfig(tokenizer=kind, bpe_vocab_size=vocab)
    corpus = load_corpus(cfg)
    start = time.perf_counter()
    tok = build_tokenizer(cfg, corpus)
    seconds = time.perf_counter() - start
    sample = corpus.val[:2000]
    ids = tok.encode(sample)
    print(f"tokenizer={tok.name} vocab={tok.vocab_size} build={seconds:.2f}s "
          f"chars/token on val sample={len(sample) / max(1, len(ids)):.2f} "
          f"round trip={'ok' if tok.decode(ids) == sample else 'FAILED'}")


if __name__ == "__main__":
    main(sys.argv[1:])
