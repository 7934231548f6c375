"""π0 / π0.5 modes of the flow expert: no upstream fixture admits their tiny sizes (see
tests/fixtures/vla/README.md), so these tests check properties derivable by hand from the upstream code."""

import re

import pytest
import torch

from policy_accel.models.flow_expert import Prefix
from policy_accel.models.stand_ins import random_prefix
from tests.test_flow_expert import randomize, tiny


def test_pi05_adaptive_norm_with_zero_modulation_weights_is_plain_rmsnorm():
    model = randomize(tiny("pi05"))
    norm = model.layers[0].attn.input_layernorm
    x = torch.randn(2, 6, 32)
    rms = torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    with torch.no_grad():
        norm.dense.weight.zero_()
        norm.dense.bias.zero_()
        mod = norm.dense(torch.randn(2, 32))[:, None]
        torch.testing.assert_close(norm(x, mod), x / rms, rtol=1e-6, atol=1e-6)
        s, sh = torch.randn(32), torch.randn(32)
        norm.dense.bias.copy_(torch.cat([s, sh, torch.zeros(32)]))
        mod = norm.dense(torch.randn(2, 32))[:, None]
        torch.testing.assert_close(norm(x, mod), x / rms * (1 + s) + sh, rtol=1e-5, atol=1e-5)


def test_pi05_with_zero_gates_reduces_to_in_proj_final_norm_out_proj():
    """gate = 0 in every layer norm: each residual branch adds nothing; only the final (ungated) norm remains."""
    model = randomize(tiny("pi05"))
    s, sh = torch.randn(32), torch.randn(32)
    with torch.no_grad():
        for norm in model._norms():
            norm.dense.weight.zero_()
            norm.dense.bias.copy_(torch.cat([s, sh, torch.zeros(32)]))
        x = torch.randn(2, 6, 3)
        v = model(x, torch.tensor(0.7), model.prepare(torch.randn(2, 2, 5)))
        h = model.action_in_proj(x)
        h = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + s) + sh
        torch.testing.assert_close(v, model.action_out_proj(h), rtol=1e-5, atol=1e-5)
    assert not hasattr(model, "action_time_mlp_in")  # no time concatenation in π0.5's action tokens


def test_pi0_multi_query_attention_equals_replicated_kv_heads():
    """8 query heads sharing 1 kv head == 8 kv heads that are copies of it (weights and prefix K/V)."""
    mqa = randomize(tiny("pi0", n_head=8, n_kv_head=1, obs_dim=0))
    mha = tiny("pi0", n_head=8, n_kv_head=8, obs_dim=0)
    assert mqa.layers[0].attn.k_proj.weight.shape == (8, 32) and mqa.layers[0].attn.q_proj.weight.shape == (64, 32)
    sd = mqa.state_dict()
    for k, v in sd.items():
        if re.search(r"attn\.[kv]_proj", k):
            sd[k] = v.repeat(8, 1)
    mha.load_state_dict(sd)
    pre = random_prefix(mqa.config, 2, torch.Generator().manual_seed(0))
    pre8 = Prefix([(k.repeat(1, 8, 1, 1), v.repeat(1, 8, 1, 1)) for k, v in pre.kv], pre.pad_mask, pre.state)
    x = torch.randn(2, 6, 3)
    with torch.no_grad():
        torch.testing.assert_close(mqa(x, torch.tensor(0.3), mqa.prepare(pre)),
                                   mha(x, torch.tensor(0.3), mha.prepare(pre8)), rtol=1e-5, atol=1e-5)


def test_pi0_gemma_norm_uses_one_plus_weight():
    model = tiny("pi0")
    norm = model.layers[0].mlp.post_attention_layernorm
    x = torch.randn(3, 32)
    assert torch.equal(norm.weight, torch.zeros(32))  # Gemma's convention: zero weight = unit scale
    with torch.no_grad():
        norm.weight.fill_(0.5)
        torch.testing.assert_close(norm(x), 1.5 * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


@pytest.mark.parametrize("mode", ["pi0", "pi05"])
def test_pi_action_tokens_attend_bidirectionally_and_the_state_matters(mode):
    model = randomize(tiny(mode))
    obs, x = torch.randn(2, 2, 5), torch.randn(2, 6, 3)
    with torch.no_grad():
        ref = model(x, torch.tensor(0.4), model.prepare(obs))
        x2 = x.clone()
        x2[:, -1] += 1.0
        assert (model(x2, torch.tensor(0.4), model.prepare(obs))[:, 0] - ref[:, 0]).abs().max() > 1e-4
        obs2 = obs.clone()
        obs2[:, -1] += 1.0  # π0: the state token; π0.5: the prefix
        assert (model(x, torch.tensor(0.4), model.prepare(obs2)) - ref).abs().max() > 1e-4
