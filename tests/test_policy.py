"""Policy: history and action queue, hooks, determinism, save/load, input validation, engine contract."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import policy_accel as pa
from policy_accel.clock import ClockListener
from policy_accel.models import register_family
from policy_accel.sampling import ddpm_scheduler
from tests.conftest import TinyGuidedDiT

OBS_DIM, ACT_DIM, H, TO, TA = 6, 2, 8, 2, 4


def make_policy(seed=0, **kw) -> pa.Policy:
    torch.manual_seed(0)
    cfg = pa.PolicyConfig(obs_dim=OBS_DIM, action_dim=ACT_DIM, horizon=H, n_obs_steps=TO, n_action_steps=TA,
                          model=dict(n_layer=2, n_head=4, n_emb=32), sampler=pa.SamplerConfig("ddim", 5))
    policy = pa.Policy(cfg, seed=seed, **kw)
    rng = np.random.default_rng(0)
    policy.fit_normalizers(rng.uniform(-2, 2, (100, OBS_DIM)), rng.uniform(-0.5, 3, (100, ACT_DIM)))
    return policy


@pytest.fixture
def policy():
    return make_policy()


OBS = np.linspace(-1, 1, 3 * OBS_DIM, dtype=np.float32).reshape(3, OBS_DIM)


class Recorder(ClockListener):
    """Listens to the policy's clock; a pre-hook on the denoiser records the clock at every call."""

    def __init__(self, policy):
        self.events, clock = [], policy.clock
        clock.listeners.append(self)
        policy.model.register_forward_pre_hook(lambda m, a: self.events.append(("step", clock.step, clock.t)))

    def begin_chunk(self, batch_size, sampler_kind, timesteps):
        self.events.append(("chunk", batch_size, list(timesteps)))

    def reset(self):
        self.events.append(("reset",))


def test_select_action_shapes_and_action_queue(policy):
    rec = Recorder(policy)
    policy.reset()
    single = [policy.select_action(OBS[0]) for _ in range(TA + 1)]
    assert all(a.shape == (ACT_DIM,) and a.dtype == np.float32 for a in single)
    assert [e[0] for e in rec.events].count("chunk") == 2  # a new chunk once the queue of TA ran dry
    policy.reset()
    batch = policy.select_action(OBS)
    assert batch.shape == (3, ACT_DIM)
    with pytest.raises(ValueError, match="batch size changed"):
        policy.select_action(OBS[:2])
    assert policy.predict_action_chunk(OBS).shape == (3, TA, ACT_DIM)


def test_hooks_get_chunk_steps_and_reset_with_python_values(policy):
    rec = Recorder(policy)
    policy.predict_action_chunk(OBS[:2])
    ts = pa.SamplerConfig("ddim", 5).timesteps()
    assert rec.events == [("chunk", 2, ts)] + [("step", k, t) for k, t in enumerate(ts)]
    assert all(type(e[1]) is int and type(e[2]) is float for e in rec.events[1:])
    policy.set_sampler(pa.SamplerConfig("ddpm", 100))
    policy.reset()
    rec.events.clear()
    policy.predict_action_chunk(OBS[:1])
    assert rec.events[0] == ("chunk", 1, [float(t) for t in range(99, -1, -1)]) and len(rec.events) == 101
    policy.reset()
    assert rec.events[-1] == ("reset",)


def test_first_observation_fills_history_and_explicit_history_leaves_it_alone(policy):
    policy.seed(5)
    repeated = policy.predict_action_chunk(np.stack([OBS, OBS], axis=1))
    policy.seed(5)
    policy.reset()
    assert np.array_equal(policy.predict_action_chunk(OBS), repeated)
    policy.seed(5)
    two_step = policy.predict_action_chunk(OBS[::-1].copy())  # history is now [OBS, OBS[::-1]]
    policy.seed(5)
    assert np.array_equal(two_step, policy.predict_action_chunk(np.stack([OBS, OBS[::-1]], axis=1)))
    # the explicit history did not touch the stored one: [OBS, OBS[::-1]] -> [OBS[::-1], OBS[::-1]]
    policy.seed(5)
    newest_twice = policy.predict_action_chunk(OBS[::-1].copy())
    policy.seed(5)
    assert np.array_equal(newest_twice, policy.predict_action_chunk(np.stack([OBS[::-1]] * 2, axis=1)))


class EpsOracle(nn.Module):
    """Predicts the exact noise for a known normalised trajectory x0 (B, H, Da)."""

    prediction = "epsilon"

    def prepare(self, cond, timesteps=None):
        return pa.Context()

    def __init__(self, x0):
        super().__init__()
        self.x0 = nn.Parameter(x0, requires_grad=False)
        self.alphas = ddpm_scheduler().alphas_cumprod

    def forward(self, x, t, cond):
        a = float(self.alphas[int(t)])
        return (x - math.sqrt(a) * self.x0) / math.sqrt(1 - a)


def test_chunk_is_unnormalised_trajectory_from_index_n_obs_steps_minus_1(policy):
    x0 = torch.linspace(-0.9, 0.9, H * ACT_DIM).reshape(1, H, ACT_DIM)
    policy.model = EpsOracle(x0)
    chunk = policy.predict_action_chunk(OBS[0])
    expected = policy.action_normalizer.unnormalize(x0[:, TO - 1:TO - 1 + TA]).numpy()
    np.testing.assert_allclose(chunk, expected, atol=1e-4)
    policy.reset()
    actions = [policy.select_action(OBS[0]) for _ in range(TA)]
    np.testing.assert_allclose(np.stack(actions), expected[0], atol=1e-4)


def test_same_seed_same_actions(policy):
    policy.set_sampler(pa.SamplerConfig("ddpm", 100))  # stochastic at every step
    runs = []
    for seed in (1, 1, 2):
        policy.seed(seed)
        policy.reset()
        runs.append(np.stack([policy.select_action(OBS) for _ in range(2 * TA)]))
    assert np.array_equal(runs[0], runs[1]) and not np.array_equal(runs[0], runs[2])
    other = make_policy(seed=1)
    other.set_sampler(pa.SamplerConfig("ddpm", 100))
    assert np.array_equal(np.stack([other.select_action(OBS) for _ in range(2 * TA)]), runs[0])



def test_done_rows_are_not_computed_and_the_others_get_their_own_actions(policy):
    policy.set_sampler(pa.SamplerConfig("ddpm", 100))  # fresh noise at every step: the RNG stream must match
    rec = Recorder(policy)

    def run(done_at_chunk):
        policy.seed(3)
        policy.reset()
        rec.events.clear()
        return np.stack([policy.select_action(OBS, done=done_at_chunk[t // TA]) for t in range(3 * TA)])

    free = run([None, None, None])
    partial = run([None, np.array([False, True, False]), np.array([True, True, True])])
    assert [e[1] for e in rec.events if e[0] == "chunk"] == [3, 2]  # 3 rows, then 2, then none computed
    np.testing.assert_allclose(partial[:TA], free[:TA], atol=1e-6)
    np.testing.assert_allclose(partial[TA:2 * TA, [0, 2]], free[TA:2 * TA, [0, 2]], atol=1e-6)
    assert not partial[TA:2 * TA, 1].any() and not partial[2 * TA:].any()
    later = run([np.array([True, False, True]), None, None])  # the noise stream is as if every row ran
    np.testing.assert_allclose(later[TA:], free[TA:], atol=1e-6)
    np.testing.assert_allclose(later[:TA, 1], free[:TA, 1], atol=1e-6)
    with pytest.raises(ValueError, match="done must have shape"):
        policy.select_action(OBS, done=np.zeros(2, bool))

def test_save_load_round_trip(policy, tmp_path):
    policy.save(tmp_path / "ck")
    loaded = pa.load_policy(tmp_path / "ck")
    assert loaded.checkpoint_hash == policy.checkpoint_hash
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["model"]["n_emb"] == 32
    assert loaded.sampler == policy.sampler and not loaded.training
    for p in (policy, loaded):
        p.seed(3)
        p.reset()
    assert np.array_equal(np.stack([policy.select_action(OBS) for _ in range(6)]),
                          np.stack([loaded.select_action(OBS) for _ in range(6)]))
    torch.testing.assert_close(loaded.action_normalizer.scale, policy.action_normalizer.scale, rtol=0, atol=0)
    policy.model.head.bias.data += 1
    assert policy.checkpoint_hash != loaded.checkpoint_hash


def test_bad_observations_fail_before_the_denoiser(policy):
    rec = Recorder(policy)
    nan = OBS[0].copy()
    nan[2] = np.nan
    cases = [(OBS[0, :5], "shape"), (OBS[None], r"shape \(6,\) or \(B, 6\)"), (nan, "NaN or inf"),
             (np.full(OBS_DIM, np.inf), "NaN or inf"), (np.array(["a"] * OBS_DIM), "real numbers"),
             (np.zeros((0, OBS_DIM)), "shape")]
    for obs, match in cases:
        with pytest.raises(ValueError, match=match):
            policy.select_action(obs)
    with pytest.raises(ValueError, match=r"history must have shape \(B, 2, 6\)"):
        policy.predict_action_chunk(np.zeros((1, 3, OBS_DIM)))
    assert rec.events == []
    assert policy.select_action(np.arange(OBS_DIM)).shape == (ACT_DIM,)  # ints are fine


def test_bad_checkpoints_raise_errors_naming_the_file(policy, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        pa.load_policy(tmp_path / "nothing")
    ck = policy.save(tmp_path / "ck")
    weights = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ValueError, match="model.safetensors is truncated"):
        pa.load_policy(ck)
    (ck / "model.safetensors").write_bytes(weights)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["model"]["n_emb"] = 64
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model.safetensors does not match .*config.json"):
        pa.load_policy(ck)
    (ck / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        pa.load_policy(ck)
    (ck / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        pa.load_policy(ck)


def test_sampler_switch_and_validation(policy):
    with pytest.raises(ValueError, match="needs a denoiser that predicts velocity"):
        policy.set_sampler(pa.SamplerConfig("flow", 10))
    with pytest.raises(TypeError):
        policy.set_sampler("ddim")
    policy.set_sampler(pa.SamplerConfig("ddim", 3))
    assert policy.sampler.num_steps == 3 and policy.predict_action_chunk(OBS).shape == (3, TA, ACT_DIM)
    with pytest.raises(ValueError, match="exceeds horizon"):
        pa.PolicyConfig(obs_dim=2, action_dim=2, horizon=4, n_obs_steps=2, n_action_steps=4)
    with pytest.raises(ValueError, match="must not set"):
        pa.PolicyConfig(obs_dim=2, action_dim=2, model=dict(horizon=4))


def test_engine_contract_through_the_policy(policy):
    policy.seed(0)
    ref = policy.predict_action_chunk(OBS)
    handle = pa.accelerate(policy, pa.EveryStepConfig())
    assert policy.cache is handle and policy.clock.listeners == [handle]
    policy.seed(0)
    assert np.array_equal(policy.predict_action_chunk(OBS), ref)
    with pytest.raises(RuntimeError, match="already accelerated"):
        pa.accelerate(policy, pa.UniformConfig(interval=2))
    pa.remove_acceleration(policy)
    pa.accelerate(policy, pa.UniformConfig(interval=2))
    policy.predict_action_chunk(OBS)
    stats = pa.cache_stats(policy)
    assert len(stats.blocks) == 6 and all((b.computed, b.skipped) == (3, 2) for b in stats.blocks.values())
    pa.remove_acceleration(policy)
    assert policy.clock.listeners == [] and policy.cache is None
    with pytest.raises(ValueError, match="not accelerated"):
        pa.cache_stats(policy)
    policy.seed(0)
    assert np.array_equal(policy.predict_action_chunk(OBS), ref)


def test_a_sampler_must_fit_what_the_model_predicts(policy):
    with pytest.raises(ValueError, match="sampler 'flow' needs a denoiser that predicts velocity; this one predicts "
                                         "epsilon"):
        policy.set_sampler(pa.SamplerConfig("flow", 10))


def test_the_cache_package_imports_no_policy_model_or_data():
    import ast
    from pathlib import Path

    forbidden = ("policy_accel.policy", "policy_accel.checkpoint", "policy_accel.models", "policy_accel.data",
                 "policy_accel.calibration", "policy_accel.train", "policy_accel.acceleration", "policy_accel.cli")
    for path in (Path(pa.__file__).parent / "cache").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not [n for n in names if n.startswith(forbidden)], (path.name, names)


def test_library_never_imports_hydra_envs_or_eval():
    code = ("import sys, policy_accel, policy_accel.train, policy_accel.data; "
            "bad = sorted({m.split('.')[0] for m in sys.modules} & {'hydra', 'envs', 'eval'}); print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    # the package face needs only its base dependencies (omegaconf is the command lines' business)
    code = "import sys, policy_accel; print(sorted({m.split('.')[0] for m in sys.modules} & {'omegaconf', 'zarr'}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@register_family("tiny_guided_test")
class PolicyGuidedDiT(TinyGuidedDiT):
    """The contract suite's guided flow DiT as a policy family (flattened observation history as condition)."""

    @classmethod
    def config_for(cls, obs_dim, action_dim, horizon, n_obs_steps, arch):
        return dict(action_dim=action_dim, cond_dim=obs_dim * n_obs_steps, **arch)

    def __init__(self, config):
        super().__init__(**config)

    def prepare(self, cond, timesteps=None):
        return super().prepare(cond.flatten(1))


def test_a_second_family_with_guidance_runs_through_the_policy_and_trains_on_its_own_target():
    torch.manual_seed(0)
    cfg = pa.PolicyConfig(obs_dim=OBS_DIM, action_dim=ACT_DIM, horizon=H, n_obs_steps=TO, n_action_steps=TA,
                          model_type="tiny_guided_test", model=dict(width=16, depth=2),
                          sampler=pa.SamplerConfig("flow", 6), guidance_scale=1.5)
    policy = pa.Policy(cfg)
    policy.fit_normalizers(np.random.default_rng(0).uniform(-2, 2, (50, OBS_DIM)),
                           np.random.default_rng(1).uniform(-1, 1, (50, ACT_DIM)))
    with pytest.raises(ValueError, match="predicts velocity"):
        policy.set_sampler(pa.SamplerConfig("ddim", 5))
    ref = policy.predict_action_chunk(OBS)
    pa.accelerate(policy, pa.UniformConfig(interval=3))  # steps 0, 3 compute, for each guidance branch
    policy.predict_action_chunk(OBS)
    assert all((b.computed, b.skipped) == (2 * 2, 2 * 4) for b in pa.cache_stats(policy).blocks.values())
    pa.remove_acceleration(policy)
    policy.seed(0)
    first = policy.predict_action_chunk(OBS)
    policy.seed(0)
    assert np.array_equal(policy.predict_action_chunk(OBS), first) and first.shape == ref.shape
    # flow matching: x_t = t * noise + (1 - t) * x0, target noise - x0, t ~ U(0, 1), drawn in this order
    obs, action = torch.randn(4, TO, OBS_DIM), torch.rand(4, H, ACT_DIM) * 2 - 1
    torch.manual_seed(7)
    loss = policy.compute_loss(obs, action)
    torch.manual_seed(7)
    x0 = policy.action_normalizer.normalize(action)
    noise, t = torch.randn_like(x0), torch.rand(4)
    xt = t[:, None, None] * noise + (1 - t[:, None, None]) * x0
    cond = policy.obs_normalizer.normalize(obs)
    expected = torch.nn.functional.mse_loss(policy.model(xt, t, policy.model.prepare(cond)), noise - x0)
    torch.testing.assert_close(loss, expected)
