"""eval/rollout.py and eval/methods.py on push2d with tiny policies; calibrate CLI on a tiny dataset."""

import json
import math

import numpy as np
import pytest
import torch

import envs
import policy_accel as pa
from eval import bench_denoiser, fidelity, rollout
from eval.calibrate import main as calibrate_cli
from eval.methods import apply_method, parse_method
from tests.test_train import write_zarr


def tiny_checkpoint(path, env_name="push2d", horizon=40, dataset=None):
    env = envs.make_env(env_name, horizon=horizon)
    torch.manual_seed(0)
    cfg = pa.PolicyConfig(obs_dim=env.observation_space.shape[0], action_dim=2, horizon=8, n_obs_steps=2,
                          n_action_steps=4, model=dict(n_layer=2, n_head=2, n_emb=32),
                          sampler=pa.SamplerConfig("ddpm", 20, 20),
                          info={"env": env_name, "env_spec": env.spec_dict(), "dataset": dataset})
    policy = pa.Policy(cfg)
    rng = np.random.default_rng(0)
    policy.fit_normalizers(rng.uniform(-1, 1, (100, cfg.obs_dim)), rng.uniform(-1, 1, (100, 2)))
    return policy.save(path)


class ExpertPolicy:
    """Test double with the Policy surface run_batch uses: one push2d expert per env (success ~100%)."""

    class config:
        n_obs_steps, n_action_steps = 2, 4

    def __init__(self, n):
        self.experts = [envs.make_expert("push2d", envs.make_env("push2d"), seed=i) for i in range(n)]

    def reset(self):
        for i, e in enumerate(self.experts):
            e.reset(seed=i)

    def seed(self, seed):
        self.done_seen = []

    def select_action(self, obs, done=None):
        self.done_seen.append(done.copy())
        return np.stack([e.act(o) for e, o in zip(self.experts, obs, strict=True)])


class IdlePolicy(ExpertPolicy):
    def select_action(self, obs, done=None):
        return np.zeros((len(obs), 2), np.float32)


def test_wilson_interval_known_values():
    assert rollout.wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    low, high = rollout.wilson_interval(0, 10)
    assert low == 0 and high == pytest.approx(0.2775, abs=1e-4)
    assert rollout.wilson_interval(100, 100)[0] == pytest.approx(0.9630, abs=1e-4)


def test_success_counting_batches_padding_and_recorded_histories():
    spec = envs.make_env("push2d").spec_dict()
    venv = rollout.make_vector_env(spec, 3)
    seeds = list(range(100000, 100007))  # 3 batches of 3, the last padded with 2 extra seeds
    record = []
    wins = rollout.run_success(ExpertPolicy(3), venv, seeds, "expert", progress=False, record=record)
    assert wins == seeds
    assert record and all(h.shape == (2, 6) for h in record)
    assert rollout.run_success(IdlePolicy(3), venv, seeds, "idle", progress=False) == []
    venv.close()


class HalfExpertPolicy(ExpertPolicy):
    """The expert drives the even envs; the odd ones stand still and fail."""

    def select_action(self, obs, done=None):
        actions = super().select_action(obs, done)
        actions[1::2] = 0
        return actions


def test_multi_task_rows_break_success_down_by_the_task_each_seed_runs():
    from eval.rollout import per_task

    mt10 = envs.make_env("mt10", task_onehot=False)
    seeds = list(range(100000, 100020))  # seed mod 10: two episodes of every task
    counts = per_task(mt10, seeds, wins=[100000, 100010, 100003])
    assert counts == {"per_task": {t: [{0: 2, 3: 1}.get(i, 0), 2] for i, t in enumerate(mt10.tasks)}}
    assert mt10.reset(seed=100003)[1]["task"] == mt10.tasks[3]  # what the env really runs
    assert per_task(envs.make_env("push2d"), seeds, [100000]) == {}


def test_envs_hold_after_success_and_mixed_batches_finish():
    spec = envs.make_env("push2d").spec_dict()
    venv = rollout.make_vector_env(spec, 4)
    seeds = [100000 + i for i in range(4)]
    record = []
    policy = HalfExpertPolicy(4)
    success = rollout.run_batch(policy, venv, seeds, record)
    assert success.tolist() == [True, False, True, False]
    assert not policy.done_seen[0].any() and policy.done_seen[-1].tolist() == [True, False, True, False]
    inner = [env.unwrapped for env in venv.envs]
    assert inner[1]._t == inner[1].horizon and inner[0]._t < inner[0].horizon  # no physics after success
    assert len(record) < 4 * math.ceil(inner[1].horizon / 4)  # finished envs stop being recorded
    held = venv.envs[0]
    before = held.unwrapped._t
    obs, reward, terminated, truncated, info = held.step(np.ones(2, np.float32))
    assert held.unwrapped._t == before and info["success"] and not (terminated or truncated)
    venv.close()


def test_method_strings_parse_and_reject_typos():
    m = parse_method("bac_taylor10o2nb@ddim20")
    params = {"budget": 10, "calls": None, "order": 2, "nb": True, "f": False}
    assert (m.family, m.params, m.base_steps) == ("bac_taylor", params, 20)
    assert parse_method("taylorseer4o1").params == {"interval": 4, "order": 1, "warmup": None}
    # w<N>: TaylorSeer's full steps before its refresh grid; without it, each config's own default
    for spec, cls, warmup in [("taylorseer4o1", pa.TaylorSeerConfig, 1), ("taylorseer4o1w0", pa.TaylorSeerConfig, 0),
                              ("diffusers_taylorseer4o2", pa.DiffusersTaylorSeerConfig, 3),
                              ("diffusers_taylorseer4o2w2@ddim20", pa.DiffusersTaylorSeerConfig, 2)]:
        m = parse_method(spec)
        config = m.recipe.build(m.params, None, False)
        assert type(config) is cls and (config.interval, config.warmup) == (4, warmup)
    m = parse_method("diffusers_taylorseer4o1w0")
    with pytest.raises(ValueError, match="warmup >= 1"):
        m.recipe.build(m.params, None, False)
    assert parse_method("diffusers_fbc0.05@ddim20").params == {"threshold": 0.05}
    assert parse_method("diffusers_magcache0.2k9").params == {"threshold": 0.2, "max_skip": 9, "retention": None}
    for bad in ("bac", "ddim", "fast", "ddim10@ddim20", "uniform4@ddpm50", "diffusers_fbc5"):
        with pytest.raises(ValueError, match=bad.split("@")[0] if bad not in ("fast", "diffusers_fbc5")
                           else "unknown method"):
            parse_method(bad)


def test_rollout_end_to_end_on_push2d_writes_summary(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "push2d_tiny")
    out = tmp_path / "summary.json"
    summary = rollout.main([f"checkpoint={ckpt}", "episodes=5", "num_envs=3", "latency_rounds=2", "latency_repeats=2",
                            "methods=[uncached,ddim5,every_step,uniform4,taylorseer3o1]", f"out={out}",
                            "progress=false"])
    assert json.loads(out.read_text()) == summary
    rows = summary["results"]
    assert [r["setting"] for r in rows] == ["uncached", "ddim5", "every_step", "uniform4", "taylorseer3o1"]
    for r in rows:
        assert r["n_episodes"] == 5 and 0 <= r["successes"] <= 5
        assert r["ci_low"] <= r["success_rate"] <= r["ci_high"]
        assert r["latency_ms_p50"] <= r["latency_ms_p95"] <= r["latency_ms_p99"] <= r["latency_ms_max"]
        assert math.isclose(r["control_hz"], 4 / (r["latency_ms_p50"] / 1e3))
        assert 0 < r["prefix_ms_p50"] == rows[0]["prefix_ms_p50"]  # timed once per round, no method attached
        assert math.isclose(r["loop_ms_p50"], r["latency_ms_p50"] - r["prefix_ms_p50"])
        assert math.isclose(r["loop_speedup"], rows[0]["loop_ms_p50"] / r["loop_ms_p50"])
    by = {r["setting"]: r for r in rows}
    assert by["uncached"]["flops_ratio"] == 1.0
    assert by["ddim5"]["flops_ratio"] == pytest.approx(5 / 20, rel=0.02)
    assert by["uniform4"]["flops_ratio"] < 0.5
    # computing every block through the hooks changes no output, so the same seeds give the same episodes
    assert by["every_step"]["failed_seeds"] == by["uncached"]["failed_seeds"]

    from eval import card

    (tmp_path / "run").mkdir()
    log = [{"step": 50, "sec_per_step": 36.0}, {"step": 100, "sec_per_step": 36.0}]  # 1 h in all
    (tmp_path / "run" / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    blocks = {f"b{i}": [0, 5] for i in range(3)} | {"b3": [0, 2, 5, 9]}  # 10 of 80 block-steps
    pa.Schedule(blocks, 20, "ddpm", budget=2, calibration={"description": "4 obs", "mean_jaccard_to_aggregate": 0.5}
                ).save(ckpt / "schedules" / "bac_s2_b0_ddpm20.json")
    (ckpt / "schedules" / "magcache_ddpm20.json").write_text("{}")  # not a BAC schedule: listed, not parsed
    text = card.main([f"checkpoint={ckpt}", f"run_dir={tmp_path / 'run'}", f"rollout={out}"]).read_text()
    u = by["uncached"]
    assert f"| uncached | {u['successes']}/5 | [{u['ci_low']:.2f}, {u['ci_high']:.2f}]" in text and "1.0 h" in text
    assert "| `schedules/bac_s2_b0_ddpm20.json` | DDPM-20 | 2 | 0 | reuse (cosine) | 12.5% | 0.50 |" in text
    assert "`schedules/magcache_ddpm20.json`" in text
    assert "steps 0-" not in text  # one stretch: nothing to say
    assert "DP-T diffusion policy (dp_t) for `push2d`" in text and "Per task" not in text
    multi = [dict(setting=m, per_task={"reach-v3": [3, 5], "push-v3": [k, 5]})
             for m, k in (("uncached", 1), ("flow2", 0))]
    assert card.per_task_lines(multi)[-3:] == ["|---|---|---|", "| reach-v3 | 3/5 | 3/5 |", "| push-v3 | 1/5 | 0/5 |"]
    two = {"train_steps": 200, "train_segments": [{"from_step": 0, "steps": 100, "precision": "fp32"},
                                                  {"from_step": 100, "steps": 200, "precision": "bf16"}]}
    assert card._history_lines(two)[-2:] == ["| 0-100 | cosine over 100 | fp32 | - | - | `-` | - |",
                                             "| 100-200 | cosine over 200 | bf16 | - | - | `-` | - |"]
    warm = [{"from_step": 0, "steps": 0, "precision": "-", "init_from": "ck", "init_train_steps": 50,
             "history": [{"from_step": 0, "steps": 50, "precision": "fp32", "hours": 0.5, "cpu_hours": 0.25}]},
            {"from_step": 0, "steps": 30, "precision": "bf16"}]
    assert card._history_lines({"train_steps": 80, "train_segments": warm})[-2:] == [
        "| 0-50 | cosine over 50 | fp32 | 0.50 | 0.25 | `-` | - |",  # wall hours, then CPU hours
        "| 50-80 | cosine over 30 | bf16 | - | - | `-` | `ck` (its EMA weights) |"]
    assert card._run_scope({"train_steps": 80, "train_segments": warm}) == " for the last 30 of them"
    assert card._run_scope({"train_steps": 80, "train_segments": warm[1:]}) == ""


def test_rollout_rejects_bad_config(tmp_path):
    with pytest.raises(SystemExit, match="unknown method"):
        rollout.main(["methods=[uncached,fastest]"])
    with pytest.raises(SystemExit, match="episodes must be >= 1"):
        rollout.main(["episodes=0"])
    with pytest.raises(FileNotFoundError, match="config.json"):
        rollout.main([f"checkpoint={tmp_path}", "progress=false"])
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        rollout.main([f"checkpoint={tmp_path / 'nope'}", "progress=false"])


def test_calibrate_cli_writes_schedules_that_methods_load(tmp_path):
    rng = np.random.default_rng(0)
    ends = np.cumsum([30, 25, 40]).astype(np.int64)
    data = write_zarr(tmp_path / "d.zarr", rng.uniform(-1, 1, (95, 6)).astype(np.float32),
                      rng.uniform(-1, 1, (95, 2)).astype(np.float32), ends, {"env": "push2d"})
    ckpt = tiny_checkpoint(tmp_path / "ckpt", dataset=str(data))
    written = calibrate_cli([f"checkpoint={ckpt}", "budget=[4,6]", "bubble_blocks=[0,5]", "observations=10",
                             "num_threads=1"])
    assert sorted(p.name for p in written) == sorted(
        f"bac_s{s}_b{b}_ddpm20.json" for s in (4, 6) for b in (0, 5))
    sched = pa.Schedule.load(ckpt / "schedules" / "bac_s4_b0_ddpm20.json")
    assert sched.calibration["n_observations"] == 10 and all(len(s) == 4 for s in sched.blocks.values())
    policy = pa.load_policy(ckpt)
    obs = np.zeros(6, np.float32)
    for spec in ("bac4", "bac6nb", "bac_taylor4o1"):
        remover = apply_method(policy, parse_method(spec), ckpt)
        policy.reset()
        assert policy.predict_action_chunk(obs).shape == (1, 4, 2)
        remover.remove()
        assert policy.cache is None
    with pytest.raises(FileNotFoundError, match="eval/calibrate.py"):
        apply_method(policy, parse_method("bac7"), ckpt)
    with pytest.raises(FileNotFoundError, match="forecast_order=1"):
        apply_method(policy, parse_method("bac_taylor4o1f"), ckpt)
    written = calibrate_cli([f"checkpoint={ckpt}", "budget=4", "bubble_blocks=0", "observations=4",
                             "forecast_order=1", "num_threads=1"])
    assert [p.name for p in written] == ["bac_s4_b0_ddpm20_f1.json"]
    assert pa.Schedule.load(written[0]).calibration["criterion"] == "order-1 forecast error"
    apply_method(policy, parse_method("bac_taylor4o1nbf"), ckpt).remove()
    with pytest.raises(FileNotFoundError, match="magcache=true sampler=ddim steps=10"):
        apply_method(policy, parse_method("diffusers_magcache0.1@ddim10"), ckpt)
    written = calibrate_cli([f"checkpoint={ckpt}", "magcache=true", "observations=4", "num_threads=1"])
    assert [p.name for p in written] == ["magcache_ddpm20.json"]
    args = [f"checkpoint={ckpt}", "budget=[4,6]", "bubble_blocks=0", "observations=4", "num_threads=1",
            "skip_current=true"]
    assert calibrate_cli(args) == []  # both files exist for these weights
    stale = ckpt / "schedules" / "bac_s6_b0_ddpm20.json"
    stale.write_text(stale.read_text().replace(policy.checkpoint_hash, "0" * len(policy.checkpoint_hash)))
    assert [p.name for p in calibrate_cli(args)] == ["bac_s4_b0_ddpm20.json", "bac_s6_b0_ddpm20.json"]
    assert pa.Schedule.load(stale).checkpoint_hash == policy.checkpoint_hash
    assert calibrate_cli([f"checkpoint={ckpt}", "magcache=true", "skip_current=true"]) == []
    apply_method(policy, parse_method("diffusers_magcache0.1"), ckpt).remove()
    assert policy.clock.listeners == [] and policy.cache is None
    with pytest.raises(ValueError, match="forecast_order"):
        calibrate_cli([f"checkpoint={ckpt}", "budget=4", "forecast_order=2"])
    with pytest.raises(ValueError, match="needs order 1"):
        parse_method("bac_taylor4o2f")

    result = bench_denoiser.main([f"checkpoint={ckpt}", "methods=[uncached,every_step,ddim5,uniform4,bac4nb,"
                                  "diffusers_fbc0.0,diffusers_fbc1000.0]", "observations=2", "rounds=2", "repeats=2",
                                  f"out={tmp_path / 'bench.json'}"])
    rows = {r["setting"]: r for r in result["results"]}
    assert rows["uncached"]["speedup"] == 1.0 and rows["every_step"]["flops_ratio"] == 1.0
    assert rows["ddim5"]["flops_ratio"] == pytest.approx(5 / 20, rel=0.02)
    # bac4nb computes 4 of 20 steps in every block; the embeddings and head still run every step
    assert 0.2 < rows["bac4nb"]["flops_ratio"] < 0.35
    # First Block Cache: threshold 0 never skips; a huge one runs only the first of 2 layers after step 0
    assert rows["diffusers_fbc0.0"]["flops_ratio"] == 1.0
    assert 0.5 < rows["diffusers_fbc1000.0"]["flops_ratio"] < 0.6
    for r in rows.values():
        assert r["achieved_over_ideal"] == pytest.approx(r["speedup"] * r["flops_ratio"])

    result = fidelity.main([f"checkpoint={ckpt}", "methods=[every_step,ddim5,uniform4,bac4nb,uniform2@ddim10]",
                            "observations=6", "num_threads=1", f"out={tmp_path / 'fid.json'}"])
    rows = {r["setting"]: r for r in result["results"]}
    assert (tmp_path / "fid.png").is_file()
    # same initial and per-step DDPM noise for every method: computing every block reproduces uncached exactly
    assert rows["every_step"]["vs_native"] == {"mean_abs": 0.0, "p95_abs": 0.0, "last_dim_sign_flips": 0.0}
    assert rows["ddim5"]["vs_base"]["mean_abs"] == 0.0 < rows["ddim5"]["vs_native"]["mean_abs"]
    assert rows["uniform2@ddim10"]["base"] == "ddim10" and rows["uniform2@ddim10"]["vs_base"]["mean_abs"] > 0
    assert rows["uniform4"]["vs_base"] == rows["uniform4"]["vs_native"] and rows["uniform4"]["vs_base"]["mean_abs"] > 0
    assert rows["ddim5"]["flops_ratio"] == pytest.approx(5 / 20, rel=0.02)
    assert result["sampling_spread"]["mean_abs"] > 0  # a second draw with other noise: not the same actions
    with pytest.raises(SystemExit, match="dataset='nowhere.zarr' does not exist"):
        fidelity.main([f"checkpoint={ckpt}", "methods=[ddim5]", "dataset=nowhere.zarr"])


SUMMARY_FIELDS = {"policy", "task", "method", "setting", "n_episodes", "successes", "success_rate", "ci_low",
                  "ci_high", "latency_ms_p50", "latency_ms_p95", "latency_ms_p99", "speedup", "flops_ratio"}


def test_flops_of_a_threshold_cache_are_averaged_over_the_timed_observations(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    policy = pa.load_policy(ckpt)
    rng = np.random.default_rng(0)
    histories = [rng.uniform(-3, 3, (1, 2, policy.config.obs_dim)).astype(np.float32) for _ in range(6)]
    fbc = parse_method("diffusers_fbc0.3")
    remover = apply_method(policy, fbc, ckpt)
    state = policy.generator.get_state()
    each = [pa.chunk_flops(policy, h, seed=i) for i, h in enumerate(histories)]
    remover.remove()
    assert torch.equal(policy.generator.get_state(), state)  # counting draws no noise from the policy's stream
    assert len(set(each)) > 1  # which layers FBC skips depends on the observation and noise
    _, flops = bench_denoiser.time_methods(policy, [parse_method("uncached"), fbc], ckpt, histories, rounds=1,
                                           repeats=1, warmup=0, progress=False)
    assert flops["diffusers_fbc0.3"] == pytest.approx(np.mean(each))
    assert flops["uncached"] == pa.chunk_flops(policy, histories[0])


def test_memory_check_reports_rss_over_the_loop(tmp_path):
    from eval import memory_check

    ckpt = tiny_checkpoint(tmp_path / "push2d_tiny")
    out = memory_check.main([f"checkpoint={ckpt}", "method=taylorseer4o1", "calls=120", "reset_every=30",
                             "report_every=40"])
    assert sorted(out["rss_mib"]) == [40, 80, 120] and all(v > 0 for v in out["rss_mib"].values())


def test_card_training_hours_counts_each_log_interval_once_across_a_resume(tmp_path):
    from eval.card import training_hours
    steps = [50, 100, 150, 50, 100, 150, 200, 220]  # resumed from the step-0 save after step 150; 20-step tail
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "sec_per_step": 3.6}) + "\n" for s in steps))
    assert training_hours(log) == pytest.approx((7 * 50 + 20) * 3.6 / 3600)
