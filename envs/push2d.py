"""Push2D: a pure-numpy 2D pushing task for fast tests (a simpler PushT).

A disc agent pushes a disc object into a goal region inside the square arena [-1, 1]^2.
Actions are agent velocities in [-1, 1]^2 (scaled by `max_step` per step); contacts are
resolved kinematically (the object is pushed out along the contact normal, obstacles and
walls push back). The multimodal variant puts a horizontal bar between object and goal:
a straight push gets stuck against it; the expert goes around its left or right end at
random, so the demos are bimodal (their average is the failing straight push).

Observation (float32): agent xy, object xy, goal xy [, obstacle xy]. info: success (object
centre within `goal_tol` of the goal), distance (object to goal). Never terminates early.
"""

import gymnasium as gym
import numpy as np

from envs.checks import check_action

AGENT_R, OBJECT_R = 0.05, 0.08
BAR_HALF = np.array([0.25, 0.04])  # half extents of the multimodal obstacle
CONTACT_R = AGENT_R + OBJECT_R


def _unit(v: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(v)
    return v / n if n > 1e-9 else np.array([1.0, 0.0])


def _separate(p: np.ndarray, center: np.ndarray, radius: float) -> np.ndarray:
    """Move point `p` out of the disc (center, radius) along the shortest direction."""
    d = p - center
    if d @ d >= radius * radius:
        return p
    return center + _unit(d) * radius


def _separate_bar(p: np.ndarray, center: np.ndarray, radius: float) -> np.ndarray:
    """Move a disc (centre p, radius) out of the axis-aligned bar at `center`."""
    d = p - center
    closest = np.clip(d, -BAR_HALF, BAR_HALF)
    gap = d - closest
    dist2 = gap @ gap
    if dist2 >= radius * radius:
        return p
    if dist2 > 1e-18:
        return center + closest + gap / np.sqrt(dist2) * radius
    # centre inside the bar: leave through the nearest face
    depth = BAR_HALF - np.abs(d)
    axis = int(np.argmin(depth))
    out = d.copy()
    out[axis] = np.sign(d[axis] or 1.0) * (BAR_HALF[axis] + radius)
    return center + out


class Push2DEnv(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self, multimodal: bool = False, horizon: int | None = None, max_step: float = 0.05,
                 goal_tol: float = 0.1):
        self.multimodal = bool(multimodal)
        self.name = "push2d_multimodal" if self.multimodal else "push2d"
        self.horizon = int(horizon or (200 if self.multimodal else 150))
        self.max_step = float(max_step)
        self.goal_tol = float(goal_tol)
        self.obs_layout = [("agent_pos", 2), ("object_pos", 2), ("goal_pos", 2)]
        if self.multimodal:
            self.obs_layout.append(("obstacle_pos", 2))
            self.instruction = "push the disc around the obstacle into the goal region"
        else:
            self.instruction = "push the disc into the goal region"
        obs_dim = sum(n for _, n in self.obs_layout)
        self.observation_space = gym.spaces.Box(-1.0, 1.0, (obs_dim,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self._agent = self._object = self._goal = self._obstacle = None
        self._t = 0

    def spec_dict(self) -> dict:
        kwargs = dict(horizon=self.horizon, max_step=self.max_step, goal_tol=self.goal_tol)
        return {"name": self.name, "family": "push2d", "kwargs": kwargs,
                "obs_layout": [list(x) for x in self.obs_layout], "action_dim": 2}

    def _sample_layout(self, rng: np.random.Generator):
        if self.multimodal:
            # object low, goal high, bar on the midpoint: the straight push is blocked
            obj = np.array([rng.uniform(-0.2, 0.2), rng.uniform(-0.8, -0.5)])
            goal = np.array([rng.uniform(-0.2, 0.2), rng.uniform(0.5, 0.8)])
            obstacle = (obj + goal) / 2
        else:
            obstacle = None
            while True:
                obj, goal = rng.uniform(-0.7, 0.7, 2), rng.uniform(-0.7, 0.7, 2)
                if np.linalg.norm(obj - goal) > 0.3:
                    break
        while True:
            agent = rng.uniform(-0.9, 0.9, 2)
            if obstacle is not None:  # start on the object's side of the bar
                agent[1] = rng.uniform(-0.9, obstacle[1] - 0.15)
            clear_obj = np.linalg.norm(agent - obj) > CONTACT_R + 0.05
            clear_obs = obstacle is None or np.any(np.abs(agent - obstacle) > BAR_HALF + AGENT_R + 0.05)
            if clear_obj and clear_obs:
                return agent, obj, goal, obstacle

    def reset(self, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._agent, self._object, self._goal, self._obstacle = self._sample_layout(self.np_random)
        self._t = 0
        return self._obs(), self._info()

    def _obs(self) -> np.ndarray:
        parts = [self._agent, self._object, self._goal]
        if self.multimodal:
            parts.append(self._obstacle)
        return np.concatenate(parts).astype(np.float32)

    def _info(self) -> dict:
        # distance is a graded score for tests of tiny policies that rarely succeed yet
        distance = float(np.linalg.norm(self._object - self._goal))
        return {"success": distance < self.goal_tol, "distance": distance}

    def _clip(self, p: np.ndarray, r: float) -> np.ndarray:
        return np.clip(p, -1.0 + r, 1.0 - r)

    def step(self, action):
        if self._agent is None:
            raise RuntimeError("call reset() before step()")
        a = check_action(action, 2)
        agent = self._clip(self._agent + a * self.max_step, AGENT_R)
        obj = self._object
        if self.multimodal:
            agent = _separate_bar(agent, self._obstacle, AGENT_R)
        if np.linalg.norm(agent - obj) < CONTACT_R:
            obj = _separate(obj, agent, CONTACT_R)
            if self.multimodal:
                obj = _separate_bar(obj, self._obstacle, OBJECT_R)
            obj = self._clip(obj, OBJECT_R)
            # the object may have been blocked: the agent cannot enter it
            agent = self._clip(_separate(agent, obj, CONTACT_R), AGENT_R)
            if self.multimodal:
                agent = _separate_bar(agent, self._obstacle, AGENT_R)
        self._agent, self._object = agent, obj
        self._t += 1
        info = self._info()
        truncated = self._t >= self.horizon
        return self._obs(), float(info["success"]), False, truncated, info


class Push2DExpert:
    """Closed-loop pushing expert: orbit to the point behind the object (relative to the current
    target), push through it, re-plan every step. Multimodal: first push to a via-point beside
    the obstacle (side drawn per episode), then to the goal. Randomised per episode (speed,
    stand-off margin, side)."""

    name = "push2d_expert"
    version = "1"

    def __init__(self, env: Push2DEnv, seed: int | None = None):
        self.env = env
        self.multimodal = env.multimodal
        self.max_step = env.max_step
        self.rng = np.random.default_rng(seed)
        self.reset(seed)

    def reset(self, seed: int | None = None):
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        self.speed = self.rng.uniform(0.6, 1.0)
        self.margin = self.rng.uniform(0.03, 0.07)
        self.side = self.rng.choice([-1.0, 1.0])
        self.via_done = False

    def _target(self, obj, goal, obstacle):
        if not self.multimodal or self.via_done:
            return goal
        # beside the bar end, with room for the agent between bar and object
        via = obstacle + np.array([self.side * (BAR_HALF[0] + OBJECT_R + 2 * AGENT_R + self.margin), 0.0])
        # done once the object is near the via-point or has passed the bar
        if np.linalg.norm(obj - via) < 0.08 or obj[1] > obstacle[1]:
            self.via_done = True
            return goal
        return via

    def _move(self, agent, point, speed):
        a = (point - agent) / self.max_step
        n = np.linalg.norm(a)
        return a * (speed / n) if n > speed else a

    def act(self, obs) -> np.ndarray:
        obs = np.asarray(obs, dtype=np.float64)
        agent, obj, goal = obs[0:2], obs[2:4], obs[4:6]
        obstacle = obs[6:8] if self.multimodal else None
        target = self._target(obj, goal, obstacle)
        d = _unit(target - obj)
        rel = agent - obj
        standoff = CONTACT_R + self.margin
        behind_angle = np.arctan2(-d[1], -d[0])
        diff = (behind_angle - np.arctan2(rel[1], rel[0]) + np.pi) % (2 * np.pi) - np.pi
        if abs(diff) < 0.25 and np.linalg.norm(rel) < standoff + 0.05:
            # aligned behind the object: aim slightly inside it so the push corrects itself;
            # slow down near the target to avoid overshooting
            push_pt = obj - d * (CONTACT_R - 0.03)
            speed = self.speed * np.clip(np.linalg.norm(target - obj) / 0.15, 0.3, 1.0)
            return self._move(agent, push_pt, speed).astype(np.float32)
        # orbit around the object at the stand-off radius towards the behind point
        ang = np.arctan2(rel[1], rel[0]) + np.clip(diff, -0.6, 0.6)
        orbit_pt = obj + standoff * np.array([np.cos(ang), np.sin(ang)])
        return self._move(agent, orbit_pt, self.speed).astype(np.float32)
