"""Simulated manipulation tasks with flat float32 low-dim observations and scripted experts.

    env = envs.make_env("lift")            # gymnasium.Env; info["success"] after every step
    obs, info = env.reset(seed=100000)     # same seed -> same start, across processes too
    expert = envs.make_expert("lift", env) # expert.reset(); expert.act(obs) -> action

Every env exposes ``env.obs_layout`` (list of (name, size) in the order of the flat observation),
``env.spec_dict()`` (a JSON-able description sufficient to re-create it, stored with datasets),
and ``env.instruction`` (a natural-language task string; Meta-World uses it for VLA policies).
"""

ROBOSUITE_TASKS = ("lift", "can", "square")
PUSH2D_TASKS = ("push2d", "push2d_multimodal")
METAWORLD_SETS = ("mt10",)


def valid_env_names() -> list[str]:
    return [*ROBOSUITE_TASKS, *PUSH2D_TASKS, *METAWORLD_SETS, "mw:<task>-v3"]


def _unknown(name: str) -> ValueError:
    return ValueError(f"unknown env {name!r}; valid names: {', '.join(valid_env_names())}")


def make_env(name: str, **kwargs):
    """Create an env by name; kwargs go to the env family's constructor."""
    if name in ROBOSUITE_TASKS:
        from envs.robosuite_tasks import RobosuiteTask

        return RobosuiteTask(name, **kwargs)
    if name in PUSH2D_TASKS:
        from envs.push2d import Push2DEnv

        return Push2DEnv(multimodal=name == "push2d_multimodal", **kwargs)
    if name.startswith("mw:") or name in METAWORLD_SETS:
        from envs.metaworld_tasks import make_metaworld_env

        return make_metaworld_env(name, **kwargs)
    raise _unknown(name)


def make_expert(name: str, env, **kwargs):
    """The scripted expert for env `name`, acting on `env` (closed loop, randomised per episode)."""
    if name in ROBOSUITE_TASKS:
        from envs.robosuite_experts import make_robosuite_expert

        return make_robosuite_expert(name, env, **kwargs)
    if name in PUSH2D_TASKS:
        from envs.push2d import Push2DExpert

        return Push2DExpert(env, **kwargs)
    if name.startswith("mw:") or name in METAWORLD_SETS:
        from envs.metaworld_tasks import MetaWorldExpert

        return MetaWorldExpert(env, **kwargs)
    raise _unknown(name)


def make_env_from_spec(spec: dict):
    """Re-create an env from its `spec_dict()` (stored with datasets and in checkpoint configs)."""
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError(f"not an env spec (a dict from env.spec_dict()): {spec!r}")
    if "instruction_table" in spec:  # observations carry the instruction embedding (envs/instruction_obs.py)
        from envs.instruction_obs import with_instructions
        from policy_accel.instructions import InstructionTable

        inner = {k: v for k, v in spec.items() if k != "instruction_table"}
        return with_instructions(make_env_from_spec(inner), InstructionTable.from_dict(spec["instruction_table"]))
    if spec.get("family") == "robosuite":
        from envs.robosuite_tasks import RobosuiteTask

        return RobosuiteTask.from_spec(spec)
    return make_env(spec["name"], **spec.get("kwargs", {}))
