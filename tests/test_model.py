"""The model, the optimizers and their schedules, in-process."""

import math

import pytest
import torch

from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import Muon, OptimConfig, Optimizers, lr_multiplier, muon_momentum, orthogonalize


def tiny(vocab: int = 64, seq: int = 32, depth: int = 2) -> GPT:
    model = GPT(GPTConfig.from_depth(depth, vocab, seq, head_dim=32))
    model.init_weights(0)
    return model


def pattern_batch(vocab: int = 64, B: int = 4, T: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable stream: counting modulo a small period, with a per-row offset."""
    gen = torch.Generator().manual_seed(0)
    data = (torch.arange(T + 1).repeat(B, 1) + torch.randint(0, 7, (B, 1), generator=gen)) % 13
    return data[:, :-1].contiguous(), data[:, 1:].contiguous()


def test_width_follows_depth_rounded_to_head_dim():
    assert GPTConfig.from_depth(20, 65536, 2048) == GPTConfig(2048, 65536, 20, 10, 10, 1280)
    cfg = GPTConfig.from_depth(3, 100, 16, head_dim=128)  # 192 rounds up to 256
    assert (cfg.n_embd, cfg.n_head) == (256, 2)
    with pytest.raises(ValueError, match="head_dim"):
        GPTConfig.from_depth(2, 100, 16, head_dim=7)


def test_forward_shapes_softcap_and_loss():
    model = tiny()
    x, y = pattern_batch()
    logits = model(x)
    assert logits.shape == (4, 32, 64) and logits.dtype == torch.float32
    assert logits.abs().max() <= GPT.softcap
    loss = model(x, y)
    assert loss.ndim == 0 and math.isfinite(loss.item())
    per_token = model(x, y, reduction="none")
    assert per_token.shape == (4, 32)
    torch.testing.assert_close(per_token.mean(), loss)


def test_architecture_has_no_biases_untied_head_and_zero_output_projections():
    model = tiny()
    assert all("bias" not in name for name, _ in model.named_parameters())
    assert model.wte.weight.data_ptr() != model.lm_head.weight.data_ptr()
    for block in model.blocks:
        assert block.attn.c_proj.weight.abs().sum() == 0 and block.mlp.c_proj.weight.abs().sum() == 0
        assert block.mlp.c_fc.weight.shape == (4 * model.config.n_embd, model.config.n_embd)


def test_backward_reaches_every_parameter():
    model = tiny()
    x, y = pattern_batch()
    model(x, y).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.blocks[0].attn.c_proj.weight.grad.abs().sum() > 0


def test_gqa_attention_runs():
    cfg = GPTConfig(sequence_len=16, vocab_size=32, n_layer=1, n_head=4, n_kv_head=2, n_embd=64)
    model = GPT(cfg)
    model.init_weights(0)
    assert model.blocks[0].attn.c_k.weight.shape == (32, 64)
    assert model(torch.zeros(2, 16, dtype=torch.long)).shape == (2, 16, 32)


def test_document_mask_keeps_attention_inside_each_document():
    model = tiny()
    with torch.no_grad():  # zero output projections (the init) would hide what attention does
        for block in model.blocks:
            block.attn.c_proj.weight.normal_(0, 0.02, generator=torch.Generator().manual_seed(2))
            block.mlp.c_proj.weight.normal_(0, 0.02, generator=torch.Generator().manual_seed(3))
    bos, gen = 0, torch.Generator().manual_seed(1)
    row = torch.randint(1, 64, (1, 32), generator=gen)
    row[0, 0] = row[0, 12] = bos  # two documents: positions 0-11 and 12-31
    other = row.clone()
    other[0, 1:12] = (row[0, 1:12] + 5) % 63 + 1  # another first document, same length
    with torch.no_grad():
        masked = [model(r, doc_start=bos)[0, 12:] for r in (row, other)]
        plain = [model(r)[0, 12:] for r in (row, other)]
        alone = model(row[:, 12:], doc_start=bos)[0]
        first = model(row, doc_start=bos)[0, :12], model(row)[0, :12]
    assert torch.equal(masked[0], masked[1])  # the second document never sees the first: bit for bit
    assert not torch.allclose(plain[0], plain[1], atol=1e-3)  # without the mask it does
    torch.testing.assert_close(alone, masked[0])  # as if alone in its row (rotary is relative)
    torch.testing.assert_close(*first)  # the first document: plain causal attention either way


def test_init_is_deterministic_by_seed():
    a, b, c = tiny(), tiny(), GPT(GPTConfig.from_depth(2, 64, 32, head_dim=32))
    c.init_weights(1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.wte.weight, c.wte.weight)


def test_param_count_and_flops():
    model = tiny()
    d, v, L = model.config.n_embd, model.config.vocab_size, model.config.n_layer
    assert model.num_params() == 2 * v * d + L * 12 * d * d
    assert model.flops_per_token() == 6 * (v * d + L * 12 * d * d) + 12 * L * d * model.config.sequence_len


def test_orthogonalize_pushes_singular_values_towards_one():
    g = torch.randn(64, 32) @ torch.diag(torch.logspace(-1, 1, 32))  # condition number ~100 * randn's
    before = torch.linalg.svdvals(g)
    s = torch.linalg.svdvals(orthogonalize(g))
    assert before.max() / before.min() > 50
    assert s.min() > 0.3 and s.max() < 1.3 and s.max() / s.min() < 4
    assert orthogonalize(g.T).shape == (32, 64)


def _train(model: GPT, step_fn, steps: int = 25) -> tuple[float, float]:
    x, y = pattern_batch()
    first = model(x, y).item()
    for _ in range(steps):
        loss = model(x, y)
        loss.backward()
        step_fn()
    return first, model(x, y).item()


def test_muon_alone_reduces_loss():
    model = tiny()
    with torch.no_grad():  # a frozen readout large enough for the matrices' changes to show
        model.lm_head.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    for p in (model.wte.weight, model.lm_head.weight):
        p.requires_grad_(False)
    muon = Muon(model.matrix_params(), lr=0.02)

    def step():
        muon.step()
        muon.zero_grad()

    first, last = _train(model, step)
    assert last < 0.7 * first


def test_adamw_alone_reduces_loss():
    model = tiny()
    for p in model.matrix_params():
        p.requires_grad_(False)
    adam = torch.optim.AdamW([model.wte.weight, model.lm_head.weight], lr=0.01, betas=(0.8, 0.95))

    def step():
        adam.step()
        adam.zero_grad()

    first, last = _train(model, step)
    assert last < 0.7 * first


def test_optimizer_pair_state_dict_roundtrip_keeps_current_hyperparameters():
    model = tiny()
    opt = Optimizers(model, OptimConfig())
    _train(model, lambda: (opt.step(1.0, 0.9), opt.zero_grad()), steps=2)
    state = opt.state_dict()
    other = Optimizers(model, OptimConfig(matrix_lr=0.05, weight_decay=0.1))
    other.load_state_dict(state)
    assert other.muon.param_groups[0]["initial_lr"] == 0.05  # the new config's settings win
    assert all(group["weight_decay"] == 0.1 for group in other.adamw.param_groups)
    p = model.blocks[0].attn.c_q.weight
    assert torch.equal(other.muon.state[p]["momentum_buffer"], opt.muon.state[p]["momentum_buffer"])
    assert torch.equal(other.adamw.state[model.wte.weight]["exp_avg"], opt.adamw.state[model.wte.weight]["exp_avg"])


def test_lr_schedule_warmup_constant_warmdown():
    f = lambda s: lr_multiplier(s, 100, warmup_ratio=0.1, warmdown_ratio=0.2, final_lr_frac=0.0)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(50) == 1.0 and f(80) == 1.0
    assert f(90) == pytest.approx(0.5) and f(99) == pytest.approx(0.05)
    assert lr_multiplier(100, 100, 0.0, 0.2, 0.1) == pytest.approx(0.1)


def test_muon_momentum_warms_up():
    assert muon_momentum(0) == pytest.approx(0.85)
    assert muon_momentum(150) == pytest.approx(0.90)
    assert muon_momentum(300) == muon_momentum(10_000) == pytest.approx(0.95)
