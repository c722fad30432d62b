"""The model and its split: split model == whole model, bit for bit.

    python -m pytest tests/test_model.py -q
"""

import math

import pytest
import torch

from pipenag.config import ModelConfig
from pipenag.model import GPT, lm_loss
from pipenag.split import StageModule, build_stages, partition_layers, split_gpt


SEED = 1234


def tiny_cfg(**kw) -> ModelConfig:
    args = dict(n_layer=4, n_head=4, n_embd=32, block_size=16, vocab_size=64, dropout=0.0, bias=True)
    args.update(kw)
    return ModelConfig(**args)


def batch(cfg: ModelConfig, B: int = 3, T: int = None, seed: int = 0):
    T = cfg.block_size if T is None else T
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    targets = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    return idx, targets


def whole_model(cfg: ModelConfig, seed: int = SEED) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg)


def pipeline_fwd_bwd(stages, idx, targets):
    """Forward stage by stage with a cut autograd graph at each boundary, then backward from the
    last stage to the first, feeding each stage the gradient of the next stage's input."""
    inputs, outputs = [], []
    x = idx
    for stage in stages:
        inp = x if stage.is_first else x.detach().requires_grad_()
        out = stage(inp)
        inputs.append(inp)
        outputs.append(out)
        x = out
    logits = outputs[-1]
    loss = lm_loss(logits, targets)
    loss.backward()
    for k in range(len(stages) - 2, -1, -1):
        grad = inputs[k + 1].grad
        assert grad is not None and grad.shape == outputs[k].shape
        outputs[k].backward(grad)
    return logits, loss


def model_params(stages) -> dict:
    out = {}
    for stage in stages:
        for name, p in stage.named_model_parameters():
            assert name not in out, f"{name} owned by two stages"
            out[name] = p
    return out


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("num_stages", [1, 2, 3, 4])
def test_split_equals_whole_exactly(num_stages, bias):
    cfg = tiny_cfg(bias=bias)
    idx, targets = batch(cfg)

    ref = whole_model(cfg)
    ref_logits = ref(idx)
    ref_loss = lm_loss(ref_logits, targets)
    ref_loss.backward()

    stages = build_stages(cfg, num_stages, SEED)
    logits, loss = pipeline_fwd_bwd(stages, idx, targets)

    assert torch.equal(logits, ref_logits)
    assert torch.equal(loss, ref_loss)
    params = model_params(stages)
    ref_params = dict(ref.named_parameters())
    assert params.keys() == ref_params.keys()
    for name, p in ref_params.items():
        assert torch.equal(params[name], p), name
        assert p.grad is not None and params[name].grad is not None, name
        assert torch.equal(params[name].grad, p.grad), name


def test_split_references_model_modules():
    cfg = tiny_cfg()
    model = whole_model(cfg)
    stages = split_gpt(model, 3)
    ref_params = dict(model.named_parameters())
    params = model_params(stages)
    assert params.keys() == ref_params.keys()
    for name, p in params.items():
        assert p is ref_params[name], name
    assert stages[0].wte is model.wte and stages[-1].lm_head is model.lm_head
    assert stages[1].wte is None and stages[1].lm_head is None
    assert [s.stage_idx for s in stages] == [0, 1, 2]
    assert [(s.is_first, s.is_last) for s in stages] == [(True, False), (False, False), (False, True)]
    assert all(s.num_stages == 3 for s in stages)
    assert all(isinstance(s, StageModule) for s in stages)
    # An update through a stage is an update of the model.
    with torch.no_grad():
        stages[2].lm_head.weight.add_(1.0)
    assert torch.equal(model.lm_head.weight, stages[2].lm_head.weight)


def test_stage_shapes():
    cfg = tiny_cfg()
    stages = build_stages(cfg, 2, SEED)
    idx, _ = batch(cfg, B=2, T=5)
    h = stages[0](idx)
    assert h.shape == (2, 5, cfg.n_embd) and h.dtype == torch.float32
    logits = stages[1](h)
    assert logits.shape == (2, 5, cfg.vocab_size)
    with pytest.raises(ValueError, match="token ids"):
        stages[0](h)
    with pytest.raises(ValueError, match="hidden states"):
        stages[1](idx)


@pytest.mark.parametrize("n_layer,num_stages,sizes", [
    (8, 8, [1] * 8),
    (8, 3, [3, 3, 2]),
    (10, 4, [3, 3, 2, 2]),
    (7, 1, [7]),
    (5, 2, [3, 2]),
])
def test_partition_layers_balanced(n_layer, num_stages, sizes):
    ranges = partition_layers(n_layer, num_stages)
    assert [e - s for s, e in ranges] == sizes
    assert ranges[0][0] == 0 and ranges[-1][1] == n_layer
    assert all(ranges[i][1] == ranges[i + 1][0] for i in range(len(ranges) - 1))


def test_partition_layers_all_small_cases():
    for n_layer in range(1, 13):
        for k in range(1, n_layer + 1):
            sizes = [e - s for s, e in partition_layers(n_layer, k)]
            assert sum(sizes) == n_layer and len(sizes) == k
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_impossible_splits_raise_with_numbers():
    with pytest.raises(ValueError, match="cannot split 8 blocks into 12 stages"):
        partition_layers(8, 12)
    with pytest.raises(ValueError, match="num_stages=0"):
        partition_layers(8, 0)
    with pytest.raises(ValueError, match="num_stages=-1"):
        partition_layers(8, -1)
    with pytest.raises(ValueError, match="cannot split 4 blocks into 5 stages"):
        build_stages(tiny_cfg(), 5, SEED)
    with pytest.raises(ValueError, match="cannot split 4 blocks into 6 stages"):
        split_gpt(whole_model(tiny_cfg()), 6)


def test_config_mismatch_raises():
    cfg = tiny_cfg()
    model = whole_model(cfg)
    idx, _ = batch(cfg, T=cfg.block_size + 1)
    with pytest.raises(ValueError, match="length 17.*block_size is only 16"):
        model(idx)
    stages = split_gpt(model, 2)
    with pytest.raises(ValueError, match="length 17.*block_size is only 16"):
        stages[0](idx)
    with pytest.raises(ValueError, match="length 17.*block_size is only 16"):
        stages[1](torch.zeros(1, 17, cfg.n_embd))
    with pytest.raises(ValueError, match="vocab_size=0"):
        GPT(tiny_cfg(vocab_size=0))
    logits = model(idx[:, :8])
    with pytest.raises(ValueError, match=r"\(3, 8, 64\).*\(3, 7\)"):
        lm_loss(logits, idx[:, :7])


def test_build_stages_init_independent_of_num_stages():
    cfg = tiny_cfg()
    ref = dict(whole_model(cfg).named_parameters())
    for k in range(1, cfg.n_layer + 1):
        params = model_params(build_stages(cfg, k, SEED))
        assert params.keys() == ref.keys()
        for name, p in ref.items():
            assert torch.equal(params[name], p), (k, name)
    other = model_params(build_stages(cfg, 2, SEED + 1))
    assert not torch.equal(other["h.0.attn.c_attn.weight"], ref["h.0.attn.c_attn.weight"])


def test_init_statistics():
    cfg = tiny_cfg(n_layer=2, n_embd=64, vocab_size=256)
    model = whole_model(cfg)
    assert torch.all(model.h[0].attn.c_attn.bias == 0)
    assert torch.all(model.ln_f.weight == 1)
    std = model.h[1].mlp.c_fc.weight.std().item()
    assert abs(std - 0.02) < 0.002
    proj_std = torch.cat([model.h[i].mlp.c_proj.weight.flatten() for i in range(2)]).std().item()
    assert abs(proj_std - 0.02 / math.sqrt(2 * cfg.n_layer)) < 0.001


def test_first_loss_near_uniform_and_pinned():
    cfg = tiny_cfg()
    idx, targets = batch(cfg)
    model = whole_model(cfg, seed=0)
    with torch.no_grad():
        loss = lm_loss(model(idx), targets).item()
    # Small init -> near-uniform predictions.
    assert abs(loss - math.log(cfg.vocab_size)) < 0.05
    assert loss == pytest.approx(4.151359, abs=1e-4)


def test_model_trains():
    cfg = tiny_cfg()
    idx, targets = batch(cfg, B=4)
    model = whole_model(cfg, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = lm_loss(model(idx), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("bias", [True, False])
def test_num_params_formula(bias):
    V, Tb, C, L = 64, 16, 32, 4
    cfg = tiny_cfg(bias=bias)
    model = GPT(cfg)
    if bias:
        # ln_1, ln_2: 2C each; c_attn C*3C + 3C; attn c_proj C*C + C; c_fc C*4C + 4C; mlp c_proj 4C*C + C
        per_block = 12 * C * C + 13 * C
        ln_f = 2 * C
    else:
        per_block = 12 * C * C + 2 * C  # LayerNorm weights only
        ln_f = C
    expected = V * C + Tb * C + L * per_block + ln_f + C * V  # lm_head has no bias
    assert model.num_params() == expected
    assert model.num_params(non_embedding=True) == expected - V * C - Tb * C
    stages = split_gpt(model, 3)
    assert sum(p.numel() for s in stages for p in s.parameters()) == expected


def test_unigram_head_starts_at_the_unigram_loss():
    """model.unigram_head: lm_head gets a bias set to the log unigram of the training tokens,
    so the untrained model's loss is close to the unigram entropy (not log V); off by default."""
    from pipenag.build import build_pipeline
    from pipenag.config import Config
    from pipenag.model import set_unigram_bias

    assert GPT(tiny_cfg()).lm_head.bias is None
    with pytest.raises(ValueError, match="unigram_head"):
        set_unigram_bias(GPT(tiny_cfg()).lm_head, torch.zeros(5, dtype=torch.long))
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(3 * torch.randn(64, generator=g), 0)
    ids = torch.multinomial(p, 20000, replacement=True, generator=g)
    cfg = Config()
    cfg.model = tiny_cfg(vocab_size=0, unigram_head=True)
    cfg.pipeline.num_stages = 2
    with pytest.raises(ValueError, match="train_ids"):
        build_pipeline(cfg, 64)
    stages = build_pipeline(cfg, 64, train_ids=ids).stages
    x, y = ids[:-1][:16 * 8].view(8, 16), ids[1:][:16 * 8].view(8, 16)
    with torch.no_grad():
        h = x
        for s in stages:
            h = s(h)
        loss = float(lm_loss(h, y))
    counts = torch.bincount(ids, minlength=64).double() / ids.numel()
    entropy = float(-(counts[counts > 0] * counts[counts > 0].log()).sum())
    assert abs(loss - entropy) < 0.15 and loss < math.log(64) - 0.5
