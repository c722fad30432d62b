"""Split a GPT into pipeline stages: which blocks each stage owns, and one generic stage module.

    python -c "from pipenag.split import partition_layers; print(partition_layers(10, 4))"

Stage 0 owns the embeddings (wte, wpe, drop) and its blocks; the last stage owns its blocks and
the head (ln_f, lm_head); the stages in between own blocks only. With one stage a StageModule
is the whole model. Blocks are spread as evenly as possible, larger stages first.

The stage modules returned by `split_gpt` reference the GPT's own submodules: no parameter is
copied, so stage parameters ARE the model's parameters (an update through a stage shows in the
model and vice versa). Engines that need independent copies per process can deepcopy a stage.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
import torch.nn as nn

from pipenag.config import ModelConfig
from pipenag.model import GPT, check_seq_len, embed


def partition_layers(n_layer: int, num_stages: int) -> list[tuple[int, int]]:
    """Half-open block ranges [start, end) for each stage, balanced, larger stages first.

    Args:
        n_layer: number of transformer blocks.
        num_stages: number of pipeline stages K.
    Returns:
        K tuples (start, end) that tile range(n_layer); sizes differ by at most one.
    Raises:
        ValueError: num_stages < 1, or more stages than blocks.
    """
    if n_layer < 1:
        raise ValueError(f"n_layer={n_layer}: must be >= 1")
    if num_stages < 1:
        raise ValueError(f"num_stages={num_stages}: must be >= 1")
    if num_stages > n_layer:
        raise ValueError(
            f"cannot split {n_layer} blocks into {num_stages} stages: each stage needs at least one block"
        )
    base, extra = divmod(n_layer, num_stages)
    ranges = []
    start = 0
    for stage_idx in range(num_stages):
        size = base + (1 if stage_idx < extra else 0)
        ranges.append((start, start + size))
        start += size
    assert start == n_layer
    return ranges


class StageModule(nn.Module):
    """One pipeline stage of a GPT: its blocks, plus the embeddings (first) and head (last).

    forward: the first stage takes token ids (B, T) long, the others hidden states (B, T, C)
    float; the last stage returns logits (B, T, V), the others hidden states (B, T, C).

    Args:
        model: the GPT whose submodules this stage references (not copies).
        stage_idx: position of this stage in the pipeline, 0..num_stages-1.
        num_stages: number of stages K.
        block_range: half-open range [start, end) of model.h that this stage runs.
    """

    def __init__(self, model: GPT, stage_idx: int, num_stages: int, block_range: tuple[int, int]):
        super().__init__()
        start, end = block_range
        if not 0 <= stage_idx < num_stages:
            raise ValueError(f"stage_idx={stage_idx}: must be in [0, {num_stages})")
        if not 0 <= start <= end <= len(model.h):
            raise ValueError(f"block_range={block_range}: must lie within [0, {len(model.h)}]")
        self.stage_idx = stage_idx
        self.num_stages = num_stages
        self.is_first = stage_idx == 0
        self.is_last = stage_idx == num_stages - 1
        self.block_start, self.block_end = start, end
        self.block_size = model.cfg.block_size
        self.n_embd = model.cfg.n_embd
        # Modules a stage does not own are None (nn.Module registers None as "no submodule").
        self.wte: Optional[nn.Embedding] = model.wte if self.is_first else None
        self.wpe: Optional[nn.Embedding] = model.wpe if self.is_first else None
        self.drop: Optional[nn.Dropout] = model.drop if self.is_first else None
        self.h = nn.ModuleList(model.h[start:end])
        self.ln_f: Optional[nn.LayerNorm] = model.ln_f if self.is_last else None
        self.lm_head: Optional[nn.Linear] = model.lm_head if self.is_last else None

    def extra_repr(self) -> str:
        return (f"stage_idx={self.stage_idx}, num_stages={self.num_stages}, "
                f"blocks=[{self.block_start}, {self.block_end})")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_first:
            if x.dim() != 2 or x.dtype != torch.long:
                raise ValueError(f"stage 0 takes token ids (B, T) long, got {tuple(x.shape)} {x.dtype}")
            check_seq_len(x.shape[1], self.block_size)
            x = embed(self.wte, self.wpe, self.drop, x)  # (B, T, C)
        else:
            if x.dim() != 3 or x.shape[2] != self.n_embd or not x.is_floating_point():
                raise ValueError(
                    f"stage {self.stage_idx} takes hidden states (B, T, {self.n_embd}) float, "
                    f"got {tuple(x.shape)} {x.dtype}"
                )
            check_seq_len(x.shape[1], self.block_size)
        for block in self.h:
            x = block(x)
        if self.is_last:
            return self.lm_head(self.ln_f(x))  # (B, T, V)
        return x  # (B, T, C)

    def model_name(self, name: str) -> str:
        """Translate a parameter name of this stage ("h.0.ln_1.weight") to the GPT's ("h.3.ln_1.weight")."""
        if name.startswith("h."):
            local, _, rest = name[2:].partition(".")
            return f"h.{int(local) + self.block_start}.{rest}"
        return name

    def named_model_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """named_parameters() under the whole model's names (stable across num_stages)."""
        for name, p in self.named_parameters():
            yield self.model_name(name), p


def split_gpt(model: GPT, num_stages: int) -> list[StageModule]:
    """Cut `model` into num_stages StageModules that reference (not copy) its submodules.

    Args:
        model: the whole GPT.
        num_stages: number of stages K, 1 <= K <= model.cfg.n_layer.
    Returns:
        K stage modules, stage_idx 0..K-1, together owning every parameter exactly once.
    Raises:
        ValueError: an impossible split (see partition_layers).
    """
    ranges = partition_layers(len(model.h), num_stages)
    return [StageModule(model, k, num_stages, r) for k, r in enumerate(ranges)]


def build_stages(cfg: ModelConfig, num_stages: int, seed: int) -> list[StageModule]:
    """Seed torch's global generator, build the whole GPT, then split it.

    Because the whole model is initialized before the split, the weights depend on the seed
    only, never on num_stages.

    Args:
        cfg: model config (vocab_size >= 1).
        num_stages: number of stages K.
        seed: passed to torch.manual_seed.
    Returns:
        K stage modules (see split_gpt).
    Raises:
        ValueError: an impossible split or a bad config.
    """
    partition_layers(cfg.n_layer, num_stages)  # fail before spending time on the init
    torch.manual_seed(seed)
    return split_gpt(GPT(cfg), num_stages)
