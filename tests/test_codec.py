"""The link codecs against an independent float64 reference of their math.

    python -m pytest -q tests/test_codec.py

The reference below quantizes block by block in float64 (H built entry by entry as
(-1)**popcount(i & j) / sqrt(n), not by the Sylvester doubling the codec uses); the codec must
match it and meet the error bound that follows from the math: |x - x_hat| <= absmax / (2 * levels)
per block (in the rotated domain for int4-hadamard).
"""

from __future__ import annotations

import functools
import math
import re

import pytest
import torch

from pipenag.link import CODECS, Int4Codec, Int8Codec, make_codec

# (name, block_size): the defaults, and a small block so that small tensors span several blocks
CODEC_ARGS = [("int8", 0), ("int4", 0), ("int4-hadamard", 0), ("int8", 8), ("int4", 8), ("int4-hadamard", 8)]
SHAPES = [(4, 16, 40), (7,), (3, 5), (1,)]
DTYPES = [torch.float32, torch.bfloat16]


def heavy_tailed(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g))
    return x.to(dtype)


def blocks64(x, block_size):
    """x flattened in float64, zero-padded to whole blocks: (num_blocks, block_size)."""
    flat = x.detach().reshape(-1).double()
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % block_size)])
    return flat.view(-1, block_size)


@functools.lru_cache(maxsize=None)
def hadamard64(n):
    parity = torch.tensor([[bin(i & j).count("1") % 2 for j in range(n)] for i in range(n)])
    return (1.0 - 2.0 * parity.double()) / math.sqrt(n)


def levels_of(codec):
    return 127 if codec.name == "int8" else 7


def reference(codec, x):
    """(rotated blocks, their absmax, reference x_hat blocks), all float64."""
    b = blocks64(x, codec.block_size)
    H = hadamard64(codec.block_size) if codec.name == "int4-hadamard" else None
    w = b @ H if H is not None else b
    m = w.abs().amax(dim=1, keepdim=True)
    L = levels_of(codec)
    q = torch.round(w / torch.where(m > 0, m, 1.0) * L)
    w_hat = q * m / L
    return w, m, (w_hat @ H if H is not None else w_hat)


def check_against_reference(codec, x):
    """The codec's float32 decode equals the float64 reference and meets the error bound."""
    x_hat = codec.decode(codec.encode(x), tuple(x.shape), torch.float32)
    assert torch.isfinite(x_hat).all()
    n, numel, L = codec.block_size, x.numel(), levels_of(codec)
    w, m, ref = reference(codec, x)
    eps = 1e-5 * m  # float32 arithmetic on values of size <= absmax, (N, 1)
    # the codec drops the padding of the tail block and clamps to the float32 range
    fmax = torch.finfo(torch.float32).max
    ref = ref.reshape(-1)[:numel].clamp(-fmax, fmax)
    per_elem = lambda t: t.expand(-1, n).reshape(-1)[:numel]  # noqa: E731
    diff = (x_hat.reshape(-1).double() - ref).abs()
    assert (diff <= per_elem(eps)).all(), diff.max()
    err = blocks64(x.double() - x_hat.double(), n)  # (N, n), zero on the padding
    if codec.name != "int4-hadamard":
        assert (err.abs() <= m / (2 * L) + eps).all(), (err.abs() - m / (2 * L)).max()
        return
    # rotated domain: elementwise on whole tiles; the L2 norm also covers a padded tail tile
    full = numel // n
    rot_err = (err[:full] @ hadamard64(n)).abs()
    assert (rot_err <= m[:full] / (2 * L) + eps[:full]).all(), (rot_err - m[:full] / (2 * L)).max()
    norms = err.norm(dim=1, keepdim=True)
    assert (norms <= math.sqrt(n) * (m / (2 * L) + eps)).all()


def codec_of(args):
    name, block_size = args
    return make_codec(name, block_size)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("args", CODEC_ARGS, ids=str)
def test_roundtrip_matches_reference_and_bound(args, shape, dtype):
    codec = codec_of(args)
    x = heavy_tailed(shape, dtype)
    check_against_reference(codec, x)
    # in a narrower dtype the roundtrip is the float32 decode, rounded once
    assert torch.equal(codec.roundtrip(x), codec.decode(codec.encode(x), shape, torch.float32).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES + [torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("args", CODEC_ARGS, ids=str)
def test_packed_size_dtype_and_shape(args, shape, dtype):
    codec = codec_of(args)
    x = heavy_tailed(shape, dtype).requires_grad_(dtype == torch.float32)
    packed = codec.encode(x)
    assert packed.dtype == torch.uint8 and packed.dim() == 1 and packed.is_contiguous()
    assert packed.numel() == codec.packed_numel(x.numel())
    y = codec.roundtrip(x)
    assert y.shape == x.shape and y.dtype == dtype and not y.requires_grad


@pytest.mark.parametrize("args", CODEC_ARGS, ids=str)
def test_zeros_roundtrip_exactly(args):
    codec = codec_of(args)
    assert torch.equal(codec.roundtrip(torch.zeros(3, 5)), torch.zeros(3, 5))
    x = heavy_tailed((4, codec.block_size))
    x[2] = 0.0  # one zero block among others
    y = codec.roundtrip(x)
    assert torch.equal(y[2], torch.zeros(codec.block_size)) and not torch.isnan(y).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("args", CODEC_ARGS, ids=str)
def test_huge_values_stay_finite_within_bound(args, dtype):
    codec = codec_of(args)
    fmax = torch.finfo(dtype).max
    if dtype != torch.float16:
        check_against_reference(codec, (heavy_tailed((3, 40)) * 1e30).to(dtype))
    x = heavy_tailed((3, 40)).clamp(-1, 1) * fmax
    x.view(-1)[::5] = fmax  # whole blocks near the maximum
    x.view(-1)[1::7] = -fmax
    x = x.to(dtype)
    assert torch.isfinite(codec.roundtrip(x)).all()
    if dtype != torch.float16:  # a float16 decode clamps to its range; the bound is in float32
        check_against_reference(codec, x)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=str)
@pytest.mark.parametrize("args", CODEC_ARGS, ids=str)
def test_non_finite_block_decodes_to_nan(args, bad):
    codec = codec_of(args)
    n = codec.block_size
    x = heavy_tailed((3, n))  # rows are blocks
    clean = codec.roundtrip(x)
    x[1, n // 2] = bad
    y = codec.roundtrip(x)
    assert torch.isnan(y[1]).all()
    assert torch.equal(y[0], clean[0]) and torch.equal(y[2], clean[2])
    # a shape that is not a multiple of the block: the NaN block is the padded tail
    z = heavy_tailed((n + 3,))
    z[-1] = bad
    y = codec.roundtrip(z)
    assert torch.isnan(y[n:]).all() and torch.isfinite(y[:n]).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("args", CODEC_ARGS, ids=str)
def test_decode_from_received_bytes_is_bit_identical(args, dtype):
    codec = codec_of(args)
    x = heavy_tailed((4, 16, 40), dtype)
    packed = codec.encode(x)
    expected = codec.roundtrip(x)
    buf = torch.empty(codec.packed_numel(x.numel()), dtype=torch.uint8)  # allocated ahead
    buf.copy_(packed)
    assert torch.equal(codec.decode(buf, tuple(x.shape), dtype), expected)
    wire = torch.frombuffer(bytearray(packed.numpy().tobytes()), dtype=torch.uint8)
    assert torch.equal(codec.decode(wire, tuple(x.shape), dtype), expected)
    # a slice at an odd offset of a bigger receive buffer
    big = torch.zeros(packed.numel() + 3, dtype=torch.uint8)
    big[1:-2] = packed
    assert torch.equal(codec.decode(big[1:-2], tuple(x.shape), dtype), expected)


@pytest.mark.parametrize("args", CODEC_ARGS, ids=str)
def test_encode_is_deterministic(args):
    codec = codec_of(args)
    x = heavy_tailed((4, 16, 40))
    assert torch.equal(codec.encode(x), codec.encode(x.clone()))
    assert torch.equal(make_codec(*args).encode(x), codec.encode(x))


def test_hadamard_rotation_helps_on_heavy_tails():
    x = heavy_tailed((64, 64))
    err = {name: ((make_codec(name).roundtrip(x) - x).norm() / x.norm()).item()
           for name in ("int4", "int4-hadamard")}
    assert err["int4-hadamard"] < 0.75 * err["int4"], err


def test_make_codec_names_and_defaults():
    assert CODECS == ("none", "int8", "int4", "int4-hadamard")
    assert make_codec("none") is None
    for name in CODECS[1:]:
        codec = make_codec(name)
        assert codec.name == name and codec.block_size == 64
        assert make_codec(name, 32).block_size == 32
    assert isinstance(make_codec("int8"), Int8Codec) and isinstance(make_codec("int4"), Int4Codec)
    assert make_codec("int8", 24).block_size == 24  # int8 and int4 need an even size only


@pytest.mark.parametrize("name,block_size,shown", [
    ("int3", 0, "'int3'"), ("fp8", 64, "'fp8'"),
    ("int8", 1, "block_size=1"), ("int8", 3, "block_size=3"), ("int4", 33, "block_size=33"),
    ("int4", -2, "block_size=-2"), ("int4-hadamard", 24, "block_size=24"),
])
def test_make_codec_rejects_bad_values(name, block_size, shown):
    with pytest.raises(ValueError, match=re.escape(shown)):
        make_codec(name, block_size)


def test_decode_rejects_wrong_size():
    codec = make_codec("int8")
    packed = codec.encode(torch.randn(100))
    with pytest.raises(ValueError, match="expected 136"):
        codec.decode(packed[:-1], (100,), torch.float32)


def test_packed_size_and_ratio_follow_the_math():
    int8, int4, had = make_codec("int8"), make_codec("int4"), make_codec("int4-hadamard")
    assert int8.packed_numel(64) == 64 + 4 and int8.packed_numel(65) == 2 * (64 + 4)
    assert int4.packed_numel(64) == 32 + 4 and int4.packed_numel(1) == 32 + 4
    assert int8.packed_numel(0) == 0
    assert int8.ratio(64 * 10, 4) == pytest.approx(4 * 64 / (64 + 4))
    assert int8.ratio(64 * 10, 2) == pytest.approx(2 * 64 / (64 + 4))
    assert int4.ratio(64 * 10, 4) == pytest.approx(4 * 64 / (32 + 4))
    assert had.ratio(64 * 10, 4) == int4.ratio(64 * 10, 4)
    assert make_codec("int8", 256).ratio(256, 4) == pytest.approx(4 * 256 / (256 + 4))
