import json

import numpy as np
import pytest

import envs

VARIANTS = ["push2d", "push2d_multimodal"]


def rollout(env, expert, seed):
    obs, _ = env.reset(seed=seed)
    expert.reset(seed=seed + 1000)
    traj = [obs]
    for t in range(env.horizon):
        obs, _, _, truncated, info = env.step(expert.act(obs))
        traj.append(obs)
        if info["success"]:
            return True, t + 1, np.stack(traj)
    return False, env.horizon, np.stack(traj)


@pytest.mark.parametrize("name", VARIANTS)
def test_reset_is_seeded(name):
    a, b = envs.make_env(name), envs.make_env(name)
    o1, info = a.reset(seed=3)
    assert info["success"] is False
    assert np.array_equal(o1, b.reset(seed=3)[0])
    assert np.array_equal(o1, a.reset(seed=3)[0])
    assert not np.array_equal(o1, a.reset(seed=4)[0])


@pytest.mark.parametrize("name", VARIANTS)
def test_obs_layout_and_spaces(name):
    env = envs.make_env(name)
    assert env.name == name and env.instruction
    obs, _ = env.reset(seed=0)
    assert obs.dtype == np.float32 and obs.shape == env.observation_space.shape
    assert sum(n for _, n in env.obs_layout) == obs.shape[0] <= 8
    assert env.observation_space.contains(obs)
    obs, reward, terminated, truncated, info = env.step(np.zeros(2, np.float32))
    assert isinstance(info["success"], bool) and not terminated and not truncated
    assert info["distance"] >= 0 and reward == float(info["success"])
    spec = json.loads(json.dumps(env.spec_dict()))
    clone = envs.make_env(spec["name"], **spec["kwargs"])
    assert np.array_equal(clone.reset(seed=5)[0], env.reset(seed=5)[0])


def test_truncates_at_horizon():
    env = envs.make_env("push2d", horizon=7)
    env.reset(seed=0)
    flags = [env.step(np.zeros(2))[3] for _ in range(7)]
    assert flags == [False] * 6 + [True]


@pytest.mark.parametrize("name", VARIANTS)
def test_expert_succeeds(name):
    env = envs.make_env(name)
    expert = envs.make_expert(name, env)
    assert expert.name and expert.version
    wins = sum(rollout(env, expert, seed)[0] for seed in range(20))
    assert wins >= 19, f"{name} expert: {wins}/20"


@pytest.mark.parametrize("name", VARIANTS)
def test_random_policy_fails(name):
    env = envs.make_env(name)
    rng = np.random.default_rng(0)
    wins = 0
    for seed in range(10):
        env.reset(seed=seed)
        for _ in range(env.horizon):
            if env.step(rng.uniform(-1, 1, 2))[4]["success"]:
                wins += 1
                break
    assert wins <= 2


def test_expert_is_reproducible_and_varied():
    env = envs.make_env("push2d")
    expert = envs.make_expert("push2d", env)
    _, _, t1 = rollout(env, expert, 1)
    _, _, t2 = rollout(env, expert, 1)
    assert np.array_equal(t1, t2)
    obs, _ = env.reset(seed=1)
    actions = set()
    for s in range(5):
        expert.reset(seed=s)
        actions.add(tuple(np.round(expert.act(obs), 5)))
    assert len(actions) > 1  # per-episode randomisation


def test_multimodal_expert_goes_both_ways():
    env = envs.make_env("push2d_multimodal")
    expert = envs.make_expert("push2d_multimodal", env)
    sides = []
    for seed in range(12):
        ok, _, traj = rollout(env, expert, seed)
        assert ok
        # object x when it passes the bar's height, relative to the bar centre
        obstacle = traj[0, 6:8]
        i = int(np.argmax(traj[:, 3] > obstacle[1]))
        sides.append(np.sign(traj[i, 2] - obstacle[0]))
    assert {-1.0, 1.0} <= set(sides)


@pytest.mark.parametrize("bad, err", [
    (np.zeros(3), ValueError),
    (np.zeros((1, 2)), ValueError),
    (np.array([np.nan, 0.0]), ValueError),
    (np.array([np.inf, 0.0]), ValueError),
    (np.array(["a", "b"]), TypeError),
])
def test_bad_actions_raise(bad, err):
    env = envs.make_env("push2d")
    env.reset(seed=0)
    with pytest.raises(err, match="action"):
        env.step(bad)


def test_step_before_reset_raises():
    with pytest.raises(RuntimeError, match="reset"):
        envs.make_env("push2d").step(np.zeros(2))


def test_out_of_range_actions_are_clipped():
    a, b = envs.make_env("push2d"), envs.make_env("push2d")
    a.reset(seed=0)
    b.reset(seed=0)
    assert np.array_equal(a.step(np.array([5.0, -5.0]))[0], b.step(np.array([1.0, -1.0]))[0])
