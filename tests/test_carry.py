"""Cross-chunk reuse (policy_accel/cache/carry.py): carried blocks skip step 0 on every chunk but each
refresh-th of an episode and start from the previous chunk's step-0 outputs; nothing crosses episodes."""

import re

import numpy as np
import pytest
import torch

import policy_accel as pa
from tests.conftest import OBS_DIM, make_dp_t_policy

CARRY = r"decoder\.layers\.\d+\.(self_attn|ff)"  # not the cross-attention, which reads the observation
DDIM = pa.SamplerConfig("ddim", 6, 12)


def histories(seed: int, n: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.uniform(-2, 2, (2, 2, OBS_DIM)).astype(np.float32) for _ in range(n)]


def carried_policy(refresh: int = 2, base=None) -> pa.Policy:
    policy = make_dp_t_policy(DDIM)
    pa.accelerate(policy, pa.CarryConfig(base or pa.UniformConfig(3), carry=CARRY, refresh=refresh))
    return policy


def reference_chunk(h_prev: np.ndarray, h: np.ndarray, noise: torch.Tensor) -> np.ndarray:
    """The carried chunk by hand: the base method alone (uniform3: steps 0-2 reuse step 0), with each carried
    block's output on steps 0-2 replaced by its step-0 output on the previous chunk (same noise)."""
    policy = make_dp_t_policy(DDIM)
    pa.accelerate(policy, pa.UniformConfig(3))
    policy.cache.stack.enabled = False  # per block, so that the replacement below is what the blocks return
    mods = {b.name: m for b in pa.find_blocks(policy.model) for n, m in policy.model.named_modules() if n == b.name}
    carried = [n for n in mods if re.fullmatch(CARRY, n)]
    stored, replace = {}, {}

    def hook(name):
        def fn(module, args, output):
            if policy.clock.running and policy.clock.step < 3:
                if name in replace:
                    return replace[name]
                if policy.clock.step == 0:
                    stored[name] = output.clone()

        return fn

    handles = [mods[n].register_forward_hook(hook(n)) for n in carried]
    policy.predict_action_chunk(h_prev, noise)
    replace.update(stored)
    out = policy.predict_action_chunk(h, noise)
    for x in handles:
        x.remove()
    return out


def test_a_carried_chunk_equals_the_base_method_with_the_previous_step_0_outputs():
    h0, h1, _ = histories(0)
    policy = carried_policy()
    noise = torch.randn(2, policy.config.horizon, policy.config.action_dim, generator=torch.Generator().manual_seed(1))
    policy.predict_action_chunk(h0, noise)
    assert not policy.cache.carrying
    out = policy.predict_action_chunk(h1, noise)
    assert policy.cache.carrying
    np.testing.assert_allclose(out, reference_chunk(h0, h1, noise), rtol=1e-5, atol=1e-6)
    # on the same input, carrying changes nothing: the stored outputs are what step 0 would compute
    same = carried_policy()
    a, b = same.predict_action_chunk(h0, noise), same.predict_action_chunk(h0, noise)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_carried_blocks_skip_step_0_every_chunk_but_each_refresh_th():
    policy = carried_policy(refresh=3)
    n_carried, n_blocks = len(policy.cache.carried), len(pa.find_blocks(policy.model))
    steps_computed = 2  # uniform3 on DDIM-6: steps 0 and 3
    computed = []
    for h in histories(1, 6):
        before = sum(b.computed for b in pa.cache_stats(policy).blocks.values())
        policy.predict_action_chunk(h)
        computed.append(sum(b.computed for b in pa.cache_stats(policy).blocks.values()) - before)
    full, carried = n_blocks * steps_computed, n_blocks * steps_computed - n_carried
    assert computed == [full, carried, carried, full, carried, carried]


def test_nothing_crosses_an_episode_or_a_change_of_batch():
    h0, h1, h2 = histories(2)
    policy = carried_policy()
    policy.seed(5)
    policy.predict_action_chunk(h0)
    policy.reset()  # a new episode: the first chunk computes step 0, and its noise is drawn anew
    policy.seed(7)
    fresh_episode = policy.predict_action_chunk(h1)
    assert not policy.cache.carrying
    other = carried_policy()
    other.seed(7)
    np.testing.assert_array_equal(fresh_episode, other.predict_action_chunk(h1))
    policy.predict_action_chunk(h2[:1])  # one row instead of two: the stored outputs do not fit
    assert not policy.cache.carrying


def test_episode_noise_is_one_draw_per_episode_and_goes_off_with_the_cache():
    policy = carried_policy()
    seen = []
    orig = policy._chunk
    policy._chunk = lambda history, noise, step_noise=None: (seen.append(noise.clone()), orig(history, noise))[1]
    h0, h1, _ = histories(3)
    policy.predict_action_chunk(h0)
    policy.predict_action_chunk(h1)
    policy.reset()
    policy.predict_action_chunk(h0)
    assert torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])
    pa.remove_acceleration(policy)
    assert not policy.episode_noise
    policy.predict_action_chunk(h0)
    policy.predict_action_chunk(h0)
    assert not torch.equal(seen[3], seen[4])


def test_bad_carry_configs_name_the_problem():
    with pytest.raises(ValueError, match="refresh must be >= 2"):
        pa.CarryConfig(pa.UniformConfig(3), carry=CARRY, refresh=1)
    with pytest.raises(ValueError, match="not a valid regex"):
        pa.CarryConfig(pa.UniformConfig(3), carry="(")
    policy = make_dp_t_policy(DDIM)
    with pytest.raises(ValueError, match="matches no cached block"):
        pa.accelerate(policy, pa.CarryConfig(pa.UniformConfig(3), carry="nothing"))
    assert policy.cache is None and not policy.clock.listeners
    with pytest.raises(TypeError, match="static-schedule methods"):
        pa.accelerate(policy, pa.CarryConfig(pa.DiffusersFBCConfig(), carry=CARRY))
    assert policy.cache is None and not policy.clock.listeners


def test_carry_calibration_sees_which_blocks_read_the_observation(tmp_path):
    """Layer 0's self-attention runs before any cross-attention: at step 0 (same noise) its input does not
    depend on the observation, so it does not move between chunks; every cross-attention reads the
    observation and does."""
    from envs.dataset import write_dataset
    from policy_accel.cross_chunk import carry_errors, carry_pattern

    rng = np.random.default_rng(0)
    eps = [{"obs": rng.uniform(-2, 2, (20, OBS_DIM)).astype(np.float32),
            "action": rng.uniform(-1, 1, (20, 3)).astype(np.float32)} for _ in range(3)]
    write_dataset(tmp_path / "d.zarr", eps, {"env": "test"})
    policy = make_dp_t_policy(DDIM)
    errors = carry_errors(policy, tmp_path / "d.zarr", n=4)
    assert errors["decoder.layers.0.self_attn"] == 0.0
    assert all(e > 1e-3 for n, e in errors.items() if n.endswith("cross_attn"))
    assert re.fullmatch(carry_pattern(errors, 0.0), "decoder.layers.0.self_attn")
    with pytest.raises(ValueError, match="raise the threshold"):
        carry_pattern({"a": 0.5}, 0.1)
