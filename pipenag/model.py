"""A nanoGPT-style decoder-only transformer, written once and split into stages by pipenag.split.

    python -c "from pipenag.config import ModelConfig; from pipenag.model import GPT; print(GPT(ModelConfig(vocab_size=256)).num_params())"

Module names follow nanoGPT (wte, wpe, drop, h, ln_f, lm_head; per block ln_1, attn, ln_2, mlp
with c_attn, c_proj, c_fc) so that the split function and checkpoints can talk about modules by
name. Differences from nanoGPT: the modules sit directly on GPT (no `transformer` ModuleDict),
lm_head is not tied to wte (a tied weight would live on both the first and the last stage of a
pipeline), and forward returns logits only; the loss is `lm_loss`, the one loss function every
engine uses.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipenag.config import ModelConfig


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.n_embd = cfg.n_embd
        self.dropout = cfg.dropout
        # query, key and value projections for all heads in one matmul
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        hs = C // self.n_head
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


def check_seq_len(T: int, block_size: int) -> None:
    """Raise ValueError when a sequence is longer than the learned position table."""
    if T > block_size:
        raise ValueError(f"cannot forward a sequence of length {T}: block_size is only {block_size}")


def embed(wte: nn.Embedding, wpe: nn.Embedding, drop: nn.Dropout, idx: torch.Tensor) -> torch.Tensor:
    """Token plus learned position embeddings of `idx` (B, T) -> (B, T, C).

    A free function so that GPT and the first pipeline stage run the very same ops.
    """
    T = idx.shape[1]
    pos = torch.arange(0, T, dtype=torch.long, device=idx.device)  # (T,)
    return drop(wte(idx) + wpe(pos))  # (B, T, C)


class GPT(nn.Module):
    """The whole model: forward(idx (B, T) long) -> logits (B, T, vocab_size).

    Args:
        cfg: the model config; cfg.vocab_size must already be set (>= 1).
    Raises:
        ValueError: vocab_size < 1.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size < 1:
            raise ValueError(
                f"model.vocab_size={cfg.vocab_size}: must be >= 1 to build the model "
                "(0 means 'take it from the tokenizer'; set it before building)"
            )
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=cfg.unigram_head)

        # nanoGPT init: N(0, 0.02) everywhere, zero biases, LayerNorm at (1, 0), and the two
        # projections that write into the residual stream scaled down by 1/sqrt(2 n_layer)
        # (GPT-2 paper) so the residual variance does not grow with depth. All draws come
        # from the global generator in a fixed module order: torch.manual_seed fixes them.
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = False) -> int:
        """Number of parameters; with non_embedding=True the wte and wpe tables are left out."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wte.weight.numel() + self.wpe.weight.numel()
        return n

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, T) long -> logits (B, T, vocab_size); ValueError if T > block_size."""
        check_seq_len(idx.shape[1], self.cfg.block_size)
        x = embed(self.wte, self.wpe, self.drop, idx)  # (B, T, C)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))  # (B, T, V)


@torch.no_grad()
def set_unigram_bias(lm_head: nn.Linear, ids: torch.Tensor) -> None:
    """Set lm_head.bias to the centered log of the add-one smoothed unigram distribution of
    the token ids `ids` (1-D), so that the untrained model predicts the unigram distribution.

    Raises:
        ValueError: lm_head has no bias (model.unigram_head is off).
    """
    if lm_head.bias is None:
        raise ValueError("set_unigram_bias: lm_head has no bias (set model.unigram_head = true)")
    counts = torch.bincount(ids.reshape(-1).long(), minlength=lm_head.out_features)[: lm_head.out_features]
    logp = (counts.double() + 1.0).log()
    lm_head.bias.copy_((logp - logp.mean()).to(lm_head.bias.dtype))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy over all B*T positions: the loss every engine uses.

    Args:
        logits: (B, T, V) float.
        targets: (B, T) long, the token that follows each input position.
    Returns:
        A scalar tensor.
    Raises:
        ValueError: when the leading shapes of logits and targets differ.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"logits of shape {tuple(logits.shape)} do not match targets of shape {tuple(targets.shape)}"
        )
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
