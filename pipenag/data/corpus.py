"""Text corpora with a deterministic train/validation split.

    python -m pipenag.data.corpus builtin 4000000

A corpus is a list of named documents in a fixed order. The total size is capped at
`max_chars` (taken in that order, so a smaller cap gives a prefix of the same documents), and
each document goes to validation when the hash of its name falls below `val_fraction`. The
split therefore depends only on the names, never on file-system order or on the cap.

Sources:
    "builtin"          the Python standard library's .py files and the reference manual topics
                       in `pydoc_data.topics` (real English and code, always on disk, offline).
    a path             a text file (cut into chunks so that both splits get some) or a folder of
                       *.txt, *.md, *.py files, searched recursively in sorted order.
    "hf:NAME[:CONFIG]" a Hugging Face dataset through the optional `datasets` package, using its
                       "train" and "validation" splits and the "text" column (WikiText-103:
                       hf:wikitext:wikitext-103-raw-v1; `pipenag data prepare` shards it).
"shards:DIR" (token shards, pipenag.data.shards) holds tokens, not text: build_data reads it.
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping

from pipenag.config import DataConfig

TEXT_SUFFIXES = (".txt", ".md", ".py")
# Folders of the standard library that are not library code, are machine specific
# (config-3.x-*, _sysconfigdata_*) or belong to installed packages.
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "turtledemo",
                     "__pycache__"}
_DOC_SEP = "\n\n"  # between documents of the builtin and local sources
_CHUNKS_PER_FILE = 100  # a single text file is cut into about this many documents


@dataclass
class Corpus:
    train: str
    """Training text: the training documents, concatenated in the fixed order."""
    val: str
    """Validation text: the held-out documents, concatenated in the fixed order."""
    fingerprint: str
    """First 16 hex digits of sha256 over train and val; names caches."""
    num_docs_train: int
    """Documents in the training split."""
    num_docs_val: int
    """Documents in the validation split."""
    source: str
    """The data.source this corpus came from."""

    @property
    def num_chars(self) -> int:
        return len(self.train) + len(self.val)


def load_corpus(cfg: DataConfig) -> Corpus:
    """Load the corpus named by `cfg.source` and split it.

    Args:
        cfg: the data config (source, val_fraction, max_chars are used).
    Returns:
        A Corpus with non-empty train and val texts.
    Raises:
        ValueError: a missing path, an empty corpus, one too small to split, or a Hugging Face
            source without the `datasets` package or network access.
    """
    source = cfg.source
    if source.startswith("shards:"):
        raise ValueError(f"data.source={source!r}: token shards hold no text; they are read by "
                         "build_data (pipenag train), not loaded as a corpus")
    if source.startswith("hf:"):
        name, _, config = source[3:].partition(":")
        if not name:
            raise ValueError(f"data.source={source!r}: expected hf:NAME or hf:NAME:CONFIG")
        return corpus_from_hf_splits(_load_hf(name, config or None), cfg, source)
    if source == "builtin":
        docs = _builtin_documents()
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise ValueError(f"data.source={source!r}: no such file or folder "
                             '(use "builtin", a text file, a folder of text files or hf:NAME)')
        if path.is_file():
            return split_documents(_file_documents(path, cfg.max_chars), cfg.max_chars,
                                   cfg.val_fraction, source, sep="")
        docs = _folder_documents(path)
    return split_documents(docs, cfg.max_chars, cfg.val_fraction, source)


def split_documents(docs: Iterable[tuple[str, str]], max_chars: int, val_fraction: float,
                    source: str, sep: str = _DOC_SEP) -> Corpus:
    """Cap named documents at `max_chars` in their order and split them by name.

    The iterable is consumed lazily and abandoned once the cap is reached, so sources that read
    files on demand only read what is used.

    Args:
        docs: (name, text) pairs in the fixed order.
        max_chars: cap on len(train) + len(val), separators included; 0 = no cap.
        val_fraction: a document goes to validation when val_score(name) < val_fraction.
        source: recorded in the Corpus.
        sep: appended to every document (pieces of one file need none).
    Returns:
        The Corpus.
    Raises:
        ValueError: no text at all, or too little text to give both splits a document.
    """
    kept: list[tuple[str, str]] = []
    total = 0
    for name, text in docs:
        if not text.strip():
            continue
        piece = text + sep
        if max_chars and total + len(piece) >= max_chars:
            piece = piece[:max_chars - total]
            if piece.strip():
                kept.append((name, piece))
            total = max_chars
            break
        kept.append((name, piece))
        total += len(piece)
    if not kept:
        raise ValueError(f"data.source={source!r}: the corpus is empty (no text found)")
    if len(kept) == 1:
        # One document cannot feed two splits: cut it into chunks like a single text file.
        name, text = kept[0]
        kept = [(f"{name}#{i}", chunk) for i, chunk in enumerate(_chunks(text, _CHUNKS_PER_FILE))]
        if len(kept) < 2:
            raise ValueError(f"data.source={source!r}: only {total} characters, too few to split "
                             "into training and validation text")
    scores = [val_score(name) for name, _ in kept]
    is_val = [s < val_fraction for s in scores]
    # Small corpora can leave a split empty; give it the document whose hash is nearest.
    if not any(is_val):
        is_val[min(range(len(kept)), key=lambda i: (scores[i], kept[i][0]))] = True
    if all(is_val):
        is_val[max(range(len(kept)), key=lambda i: (scores[i], kept[i][0]))] = False
    train = "".join(text for (_, text), v in zip(kept, is_val) if not v)
    val = "".join(text for (_, text), v in zip(kept, is_val) if v)
    num_val = sum(is_val)
    return Corpus(train=train, val=val, fingerprint=fingerprint(train, val),
                  num_docs_train=len(kept) - num_val, num_docs_val=num_val, source=source)


def val_score(name: str) -> float:
    """A number in [0, 1) fixed by the document name: sha1 of the name as a fraction."""
    return int(hashlib.sha1(name.encode("utf-8")).hexdigest()[:13], 16) / 16 ** 13


def fingerprint(train: str, val: str) -> str:
    h = hashlib.sha256()
    # Lengths first, so that moving text from one split to the other changes the hash.
    h.update(f"{len(train)}:{len(val)}:".encode())
    h.update(train.encode("utf-8", errors="surrogatepass"))
    h.update(b"\0")
    h.update(val.encode("utf-8", errors="surrogatepass"))
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- builtin

def _builtin_documents() -> Iterator[tuple[str, str]]:
    """The reference manual topics (sorted by topic), then the stdlib's .py files (sorted path)."""
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield f"pydoc/{key}", topics[key]
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in _walk_sorted(root, skip_dir=_skip_stdlib_dir):
        if path.suffix == ".py" and not path.name.startswith("_sysconfigdata"):
            yield f"stdlib/{path.relative_to(root).as_posix()}", _read(path)


def _skip_stdlib_dir(name: str) -> bool:
    return name in _STDLIB_SKIP_DIRS or name.startswith("config-") or name.startswith(".")


def _walk_sorted(root: Path, skip_dir=lambda name: name.startswith(".")) -> Iterator[Path]:
    """Files under `root`, entries of each folder sorted by name, folders entered in place.

    A generator: it lists a folder only when it gets there, so a consumer that stops early
    does not pay for the rest of the tree.
    """
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            if not skip_dir(entry.name):
                yield from _walk_sorted(Path(entry.path), skip_dir)
        elif entry.is_file():
            yield Path(entry.path)


def _read(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


def _read_user_text(path: Path) -> str:
    """A user's corpus file as text: UTF-8, not binary.

    Raises:
        ValueError: naming the file, for a binary file (a NUL byte) or bytes that are not UTF-8
            (with the offset of the first bad byte).
    """
    data = path.read_bytes()
    nul = data.find(b"\0")
    if nul >= 0:
        raise ValueError(f"data.source: {str(path)!r} is not a text file (a NUL byte at offset {nul}: binary data)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"data.source: {str(path)!r} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                         f"{e.start}); convert it, e.g. iconv -f latin1 -t utf-8") from None


# ----------------------------------------------------------------------------- local files

def _folder_documents(root: Path) -> Iterator[tuple[str, str]]:
    for path in _walk_sorted(root):
        if path.suffix.lower() in TEXT_SUFFIXES:
            yield path.relative_to(root).as_posix(), _read_user_text(path)


def _file_documents(path: Path, max_chars: int) -> list[tuple[str, str]]:
    text = _read_user_text(path)
    if max_chars:
        text = text[:max_chars]
    return [(f"{path.name}#{i}", chunk) for i, chunk in enumerate(_chunks(text, _CHUNKS_PER_FILE))]


def _chunks(text: str, num_chunks: int) -> list[str]:
    """Cut `text` into about `num_chunks` pieces, at line ends where there are any."""
    target = max(1, len(text) // num_chunks)
    out = []
    pos = 0
    while pos < len(text):
        end = text.find("\n", pos + target - 1, pos + 2 * target)
        end = pos + target if end < 0 else end + 1
        out.append(text[pos:end])
        pos = end
    return [c for c in out if c.strip()]


# ----------------------------------------------------------------------------- Hugging Face

_HF_HINT = ("needs the `datasets` package and network access (pip install pipenag[hf]) to fetch "
            "the dataset once into ~/.cache/huggingface (HF_DATASETS_OFFLINE=1 then reads that cache); "
            "or use data.source=builtin or a local path")


def _load_hf(name: str, config: str | None):
    try:
        import datasets
    except ImportError:
        raise ValueError(f"data.source=hf:{name}: the Hugging Face source {_HF_HINT}") from None
    try:
        return datasets.load_dataset(name, config)
    except Exception as e:  # the library raises many types for "offline" and "not found"
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"data.source=hf:{name}{':' + config if config else ''}: loading failed "
                         f"({type(e).__name__}: {first_line}); the Hugging Face source {_HF_HINT}") from None


def corpus_from_hf_splits(splits: Mapping[str, Iterable[Mapping[str, str]]], cfg: DataConfig,
                          source: str) -> Corpus:
    """Turn a datasets-like object (split name -> rows with a "text" field) into a Corpus.

    Uses the "train" and "validation" splits as they are (the dataset's own split, so numbers
    are comparable with published ones). A dataset without "validation" is split by row index
    like the other sources. With a cap, train gets (1 - val_fraction) * max_chars characters
    and validation the rest. Rows are documents; empty rows are skipped.

    Args:
        splits: e.g. a datasets.DatasetDict, or {"train": [{"text": ...}, ...], ...}.
        cfg: the data config (val_fraction, max_chars).
        source: recorded in the Corpus.
    Returns:
        The Corpus.
    Raises:
        ValueError: no "train" split, or an empty split.
    """
    if "train" not in splits:
        raise ValueError(f"data.source={source!r}: the dataset has no 'train' split "
                         f"(splits: {sorted(splits)})")
    if "validation" not in splits:
        rows = ((f"row{i}", _line(_row_text(row))) for i, row in enumerate(splits["train"]))
        return split_documents(rows, cfg.max_chars, cfg.val_fraction, source, sep="")
    train_cap = round(cfg.max_chars * (1.0 - cfg.val_fraction)) if cfg.max_chars else 0
    val_cap = cfg.max_chars - train_cap if cfg.max_chars else 0
    train, num_train = _join_rows(splits["train"], train_cap)
    val, num_val = _join_rows(splits["validation"], val_cap)
    for split, text in (("train", train), ("validation", val)):
        if not text:
            raise ValueError(f"data.source={source!r}: the {split!r} split has no text")
    return Corpus(train=train, val=val, fingerprint=fingerprint(train, val),
                  num_docs_train=num_train, num_docs_val=num_val, source=source)


def _row_text(row: Mapping[str, str]) -> str:
    if "text" not in row:
        raise ValueError(f"dataset rows need a 'text' column; got columns {sorted(row)}")
    return row["text"]


def _line(text: str) -> str:
    return text if text.endswith("\n") else text + "\n"


def _join_rows(rows: Iterable[Mapping[str, str]], cap: int) -> tuple[str, int]:
    # Rows of line-based datasets (WikiText) already end in a newline; keep them as they are.
    parts = []
    total = 0
    for row in rows:
        text = _row_text(row)
        if not text.strip():
            continue
        text = _line(text)
        if cap and total + len(text) >= cap:
            parts.append(text[:cap - total])
            break
        parts.append(text)
        total += len(text)
    return "".join(parts), len(parts)


def main(argv: list[str]) -> None:
    source = argv[0] if argv else "builtin"
    max_chars = int(argv[1]) if len(argv) > 1 else DataConfig.max_chars
    start = time.perf_counter()
    corpus = load_corpus(DataConfig(source=source, max_chars=max_chars))
    seconds = time.perf_counter() - start
    print(f"source={corpus.source} chars train={len(corpus.train):,} val={len(corpus.val):,} "
          f"docs train={corpus.num_docs_train} val={corpus.num_docs_val} "
          f"fingerprint={corpus.fingerprint} load={seconds:.2f}s")


if __name__ == "__main__":
    main(sys.argv[1:])
