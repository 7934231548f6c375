"""The engine through the DP-T policy (tiny width): the exact per-chunk precompute, FLOPs, compile,
episodes, and diffusers' TaylorSeer, First Block Cache and MagCache peers on the same model.
The family-independent contract is in test_cache_contract.py."""


import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import policy_accel as pa
from policy_accel.cache import Schedule
from policy_accel.cache.peers import MagRatios, diffusers_refresh_steps
from policy_accel.calibration import calibrate_mag_ratios
from policy_accel.sampling import sample
from tests.conftest import ACT_DIM, HORIZON, OBS_DIM, STEPS, make_dp_t_policy

H = HORIZON
make_policy = make_dp_t_policy


@pytest.fixture
def policy():
    return make_policy()


OBS = np.random.default_rng(1).uniform(-2, 2, (3, 2, OBS_DIM)).astype(np.float32)  # 3 histories


def chunk(policy, obs=OBS, seed=0):
    policy.seed(seed)
    policy.reset()
    return policy.predict_action_chunk(obs)


def every_step(policy) -> Schedule:
    names = [b.name for b in pa.find_blocks(policy.model)]
    return Schedule(blocks={n: list(range(STEPS)) for n in names}, num_steps=STEPS, sampler="ddpm",
                    checkpoint_hash=policy.checkpoint_hash)


def test_blocks_found_are_the_24_sub_blocks_per_8_layers_pattern(policy):
    kinds = [(b.layer, b.kind) for b in pa.find_blocks(policy.model)]
    assert kinds == [(i, k) for i in range(3) for k in ("self_attn", "cross_attn", "ff")]


def test_cache_stats_estimate_the_flops_the_skips_saved(policy):
    full = pa.chunk_flops(policy, OBS)
    pa.accelerate(policy, pa.UniformConfig(interval=4))
    saved_measured = full - pa.chunk_flops(policy, OBS)  # one chunk: steps 0, 4, 8 compute
    stats = pa.cache_stats(policy)
    assert all((b.computed, b.skipped) == (3, 9) for b in stats.blocks.values())
    assert stats.flops_saved == pytest.approx(saved_measured, rel=1e-6) and "GFLOP saved" in str(stats)


def test_the_exact_per_chunk_precompute_is_every_method_s_path(policy):
    """The policy prepares the condition once per chunk (obs-token K/V, per-step time K/V); the
    reference path prepares it afresh at every step. Same actions, fewer FLOPs."""
    noise = torch.randn(3, H, ACT_DIM, generator=torch.Generator().manual_seed(2))
    policy.set_sampler(pa.SamplerConfig("ddim", STEPS, STEPS))
    ours = policy.predict_action_chunk(OBS, noise)
    model = policy.model
    cond = policy.obs_normalizer.normalize(torch.from_numpy(OBS))

    def reference(x, t, ctx):
        return model(x, t, model.prepare(cond))

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        x = sample(reference, pa.Context(), noise, policy.sampler)
    start = policy.config.n_obs_steps - 1
    ref = policy.action_normalizer.unnormalize(x[:, start:start + policy.config.n_action_steps]).numpy()
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)
    assert pa.chunk_flops(policy, OBS) < counter.get_total_flops()


def test_no_state_leaks_across_chunks_episodes_or_batch_sizes(policy):
    pa.accelerate(policy, pa.TaylorSeerConfig(interval=3, order=2))
    first = chunk(policy, OBS[:2])
    chunk(policy, OBS)  # another batch size in between
    policy.select_action(OBS[0, 0])  # and an episode with a queue
    assert np.array_equal(chunk(policy, OBS[:2]), first)
    fresh = make_policy()
    pa.accelerate(fresh, pa.TaylorSeerConfig(interval=3, order=2))
    assert np.array_equal(chunk(fresh, OBS[:2]), first)


def test_diffusers_taylorseer_matches_ours_on_dp_t(policy):
    names = [b.name for b in pa.find_blocks(policy.model)]
    steps = diffusers_refresh_steps(STEPS, interval=3, warmup=2)
    pa.accelerate(policy, pa.DiffusersTaylorSeerConfig(interval=3, order=2, warmup=2))
    theirs = chunk(policy)
    assert np.array_equal(chunk(policy), theirs)  # its state is reset per chunk
    pa.remove_acceleration(policy)
    sched = Schedule(blocks={n: steps for n in names}, num_steps=STEPS, sampler="ddpm",
                     checkpoint_hash=policy.checkpoint_hash)
    pa.accelerate(policy, pa.BACTaylorConfig(schedule=sched, order=2, differences="backward"))
    np.testing.assert_allclose(chunk(policy), theirs, rtol=1e-4, atol=1e-5)
    pa.remove_acceleration(policy)
    # its refresh steps 0, 1, 3, 6, 9 have uneven gaps, where the latest-gap rule and Newton differ
    pa.accelerate(policy, pa.BACTaylorConfig(schedule=sched, order=2))
    assert np.abs(chunk(policy) - theirs).max() > 1e-3


def test_noise_argument_is_checked(policy):
    with pytest.raises(ValueError, match="noise must have shape"):
        policy.predict_action_chunk(OBS, torch.zeros(3, H + 1, ACT_DIM))


def test_accelerated_loop_runs_under_torch_compile_and_matches_eager(policy):
    from torch._dynamo.utils import counters

    config = dict(interval=3, order=2)
    pa.accelerate(policy, pa.TaylorSeerConfig(**config))
    eager = [chunk(policy, seed=s) for s in (0, 1)]
    pa.remove_acceleration(policy)
    torch._dynamo.reset()
    counters.clear()
    pa.accelerate(policy, pa.TaylorSeerConfig(**config, compile=True))
    assert policy.cache.tag.endswith("+compile")
    np.testing.assert_allclose(chunk(policy, seed=0), eager[0], rtol=1e-4, atol=1e-5)
    graphs = counters["stats"]["unique_graphs"]
    assert 1 <= graphs <= 3  # one per block kind (self_attn, cross_attn, ff), shared by the layers
    np.testing.assert_allclose(chunk(policy, seed=1), eager[1], rtol=1e-4, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == graphs  # no recompilation as steps and chunks go by


def test_whole_denoiser_compiles_to_one_graph_and_refuses_to_mix_with_hooks(policy):
    from torch._dynamo.utils import counters

    eager = [chunk(policy, seed=s) for s in (0, 1)]
    torch._dynamo.reset()
    counters.clear()
    policy.compile()
    np.testing.assert_allclose(chunk(policy, seed=0), eager[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(chunk(policy, seed=1), eager[1], rtol=1e-4, atol=1e-5)
    # t is a tensor and each step's time K/V a view of the same structure: no recompile per step or chunk
    assert counters["stats"]["unique_graphs"] == 1
    with pytest.raises(RuntimeError, match="compile=True"):
        pa.accelerate(policy, pa.UniformConfig(interval=2))
    policy.compile(False)
    pa.accelerate(policy, pa.UniformConfig(interval=2))
    with pytest.raises(RuntimeError, match="accelerated"):
        policy.compile()


def test_diffusers_first_block_cache_threshold_zero_equals_uncached_and_comes_off(policy):
    ref, batch = chunk(policy, OBS[:1]), chunk(policy)
    pa.accelerate(policy, pa.DiffusersFBCConfig(threshold=0.0))
    assert np.array_equal(chunk(policy, OBS[:1]), ref)
    # a batch runs row by row (see below) with the DDPM noise the batch would have drawn
    np.testing.assert_allclose(chunk(policy), batch, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="already accelerated"):
        pa.accelerate(policy, pa.DiffusersFBCConfig())
    pa.remove_acceleration(policy)
    assert policy.clock.listeners == []
    assert all(not m._diffusers_hook.hooks for m in policy.model.modules() if hasattr(m, "_diffusers_hook"))
    assert np.array_equal(chunk(policy, OBS[:1]), ref)


def test_diffusers_first_block_cache_skipping_every_step_is_reuse_of_all_layers_but_the_first(policy):
    pa.accelerate(policy, pa.DiffusersFBCConfig(threshold=1e9))  # after step 0, always skip
    theirs = chunk(policy, OBS[:1])
    assert np.array_equal(chunk(policy, OBS[:1]), theirs)  # its state is reset per chunk
    pa.remove_acceleration(policy)
    steps = {b.name: list(range(STEPS)) if b.layer == 0 else [0] for b in pa.find_blocks(policy.model)}
    sched = Schedule(blocks=steps, num_steps=STEPS, sampler="ddpm", checkpoint_hash=policy.checkpoint_hash)
    pa.accelerate(policy, pa.BACConfig(schedule=sched))
    np.testing.assert_allclose(chunk(policy, OBS[:1]), theirs, rtol=1e-5, atol=1e-6)
    pa.remove_acceleration(policy)
    assert np.abs(chunk(policy, OBS[:1]) - theirs).max() > 1e-3  # and that is not the uncached output


def test_diffusers_caches_follow_each_other_on_one_policy(policy):
    ref = chunk(policy, OBS[:1])
    ratios = calibrate_mag_ratios(policy, OBS)
    for _ in range(2):  # as the benchmark's interleaved timing rounds do
        for apply in (lambda: pa.accelerate(policy, pa.DiffusersTaylorSeerConfig(interval=3, order=1, warmup=2)),
                      lambda: pa.accelerate(policy, pa.DiffusersMagCacheConfig(ratios, threshold=0.0)),
                      lambda: pa.accelerate(policy, pa.DiffusersFBCConfig(threshold=0.0))):
            apply()
            out = chunk(policy, OBS[:1])
            pa.remove_acceleration(policy)
            assert out.shape == ref.shape
    np.testing.assert_array_equal(out, ref)  # the last one (threshold 0) computes everything


def test_diffusers_first_block_cache_decides_per_row_of_a_batch(policy):
    policy.set_sampler(pa.SamplerConfig("ddim", STEPS, STEPS))  # deterministic given the initial noise
    noise = torch.randn(3, H, ACT_DIM, generator=torch.Generator().manual_seed(0))
    pa.accelerate(policy, pa.DiffusersFBCConfig(threshold=0.1))
    alone = np.concatenate([policy.predict_action_chunk(OBS[i:i + 1], noise[i:i + 1]) for i in range(3)])
    assert np.array_equal(policy.predict_action_chunk(OBS, noise), alone)
    policy.cache.batch_coupled = False  # one decision for the whole batch: rows change each other's output
    assert np.abs(policy.predict_action_chunk(OBS, noise) - alone).max() > 1e-3
    pa.remove_acceleration(policy)


def test_magcache_calibration_records_the_stack_residual_norm_ratio_of_every_step(policy):
    inputs, outputs = [], []
    layers = policy.model.decoder.layers
    pre = layers[0].register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
    post = layers[-1].register_forward_hook(lambda m, args, out: outputs.append(out))
    chunk(policy)
    pre.remove(), post.remove()
    norms = [torch.linalg.norm(o - i, dim=-1) for i, o in zip(inputs, outputs, strict=True)]  # (B, T) per step
    expected = [1.0] + [(n / (p + 1e-8)).mean().item() for p, n in zip(norms[:-1], norms[1:], strict=True)]
    policy.seed(0)
    ratios = calibrate_mag_ratios(policy, OBS)
    assert (ratios.sampler, ratios.num_steps, ratios.checkpoint_hash) == ("ddpm", STEPS, policy.checkpoint_hash)
    np.testing.assert_allclose(ratios.ratios, expected, rtol=1e-5)
    assert policy.clock.listeners == []


def test_magcache_threshold_zero_is_uncached_and_a_huge_one_reuses_the_stack_on_its_skip_pattern(policy):
    ratios = calibrate_mag_ratios(policy, OBS)
    ref = chunk(policy)
    pa.accelerate(policy, pa.DiffusersMagCacheConfig(ratios, threshold=0.0))
    assert np.array_equal(chunk(policy), ref)
    pa.remove_acceleration(policy)
    pa.accelerate(policy, pa.DiffusersMagCacheConfig(ratios, 1e9, max_skip_steps=3, retention_ratio=0.2))
    theirs = chunk(policy)
    assert np.array_equal(chunk(policy), theirs)
    pa.remove_acceleration(policy)
    # computes the first int(0.2 * 12 + 0.5) = 2 steps, then skips 3 and computes 1: steps 0, 1, 5, 9.
    # Skipping the stack adds its last residual = the sum of every block's last branch output: reuse.
    names = [b.name for b in pa.find_blocks(policy.model)]
    sched = Schedule(blocks={n: [0, 1, 5, 9] for n in names}, num_steps=STEPS, sampler="ddpm",
                     checkpoint_hash=policy.checkpoint_hash)
    pa.accelerate(policy, pa.BACConfig(schedule=sched))
    np.testing.assert_allclose(chunk(policy), theirs, rtol=1e-5, atol=1e-6)
    assert np.abs(chunk(policy) - ref).max() > 1e-3
    pa.remove_acceleration(policy)
    policy.set_sampler(pa.SamplerConfig("ddim", 6, STEPS))
    with pytest.raises(ValueError, match="made for ddpm with 12 steps, policy samples ddim with 6"):
        pa.accelerate(policy, pa.DiffusersMagCacheConfig(ratios))


def test_diffusers_caches_refuse_bad_input(policy, tmp_path):

    (tmp_path / "a.json").write_text('{"ratios": [1.0]}')
    (tmp_path / "b.json").write_text('{"ratios": [1.0')
    with pytest.raises(ValueError, match="wrong fields"):
        MagRatios.load(tmp_path / "a.json")
    with pytest.raises(ValueError, match="not valid JSON"):
        MagRatios.load(tmp_path / "b.json")
    with pytest.raises(ValueError, match="needs 12 finite ratios, has 11"):
        pa.accelerate(policy, pa.DiffusersMagCacheConfig(MagRatios([1.0] * 11, "ddpm", STEPS, policy.checkpoint_hash)))
    with pytest.raises(ValueError, match="threshold"):
        pa.accelerate(policy, pa.DiffusersFBCConfig(threshold=float("nan")))
    pa.accelerate(policy, pa.UniformConfig(interval=2))
    with pytest.raises(RuntimeError, match="already accelerated"):
        pa.accelerate(policy, pa.DiffusersFBCConfig())
    pa.remove_acceleration(policy)

    class NoStack(torch.nn.Module):
        pass

    policy.model, model = NoStack(), policy.model
    with pytest.raises(ValueError, match="block_stack"):
        pa.accelerate(policy, pa.DiffusersFBCConfig())
    policy.model = model


def test_calibration_is_reproducible_and_the_union_keeps_volatile_blocks_fresh_for_later_ffns(policy):
    obs = list(np.random.default_rng(3).uniform(-2, 2, (6, 2, OBS_DIM)).astype(np.float32))
    sched = pa.calibrate(policy, obs, budget=3, bubble_blocks=4, batch_size=4)
    policy.predict_action_chunk(OBS)  # moves the policy's own noise generator
    state = policy.generator.get_state()
    assert pa.calibrate(policy, obs, budget=3, bubble_blocks=4, batch_size=4) == sched
    assert torch.equal(policy.generator.get_state(), state)
    assert pa.calibrate(policy, obs, budget=3, bubble_blocks=4, seed=1).calibration != sched.calibration
    infos = {b.name: b for b in pa.find_blocks(policy.model)}
    assert set(sched.blocks) == set(infos) and sched.calibration["n_observations"] == 6
    # the union: blocks not chosen keep the steps ACS chose; each chosen (most volatile) block at layer L
    # computes on every step on which an FFN at layer >= L computes, and only gains steps
    acs, vol = sched.calibration["acs_steps_before_union"], sched.calibration["volatility"]
    chosen = sorted(vol, key=lambda b: -vol[b])[:4]
    for name, steps in sched.blocks.items():
        if name not in chosen:
            assert steps == acs[name], name
        else:
            assert set(acs[name]) <= set(steps), name
            for ffn in (b for b in infos.values() if b.is_ffn and b.layer >= infos[name].layer):
                assert set(sched.blocks[ffn.name]) <= set(steps), (name, ffn.name)
    assert any(sched.blocks[n] != acs[n] for n in chosen)  # this calibration makes the union do something
    pa.accelerate(policy, pa.BACTaylorConfig(schedule=sched, order=1))
    assert np.isfinite(chunk(policy)).all()


def test_pooled_calibration_spends_exactly_its_budget_and_runs(policy):
    obs = list(np.random.default_rng(4).uniform(-2, 2, (4, 2, OBS_DIM)).astype(np.float32))
    n_blocks = len(pa.find_blocks(policy.model))
    sched = pa.calibrate(policy, obs, calls=1.5, bubble_blocks=0, batch_size=4)
    assert sum(len(s) for s in sched.blocks.values()) == round(1.5 * n_blocks)
    assert all(s[0] == 0 for s in sched.blocks.values()) and "pooled" in sched.calibration["criterion"]
    with pytest.raises(ValueError, match="exactly one of budget"):
        pa.calibrate(policy, obs, budget=2, calls=1.5)
    pa.accelerate(policy, pa.BACConfig(schedule=sched))
    assert np.isfinite(chunk(policy)).all()
    pa.remove_acceleration(policy)
