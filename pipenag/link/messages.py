"""What one message between two stages weighs, and the depths a link asks for.

    python -c "from pipenag import load_config; from pipenag.link.messages import message_bytes; \
print(message_bytes(load_config('configs/tiny.toml')))"

An activation (and its gradient, which has the same shape) of one microbatch is
(microbatch_size, block_size, n_embd) in the compute dtype (float32 today). The simulator, the
runtime's link emulation and the timing model all take the message size from here, so that
pipeline.in_flight="auto" gives the same depths in both engines.
"""

from __future__ import annotations

from pipenag.config import Config

ELEMENT_BYTES = 4  # float32: the dtype both engines compute and send in


def message_shape(cfg: Config) -> tuple[int, int, int]:
    """(B, T, C) of every activation and gradient between stages."""
    return (cfg.data.microbatch_size, cfg.model.block_size, cfg.model.n_embd)


def message_bytes(cfg: Config) -> int:
    """Bytes of one activation (or gradient) message as it travels uncompressed."""
    B, T, C = message_shape(cfg)
    return B * T * C * ELEMENT_BYTES


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

    latency, transfer = link_times(cfg, message_bytes(cfg))
    if latency <= 0 and transfer <= 0:
        return ()
    if cfg.pipeline.pass_ms <= 0:
        raise ValueError(
            f"pipeline.in_flight='auto' with link.latency_ms={cfg.link.latency_ms:g}, link.bandwidth_mbps="
            f"{cfg.link.bandwidth_mbps:g} needs pipeline.pass_ms (forward + backward ms of one microbatch at "
            "one stage; `pipenag bench simulator` measures it)")
    pass_s = cfg.pipeline.pass_ms / 1e3
    return plan_in_flight(schedule_name, num_stages, num_microbatches, pass_s / 3, 2 * pass_s / 3, latency,
                          transfer)
