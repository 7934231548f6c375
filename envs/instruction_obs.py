"""Instruction-conditioned observations: the env's instruction embedding appended to every observation.

    env = with_instructions(envs.make_env("mt10", task_onehot=False))   # builds the table (needs the encoder)
    env = with_instructions(envs.make_env("mt10", task_onehot=False), table)   # or uses a stored one

The flat observation becomes [state ; instruction embedding (384)], obs_layout gains ("instruction", 384),
and spec_dict() carries the table, so that an env re-created from a dataset's or a checkpoint's spec
embeds exactly as it did when the demos were recorded (no encoder needed for the instructions it holds).

    env.told = {"open the drawer": "close the drawer"}   # the policy is told another task's instruction

`told` maps the task's own instruction to the one the observation carries (eval/swap_instructions.py):
success is still the env's own task, so a policy that follows the instruction fails.
"""

import gymnasium as gym
import numpy as np

from policy_accel.instructions import InstructionTable


class InstructionObservation(gym.ObservationWrapper):
    def __init__(self, env: gym.Env, table: InstructionTable):
        super().__init__(env)
        self.table = table
        inner = env.observation_space
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (inner.shape[0] + table.dim,), np.float32)
        self.obs_layout = [*env.obs_layout, ("instruction", table.dim)]
        self.told: dict[str, str] = {}

    def observation(self, obs):
        instruction = self.env.unwrapped.instruction
        return np.concatenate([obs, self.table(self.told.get(instruction, instruction))[0]]).astype(np.float32)

    @property
    def instruction(self) -> str:
        return self.env.unwrapped.instruction

    def spec_dict(self) -> dict:
        return {**self.env.spec_dict(), "instruction_table": self.table.to_dict()}


def task_instructions(env) -> list[str]:
    """Every instruction the env can give: one per task of a multi-task env, else its one instruction."""
    return list(getattr(env.unwrapped, "instructions", None) or [env.unwrapped.instruction])


def with_instructions(env: gym.Env, table: InstructionTable | None = None) -> InstructionObservation:
    return InstructionObservation(env, table or InstructionTable.build(task_instructions(env)))
