"""FlowExpert (SmolVLA / π0 / π0.5 action experts) against LeRobot 0.6.1's SmolVLA golden data
(tests/fixtures/vla/smolvla, see its README), and hand-checkable properties of the π0 and π0.5 modes.

Tolerance against the fixture: max |ours - ref| <= 1e-5 · max |ref| per tensor. Both sides are float32 CPU; ours
uses scaled_dot_product_attention where upstream uses eager matmul-softmax-matmul, which rounds differently
(measured: <= 1.1e-6 · scale over every record, the loop included), so 1e-5 leaves ~10x headroom while a wrong
mask, position, RoPE layout or norm convention shows up at >= 1e-2.
"""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import policy_accel as pa
from policy_accel.models.flow_expert import FlowExpert, FlowExpertConfig, Prefix
from policy_accel.models.flow_expert_io import rope_table, time_embedding
from policy_accel.models.flow_expert_weights import (
    load_lerobot_expert,
    load_smolvla_expert,
    smolvla_config,
    upstream_name,
)
from policy_accel.models.stand_ins import random_prefix

FIX = Path(__file__).parent / "fixtures" / "vla" / "smolvla"
REL_TOL = 1e-5


def assert_matches(ours: torch.Tensor, ref: torch.Tensor, what: str = ""):
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    err, scale = (ours - ref).abs().max().item(), ref.abs().max().item()
    assert err <= REL_TOL * max(scale, 1e-6), f"{what}: max error {err:.3g} at scale {scale:.3g}"


@pytest.fixture(scope="module")
def fixture_config() -> dict:
    return json.loads((FIX / "config.json").read_text())


@pytest.fixture(scope="module")
def weights() -> dict:
    return load_file(FIX / "weights.safetensors")


@pytest.fixture(scope="module")
def smolvla(fixture_config, weights) -> FlowExpert:
    cfg = smolvla_config(fixture_config["smolvla_config"], fixture_config["vlm_config"]["text_config"])
    model = FlowExpert(cfg).eval()
    load_smolvla_expert(model, weights)
    return model


@pytest.fixture(scope="module")
def prefix() -> Prefix:
    p = load_file(FIX / "prefix.safetensors")
    n = len([k for k in p if k.startswith("prefix_kv.") and k.endswith(".key")])
    return Prefix([(p[f"prefix_kv.{i}.key"], p[f"prefix_kv.{i}.value"]) for i in range(n)], p["prefix_pad_masks"])


def tiny(mode: str, **kw) -> FlowExpert:
    torch.manual_seed(0)
    fields = dict(mode=mode, action_dim=3, horizon=6, n_layer=2, width=32, n_head=4, n_kv_head=1 if mode != "smolvla"
                  else 2, head_dim=8, mlp_dim=48, prefix_width=24, prefix_mlp_dim=40, obs_dim=5, n_obs_steps=2,
                  state_dim=5 if mode == "pi0" else 0)
    return FlowExpert(FlowExpertConfig(**{**fields, **kw})).eval()


def randomize(model: FlowExpert, seed: int = 1) -> FlowExpert:
    """O(1) weights (the default init's std 0.02 makes every block's contribution tiny)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (p.shape[-1] ** -0.5 if p.ndim == 2 else 0.3))
    return model


# ---------------------------------------------------------------- the SmolVLA golden data
def test_config_derived_from_lerobot_matches_the_fixture(smolvla, fixture_config):
    d, cfg = fixture_config["expert_config_derived"], smolvla.config
    assert (cfg.width, cfg.mlp_dim, cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.head_dim) == (
        d["hidden_size"], d["intermediate_size"], d["num_hidden_layers"], d["num_attention_heads"],
        d["num_key_value_heads"], d["head_dim"])
    assert [i for i in range(cfg.n_layer) if cfg.is_cross(i)] == d["cross_attention_layers"]
    assert cfg.rope_max_wavelength == d["rope_max_wavelength_used_by_hand_written_attention"]
    assert (cfg.horizon, cfg.action_dim) == (16, 12)


def upstream_to_ours(module: str) -> str:
    """LeRobot module path -> ours: our attention / MLP sub-blocks own their input norms."""
    name = module.removeprefix("model.").removeprefix("vlm_with_expert.lm_expert.")
    name = re.sub(r"layers\.(\d+)\.input_layernorm", r"layers.\1.attn.input_layernorm", name)
    name = re.sub(r"layers\.(\d+)\.self_attn\.", r"layers.\1.attn.", name)
    return re.sub(r"layers\.(\d+)\.post_attention_layernorm", r"layers.\1.mlp.post_attention_layernorm", name)


def test_every_recorded_sub_block_matches_lerobot(smolvla, prefix):
    """All 49 records of step_hooks (inputs and outputs) have a counterpart here; cross layers' k_proj/v_proj run
    in prepare() (once per chunk), the others in the step."""
    step, hooks = load_file(FIX / "step.safetensors"), load_file(FIX / "step_hooks.safetensors")
    index = json.loads((FIX / "step_hooks_index.json").read_text())
    modules = dict(smolvla.named_modules())
    seen, handles = {}, []
    for rec in index:
        name = upstream_to_ours(rec["module"])
        handles.append(modules[name].register_forward_hook(
            lambda m, args, out, name=name: seen.setdefault(name, (args[0], out)) and None))
    try:
        with torch.no_grad():
            v = smolvla(step["x_t"], step["timestep"], smolvla.prepare(prefix))
    finally:
        for h in handles:
            h.remove()
    assert len(index) == 49
    for rec in index:
        inp, out = seen[upstream_to_ours(rec["module"])]
        assert_matches(out, hooks[rec["out_key"]], rec["out_key"])
        if "in_key" in rec:
            assert_matches(inp, hooks[rec["in_key"]], rec["in_key"])
    assert_matches(seen["action_time_mlp_out"][1], step["suffix_embs"], "suffix_embs")
    assert_matches(seen["norm"][1], step["expert_final_hidden"], "expert_final_hidden")
    assert_matches(v, step["v_t"], "v_t")


def test_step_context_matches_the_masks_and_positions_lerobot_built(smolvla, prefix):
    step = load_file(FIX / "step.safetensors")
    ctx = smolvla.prepare(prefix)
    mask = step["attention_mask"]  # (B, 16, 57) bool
    assert torch.equal(ctx.mask[:, 0] == 0, mask)
    assert torch.equal(ctx.cross_mask[:, 0, 0] == 0, mask[:, 0, :41])
    cos, sin = rope_table(step["position_ids"], 16, 10_000)  # 41..56 and 22..37
    assert torch.equal(ctx.rope[0], cos) and torch.equal(ctx.rope[1], sin)
    assert torch.equal(ctx.cross_rope[0], rope_table(torch.arange(16)[None], 16, 10_000)[0])
    assert ctx.mask.min() == torch.finfo(torch.float32).min


def test_per_example_timesteps_and_a_scalar_t_agree(smolvla, prefix):
    step = load_file(FIX / "step.safetensors")
    ctx = smolvla.prepare(prefix)
    with torch.no_grad():
        both = smolvla(step["x_t"], step["timestep"], ctx)  # t (B,) = [0.8, 0.3]
        assert_matches(both, step["v_t"], "v_t")
        for b, t in enumerate(step["timestep"].tolist()):
            one = smolvla(step["x_t"], torch.tensor(t), ctx)  # 0-dim t, as sample() passes it
            assert torch.equal(one[b], both[b])


def test_sampling_loop_matches_lerobot(smolvla, prefix):
    ref = load_file(FIX / "sample.safetensors")
    sampler = pa.SamplerConfig("flow", 10)
    assert torch.equal(torch.tensor(sampler.timesteps(), dtype=torch.float32), ref["t_seq"][:, 0])
    xs, vs = [], []

    def recording(x, t, ctx):
        xs.append(x)
        vs.append(smolvla(x, t, ctx))
        return vs[-1]

    with torch.no_grad():
        actions = pa.sample(recording, smolvla.prepare(prefix, sampler.timesteps()), ref["noise"], sampler)
    assert_matches(torch.stack(vs), ref["v_seq"], "v_seq")
    assert_matches(torch.stack([*xs, actions]), ref["x_seq"], "x_seq")
    assert_matches(actions, ref["actions"], "actions")


def test_precomputed_time_features_equal_per_step_computation(smolvla, prefix):
    """A lossless saving: per-step time features made in prepare() for all steps at once. SmolVLA's (an
    elementwise sinusoid) are bitwise equal; π0.5's modulations go through Linear layers, whose batched matmul
    rounds differently (as DP-T's time K/V do)."""
    sampler = pa.SamplerConfig("flow", 10)
    pi05 = randomize(tiny("pi05"))
    with torch.no_grad():
        for model, cond, x in [(smolvla, prefix, torch.randn(2, 16, 12)), (pi05, torch.randn(2, 2, 5),
                                                                           torch.randn(2, 6, 3))]:
            ctx, plain = model.prepare(cond, sampler.timesteps()), model.prepare(cond)
            for k, t in enumerate(sampler.timesteps()):
                fast, slow = model(x, torch.tensor(t), ctx.at_step(k)), model(x, torch.tensor(t), plain)
                if model is smolvla:
                    assert torch.equal(fast, slow)
                else:
                    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


def test_padded_prefix_tokens_are_ignored_and_action_tokens_are_causal(smolvla, prefix):
    x = torch.randn(2, 16, 12)
    junk = Prefix([(k.clone(), v.clone()) for k, v in prefix.kv], prefix.pad_mask)
    for k, v in junk.kv:  # example 1: camera 1 (tokens 16-31) and language 37-39 are padding
        k[1][:, ~prefix.pad_mask[1]] = 1e3
        v[1][:, ~prefix.pad_mask[1]] = -1e3
    with torch.no_grad():
        ref = smolvla(x, torch.tensor(0.5), smolvla.prepare(prefix))
        assert torch.equal(smolvla(x, torch.tensor(0.5), smolvla.prepare(junk)), ref)
        x2 = x.clone()
        x2[:, 9] += 1.0
        out = smolvla(x2, torch.tensor(0.5), smolvla.prepare(prefix))
    assert torch.equal(out[:, :9], ref[:, :9])  # token i sees action tokens j <= i only
    assert (out[:, 9:] - ref[:, 9:]).abs().amax(dim=(0, 2)).min() > 1e-4


# ---------------------------------------------------------------- the weight converter
def test_converter_is_strict_and_names_the_tensor(fixture_config, weights):
    cfg = smolvla_config(fixture_config["smolvla_config"], fixture_config["vlm_config"]["text_config"])
    model = FlowExpert(cfg)
    key = "model.vlm_with_expert.lm_expert.layers.2.mlp.up_proj.weight"
    load_smolvla_expert(model, weights)  # VLM, lm_head and the prefix-side state_proj are skipped by group
    assert torch.equal(model.layers[2].mlp.up_proj.weight, weights[key])
    assert torch.equal(model.layers[1].attn.input_layernorm.weight,
                       weights["model.vlm_with_expert.lm_expert.layers.1.input_layernorm.weight"])
    with pytest.raises(ValueError, match=re.escape(f"state dict lacks {key}")):
        load_smolvla_expert(model, {k: v for k, v in weights.items() if k != key})
    with pytest.raises(ValueError, match=re.escape(key) + r" has shape \(256, 71\)"):
        load_smolvla_expert(model, {**weights, key: weights[key][:, :71]})
    extra = "model.vlm_with_expert.lm_expert.layers.4.mlp.up_proj.weight"
    with pytest.raises(ValueError, match="unexpected expert tensor " + re.escape(extra)):
        load_smolvla_expert(model, {**weights, extra: weights[key]})
    with pytest.raises(ValueError, match="unexpected tensor outside .* model.action_head.weight"):
        load_smolvla_expert(model, {**weights, "model.action_head.weight": weights[key]})
    with pytest.raises(ValueError, match="needs a smolvla FlowExpert"):
        load_smolvla_expert(tiny("pi0"), weights)


def test_pi0_and_pi05_converters_read_lerobot_names():
    """Key names as spelled by LeRobot's PI0Pytorch / PI05Pytorch (`paligemma_with_expert.gemma_expert` is a
    PiGemmaForCausalLM: .model.layers[i].{input_layernorm, self_attn.*_proj, post_attention_layernorm, mlp.*},
    .model.norm; π0.5's norms hold `dense` instead of `weight`), written out here by hand."""
    root = "model.paligemma_with_expert.gemma_expert.model."
    for mode in ("pi0", "pi05"):
        model = tiny(mode)
        norm = ["dense.weight", "dense.bias"] if mode == "pi05" else ["weight"]
        per_layer = [f"self_attn.{p}_proj.weight" for p in "qkvo"] + [f"mlp.{p}_proj.weight" for p in
                                                                      ("gate", "up", "down")]
        per_layer += [f"input_layernorm.{s}" for s in norm] + [f"post_attention_layernorm.{s}" for s in norm]
        keys = [f"{root}layers.{i}.{n}" for i in range(2) for n in per_layer]
        keys += [f"{root}norm.{s}" for s in norm]
        io = ["action_in_proj", "action_out_proj"] + (["time_mlp_in", "time_mlp_out"] if mode == "pi05" else
                                                       ["action_time_mlp_in", "action_time_mlp_out", "state_proj"])
        keys += [f"model.{m}.{s}" for m in io for s in ("weight", "bias")]
        ours = {k: v for k, v in model.state_dict().items() if not k.startswith("prefix_encoder.")}
        assert sorted(upstream_name(k, mode) for k in ours) == sorted(keys)
        sd = {upstream_name(k, mode): torch.randn(v.shape) for k, v in ours.items()}
        sd["model.paligemma_with_expert.paligemma.model.language_model.layers.0.mlp.up_proj.weight"] = torch.ones(1)
        sd["model.paligemma_with_expert.gemma_expert.lm_head.weight"] = torch.ones(1)
        load_lerobot_expert(model, sd)  # the VLM and the expert's unused lm_head are skipped
        assert torch.equal(model.layers[1].attn.k_proj.weight, sd[f"{root}layers.1.self_attn.k_proj.weight"])
        assert torch.equal(model.norm.state_dict()[norm[0]], sd[f"{root}norm.{norm[0]}"])


# ---------------------------------------------------------------- bad input
def test_bad_prefix_action_and_condition_are_rejected(smolvla, prefix):
    x = torch.randn(2, 16, 12)
    with pytest.raises(ValueError, match="K/V for 3 layers; the expert has 4"):
        smolvla.prepare(Prefix(prefix.kv[:3], prefix.pad_mask))
    short = [(k[:, :, :40], v[:, :, :40]) for k, v in prefix.kv]
    with pytest.raises(ValueError, match=r"prefix layer 0 key has shape \(2, 2, 40, 16\).*\(2, 2, 41, 16\)"):
        smolvla.prepare(Prefix(short, prefix.pad_mask))
    narrow = [(k, v[..., :8]) for k, v in prefix.kv]
    with pytest.raises(ValueError, match=r"prefix layer 0 value has shape \(2, 2, 41, 8\)"):
        smolvla.prepare(Prefix(narrow, prefix.pad_mask))
    with pytest.raises(ValueError, match="pad_mask must be a bool tensor"):
        smolvla.prepare(Prefix(prefix.kv, prefix.pad_mask.float()))
    with pytest.raises(ValueError, match="no built-in prefix encoder"):
        smolvla.prepare(torch.randn(2, 1, 5))
    ctx = smolvla.prepare(prefix)
    with pytest.raises(ValueError, match=r"actions must be \(B, 16, 12\), got \(2, 15, 12\)"):
        smolvla(x[:, :15], torch.tensor(0.5), ctx)
    with pytest.raises(ValueError, match="context is for batch 2, actions have batch 1"):
        smolvla(x[:1], torch.tensor(0.5), ctx)
    with pytest.raises(ValueError, match=r"t must be a scalar or shape \(2,\)"):
        smolvla(x, torch.rand(3), ctx)
    pi0 = tiny("pi0")
    with pytest.raises(ValueError, match=r"obs condition must be \(B, 2, 5\)"):
        pi0.prepare(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="π0 needs the prefix's state"):
        pi0.prepare(Prefix(random_prefix(pi0.config, 2).kv, torch.ones(2, pi0.config.prefix_len, dtype=torch.bool)))
    with pytest.raises(IndexError, match="prepared for 10 sampler steps"):
        smolvla.prepare(prefix, pa.SamplerConfig("flow", 10).timesteps()).at_step(10)
    with pytest.raises(ValueError, match="π0 needs its state token"):
        FlowExpertConfig(mode="pi0")


def test_guidance_is_refused(smolvla, prefix):
    ctx = smolvla.prepare(prefix, pa.SamplerConfig("flow", 10).timesteps())
    with pytest.raises(ValueError, match="no unconditional branch"):
        ctx.uncond()
    with pytest.raises(ValueError, match="no unconditional branch"):
        pa.sample(smolvla, ctx, torch.randn(2, 16, 12), pa.SamplerConfig("flow", 10), guidance=pa.Guidance(1.5))


# ---------------------------------------------------------------- π0 / π0.5 properties
def test_time_embedding_hand_values():
    emb = time_embedding(torch.tensor([0.0, 1.0]), 8, 4e-3, 4.0).double()
    assert torch.equal(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4, dtype=torch.float64))
    periods = 4e-3 * 1000.0 ** (np.arange(4) / 3)  # 4e-3 .. 4.0, log-spaced
    np.testing.assert_allclose(emb[1].numpy(), np.r_[np.sin(2 * np.pi / periods), np.cos(2 * np.pi / periods)],
                               atol=1e-6)
    assert abs(emb[1, 3].item() - 1.0) < 1e-6  # the slowest frequency: angle 2π / 4 = π / 2


def test_action_positions_follow_the_prefix_as_upstream():
    """position_ids = (#valid prefix) + cumsum(suffix pad) - 1: π0's suffix starts with the state token."""
    for mode, first in [("smolvla", 0), ("pi0", 1), ("pi05", 0)]:
        model = tiny(mode)
        pre = random_prefix(model.config, 2)
        pre.pad_mask[1, 5:] = False
        ctx = model.prepare(pre)
        n_valid = torch.tensor([[model.config.prefix_len], [5]])
        cos, sin = rope_table(n_valid + first + torch.arange(6), 8, 10_000)
        assert torch.equal(ctx.rope[0], cos) and torch.equal(ctx.rope[1], sin), mode
        L = model.config.prefix_len + (mode == "pi0")
        assert ctx.kv[0][0].shape == (2, model.config.n_kv_head, L, 8)


@pytest.mark.parametrize("mode", ["smolvla", "pi0", "pi05"])
def test_a_chunk_runs_from_an_upstream_length_prefix_and_from_obs(mode):
    model = tiny(mode)
    sampler = pa.SamplerConfig("flow", 10)
    with torch.no_grad():
        for cond in (random_prefix(model.config, 2), torch.randn(2, 2, 5)):
            out = pa.sample(model, model.prepare(cond, sampler.timesteps()), torch.randn(2, 6, 3), sampler)
            assert out.shape == (2, 6, 3) and torch.isfinite(out).all()


def test_real_sizes_have_the_upstream_dimensions():
    """Built on the meta device (no memory). π0's gemma_300m expert: ~311 M parameters in its 18 layers
    (fixtures README); by hand: 18 × (2·1024·2048 + 2·1024·256 + 3·1024·4096 + 2·1024)."""
    with torch.device("meta"):
        pi0, pi05, smol = (FlowExpert(c) for c in (FlowExpertConfig.pi0(), FlowExpertConfig.pi05(),
                                                   FlowExpertConfig.smolvla()))
    count = lambda m: sum(p.numel() for p in m.layers.parameters())  # noqa: E731
    assert count(pi0) == 18 * (2 * 1024 * 2048 + 2 * 1024 * 256 + 3 * 1024 * 4096 + 2 * 1024) == 311_463_936
    assert count(pi05) == count(pi0) + 36 * (1024 * 3072 + 3072 - 1024)  # adaptive norms (dense) replace weights
    assert smol.layers[1].attn.k_proj.weight.shape == (320, 320) and smol.layers[0].attn.k_proj.weight.shape == (
        320, 720)
    assert smol.layers[0].attn.q_proj.weight.shape == (960, 720) and smol.layers[0].mlp.up_proj.weight.shape == (
        2048, 720)
    assert [c.prefix_len for c in (pi0.config, pi05.config, smol.config)] == [816, 968, 241]


# ---------------------------------------------------------------- as a Policy
@pytest.mark.parametrize("mode", ["smolvla", "pi0", "pi05"])
def test_policy_end_to_end(mode, tmp_path):
    torch.manual_seed(0)
    arch = dict(mode=mode, n_layer=2, width=32, n_head=4, n_kv_head=1 if mode != "smolvla" else 2, head_dim=8,
                mlp_dim=48, prefix_width=24, prefix_mlp_dim=40)
    cfg = pa.PolicyConfig(obs_dim=5, action_dim=3, horizon=8, n_obs_steps=2, n_action_steps=4,
                          model_type="flow_expert", model=arch, sampler=pa.SamplerConfig("flow", 10))
    policy = pa.Policy(cfg)
    rng = np.random.default_rng(0)
    policy.fit_normalizers(rng.uniform(-2, 2, (100, 5)), rng.uniform(-1, 1, (100, 3)))
    action = policy.select_action(rng.normal(size=5))
    assert action.shape == (3,) and np.isfinite(action).all()
    policy.train()
    loss = policy.compute_loss(torch.randn(4, 2, 5), torch.randn(4, 8, 3))
    loss.backward()
    assert torch.isfinite(loss) and policy.model.prefix_encoder.embed.weight.grad.abs().sum() > 0
    groups = policy.model.optim_groups(1e-2)
    assert sum(len(g["params"]) for g in groups) == len(list(policy.model.parameters()))
    policy.eval()
    obs = rng.normal(size=(2, 2, 5))
    loaded = pa.load_policy(policy.save(tmp_path / mode))
    noise = torch.randn(2, 8, 3)
    np.testing.assert_array_equal(loaded.predict_action_chunk(obs, noise), policy.predict_action_chunk(obs, noise))
    with pytest.raises(ValueError, match="must not set"):
        pa.PolicyConfig(obs_dim=5, action_dim=3, model_type="flow_expert", model={**arch, "horizon": 8})
