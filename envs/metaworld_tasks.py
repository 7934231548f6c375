"""Meta-World v3 tasks (metaworld 3.1.1) behind the common env interface.

    make_metaworld_env("mw:push-v3")   # one task, goal observable, random start per seed
    make_metaworld_env("mt10")         # task = seed mod 10 (balanced over any 10 consecutive seeds);
    env.reset(seed=0, options={"task": 3})   # or picks one by index or name (unseeded resets draw one)

Observation: Meta-World's 39-dim vector (hand, gripper, objects, previous frame, goal), plus
a one-hot task id for multi-task sets (task_onehot=False: none, for policies told the task by
instruction). `env.instruction` is the current task's sentence, `env.instructions` every task's.
"""

import importlib.metadata
import warnings

import gymnasium as gym
import numpy as np
from metaworld.env_dict import ALL_V3_ENVIRONMENTS, MT10_V3
from metaworld.policies import ENV_POLICY_MAP

from envs.checks import check_action

MT10_TASKS = list(MT10_V3.keys())
TASK_SETS = {"mt10": MT10_TASKS}
MW_OBS_LAYOUT = [("hand_pos", 3), ("gripper_open", 1), ("objects", 14),
                 ("prev_hand_pos", 3), ("prev_gripper_open", 1), ("prev_objects", 14), ("goal_pos", 3)]
MW_OBS_DIM = 39

INSTRUCTIONS = {
    "reach-v3": "reach the goal position",
    "push-v3": "push the puck to the goal",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "door-open-v3": "open the door",
    "drawer-open-v3": "open the drawer",
    "drawer-close-v3": "close the drawer",
    "button-press-topdown-v3": "press the button from the top",
    "peg-insert-side-v3": "insert the peg into the hole from the side",
    "window-open-v3": "slide the window open",
    "window-close-v3": "slide the window closed",
}


def instruction_for(task: str) -> str:
    """Natural-language instruction; tasks without a written one get their name in words."""
    return INSTRUCTIONS.get(task, task.removesuffix("-v3").replace("-", " "))


class MetaWorldEnv(gym.Env):
    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, name: str, tasks: list[str], horizon: int = 500, render_mode: str | None = None,
                 task_onehot: bool = True):
        for t in tasks:
            if t not in ALL_V3_ENVIRONMENTS:
                raise ValueError(f"unknown Meta-World task {t!r}; valid: {', '.join(ALL_V3_ENVIRONMENTS)}")
        if not 1 <= horizon <= 500:
            raise ValueError(f"horizon must be in [1, 500] (Meta-World's max_path_length), got {horizon}")
        self.name, self.tasks, self.horizon = name, list(tasks), int(horizon)
        self.render_mode = render_mode
        self.task_onehot = bool(task_onehot) and len(self.tasks) > 1  # off: the task is told by instruction only
        self.obs_layout = list(MW_OBS_LAYOUT)
        if self.task_onehot:
            self.obs_layout.append(("task_onehot", len(self.tasks)))
        obs_dim = sum(n for _, n in self.obs_layout)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (obs_dim,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (4,), np.float32)
        self._envs = {}  # task name -> Meta-World env, created on first use
        self.task_index = 0
        self.task = self.tasks[0]
        self.instruction = instruction_for(self.task)
        self._env = None
        self._t = 0

    def spec_dict(self) -> dict:
        kwargs = {"horizon": self.horizon}
        if len(self.tasks) > 1 and not self.task_onehot:
            kwargs["task_onehot"] = False
        return {"name": self.name, "family": "metaworld", "tasks": self.tasks, "kwargs": kwargs,
                "obs_layout": [list(x) for x in self.obs_layout], "action_dim": 4,
                "metaworld_version": importlib.metadata.version("metaworld")}

    def _task_env(self, task: str):
        if task not in self._envs:
            env = ALL_V3_ENVIRONMENTS[task](render_mode=self.render_mode)
            # the goal-observable setup Meta-World's own benchmarks use, with start positions
            # drawn from env.np_random so that env.seed(s) fixes them
            env._partially_observable = False
            del env.sawyer_observation_space  # cached property; recomputed for the new setting
            env._set_task_called = True
            env._freeze_rand_vec = False
            env.seeded_rand_vec = True
            self._envs[task] = env
        return self._envs[task]

    def _resolve_task(self, task) -> int:
        if isinstance(task, str):
            if task not in self.tasks:
                raise ValueError(f"task {task!r} is not in {self.name}: {self.tasks}")
            return self.tasks.index(task)
        idx = int(task)
        if not 0 <= idx < len(self.tasks):
            raise ValueError(f"task index {idx} out of range for {self.name} ({len(self.tasks)} tasks)")
        return idx

    def reset(self, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        options = options or {}
        # draw both numbers every time so that the start does not depend on whether a task was given
        drawn_task = int(self.np_random.integers(len(self.tasks)))
        sub_seed = int(self.np_random.integers(2**31 - 1))
        if "task" in options:
            self.task_index = self._resolve_task(options["task"])
        else:
            self.task_index = drawn_task if seed is None else self.task_index_of_seed(seed)
        self.task = self.tasks[self.task_index]
        self.instruction = instruction_for(self.task)
        self._env = self._task_env(self.task)
        self._env.seed(sub_seed)
        obs, _ = self._env.reset()
        self._t = 0
        return self._obs(obs), self._info(False)

    def _obs(self, mw_obs) -> np.ndarray:
        obs = np.asarray(mw_obs, dtype=np.float32)
        if self.task_onehot:
            obs = np.concatenate([obs, np.eye(len(self.tasks), dtype=np.float32)[self.task_index]])
        return obs

    def task_index_of_seed(self, seed: int) -> int:
        """The task a seeded reset runs: seed mod the number of tasks."""
        return int(seed) % len(self.tasks)

    @property
    def instructions(self) -> list[str]:
        return [instruction_for(t) for t in self.tasks]

    def _info(self, success: bool) -> dict:
        return {"success": success, "task": self.task, "task_index": self.task_index}

    def step(self, action):
        if self._env is None:
            raise RuntimeError("call reset() before step()")
        a = check_action(action, 4).astype(np.float32)
        obs, reward, _, _, info = self._env.step(a)
        self._t += 1
        truncated = self._t >= self.horizon
        return self._obs(obs), float(reward), False, truncated, self._info(bool(info["success"]))

    def render(self):
        if self._env is None:
            raise RuntimeError("call reset() before render()")
        return self._env.render()

    def close(self):
        for env in self._envs.values():
            env.close()
        self._envs.clear()


def make_metaworld_env(name: str, **kwargs) -> MetaWorldEnv:
    """`mw:<task>-v3` for one task, or a task-set name ("mt10")."""
    if name in TASK_SETS:
        return MetaWorldEnv(name, TASK_SETS[name], **kwargs)
    if name.startswith("mw:"):
        return MetaWorldEnv(name, [name[3:]], **kwargs)
    raise ValueError(f"unknown Meta-World env {name!r}; use 'mw:<task>-v3' or one of {list(TASK_SETS)}")


class MetaWorldExpert:
    """Meta-World's shipped scripted policy for the env's current task, with a per-episode
    speed scale on the position deltas (gripper effort untouched)."""

    name = "metaworld_scripted"
    version = "1"

    def __init__(self, env: MetaWorldEnv, seed: int | None = None, speed_range=(0.75, 1.0)):
        self.env = env
        self.speed_range = tuple(speed_range)
        self._policies = {}
        self.rng = np.random.default_rng(seed)
        self.reset(seed)

    def reset(self, seed: int | None = None):
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        self.speed = self.rng.uniform(*self.speed_range)

    def act(self, obs) -> np.ndarray:
        task = self.env.task
        if task not in self._policies:
            self._policies[task] = ENV_POLICY_MAP[task]()
        obs = np.asarray(obs, dtype=np.float64)[:MW_OBS_DIM]
        with warnings.catch_warnings():  # the shipped policies warn on every saturated action
            warnings.filterwarnings("ignore", message="Constant")
            action = np.asarray(self._policies[task].get_action(obs), dtype=np.float64)
        action[:3] *= self.speed
        return np.clip(action, -1.0, 1.0).astype(np.float32)
