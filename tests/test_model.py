"""DP-T: shapes, block layout for the cache engine, causal masks, the exact per-chunk condition cache."""

import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from policy_accel.models import ConditionCache, DPTransformer, DPTransformerConfig

B, T, TO, DA, DC = 3, 8, 2, 3, 5


@pytest.fixture
def model():
    torch.manual_seed(0)
    cfg = DPTransformerConfig(input_dim=DA, output_dim=DA, horizon=T, n_obs_steps=TO, cond_dim=DC, n_layer=2,
                              n_head=4, n_emb=32)
    return DPTransformer(cfg).eval()


def run(model, x, t, cond):
    """The reference path (the test oracle): the condition prepared afresh for every call."""
    return model(x, t, model.prepare(cond))


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, DA, generator=g), torch.randn(B, TO, DC, generator=g)


def test_shapes_and_timestep_forms(model):
    x, cond = inputs()
    assert run(model, x, 7.0, cond).shape == (B, T, DA)
    assert run(model, x, torch.tensor([1, 50, 99]), cond).shape == (B, T, DA)
    torch.testing.assert_close(run(model, x, torch.tensor([7, 7, 7]), cond), run(model, x, 7, cond))
    with pytest.raises(ValueError, match="cond must be"):
        run(model, x, 7.0, cond[:, :1])
    with pytest.raises(ValueError, match="timestep must be"):
        run(model, x, torch.tensor([1, 2]), cond)
    with pytest.raises(TypeError, match="made by prepare"):
        model(x, 7.0, cond)
    with pytest.raises(ValueError, match="n_cond_layers"):
        DPTransformerConfig(input_dim=2, output_dim=2, cond_dim=2, n_cond_layers=1)


def test_default_size_matches_diffusion_policy():
    m = DPTransformer(DPTransformerConfig(input_dim=7, output_dim=7, cond_dim=19))
    assert 8.9e6 < sum(p.numel() for p in m.parameters()) < 9.1e6  # DP-T low-dim Lift: ~9.0 M


def test_blocks_are_named_uniformly_and_return_branch_outputs(model):
    names = [n for n, _ in model.named_modules() if re.fullmatch(model.cache_blocks, n)]
    assert names == [f"decoder.layers.{i}.{k}" for i in range(2) for k in ("self_attn", "cross_attn", "ff")]
    seen = {}
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(lambda m, a, out, n=n: seen.__setitem__(n, (a[0].shape, out)))
               for n in names]
    run(model, *inputs()[:1], 5.0, inputs()[1])
    for h in handles:
        h.remove()
    assert all(isinstance(out, torch.Tensor) and out.shape == in_shape == (B, T, 32) for in_shape, out in seen.values())


def test_changing_a_later_action_token_never_changes_earlier_outputs(model):
    x, cond = inputs()
    ref = run(model, x, 30.0, cond)
    for j in range(1, T):
        x2 = x.clone()
        x2[:, j] += 1.0
        out = run(model, x2, 30.0, cond)
        torch.testing.assert_close(out[:, :j], ref[:, :j], rtol=0, atol=1e-6)
        assert not torch.allclose(out[:, j:], ref[:, j:])


def test_memory_mask_action_token_t_sees_obs_steps_up_to_t(model):
    x, cond = inputs()
    ref = run(model, x, 30.0, cond)
    newest = cond.clone()
    newest[:, 1] += 1.0  # memory token s = 2 -> visible to action tokens t >= 1
    out = run(model, x, 30.0, newest)
    torch.testing.assert_close(out[:, :1], ref[:, :1], rtol=0, atol=1e-6)
    assert not torch.allclose(out[:, 1:], ref[:, 1:])
    oldest = cond.clone()
    oldest[:, 0] += 1.0  # memory token s = 1 -> visible to every action token
    assert not torch.allclose(run(model, x, 30.0, oldest)[:, :1], ref[:, :1])


def textbook_forward(model, x, t, cond):
    """The original formulation: memory = MLP([time ; obs] + pos) as one tensor, cross-attention on it."""
    Bx = x.shape[0]
    h = model.input_emb(x) + model.pos_emb
    time_tok = model.time_emb(torch.full((Bx,), float(t)))[:, None]
    memory = model.cond_mlp(torch.cat([time_tok, model.cond_obs_emb(cond)], 1) + model.cond_pos_emb)
    for layer in model.decoder.layers:
        h = h + layer.self_attn(h, model.causal_mask)
        h = h + layer.cross_attn(h, memory, model.memory_mask)
        h = h + layer.ff(h)
    return model.head(model.ln_f(h))


@torch.no_grad()
def test_condition_cache_is_exact(model):
    x, cond = inputs()
    timesteps = [99.0, 66.0, 33.0, 0.0]
    cache = model.prepare(cond)
    cache_t = model.prepare(cond, timesteps)
    assert isinstance(cache, ConditionCache) and cache.tokens.shape == (B, TO, 32) and len(cache.kv) == 2
    for k, t in enumerate(timesteps):
        ref = run(model, x, t, cond)
        assert torch.equal(model(x, t, cache), ref)  # bit-identical: same computation, reused
        assert torch.equal(model(x, torch.tensor(t), cache), ref)  # t as a 0-dim tensor (no recompiles)
        torch.testing.assert_close(model(x, t, cache_t.at_step(k)), ref, rtol=1e-5, atol=1e-6)  # batched time K/V
        torch.testing.assert_close(textbook_forward(model, x, t, cond), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="condition cache is for batch"):
        model(x[:1], 5.0, cache)


def test_dropout_only_in_training(model):
    x, cond = inputs()
    assert torch.equal(run(model, x, 3.0, cond), run(model, x, 3.0, cond))
    model.train()
    assert not torch.equal(run(model, x, 3.0, cond), run(model, x, 3.0, cond))  # p_drop_attn 0.3


def test_optim_groups_decay_only_linear_weights(model):
    decay, no_decay = model.optim_groups(1e-3)
    assert decay["weight_decay"] == 1e-3 and no_decay["weight_decay"] == 0.0
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    assert all(p.ndim == 2 for p in decay["params"])
    assert any(p is model.pos_emb for p in no_decay["params"])


def test_gradients_flow_to_every_parameter(model):
    model.train()
    x, cond = inputs()
    F.mse_loss(run(model, x, torch.tensor([1, 2, 3]), cond), torch.zeros_like(x)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


class OriginalDPT(nn.Module):
    """Chi et al.'s TransformerForDiffusion forward (obs as condition, n_cond_layers=0), on torch's layers."""

    def __init__(self, ours: DPTransformer):
        super().__init__()
        cfg = ours.config
        self.ours = ours
        layer = nn.TransformerDecoderLayer(cfg.n_emb, cfg.n_head, 4 * cfg.n_emb, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, cfg.n_layer)
        for theirs, mine in zip(self.decoder.layers, ours.decoder.layers, strict=True):
            sa, ca, ff = mine.self_attn, mine.cross_attn, mine.ff
            copies = [(theirs.self_attn.in_proj_weight, sa.qkv.weight), (theirs.self_attn.in_proj_bias, sa.qkv.bias),
                      (theirs.self_attn.out_proj.weight, sa.proj.weight),
                      (theirs.self_attn.out_proj.bias, sa.proj.bias),
                      (theirs.multihead_attn.in_proj_weight, torch.cat([ca.q.weight, ca.kv_proj.weight])),
                      (theirs.multihead_attn.in_proj_bias, torch.cat([ca.q.bias, ca.kv_proj.bias])),
                      (theirs.multihead_attn.out_proj.weight, ca.proj.weight),
                      (theirs.multihead_attn.out_proj.bias, ca.proj.bias),
                      (theirs.linear1.weight, ff.fc.weight), (theirs.linear1.bias, ff.fc.bias),
                      (theirs.linear2.weight, ff.proj.weight), (theirs.linear2.bias, ff.proj.bias)]
            for norm, mine_norm in ((theirs.norm1, sa.norm), (theirs.norm2, ca.norm), (theirs.norm3, ff.norm)):
                copies += [(norm.weight, mine_norm.weight), (norm.bias, mine_norm.bias)]
            with torch.no_grad():
                for dst, src in copies:
                    dst.copy_(src)
        T, S = cfg.horizon, 1 + cfg.n_obs_steps
        mask = (torch.triu(torch.ones(T, T)) == 1).transpose(0, 1)
        self.mask = mask.float().masked_fill(mask == 0, float("-inf")).masked_fill(mask == 1, 0.0)
        t, s = torch.meshgrid(torch.arange(T), torch.arange(S), indexing="ij")
        mmask = t >= (s - 1)
        self.memory_mask = mmask.float().masked_fill(mmask == 0, float("-inf")).masked_fill(mmask == 1, 0.0)

    def forward(self, sample, timestep, cond):
        m = self.ours
        time_emb = m.time_emb(torch.full((sample.shape[0],), float(timestep))).unsqueeze(1)
        cond_embeddings = torch.cat([time_emb, m.cond_obs_emb(cond)], dim=1)
        memory = m.cond_mlp(cond_embeddings + m.cond_pos_emb[:, :cond_embeddings.shape[1]])
        x = m.input_emb(sample) + m.pos_emb[:, :sample.shape[1]]
        x = self.decoder(tgt=x, memory=memory, tgt_mask=self.mask, memory_mask=self.memory_mask)
        return m.head(m.ln_f(x))


@torch.no_grad()
def test_matches_the_original_architecture_on_torch_decoder_layers(model):
    x, cond = inputs()
    original = OriginalDPT(model).eval()
    for t in (0.0, 42.0, 99.0):
        torch.testing.assert_close(run(model, x, t, cond), original(x, t, cond), rtol=1e-5, atol=1e-5)


def test_dropout_keeps_each_entry_with_probability_1_minus_p_and_rescales_it():
    from policy_accel.models.blocks import Dropout

    x = torch.full((1000, 1000), 2.0, requires_grad=True)
    drop = Dropout(0.3)
    assert drop.eval()(x) is x
    torch.manual_seed(0)
    y = drop.train()(x)
    scale = 256 / (256 - 77)  # p = 0.3 rounded to 77/256
    kept = y != 0
    assert torch.equal(y[kept], torch.full_like(y[kept], 2.0 * scale))
    assert abs(kept.float().mean().item() - 179 / 256) < 0.003  # 6 sigma of a binomial over 1e6 entries
    y.sum().backward()
    assert torch.equal(x.grad, kept.float() * scale)
    torch.manual_seed(0)
    assert torch.equal(drop(x), y)  # the global generator decides, as for nn.Dropout
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="dropout probability"):
            Dropout(bad)
