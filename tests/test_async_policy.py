"""The asynchronous control loop: policy_accel/async_policy.py with a fake policy whose actions name the
step they were planned for, a tiny DP-T policy, and eval/async_loop.py on push2d. No wall-clock times
are asserted: real-time mode is checked on its invariant (each step runs its own action) only."""

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

import envs
import policy_accel as pa
from eval import async_loop, rollout
from policy_accel.async_policy import THREAD_NAME
from tests.conftest import OBS_DIM, make_dp_t_policy
from tests.test_rollout import tiny_checkpoint


class PlannerPolicy:
    """obs = [step]; a chunk requested from the history ending at step s plans action s + i for step s + i."""

    def __init__(self, n_action_steps=4, sleep=0.0, fail_on_request=None):
        self.config = SimpleNamespace(n_obs_steps=2, obs_dim=1, n_action_steps=n_action_steps)
        self.sleep, self.fail_on_request = sleep, fail_on_request
        self.requests = []

    def predict_action_chunk(self, history):
        self.requests.append(int(history[0, -1, 0]))
        if len(self.requests) == self.fail_on_request:
            raise RuntimeError("inference failed")
        time.sleep(self.sleep)
        steps = history[:, -1, :1] + np.arange(self.config.n_action_steps)  # (B, Ta)
        return steps[:, :, None].astype(np.float32)  # (B, Ta, 1)

    def reset(self):
        pass


def inference_threads():
    return [t for t in threading.enumerate() if t.name.startswith(THREAD_NAME)]


@pytest.mark.parametrize("delay", [0, 1, 2, 3, 5])
def test_each_step_executes_the_action_planned_for_it_under_an_injected_delay(delay):
    policy = PlannerPolicy(n_action_steps=4)
    with pa.AsyncPolicy(policy, delay_steps=delay) as agent:
        actions = [float(agent.act(np.array([n], np.float32))[0]) for n in range(40)]
        stats = dict(agent.stats)
    assert actions == list(range(40))  # none skipped, none repeated, each from the right offset
    assert stats["chunks"] <= len(policy.requests) <= stats["chunks"] + 1  # + one pending at the end
    if delay <= 2:  # the chunk (4 actions) outlasts two inferences: only the episode's first step waits
        assert stats["stalls"] == (delay > 0)
        assert policy.requests == list(range(0, 40, 4 - delay))[:len(policy.requests)]
        assert stats["dropped"] == delay * (stats["chunks"] - 1)
    else:  # it does not: the robot waits for chunks, but the timeline holds
        assert stats["stalls"] > 1


def test_a_fixed_delay_is_deterministic_and_zero_delay_is_the_synchronous_policy():
    obs = np.random.default_rng(0).uniform(-2, 2, (30, 2, OBS_DIM)).astype(np.float32)  # a batch of 2 robots

    def run_async(delay):
        policy = make_dp_t_policy()  # DDPM: the noise generator's order matters too
        with pa.AsyncPolicy(policy, delay_steps=delay) as agent:
            agent.reset()
            return np.stack([agent.act(o) for o in obs])

    sync = make_dp_t_policy()
    sync.reset()
    expected = np.stack([sync.select_action(o) for o in obs])
    np.testing.assert_array_equal(run_async(0), expected)
    delayed = run_async(2)
    np.testing.assert_array_equal(run_async(2), delayed)
    assert np.abs(delayed - expected).max() > 1e-3  # planned from older observations: not the same actions


def test_real_time_mode_keeps_the_timeline_with_the_measured_lead():
    policy = PlannerPolicy(n_action_steps=6, sleep=0.002)
    with pa.AsyncPolicy(policy, control_period=0.001) as agent:
        actions = []
        for n in range(60):
            actions.append(float(agent.act(np.array([n], np.float32))[0]))
            time.sleep(0.001)
        assert agent.lead >= 2  # each inference sleeps 2 ms: at least 2 periods of 1 ms
    assert actions == list(range(60))


def test_threads_are_joined_on_close_on_errors_and_on_inference_failure():
    before = inference_threads()
    with pytest.raises(KeyError):
        with pa.AsyncPolicy(PlannerPolicy(), delay_steps=1) as agent:
            agent.act(np.zeros(1, np.float32))
            assert len(inference_threads()) == len(before) + 1
            raise KeyError("the robot loop failed")
    assert inference_threads() == before
    with pa.AsyncPolicy(PlannerPolicy(fail_on_request=2), delay_steps=1) as agent:
        with pytest.raises(RuntimeError, match="inference failed"):
            for n in range(10):
                agent.act(np.array([n], np.float32))
        agent.close()
        agent.close()  # idempotent
        with pytest.raises(RuntimeError, match="not running"):
            agent.act(np.zeros(1, np.float32))
    assert inference_threads() == before


def test_reset_starts_a_new_episode_and_bad_arguments_are_refused():
    policy = PlannerPolicy()
    with pa.AsyncPolicy(policy, delay_steps=2) as agent:
        for n in range(7):
            agent.act(np.array([n], np.float32))
        agent.reset()  # a chunk is pending: it is waited for and dropped
        assert agent.step == 0 and float(agent.act(np.array([100.0], np.float32))[0]) == 100.0
        with pytest.raises(ValueError, match="obs must have shape"):
            agent.act(np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="control_period"):
        pa.AsyncPolicy(policy)
    with pytest.raises(ValueError, match="delay_steps"):
        pa.AsyncPolicy(policy, delay_steps=-1)


def test_paced_env_sleeps_out_the_period_and_counts_overruns(monkeypatch):
    clock = SimpleNamespace(now=0.0, slept=[])

    def sleep(seconds):
        clock.slept.append(round(seconds, 6))
        clock.now += seconds

    monkeypatch.setattr(async_loop, "time", SimpleNamespace(perf_counter=lambda: clock.now, sleep=sleep))
    venv = rollout.make_vector_env(envs.make_env("push2d").spec_dict(), 1)
    paced = async_loop.PacedVectorEnv(venv, period=0.05)
    paced.reset(seed=[0])
    for sim_cost in (0.01, 0.02, 0.08, 0.01):  # the third step overruns the period
        clock.now += sim_cost
        paced.step(np.zeros((1, 2), np.float32))
    assert (paced.steps, paced.overruns) == (4, 1)
    assert clock.slept == [0.04, 0.03, 0.04]  # each step ends one period after the previous one
    assert async_loop.delay_steps(100, 20) == 2 and async_loop.delay_steps(101, 20) == 3
    assert async_loop.delay_steps(0, 20) == 0
    venv.close()


def test_async_runner_at_zero_delay_runs_the_episodes_of_run_batch(tmp_path):
    policy = pa.load_policy(tiny_checkpoint(tmp_path / "ckpt", horizon=30))
    venv = rollout.make_vector_env(policy.config.info["env_spec"], 1)
    seeds = [100000, 100001]
    sync_record, async_record = [], []
    sync = rollout.run_success(policy, venv, seeds, "sync", False, sync_record)
    runner = async_loop.AsyncRunner(inference_delay_ms=0)
    assert rollout.run_success(policy, venv, seeds, "async", False, async_record, runner) == sync
    np.testing.assert_array_equal(np.stack(async_record), np.stack(sync_record))  # the same trajectories
    assert runner.stats["stalls"] == 0 and runner.stats["dropped"] == 0 and runner.stats["chunks"] > 2
    venv.close()


def test_rollout_async_loop_option_end_to_end(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "ckpt", horizon=20)
    summary = rollout.main([f"checkpoint={ckpt}", "episodes=2", "num_envs=2", "latency_rounds=1", "latency_repeats=1",
                            "methods=[ddim5]", "async_loop=true", "inference_delay_ms=120", "progress=false",
                            f"out={tmp_path / 'out.json'}"])
    loop = summary["results"][0]["async_loop"]
    assert loop["steps"] > 0 and loop["chunks"] > 0 and loop["dropped"] > 0 and loop["stalls"] >= 2  # 120 ms: 3 steps
    with pytest.raises(SystemExit, match="needs async_loop=true"):
        rollout.main([f"checkpoint={ckpt}", "inference_delay_ms=50"])
