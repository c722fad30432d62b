"""What one message between two stages weighs, and the depths a link asks for.

    python -c "from pipenag import load_config; from pipenag.link.messages import message_bytes; \
print(message_bytes(load_config('configs/tiny.toml')))"

An activation (and its gradient, which has the same shape) of one microbatch is
(microbatch_size, block_size, n_embd) in the compute dtype (float32 today), or its packed
form when [link] compresses that direction (pipenag.link.codec). The simulator, the runtime's
link emulation and the timing model all take the message size and the codecs from here, so
that pipeline.in_flight="auto" gives the same depths in both engines.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from pipenag.config import Config

if TYPE_CHECKING:
    from pipenag.link.codec import Codec

ELEMENT_BYTES = 4  # float32: the dtype both engines compute and send in


def message_shape(cfg: Config) -> tuple[int, int, int]:
    """(B, T, C) of every activation and gradient between stages."""
    return (cfg.data.microbatch_size, cfg.model.block_size, cfg.model.n_embd)


def codecs(cfg: Config) -> tuple[Optional[Codec], Optional[Codec]]:
    """(activation codec, gradient codec) of cfg's [link]; None = sent as they are."""
    from pipenag.link.codec import make_codec

    link = cfg.link
    return make_codec(link.compress_activations, link.block_size), make_codec(link.compress_gradients, link.block_size)


def message_bytes(cfg: Config, direction: str = "raw") -> int:
    """Bytes of one message: "raw" (uncompressed), "activation" (forward, after its codec) or
    "gradient" (backward, after its codec)."""
    B, T, C = message_shape(cfg)
    raw = B * T * C * ELEMENT_BYTES
    if direction == "raw":
        return raw
    if direction not in ("activation", "gradient"):
        raise ValueError(f"direction={direction!r}: expected raw, activation or gradient")
    codec = codecs(cfg)[0 if direction == "activation" else 1]
    return raw if codec is None else codec.packed_numel(B * T * C)


def wire_summary(cfg: Config) -> dict:
    """summary.json's account of the messages: per direction the codec, the bytes of one
    message on the wire and the ratio to the uncompressed message."""
    raw = message_bytes(cfg)
    act, grad = codecs(cfg)
    out = {}
    for name, direction, codec in (("activations", "activation", act), ("gradients", "gradient", grad)):
        size = message_bytes(cfg, direction)
        out[name] = {"codec": codec.name if codec is not None else "none", "bytes_per_message": size,
                     "raw_bytes_per_message": raw, "ratio": raw / size}
    return out


def link_times(cfg: Config, num_bytes: int) -> tuple[float, float]:
    """(latency, transfer time) in seconds of a message of `num_bytes` on cfg's [link]."""
    bandwidth = cfg.link.bandwidth_mbps * 1e6
    return cfg.link.latency_ms / 1e3, (num_bytes * 8 / bandwidth if bandwidth > 0 else 0.0)


def auto_in_flight(cfg: Config, schedule_name: str, num_stages: int, num_microbatches: int) -> tuple[int, ...]:
    """The depths pipeline.in_flight="auto" means for `cfg` (() = the default K - k).

    Raises:
        ValueError: a link is set but pipeline.pass_ms is not (auto plans from the config, never
            from a measurement, so that both engines get the same depths).
    """
    from pipenag.timing import plan_in_flight

    latency, transfer = link_times(cfg, message_bytes(cfg, "activation"))
    _, back = link_times(cfg, message_bytes(cfg, "gradient"))
    if latency <= 0 and transfer <= 0 and back <= 0:
        return ()
    if cfg.pipeline.pass_ms <= 0:
        raise ValueError(
            f"pipeline.in_flight='auto' with link.latency_ms={cfg.link.latency_ms:g}, link.bandwidth_mbps="
            f"{cfg.link.bandwidth_mbps:g} needs pipeline.pass_ms (forward + backward ms of one microbatch at "
            "one stage; `pipenag bench simulator` measures it)")
    pass_s = cfg.pipeline.pass_ms / 1e3
    return plan_in_flight(schedule_name, num_stages, num_microbatches, pass_s / 3, 2 * pass_s / 3, latency,
                          transfer, backward_transfer_time=back)
