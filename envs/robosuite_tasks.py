"""robosuite 1.4 tasks (Lift, PickPlaceCan, NutAssemblySquare), created through robomimic's env wrapper.

The env is described by a robomimic `env_meta` dict (env name, version, kwargs), stored with
datasets by `spec_dict()` and re-created exactly by `RobosuiteTask.from_spec(spec)`.

Observation (float32, flat, in this order): object state ("object"), robot0_eef_pos,
robot0_eef_quat (xyzw), robot0_gripper_qpos. info["success"]: task success at this step.
No early termination; truncation at the horizon.

Actions, by `action_mode`:
  "delta": OSC_POSE deltas in [-1, 1]^7 (dx, dy, dz, rotation axis-angle, gripper -1 open / +1
           close), scaled by the controller to at most 5 cm and 0.5 rad per step.
  "abs":   the absolute eef target in the world frame, 10 dims: position (3, m), orientation as the
           first two columns of its rotation matrix (6, the continuous "6D" representation of
           Zhou et al. 2019), gripper (1). The controller runs with control_delta=False (robosuite's
           OSC takes position + axis-angle, unscaled). Diffusion Policy found position control far
           better than velocity (delta) control for diffusion policies.
Rotations in the observation, by `rotations`:
  "quat": as robosuite gives them (xyzw). Its object-to-eef quaternion is kept in the w >= 0
          hemisphere, so it flips sign whenever the relative rotation passes 180 degrees: on Can, where
          the gripper points down at an upright can, that happened 8 times per demo.
  "rot6d": every orientation (the object's, the object-to-eef one, the eef's) as the first two
          columns of its rotation matrix: continuous, no sign ambiguity.
The scripted experts act in deltas; `action_from_delta` gives the env action that makes the
controller aim at the same goal (the collector records demos through it).

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
ACTION_MODES = {"delta": 7, "abs": 10}  # action_mode: action dim
ROTATIONS = ("quat", "rot6d")
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


def default_env_meta(name: str, action_mode: str = "delta") -> dict:
    """robomimic env_meta for task `name`: Panda, OSC_POSE, 20 Hz, state observations, no rendering."""
    import robosuite

    env_name, horizon, _ = TASKS[name]
    controller = robosuite.load_controller_config(default_controller="OSC_POSE")
    controller["control_delta"] = action_mode == "delta"
    env_kwargs = dict(
        robots=["Panda"],
        controller_configs=controller,
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

    def __init__(self, name: str, horizon: int | None = None, env_meta: dict | None = None,
                 action_mode: str = "delta", rotations: str = "quat"):
        if name not in TASKS:
            raise ValueError(f"unknown robosuite task {name!r}; valid: {list(TASKS)}")
        if action_mode not in ACTION_MODES:
            raise ValueError(f"unknown action_mode {action_mode!r}; valid: {list(ACTION_MODES)}")
        if rotations not in ROTATIONS:
            raise ValueError(f"unknown rotations {rotations!r}; valid: {list(ROTATIONS)}")
        self.rotations = rotations
        self.name = name
        self.instruction = TASKS[name][2]
        self.horizon = int(horizon or TASKS[name][1])
        self.action_mode = action_mode
        self.env_meta = env_meta or default_env_meta(name, action_mode)
        controller = self.env_meta["env_kwargs"]["controller_configs"]
        if bool(controller.get("control_delta", True)) != (action_mode == "delta"):
            raise ValueError(f"env_meta has control_delta={controller.get('control_delta')} but "
                             f"action_mode={action_mode!r}")
        self._delta_scale = np.asarray(controller["output_max"], dtype=np.float64)  # action 1 -> this
        env_utils = _import_robomimic()
        # robomimic prints "Created environment..."; robosuite draws from the global RNGs here too
        with contextlib.redirect_stdout(io.StringIO()), _seeded_global_rngs(0):
            self._rm_env = env_utils.create_env_from_metadata(
                self.env_meta, render=False, render_offscreen=False, use_image_obs=False)
            first = self._rm_env.get_observation()
        self.sim_env = self._rm_env.env  # the robosuite env
        # the parts of robosuite's "object-state", in order (their quaternions become 6D with rot6d)
        self._object_parts = [(k, int(np.size(o.obs))) for k, o in self.sim_env._observables.items()
                              if o.modality == "object" and o.is_enabled() and o.is_active()]
        if sum(n for _, n in self._object_parts) != np.size(first["object"]):
            raise RuntimeError(f"object-state parts {self._object_parts} do not add up to {np.size(first['object'])}")
        self.obs_layout = [(k, int(np.size(first[k]))) for k in OBS_KEYS]
        if rotations == "rot6d":
            self.obs_layout = [(k.replace("quat", "rot6d"), n + 2 * (k.endswith("quat") + self._n_object_quats(k)))
                               for k, n in self.obs_layout]
        obs_dim = sum(n for _, n in self.obs_layout)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (obs_dim,), np.float32)
        dim = ACTION_MODES[action_mode]
        bound = 1.0 if action_mode == "delta" else np.inf
        self.action_space = gym.spaces.Box(-bound, bound, (dim,), np.float32)
        self._t = None  # None until the first reset()

    # ---- description -------------------------------------------------------------------------
    def spec_dict(self) -> dict:
        import robomimic

        kwargs = {"horizon": self.horizon}
        if self.action_mode != "delta":  # specs written before these options existed stay valid
            kwargs["action_mode"] = self.action_mode
        if self.rotations != "quat":
            kwargs["rotations"] = self.rotations
        return {"name": self.name, "family": "robosuite", "kwargs": kwargs,
                "env_meta": _jsonable(self.env_meta), "obs_layout": [list(x) for x in self.obs_layout],
                "action_dim": ACTION_MODES[self.action_mode], "robomimic_version": robomimic.__version__}

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
        if self.action_mode == "delta":
            a = check_action(action, 7)
        else:
            a = check_action(action, 10, low=-np.inf, high=np.inf)
            a = np.concatenate([a[:3], mat2axisangle(rot6d_to_mat(a[3:9])), np.clip(a[9:], -1.0, 1.0)])
        obs, reward, _, _ = self._rm_env.step(a)
        self._t += 1
        success = bool(self._rm_env.is_success()["task"])
        return self._flat(obs), float(reward), False, self._t >= self.horizon, {"success": success}

    def _flat(self, obs: dict) -> np.ndarray:
        if self.rotations == "quat":
            return np.concatenate([np.asarray(obs[k], dtype=np.float32).ravel() for k in OBS_KEYS])
        parts = []
        for k in OBS_KEYS:
            v = np.asarray(obs[k], dtype=np.float64).ravel()
            names = [n for n, _ in self._object_parts] if k == "object" else [k]
            sizes = [m for _, m in self._object_parts] if k == "object" else [len(v)]
            for name, piece in zip(names, np.split(v, np.cumsum(sizes)[:-1]), strict=True):
                parts.append(mat_to_rot6d(quat2mat(piece)) if name.endswith("_quat") else piece)
        return np.concatenate(parts).astype(np.float32)

    def _n_object_quats(self, key: str) -> int:
        return sum(n.endswith("_quat") for n, _ in self._object_parts) if key == "object" else 0

    def close(self):
        self.sim_env.close()

    def action_from_delta(self, delta) -> np.ndarray:
        """The action (in this env's mode) that sets the controller's goal where the OSC delta
        action `delta` (7 dims, [-1, 1]) would set it from the current eef pose."""
        delta = check_action(delta, 7)
        if self.action_mode == "delta":
            return delta
        s = self.task_state()
        step = delta[:6] * self._delta_scale
        pos = s["eef_pos"] + step[:3]
        mat = axisangle2mat(step[3:]) @ s["eef_mat"]
        return np.concatenate([pos, mat_to_rot6d(mat), delta[6:]])

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


def mat_to_rot6d(mat: np.ndarray) -> np.ndarray:
    """The first two columns of a rotation matrix, column by column (6,)."""
    return np.concatenate([mat[:, 0], mat[:, 1]])


def rot6d_to_mat(r6: np.ndarray) -> np.ndarray:
    """Rotation matrix from two (not necessarily orthonormal) columns, by Gram-Schmidt."""
    a, b = np.asarray(r6[:3], dtype=np.float64), np.asarray(r6[3:6], dtype=np.float64)
    na = np.linalg.norm(a)
    b = b - a * (a @ b) / max(na * na, 1e-300)
    nb = np.linalg.norm(b)
    if na < 1e-6 or nb < 1e-6:
        raise ValueError(f"6D rotation {np.round(r6, 4).tolist()} has a zero or parallel column")
    x, y = a / na, b / nb
    return np.stack([x, y, np.cross(x, y)], axis=1)


def mat2axisangle(mat: np.ndarray) -> np.ndarray:
    from robosuite.utils.transform_utils import mat2quat, quat2axisangle

    return quat2axisangle(mat2quat(mat))


def quat2mat(quat: np.ndarray) -> np.ndarray:  # xyzw
    from robosuite.utils.transform_utils import quat2mat

    return quat2mat(quat)


def axisangle2mat(vec: np.ndarray) -> np.ndarray:
    from robosuite.utils.transform_utils import axisangle2quat, quat2mat

    return quat2mat(axisangle2quat(vec))


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
