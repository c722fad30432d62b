"""Config: defaults, TOML, command-line overrides, validation with named fields, JSON round trip.

    python -m pytest tests/test_config.py -q
"""

import dataclasses
import json

import pytest

from pipenag.config import Config, ModelConfig, load_config, parse_overrides

TINY = "configs/tiny.toml"


def write(tmp_path, text, name="c.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_construct_and_every_field_has_a_docstring():
    cfg = Config()
    assert cfg.model.n_embd % cfg.model.n_head == 0
    assert cfg.pipeline.method == "nesterov"
    assert load_config() == cfg
    # The house style asks for a docstring per field: the string literal right after it.
    import ast
    import inspect

    import pipenag.config as mod

    tree = ast.parse(inspect.getsource(mod))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name.endswith("Config") and node.name != "Config":
            body = node.body
            for i, stmt in enumerate(body):
                if isinstance(stmt, ast.AnnAssign):
                    nxt = body[i + 1] if i + 1 < len(body) else None
                    assert isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant), \
                        f"{node.name}.{stmt.target.id} has no docstring"


def test_toml_loading(tmp_path):
    path = write(tmp_path, "[model]\nn_layer = 3\nn_embd = 48\nn_head = 3\n[optim]\nlr = 1e-3\n"
                           "[pipeline]\nmethod = 'gpipe'\n[data]\nmax_chars = 1_000\n")
    cfg = load_config(path)
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.n_head) == (3, 48, 3)
    assert cfg.optim.lr == 1e-3
    assert cfg.pipeline.method == "gpipe"
    assert cfg.data.max_chars == 1000
    # Untouched fields keep their defaults.
    assert cfg.train == Config().train


def test_tiny_config_loads():
    cfg = load_config(TINY)
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.pipeline.num_stages) == (4, 40, 4)


def test_command_line_beats_toml(tmp_path):
    path = write(tmp_path, "[optim]\nlr = 1e-3\n[train]\nsteps = 7\n")
    cfg = load_config(path, ["--optim.lr=5e-4"])
    assert cfg.optim.lr == 5e-4
    assert cfg.train.steps == 7


def test_override_forms_equal_and_space():
    a = load_config(overrides=["--train.steps=50", "--pipeline.stash=off", "--model.bias=false"])
    b = load_config(overrides=["--train.steps", "50", "--pipeline.stash", "off", "--model.bias", "false"])
    assert a == b
    assert (a.train.steps, a.pipeline.stash, a.model.bias) == (50, "off", False)
    assert parse_overrides(["--optim.lr=1e-3", "--train.steps", "5"]) == \
        {"optim": {"lr": "1e-3"}, "train": {"steps": "5"}}
    # An = inside the value is kept.
    assert parse_overrides(["--data.source=hf:a=b"]) == {"data": {"source": "hf:a=b"}}


@pytest.mark.parametrize("args", [["--optim.lr"], ["train.steps=5"], ["--steps=5"], ["--a.b.c=1"]])
def test_malformed_override_raises(args):
    with pytest.raises(ValueError, match="argument"):
        parse_overrides(args)


@pytest.mark.parametrize("overrides, key", [
    (["--nosuch.key=1"], "'nosuch'"),
    (["--model.n_layers=3"], "'model.n_layers'"),
    (["--optim.beta1=0.9"], "'optim.beta1'"),
])
def test_unknown_section_or_key_names_it(overrides, key):
    with pytest.raises(ValueError, match=f"unknown config key {key}"):
        load_config(overrides=overrides)


def test_unknown_key_in_toml_names_it(tmp_path):
    with pytest.raises(ValueError, match="'train.stepz'"):
        load_config(write(tmp_path, "[train]\nstepz = 3\n"))


@pytest.mark.parametrize("overrides, field, value", [
    (["--model.n_layer=abc"], "model.n_layer", "'abc'"),
    (["--model.n_layer=2.5"], "model.n_layer", "'2.5'"),
    (["--model.n_layer=0"], "model.n_layer", "0"),
    (["--model.n_embd=50", "--model.n_head=4"], "model.n_embd", "50"),
    (["--model.bias=maybe"], "model.bias", "'maybe'"),
    (["--model.dropout=1.0"], "model.dropout", "1.0"),
    (["--optim.lr=0"], "optim.lr", "0.0"),
    (["--optim.lr=-1e-3"], "optim.lr", "-0.001"),
    (["--optim.lr=fast"], "optim.lr", "'fast'"),
    (["--optim.momentum=1.0"], "optim.momentum", "1.0"),
    (["--optim.momentum_schedule=linear"], "optim.momentum_schedule", "'linear'"),
    (["--pipeline.stash=maybe"], "pipeline.stash", "'maybe'"),
    (["--pipeline.num_stages=0"], "pipeline.num_stages", "0"),
    (["--train.steps=0"], "train.steps", "0"),
    (["--train.engine=gpu"], "train.engine", "'gpu'"),
    (["--data.tokenizer=words"], "data.tokenizer", "'words'"),
    (["--data.val_fraction=1"], "data.val_fraction", "1.0"),
    (["--dist.backend=mpi"], "dist.backend", "'mpi'"),
])
def test_bad_value_names_field_and_value(overrides, field, value):
    with pytest.raises(ValueError) as info:
        load_config(overrides=overrides)
    assert f"{field}={value}" in str(info.value)


@pytest.mark.parametrize("text, field", [
    ("[model]\nn_layer = 2.5\n", "model.n_layer"),
    ("[model]\nbias = 3\n", "model.bias"),
    ("[optim]\nlr = 'x'\n", "optim.lr"),
    ("[data]\nsource = 5\n", "data.source"),
    ("model = 3\n", "model"),
])
def test_bad_toml_value_types(tmp_path, text, field):
    with pytest.raises(ValueError, match=field):
        load_config(write(tmp_path, text))


def test_direct_construction_is_checked():
    with pytest.raises(ValueError, match="model.n_embd=30"):
        ModelConfig(n_embd=30, n_head=4)


def test_malformed_toml_raises(tmp_path):
    with pytest.raises(ValueError, match="not valid TOML"):
        load_config(write(tmp_path, "[model\nn_layer = 3\n"))


def test_missing_file_raises(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_round_trip_through_json(tmp_path):
    cfg = load_config(TINY, ["--optim.lr=1e-3", "--pipeline.stash=off", "--model.bias=false",
                             "--link.latency_ms=2.5"])
    again = Config.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    cfg.save(tmp_path / "config.json")
    assert Config.from_dict(json.loads((tmp_path / "config.json").read_text())) == cfg
    # Every section survives as its own dataclass.
    assert all(dataclasses.is_dataclass(getattr(again, f.name)) for f in dataclasses.fields(again))
