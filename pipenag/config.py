"""Run configuration: nested dataclasses, loaded from TOML, overridden from the command line.

    python -m pipenag train --config configs/tiny.toml --optim.lr=1e-3 --pipeline.num_stages=2

Every field carries a docstring (the string right below it). `load_config` applies, in order:
the dataclass defaults, the TOML file, then `--section.key=value` overrides; each section checks
itself in `__post_init__` and raises ValueError naming the field and the bad value. The resolved
config is saved as JSON in the run folder (`Config.to_dict`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _check(cond: bool, name: str, value: Any, why: str) -> None:
    if not cond:
        raise ValueError(f"{name}={value!r}: {why}")


def _check_choices(section) -> None:
    """Every Literal-typed field of a config section holds one of its allowed values."""
    prefix = _SECTION_NAMES[type(section).__name__]
    for name, typ in _field_types(type(section)).items():
        choices = _choices(typ)
        value = getattr(section, name)
        if choices and value not in choices:
            raise ValueError(f"{prefix}.{name}={value!r}: must be one of "
                             f"{', '.join(repr(c) for c in choices)}")


def _choices(typ) -> tuple:
    """The allowed values of a Literal type (or Optional[Literal]), else ()."""
    if typing.get_origin(typ) is typing.Union:
        typ = next(a for a in typing.get_args(typ) if a is not type(None))
    return typing.get_args(typ) if typing.get_origin(typ) is Literal else ()


# The names users type. Methods and optimizers are listed here, where the config is checked,
# and pipenag.methods / pipenag.optim.factory check at import that they define exactly these.
MethodName = Literal["gpipe", "1f1b", "pipedream", "2bw", "pipedream-lr", "pipemare", "nesterov",
                     "nesterov-nows", "nesterov-sgd", "basis-rotation", "muon", "pipedream-wp", "muon-wp",
                     "pipedream-ef", "muon-ef", "muon-wp-ef", "2bw-muon-ef", "pipedream-dc", "zb-h1", "gpipe-muon"]
OptimizerName = Literal["", "adamw", "nesterov", "nesterov-nows", "nesterov-sgd", "sgd", "basis-rotation", "muon",
                        "adamw-ef", "muon-ef"]
ScheduleName = Literal["gpipe", "1f1b", "pipedream", "2bw", "zb-h1"]
CodecName = Literal["none", "int8", "int4", "int4-hadamard"]  # pipenag.link.codec.CODECS


@dataclass
class ModelConfig:
    n_layer: int = 8
    """Number of transformer blocks (the paper: one block per stage)."""
    n_head: int = 4
    """Attention heads per block; must divide n_embd."""
    n_embd: int = 128
    """Width of the residual stream."""
    block_size: int = 128
    """Context length in tokens (sequence length of every training example)."""
    vocab_size: int = 0
    """Vocabulary size; 0 means: take it from the tokenizer."""
    dropout: float = 0.0
    """Dropout probability (0 keeps runs deterministic and simulator == runtime)."""
    bias: bool = True
    """Biases in Linear and LayerNorm layers."""
    unigram_head: bool = False
    """Give lm_head a bias, set at build time to the centered log unigram distribution of the
    training tokens (add-one smoothed), so that training starts at the unigram loss instead of
    log(vocab_size). Without it the blocks learn the unigram by writing a large constant into
    the residual stream; under stale gradients (deep asynchronous pipelines) that constant
    overshoots and swamps the token signal, and runs sit on a plateau near the unigram loss
    (docs/results/convergence.md)."""

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "n_embd", "block_size"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= 1, f"model.{name}", value, "must be a positive integer")
        _check(self.n_embd % self.n_head == 0, "model.n_embd", self.n_embd,
               f"must be divisible by model.n_head={self.n_head}")
        _check(self.vocab_size >= 0, "model.vocab_size", self.vocab_size, "must be >= 0")
        _check(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "must be in [0, 1)")


@dataclass
class DataConfig:
    source: str = "builtin"
    """Corpus: "builtin" (the Python standard library's sources and docs, offline), a path to a
    text file or a folder of text files, "hf:NAME[:CONFIG]" for a Hugging Face dataset, or
    "shards:DIR" for the memory-mapped token shards that `pipenag data prepare --out DIR` wrote
    (read without loading them; data.tokenizer and data.bpe_vocab_size must match them)."""
    tokenizer: Literal["bytes", "bpe", "gpt2"] = "bytes"
    """"bytes" (256 symbols, no training), "bpe" (trained on the training split, cached) or
    "gpt2" (GPT-2's byte-level BPE, 50257 tokens: fetched once from the Hugging Face Hub into the
    cache, or read from data.tokenizer_path)."""
    tokenizer_path: str = ""
    """A tokenizer.json (Hugging Face `tokenizers` format) to load instead of fetching ("gpt2")
    or training ("bpe") one; offline, "gpt2" needs it (the gpt2 tokenizer.json of the Hub)."""
    bpe_vocab_size: int = 2048
    """Vocabulary size of the BPE tokenizer (a "bpe" tokenizer_path must have this size)."""
    val_fraction: float = 0.05
    """Fraction of the documents held out for validation (a deterministic split)."""
    max_chars: int = 4_000_000
    """Cap on the corpus size in characters, taken in a fixed order (0: no cap)."""
    microbatch_size: int = 8
    """Sequences per microbatch."""
    cache_dir: str = ""
    """Where tokenized corpora and trained tokenizers are cached ("" = ~/.cache/pipenag)."""
    verify_shards: bool = False  # a size and header check per shard is always done: cheap
    """With a "shards:DIR" source: also hash every shard against the manifest's sha256 before
    training (reads each shard once)."""

    def __post_init__(self) -> None:
        _check_choices(self)
        _check(0.0 < self.val_fraction < 1.0, "data.val_fraction", self.val_fraction, "must be in (0, 1)")
        _check(self.microbatch_size >= 1, "data.microbatch_size", self.microbatch_size, "must be >= 1")
        _check(self.bpe_vocab_size >= 260, "data.bpe_vocab_size", self.bpe_vocab_size, "must be >= 260")
        _check(self.max_chars >= 0, "data.max_chars", self.max_chars, "must be >= 0")
        _check(bool(self.source), "data.source", self.source, "must not be empty")


@dataclass
class OptimConfig:
    name: OptimizerName = ""
    """Optimizer ("adamw", "nesterov", "nesterov-sgd", "nesterov-nows", "sgd", "basis-rotation",
    "muon", and "adamw-ef", "muon-ef": those two with error feedback); "" = the method's."""
    lr: float = 3e-4
    """Peak learning rate."""
    weight_decay: float = 0.01
    """Decoupled weight decay, applied to every parameter."""
    momentum: float = -1.0
    """Momentum (beta1 for Adam-type optimizers); < 0 = the method's default."""
    momentum_decay: float = 0.004
    """NAdam's momentum_decay (psi); the warm-up mu_t = beta1 (1 - 0.5 * 0.96^(t psi))."""
    momentum_schedule: Literal["constant", "theory"] = "constant"
    """DelayedNesterov momentum schedule: "constant" or "theory" (gamma_t = (t-2)/t)."""
    discount: bool = True
    """DelayedNesterov: scale the stale gradient by (1 - gamma_t) (the paper's Eq. 10)."""
    warmup_fraction: float = 0.06
    """Fraction of the updates spent in linear learning-rate warm-up."""
    min_lr_ratio: float = 0.1
    """The cosine schedule ends at min_lr_ratio * lr."""
    grad_clip: float = 10.0
    """Per-stage gradient-norm clip (0 disables)."""
    delay_lr_anneal: float = -1.0
    """PipeMare delay discount: updates T over which lr / tau^(1 - t/T) anneals to lr;
    < 0 = the method's default (a fifth of the run)."""
    predict_scale: float = 1.0
    """Forward weight prediction (pipeline.predict_forward): a stage's forward runs at
    w + predict_scale * tau * (w - w_prev)."""
    ef_scale: float = 1.0
    """Error feedback (the "-ef" optimizers, arXiv 2606.30634): the scale c of
    x_{t+1} = x_t - u_t - c (u_t - u_{t-1}), u_t the base optimizer's update; 0 = the base
    optimizer. The issue's default."""
    dc_lambda: float = 0.04  # MXNet's DCASGD default (lamda=0.04), the constant-lambda form
    """Delay compensation (method pipedream-dc, DC-ASGD, Zheng et al., ICML 2017): the gradient
    applied is g + dc_lambda * g * g * (w_now - w_stale); 0 = plain pipedream."""

    def __post_init__(self) -> None:
        _check(self.lr > 0, "optim.lr", self.lr, "must be > 0")
        _check(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "must be >= 0")
        _check(self.momentum < 1.0, "optim.momentum", self.momentum, "must be < 1")
        _check(self.momentum_decay >= 0, "optim.momentum_decay", self.momentum_decay, "must be >= 0")
        _check_choices(self)
        _check(0.0 <= self.warmup_fraction < 1.0, "optim.warmup_fraction", self.warmup_fraction, "must be in [0, 1)")
        _check(0.0 <= self.min_lr_ratio <= 1.0, "optim.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        _check(self.grad_clip >= 0, "optim.grad_clip", self.grad_clip, "must be >= 0")
        _check(self.predict_scale > 0, "optim.predict_scale", self.predict_scale, "must be > 0")
        _check(self.ef_scale >= 0, "optim.ef_scale", self.ef_scale, "must be >= 0")
        _check(self.dc_lambda >= 0, "optim.dc_lambda", self.dc_lambda, "must be >= 0")


@dataclass
class PipelineConfig:
    method: MethodName = "nesterov"
    """Named method (see README / pipenag.methods): gpipe, 1f1b, pipedream, pipedream-lr,
    pipemare, nesterov, nesterov-nows, nesterov-sgd."""
    num_stages: int = 4
    """Pipeline stages K (one process per stage with the dist engine)."""
    num_microbatches: int = 0
    """Microbatches per update M; 0 = the method's default (4 for gpipe/1f1b/2bw, 1 for async)."""
    schedule: Literal["", ScheduleName] = ""
    """Override the method's schedule: gpipe, 1f1b, pipedream, 2bw, zb-h1 ("" = the method's)."""
    stash: Literal["", "on", "off"] = ""
    """Override weight stashing: "on", "off" ("" = the method's)."""
    predict_forward: Literal["", "on", "off"] = ""
    """Forward weight prediction (SpecTrain-style, any optimizer): each stage's forward runs at
    its weights extrapolated by their last update over the stage's delay; "" = the method's."""
    in_flight: str = ""
    """Microbatches in flight per stage of an asynchronous schedule (forward run, backward not
    yet): "" = K - k at stage k (classic 1F1B); one depth per stage, non-increasing, as a TOML
    list [12, 9, 6, 1] or "12,9,6,1"; "auto" = the smallest depths with which the timing model
    reaches 97% of its compute/bandwidth bound on the [link] (K - k without a link). Staleness
    at stage k is d_k - 1 (docs/schedules.md)."""
    pass_ms: float = 0.0
    """Forward + backward time of one microbatch at one stage (ms) that in_flight="auto" plans
    with (forward a third, backward two thirds); needed for "auto" with a link. `pipenag bench
    simulator` measures it on a machine; a config value keeps the depths (and so the numbers)
    the same in both engines and on every machine."""

    def __post_init__(self) -> None:
        _check(self.num_stages >= 1, "pipeline.num_stages", self.num_stages, "must be >= 1")
        _check(self.num_microbatches >= 0, "pipeline.num_microbatches", self.num_microbatches, "must be >= 0")
        _check_choices(self)
        _check(math.isfinite(self.pass_ms) and self.pass_ms >= 0, "pipeline.pass_ms", self.pass_ms,
               "must be a finite number >= 0")
        if self.in_flight not in ("", "auto"):
            depths = parse_depths(self.in_flight)
            _check(len(depths) == self.num_stages, "pipeline.in_flight", self.in_flight,
                   f"needs one depth per stage (pipeline.num_stages={self.num_stages}), got {len(depths)}")

    @property
    def depths(self) -> tuple[int, ...]:
        """The explicit in_flight depths (() for "" and "auto")."""
        return () if self.in_flight in ("", "auto") else parse_depths(self.in_flight)


def parse_depths(text: str) -> tuple[int, ...]:
    """"12,9,6,1" -> (12, 9, 6, 1).

    Raises:
        ValueError: naming pipeline.in_flight, for anything but comma-separated integers >= 1.
    """
    try:
        depths = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"pipeline.in_flight={text!r}: expected \"\", \"auto\" or one integer depth per "
                         "stage, such as 12,9,6,1") from None
    _check(all(d >= 1 for d in depths), "pipeline.in_flight", text, "every depth must be >= 1")
    return depths


@dataclass
class TrainConfig:
    steps: int = 300
    """Number of optimizer updates (in every command; see microbatch_budget)."""
    microbatch_budget: int = 0
    """A budget in microbatches instead of updates, with the same meaning in train, compare
    and sweep: a method of M microbatches per update makes microbatch_budget // M updates, and
    eval_every, log_every and checkpoint_every count microbatches too (they are divided by M),
    so that methods of different M see the same tokens. 0 = off: train.steps counts updates.
    The later of the two wins: train.steps on the command line turns a config file's budget off."""
    seed: int = 0
    """Seed for the weights and the batch order."""
    engine: Literal["sim", "dist"] = "sim"
    """"sim" (exact single-process simulator) or "dist" (one process per stage)."""
    eval_every: int = 50
    """Validate every N updates (and always at the end); 0 = only at the end."""
    eval_batches: int = 8
    """Microbatches of validation data per evaluation."""
    checkpoint_every: int = 0
    """Checkpoint every N updates (0 = only at the end)."""
    log_every: int = 10
    """Progress line every N updates."""
    resume: Literal["no", "auto"] = "no"
    """"auto": start from the newest complete checkpoint in run.out_dir if there is one, else
    from scratch, so that a restarted process (torchrun --max-restarts, dist.max_restarts, a
    job requeued) continues the run; "no": a fresh run. (`pipenag train --resume DIR` resumes
    explicitly.)"""

    def __post_init__(self) -> None:
        _check(self.steps >= 1, "train.steps", self.steps, "must be >= 1")
        _check(self.microbatch_budget >= 0, "train.microbatch_budget", self.microbatch_budget,
               "must be >= 0 (0 = off: train.steps counts updates)")
        _check_choices(self)
        for name in ("eval_every", "checkpoint_every", "log_every"):
            _check(getattr(self, name) >= 0, f"train.{name}", getattr(self, name), "must be >= 0")
        _check(self.eval_batches >= 1, "train.eval_batches", self.eval_batches, "must be >= 1")


@dataclass
class RunConfig:
    out_dir: str = "runs/latest"
    """Run folder: config.json, metrics.jsonl, summary.json, checkpoints."""
    progress: bool = True
    """Print progress lines."""
    threads: int = 0
    """torch intra-op threads per process; 0 = the cores divided by the processes a run puts on
    this machine (pipeline.num_stages for the simulator, the local world for the runtime), so
    that both engines reduce in the same order and agree bit for bit."""
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    """Where the simulator (and each sweep job) computes: "cpu", "cuda", or "auto" (cuda when
    there is a GPU). The dist engine picks its own (dist.backend: nccl on GPUs, gloo on CPU)."""
    tensorboard: bool = False
    """Also write the metrics.jsonl scalars as TensorBoard events in RUN/tensorboard (needs the
    `tensorboard` package: pip install 'pipenag[tensorboard]')."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute dtype: "bfloat16" runs every stage's forward (and its recomputation, and
    validation) under torch.autocast; the weights (fp32 master copy), optimizer state, stashed
    versions, gradients and the messages between stages stay float32. Both engines run the same
    code, so they agree bit for bit on CPU in either dtype."""
    peak_tflops: float = 0.0
    """The device's peak TFLOP/s that MFU is reported against; 0 = look it up by the CUDA
    device name (pipenag.plan.PEAK_TFLOPS: dense bf16), unknown (MFU null) on a CPU."""

    def __post_init__(self) -> None:
        _check(self.threads >= 0, "run.threads", self.threads, "must be >= 0")
        _check(self.peak_tflops >= 0, "run.peak_tflops", self.peak_tflops, "must be >= 0 (0 = look up)")
        _check_choices(self)


@dataclass
class LinkConfig:
    latency_ms: float = 0.0
    """Emulated one-way latency added to every transfer between stages (dist engine)."""
    bandwidth_mbps: float = 0.0
    """Emulated link bandwidth in megabits per second (0 = unlimited)."""
    compress_activations: CodecName = "none"
    """Codec of the activations sent forward (pipenag.link.codec): "none", "int8" (blockwise
    absmax), "int4" (tile-wise), "int4-hadamard" (tiles rotated first). Both engines apply the
    same quantize -> dequantize; the runtime sends the packed bytes."""
    compress_gradients: CodecName = "none"
    """Codec of the gradients sent backward (the same choices)."""
    block_size: int = 0
    """Values per scale block of the codecs (0 = the codec's default: 64)."""

    def __post_init__(self) -> None:
        _check(math.isfinite(self.latency_ms) and self.latency_ms >= 0, "link.latency_ms", self.latency_ms,
               "must be a finite number >= 0")
        _check(math.isfinite(self.bandwidth_mbps) and self.bandwidth_mbps >= 0, "link.bandwidth_mbps",
               self.bandwidth_mbps, "must be a finite number >= 0")
        _check_choices(self)
        _check(self.block_size >= 0, "link.block_size", self.block_size, "must be >= 0 (0 = the codec's default)")
        if self.block_size and (self.compress_activations != "none" or self.compress_gradients != "none"):
            from pipenag.link.codec import make_codec

            for name in {self.compress_activations, self.compress_gradients} - {"none"}:
                try:
                    make_codec(name, self.block_size)
                except ValueError as e:
                    raise ValueError(f"link.block_size={self.block_size}: {e}") from None


@dataclass
class DistConfig:
    backend: Literal["", "gloo", "nccl"] = ""
    """torch.distributed backend: "gloo", "nccl" ("" = nccl when CUDA is there, else gloo)."""
    timeout_s: float = 60.0
    """A worker that hears nothing from a peer for this long ends the run with an error."""
    master_port: int = 0
    """Port for the local launcher's rendezvous (0 = a free port)."""
    max_restarts: int = 0
    """The local launcher restarts the whole group this many times after a worker dies or
    hangs, each time from the newest complete checkpoint (then fails, naming every failure)."""
    sync_executor: Literal["own", "torch"] = "own"
    """What runs the synchronous schedules (gpipe, 1f1b, zb-h1) in the dist engine: "own"
    (pipenag's executor, as for every schedule) or "torch" (torch.distributed.pipelining's
    ScheduleGPipe / Schedule1F1B / ScheduleInterleavedZeroBubble; no link emulation or
    compression, and the asynchronous schedules cannot use it)."""

    def __post_init__(self) -> None:
        _check_choices(self)
        _check(0 < self.timeout_s <= 3600, "dist.timeout_s", self.timeout_s, "must be in (0, 3600]")
        _check(self.max_restarts >= 0, "dist.max_restarts", self.max_restarts, "must be >= 0")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    link: LinkConfig = field(default_factory=LinkConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_dict(cls, data: dict) -> "Config":
        return _build(cls, data, "")

    def with_overrides(self, overrides: list[str] | dict) -> "Config":
        """A new Config: this one with ["--section.key=value", ...] (or a nested dict) applied."""
        extra = parse_overrides(overrides) if isinstance(overrides, list) else overrides
        return Config.from_dict(_merge(self.to_dict(), extra))


_SECTION_NAMES = {f.type if isinstance(f.type, str) else f.type.__name__: f.name
                  for f in dataclasses.fields(Config)}


def _field_types(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'}={data!r}: expected a table")
    types = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in types:
            raise ValueError(f"unknown config key {name!r}; valid keys: {', '.join(prefix + k for k in types)}")
        typ = types[key]
        if dataclasses.is_dataclass(typ):
            kwargs[key] = _build(typ, value, name + ".")
        else:
            kwargs[key] = _coerce(typ, value, name)
    return cls(**kwargs)


_LIST_FIELDS = {"pipeline.in_flight"}  # str fields that TOML may also give as a list


def _coerce(typ, value, name: str):
    origin = typing.get_origin(typ)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None:
            return None
        typ = args[0]
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{name}={value!r}: expected true or false")
    if typ is int:
        if isinstance(value, bool):
            raise ValueError(f"{name}={value!r}: expected an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ValueError(f"{name}={value!r}: expected an integer")
    if typ is float:
        if isinstance(value, bool):
            raise ValueError(f"{name}={value!r}: expected a number")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name}={value!r}: expected a number") from None
        if not math.isfinite(number):  # no setting takes inf or nan (0 or -1 mean "off" or "default")
            raise ValueError(f"{name}={value!r}: must be a finite number")
        return number
    if typ is str and name in _LIST_FIELDS and isinstance(value, list):
        # TOML's in_flight = [12, 9, 6, 1] (and the JSON of a saved config) -> "12,9,6,1"
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ValueError(f"{name}={value!r}: expected a list of integers")
        return ",".join(str(v) for v in value)
    if typ is str or _choices(typ):
        if not isinstance(value, str):
            raise ValueError(f"{name}={value!r}: expected a string")
        return value
    raise AssertionError(f"unsupported config type {typ} for {name}")


def parse_overrides(args: list[str]) -> dict:
    """Turn ["--optim.lr=1e-3", "--train.steps", "50"] into {"optim": {"lr": "1e-3"}, ...}.

    Raises:
        ValueError: for an argument that is not of the form --section.key=value.
    """
    tree: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ValueError(f"unrecognized argument {arg!r}: expected --section.key=value")
        key, sep, value = arg[2:].partition("=")
        if not sep:
            if i + 1 >= len(args):
                raise ValueError(f"argument {arg!r} needs a value")
            value = args[i + 1]
            i += 1
        section, _, rest = key.partition(".")
        node = tree.setdefault(section, {})
        if not isinstance(node, dict) or "." in rest:
            raise ValueError(f"unrecognized argument {arg!r}: expected --section.key=value")
        node[rest] = value
        i += 1
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str] | dict] = None) -> Config:
    """Defaults, then the TOML file at `path`, then command-line overrides.

    Args:
        path: a TOML file with [model], [data], ... tables, or None.
        overrides: ["--section.key=value", ...] or an already nested dict.
    Returns:
        The validated Config.
    Raises:
        ValueError: a missing or malformed file, an unknown key, or a bad value (named).
    """
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"config file {str(path)!r} does not exist")
        try:
            tree = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"config file {str(path)!r} is not valid TOML: {e}") from None
    if overrides:
        extra = parse_overrides(overrides) if isinstance(overrides, list) else overrides
        train = extra.get("train", {}) if isinstance(extra.get("train", {}), dict) else {}
        if "steps" in train and "microbatch_budget" not in train and isinstance(tree.get("train"), dict):
            tree["train"] = {k: v for k, v in tree["train"].items() if k != "microbatch_budget"}  # the later wins
        tree = _merge(tree, extra)
    return Config.from_dict(tree)


# Command-line shortcuts: flag -> (section, key, type). Every subcommand that takes a config
# (train, compare, sweep, bench) accepts them beside --config and --section.key=value.
SHORTCUTS = {
    "method": ("pipeline", "method", str, "named method, e.g. nesterov, pipedream, gpipe"),
    "stages": ("pipeline", "num_stages", int, "pipeline stages K"),
    "microbatches": ("pipeline", "num_microbatches", int, "microbatches per update M (0 = the method's)"),
    "steps": ("train", "steps", int, "optimizer updates"),
    "engine": ("train", "engine", str, "sim or dist"),
    "out": ("run", "out_dir", str, "run folder"),
    "seed": ("train", "seed", int, "seed of the weights and the batch order"),
}


def add_config_arguments(parser, skip: tuple[str, ...] = ()) -> None:
    """Add --config and the SHORTCUTS (except `skip`) to an argparse parser; the
    --section.key=value overrides are the parser's unknown arguments (parse_known_args)."""
    parser.add_argument("--config", help="TOML config file (see configs/)")
    for flag, (section, key, typ, help_text) in SHORTCUTS.items():
        if flag not in skip:
            parser.add_argument(f"--{flag}", type=typ, help=f"{help_text} ({section}.{key})")


def config_from_args(args, overrides: list[str]) -> Config:
    """The Config of a parsed command line: defaults, --config, the shortcuts, then the
    --section.key=value overrides.

    Raises:
        ValueError: a malformed override, an unknown key or a bad value (named).
    """
    tree = parse_overrides(overrides)
    for flag, (section, key, _, _) in SHORTCUTS.items():
        value = getattr(args, flag, None)
        if value is not None:
            tree.setdefault(section, {})[key] = value
    return load_config(args.config, tree)
