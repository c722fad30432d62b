"""Corpus loading and splitting, tokenizers, and deterministic batches (offline, seconds).

    python -m pytest tests/test_data.py -q
"""

from __future__ import annotations

import json
import random
import sys
import types

import pytest
import torch

from pipenag.config import DataConfig
from pipenag.data import (BatchStream, ByteTokenizer, Corpus, build_data, build_tokenizer,
                          corpus_from_hf_splits, fixed_batches, load_corpus, split_documents,
                          tokenize_corpus)
from pipenag.data import tokenizer as tokenizer_mod
from pipenag.data.corpus import val_score



def small_cfg(tmp_path, **kw) -> DataConfig:
    kw.setdefault("cache_dir", str(tmp_path / "cache"))
    return DataConfig(**kw)


# ----------------------------------------------------------------------------- corpus

def test_builtin_corpus_offline_and_stable():
    a = load_corpus(DataConfig())
    b = load_corpus(DataConfig())
    assert a.train and a.val
    assert a.num_docs_train > 0 and a.num_docs_val > 0
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 16
    assert (a.train, a.val) == (b.train, b.val)
    # Both kinds of builtin text are there: the reference manual and library code.
    text = a.train + a.val
    assert "def " in text and "import " in text
    assert "statement" in text
    assert a.num_chars == DataConfig().max_chars  # the stdlib is larger than the default cap


def test_max_chars_caps_and_takes_documents_in_order():
    small = load_corpus(DataConfig(max_chars=100_000))
    large = load_corpus(DataConfig(max_chars=300_000))
    assert small.num_chars == 100_000
    assert large.num_chars == 300_000
    assert small.fingerprint != large.fingerprint
    docs = [(f"doc{i:03d}", f"<marker{i:03d}> " + "text " * 20) for i in range(200)]
    full = split_documents(docs, 0, 0.2, "test")
    capped = split_documents(docs, 5_000, 0.2, "test")
    assert capped.num_chars == 5_000
    kept = [i for i in range(200) if f"<marker{i:03d}>" in capped.train + capped.val]
    assert kept == list(range(len(kept))) and 30 < len(kept) < 60  # a prefix of the documents
    for i in kept[:-1]:  # the last one may be cut
        marker = f"<marker{i:03d}>"
        assert (marker in capped.val) == (marker in full.val)


def test_split_is_by_document_name_not_order():
    docs = [(f"doc{i:03d}", f"marker{i:03d} " + "text " * 20) for i in range(200)]
    a = split_documents(docs, 0, 0.2, "test")
    shuffled = docs[:]
    random.Random(0).shuffle(shuffled)
    b = split_documents(shuffled, 0, 0.2, "test")
    for i, (name, _) in enumerate(docs):
        marker = f"marker{i:03d}"
        in_val = marker in a.val
        assert in_val != (marker in a.train)  # each document in exactly one split
        assert in_val == (val_score(name) < 0.2)
        assert in_val == (marker in b.val)  # membership independent of the input order
    assert a.num_docs_train + a.num_docs_val == 200
    assert 10 < a.num_docs_val < 80


def test_split_documents_gives_both_splits_a_document():
    # With 3 documents and a tiny val_fraction the hash rule alone would leave val empty.
    c = split_documents([("a", "alpha"), ("b", "beta"), ("c", "gamma")], 0, 0.001, "t")
    assert c.num_docs_val == 1 and c.num_docs_train == 2
    with pytest.raises(ValueError, match="empty"):
        split_documents([("a", "  \n"), ("b", "")], 0, 0.1, "t")


def test_local_folder_source(tmp_path):
    root = tmp_path / "texts"
    (root / "sub" / "deeper").mkdir(parents=True)
    names = []
    for i in range(30):
        folder = root / ("sub/deeper" if i % 3 == 0 else "sub" if i % 3 == 1 else "")
        ext = (".txt", ".md", ".py")[i % 3]
        path = folder / f"f{i:02d}{ext}"
        path.write_text(f"file number {i:02d}\nsome text\n")
        names.append((path.relative_to(root).as_posix(), f"file number {i:02d}"))
    (root / "skip.json").write_text("not a text file")
    (root / "skip.bin").write_bytes(b"\x00\x01")
    cfg = DataConfig(source=str(root), val_fraction=0.3, max_chars=0)
    c = load_corpus(cfg)
    assert c.num_docs_train + c.num_docs_val == 30
    assert "not a text file" not in c.train + c.val
    for name, marker in names:
        assert (marker in c.val) == (val_score(name) < 0.3)
        assert (marker in c.val) != (marker in c.train)
    assert load_corpus(cfg).fingerprint == c.fingerprint


def test_local_single_file_is_chunked(tmp_path):
    path = tmp_path / "book.txt"
    text = "".join(f"line {i} of the book, with some words\n" for i in range(2000))
    path.write_text(text)
    c = load_corpus(DataConfig(source=str(path), max_chars=0))
    assert c.train and c.val
    assert len(c.train) + len(c.val) == len(text)  # chunks are cut, not padded
    assert c.num_docs_train + c.num_docs_val > 50
    capped = load_corpus(DataConfig(source=str(path), max_chars=10_000))
    assert capped.num_chars == 10_000 and capped.train and capped.val


def test_missing_and_empty_sources(tmp_path):
    missing = tmp_path / "no_such_corpus"
    with pytest.raises(ValueError, match="no_such_corpus"):
        load_corpus(DataConfig(source=str(missing)))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "ignored.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="empty"):
        load_corpus(DataConfig(source=str(empty)))


def fake_dataset():
    return {
        "train": [{"text": ""}, {"text": " = Title = \n"}, {"text": "train words here\n"},
                  {"text": "no newline"}] * 5,
        "validation": [{"text": "held out text\n"}, {"text": ""}, {"text": "more held out\n"}],
    }


def test_hf_conversion_from_fake_dataset():
    c = corpus_from_hf_splits(fake_dataset(), DataConfig(max_chars=0), "hf:fake")
    assert c.train.startswith(" = Title = \ntrain words here\nno newline\n")
    assert c.val == "held out text\nmore held out\n"
    assert (c.num_docs_train, c.num_docs_val) == (15, 2)
    capped = corpus_from_hf_splits(fake_dataset(), DataConfig(max_chars=100, val_fraction=0.2), "hf:fake")
    assert (len(capped.train), len(capped.val)) == (80, 20)
    # Without a validation split the rows are split by name like the other sources.
    rows = {"train": [{"text": f"row text {i}"} for i in range(100)]}
    c2 = corpus_from_hf_splits(rows, DataConfig(max_chars=0, val_fraction=0.2), "hf:fake")
    assert c2.train and c2.val and c2.num_docs_train + c2.num_docs_val == 100
    with pytest.raises(ValueError, match="text"):
        corpus_from_hf_splits({"train": [{"content": "x"}]}, DataConfig(), "hf:fake")


def test_hf_source_through_fake_datasets_module(monkeypatch):
    calls = []
    module = types.ModuleType("datasets")

    def load_dataset(name, config=None):
        calls.append((name, config))
        return fake_dataset()

    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)
    c = load_corpus(DataConfig(source="hf:wikitext:wikitext-2-raw-v1", max_chars=0))
    assert calls == [("wikitext", "wikitext-2-raw-v1")]
    assert c.val == "held out text\nmore held out\n" and c.source == "hf:wikitext:wikitext-2-raw-v1"

    def offline(name, config=None):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub")

    module.load_dataset = offline
    with pytest.raises(ValueError, match="network access.*builtin"):
        load_corpus(DataConfig(source="hf:wikitext"))


def test_hf_source_without_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ValueError, match="`datasets` package.*data.source=builtin"):
        load_corpus(DataConfig(source="hf:wikitext:wikitext-103-raw-v1"))


# ----------------------------------------------------------------------------- tokenizers

def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "def f(x):\n    return x  # caf\u00e9 \u2013 \u65e5\u672c"
    ids = tok.encode(text)
    assert tok.vocab_size == 256 and tok.name == "bytes"
    assert ids == list(text.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids) == text
    assert tok.encode_tensor(text).tolist() == ids
    assert tok.encode_tensor("").numel() == 0


def test_bpe_trains_caches_and_is_deterministic(tmp_path, monkeypatch):
    cfg = small_cfg(tmp_path, tokenizer="bpe", bpe_vocab_size=300, max_chars=50_000)
    corpus = load_corpus(cfg)
    tok = build_tokenizer(cfg, corpus)
    assert tok.vocab_size == 300 and tok.name.startswith("bpe300-")
    cached = list((tmp_path / "cache" / "tokenizers").glob(f"*{corpus.fingerprint}*.json"))
    assert len(cached) == 1
    sample = corpus.val[:3000]
    ids = tok.encode(sample)
    assert tok.decode(ids) == sample
    assert len(ids) < len(sample.encode("utf-8"))  # merges compress

    def no_training(*args, **kwargs):
        raise AssertionError("the second build must load the cached tokenizer")

    monkeypatch.setattr(tokenizer_mod, "train_bpe", no_training)
    again = build_tokenizer(cfg, corpus)
    assert again.name == tok.name and again.encode(sample) == ids
    monkeypatch.undo()
    fresh = tokenizer_mod.train_bpe(corpus.train, 300)
    assert fresh.tokenizer.to_str() == tok.tokenizer.to_str()


def test_bpe_sees_only_the_training_split(tmp_path):
    corpus = Corpus(train="the cat sat on the mat\n" * 300, val="qqqq zzqq\n" * 300,
                    fingerprint="0123456789abcdef", num_docs_train=1, num_docs_val=1, source="t")
    tok = build_tokenizer(small_cfg(tmp_path, tokenizer="bpe", bpe_vocab_size=270), corpus)
    merged = [t for t in tok.tokenizer.get_vocab() if len(t) > 1]
    assert any("at" in t for t in merged)
    assert not any("q" in t or "z" in t for t in merged)


def test_bpe_without_tokenizers_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    corpus = load_corpus(DataConfig(max_chars=20_000))
    with pytest.raises(ValueError, match=r"pip install pipenag\[bpe\]"):
        build_tokenizer(small_cfg(tmp_path, tokenizer="bpe"), corpus)


def test_tokenize_corpus_bytes_and_bpe_cache(tmp_path, monkeypatch):
    corpus = load_corpus(DataConfig(max_chars=30_000))
    train_ids, val_ids = tokenize_corpus(corpus, ByteTokenizer(), str(tmp_path))
    assert train_ids.dtype == torch.long and train_ids.dim() == 1
    assert train_ids.tolist() == list(corpus.train.encode("utf-8"))
    assert val_ids.tolist() == list(corpus.val.encode("utf-8"))

    cfg = small_cfg(tmp_path, tokenizer="bpe", bpe_vocab_size=300, max_chars=30_000)
    tok = build_tokenizer(cfg, corpus)
    bpe_train, bpe_val = tokenize_corpus(corpus, tok, cfg.cache_dir)
    assert bpe_train.tolist() == tok.encode(corpus.train)
    assert len(list((tmp_path / "cache" / "tokens").glob("*.pt"))) == 1
    monkeypatch.setattr(type(tok), "encode_tensor", lambda self, text: 1 / 0)
    cached_train, cached_val = tokenize_corpus(corpus, tok, cfg.cache_dir)
    assert cached_train.dtype == torch.long
    assert torch.equal(cached_train, bpe_train) and torch.equal(cached_val, bpe_val)


# ----------------------------------------------------------------------------- batches

def test_batch_stream_shapes_and_targets():
    n, block_size, batch_size = 50, 8, 4
    ids = torch.arange(n)  # token value == position, so a window is visible in its values
    stream = BatchStream(ids, block_size, batch_size, seed=3)
    starts = set()
    for _ in range(200):
        x, y = stream.next()
        assert x.shape == y.shape == (batch_size, block_size)
        assert x.dtype == y.dtype == torch.long
        assert torch.equal(y, x + 1)  # y is x shifted by one token
        assert torch.equal(x, x[:, :1] + torch.arange(block_size))  # contiguous windows
        starts.update(x[:, 0].tolist())
    assert stream.state_dict() == {"seed": 3, "position": 200}
    assert starts == set(range(n - block_size))  # every valid window, and only those


def test_batch_stream_determinism_and_resume():
    ids = torch.randint(0, 256, (5000,), generator=torch.Generator().manual_seed(0))
    a = BatchStream(ids, 16, 4, seed=7)
    b = BatchStream(ids, 16, 4, seed=7)
    other = BatchStream(ids, 16, 4, seed=8)
    first = [a.next() for _ in range(5)]
    for x, y in first:
        bx, by = b.next()
        assert torch.equal(x, bx) and torch.equal(y, by)
    assert not torch.equal(first[0][0], other.next()[0])

    state = json.loads(json.dumps(a.state_dict()))  # survives a checkpoint as JSON
    expected = [a.next() for _ in range(3)]
    assert not torch.equal(expected[0][0], expected[1][0])
    assert not torch.equal(expected[0][0], first[0][0])  # batch 5 is not batch 0
    resumed = BatchStream(ids, 16, 4, seed=0)
    resumed.load_state_dict(state)
    for x, y in expected:
        rx, ry = resumed.next()
        assert torch.equal(x, rx) and torch.equal(y, ry)
    assert torch.equal(resumed.get(2)[0], first[2][0])  # random access by index
    assert iter(a) is a and len(next(a)) == 2


def test_batch_stream_rejects_short_corpus():
    with pytest.raises(ValueError, match="10 tokens"):
        BatchStream(torch.arange(10), 10, 2, seed=0)
    BatchStream(torch.arange(11), 10, 2, seed=0).next()  # exactly block_size + 1 is enough
    with pytest.raises(ValueError, match="1-D"):
        BatchStream(torch.zeros(4, 4, dtype=torch.long), 2, 2, seed=0)


def test_fixed_batches_repeatable():
    ids = torch.arange(1000)
    a = fixed_batches(ids, 16, 4, 3)
    b = fixed_batches(ids, 16, 4, 3)
    assert len(a) == 3
    for (ax, ay), (bx, by) in zip(a, b):
        assert torch.equal(ax, bx) and torch.equal(ay, by)
        assert torch.equal(ay, ax + 1)
    c = fixed_batches(ids, 16, 4, 3, seed=99)
    assert not torch.equal(a[0][0], c[0][0])


def test_build_data_bytes(tmp_path):
    cfg = small_cfg(tmp_path, max_chars=50_000, microbatch_size=3)
    data = build_data(cfg, block_size=32, seed=0)
    assert data.vocab_size == 256 and data.fingerprint == data.corpus.fingerprint
    x, y = data.train.next()
    assert x.shape == (3, 32) and int(x.max()) < data.vocab_size
    assert data.val_ids.numel() == len(data.corpus.val.encode("utf-8"))
    with pytest.raises(ValueError, match="block_size"):
        build_data(cfg, block_size=200_000, seed=0)
