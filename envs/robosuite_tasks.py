"""robosuite 1.4 tasks (Lift, PickPlaceCan, NutAssemblySquare), created through robomimic's env wrapper.

The env is described by a robomimic `env_meta` dict (env name, version, kwargs), stored with
datasets by `spec_dict()` and re-created exactly by `RobosuiteTask.from_spec(spec)`.

Observation (float32, flat, in this order): object state ("object"), robot0_eef_pos,
robot0_eef_quat (xyzw), robot0_gripper_qpos. Action: OSC_POSE deltas in [-1, 1]^7 (dx, dy, dz,
rotation axis-angle, gripper -1 open / +1 close). info["success"]: task success at this step.
No early termination; truncation at the horizon.

Determinism: robosuite draws object placements and the arm's initial joint noise from numpy's
global RNG (and python's `random` in some modes). `reset(seed)` seeds both from the env's own
generator around the inner reset and restores them afterwards, so the start state depends on
the seed only (same in every process) and the caller's global RNG state is left untouched.
"""

import contextlib
import io
import random
import sys
import types

import gymnasium as gym
import numpy as np

from envs.checks import check_action

TASKS = {
    # name: (robosuite env, horizon, instruction)
    "lift": ("Lift", 400, "lift the cube"),
    "can": ("PickPlaceCan", 400, "pick up the can and place it in the target bin"),
    "square": ("NutAssemblySquare", 500, "put the square nut onto the square peg"),
}
OBS_KEYS = ("object", "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos")


def _import_robomimic():
    """Import robomimic's env utilities (robosuite wrapper) without mujoco_py.

    robomimic 0.3.0 imports `mujoco_py` at the top of envs/env_robosuite.py but never uses it
    with robosuite >= 1.4 (which runs on the `mujoco` bindings). A stand-in module satisfies the
    import. Only env_utils / obs_utils are used: modules that reach robomimic.models need torchvision.
    """
    if "mujoco_py" not in sys.modules:
        sys.modules["mujoco_py"] = types.ModuleType("mujoco_py")
    import robomimic.utils.env_utils as env_utils
    import robomimic.utils.obs_utils as obs_utils

    if obs_utils.OBS_KEYS_TO_MODALITIES is None:  # the wrapper's get_observation needs it
        with contextlib.redirect_stdout(io.StringIO()):
            obs_utils.initialize_obs_utils_with_obs_specs({"obs": {"low_dim": list(OBS_KEYS)}})
    return env_utils


def default_env_meta(name: str) -> dict:
    """robomimic env_meta for task `name`: Panda, OSC_POSE, 20 Hz, state observations, no rendering."""
    import robosuite

    env_name, horizon, _ = TASKS[name]
    env_kwargs = dict(
        robots=["Panda"],
        controller_configs=robosuite.load_controller_config(default_controller="OSC_POSE"),
        control_freq=20, horizon=horizon, reward_shaping=False, ignore_done=True,
        has_renderer=False, has_offscreen_renderer=False, use_camera_obs=False, use_object_obs=True,
    )
    # type 1 = robomimic.envs.env_base.EnvType.ROBOSUITE_TYPE
    return {"env_name": env_name, "env_version": robosuite.__version__, "type": 1, "env_kwargs": env_kwargs}


@contextlib.contextmanager
def _seeded_global_rngs(seed: int):
    """Seed numpy's and python's global RNGs inside the block, restore their states on exit."""
    np_state, py_state = np.random.get_state(), random.getstate()
    np.random.seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


class RobosuiteTask(gym.Env):
    metadata = {"render_modes": []}
    noise_free_dims = (6,)  # the gripper: DART noise goes on the arm dims only

    def __init__(self, name: str, horizon: int | None = None, env_meta: dict | None = None):
        if name not in TASKS:
            raise ValueError(f"unknown robosuite task {name!r}; valid: {list(TASKS)}")
        self.name = name
        self.instruction = TASKS[name][2]
        self.horizon = int(horizon or TASKS[name][1])
        self.env_meta = env_meta or default_env_meta(name)
        env_utils = _import_robomimic()
        # robomimic prints "Created environment..."; robosuite draws from the global RNGs here too
        with contextlib.redirect_stdout(io.StringIO()), _seeded_global_rngs(0):
            self._rm_env = env_utils.create_env_from_metadata(
                self.env_meta, render=False, render_offscreen=False, use_image_obs=False)
            first = self._rm_env.get_observation()
        self.sim_env = self._rm_env.env  # the robosuite env
        self.obs_layout = [(k, int(np.size(first[k]))) for k in OBS_KEYS]
        obs_dim = sum(n for _, n in self.obs_layout)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (obs_dim,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (7,), np.float32)
        self._t = None  # None until the first reset()

    # ---- description -------------------------------------------------------------------------
    def spec_dict(self) -> dict:
        import robomimic

        return {"name": self.name, "family": "robosuite", "kwargs": {"horizon": self.horizon},
                "env_meta": _jsonable(self.env_meta), "obs_layout": [list(x) for x in self.obs_layout],
                "action_dim": 7, "robomimic_version": robomimic.__version__}

    @classmethod
    def from_spec(cls, spec: dict) -> "RobosuiteTask":
        """Re-create the env described by `spec_dict()` (e.g. as stored with a dataset)."""
        if spec.get("family") != "robosuite":
            raise ValueError(f"not a robosuite env spec: family={spec.get('family')!r}")
        return cls(spec["name"], env_meta=spec["env_meta"], **spec.get("kwargs", {}))

    # ---- gymnasium API -----------------------------------------------------------------------
    def reset(self, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        with _seeded_global_rngs(int(self.np_random.integers(2**32 - 1))):
            obs = self._rm_env.reset()
        self._t = 0
        return self._flat(obs), {"success": False}

    def step(self, action):
        if self._t is None:
            raise RuntimeError("call reset() before step()")
        a = check_action(action, 7)
        obs, reward, _, _ = self._rm_env.step(a)
        self._t += 1
        success = bool(self._rm_env.is_success()["task"])
        return self._flat(obs), float(reward), False, self._t >= self.horizon, {"success": success}

    def _flat(self, obs: dict) -> np.ndarray:
        return np.concatenate([np.asarray(obs[k], dtype=np.float32).ravel() for k in OBS_KEYS])

    def close(self):
        self.sim_env.close()

    # ---- privileged state for scripted experts -----------------------------------------------
    def task_state(self) -> dict:
        """Poses read from the simulator (world frame): eef_pos, eef_mat (3x3, columns = gripper
        axes), gripper_qpos, object_pos, object_mat, table_z, and per task: goal_pos (can: centre of
        the target bin on its floor; square: the peg's axis at table height),
        handle_pos (square)."""
        env, data = self.sim_env, self.sim_env.sim.data
        robot = env.robots[0]
        body_id = {"lift": lambda: env.cube_body_id,
                   "can": lambda: env.obj_body_id[env.obj_to_use],
                   "square": lambda: env.obj_body_id[env.obj_to_use]}[self.name]()
        state = {
            "eef_pos": np.array(data.site_xpos[robot.eef_site_id]),
            "eef_mat": np.array(data.site_xmat[robot.eef_site_id]).reshape(3, 3),
            "gripper_qpos": np.array([data.qpos[i] for i in robot._ref_gripper_joint_pos_indexes]),
            "object_pos": np.array(data.body_xpos[body_id]),
            "object_mat": np.array(data.body_xmat[body_id]).reshape(3, 3),
            # top of the surface the object starts on (can: bin1's floor, 2 cm above the bin's origin)
            "table_z": float(env.bin1_pos[2] + 0.02 if self.name == "can" else env.table_offset[2]),
        }
        if self.name == "can":
            # bin 3 (the can's): the quarter of bin2 at +x, +y (see PickPlace.not_in_bin), floor top
            centre = np.array(env.bin2_pos) + np.array([env.bin_size[0] / 4, env.bin_size[1] / 4, 0.02])
            state["goal_pos"] = centre
        elif self.name == "square":
            peg = np.array(data.body_xpos[env.peg1_body_id])
            state["goal_pos"] = np.array([peg[0], peg[1], state["table_z"]])
            handle = env.sim.model.site_name2id(env.nuts[env.nut_id].important_sites["handle"])
            state["handle_pos"] = np.array(data.site_xpos[handle])
        return state


def _jsonable(x):
    """Plain JSON types (numpy arrays/scalars inside the controller config become lists/numbers)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x
