"""The action-DiT family (GR00T N1.5 / CogACT) against the golden data of LeRobot 0.4.4's real GR00T N1.5
action head (tests/fixtures/vla/groot_n1_5/, README there), and CogACT / adaLN-Zero facts from the upstream code.

Tolerance: everything is float32 on CPU. Our blocks apply the same operations in the same order as upstream,
and on this machine they agree with diffusers' own Attention / FeedForward bitwise; the fixture still differs
from both by up to 1.4e-6 on `vl_embs` (|x| <= 5.3): the generating CPU's kernels rounded differently. The
README measures float64 vs float32 of the real DiT at 1.4e-6 on outputs of size 3.7, so float32 rounding noise
is ~1e-6 per pass and grows along the residual stream (measured here: <= 3.8e-6 at the last block / norm_out,
<= 2.1e-6 on dit.out, 1.3e-6 on v_t, 1.7e-6 on v_seq, 9.8e-7 on the actions). We allow ATOL = RTOL = 1e-5
for every comparison, the 4-step loop included: a real mismatch (a swapped scale/shift, a wrong bucket, a
missing sign) moves these outputs by 1e-2 or more.
"""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import policy_accel as pa
import policy_accel.models.action_dit  # noqa: F401  (registers model_type "action_dit")
from policy_accel.models.action_dit import ActionDiT, ActionDiTConfig
from policy_accel.models.action_dit_weights import groot_state_dict, groot_to_ours, load_groot_state_dict

FIX = Path(__file__).parent / "fixtures" / "vla" / "groot_n1_5"
ATOL = RTOL = 1e-5
FLOW4 = pa.SamplerConfig("flow", 4)
ERRORS: dict[str, float] = {}  # max |ours - fixture| per comparison (printed with pytest -s)


def close(ours, ref, what=""):
    """Within ATOL / RTOL; a time-only tensor of ours (batch 1) is compared with every row of the fixture's."""
    assert ours.dim() == ref.dim(), what
    ours, ref = torch.broadcast_tensors(ours.detach(), ref)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {m}")
    ERRORS[what.split(" ")[0]] = max(ERRORS.get(what.split(" ")[0], 0.0), (ours - ref).abs().max().item())


def fixture_config(**kw) -> ActionDiTConfig:
    h = json.loads((FIX / "config.json").read_text())["action_head_config"]
    d = h["diffusion_model_cfg"]
    v = h["vl_self_attention_cfg"]
    return ActionDiTConfig(**{**dict(
        action_dim=h["action_dim"], mode="groot_n15", horizon=h["action_horizon"], num_layers=d["num_layers"],
        num_heads=d["num_attention_heads"], head_dim=d["attention_head_dim"], dropout=d["dropout"],
        cross_attention_dim=d["cross_attention_dim"], hidden_size=h["hidden_size"], state_dim=h["max_state_dim"],
        num_embodiments=h["max_num_embodiments"], num_future_tokens=h["num_target_vision_tokens"],
        max_seq_len=h["max_seq_len"], vl_layers=v["num_layers"], vl_heads=v["num_attention_heads"],
        vl_head_dim=v["attention_head_dim"], num_timestep_buckets=h["num_timestep_buckets"]), **kw})


@pytest.fixture(scope="module")
def groot():
    model = ActionDiT(fixture_config()).eval()
    load_groot_state_dict(model, load_file(FIX / "weights.safetensors"))
    return model


@pytest.fixture(scope="module")
def data():
    return {name: load_file(FIX / f"{name}.safetensors") for name in ("conditioning", "step", "sample")}


@pytest.fixture(scope="module", autouse=True)
def report_errors():
    yield
    print("\nmax |ours - fixture| per comparison:", {k: f"{v:.1e}" for k, v in sorted(ERRORS.items())})


def upstream_inputs(data) -> dict:
    c = data["conditioning"]
    return {k: c[k] for k in ("backbone_features", "state", "embodiment_id", "backbone_attention_mask")}


# ---------------------------------------------------------------- GR00T N1.5 against the fixture
def test_converter_is_a_strict_rename_of_every_upstream_tensor(groot):
    weights = load_file(FIX / "weights.safetensors")
    keys = [e["key"] for e in json.loads((FIX / "state_dict_keys.json").read_text())]
    assert sorted(keys) == sorted(weights)
    back = groot_state_dict(groot)
    assert sorted(back) == sorted(keys) and all(torch.equal(back[k], weights[k]) for k in keys)
    assert groot_to_ours("model.transformer_blocks.3.norm1.linear.bias") == \
        "transformer_blocks.3.attn.norm1.linear.bias"
    assert groot_to_ours("model.transformer_blocks.3.attn1.to_out.0.weight") == \
        "transformer_blocks.3.attn.to_out.0.weight"
    assert groot_to_ours("vl_self_attention.transformer_blocks.1.norm3.bias") == \
        "vl_self_attention.transformer_blocks.1.ff.norm3.bias"
    assert groot_to_ours("state_encoder.layer1.W") == "state_encoder.layer1.W"  # [E, in, out] kept as is
    assert groot.state_encoder.layer1.W.shape == (3, 10, 48)
    prefixed = ActionDiT(fixture_config()).eval()  # GR00TN15 checkpoints carry "action_head."
    load_groot_state_dict(prefixed, {"action_head." + k: v for k, v in weights.items()})
    assert all(torch.equal(a, b) for a, b in zip(prefixed.state_dict().values(), groot.state_dict().values(),
                                                 strict=True))


@torch.no_grad()
def test_conditioning_once_per_chunk_matches_fixture(groot, data):
    c = data["conditioning"]
    close(groot.vlln(c["backbone_features"]), c["vlln_out"], "vlln_out")
    ctx = groot.prepare(upstream_inputs(data), FLOW4.timesteps())
    close(ctx.vl, c["vl_embs"], "vl_embs")
    close(ctx.prefix[:, :1], c["state_features"], "state_features")
    close(ctx.prefix[:, 1:], groot.future_tokens.weight[None], "future tokens")
    # cross blocks' K/V of the VL tokens, computed once (the step's to_k / to_v records)
    hooks = load_file(FIX / "step_hooks.safetensors")
    for i in (0, 2):
        k, v = ctx.memory[i]
        close(k.transpose(1, 2).flatten(2), hooks[f"model.transformer_blocks.{i}.attn1.to_k#0.out"], f"to_k {i}")
        close(v.transpose(1, 2).flatten(2), hooks[f"model.transformer_blocks.{i}.attn1.to_v#0.out"], f"to_v {i}")
    assert ctx.memory[1] is None and ctx.memory[3] is None  # odd blocks self-attend


def test_sampling_buckets_are_upstreams_int_k_over_n(groot, data):
    assert groot._sampling_times(FLOW4.timesteps()).tolist() == data["sample"]["t_seq"][:, 0].tolist()
    assert groot._sampling_times(pa.SamplerConfig("flow", 3).timesteps()).tolist() == [0, 333, 666]
    assert groot._time(torch.tensor([0.75, 0.1])).tolist() == [250, 900]  # training: int((1 - t) * 1000)


@torch.no_grad()
def test_every_recorded_sub_block_of_the_step_matches(groot, data):
    """Step 1 (bucket 250): every hook record with a counterpart in ours, in and out."""
    index = json.loads((FIX / "step_hooks_index.json").read_text())
    hooks = load_file(FIX / "step_hooks.safetensors")
    ctx = groot.prepare(upstream_inputs(data), FLOW4.timesteps()).at_step(1)
    got, handles = {}, []
    for name, module in groot.named_modules():
        def hook(mod, args, out, name=name):
            got[name] = (args[0] if args else None, out)
        handles.append(module.register_forward_hook(hook))
    try:
        groot(data["step"]["x_t"], torch.tensor(FLOW4.timesteps()[1]), ctx)
    finally:
        for h in handles:
            h.remove()
    precomputed = {  # run in prepare(): compared through the context
        "model.timestep_encoder": groot.timestep_encoder(torch.tensor([250])),
        "model.proj_out_1": ctx.step.out,
        **{f"model.transformer_blocks.{i}.norm1.linear": ctx.step.mods[i][0] for i in range(4)},
        **{f"model.transformer_blocks.{i}.attn1.to_{kv}": None for i in (0, 2) for kv in "kv"},  # previous test
    }
    no_counterpart = {"action_encoder.pos_encoding", "position_embedding", "model", "model.timestep_encoder.time_proj",
                      "model.timestep_encoder.timestep_embedder", "model.timestep_encoder.timestep_embedder.linear_1",
                      "model.timestep_encoder.timestep_embedder.linear_2"}
    checked = 0
    for rec in index:
        module = rec["module"]
        ref_out = hooks[rec["out_key"]]
        if module in precomputed:
            if precomputed[module] is not None:
                if module == "model.timestep_encoder":
                    assert hooks[rec["in_key"]].tolist() == [250, 250]
                close(precomputed[module], ref_out, module)
                checked += 1
            continue
        if module in no_counterpart:
            continue
        ours = groot_to_ours(module + ".x")[:-2]
        assert ours in got, f"{module} ({ours}) did not run"
        ours_in, ours_out = got[ours]
        if module.startswith("action_decoder"):  # we decode only the 16 action tokens
            ref_out = ref_out[:, -16:]
        close(ours_out, ref_out, module + " out")
        if "in_key" in rec and not module.endswith(("attn1", ".ff")):  # ours take the residual stream instead
            close(ours_in, hooks[rec["in_key"]], module + " in")
        checked += 1
    assert checked == len(index) - len(no_counterpart) - 4  # 4 = the cross blocks' to_k / to_v


@torch.no_grad()
def test_step_matches_fixture_with_our_sign(groot, data):
    s = data["step"]
    ctx = groot.prepare(upstream_inputs(data), FLOW4.timesteps())
    proj = {}
    handle = groot.proj_out_2.register_forward_hook(lambda m, a, out: proj.setdefault("out", out))
    out = groot(s["x_t"], torch.tensor(0.75), ctx.at_step(1))
    handle.remove()
    close(proj["out"], s["dit.out"], "dit.out")
    close(-out, s["v_t"], "v_t")  # GR00T's v_g = actions - noise; ours = noise - x0 = -v_g
    close(-out, s["decoder_out_full"][:, -16:], "decoder_out_full")
    with pytest.raises(ValueError, match="no null condition"):
        ctx.uncond()


@torch.no_grad()
def test_whole_sampling_loop_through_pa_sample(groot, data):
    s = data["sample"]
    xs, vs = [], []

    def recording(x, t, ctx):
        xs.append(x)
        vs.append(groot(x, t, ctx))
        return vs[-1]

    ctx = groot.prepare(upstream_inputs(data), FLOW4.timesteps())
    actions = pa.sample(recording, ctx, s["noise"], FLOW4)
    close(torch.stack(xs + [actions]), s["x_seq"], "x_seq")
    close(-torch.stack(vs), s["v_seq"], "v_seq")
    close(actions, s["actions"], "actions")
    with pytest.raises(ValueError, match="no null condition"):
        pa.sample(groot, ctx, s["noise"], FLOW4, guidance=pa.Guidance(1.5))


@torch.no_grad()
def test_cached_vl_kv_and_precomputed_steps_equal_per_step_computation(groot, data):
    inputs, x = upstream_inputs(data), data["step"]["x_t"]
    ctx = groot.prepare(inputs, FLOW4.timesteps())
    per_step = groot.prepare(inputs)  # no timesteps: temb and modulations computed from t in forward
    raw = replace(per_step, memory=[None if m is None else per_step.vl for m in ctx.memory])
    for k, t in enumerate(FLOW4.timesteps()):
        ref = groot(x, torch.tensor(t), ctx.at_step(k))
        torch.testing.assert_close(groot(x, torch.tensor(t), per_step), ref, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(groot(x, torch.tensor(t), raw), ref, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- errors
def test_converter_errors_name_the_tensor():
    weights = load_file(FIX / "weights.safetensors")
    model = ActionDiT(fixture_config())
    bad = dict(weights)
    del bad["model.transformer_blocks.2.attn1.to_k.weight"]
    with pytest.raises(ValueError, match=r"lacks 1 tensors, first 'model.transformer_blocks.2.attn1.to_k.weight'"):
        load_groot_state_dict(model, bad)
    with pytest.raises(ValueError, match=r"'action_encoder.W2.W' has shape \(3, 128, 65\)"):
        load_groot_state_dict(model, {**weights, "action_encoder.W2.W": torch.zeros(3, 128, 65)})
    with pytest.raises(ValueError, match=r"'model.transformer_blocks.0.norm2.weight' \(ours"):
        load_groot_state_dict(model, {**weights, "model.transformer_blocks.0.norm2.weight": torch.zeros(64)})
    with pytest.raises(ValueError, match="position_embedding.weight' has shape"):  # another max_seq_len
        load_groot_state_dict(ActionDiT(fixture_config(max_seq_len=16)), weights)


def test_bad_condition_raises_before_the_model_runs(groot, data):
    good = upstream_inputs(data)
    for change, match in [({"backbone_features": torch.zeros(2, 12, 41)}, r"backbone_features.*\(2, None, 40\)"),
                          ({"state": torch.zeros(2, 10)}, r"state.*\(2, 1, 10\)"),
                          ({"state": torch.zeros(3, 1, 10)}, r"state.*\(2, 1, 10\)"),
                          ({"embodiment_id": torch.tensor([3, 0])}, r"embodiment_id \[3, 0\] out of range \[0, 3\)"),
                          ({"embodiment_id": torch.tensor([-1, 0])}, "out of range"),
                          ({"images": torch.zeros(2)}, "must hold exactly")]:
        with pytest.raises(ValueError, match=match):
            groot.prepare({**good, **change})
    with pytest.raises(ValueError, match="no observation projection"):
        groot.prepare(torch.zeros(2, 1, 10))
    with pytest.raises(ValueError, match="flow grid"):
        groot.prepare(good, pa.SamplerConfig("ddim", 10).timesteps())
    ctx = groot.prepare(good)
    with pytest.raises(ValueError, match=r"sample must be \(2, 16, 12\)"):
        groot(torch.zeros(2, 15, 12), torch.tensor(0.5), ctx)
    with pytest.raises(ValueError, match="timestep must be"):
        groot(torch.zeros(2, 16, 12), torch.zeros(3), ctx)
    flat = ActionDiT(ActionDiT.config_for(5, 3, 8, 2, dict(num_layers=2, num_heads=2, head_dim=8,
                                                           cross_attention_dim=16, vl_heads=2, vl_head_dim=8)))
    with pytest.raises(ValueError, match=r"cond must be \(B, 2, 5\)"):
        flat.prepare(torch.zeros(4, 3, 5))
    with pytest.raises(ValueError, match="must not set"):
        ActionDiT.config_for(5, 3, 8, 2, dict(state_dim=4))
    with pytest.raises(ValueError, match="must equal cross_attention_dim"):
        ActionDiTConfig(action_dim=3, vl_heads=3, vl_head_dim=8, cross_attention_dim=16, state_dim=2)


# ---------------------------------------------------------------- CogACT mode
def tiny_cogact(**kw) -> ActionDiT:
    torch.manual_seed(0)
    cfg = ActionDiTConfig(action_dim=7, mode="cogact", horizon=16, num_layers=2, num_heads=2, head_dim=8, cond_dim=24,
                          **kw)
    return ActionDiT(cfg).eval()


def randomize(model: ActionDiT) -> ActionDiT:  # past the zero-initialised layers, so outputs are informative
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return model


def test_cogact_structure_and_init_follow_upstream():
    model = tiny_cogact()
    assert model.prediction == "epsilon" and model.positional_embedding.shape == (17, 16)  # [cond ; 16 actions]
    assert model.z_embedder.uncondition.shape == (1, 24)
    z = {"cognition_features": torch.randn(2, 1, 24)}
    with torch.no_grad():
        out = model(torch.randn(2, 16, 7), torch.tensor(50.0), model.prepare(z))
    assert torch.equal(out, torch.zeros(2, 16, 7))  # DiT's final layer is zero-initialised
    with pytest.raises(ValueError, match=r"cognition_features.*\(2, 1, 24\)"):
        model.prepare({"cognition_features": torch.randn(2, 2, 24)})
    with pytest.raises(ValueError, match="adaln_zero is a CogACT-mode switch"):
        ActionDiTConfig(action_dim=3, state_dim=2, adaln_zero=True)
    for size, (layers, width, heads) in {"S": (6, 384, 4), "B": (12, 768, 12), "L": (24, 1024, 16)}.items():
        cfg = ActionDiTConfig.cogact(size)
        assert (cfg.num_layers, cfg.width, cfg.num_heads, cfg.horizon, cfg.cond_dim) == (layers, width, heads, 16, 4096)


@torch.no_grad()
@pytest.mark.parametrize("adaln_zero", [False, True])
def test_cogact_guidance_uses_the_learned_null_condition(adaln_zero):
    model = randomize(tiny_cogact(adaln_zero=adaln_zero))
    sampler = pa.SamplerConfig("ddim", 10)
    z = torch.randn(2, 1, 24)
    ctx = model.prepare({"cognition_features": z}, sampler.timesteps())
    null = model.prepare({"cognition_features": model.z_embedder.uncondition.expand(2, 1, 24)}, sampler.timesteps())
    x, t = torch.randn(2, 16, 7), torch.tensor(sampler.timesteps()[3])
    cond, uncond = model(x, t, ctx.at_step(3)), model(x, t, ctx.at_step(3).uncond())
    assert not torch.allclose(cond, uncond)
    torch.testing.assert_close(uncond, model(x, t, null.at_step(3)), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(model(x, t, ctx.uncond().at_step(3)), uncond, atol=0, rtol=0)
    guided = pa.sample(model, ctx, x, sampler, guidance=pa.Guidance(1.5))
    assert not torch.allclose(guided, pa.sample(model, ctx, x, sampler))
    per_step = model.prepare({"cognition_features": z})  # the precomputed steps equal computing them per step
    for k, tk in enumerate(sampler.timesteps()):
        for a, b in [(ctx.at_step(k), per_step), (ctx.at_step(k).uncond(), per_step.uncond())]:
            torch.testing.assert_close(model(x, torch.tensor(tk), a), model(x, torch.tensor(tk), b), atol=0, rtol=0)


@torch.no_grad()
def test_adaln_zero_blocks_are_the_identity_at_init():
    model = tiny_cogact(adaln_zero=True)
    assert model.positional_embedding.shape == (16, 16)  # no condition token
    ctx = model.prepare({"cognition_features": torch.randn(2, 1, 24)}, pa.SamplerConfig("ddim", 10).timesteps())
    h = torch.randn(2, 16, 16)
    for block, (am, fm) in zip(model.transformer_blocks, ctx.at_step(4).step.mods, strict=True):
        assert torch.equal(am, torch.zeros(2, 48)) and torch.equal(fm, torch.zeros(2, 48))  # shift, scale, gate
        assert torch.equal(block.attn(h, am), torch.zeros_like(h)) and torch.equal(block.ff(h, fm), torch.zeros_like(h))
        assert torch.equal(block(h, am, fm), h)


def test_cogact_trains_with_condition_dropout():
    model = tiny_cogact(class_dropout_prob=0.5).train()
    torch.manual_seed(3)
    z = torch.randn(64, 1, 24)
    ctx = model.prepare({"cognition_features": z})
    null = model.z_embedder.linear(model.z_embedder.uncondition)
    dropped = torch.isclose(ctx.prefix[:, 0], null.expand(64, -1)).all(-1)
    assert 10 < dropped.sum() < 54  # about half the rows see the null condition


# ---------------------------------------------------------------- as a Policy denoiser
@pytest.mark.parametrize("mode", ["groot_n15", "cogact"])
def test_policy_trains_and_acts(mode):
    torch.manual_seed(0)
    arch = dict(mode=mode, num_layers=2, num_heads=2, head_dim=8)
    arch |= dict(cross_attention_dim=16, vl_heads=2, vl_head_dim=8, hidden_size=16, num_future_tokens=2,
                 max_seq_len=8) if mode == "groot_n15" else dict(cond_dim=16)
    sampler = FLOW4 if mode == "groot_n15" else pa.SamplerConfig("ddim", 10)
    policy = pa.Policy(pa.PolicyConfig(obs_dim=5, action_dim=3, horizon=8, n_obs_steps=2, n_action_steps=4,
                                       model_type="action_dit", model=arch, sampler=sampler,
                                       guidance_scale=None if mode == "groot_n15" else 1.5))
    assert policy.model.prediction == ("velocity" if mode == "groot_n15" else "epsilon")
    other = pa.SamplerConfig("ddim", 10) if mode == "groot_n15" else FLOW4
    with pytest.raises(ValueError, match="needs a denoiser that predicts"):
        policy.set_sampler(other)
    policy.train()
    loss = policy.compute_loss(torch.randn(4, 2, 5), torch.randn(4, 8, 3))
    loss.backward()
    groups = policy.model.optim_groups(1e-6)
    assert sum(len(g["params"]) for g in groups) == len(list(policy.model.parameters()))
    assert all(p.grad is not None for p in groups[0]["params"])
    policy.eval()
    chunk = policy.predict_action_chunk(torch.randn(3, 5).numpy())
    assert chunk.shape == (3, 4, 3) and torch.isfinite(torch.from_numpy(chunk)).all()


def test_real_sizes_build():
    with torch.device("meta"):
        groot = ActionDiT(ActionDiTConfig.groot_n15())
        cogact = ActionDiT(ActionDiTConfig.cogact("B"))
    assert groot.transformer_blocks[0].attn.to_k.weight.shape == (1536, 2048)  # cross to 2048-wide VL tokens
    assert groot.transformer_blocks[1].attn.to_k.weight.shape == (1536, 1536)
    assert groot.transformer_blocks[0].ff.net[0].proj.weight.shape == (6144, 1536)
    assert groot.proj_out_2.weight.shape == (1024, 1536) and len(groot.transformer_blocks) == 16
    assert groot.action_encoder.W2.W.shape == (32, 3072, 1536) and groot.position_embedding.weight.shape == (1024, 1536)
    assert len(cogact.transformer_blocks) == 12 and cogact.transformer_blocks[0].ff.net[2].weight.shape == (768, 3072)
    assert cogact.z_embedder.linear.weight.shape == (768, 4096)
    assert len(pa.find_blocks(groot)) == 32 and len(pa.find_blocks(cogact)) == 24
