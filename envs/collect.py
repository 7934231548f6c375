"""Collect scripted-expert demos into a zarr dataset.

    python eval/collect.py env=lift episodes=200 seed=0 [noise=0.05] [out=data/lift.zarr] [overwrite=true]

Attempt i runs env seed `seed + i` with an expert seed derived from it. DART-style: the env
executes the expert action plus Gaussian noise (gripper dims excluded, clipped to [-1, 1]),
the dataset records the expert's clean action. The robosuite experts act in OSC deltas; with
`action_mode=abs` both the clean and the executed action become absolute eef targets through
`env.action_from_delta` (the noise stays in delta units, so both modes see the same noise).
Only successful episodes are kept, each cut `steps_after_success` steps after its first success.
Same command -> identical data.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

import envs
from envs.dataset import DatasetWriter, package_version


@dataclass
class CollectConfig:
    env: str = "push2d"
    episodes: int = 200
    seed: int = 0
    noise: float = 0.05
    out: str | None = None
    action_mode: str = "delta"  # robosuite: "delta" (OSC deltas) | "abs" (absolute eef pose targets)
    rotations: str = "quat"  # robosuite: orientations in the observation, "quat" | "rot6d"
    instructions: bool = False  # append the instruction embedding to every obs (envs/instruction_obs.py)
    overwrite: bool = False
    max_attempts: int | None = None
    steps_after_success: int = 10


def derived_seed(env_seed: int, stream: int) -> int:
    """Independent seeds for the expert (stream 1) and the action noise (stream 2)."""
    return int(np.random.SeedSequence([env_seed, stream]).generate_state(1)[0])


def noise_free_dims(env, act_dim: int) -> list[int]:
    """Action dims that get no DART noise: the gripper (last dim) on robot arms."""
    env = env.unwrapped  # through an observation wrapper (envs/instruction_obs.py)
    if hasattr(env, "noise_free_dims"):
        return list(env.noise_free_dims)
    return [] if env.name in envs.PUSH2D_TASKS else [act_dim - 1]


def run_episode(env, expert, env_seed: int, noise: float = 0.0, steps_after_success: int = 10):
    """One expert episode. Returns dict(obs, action, success, success_step, instruction);
    obs[t] is the observation the clean action[t] was computed from; actions in the env's mode."""
    obs, info = env.reset(seed=env_seed)
    instruction = getattr(env.unwrapped, "instruction", "")
    expert.reset(seed=derived_seed(env_seed, 1))
    rng = np.random.default_rng(derived_seed(env_seed, 2))
    to_env = getattr(env.unwrapped, "action_from_delta", None)  # robosuite experts act in OSC deltas
    max_steps = getattr(env.unwrapped, "horizon", None) or 10_000
    obs_list, act_list, success_step, noisy = [], [], None, None
    for t in range(max_steps):
        action = np.asarray(expert.act(obs), dtype=np.float32)
        if noisy is None:
            noisy = np.ones(len(action), dtype=bool)
            noisy[noise_free_dims(env, len(action))] = False
        executed = action.astype(np.float64)
        if noise > 0:
            executed = np.clip(executed + noisy * rng.normal(0.0, noise, len(action)), -1.0, 1.0)
        if to_env is not None:
            action, executed = to_env(action), to_env(executed)
        obs_list.append(obs)
        act_list.append(action)
        obs, _, terminated, truncated, info = env.step(executed)
        if success_step is None and info["success"]:
            success_step = t + 1
        if terminated or truncated or (success_step is not None and t + 1 >= success_step + steps_after_success):
            break
    return {"obs": np.stack(obs_list).astype(np.float32), "action": np.stack(act_list).astype(np.float32),
            "success": success_step is not None, "success_step": success_step, "instruction": instruction}


def collect(env: str, episodes: int, seed: int = 0, noise: float = 0.05, out=None, overwrite: bool = False,
            max_attempts: int | None = None, steps_after_success: int = 10, command: str = "",
            progress: bool = True, action_mode: str = "delta", rotations: str = "quat",
            instructions: bool = False) -> Path:
    """Collect `episodes` successful demos of env `env`; returns the dataset path."""
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    env_kwargs = {k: v for k, v in (("action_mode", action_mode), ("rotations", rotations))
                  if v != {"action_mode": "delta", "rotations": "quat"}[k]}
    if env_kwargs and env not in envs.ROBOSUITE_TASKS:
        raise ValueError(f"{env_kwargs} exist for the robosuite tasks only, not {env!r}")
    suffix = "".join(f"_{v}" for v in env_kwargs.values()) + ("_lang" if instructions else "")  # can_abs_rot6d
    out = Path(out) if out else Path("data") / f"{env.replace(':', '_')}{suffix}.zarr"
    max_attempts = max_attempts or 2 * episodes
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = DatasetWriter(out, overwrite=overwrite)  # fails fast if `out` exists
    try:
        attrs = _collect_into(writer, env, env_kwargs, episodes, seed, noise, max_attempts, steps_after_success,
                              progress, instructions)
    except BaseException:  # including Ctrl-C: leave no partial dataset behind
        writer.abort()
        raise
    return writer.close({**attrs, "command": command})


def _collect_into(writer, env_name, env_kwargs, episodes, seed, noise, max_attempts, steps_after_success,
                  progress, instructions=False) -> dict:
    told_by_language = instructions and env_name in envs.METAWORLD_SETS  # no one-hot task id beside the instruction
    env = envs.make_env(env_name, **env_kwargs, **({"task_onehot": False} if told_by_language else {}))
    expert = envs.make_expert(env_name, env)
    if instructions:  # the expert acts on the inner env's state; the recorded obs carry the embedding
        from envs.instruction_obs import with_instructions

        env = with_instructions(env)
    seeds, failures, instructions = [], [], []
    bar = tqdm(total=episodes, desc=f"collect {env_name}", disable=not progress)
    for i in range(max_attempts):
        if len(seeds) == episodes:
            break
        ep = run_episode(env, expert, seed + i, noise, steps_after_success)
        if ep["success"]:
            writer.add_episode(ep["obs"], ep["action"])
            seeds.append(seed + i)
            instructions.append(ep["instruction"])
            bar.update(1)
        else:
            failures.append(seed + i)
        bar.set_postfix(failures=len(failures))
    bar.close()
    if len(seeds) < episodes:
        raise RuntimeError(f"only {len(seeds)}/{episodes} successful episodes in {max_attempts} attempts "
                           f"on {env_name}; nothing written")
    attrs = {
        "env": env_name, "obs_layout": [list(x) for x in env.obs_layout], "env_spec": env.spec_dict(),
        "instructions": instructions, "seeds": seeds, "failed_seeds": failures,
        "n_failures": len(failures), "expert": {"name": expert.name, "version": str(expert.version)},
        "noise": float(noise), "noise_free_dims": noise_free_dims(env, env.action_space.shape[0]),
        "steps_after_success": steps_after_success, "package_version": package_version(),
    }
    env.close()
    return attrs
