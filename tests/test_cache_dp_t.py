"""The engine on the real DP-T policy (tiny width): exactness, lossless savings, batching, no leaks,
and diffusers' TaylorSeer, First Block Cache and MagCache peers on the same model."""

import inspect

import numpy as np
import pytest
import torch

import policy_accel as pa
from policy_accel.cache import Schedule
from policy_accel.cache.peers import (
    apply_diffusers_first_block_cache,
    apply_diffusers_mag_cache,
    apply_diffusers_taylorseer,
    calibrate_mag_ratios,
    diffusers_refresh_steps,
)

OBS_DIM, ACT_DIM, H, STEPS = 5, 3, 8, 12


def make_policy() -> pa.Policy:
    torch.manual_seed(0)
    cfg = pa.PolicyConfig(obs_dim=OBS_DIM, action_dim=ACT_DIM, horizon=H, n_obs_steps=2, n_action_steps=4,
                          model=dict(n_layer=3, n_head=2, n_emb=32), sampler=pa.SamplerConfig("ddpm", STEPS, STEPS))
    policy = pa.Policy(cfg, seed=0)
    rng = np.random.default_rng(0)
    policy.fit_normalizers(rng.uniform(-2, 2, (100, OBS_DIM)), rng.uniform(-1, 1, (100, ACT_DIM)))
    return policy


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


@pytest.mark.parametrize("order", [0, 2])
def test_compute_every_step_equals_uncached_exactly(policy, order):
    ref = chunk(policy)
    pa.accelerate(policy, pa.BACTaylorConfig(schedule=every_step(policy), order=order, lossless=False))
    assert np.array_equal(chunk(policy), ref)
    assert pa.cache_stats(policy).skipped_fraction == 0


def test_cache_stats_estimate_the_flops_the_skips_saved(policy):
    full = pa.chunk_flops(policy, OBS)
    pa.accelerate(policy, pa.UniformConfig(interval=4, lossless=False))
    saved_measured = full - pa.chunk_flops(policy, OBS)  # one chunk: steps 0, 4, 8 compute
    stats = pa.cache_stats(policy)
    assert all((b.computed, b.skipped) == (3, 9) for b in stats.blocks.values())
    assert stats.flops_saved == pytest.approx(saved_measured, rel=1e-6) and "GFLOP saved" in str(stats)


def test_lossless_savings_do_not_change_outputs(policy):
    ref = chunk(policy)
    pa.accelerate(policy, pa.LosslessConfig())
    assert policy.precompute_condition
    np.testing.assert_allclose(chunk(policy), ref, rtol=0, atol=1e-5)
    flops = pa.chunk_flops(policy, OBS)
    pa.remove_acceleration(policy)
    assert not policy.precompute_condition
    assert flops < pa.chunk_flops(policy, OBS)  # the condition K/V are no longer recomputed every step


def test_remove_restores_bit_identical_model_and_signature(policy):
    module = policy.model.decoder.layers[1].cross_attn
    sig, ref = inspect.signature(module.forward), chunk(policy)
    state = {k: v.clone() for k, v in policy.state_dict().items()}
    pa.accelerate(policy, pa.TaylorSeerConfig(interval=3, order=2))
    assert not np.array_equal(chunk(policy), ref)
    pa.remove_acceleration(policy)
    assert inspect.signature(module.forward) == sig and "forward" not in module.__dict__
    assert all(torch.equal(v, state[k]) for k, v in policy.state_dict().items())
    assert np.array_equal(chunk(policy), ref)


@pytest.mark.parametrize("config", [pa.UniformConfig(interval=3), pa.TaylorSeerConfig(interval=4, order=2)])
def test_batch_equals_per_sample_under_static_schedule(policy, config):
    noise = torch.randn(3, H, ACT_DIM, generator=torch.Generator().manual_seed(5))
    policy.config.sampler = policy.sampler = pa.SamplerConfig("ddim", STEPS, STEPS)  # deterministic steps
    policy.set_sampler(policy.sampler)
    pa.accelerate(policy, config)
    policy.reset()
    batch = policy.predict_action_chunk(OBS, noise)
    single = np.concatenate([policy.predict_action_chunk(OBS[i:i + 1], noise[i:i + 1]) for i in range(3)])
    np.testing.assert_allclose(batch, single, rtol=1e-5, atol=1e-5)


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
    handle = apply_diffusers_taylorseer(policy, interval=3, order=2, warmup=2)
    theirs = chunk(policy)
    assert np.array_equal(chunk(policy), theirs)  # its state is reset per chunk
    handle.remove()
    sched = Schedule(blocks={n: steps for n in names}, num_steps=STEPS, sampler="ddpm",
                     checkpoint_hash=policy.checkpoint_hash)
    pa.accelerate(policy, pa.BACTaylorConfig(schedule=sched, order=2, differences="backward", lossless=False))
    np.testing.assert_allclose(chunk(policy), theirs, rtol=1e-4, atol=1e-5)
    pa.remove_acceleration(policy)
    # its refresh steps 0, 1, 3, 6, 9 have uneven gaps, where the latest-gap rule and Newton differ
    pa.accelerate(policy, pa.BACTaylorConfig(schedule=sched, order=2, lossless=False))
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
    assert policy.acceleration.config.tag.endswith("+compile")
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
    assert counters["stats"]["unique_graphs"] == 1  # t is a tensor input: no recompile per step
    policy.precompute_condition = True  # per-step time K/V views: still no recompile per step
    np.testing.assert_allclose(chunk(policy, seed=0), eager[0], rtol=1e-4, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 2
    policy.precompute_condition = False
    with pytest.raises(RuntimeError, match="compile=True"):
        pa.accelerate(policy, pa.UniformConfig(interval=2))
    policy.compile(False)
    pa.accelerate(policy, pa.UniformConfig(interval=2))
    with pytest.raises(RuntimeError, match="accelerated"):
        policy.compile()


def test_diffusers_first_block_cache_threshold_zero_equals_uncached_and_comes_off(policy):
    ref, batch = chunk(policy, OBS[:1]), chunk(policy)
    handle = apply_diffusers_first_block_cache(policy, threshold=0.0)
    assert np.array_equal(chunk(policy, OBS[:1]), ref)
    # a batch runs row by row (see below) with the DDPM noise the batch would have drawn
    np.testing.assert_allclose(chunk(policy), batch, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="already applied"):
        apply_diffusers_first_block_cache(policy)
    handle.remove()
    assert policy.sampling_hooks == []
    assert all(not m._diffusers_hook.hooks for m in policy.model.modules() if hasattr(m, "_diffusers_hook"))
    assert np.array_equal(chunk(policy, OBS[:1]), ref)


def test_diffusers_first_block_cache_skipping_every_step_is_reuse_of_all_layers_but_the_first(policy):
    handle = apply_diffusers_first_block_cache(policy, threshold=1e9)  # after step 0, always skip
    theirs = chunk(policy, OBS[:1])
    assert np.array_equal(chunk(policy, OBS[:1]), theirs)  # its state is reset per chunk
    handle.remove()
    steps = {b.name: list(range(STEPS)) if b.layer == 0 else [0] for b in pa.find_blocks(policy.model)}
    sched = Schedule(blocks=steps, num_steps=STEPS, sampler="ddpm", checkpoint_hash=policy.checkpoint_hash)
    pa.accelerate(policy, pa.BACConfig(schedule=sched, lossless=False))
    np.testing.assert_allclose(chunk(policy, OBS[:1]), theirs, rtol=1e-5, atol=1e-6)
    pa.remove_acceleration(policy)
    assert np.abs(chunk(policy, OBS[:1]) - theirs).max() > 1e-3  # and that is not the uncached output


def test_diffusers_caches_follow_each_other_on_one_policy(policy):
    ref = chunk(policy, OBS[:1])
    ratios = calibrate_mag_ratios(policy, OBS)
    for _ in range(2):  # as the benchmark's interleaved timing rounds do
        for apply in (lambda: apply_diffusers_taylorseer(policy, interval=3, order=1, warmup=2),
                      lambda: apply_diffusers_mag_cache(policy, ratios, threshold=0.0),
                      lambda: apply_diffusers_first_block_cache(policy, threshold=0.0)):
            handle = apply()
            out = chunk(policy, OBS[:1])
            handle.remove()
            assert out.shape == ref.shape
    np.testing.assert_array_equal(out, ref)  # the last one (threshold 0) computes everything


def test_diffusers_first_block_cache_decides_per_row_of_a_batch(policy):
    policy.set_sampler(pa.SamplerConfig("ddim", STEPS, STEPS))  # deterministic given the initial noise
    noise = torch.randn(3, H, ACT_DIM, generator=torch.Generator().manual_seed(0))
    handle = apply_diffusers_first_block_cache(policy, threshold=0.1)
    alone = np.concatenate([policy.predict_action_chunk(OBS[i:i + 1], noise[i:i + 1]) for i in range(3)])
    assert np.array_equal(policy.predict_action_chunk(OBS, noise), alone)
    handle.batch_coupled = False  # one decision for the whole batch: rows change each other's output
    assert np.abs(policy.predict_action_chunk(OBS, noise) - alone).max() > 1e-3
    handle.remove()


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
    assert policy.sampling_hooks == []


def test_magcache_threshold_zero_is_uncached_and_a_huge_one_reuses_the_stack_on_its_skip_pattern(policy):
    ratios = calibrate_mag_ratios(policy, OBS)
    ref = chunk(policy)
    handle = apply_diffusers_mag_cache(policy, ratios, threshold=0.0)
    assert np.array_equal(chunk(policy), ref)
    handle.remove()
    handle = apply_diffusers_mag_cache(policy, ratios, threshold=1e9, max_skip_steps=3, retention_ratio=0.2)
    theirs = chunk(policy)
    assert np.array_equal(chunk(policy), theirs)
    handle.remove()
    # computes the first int(0.2 * 12 + 0.5) = 2 steps, then skips 3 and computes 1: steps 0, 1, 5, 9.
    # Skipping the stack adds its last residual = the sum of every block's last branch output: reuse.
    names = [b.name for b in pa.find_blocks(policy.model)]
    sched = Schedule(blocks={n: [0, 1, 5, 9] for n in names}, num_steps=STEPS, sampler="ddpm",
                     checkpoint_hash=policy.checkpoint_hash)
    pa.accelerate(policy, pa.BACConfig(schedule=sched, lossless=False))
    np.testing.assert_allclose(chunk(policy), theirs, rtol=1e-5, atol=1e-6)
    assert np.abs(chunk(policy) - ref).max() > 1e-3
    pa.remove_acceleration(policy)
    policy.set_sampler(pa.SamplerConfig("ddim", 6, STEPS))
    with pytest.raises(ValueError, match="made for ddpm with 12 steps, policy samples ddim with 6"):
        apply_diffusers_mag_cache(policy, ratios)


def test_diffusers_caches_refuse_bad_input(policy, tmp_path):
    from policy_accel.cache.peers import MagRatios

    (tmp_path / "a.json").write_text('{"ratios": [1.0]}')
    (tmp_path / "b.json").write_text('{"ratios": [1.0')
    with pytest.raises(ValueError, match="wrong fields"):
        MagRatios.load(tmp_path / "a.json")
    with pytest.raises(ValueError, match="not valid JSON"):
        MagRatios.load(tmp_path / "b.json")
    with pytest.raises(ValueError, match="needs 12 finite ratios, has 11"):
        apply_diffusers_mag_cache(policy, MagRatios([1.0] * 11, "ddpm", STEPS, policy.checkpoint_hash))
    with pytest.raises(ValueError, match="threshold"):
        apply_diffusers_first_block_cache(policy, threshold=float("nan"))
    pa.accelerate(policy, pa.UniformConfig(interval=2))
    with pytest.raises(RuntimeError, match="remove our acceleration"):
        apply_diffusers_first_block_cache(policy)
    pa.remove_acceleration(policy)

    class NoStack(torch.nn.Module):
        pass

    policy.model, model = NoStack(), policy.model
    with pytest.raises(ValueError, match="block_stack"):
        apply_diffusers_first_block_cache(policy)
    policy.model = model
