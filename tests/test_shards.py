"""Token shards (`pipenag data prepare`, data.source="shards:DIR"), the GPT-2 / file tokenizer and
the Hugging Face source through prepare: offline, local data only, seconds.

    python -m pytest tests/test_shards.py -q
"""

from __future__ import annotations

import json
import shutil
import sys
import types

import pytest
import torch
from helpers import tiny_config

from pipenag import atomic
from pipenag.cli import main
from pipenag.config import DataConfig
from pipenag.data import (BatchStream, TokenShards, build_data, build_tokenizer, fixed_batches, load_corpus,
                          open_shards, prepare_shards, tokenize_corpus, write_shards)
from pipenag.data import shards as shards_mod
from pipenag.data import tokenizer as tokenizer_mod
from pipenag.metrics import read_metrics
from pipenag.train import train_sim

CHARS = 30_000


def data_cfg(tmp_path, **kw) -> DataConfig:
    kw.setdefault("cache_dir", str(tmp_path / "cache"))
    kw.setdefault("max_chars", CHARS)
    return DataConfig(**kw)


def shard_cfg(cfg: DataConfig, folder) -> DataConfig:
    return DataConfig(**{**cfg.__dict__, "source": f"shards:{folder}"})


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------- prepare

def test_prepare_writes_shards_and_manifest(tmp_path):
    cfg = data_cfg(tmp_path)
    out = tmp_path / "shards"
    lines = []
    manifest = prepare_shards(cfg, out, max_tokens=8_000, log=lines.append)
    corpus = load_corpus(cfg)
    train_ids, val_ids = tokenize_corpus(corpus, build_tokenizer(cfg, corpus), None)
    assert manifest["format"] == 1 and manifest["dtype"] == "uint16" and manifest["vocab_size"] == 256
    assert manifest["fingerprint"] == corpus.fingerprint
    assert manifest["tokenizer"]["kind"] == "bytes" and manifest["tokenizer"]["name"] == "bytes"
    train = manifest["splits"]["train"]
    assert train["num_tokens"] == train_ids.numel() and len(train["shards"]) == -(-train_ids.numel() // 8_000)
    assert manifest["splits"]["val"]["num_tokens"] == val_ids.numel()
    assert json.loads((out / "manifest.json").read_text()) == manifest
    for split in ("train", "val"):
        for entry in manifest["splits"][split]["shards"]:
            path = out / entry["file"]
            assert entry["num_tokens"] <= 8_000
            assert path.stat().st_size == 64 + 2 * entry["num_tokens"]
            assert atomic.sha256_file(path) == entry["sha256"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    assert any("manifest.json" in line for line in lines)  # progress output
    opened = open_shards(shard_cfg(cfg, out), verify=True)
    assert torch.equal(opened.train.long(), train_ids) and torch.equal(opened.val.long(), val_ids)
    assert opened.train.parts[0].dtype == torch.uint16


def test_uint32_shards_for_large_vocabularies(tmp_path):
    ids = torch.randint(0, 70_000, (2_500,), generator=torch.Generator().manual_seed(0))
    ids[7] = 69_999
    tok = {"kind": "bpe", "name": "big", "vocab_size": 70_000, "file": None, "sha256": None}
    chunks = {"train": list(ids.split(300)), "val": [ids[:100]]}
    manifest = write_shards(tmp_path, chunks, vocab_size=70_000, tokenizer=tok,
                            fingerprint="0123456789abcdef", max_tokens=1_000)
    assert manifest["dtype"] == "uint32" and len(manifest["splits"]["train"]["shards"]) == 3
    train = shards_mod.open_split(tmp_path, shards_mod.load_manifest(tmp_path), "train", verify=True)
    assert train.parts[0].dtype == torch.uint32 and torch.equal(train.long(), ids)
    assert shards_mod.token_dtype(65_535) == "uint16" and shards_mod.token_dtype(65_536) == "uint32"
    with pytest.raises(ValueError, match="do not fit a vocabulary of 256"):
        write_shards(tmp_path / "bad", chunks, vocab_size=256, tokenizer=tok, fingerprint="0123456789abcdef")


def test_shard_batches_equal_in_memory_batches(tmp_path):
    cfg = data_cfg(tmp_path, microbatch_size=4)
    out = tmp_path / "shards"
    prepare_shards(cfg, out, max_tokens=3_000)  # small shards: many windows cross a boundary
    memory = build_data(cfg, block_size=64, seed=5)
    sharded = build_data(shard_cfg(cfg, out), block_size=64, seed=5)
    assert isinstance(sharded.train.ids, TokenShards)  # read by window, never loaded whole
    assert sharded.fingerprint == memory.fingerprint and sharded.vocab_size == memory.vocab_size
    assert len(sharded.train_ids) == memory.train_ids.numel()
    for j in range(200):
        (mx, my), (sx, sy) = memory.train.get(j), sharded.train.get(j)
        assert sx.dtype == torch.long and torch.equal(mx, sx) and torch.equal(my, sy)
    # Windows that straddle a shard boundary read both sides.
    boundary = sharded.train_ids.parts[0].numel()
    window = sharded.train_ids.windows(torch.tensor([boundary - 10]), 30)
    assert torch.equal(window[0], memory.train_ids[boundary - 10:boundary + 20])
    for (mx, my), (sx, sy) in zip(fixed_batches(memory.val_ids, 64, 4, 5), fixed_batches(sharded.val_ids, 64, 4, 5)):
        assert torch.equal(mx, sx) and torch.equal(my, sy)


def test_token_shards_windows_cross_boundaries():
    positions = torch.arange(1_000)  # token value == position, so a window shows where it came from
    shards = TokenShards([p.to(torch.uint16) for p in positions.split(70)])
    memory, sharded = BatchStream(positions, 16, 8, seed=2), BatchStream(shards, 16, 8, seed=2)
    crossing = 0
    for j in range(100):
        (mx, my), (sx, sy) = memory.get(j), sharded.get(j)
        assert torch.equal(mx, sx) and torch.equal(my, sy)
        starts = mx[:, 0]
        crossing += int(((starts // 70) != ((starts + 16) // 70)).sum())
    assert crossing > 100  # many of the 800 windows span two shards
    with pytest.raises(IndexError):
        shards.windows(torch.tensor([990]), 17)


@pytest.mark.slow
def test_training_from_shards_matches_in_memory(tmp_path):
    base = tiny_config(tmp_path / "memory", "--train.steps=3", "--train.eval_every=2")
    out = tmp_path / "shards"
    prepare_shards(base.data, out, max_tokens=40_000)
    train_sim(base)
    sharded = base.with_overrides([f"--data.source=shards:{out}", f"--run.out_dir={tmp_path / 'sharded'}"])
    train_sim(sharded)
    a, b = read_metrics(tmp_path / "memory"), read_metrics(tmp_path / "sharded")
    assert len(a) == 3
    for ra, rb in zip(a, b):
        assert ra["train_loss"] == rb["train_loss"] and ra.get("val_loss") == rb.get("val_loss")


# ----------------------------------------------------------------------------- errors

@pytest.fixture
def prepared(tmp_path):
    cfg = data_cfg(tmp_path)
    out = tmp_path / "shards"
    prepare_shards(cfg, out, max_tokens=8_000)
    return cfg, out


def test_cli_prepare_and_train_refuses_a_truncated_shard(tmp_path, capsys):
    out = tmp_path / "cli-shards"
    overrides = [f"--data.max_chars={CHARS}", f"--data.cache_dir={tmp_path / 'cache'}"]
    assert main(["data", "prepare", "--out", str(out), "--max-tokens", "9000", *overrides]) == 0
    assert "data prepare:" in capsys.readouterr().out
    shard = out / "train-00001.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    run = tmp_path / "run"
    code = main(["train", "--config", "configs/tiny.toml", "--out", str(run), f"--data.source=shards:{out}",
                 "--steps", "2", "--run.progress=false"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "train-00001.bin" in err and "truncated" in err
    assert not (run / "metrics.jsonl").exists()  # refused before any training work


def test_missing_manifest_and_unknown_version(prepared):
    cfg, out = prepared
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps(dict(manifest, format=99)))
    with pytest.raises(ValueError, match="unknown shard format version 99") as info:
        build_data(shard_cfg(cfg, out), 32, 0)
    assert "manifest.json" in one_line_error(info)
    (out / "manifest.json").unlink()
    with pytest.raises(ValueError, match="no shard manifest.*not a complete shard set") as info:
        build_data(shard_cfg(cfg, out), 32, 0)
    assert "manifest.json" in one_line_error(info)
    with pytest.raises(ValueError, match="no such folder"):
        build_data(shard_cfg(cfg, out / "nowhere"), 32, 0)


def test_foreign_and_corrupted_shards(tmp_path, prepared):
    cfg, out = prepared
    text = tmp_path / "other.txt"
    text.write_text("".join(f"another corpus, line {i}\n" for i in range(3_000)))
    other = tmp_path / "other-shards"
    prepare_shards(data_cfg(tmp_path, source=str(text)), other, max_tokens=8_000)
    # Same size, another corpus: the header check (always on) catches it.
    shutil.copy(other / "train-00000.bin", out / "train-00000.bin")
    with pytest.raises(ValueError, match="foreign shard") as info:
        open_shards(shard_cfg(cfg, out))
    assert "train-00000.bin" in one_line_error(info)
    # Same header, other tokens: only the sha256 check (verify_shards) can tell.
    prepare_shards(cfg, out, max_tokens=8_000)
    shard = out / "val-00000.bin"
    data = bytearray(shard.read_bytes())
    data[100] ^= 1
    shard.write_bytes(bytes(data))
    open_shards(shard_cfg(cfg, out))  # the cheap checks pass
    with pytest.raises(ValueError, match="sha256") as info:
        build_data(DataConfig(**{**shard_cfg(cfg, out).__dict__, "verify_shards": True}), 32, 0)
    assert "val-00000.bin" in one_line_error(info)
    shard.unlink()
    with pytest.raises(ValueError, match="val-00000.bin.*missing"):
        open_shards(shard_cfg(cfg, out))


def test_shards_of_another_tokenizer_are_refused(tmp_path, prepared):
    cfg, out = prepared
    with pytest.raises(ValueError, match="tokenizer 'bytes'.*data.tokenizer='bpe'") as info:
        open_shards(DataConfig(source=f"shards:{out}", tokenizer="bpe"))
    assert "manifest.json" in one_line_error(info)
    bpe_cfg = data_cfg(tmp_path, tokenizer="bpe", bpe_vocab_size=300)
    bpe_out = tmp_path / "bpe-shards"
    prepare_shards(bpe_cfg, bpe_out)
    assert (bpe_out / "tokenizer.json").is_file()
    with pytest.raises(ValueError, match="300-token BPE.*bpe_vocab_size=400"):
        open_shards(DataConfig(source=f"shards:{bpe_out}", tokenizer="bpe", bpe_vocab_size=400))
    opened = open_shards(shard_cfg(bpe_cfg, bpe_out))  # needs no cache: the tokenizer travels along
    assert opened.tokenizer.name.startswith("bpe300-")


def test_failed_prepare_leaves_no_complete_set(prepared, monkeypatch):
    cfg, out = prepared
    prepare_shards(cfg, out, max_tokens=4_000)
    assert len(list(out.glob("train-*.bin"))) > 3
    prepare_shards(cfg, out, max_tokens=100_000)  # a smaller set replaces it: no stale shards
    assert sorted(p.name for p in out.glob("*.bin")) == ["train-00000.bin", "val-00000.bin"]

    def dies(tokenizer, text):
        yield tokenizer.encode_tensor(text[:100])
        raise KeyboardInterrupt

    monkeypatch.setattr(shards_mod, "encode_chunks", dies)
    with pytest.raises(KeyboardInterrupt):
        prepare_shards(cfg, out)
    assert not (out / "manifest.json").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    with pytest.raises(ValueError, match="not a complete shard set"):
        open_shards(shard_cfg(cfg, out))


# ----------------------------------------------------------------------------- tokenizers

def tiny_tokenizer_file(tmp_path, text: str, name: str = "tokenizer.json"):
    """A 300-token byte-level BPE saved as a tokenizer.json: GPT-2's format, trained here."""
    path = tmp_path / name
    path.write_text(tokenizer_mod.train_bpe(text, 300).tokenizer.to_str())
    return path


def test_gpt2_from_a_local_tokenizer_file(tmp_path):
    corpus = load_corpus(data_cfg(tmp_path))
    path = tiny_tokenizer_file(tmp_path, corpus.train)
    cfg = data_cfg(tmp_path, tokenizer="gpt2", tokenizer_path=str(path), microbatch_size=2)
    tok = build_tokenizer(cfg, corpus)
    assert tok.name.startswith("gpt2-300-") and tok.vocab_size == 300
    sample = corpus.val[:2000]
    assert tok.decode(tok.encode(sample)) == sample
    out = tmp_path / "gpt2-shards"
    manifest = prepare_shards(cfg, out, max_tokens=2_000)
    assert manifest["tokenizer"]["kind"] == "gpt2" and manifest["dtype"] == "uint16"
    memory, sharded = build_data(cfg, 32, 1), build_data(shard_cfg(cfg, out), 32, 1)
    for j in range(20):
        assert torch.equal(memory.train.get(j)[0], sharded.train.get(j)[0])
    other = tiny_tokenizer_file(tmp_path, corpus.val * 3, "other.json")
    with pytest.raises(ValueError, match="data.tokenizer_path=.*other.json"):
        open_shards(DataConfig(**{**shard_cfg(cfg, out).__dict__, "tokenizer_path": str(other)}))


def test_gpt2_offline_names_what_to_fetch(tmp_path, monkeypatch):
    def offline():
        raise OSError("We couldn't connect to 'https://huggingface.co'\nCheck your connection")

    monkeypatch.setattr(tokenizer_mod, "_fetch_gpt2", offline)
    corpus = load_corpus(data_cfg(tmp_path))
    with pytest.raises(ValueError, match="openai-community/gpt2.*tokenizer.json.*data.tokenizer_path") as info:
        build_tokenizer(data_cfg(tmp_path, tokenizer="gpt2"), corpus)
    one_line_error(info)
    with pytest.raises(ValueError, match="missing.json.: no such file"):
        build_tokenizer(data_cfg(tmp_path, tokenizer="gpt2", tokenizer_path=str(tmp_path / "missing.json")), corpus)
    junk = tmp_path / "junk.json"
    junk.write_text("{not json")
    with pytest.raises(ValueError, match="junk.json.*not a tokenizers"):
        build_tokenizer(data_cfg(tmp_path, tokenizer="gpt2", tokenizer_path=str(junk)), corpus)
    path = tiny_tokenizer_file(tmp_path, corpus.train)
    with pytest.raises(ValueError, match="300 tokens.*bpe_vocab_size=2048"):
        build_tokenizer(data_cfg(tmp_path, tokenizer="bpe", tokenizer_path=str(path)), corpus)


# ----------------------------------------------------------------------------- Hugging Face

def test_prepare_from_a_hugging_face_source(tmp_path, monkeypatch, capsys):
    module = types.ModuleType("datasets")
    rows = {"train": [{"text": f" = Section {i} = \n"} for i in range(500)] + [{"text": ""}],
            "validation": [{"text": f"held out line {i}\n"} for i in range(200)]}
    module.load_dataset = lambda name, config=None: rows
    monkeypatch.setitem(sys.modules, "datasets", module)
    cfg = data_cfg(tmp_path, source="hf:wikitext:wikitext-103-raw-v1", max_chars=0)
    manifest = prepare_shards(cfg, tmp_path / "wt")
    assert manifest["source"] == "hf:wikitext:wikitext-103-raw-v1"
    assert manifest["splits"]["val"]["num_tokens"] == sum(len(r["text"]) for r in rows["validation"])

    def offline(name, config=None):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)\nmore detail")

    module.load_dataset = offline
    out = tmp_path / "wt-offline"
    code = main(["data", "prepare", "--out", str(out), "--data.source=hf:wikitext:wikitext-103-raw-v1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "`datasets` package and network access" in err and "~/.cache/huggingface" in err
    assert not out.exists()  # nothing written before the corpus loads
