"""eval/reuse_effect.py end to end on a tiny policy and a hand-made demo set whose actions move by a
known amount per step."""

import json

import numpy as np
import torch

from envs.dataset import write_dataset
from eval.reuse_effect import main
from tests.conftest import ACT_DIM, OBS_DIM, make_dp_t_policy


def test_reuse_effect_measures_the_demo_steps_and_the_policy_spread(tmp_path):
    t = np.arange(30, dtype=np.float32)[:, None]
    eps = [{"obs": np.random.default_rng(i).uniform(-2, 2, (30, OBS_DIM)).astype(np.float32),
            "action": np.repeat(0.02 * t - 0.3, ACT_DIM, axis=1)} for i in range(3)]  # every dim moves 0.02 a step
    write_dataset(tmp_path / "d.zarr", eps, {"env": "test"})
    policy = make_dp_t_policy()
    policy.config.info["dataset"] = str(tmp_path / "d.zarr")
    policy.save(tmp_path / "ckpt")
    out = tmp_path / "effect.json"
    rows = main([f"checkpoint={tmp_path / 'ckpt'}", "methods=[uncached,ddim4]", "observations=4", "draws=3",
                 "num_threads=1", f"out={out}"])
    step = policy.action_normalizer.normalize(torch.full((2, ACT_DIM), 0.02)) - \
        policy.action_normalizer.normalize(torch.zeros(2, ACT_DIM))
    expected = float(step[0].norm())  # one demo step, in the normalised space the metrics use
    assert abs(rows["demo"]["step"] - expected) < 1e-5 and abs(rows["demo"]["jump"] - expected) < 1e-5
    assert rows["uncached"]["spread"] > 0 and rows["ddim4"]["spread"] > 0  # three noise draws differ
    assert set(json.loads(out.read_text())["results"]) == {"demo", "uncached", "ddim4"}
