import json

import numpy as np
import pytest

import envs

pytest.importorskip("metaworld")


def test_single_task_reset_step():
    env = envs.make_env("mw:reach-v3")
    obs, info = env.reset(seed=0)
    assert env.name == "mw:reach-v3" and env.instruction == "reach the goal position"
    assert obs.dtype == np.float32 and obs.shape == (39,) == env.observation_space.shape
    assert sum(n for _, n in env.obs_layout) == 39
    assert info["success"] is False
    obs2, reward, terminated, truncated, info = env.step(np.zeros(4, np.float32))
    assert isinstance(info["success"], bool) and obs2.shape == (39,)
    assert np.array_equal(envs.make_env("mw:reach-v3").reset(seed=0)[0], obs)
    assert np.array_equal(env.reset(seed=0)[0], obs)
    assert not np.array_equal(env.reset(seed=1)[0], obs)
    spec = json.loads(json.dumps(env.spec_dict()))
    assert spec["tasks"] == ["reach-v3"]
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros(3))
    with pytest.raises(ValueError, match="NaN"):
        env.step(np.array([0, 0, np.nan, 0]))


def test_mt10_task_choice_and_onehot():
    env = envs.make_env("mt10")
    assert len(env.tasks) == 10 and env.obs_layout[-1] == ("task_onehot", 10)
    obs, info = env.reset(seed=0, options={"task": 3})
    assert obs.shape == (49,) and env.task_index == 3 == info["task_index"]
    assert np.array_equal(obs[39:], np.eye(10, dtype=np.float32)[3])
    obs, info = env.reset(seed=0, options={"task": "drawer-close-v3"})
    assert env.task == "drawer-close-v3" and env.instruction == "close the drawer" and obs[39 + env.task_index] == 1
    assert [env.reset(seed=s)[1]["task_index"] for s in (100000, 100001, 100013)] == [0, 1, 3]  # seed mod 10
    assert len({env.reset()[1]["task"] for _ in range(30)}) > 3  # unseeded: drawn
    with pytest.raises(ValueError, match="not in mt10"):
        env.reset(options={"task": "basketball-v3"})
    with pytest.raises(ValueError, match="out of range"):
        env.reset(options={"task": 10})


def test_unknown_names():
    with pytest.raises(ValueError, match="unknown Meta-World task"):
        envs.make_env("mw:nope-v3")
    with pytest.raises(ValueError, match="unknown env"):
        envs.make_env("nope")


def test_fallback_instruction():
    from envs.metaworld_tasks import instruction_for

    assert instruction_for("button-press-wall-v3") == "button press wall"


def test_expert_reach_succeeds():
    env = envs.make_env("mw:reach-v3")
    expert = envs.make_expert("mw:reach-v3", env)
    obs, _ = env.reset(seed=0)
    expert.reset(seed=0)
    for _ in range(200):
        obs, _, _, _, info = env.step(expert.act(obs))
        if info["success"]:
            break
    assert info["success"]


def test_mt10_experts():
    from envs.collect import run_episode

    env = envs.make_env("mt10")
    expert = envs.make_expert("mt10", env)
    wins = sum(run_episode(env, expert, seed)["success"] for seed in range(20))
    assert wins >= 18


def test_episode_reproducible_after_other_episodes():
    from envs.collect import run_episode

    env = envs.make_env("mw:push-v3")
    expert = envs.make_expert("mw:push-v3", env)
    first = run_episode(env, expert, 3, noise=0.1)
    run_episode(env, expert, 4, noise=0.1)
    again = run_episode(env, expert, 3, noise=0.1)
    assert np.array_equal(first["obs"], again["obs"]) and np.array_equal(first["action"], again["action"])
