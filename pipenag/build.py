"""From a Config to the pieces both engines run: stage modules, optimizers, learning rates.

    from pipenag import Config, build_pipeline
    parts = build_pipeline(Config(), vocab_size=256)
    print(parts.describe()); sim = parts.simulator()

Every process builds the whole model from the seed and keeps its stages, so that the initial
weights are identical whatever the engine and the number of processes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from pipenag.config import Config, ModelConfig, OptimConfig
from pipenag.engine.sim import Simulator
from pipenag.engine.stage import StageRunner, compute_call, make_runner
from pipenag.link.messages import codecs
from pipenag.methods import ResolvedMethod, resolve
from pipenag.model import lm_loss, set_unigram_bias
from pipenag.optim import build_optimizer, delay_discount_lr, warmup_cosine_lr
from pipenag.split import build_stages


@dataclass
class PipelineParts:
    cfg: Config
    resolved: ResolvedMethod
    model_cfg: ModelConfig
    stages: list
    optimizers: list
    lr_fns: list

    def describe(self) -> str:
        r = self.resolved
        s = r.schedule
        text = (f"method {r.method.name}: schedule {s.name}, K={s.num_stages}, M={s.num_microbatches}, "
                f"stash {'on' if r.stash else 'off'}, optimizer {r.optimizer}, {self.num_params:,} parameters")
        if r.delay_compensation:
            text += f", delay compensation lambda {r.delay_compensation:g}"
        if s.asynchronous:
            K = s.num_stages
            text += (f"; in flight {list(s.depths)}{' (auto)' if self.cfg.pipeline.in_flight == 'auto' else ''}, "
                     f"staleness {[s.staleness(k) for k in range(K)]}")
        act, grad = codecs(self.cfg)
        if act is not None or grad is not None:
            text += f"; link compression: activations {act.name if act else 'none'}, gradients {grad.name if grad else 'none'}"
        return text

    def simulator(self, record: Optional[list] = None) -> Simulator:
        r = self.resolved
        act, grad = codecs(self.cfg)
        return Simulator(self.stages, lm_loss, self.optimizers, r.schedule, stash=r.stash, lr_fns=self.lr_fns,
                         grad_clip=self.cfg.optim.grad_clip, predict=r.predict,
                         forward_prediction=r.forward_prediction, record=record, activation_codec=act,
                         gradient_codec=grad, delay_compensation=r.delay_compensation,
                         autocast_dtype=compute_dtype(self.cfg))

    def runner(self, stage_idx: int, record: Optional[list] = None) -> StageRunner:
        r = self.resolved
        return make_runner(r.schedule, stage_idx, self.stages[stage_idx], self.optimizers[stage_idx],
                           lm_loss, stash=r.stash, lr_fn=self.lr_fns[stage_idx],
                           grad_clip=self.cfg.optim.grad_clip, predict=r.predict,
                           forward_prediction=r.forward_prediction, record=record,
                           delay_compensation=r.delay_compensation, autocast_dtype=compute_dtype(self.cfg))

    @property
    def num_params(self) -> int:
        return sum(p.numel() for s in self.stages for p in s.parameters())


def lr_function(cfg: Config, resolved: ResolvedMethod, stage_idx: int) -> Callable[[int], float]:
    """update (1-based) -> lr of one stage: warm-up + cosine, times PipeMare's delay discount."""
    o = cfg.optim
    total = resolved.num_updates
    tau = resolved.schedule.staleness(stage_idx)
    delay_lr, anneal = resolved.delay_lr, resolved.delay_lr_anneal

    def lr_at(update: int) -> float:
        lr = warmup_cosine_lr(min(update, total), total, o.lr, o.warmup_fraction, o.min_lr_ratio)
        if delay_lr and tau > 0:
            lr = delay_discount_lr(lr, tau, update, anneal)
        return lr

    return lr_at


def stage_optimizer(o: OptimConfig, name: str, module: torch.nn.Module, stage_idx: int,
                    num_stages: int, staleness: Optional[list[int]] = None) -> torch.optim.Optimizer:
    """The optimizer `name` over one stage's module, with the [optim] settings of the config
    (`staleness`: every stage's, for nesterov-nows; None = K-1-k)."""
    return build_optimizer(name, module, lr=o.lr, weight_decay=o.weight_decay,
                           momentum=o.momentum if o.momentum >= 0 else None, momentum_decay=o.momentum_decay,
                           momentum_schedule=o.momentum_schedule, discount=o.discount,
                           stage_idx=stage_idx, num_stages=num_stages, staleness=staleness, ef_scale=o.ef_scale)


def build_pipeline(cfg: Config, vocab_size: int, device: torch.device | str = "cpu",
                   train_ids: Optional[torch.Tensor] = None) -> PipelineParts:
    """Resolve the method, build the model split into stages (on `device`), and one optimizer
    per stage.

    Args:
        cfg: the run's config.
        vocab_size: the tokenizer's (used when model.vocab_size is 0).
        device: where the stages live.
        train_ids: the training tokens; needed with model.unigram_head (the head's bias starts
            at their log unigram distribution).
    Raises:
        ValueError: model.unigram_head without train_ids, or anything resolve() rejects.
    """
    resolved = resolve(cfg)
    model_cfg = dataclasses.replace(cfg.model, vocab_size=cfg.model.vocab_size or vocab_size)
    K = resolved.schedule.num_stages
    stages = build_stages(model_cfg, K, seed=cfg.train.seed)
    if model_cfg.unigram_head:
        if train_ids is None:
            raise ValueError("model.unigram_head=true: build_pipeline needs the training tokens (train_ids)")
        set_unigram_bias(stages[-1].lm_head, train_ids)
    stages = [stage.to(device) for stage in stages]
    staleness = [resolved.schedule.staleness(k) for k in range(K)]
    optimizers = [stage_optimizer(cfg.optim, resolved.optimizer, stage, k, K, staleness)
                  for k, stage in enumerate(stages)]
    lr_fns = [lr_function(cfg, resolved, k) for k in range(K)]
    return PipelineParts(cfg, resolved, model_cfg, stages, optimizers, lr_fns)


def memory_report(parts: PipelineParts) -> list[dict]:
    """Per stage: the weight versions the schedule makes it hold at most (the live one
    included), its parameter bytes and its optimizer's state bytes (per-parameter tensors)."""
    schedule = parts.resolved.schedule
    report = []
    for k, (stage, opt) in enumerate(zip(parts.stages, parts.optimizers)):
        state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                    if isinstance(v, torch.Tensor))
        # Forward weight prediction also reads the version before the forward's.
        extra = 1 if parts.resolved.forward_prediction and schedule.staleness(k) > 0 else 0
        report.append({"weight_versions": schedule.versions_kept(k) + extra,
                       "param_bytes": sum(p.numel() * p.element_size() for p in stage.parameters()),
                       "optimizer_state_bytes": state})
    return report


def compute_dtype(cfg: Config) -> Optional[torch.dtype]:
    """The autocast dtype of run.dtype (None for float32)."""
    return None if cfg.run.dtype == "float32" else getattr(torch, cfg.run.dtype)


@torch.no_grad()
def evaluate(stages, batches, activation_codec=None, autocast_dtype: Optional[torch.dtype] = None) -> float:
    """Mean loss of the chained stage modules (their current weights) over (x, y) batches, with
    the activations between stages through `activation_codec` (as the runtime sends them) and
    the compute in `autocast_dtype` (compute_call)."""
    total = 0.0
    for x, y in batches:
        for k, stage in enumerate(stages):
            x = compute_call(stage, x, autocast_dtype)
            if activation_codec is not None and k < len(stages) - 1:
                x = activation_codec.roundtrip(x)
        total += float(lm_loss(x, y))
    return total / len(batches)
