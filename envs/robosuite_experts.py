"""Scripted experts for the robosuite tasks: closed-loop waypoint controllers on OSC_POSE deltas.

Every step the expert reads the simulator state (env.task_state(): privileged poses, not the
policy's observation), picks a target eef pose for its current phase and returns
    action[:3] = clip(gain * (target_pos - eef_pos), -speed, speed)
    action[3:6] = clip(rot_gain * axis-angle(R_target R_eef^T), -1, 1)   (world frame, as OSC_POSE)
    action[6] = -1 open / +1 close.
Phases advance on state conditions and fall back when the state says so (drifted off the
approach, missed or dropped grasp: re-open, back up, retry), so perturbed actions (DART noise)
are corrected. Per-episode variation (approach height, speed, grasp offset, grasp side where
the object is symmetric, lift height, ...) is drawn from the expert's own generator, seeded
by reset(seed).
"""

import numpy as np

VERSION = "1"


def down_mat(yaw: float) -> np.ndarray:
    """Gripper pointing down with its fingers closing along (cos yaw, sin yaw, 0).

    Columns are the gripper axes in the world: x = finger axis, z = approach (down)."""
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, s, 0.0], [s, -c, 0.0], [0.0, 0.0, -1.0]])


def axis_angle(rot: np.ndarray) -> np.ndarray:
    """Rotation vector (axis * angle) of rotation matrix `rot`."""
    cos = np.clip((np.trace(rot) - 1.0) / 2.0, -1.0, 1.0)
    angle = np.arccos(cos)
    if angle < 1e-6:
        return np.zeros(3)
    v = np.array([rot[2, 1] - rot[1, 2], rot[0, 2] - rot[2, 0], rot[1, 0] - rot[0, 1]])
    if np.pi - angle < 1e-3:  # near pi the skew part vanishes: take the axis from the diagonal
        axis = np.sqrt(np.maximum((np.diag(rot) + 1.0) / 2.0, 0.0))
        k = int(np.argmax(axis))
        axis = np.sign(np.where(np.arange(3) == k, 1.0, rot[k] + rot[:, k])) * axis
        return axis / np.linalg.norm(axis) * angle
    return v / (2.0 * np.sin(angle)) * angle


def wrap(a: float) -> float:
    return (a + np.pi) % (2 * np.pi) - np.pi


def yaw_of(mat: np.ndarray) -> float:
    """Yaw of a body's x axis (for the gripper: the finger axis)."""
    return float(np.arctan2(mat[1, 0], mat[0, 0]))


def nearest_equivalent(yaw: float, ref: float, period: float) -> float:
    """The angle equivalent to `yaw` modulo `period` that is closest to `ref`."""
    return ref + (yaw - ref + period / 2) % period - period / 2


class PickExpert:
    """Shared machinery: approach above the grasp point, descend, close, check the grasp,
    then run the task-specific `carry` phases (subclasses). Phases:
    approach -> descend -> close -> (carry phases ...); any failed grasp -> release -> approach."""

    name = "robosuite_pick"
    version = VERSION
    gain, rot_gain = 10.0, 2.0
    close_steps = (6, 10)  # gripper closing (and opening) time, steps (drawn per episode)
    min_gap, hold_tol = 0.01, 0.03  # finger gap of a real grasp; max distance eef - grip point
    first_carry_phase = "lift"
    phases_without_object = ()  # carry phases where the object is meant to be released

    def __init__(self, env, seed: int | None = None):
        self.env = env
        self.reset(seed)

    # ---- per-episode setup -------------------------------------------------------------------
    def reset(self, seed: int | None = None):
        self.rng = np.random.default_rng(seed)
        r = self.rng
        self.speed = r.uniform(0.6, 1.0)  # cap on |position action| per dim
        self.approach_h = r.uniform(0.06, 0.12)
        self.close_n = int(r.integers(*self.close_steps, endpoint=True))
        self.phase, self.count, self.retries = "approach", 0, 0
        self.yaw_delta = None  # grasp yaw (relative to the object), chosen once per attempt
        self.hold_yaw = None  # finger yaw at the moment of the grasp
        self.sample_task_params()

    def sample_task_params(self):
        pass

    # ---- task-specific hooks ------------------------------------------------------------------
    def grasp_pose(self, s) -> tuple[np.ndarray, float]:
        """World position of the eef at the grasp and the finger yaw (for the current state)."""
        raise NotImplementedError

    def holding(self, s) -> bool:
        """Gripper closed on the object (not on air) and the object still with the gripper."""
        gap = s["gripper_qpos"][0] - s["gripper_qpos"][1]
        return gap > self.min_gap and np.linalg.norm(self.grip_point(s) - s["eef_pos"]) < self.hold_tol

    def grip_point(self, s) -> np.ndarray:
        """Where the gripper holds the object (world)."""
        return s["object_pos"]

    def carry(self, s) -> np.ndarray:
        """Action for the phases after a successful grasp (subclasses)."""
        raise NotImplementedError

    # ---- control primitives -------------------------------------------------------------------
    def move(self, s, target_pos, yaw: float, gripper: float, speed: float | None = None) -> np.ndarray:
        speed = self.speed if speed is None else speed
        dpos = np.clip(self.gain * (np.asarray(target_pos) - s["eef_pos"]), -speed, speed)
        drot = np.clip(self.rot_gain * axis_angle(down_mat(yaw) @ s["eef_mat"].T), -1.0, 1.0)
        return np.concatenate([dpos, drot, [gripper]]).astype(np.float32)

    def eef_yaw(self, s) -> float:
        return yaw_of(s["eef_mat"])

    def set_phase(self, phase: str):
        self.phase, self.count = phase, 0

    # ---- the shared pick phases ---------------------------------------------------------------
    def act(self, obs=None) -> np.ndarray:
        """Next action; `obs` is not used (the expert reads privileged state from the env)."""
        s = self.env.task_state()
        self.count += 1
        if self.phase in ("approach", "descend", "close", "release"):
            return self.pick(s)
        if not self.holding(s) and self.phase not in self.phases_without_object:
            self.retries += 1
            self.set_phase("release")
            return self.pick(s)
        return self.carry(s)

    def pick(self, s) -> np.ndarray:
        grasp_pos, yaw = self.grasp_pose(s)
        yaw = nearest_equivalent(yaw, self.eef_yaw(s), np.pi)  # the fingers are symmetric
        above = grasp_pos + [0.0, 0.0, self.approach_h]
        xy_err = np.linalg.norm(grasp_pos[:2] - s["eef_pos"][:2])
        yaw_err = abs(wrap(yaw - self.eef_yaw(s)))
        if self.phase == "release":  # open and back up, then approach again
            if self.count > self.close_n and s["eef_pos"][2] > above[2] - 0.02:
                self.set_phase("approach")
                self.yaw_delta = None
            return self.move(s, [*s["eef_pos"][:2], above[2]], yaw, -1.0)
        if self.phase == "approach":
            if xy_err < 0.01 and yaw_err < 0.1 and abs(above[2] - s["eef_pos"][2]) < 0.03:
                self.set_phase("descend")
            return self.move(s, above, yaw, -1.0)
        if self.phase == "descend":
            if xy_err > 0.025 or self.count > 50:  # drifted off or stuck: go back up
                self.set_phase("approach")
            elif np.linalg.norm(grasp_pos - s["eef_pos"]) < 0.008 and yaw_err < 0.1:
                self.set_phase("close")
            # slow down near the object so the fingers do not push it away
            return self.move(s, grasp_pos, yaw, -1.0, speed=min(self.speed, 0.5))
        # close: hold the pose while the fingers close, then check the grasp
        if self.count >= self.close_n:
            if self.holding(s):
                self.set_phase(self.first_carry_phase)
                self.hold_yaw = self.eef_yaw(s)
            else:
                self.retries += 1
                self.set_phase("release")
        return self.move(s, grasp_pos, yaw, 1.0, speed=0.3)


class LiftExpert(PickExpert):
    """Lift: above the cube -> descend -> close -> lift."""

    name = "robosuite_lift"

    def sample_task_params(self):
        r = self.rng
        self.offset = r.uniform(-0.005, 0.005, 3) * [1, 1, 0.6]  # grasp point around the centre
        self.yaw_choice = int(r.integers(2))  # which of the two face-aligned finger axes
        self.lift_h = r.uniform(0.1, 0.16)

    def grasp_pose(self, s):
        cube_yaw = yaw_of(s["object_mat"])
        if self.yaw_delta is None:  # a face-aligned finger axis: the nearest one or the other
            near = nearest_equivalent(cube_yaw, self.eef_yaw(s), np.pi / 2)
            self.yaw_delta = near - cube_yaw + self.yaw_choice * np.pi / 2
        return self.grip_point(s), cube_yaw + self.yaw_delta

    def grip_point(self, s):
        return s["object_pos"] + self.offset

    def carry(self, s):
        return self.move(s, [*s["eef_pos"][:2], s["table_z"] + self.lift_h], self.hold_yaw, 1.0)


class PlaceExpert(PickExpert):
    """Pick the object, lift it to `carry_z`, carry it over `place_xy`, lower it to `place_z`,
    open and retreat upwards. Object moves are closed loop on the object's pose: the eef target
    is eef + (object target - object)."""

    phases_without_object = ("open", "retreat")

    def place_target(self, s) -> tuple[np.ndarray, float]:
        """(object xyz the place aims at, finger yaw while carrying)."""
        raise NotImplementedError

    def aligned(self, s, goal, yaw) -> bool:
        return np.linalg.norm(goal[:2] - s["object_pos"][:2]) < self.place_tol

    def move_object(self, s, obj_target, yaw, gripper, speed=None):
        return self.move(s, s["eef_pos"] + (np.asarray(obj_target) - s["object_pos"]), yaw, gripper, speed)

    def carry(self, s):
        goal, yaw = self.place_target(s)
        obj = s["object_pos"]
        if self.phase == "lift":
            if obj[2] > self.carry_z - 0.02:
                self.set_phase("carry")
            return self.move_object(s, [obj[0], obj[1], self.carry_z], yaw, 1.0)
        if self.phase == "carry":
            stalled = self.count > 80 and np.linalg.norm(goal[:2] - obj[:2]) < 2 * self.place_tol
            if (self.aligned(s, goal, yaw) or stalled) and abs(obj[2] - self.carry_z) < 0.03:
                self.set_phase("lower")
            return self.move_object(s, [goal[0], goal[1], self.carry_z], yaw, 1.0)
        if self.phase == "lower":
            above_entry = obj[2] > self.insert_z
            if above_entry and np.linalg.norm(goal[:2] - obj[:2]) > 3 * self.place_tol:
                self.set_phase("carry")  # drifted before entering: re-align above the goal
            elif obj[2] < goal[2] + self.release_dz:
                self.set_phase("open")
            elif self.count > 60:  # stuck: lift and re-align if not yet in, else let go
                self.set_phase("carry" if obj[2] > self.insert_z - 0.02 else "open")
            return self.move_object(s, goal, yaw, 1.0, speed=min(self.speed, self.lower_speed))
        if self.phase == "open":
            if self.count >= self.close_n:
                self.set_phase("retreat")
            return self.move(s, s["eef_pos"], yaw, -1.0, speed=0.2)
        # retreat: straight up, gripper open
        return self.move(s, [*s["eef_pos"][:2], self.retreat_z], yaw, -1.0)


class CanExpert(PlaceExpert):
    """Can: grasp, lift over the bin walls, carry to the can's target bin, lower, open, move away."""

    name = "robosuite_can"
    min_gap, hold_tol = 0.02, 0.04
    place_tol, release_dz, lower_speed = 0.015, 0.012, 0.5

    def sample_task_params(self):
        r = self.rng
        self.offset = np.array([*r.uniform(-0.004, 0.004, 2), r.uniform(0.0, 0.02)])
        self.yaw_offset = r.uniform(-0.3, 0.3)  # the can is round: any finger axis works
        self.carry_z = r.uniform(0.965, 0.99)  # can centre; bin walls end at z = 0.9
        # from the bin-quarter centre (0.2, 0.405) towards the robot, the far corner is at the
        # edge of the arm's reach; the dividers at x = 0.1, y = 0.28 bound it on the near side
        self.place_offset = np.array([r.uniform(-0.05, -0.035), r.uniform(-0.07, -0.03)])
        self.retreat_z = r.uniform(0.98, 1.03)
        self.insert_z = 0.94  # can centre below this: the can is inside the bin's walls

    def grasp_pose(self, s):
        if self.yaw_delta is None:
            self.yaw_delta = self.eef_yaw(s) + self.yaw_offset  # absolute yaw, fixed per attempt
        return self.grip_point(s), self.yaw_delta

    def grip_point(self, s):
        return s["object_pos"] + self.offset

    def place_target(self, s):
        goal = s["goal_pos"] + [*self.place_offset, 0.0]
        goal[2] += 0.04  # the can's centre when it stands on the floor (half height ~4 cm)
        return goal, self.hold_yaw


class SquareExpert(PlaceExpert):
    """Square: align the fingers across the nut handle, grasp, lift, turn the nut's yaw to a
    multiple of pi/2 (the peg is square and axis-aligned), centre it over the peg, lower, open,
    lift away."""

    name = "robosuite_square"
    min_gap, hold_tol = 0.015, 0.03
    place_tol, release_dz, lower_speed = 0.003, 0.025, 0.3

    def sample_task_params(self):
        r = self.rng
        # grasp point along the handle: its outer part, so that the ~2.7 cm wide fingers clear the
        # nut's ring (handle site at 5.4 cm from the centre, ring edge at 4.4 cm, handle end 7.9 cm)
        self.radial = r.uniform(0.005, 0.012)
        self.grasp_dz = r.uniform(-0.001, 0.003)  # the finger pads' centre is 3.6 mm above the eef site
        self.carry_z = r.uniform(0.985, 1.02)  # nut centre; the peg top is at z = 0.95
        self.retreat_z = r.uniform(1.0, 1.06)
        self.insert_z = 0.96

    def nut_yaw(self, s) -> float:
        return yaw_of(s["object_mat"])

    def grip_point(self, s):
        radial_dir = s["object_mat"][:, 0]
        return s["handle_pos"] + self.radial * radial_dir + [0.0, 0.0, self.grasp_dz]

    def grasp_pose(self, s):
        return self.grip_point(s), self.nut_yaw(s) + np.pi / 2  # fingers across the handle

    def nut_yaw_error(self, s) -> float:
        """Turn to the nearest multiple of pi/2 that does not point the handle away from the
        robot (+x): the far side of the peg is at the edge of the arm's reach."""
        yaw = self.nut_yaw(s)
        targets = [t for t in nearest_equivalent(0.0, yaw, np.pi / 2) + np.pi / 2 * np.arange(-2, 3)
                   if np.cos(t) < 0.5]
        return min(targets, key=lambda t: abs(t - yaw)) - yaw

    def aligned(self, s, goal, yaw):
        xy_err = np.linalg.norm(goal[:2] - s["object_pos"][:2])
        return xy_err < self.place_tol and abs(self.nut_yaw_error(s)) < 0.05

    def place_target(self, s):
        goal = s["goal_pos"] + [0.0, 0.0, 0.01]  # nut centre resting on the table around the peg
        return goal, self.eef_yaw(s) + self.nut_yaw_error(s)


def make_robosuite_expert(name: str, env, seed: int | None = None, **kwargs):
    experts = {"lift": LiftExpert, "can": CanExpert, "square": SquareExpert}
    if name not in experts:
        raise ValueError(f"no scripted expert for robosuite task {name!r}; valid: {list(experts)}")
    return experts[name](env, seed=seed, **kwargs)
