import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import envs

pytest.importorskip("robosuite")
pytest.importorskip("robomimic")

from envs.robosuite_tasks import RobosuiteTask, mat_to_rot6d, rot6d_to_mat  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# a fixed start + 10 fixed actions, printed as hex: compared across processes
TRAJ_SCRIPT = """
import numpy as np, envs
env = envs.make_env("{name}")
obs, _ = env.reset(seed={seed})
traj = [obs]
for a in np.random.default_rng(0).uniform(-1, 1, (10, 7)):
    traj.append(env.step(a)[0])
print(np.stack(traj).tobytes().hex())
"""


def trajectory(env, seed):
    traj = [env.reset(seed=seed)[0]]
    for a in np.random.default_rng(0).uniform(-1, 1, (10, 7)):
        traj.append(env.step(a)[0])
    return np.stack(traj)


@pytest.fixture(scope="module")
def lift():
    env = envs.make_env("lift")
    yield env
    env.close()


def test_obs_layout_shape_dtype(lift):
    obs, info = lift.reset(seed=0)
    assert info == {"success": False}
    assert [k for k, _ in lift.obs_layout] == ["object", "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos"]
    assert lift.obs_layout == [("object", 10), ("robot0_eef_pos", 3), ("robot0_eef_quat", 4),
                               ("robot0_gripper_qpos", 2)]
    assert obs.dtype == np.float32 and obs.shape == (19,) == lift.observation_space.shape
    assert lift.observation_space.dtype == np.float32
    assert lift.action_space.shape == (7,) and lift.action_space.low.min() == -1 and lift.action_space.high.max() == 1
    assert lift.name == "lift" and lift.instruction == "lift the cube" and lift.horizon == 400
    # the eef slice of the observation is the simulator's eef position
    assert np.allclose(obs[10:13], lift.task_state()["eef_pos"], atol=1e-6)
    obs, reward, terminated, truncated, info = lift.step(np.zeros(7, np.float32))
    assert obs.dtype == np.float32 and isinstance(reward, float)
    assert (terminated, truncated, info["success"]) == (False, False, False)


@pytest.mark.parametrize("name, obs_dim, horizon", [("can", 23, 400), ("square", 23, 500)])
def test_other_tasks_layout(name, obs_dim, horizon):
    env = envs.make_env(name)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (obs_dim,) and obs.dtype == np.float32 and env.horizon == horizon
    assert env.obs_layout[0] == ("object", 14)
    state = env.task_state()
    assert state["goal_pos"].shape == (3,) and state["object_mat"].shape == (3, 3)
    assert ("handle_pos" in state) == (name == "square")
    env.close()


def test_seeded_reset_in_process(lift):
    global_state = np.random.get_state()[1].copy()
    t1 = trajectory(lift, 5)
    trajectory(lift, 6)
    assert np.array_equal(trajectory(lift, 5), t1)
    assert not np.array_equal(lift.reset(seed=6)[0], t1[0])
    # the caller's global numpy RNG is left as it was
    assert np.array_equal(np.random.get_state()[1], global_state)


def test_seeded_reset_across_processes(lift):
    """Two fresh processes (different hash seeds, different prior history) give the same bytes."""
    procs = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        procs.append(subprocess.Popen([sys.executable, "-c", TRAJ_SCRIPT.format(name="lift", seed=11)], cwd=REPO,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        outs.append(out.strip())
    trajectory(lift, 3)  # this process has a different history before the seeded reset
    here = trajectory(lift, 11).tobytes().hex()
    assert outs[0] == outs[1] == here


@pytest.mark.parametrize("bad, err, match", [
    (np.zeros(6), ValueError, "shape"),
    (np.zeros((1, 7)), ValueError, "shape"),
    (np.array([0, 0, np.nan, 0, 0, 0, 0]), ValueError, "NaN"),
    (np.array([0, 0, np.inf, 0, 0, 0, 0]), ValueError, "NaN or inf"),
    (np.array(["a"] * 7), TypeError, "numeric"),
    (None, TypeError, "numeric"),
])
def test_bad_actions_raise(lift, bad, err, match):
    lift.reset(seed=0)
    with pytest.raises(err, match=match):
        lift.step(bad)


def test_spec_dict_round_trip(lift):
    spec = json.loads(json.dumps(lift.spec_dict()))
    assert spec["name"] == "lift" and spec["family"] == "robosuite" and spec["action_dim"] == 7
    meta = spec["env_meta"]
    assert meta["env_name"] == "Lift" and meta["env_kwargs"]["control_freq"] == 20
    assert meta["env_kwargs"]["controller_configs"]["type"] == "OSC_POSE"
    assert meta["env_kwargs"]["robots"] == ["Panda"]
    again = RobosuiteTask.from_spec(spec)
    assert again.spec_dict() == spec
    with pytest.raises(RuntimeError, match="reset"):
        again.step(np.zeros(7))
    assert np.array_equal(trajectory(again, 4), trajectory(lift, 4))
    with pytest.raises(ValueError, match="not a robosuite"):
        RobosuiteTask.from_spec({"family": "push2d"})
    with pytest.raises(ValueError, match="unknown robosuite task"):
        RobosuiteTask("stack")


def run_expert(env, expert, seed, noise=0.0):
    obs, _ = env.reset(seed=seed)
    expert.reset(seed=seed)
    rng = np.random.default_rng(seed)
    for t in range(env.horizon):
        action = expert.act(obs)
        assert action.shape == (7,) and np.all(np.abs(action) <= 1)
        action = np.clip(action + noise * rng.normal(size=7) * (np.arange(7) < 6), -1, 1)
        obs, _, _, _, info = env.step(action)
        if info["success"]:
            return t + 1
    return None


def test_lift_expert_episode(lift):
    expert = envs.make_expert("lift", lift)
    assert expert.name == "robosuite_lift" and isinstance(expert.version, str)
    steps = run_expert(lift, expert, seed=0)
    assert steps is not None and steps < 150
    # the expert is deterministic given its seed, and its seed changes the trajectory
    lift.reset(seed=0)
    expert.reset(seed=1)
    a1 = expert.act(None)
    lift.reset(seed=0)
    expert.reset(seed=1)
    assert np.array_equal(expert.act(None), a1)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lift", "can", "square"])
@pytest.mark.parametrize("noise", [0.0, 0.1])
def test_expert_succeeds(name, noise):
    env = envs.make_env(name)
    expert = envs.make_expert(name, env)
    results = [run_expert(env, expert, seed, noise) for seed in range(5)]
    assert all(r is not None for r in results), results


def test_unknown_expert_raises(lift):
    from envs.robosuite_experts import make_robosuite_expert

    with pytest.raises(ValueError, match="no scripted expert"):
        make_robosuite_expert("stack", lift)


def test_rot6d_is_two_matrix_columns_and_gram_schmidt_recovers_the_rotation():
    quarter_turn_z = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert np.array_equal(mat_to_rot6d(quarter_turn_z), [0, 1, 0, -1, 0, 0])
    # columns scaled and the second one tilted toward the first: Gram-Schmidt gives the rotation back
    np.testing.assert_allclose(rot6d_to_mat([0, 3, 0, -1, 0.5, 0]), quarter_turn_z, atol=1e-12)
    with pytest.raises(ValueError, match="parallel"):
        rot6d_to_mat([1, 0, 0, 2, 0, 0])


def test_absolute_actions_set_the_goal_a_delta_action_would():
    delta_env, abs_env = envs.make_env("lift"), envs.make_env("lift", action_mode="abs")
    assert abs_env.action_space.shape == (10,) and abs_env.spec_dict()["kwargs"]["action_mode"] == "abs"
    assert abs_env.env_meta["env_kwargs"]["controller_configs"]["control_delta"] is False
    assert RobosuiteTask.from_spec(abs_env.spec_dict()).action_mode == "abs"
    delta_env.reset(seed=3)
    abs_env.reset(seed=3)
    rng = np.random.default_rng(0)
    for _ in range(5):
        delta = np.append(rng.uniform(-1, 1, 6), 1.0)
        target = abs_env.action_from_delta(delta)  # eef pos + 5 cm * delta, R(0.5 rad * delta) @ R_eef
        s = abs_env.task_state()
        np.testing.assert_allclose(target[:3], s["eef_pos"] + 0.05 * delta[:3], atol=1e-6)
        obs_d = delta_env.step(delta)[0]
        obs_a = abs_env.step(target)[0]
        # same goals up to robosuite's float32 quaternion maths (2e-7 rad); a wrong scale or frame
        # would be off by centimetres
        np.testing.assert_allclose(obs_a, obs_d, atol=1e-3)
    with pytest.raises(ValueError, match="control_delta"):
        RobosuiteTask("lift", env_meta=delta_env.env_meta, action_mode="abs")
    with pytest.raises(ValueError, match="action_mode"):
        envs.make_env("lift", action_mode="velocity")
    delta_env.close()
    abs_env.close()


def test_rot6d_observation_replaces_every_quaternion_by_two_matrix_columns():
    quat_env, rot_env = envs.make_env("can"), envs.make_env("can", rotations="rot6d")
    assert [n for n, _ in rot_env.obs_layout] == ["object", "robot0_eef_pos", "robot0_eef_rot6d", "robot0_gripper_qpos"]
    assert [n for _, n in rot_env.obs_layout] == [3 + 6 + 3 + 6, 3, 6, 2]  # can pos, rot, to-eef pos, to-eef rot
    assert RobosuiteTask.from_spec(rot_env.spec_dict()).rotations == "rot6d"
    q, r = quat_env.reset(seed=5)[0], rot_env.reset(seed=5)[0]
    np.testing.assert_array_equal(r[0:3], q[0:3])  # positions pass through
    np.testing.assert_array_equal(r[9:12], q[7:10])
    for quat, six in ((q[3:7], r[3:9]), (q[10:14], r[12:18]), (q[17:21], r[21:27])):
        x, y, z, w = quat.astype(np.float64)  # xyzw: the matrix's first two columns by the textbook formula
        cols = [1 - 2 * (y * y + z * z), 2 * (x * y + w * z), 2 * (x * z - w * y),
                2 * (x * y - w * z), 1 - 2 * (x * x + z * z), 2 * (y * z + w * x)]
        np.testing.assert_allclose(six, cols, atol=1e-5)
    np.testing.assert_array_equal(mat_to_rot6d(np.eye(3)), [1, 0, 0, 0, 1, 0])
    with pytest.raises(ValueError, match="rotations"):
        envs.make_env("can", rotations="euler")
    quat_env.close()
    rot_env.close()
