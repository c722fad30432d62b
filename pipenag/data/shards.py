"""Memory-mapped token shards: tokenize a corpus once, then train from the files without loading them.

    pipenag data prepare --config configs/tiny.toml --out data/tiny
    pipenag train --config configs/tiny.toml --data.source=shards:data/tiny

`pipenag data prepare` writes, into DIR:

    train-00000.bin ...  val-00000.bin ...   at most --max-tokens tokens each
    tokenizer.json                           the BPE or GPT-2 tokenizer (not for "bytes")
    manifest.json                            written last: a folder without it is not a shard set

A shard is a 64-byte header (magic b"PIPENAGT", format version, bytes per token, token count,
corpus fingerprint, split, shard index, a hash of the tokenizer's name) followed by the tokens, little-endian uint16 when the
vocabulary has fewer than 65536 tokens, else uint32. The manifest records the tokenizer (kind,
name, vocabulary), the dtype, each shard's file name, token count and sha256, the corpus
fingerprint and the format version. Every file is written atomically (pipenag.atomic).

Opening (`open_shards`, called by build_data for data.source="shards:DIR", before any
training work) checks cheaply, always: the manifest is there and of a known version, its
tokenizer is the config's, every shard's size is its header plus its token count, and every
header names this manifest's fingerprint, split and index. The sha256 of every shard is
computed by `prepare_shards` and checked on open only with data.verify_shards=true (it reads every
byte). Each failure is one ValueError naming the file. The shards are mapped with
torch.from_file (private, read-only use), so only the windows a batch touches are read.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from pipenag import atomic
from pipenag.config import DataConfig
from pipenag.data.corpus import Corpus, load_corpus
from pipenag.data.tokenizer import ByteTokenizer, build_tokenizer, encode_chunks, load_tokenizer_file

FORMAT_VERSION = 1
DEFAULT_MAX_TOKENS = 1 << 26  # 128 MiB per uint16 shard: few files, each small enough to copy
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
SPLITS = ("train", "val")
SOURCE_PREFIX = "shards:"

_MAGIC = b"PIPENAGT"
# magic, version, itemsize, tokens, corpus fingerprint, split, index, sha256(tokenizer name)[:8]
_HEADER = struct.Struct("<8sIIQ16s8sI8s")
_HEADER_BYTES = 64  # the header padded, so the tokens start aligned for any dtype
_DTYPES = {"uint16": torch.uint16, "uint32": torch.uint32}


def token_dtype(vocab_size: int) -> str:
    """"uint16" when every id fits in 16 bits (vocab_size < 65536), else "uint32"."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size={vocab_size}: must be >= 1")
    return "uint16" if vocab_size < (1 << 16) else "uint32"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.bin"


class TokenShards:
    """One split's token stream: the concatenation of its memory-mapped shards.

    It offers what the batch code needs of a 1-D tensor of ids: `numel()`, `len()`, and
    `windows(starts, length)`, which reads only the requested windows (a window may cross a
    shard boundary). `reshape(-1)` and `long()` give the whole split as one tensor; they read
    every shard (model.unigram_head's token counts use them).

    Args:
        parts: 1-D integer tensors (memory-mapped shards), in order.
    """

    def __init__(self, parts: list[torch.Tensor]) -> None:
        self.parts = [p for p in parts if p.numel()]
        self._ends = []  # cumulative token counts: shard i holds [ends[i-1], ends[i])
        total = 0
        for p in self.parts:
            total += p.numel()
            self._ends.append(total)
        self._numel = total

    def numel(self) -> int:
        return self._numel

    def __len__(self) -> int:
        return self._numel

    def dim(self) -> int:
        return 1

    def windows(self, starts: torch.Tensor, length: int) -> torch.Tensor:
        """Rows ids[s : s + length] for each s in `starts`: (len(starts), length) int64."""
        return torch.stack([self._window(int(s), length) for s in starts.tolist()])

    def _window(self, start: int, length: int) -> torch.Tensor:
        if start < 0 or start + length > self._numel:
            raise IndexError(f"window [{start}, {start + length}) outside the {self._numel} tokens")
        pieces = []
        i = bisect.bisect_right(self._ends, start)
        pos, stop = start, start + length
        while pos < stop:
            begin = self._ends[i] - self.parts[i].numel()
            take = min(stop, self._ends[i]) - pos
            pieces.append(self.parts[i][pos - begin:pos - begin + take].long())
            pos += take
            i += 1
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def reshape(self, *shape) -> torch.Tensor:
        if shape not in ((-1,), ((-1,),)):
            raise ValueError(f"TokenShards.reshape{shape}: only reshape(-1) (the whole split) is supported")
        return torch.cat(self.parts) if self.parts else torch.zeros(0, dtype=torch.long)

    def long(self) -> torch.Tensor:
        return self.reshape(-1).long()


@dataclass
class ShardSet:
    """An opened shard folder."""

    directory: Path
    """The folder."""
    manifest: dict
    """manifest.json as written by prepare."""
    tokenizer: object
    """The ByteTokenizer or BPETokenizer the shards were encoded with."""
    train: TokenShards
    """The training tokens."""
    val: TokenShards
    """The validation tokens."""

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    def corpus(self) -> Corpus:
        """A Corpus that names the original corpus (its fingerprint, document counts) without its text."""
        return Corpus(train="", val="", fingerprint=self.fingerprint,
                      num_docs_train=int(self.manifest.get("num_docs_train", 0)),
                      num_docs_val=int(self.manifest.get("num_docs_val", 0)),
                      source=f"{SOURCE_PREFIX}{self.directory}")


# ----------------------------------------------------------------------------- writing

def prepare_shards(cfg: DataConfig, out_dir: str | Path, *, max_tokens: int = DEFAULT_MAX_TOKENS,
            log: Optional[Callable[[str], None]] = None) -> dict:
    """Tokenize the corpus of `cfg` once into shards under `out_dir` (see the module docstring).

    Args:
        cfg: the data config: source (builtin, a path or hf:NAME), tokenizer, max_chars, ...
        out_dir: the shard folder (created; an older set there is replaced).
        max_tokens: tokens per shard at most.
        log: called with progress lines (None = silent).
    Returns:
        The manifest.
    Raises:
        ValueError: a shards: source, max_tokens < 1, or anything load_corpus and
            build_tokenizer reject (before any file is written).
    """
    if cfg.source.startswith(SOURCE_PREFIX):
        raise ValueError(f"data.source={cfg.source!r}: already shards; prepare needs a corpus "
                         "(builtin, a path or hf:NAME)")
    if max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens}: must be >= 1")
    _check_byteorder()
    log = log or (lambda line: None)
    start = time.perf_counter()
    corpus = load_corpus(cfg)
    tokenizer = build_tokenizer(cfg, corpus)
    log(f"corpus {corpus.source} ({corpus.num_chars:,} chars, fingerprint {corpus.fingerprint}), "
        f"tokenizer {tokenizer.name} (vocab {tokenizer.vocab_size}), {time.perf_counter() - start:.1f}s")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Until the new manifest is written last, the folder must not pass for a complete set.
    (out / MANIFEST).unlink(missing_ok=True)
    texts = {"train": corpus.train, "val": corpus.val}
    chunks = {split: _logged(encode_chunks(tokenizer, texts[split]), split, len(texts[split]), log)
              for split in SPLITS}
    tok_meta = {"kind": "bytes" if isinstance(tokenizer, ByteTokenizer) else tokenizer.kind,
                "name": tokenizer.name, "vocab_size": tokenizer.vocab_size, "file": None, "sha256": None}
    if not isinstance(tokenizer, ByteTokenizer):
        tok_meta["file"] = TOKENIZER_FILE
        tok_meta["sha256"] = atomic.write_text(out / TOKENIZER_FILE, tokenizer.tokenizer.to_str())
    extra = {"source": corpus.source, "max_chars": cfg.max_chars, "val_fraction": cfg.val_fraction,
             "num_docs_train": corpus.num_docs_train, "num_docs_val": corpus.num_docs_val}
    manifest = write_shards(out, chunks, vocab_size=tokenizer.vocab_size, tokenizer=tok_meta,
                            fingerprint=corpus.fingerprint, max_tokens=max_tokens, extra=extra, log=log)
    log(f"wrote {out / MANIFEST}: train {manifest['splits']['train']['num_tokens']:,} tokens in "
        f"{len(manifest['splits']['train']['shards'])} shard(s), val {manifest['splits']['val']['num_tokens']:,} "
        f"tokens, {manifest['dtype']}, {time.perf_counter() - start:.1f}s")
    return manifest


def write_shards(out_dir: str | Path, splits: dict[str, Iterable[torch.Tensor]], *, vocab_size: int,
                 tokenizer: dict, fingerprint: str, max_tokens: int = DEFAULT_MAX_TOKENS,
                 extra: Optional[dict] = None, log: Optional[Callable[[str], None]] = None) -> dict:
    """Write token chunks as shards plus the manifest (last); remove older shards it does not list.

    Args:
        out_dir: the folder.
        splits: "train" and "val" -> 1-D integer tensors whose concatenation is the split.
        vocab_size: every id must be below it; picks the dtype.
        tokenizer: the manifest's tokenizer entry (kind, name, vocab_size, file, sha256).
        fingerprint: the corpus fingerprint (16 hex digits), stamped into every header.
        max_tokens: tokens per shard at most.
        extra: more manifest fields (source, document counts).
        log: progress lines.
    Returns:
        The manifest.
    """
    _check_byteorder()
    if sorted(splits) != sorted(SPLITS):
        raise ValueError(f"splits {sorted(splits)}: expected {list(SPLITS)}")
    if len(fingerprint.encode("ascii")) != 16:
        raise ValueError(f"fingerprint={fingerprint!r}: expected 16 hex digits")
    log = log or (lambda line: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    dtype = token_dtype(vocab_size)
    manifest = {"format": FORMAT_VERSION, "tokenizer": tokenizer, "vocab_size": vocab_size, "dtype": dtype,
                "byteorder": "little", "header_bytes": _HEADER_BYTES, "max_tokens_per_shard": max_tokens,
                "fingerprint": fingerprint, **(extra or {}), "splits": {}}
    for split in SPLITS:
        entries = []
        pending: list[torch.Tensor] = []
        num_pending = 0
        for chunk in splits[split]:
            if chunk.numel() and (int(chunk.min()) < 0 or int(chunk.max()) >= vocab_size):
                raise ValueError(f"{split}: token ids in [{int(chunk.min())}, {int(chunk.max())}] do not "
                                 f"fit a vocabulary of {vocab_size}")
            pending.append(chunk.to(_DTYPES[dtype]))
            num_pending += chunk.numel()
            while num_pending >= max_tokens:
                tokens = torch.cat(pending)
                entries.append(_write_shard(out, split, len(entries), tokens[:max_tokens], fingerprint,
                                            tokenizer["name"], log))
                pending, num_pending = [tokens[max_tokens:]], tokens.numel() - max_tokens
        if num_pending or not entries:
            tokens = torch.cat(pending) if pending else torch.zeros(0, dtype=_DTYPES[dtype])
            entries.append(_write_shard(out, split, len(entries), tokens, fingerprint, tokenizer["name"], log))
        manifest["splits"][split] = {"num_tokens": sum(e["num_tokens"] for e in entries), "shards": entries}
    atomic.write_text(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    listed = {e["file"] for s in manifest["splits"].values() for e in s["shards"]}
    for split in SPLITS:
        for old in out.glob(f"{split}-*.bin"):
            if old.name not in listed:
                old.unlink()
    return manifest


def _name_hash(tokenizer_name: str) -> bytes:
    return hashlib.sha256(tokenizer_name.encode("utf-8")).digest()[:8]


def _write_shard(out: Path, split: str, index: int, tokens: torch.Tensor, fingerprint: str,
                 tokenizer_name: str, log) -> dict:
    tokens = tokens.contiguous().clone()  # its own storage: the bytes below are exactly these tokens
    header = _HEADER.pack(_MAGIC, FORMAT_VERSION, tokens.element_size(), tokens.numel(), fingerprint.encode("ascii"),
                          split.encode("ascii"), index, _name_hash(tokenizer_name)).ljust(_HEADER_BYTES, b"\0")
    name = shard_name(split, index)
    digest = atomic.write_bytes(out / name, header + bytes(tokens.untyped_storage()))
    log(f"  {name}: {tokens.numel():,} tokens")
    return {"file": name, "num_tokens": tokens.numel(), "sha256": digest}


def _logged(chunks: Iterable[torch.Tensor], split: str, num_chars: int, log,
            every_s: float = 10.0) -> Iterable[torch.Tensor]:
    """Pass `chunks` through, with a progress line every `every_s` seconds."""
    start = last = time.perf_counter()
    done = 0
    for chunk in chunks:
        done += chunk.numel()
        now = time.perf_counter()
        if now - last >= every_s:
            log(f"  {split}: {done:,} tokens so far ({num_chars:,} chars in the split), {now - start:.0f}s")
            last = now
        yield chunk


# ----------------------------------------------------------------------------- reading

def open_shards(cfg: DataConfig, directory: str | Path | None = None, *,
                verify: Optional[bool] = None) -> ShardSet:
    """Open a shard folder after the checks of the module docstring; nothing is loaded.

    Args:
        cfg: the data config: tokenizer, bpe_vocab_size, tokenizer_path must match the shards.
        directory: the folder (default: cfg.source without its "shards:" prefix).
        verify: also check every shard's sha256 (default: cfg.verify_shards).
    Returns:
        A ShardSet.
    Raises:
        ValueError: naming the file, for a missing manifest or shard, an unknown format
            version, another tokenizer or vocabulary than the config's, a truncated (or
            padded) shard, a header of another corpus, split or index, or a sha256 mismatch.
    """
    if directory is None:
        if not cfg.source.startswith(SOURCE_PREFIX):
            raise ValueError(f"data.source={cfg.source!r}: expected {SOURCE_PREFIX}DIR")
        directory = cfg.source[len(SOURCE_PREFIX):]
    verify = cfg.verify_shards if verify is None else verify
    folder = Path(directory).expanduser()
    manifest = load_manifest(folder)
    tokenizer = _check_tokenizer(cfg, folder, manifest)
    splits = {split: open_split(folder, manifest, split, verify=verify) for split in SPLITS}
    return ShardSet(directory=folder, manifest=manifest, tokenizer=tokenizer, train=splits["train"],
                    val=splits["val"])


def load_manifest(directory: str | Path) -> dict:
    """The manifest of a shard folder, checked for presence, JSON and the format version.

    Raises:
        ValueError: naming the file, for a missing manifest, bad JSON, an unknown format version
            or a dtype that does not fit the vocabulary.
    """
    _check_byteorder()
    folder = Path(directory).expanduser()
    path = folder / MANIFEST
    if not path.is_file():
        why = "no such folder" if not folder.is_dir() else "not a complete shard set"
        raise ValueError(f"{str(path)!r}: no shard manifest ({why}); write one with "
                         f"pipenag data prepare --out {folder}")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(path)!r}: not a JSON shard manifest ({e})") from None
    version = manifest.get("format") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise ValueError(f"{str(path)!r}: unknown shard format version {version!r} (this pipenag reads "
                         f"version {FORMAT_VERSION}); run pipenag data prepare again")
    missing = [k for k in ("tokenizer", "vocab_size", "dtype", "fingerprint", "splits") if k not in manifest]
    if missing:
        raise ValueError(f"{str(path)!r}: not a complete shard manifest (no {', '.join(missing)})")
    dtype = manifest["dtype"]
    if dtype not in _DTYPES or dtype != token_dtype(manifest["vocab_size"]):
        raise ValueError(f"{str(path)!r}: dtype {dtype!r} does not fit vocab_size {manifest['vocab_size']}")
    return manifest


def open_split(directory: str | Path, manifest: dict, split: str, *, verify: bool = False) -> TokenShards:
    """One split's shards, size- and header-checked (and sha256-checked with `verify`), mapped.

    Raises:
        ValueError: naming the file, for a missing, truncated or foreign shard.
    """
    if split not in manifest["splits"]:
        raise ValueError(f"split={split!r}: the manifest has {sorted(manifest['splits'])}")
    folder = Path(directory).expanduser()
    return TokenShards([_open_shard(folder, split, i, entry, manifest, verify)
                        for i, entry in enumerate(manifest["splits"][split]["shards"])])


def _check_tokenizer(cfg: DataConfig, folder: Path, manifest: dict):
    """The shards' tokenizer, after checking that it is the one the config asks for."""
    entry = manifest["tokenizer"]
    kind, name, vocab = entry["kind"], entry["name"], int(entry["vocab_size"])
    where = str(folder / MANIFEST)
    if kind != cfg.tokenizer:
        raise ValueError(f"{where!r}: shards of tokenizer {kind!r} ({name}), but data.tokenizer="
                         f"{cfg.tokenizer!r}; set --data.tokenizer={kind} or prepare them again")
    if kind == "bpe" and vocab != cfg.bpe_vocab_size:
        raise ValueError(f"{where!r}: shards of a {vocab}-token BPE, but data.bpe_vocab_size="
                         f"{cfg.bpe_vocab_size}; set --data.bpe_vocab_size={vocab} or prepare them again")
    if vocab != int(manifest["vocab_size"]):
        raise ValueError(f"{where!r}: tokenizer vocabulary {vocab} != vocab_size {manifest['vocab_size']}")
    if kind == "bytes":
        if vocab != ByteTokenizer.vocab_size:
            raise ValueError(f"{where!r}: a bytes tokenizer with vocabulary {vocab} (expected 256)")
        return ByteTokenizer()
    file = folder / entry["file"]
    if not file.is_file():
        raise ValueError(f"{str(file)!r}: the shards' tokenizer is missing")
    if atomic.sha256_file(file) != entry["sha256"]:
        raise ValueError(f"{str(file)!r}: sha256 differs from the manifest's (a foreign tokenizer file)")
    tokenizer = load_tokenizer_file(file, kind)
    if tokenizer.name != name:
        raise ValueError(f"{str(file)!r}: tokenizer {tokenizer.name}, but the manifest says {name}")
    if cfg.tokenizer_path:
        wanted = load_tokenizer_file(cfg.tokenizer_path, kind)
        if wanted.name != name:
            raise ValueError(f"{where!r}: shards of tokenizer {name}, but data.tokenizer_path="
                             f"{cfg.tokenizer_path!r} is {wanted.name}; prepare them again")
    return tokenizer


def _open_shard(folder: Path, split: str, index: int, entry: dict, manifest: dict,
                verify: bool) -> torch.Tensor:
    path = folder / entry["file"]
    dtype = _DTYPES[manifest["dtype"]]
    itemsize = torch.empty(0, dtype=dtype).element_size()
    num_tokens = int(entry["num_tokens"])
    expected = _HEADER_BYTES + num_tokens * itemsize
    if not path.is_file():
        raise ValueError(f"{str(path)!r}: shard missing (listed in {MANIFEST})")
    size = path.stat().st_size
    if size != expected:
        raise ValueError(f"{str(path)!r}: {size} bytes, but {MANIFEST} says {num_tokens} tokens "
                         f"({expected} bytes): a truncated or foreign shard; run pipenag data prepare again")
    with open(path, "rb") as f:
        head = f.read(_HEADER.size)
    magic, version, hdr_itemsize, hdr_tokens, hdr_fp, hdr_split, hdr_index, hdr_tok = _HEADER.unpack(head)
    got = (magic, version, hdr_itemsize, hdr_tokens, hdr_fp.decode("ascii", "replace"),
           hdr_split.rstrip(b"\0").decode("ascii", "replace"), hdr_index, hdr_tok)
    want = (_MAGIC, FORMAT_VERSION, itemsize, num_tokens, manifest["fingerprint"], split, index,
            _name_hash(manifest["tokenizer"]["name"]))
    if got != want:
        what = "tokenizer" if got[:7] == want[:7] else f"corpus {got[4]!r} {got[5]!r} #{got[6]}"
        raise ValueError(f"{str(path)!r}: a foreign shard (its header says {what}, the manifest wants corpus "
                         f"{want[4]!r} {want[5]!r} #{want[6]} of tokenizer {manifest['tokenizer']['name']})")
    if verify and atomic.sha256_file(path) != entry["sha256"]:
        raise ValueError(f"{str(path)!r}: sha256 differs from {MANIFEST}'s: a corrupted or foreign shard")
    raw = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)  # mapped, not read
    return raw[_HEADER_BYTES:].view(dtype)  # (num_tokens,)


def _check_byteorder() -> None:
    if sys.byteorder != "little":
        raise ValueError(f"token shards are little-endian; this machine is {sys.byteorder}-endian")


# ----------------------------------------------------------------------------- CLI

def prepare_main(cfg, out_dir: str, max_tokens: int = DEFAULT_MAX_TOKENS) -> int:
    """`pipenag data prepare`: shards of cfg.data under `out_dir`, progress lines when run.progress."""
    log = (lambda line: print(f"data prepare: {line}", flush=True)) if cfg.run.progress else None
    prepare_shards(cfg.data, out_dir, max_tokens=max_tokens, log=log)
    return 0
