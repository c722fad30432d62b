"""`pipenag plan`: what a run will cost before any work: memory per stage, FLOPs, time per update.

    pipenag plan --config configs/paper-base.toml
    pipenag plan --config configs/paper-base.toml --tflops 989 --json
    pipenag plan --config configs/tiny.toml --calibrate      # times the real stages on this machine

Nothing is allocated: the model is built on the meta device (shapes only) and everything else
is arithmetic on those shapes, so a 1B-parameter config plans in a second on a laptop. Per
stage (all fp32, the dtype both engines compute in):

- params: the stage's weights (the live version).
- grads: one gradient per parameter, held from the first backward of an update to its step.
- optimizer: the state the stage's optimizer creates, derived from its code (and checked
  against the real state after a step by tests/test_plan.py): AdamW 2x params plus a 0-d
  float32 `step` per parameter; NAdam (nesterov, nesterov-nows) 2x plus `step` and
  `mu_product`; DelayedNesterov (nesterov-sgd) 1x plus `step`; SGD 1x with momentum, nothing
  without; Muon: a momentum buffer (1x) on the blocks' matrices (hidden_matrix_params) and
  AdamW on the rest; basis-rotation: on each hidden m x n matrix Adam's 2x, `step`, and per
  side a covariance and a basis (2 m^2 + 2 n^2 values), AdamW on the rest; the "-ef"
  optimizers add `prev_update` (1x) to their base.
- stash: the frozen weight copies the simulator's StageRunner holds at most,
  Schedule.versions_kept(k) - 1, plus one with forward weight prediction. (The runtime, with
  stashing, builds each graph that waits across a step on a frozen copy, so a stage with a
  delay holds one copy more there: see pipenag/engine/stage.py.) With forward prediction and
  stashing each microbatch in flight also keeps its own predicted weights ("predicted").
- activations: the tensors autograd saves for the backward of one microbatch, times the
  microbatches whose graph the stage holds at once: d_k for the asynchronous schedules, M for
  gpipe, min(K - k, M) for 1f1b. A stage that recomputes its forward (stash off with a delay)
  holds only the d_k inputs plus one graph. The saved bytes per microbatch of B sequences of
  T tokens (N = B T), width C, nh heads, vocabulary V, dropout 0 and a flash-style attention
  that saves no T x T matrix (torch's SDPA on CPU and CUDA):
      per block    4 N (16 C + 4 + nh)   (LayerNorm inputs, means and rstds, the qkv, attention
                                          output and log-sum-exp, the MLP's 4C pre- and
                                          post-GELU, the Linear inputs)
      first stage  + 8 N + 8 T           (token and position ids)
      last stage   + 4 N (2 C + 2) + 4 N V + 8 N + 4   (ln_f, lm_head's input, the
                                          log-softmax of the logits, the targets)
  tests/test_plan.py checks it against the bytes saved_tensors_hooks sees on CPU.
- recv: the dist engine's posted receives (pipenag.runtime.executor: a window of
  max(M, max d_k) + 1 + train.eval_batches messages per incoming direction) times the bytes of
  one message after its codec (pipenag.link.messages). The simulator has none.

FLOPs per token (flops_per_token) are the usual 6 N + 12 L C T of the PaLM paper's appendix B
and nanoGPT's estimate_mfu: N the parameters that take part in matmuls (all but the wte and
wpe tables; our lm_head is untied, so it counts), L blocks, width C, context T; the attention
term counts the full T x T (causal masking halves the real work). The time per update is the
event model of pipenag.wallclock.predict with the stage costs either measured (--calibrate) or
taken from those FLOPs at --tflops (forward 1/3, backward 2/3 of 6 N; the step left out).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from pipenag.config import Config, ModelConfig

ELEMENT_BYTES = 4  # fp32 master weights, gradients and state
SCALAR_BYTES = 4  # a 0-d float32 tensor (torch's Adam-family `step`)

PEAK_TFLOPS = {  # dense bf16 tensor-core peaks (vendor data sheets), matched in this order
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 PCIE": 756.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 125.0,
    "V100": 125.0,
}
"""Known device peaks in TFLOP/s by a substring of torch.cuda.get_device_name()."""


def plan_vocab_size(cfg: Config) -> int:
    """The vocabulary the run's model gets: model.vocab_size, else the tokenizer's size
    (256 for bytes; 50257 for gpt2; data.bpe_vocab_size for bpe, its upper bound)."""
    if cfg.model.vocab_size:
        return cfg.model.vocab_size
    return {"bytes": 256, "gpt2": GPT2_VOCAB_SIZE}.get(cfg.data.tokenizer, cfg.data.bpe_vocab_size)


GPT2_VOCAB_SIZE = 50257  # GPT-2's byte-level BPE (pipenag.data.tokenizer, data.tokenizer = "gpt2")


def meta_stages(cfg: Config, num_stages: int) -> tuple[ModelConfig, list]:
    """The run's GPT on the meta device (shapes, no storage), split into stages."""
    from pipenag.model import GPT
    from pipenag.split import split_gpt

    model_cfg = dataclasses.replace(cfg.model, vocab_size=plan_vocab_size(cfg))
    with torch.device("meta"):
        model = GPT(model_cfg)
    return model_cfg, split_gpt(model, num_stages)


def _nbytes(p: torch.Tensor) -> int:
    return p.numel() * ELEMENT_BYTES


def _adamw_bytes(params) -> int:
    return sum(2 * _nbytes(p) + SCALAR_BYTES for p in params)  # exp_avg, exp_avg_sq, step


def optimizer_state_bytes(name: str, module: torch.nn.Module, momentum: float = -1.0) -> int:
    """Bytes of the state `build_optimizer(name, module)` holds after its first step (every
    parameter with a gradient); see the module docstring for where each term comes from.

    Args:
        name: an optimizer name (pipenag.optim.factory.OPTIMIZERS).
        module: the stage (meta tensors are fine: only shapes are read).
        momentum: optim.momentum (< 0: the optimizer's default); only sgd's state depends on it.
    Raises:
        ValueError: an unknown name.
    """
    from pipenag.optim.composite import hidden_matrix_params
    from pipenag.optim.factory import ERROR_FEEDBACK, OPTIMIZERS

    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")
    params = list(module.parameters())
    if name in ERROR_FEEDBACK:  # prev_update u_{t-1} per parameter
        return optimizer_state_bytes(ERROR_FEEDBACK[name], module, momentum) + sum(_nbytes(p) for p in params)
    if name == "adamw":
        return _adamw_bytes(params)
    if name in ("nesterov", "nesterov-nows"):  # NAdam: + mu_product
        return _adamw_bytes(params) + SCALAR_BYTES * len(params)
    if name == "nesterov-sgd":  # DelayedNesterov: momentum_buffer, step
        return sum(_nbytes(p) + SCALAR_BYTES for p in params)
    if name == "sgd":  # torch SGD keeps a momentum_buffer only when momentum != 0 (default 0)
        return sum(_nbytes(p) for p in params) if momentum > 0 else 0
    hidden, rest = hidden_matrix_params(module)
    if name == "muon":  # torch Muon: momentum_buffer only
        return sum(_nbytes(p) for p in hidden) + _adamw_bytes(rest)
    assert name == "basis-rotation", name
    total = _adamw_bytes(rest)
    for p in hidden:  # geometry "bi" (the factory's): both sides rotated
        m, n = p.shape
        total += 2 * _nbytes(p) + SCALAR_BYTES + 2 * (m * m + n * n) * ELEMENT_BYTES
    return total


def saved_activation_bytes(model_cfg: ModelConfig, batch: int, num_blocks: int, is_first: bool,
                           is_last: bool) -> int:
    """Bytes autograd saves for the backward of one microbatch of `batch` sequences at a stage
    with `num_blocks` blocks (the formula of the module docstring; dropout 0)."""
    T, C, nh, V = model_cfg.block_size, model_cfg.n_embd, model_cfg.n_head, model_cfg.vocab_size
    N = batch * T
    total = num_blocks * 4 * N * (16 * C + 4 + nh)
    if is_first:
        total += 8 * N + 8 * T
    if is_last:
        total += 4 * N * (2 * C + 2) + 4 * N * V + 8 * N + 4
    return total


def graphs_held(resolved, stage_idx: int) -> int:
    """Microbatches whose forward stage k has run and whose backward it has not, at most."""
    s = resolved.schedule
    if s.asynchronous:
        return s.depth(stage_idx)
    if s.name == "gpipe":
        return s.num_microbatches
    return min(s.delay(stage_idx) + 1, s.num_microbatches)  # 1f1b: warm-up + 1


def keeps_graph(resolved, stage_idx: int) -> bool:
    """Whether stage k keeps each forward's graph (False: it recomputes at the backward),
    StageRunner.forward's rule."""
    tau = resolved.schedule.staleness(stage_idx)
    if resolved.predict and tau > 0:
        return False
    return resolved.stash or tau == 0


def flops_per_token(model_cfg: ModelConfig) -> int:
    """Training FLOPs (forward + backward) per token: 6 N + 12 L C T (module docstring)."""
    from pipenag.model import GPT

    with torch.device("meta"):
        n = GPT(model_cfg).num_params(non_embedding=True)
    return 6 * n + 12 * model_cfg.n_layer * model_cfg.n_embd * model_cfg.block_size


def _stage_flops_per_token(model_cfg: ModelConfig, stage) -> int:
    n = sum(p.numel() for name, p in stage.named_parameters() if not name.startswith(("wte.", "wpe.")))
    return 6 * n + 12 * len(stage.h) * model_cfg.n_embd * model_cfg.block_size


def peak_tflops(cfg: Config, device: Optional[torch.device] = None) -> Optional[float]:
    """The device's peak TFLOP/s for MFU: run.peak_tflops if set, else looked up by the CUDA
    device name in PEAK_TFLOPS; None when unknown (a CPU, an unlisted GPU)."""
    if cfg.run.peak_tflops > 0:
        return cfg.run.peak_tflops
    if device is None or device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).upper()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


@dataclass
class StagePlan:
    stage: int
    blocks: int
    params: int  # parameter count
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    stash_copies: int
    stash_bytes: int
    predicted_bytes: int
    activation_bytes_per_microbatch: int
    microbatches_held: int
    activation_bytes: int
    recv_bytes: int
    flops_per_microbatch: int

    @property
    def total_bytes(self) -> int:
        return (self.param_bytes + self.grad_bytes + self.optimizer_bytes + self.stash_bytes
                + self.predicted_bytes + self.activation_bytes + self.recv_bytes)


def plan_stages(cfg: Config) -> list[StagePlan]:
    """The per-stage memory (and FLOPs) of `cfg`'s run, without allocating the model.

    Raises:
        ValueError: anything the config, the method or the split rejects.
    """
    from pipenag.link.messages import message_bytes
    from pipenag.methods import resolve
    from pipenag.split import partition_layers

    resolved = resolve(cfg)
    s = resolved.schedule
    K, M = s.num_stages, s.num_microbatches
    partition_layers(cfg.model.n_layer, K)
    model_cfg, stages = meta_stages(cfg, K)
    B, T, C = cfg.data.microbatch_size, model_cfg.block_size, model_cfg.n_embd
    window = max(M, max(s.depths) if s.asynchronous else 0) + 1 + cfg.train.eval_batches
    out = []
    for k, stage in enumerate(stages):
        param_bytes = sum(_nbytes(p) for p in stage.parameters())
        tau = s.staleness(k)
        copies = s.versions_kept(k) - 1 + (1 if resolved.forward_prediction and tau > 0 else 0)
        held = graphs_held(resolved, k)
        per_mb = saved_activation_bytes(model_cfg, B, len(stage.h), stage.is_first, stage.is_last)
        if keeps_graph(resolved, k):
            act = held * per_mb
        else:  # the inputs in flight, and one graph while recomputing
            inp = 8 * B * T if stage.is_first else 4 * B * T * C
            act = held * inp + per_mb
        predicted = held * param_bytes if resolved.forward_prediction and tau > 0 and resolved.stash else 0
        recv = (window * message_bytes(cfg, "activation") if k > 0 else 0) + \
               (window * message_bytes(cfg, "gradient") if k < K - 1 else 0)
        out.append(StagePlan(
            stage=k, blocks=len(stage.h), params=sum(p.numel() for p in stage.parameters()),
            param_bytes=param_bytes, grad_bytes=param_bytes,
            optimizer_bytes=optimizer_state_bytes(resolved.optimizer, stage, cfg.optim.momentum),
            stash_copies=copies, stash_bytes=copies * param_bytes, predicted_bytes=predicted,
            activation_bytes_per_microbatch=per_mb, microbatches_held=held, activation_bytes=act,
            recv_bytes=recv if K > 1 else 0,
            flops_per_microbatch=_stage_flops_per_token(model_cfg, stage) * B * T))
    return out


def flop_costs(cfg: Config, stages: list[StagePlan], tflops: float):
    """pipenag.wallclock.StageCosts from the FLOPs at `tflops` TFLOP/s (forward a third,
    backward two thirds, the step free)."""
    from pipenag.wallclock import StageCosts

    if not tflops > 0:
        raise ValueError(f"--tflops={tflops}: must be > 0")
    secs = [st.flops_per_microbatch / (tflops * 1e12) for st in stages]
    return StageCosts(tuple(t / 3 for t in secs), tuple(2 * t / 3 for t in secs), tuple(0.0 for _ in secs),
                      threads=0, machine=f"{tflops:g} TFLOP/s (FLOP model)")


def _fmt(num_bytes: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if num_bytes >= size:
            return f"{num_bytes / size:.2f} {unit}"
    return f"{num_bytes} B"


def format_table(stages: list[StagePlan]) -> str:
    """The per-stage table and the total that `pipenag plan` prints."""
    head = ("stage", "blocks", "params", "weights", "grads", "optimizer", "stash", "activations", "recv (dist)",
            "total")
    rows = [head]
    for st in stages:
        rows.append((str(st.stage), str(st.blocks), f"{st.params:,}", _fmt(st.param_bytes), _fmt(st.grad_bytes),
                     _fmt(st.optimizer_bytes), f"{st.stash_copies + st.predicted_bytes // max(1, st.param_bytes)} x = "
                     f"{_fmt(st.stash_bytes + st.predicted_bytes)}",
                     f"{st.microbatches_held} x {_fmt(st.activation_bytes_per_microbatch)} = "
                     f"{_fmt(st.activation_bytes)}", _fmt(st.recv_bytes), _fmt(st.total_bytes)))
    rows.append(("all", str(sum(st.blocks for st in stages)), f"{sum(st.params for st in stages):,}",
                 *(_fmt(sum(getattr(st, f) for st in stages)) for f in ("param_bytes", "grad_bytes",
                                                                          "optimizer_bytes")),
                 _fmt(sum(st.stash_bytes + st.predicted_bytes for st in stages)),
                 _fmt(sum(st.activation_bytes for st in stages)), _fmt(sum(st.recv_bytes for st in stages)),
                 _fmt(sum(st.total_bytes for st in stages))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)


def plan(cfg: Config, calibrate: bool = False, tflops: float = 0.0) -> dict:
    """Everything `pipenag plan` reports, as a JSON-ready dict.

    Args:
        cfg: the run's config.
        calibrate: time the real stages on this machine (pipenag.wallclock.calibrate; builds
            the model) and predict the time per update from those costs.
        tflops: else, if > 0, predict it from the FLOPs at this many TFLOP/s.
    """
    from pipenag.methods import resolve
    from pipenag.run import tokens_per_update
    from pipenag.wallclock import calibrate as run_calibration
    from pipenag.wallclock import predict

    resolved = resolve(cfg)
    stages = plan_stages(cfg)
    model_cfg = dataclasses.replace(cfg.model, vocab_size=plan_vocab_size(cfg))
    tokens = tokens_per_update(cfg, resolved.schedule.num_microbatches)
    out = {"method": resolved.method.name, "schedule": resolved.schedule.name,
           "num_stages": resolved.schedule.num_stages, "num_microbatches": resolved.schedule.num_microbatches,
           "optimizer": resolved.optimizer, "stash": resolved.stash, "vocab_size": model_cfg.vocab_size,
           "num_params": sum(st.params for st in stages), "flops_per_token": flops_per_token(model_cfg),
           "tokens_per_update": tokens, "stages": [dict(asdict(st), total_bytes=st.total_bytes) for st in stages],
           "total_bytes": sum(st.total_bytes for st in stages), "time": None}
    costs, source = None, ""
    if calibrate:
        costs, source = run_calibration(cfg), "calibrated on this machine"
    elif tflops:
        costs, source = flop_costs(cfg, stages, tflops), f"FLOPs at {tflops:g} TFLOP/s"
    if costs is not None:
        p = predict(cfg, costs)
        steady = p.steady_s_per_update
        out["time"] = {"source": source, "s_per_update": steady, "run_s_per_update": p.run_s_per_update,
                       "run_hours": p.run_s_per_update * cfg.train.steps / 3600,
                       "tokens_per_s": tokens / steady if steady > 0 else None}
    return out


def format_plan(result: dict) -> str:
    """The text `pipenag plan` prints."""
    stages = [StagePlan(**{k: v for k, v in st.items() if k != "total_bytes"}) for st in result["stages"]]
    lines = [f"plan: method {result['method']} ({result['schedule']}, K={result['num_stages']}, "
             f"M={result['num_microbatches']}, optimizer {result['optimizer']}, stash "
             f"{'on' if result['stash'] else 'off'}), {result['num_params']:,} parameters, vocab "
             f"{result['vocab_size']}, {result['flops_per_token'] / 1e9:.3g} GFLOP per token (6N + 12LCT)",
             "memory per stage (fp32; stash = weight copies; activations = microbatches held x saved bytes):",
             format_table(stages)]
    t = result["time"]
    if t is None:
        lines.append("time per update: pass --calibrate (measure here) or --tflops X (the device's TFLOP/s)")
    else:
        lines.append(f"time per update ({t['source']}): {t['s_per_update'] * 1e3:.3g} ms steady, "
                     f"{t['run_hours']:.3g} h for the run, {t['tokens_per_s']:,.0f} tokens/s")
    return "\n".join(lines)


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calibrate", action="store_true",
                        help="time the stages on this machine (builds the model) and predict the time per update")
    parser.add_argument("--tflops", type=float, default=0.0,
                        help="predict the time per update from the FLOPs at this device TFLOP/s")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of the table")


def plan_main(cfg: Config, calibrate: bool = False, tflops: float = 0.0, as_json: bool = False) -> int:
    """Entry point of `pipenag plan`; returns the exit status."""
    if tflops < 0:
        raise ValueError(f"--tflops={tflops}: must be >= 0")
    result = plan(cfg, calibrate=calibrate, tflops=tflops)
    print(json.dumps(result, sort_keys=True) if as_json else format_plan(result))
    return 0
