"""eval/diagnose.py's per-step bookkeeping reads the gripper command where the env takes it."""

import numpy as np
import pytest

import envs

pytest.importorskip("robosuite")

from eval.diagnose import update  # noqa: E402


@pytest.mark.parametrize("kwargs, act_dim", [({}, 7), ({"action_mode": "abs", "rotations": "rot6d"}, 10)])
def test_closures_count_the_gripper_entry_not_a_rotation_entry(kwargs, act_dim):
    env = envs.make_env("square", **kwargs)
    env.reset(seed=0)
    ep = {"first": {}, "tipped": False, "dropped": False, "closures": 0, "_closed": False}
    action = np.zeros(act_dim, np.float32)
    action[6] = 1.0  # delta: the gripper; absolute rot6d: a rotation entry
    action[-1] = 1.0 if act_dim == 7 else -1.0  # absolute: the gripper, open
    update(ep, "square", env.unwrapped, action, 1, False)
    assert ep["closures"] == (1 if act_dim == 7 else 0)
    action[-1] = 1.0  # close
    update(ep, "square", env.unwrapped, action, 2, False)
    update(ep, "square", env.unwrapped, action, 3, False)  # still closed: not a new closure
    assert ep["closures"] == 1
    env.close()


def test_config_takes_a_sampler_or_a_method_not_both():
    from eval.diagnose import DiagnoseConfig

    assert DiagnoseConfig(task="square", method="bac5").method == "bac5"
    with pytest.raises(ValueError, match="not both"):
        DiagnoseConfig(task="square", sampler="ddim10", method="bac5")
    with pytest.raises(ValueError):
        DiagnoseConfig(task="square", method="bac_nonsense")
