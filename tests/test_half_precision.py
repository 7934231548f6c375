"""Half-precision inference (Policy.set_dtype, policy_accel/precision.py) on a tiny DP-T policy, and a
smoke run of eval/half_precision.py."""

import json

import numpy as np
import pytest
import torch

import policy_accel as pa
from eval import half_precision
from policy_accel.cache import Schedule
from tests.conftest import OBS_DIM, STEPS, make_dp_t_policy
from tests.test_rollout import tiny_checkpoint
from tests.test_train import write_zarr

OBS = np.random.default_rng(1).uniform(-2, 2, (3, 2, OBS_DIM)).astype(np.float32)


def chunk(policy, seed=0):
    policy.seed(seed)
    policy.reset()
    return policy.predict_action_chunk(OBS)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_policy_keeps_the_fp32_boundary_and_stays_close(dtype):
    ref_policy, policy = make_dp_t_policy(), make_dp_t_policy()
    fp32_hash = policy.checkpoint_hash
    ref = chunk(ref_policy)
    assert policy.to(dtype=dtype) is policy  # routed to set_dtype: the normalisers stay fp32
    assert policy.dtype == dtype and all(p.dtype == dtype for p in policy.model.parameters())
    assert all(b.dtype == torch.float32 for n in ("obs_normalizer", "action_normalizer")
               for b in getattr(policy, n).buffers())
    t = torch.tensor([0.0, 37.0, 99.0])
    assert policy.model.time_emb.freqs.dtype == torch.float32  # recomputed in fp32, not upcast
    assert torch.equal(policy.model.time_emb(t), ref_policy.model.time_emb(t))
    out = chunk(policy)
    assert out.dtype == np.float32 and np.isfinite(out).all()
    err = np.abs(out - ref).max()
    assert 0 < err < (0.02 if dtype == torch.bfloat16 else 2e-3), err  # actions span about [-1, 1]
    assert policy.checkpoint_hash == fp32_hash  # schedules calibrated on the fp32 weights still bind
    names = [b.name for b in pa.find_blocks(policy.model)]
    pa.accelerate(policy, pa.BACTaylorConfig(Schedule({n: [0, 3, 7] for n in names}, STEPS, "ddpm",
                                                      checkpoint_hash=fp32_hash), order=1))
    assert np.isfinite(chunk(policy)).all()


def test_bad_dtypes_and_one_way_casts_are_refused_by_name(tmp_path):
    policy = make_dp_t_policy()
    for bad in (torch.int8, torch.float64, "bf17"):
        with pytest.raises(ValueError, match="unsupported policy dtype"):
            policy.set_dtype(bad)
    policy.set_dtype("float32")  # a no-op
    policy.set_dtype("bf16")
    with pytest.raises(ValueError, match="load the checkpoint again"):
        policy.set_dtype(torch.float32)
    with pytest.raises(ValueError, match="save the fp32 policy"):
        policy.save(tmp_path / "half")
    compiled = make_dp_t_policy()
    compiled.compile_chunk(backend="eager")
    with pytest.raises(RuntimeError, match="set the dtype first"):
        compiled.set_dtype(torch.bfloat16)


def test_load_policy_with_dtype_and_the_chunk_graph_in_bf16(tmp_path):
    path = make_dp_t_policy().save(tmp_path / "ckpt")
    policy = pa.load_policy(path, dtype="bfloat16")
    policy.set_sampler(pa.SamplerConfig("ddim", 4, STEPS))  # few steps: a short trace
    pa.accelerate(policy, pa.UniformConfig(interval=2))
    eager = chunk(policy)
    torch._dynamo.reset()
    pa.remove_acceleration(policy)
    pa.accelerate(policy, pa.UniformConfig(interval=2))
    policy.compile_chunk(backend="eager")
    np.testing.assert_array_equal(chunk(policy), eager)


def test_half_precision_script_smoke(tmp_path):
    rng = np.random.default_rng(0)
    ends = np.cumsum([30, 25]).astype(np.int64)
    data = write_zarr(tmp_path / "d.zarr", rng.uniform(-1, 1, (55, 6)).astype(np.float32),
                      rng.uniform(-1, 1, (55, 2)).astype(np.float32), ends, {"env": "push2d"})
    ckpt = tiny_checkpoint(tmp_path / "ckpt", horizon=12, dataset=str(data))
    out = tmp_path / "hp.json"
    result = half_precision.main([f"checkpoint={ckpt}", "methods=[uncached,ddim5,uniform2@ddim5]",
                                  "observations=4", "closed_loop=true", "episodes=2", "num_envs=2",
                                  "num_threads=1", "progress=false", f"out={out}"])
    assert json.loads(out.read_text()) == result
    rows = {(r["setting"], r["dtype"]): r for r in result["offline"]}
    assert set(rows) == {(m, d) for m in ("uncached", "ddim5", "uniform2@ddim5") for d in ("bfloat16", "float16")}
    assert all(r["finite"] and 0 <= r["mean_abs"] <= r["max_abs"] < 0.1 for r in rows.values())
    loop = result["closed_loop"]
    assert [(r["setting"], r["dtype"], r["n_episodes"]) for r in loop] == [
        ("uncached", "bfloat16", 2), ("ddim5", "bfloat16", 2), ("uniform2@ddim5", "bfloat16", 2)]
    with pytest.raises(SystemExit, match="unsupported policy dtype"):
        half_precision.main([f"checkpoint={ckpt}", "dtypes=[int8]"])
