"""Named methods: presets resolve to the schedule, stashing, optimizer and learning rates of the
README's methods table, and impossible combinations are refused.

    python -m pytest tests/test_methods.py -q
"""

import math
import typing
from pathlib import Path

import pytest
import torch

from pipenag.build import build_pipeline
from pipenag.config import MethodName, OptimizerName, load_config
from pipenag.methods import METHODS, get_method, methods_table, resolve
from pipenag.optim import OPTIMIZERS, DelayedNesterov

from helpers import assert_same_records, assert_same_state_dicts, sim_reference, tiny_config


SMALL = ["--model.n_layer=4", "--model.n_head=2", "--model.n_embd=16", "--model.block_size=8"]


def cfg_for(method, *extra, stages=4, steps=100):
    return load_config(overrides=SMALL + [f"--pipeline.method={method}", f"--pipeline.num_stages={stages}",
                                          f"--train.steps={steps}", *extra])


# The methods table of the README, written out here (not read from pipenag.methods): name ->
# (schedule, stash or None for the synchronous schedules, optimizer, M, delay lr, PipeMare
# prediction, forward weight prediction).
EXPECTED = {
    "gpipe": ("gpipe", None, "adamw", 4, False, False, False),
    "1f1b": ("1f1b", None, "adamw", 4, False, False, False),
    "zb-h1": ("zb-h1", None, "adamw", 4, False, False, False),
    "gpipe-muon": ("gpipe", None, "muon", 4, False, False, False),
    "pipedream": ("pipedream", True, "adamw", 1, False, False, False),
    "2bw": ("2bw", True, "adamw", 4, False, False, False),
    "pipedream-lr": ("pipedream", True, "adamw", 1, True, False, False),
    "pipemare": ("pipedream", False, "adamw", 1, True, True, False),
    "nesterov": ("pipedream", True, "nesterov", 1, False, False, False),
    "nesterov-nows": ("pipedream", False, "nesterov-nows", 1, True, False, False),
    "nesterov-sgd": ("pipedream", True, "nesterov-sgd", 1, False, False, False),
    "basis-rotation": ("pipedream", True, "basis-rotation", 1, False, False, False),
    "muon": ("pipedream", True, "muon", 1, False, False, False),
    "pipedream-wp": ("pipedream", True, "adamw", 1, False, False, True),
    "muon-wp": ("pipedream", True, "muon", 1, False, False, True),
    "pipedream-ef": ("pipedream", True, "adamw-ef", 1, False, False, False),
    "muon-ef": ("pipedream", True, "muon-ef", 1, False, False, False),
    "muon-wp-ef": ("pipedream", True, "muon-ef", 1, False, False, True),
    "2bw-muon-ef": ("2bw", True, "muon-ef", 4, False, False, False),
    "pipedream-dc": ("pipedream", True, "adamw", 1, False, False, False),
}
# Methods with DC-ASGD's delay compensation (lambda = optim.dc_lambda, default 0.04).
DELAY_COMPENSATED = {"pipedream-dc"}


def test_every_method_has_an_expected_row_and_a_config_name():
    # A method added to pipenag.methods without a row here (or without its name in the config's
    # MethodName choices) fails this test.
    assert set(METHODS) == set(EXPECTED)
    assert set(typing.get_args(MethodName)) == set(METHODS)
    assert set(typing.get_args(OptimizerName)) == {""} | set(OPTIMIZERS)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_presets_match_the_table(name):
    schedule, stash, optimizer, M, delay_lr, predict, predict_forward = EXPECTED[name]
    r = resolve(cfg_for(name))
    assert (r.schedule.name, r.optimizer, r.schedule.num_microbatches) == (schedule, optimizer, M)
    if stash is not None:  # stashing means nothing for the synchronous schedules
        assert r.stash == stash
    assert (r.delay_lr, r.predict) == (delay_lr, predict)
    assert r.forward_prediction == (1.0 if predict_forward else 0.0)  # optim.predict_scale's default
    assert r.delay_compensation == (0.04 if name in DELAY_COMPENSATED else 0.0)  # optim.dc_lambda's default
    assert (r.schedule.num_stages, r.num_updates) == (4, 100)


def test_table_lists_every_method():
    table = methods_table()
    lines = table.splitlines()
    assert lines[0].startswith("| method |")
    assert len(lines) == 2 + len(METHODS)
    for name in METHODS:
        assert sum(line.startswith(f"| `{name}` |") for line in lines) == 1


def test_readme_table_is_the_generated_one():
    # The README's methods table is methods_table()'s output: regenerate it when a method changes.
    readme = Path(__file__).resolve().parents[1] / "README.md"
    if not readme.is_file():
        pytest.skip("no README.md in this checkout")
    assert methods_table() in readme.read_text()


def test_unknown_method_lists_valid_ones():
    with pytest.raises(ValueError) as info:
        get_method("nestrov")
    assert "'nestrov'" in str(info.value)
    for name in METHODS:
        assert name in str(info.value)
    # A config never holds an unknown method: loading it names the field and the valid ones.
    with pytest.raises(ValueError, match="pipeline.method='nestrov': must be one of 'gpipe'"):
        cfg_for("nestrov")


@pytest.mark.parametrize("method, schedule", [
    ("gpipe", "pipedream"), ("gpipe", "2bw"), ("1f1b", "pipedream"), ("pipemare", "2bw"),
    ("pipedream-lr", "gpipe"), ("nesterov", "1f1b"), ("nesterov-nows", "2bw"), ("2bw-muon-ef", "pipedream"),
    ("pipedream-dc", "gpipe"),
])
def test_method_on_wrong_schedule_raises(method, schedule):
    with pytest.raises(ValueError, match=f"pipeline.schedule='{schedule}'.*'{method}'"):
        resolve(cfg_for(method, f"--pipeline.schedule={schedule}"))


def test_allowed_schedule_override():
    r = resolve(cfg_for("nesterov", "--pipeline.schedule=2bw"))
    assert (r.schedule.name, r.schedule.num_microbatches) == ("2bw", 4)
    r = resolve(cfg_for("gpipe", "--pipeline.schedule=1f1b", "--pipeline.num_microbatches=3"))
    assert (r.schedule.name, r.schedule.num_microbatches) == ("1f1b", 3)
    assert resolve(cfg_for("pipedream", "--pipeline.stash=off")).stash is False


def test_pipemare_with_stash_raises():
    with pytest.raises(ValueError, match="pipeline.stash='on'.*pipemare"):
        resolve(cfg_for("pipemare", "--pipeline.stash=on"))


@pytest.mark.parametrize("method, extra", [
    ("pipedream", ["--pipeline.num_microbatches=2"]),
    ("nesterov", ["--pipeline.num_microbatches=4"]),
    ("2bw", ["--pipeline.num_microbatches=3"]),
    ("nesterov", ["--pipeline.schedule=2bw", "--pipeline.num_microbatches=2"]),
])
def test_microbatch_count_the_schedule_forbids_raises(method, extra):
    with pytest.raises(ValueError, match="pipeline.num_microbatches="):
        resolve(cfg_for(method, *extra))


def adam_defaults(opt):
    return opt.defaults["betas"], opt.defaults["weight_decay"], opt.defaults["eps"]


def test_nesterov_builds_torch_nadam():
    parts = build_pipeline(cfg_for("nesterov"), vocab_size=32)
    assert len(parts.optimizers) == len(parts.stages) == 4
    for stage, opt in zip(parts.stages, parts.optimizers):
        assert type(opt) is torch.optim.NAdam
        assert adam_defaults(opt) == ((0.99, 0.999), 0.01, 1e-8)
        assert opt.defaults["momentum_decay"] == 0.004
        assert opt.defaults["decoupled_weight_decay"] is True
        assert opt.defaults["lr"] == 3e-4
        # Each optimizer owns exactly its stage's parameters.
        owned = [p for g in opt.param_groups for p in g["params"]]
        assert {id(p) for p in owned} == {id(p) for p in stage.parameters()}
        assert len(owned) == len(list(stage.parameters()))


def test_momentum_decay_and_momentum_overrides_reach_the_optimizer():
    parts = build_pipeline(cfg_for("nesterov", "--optim.momentum_decay=0.4", "--optim.momentum=0.95"), 32)
    assert parts.optimizers[0].defaults["momentum_decay"] == 0.4
    assert parts.optimizers[0].defaults["betas"] == (0.95, 0.999)


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "pipedream", "pipedream-lr", "pipemare"])
def test_adamw_methods(name):
    parts = build_pipeline(cfg_for(name), vocab_size=32)
    for opt in parts.optimizers:
        assert type(opt) is torch.optim.AdamW
        assert adam_defaults(opt) == ((0.9, 0.999), 0.01, 1e-8)
    if name in ("gpipe", "1f1b"):
        assert parts.resolved.schedule.num_microbatches == 4
        assert parts.simulator().num_microbatches == 4


@pytest.mark.parametrize("K", [2, 4])
def test_nesterov_nows_stage_momentum(K):
    parts = build_pipeline(cfg_for("nesterov-nows", stages=K), vocab_size=32)
    for k, opt in enumerate(parts.optimizers):
        tau = K - 1 - k
        assert type(opt) is torch.optim.NAdam
        assert opt.defaults["decoupled_weight_decay"] is True
        assert opt.defaults["betas"] == (pytest.approx(0.9 + 0.09 * tau / K, abs=1e-15), 0.999)
    assert parts.optimizers[-1].defaults["betas"][0] == pytest.approx(0.9)


def test_nesterov_sgd_builds_delayed_nesterov():
    parts = build_pipeline(cfg_for("nesterov-sgd", "--optim.discount=false"), vocab_size=32)
    for opt in parts.optimizers:
        assert type(opt) is DelayedNesterov
        assert opt.defaults["weight_decay"] == 0.01
        assert opt.defaults["discount"] is False


def test_optim_name_overrides_the_method():
    parts = build_pipeline(cfg_for("pipedream", "--optim.name=nesterov"), vocab_size=32)
    assert all(type(opt) is torch.optim.NAdam for opt in parts.optimizers)


def test_lr_warmup_then_cosine():
    # steps 100, warm-up 6% -> 6 updates to the peak, cosine to 0.1 lr at update 100.
    lr = 1e-3
    parts = build_pipeline(cfg_for("nesterov", "--optim.lr=1e-3"), vocab_size=32)
    for f in parts.lr_fns:  # no delay discount for nesterov: every stage alike
        assert f(1) == pytest.approx(lr / 6)
        assert f(3) == pytest.approx(lr / 2)
        assert f(6) == pytest.approx(lr)
        assert f(53) == pytest.approx(0.1 * lr + 0.45 * lr)  # half way down the cosine
        assert f(100) == pytest.approx(0.1 * lr)
    values = [parts.lr_fns[0](t) for t in range(1, 101)]
    assert all(a < b for a, b in zip(values[:5], values[1:6]))
    assert all(a > b for a, b in zip(values[5:-1], values[6:]))


@pytest.mark.parametrize("name", ["pipedream-lr", "pipemare", "nesterov-nows"])
def test_delay_lr_discount(name):
    # K=4: stage k has delay tau_k = 3 - k; anneal over T = steps // 5 = 20 updates by default.
    K, T = 4, 20
    parts = build_pipeline(cfg_for(name, "--optim.lr=1e-3"), vocab_size=32)
    plain = build_pipeline(cfg_for("nesterov", "--optim.lr=1e-3"), vocab_size=32).lr_fns[0]
    assert parts.resolved.delay_lr_anneal == T
    for t in (1, 2, 6, 10, 19, 20, 21, 60, 100):
        for k in range(K):
            tau = K - 1 - k
            want = plain(t) if tau == 0 else plain(t) / tau ** (1 - min(t / T, 1))
            assert parts.lr_fns[k](t) == pytest.approx(want, rel=1e-12)
        assert parts.lr_fns[K - 1](t) == plain(t)
    # Stage 0 starts at lr / tau_0 and has no discount left after T.
    assert parts.lr_fns[0](1) == pytest.approx(plain(1) / 3 ** (1 - 1 / T))
    assert parts.lr_fns[0](T) == plain(T)
    assert parts.lr_fns[0](10) < plain(10)


def test_delay_lr_anneal_override():
    parts = build_pipeline(cfg_for("pipedream-lr", "--optim.delay_lr_anneal=50"), vocab_size=32)
    plain = build_pipeline(cfg_for("pipedream"), vocab_size=32).lr_fns[0]
    assert parts.lr_fns[0](25) == pytest.approx(plain(25) / math.sqrt(3))


@pytest.mark.parametrize("name", ["pipedream", "nesterov", "nesterov-sgd", "gpipe"])
def test_no_delay_discount_without_delay_lr(name):
    parts = build_pipeline(cfg_for(name), vocab_size=32)
    assert [f(10) for f in parts.lr_fns] == [parts.lr_fns[-1](10)] * 4


def test_forward_prediction_is_an_option_for_any_method():
    assert resolve(cfg_for("nesterov", "--pipeline.predict_forward=on", "--optim.predict_scale=0.5")).forward_prediction == 0.5
    assert resolve(cfg_for("pipedream-wp", "--pipeline.predict_forward=off")).forward_prediction == 0.0
    with pytest.raises(ValueError, match="pipeline.predict_forward='on'.*pipemare.*exclusive"):
        resolve(cfg_for("pipemare", "--pipeline.predict_forward=on"))
    with pytest.raises(ValueError, match="optim.predict_scale=0.0"):
        cfg_for("pipedream-wp", "--optim.predict_scale=0")


# At K = 1 there is no delay: forward prediction extrapolates by tau = 0, PipeMare's lr
# discount and weight prediction are the identity, and stashing has one version to keep. These
# methods are then their base method, bit for bit; the convergence benchmark uses the base
# method's K = 1 runs as their delay-penalty controls (experiments/convergence.py).
@pytest.mark.slow
@pytest.mark.parametrize("method, base", [("muon-wp", "muon"), ("pipedream-wp", "pipedream"),
                                          ("pipedream-lr", "pipedream"), ("pipemare", "pipedream")])
def test_delay_corrections_are_their_base_method_at_one_stage(tmp_path, method, base):
    def trained(name, stages, *extra):
        cfg = tiny_config(tmp_path / f"{name}-{stages}", f"--pipeline.method={name}", f"--pipeline.num_stages={stages}",
                          "--train.steps=12", "--train.eval_every=6", "--train.eval_batches=2", *extra)
        return sim_reference(cfg)

    (records, weights), (base_records, base_weights) = trained(method, 1), trained(base, 1)
    assert_same_records(records, base_records)
    assert_same_state_dicts(weights, base_weights)
    # ... and not at four stages, where the delay is real (so the check above can fail; the
    # delay discount anneals away over a fifth of the run by default: here over all of it).
    a, b = (trained(name, 4, "--optim.delay_lr_anneal=12")[0] for name in (method, base))
    assert [r["train_loss"] for r in a] != [r["train_loss"] for r in b]
