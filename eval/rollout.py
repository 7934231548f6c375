"""Closed-loop evaluation: task success and control-loop latency of one policy, per method.

    python eval/rollout.py                      # configs/rollout.yaml: Lift, shipped checkpoint, six methods
    python eval/rollout.py policy=can method=uniform5@ddim10 episodes=100
    python eval/rollout.py policy=can episodes=100 'methods=[uncached,ddim10,bac10]'
    python eval/rollout.py -m method=ddim2,ddim10,uniform5@ddim10   # hydra multirun: one job per method

Every method runs on the same test seeds (`seed`, `seed + 1`, ...; demos use seeds from 0). Success:
episodes run in lockstep batches of up to `num_envs` (a gymnasium SyncVectorEnv, batched inference),
success = task success at any step. Latency: one chunk at batch 1 (observation history in -> actions
out) on the same recorded observations and noise for every method, timed in interleaved rounds in
this process (eval/bench_denoiser.time_methods). Method strings: policy_accel/recipes.py.
Prints a table; writes a JSON summary.

    python eval/rollout.py policy=lift method=ddim10 async_loop=true num_envs=1       # robot keeps moving
    python eval/rollout.py policy=lift method=ddim10 async_loop=true inference_delay_ms=150

async_loop=true runs the episodes with the asynchronous control loop (eval/async_loop.py): inference
in a background thread while the env keeps stepping at control_hz, either in real time or with a
fixed injected delay. Latency is still timed at batch 1, synchronously.
"""

import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python eval/rollout.py` from the repo root

import envs  # noqa: E402
import policy_accel as pa  # noqa: E402
from eval.async_loop import AsyncRunner  # noqa: E402
from eval.bench_denoiser import time_methods  # noqa: E402
from eval.cli import hydra_app  # noqa: E402
from eval.methods import apply_method, parse_method  # noqa: E402
from policy_accel.jsonfile import write_json  # noqa: E402


@dataclass
class RolloutConfig:
    checkpoint: str = "checkpoints/lift_dp_t"
    methods: list[str] = field(default_factory=lambda: ["uncached", "ddim10"])  # configs/rollout.yaml: make rollout's
    method: str | None = None  # one method string instead of `methods` (hydra multirun: -m method=a,b,c)
    episodes: int = 20
    seed: int = 100000  # first test seed
    num_envs: int = 20  # envs stepped in lockstep (batched inference)
    latency_rounds: int = 5  # batch-1 timing in interleaved rounds over the methods ...
    latency_repeats: int = 6  # ... of this many chunks each (rounds x repeats chunks per method)
    latency_warmup: int = 2
    num_threads: int = 2  # torch threads (the sweep times latency with 1 per task)
    device: str = "cpu"
    out: str | None = None  # default outputs/rollout_<task>.json (not committed)
    progress: bool = True
    async_loop: bool = False  # inference in a background thread while the env keeps stepping (eval/async_loop.py)
    control_hz: float = 20.0  # the async loop's control rate (robosuite tasks run at 20 Hz)
    inference_delay_ms: float | None = None  # async loop: a fixed injected delay instead of the real one
    latency: bool = True  # false: success only, no batch-1 timing (e.g. beside other work, or an injected delay)

    def __post_init__(self):
        for name in ("episodes", "num_envs", "latency_rounds", "latency_repeats", "num_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.inference_delay_ms is not None and (not self.async_loop or self.inference_delay_ms < 0):
            raise ValueError(f"inference_delay_ms={self.inference_delay_ms} needs async_loop=true and a value >= 0")
        if not self.control_hz > 0:
            raise ValueError(f"control_hz must be > 0, got {self.control_hz}")
        if self.method is not None:
            self.methods = [self.method]
        if not self.methods:
            raise ValueError("methods is empty")
        for spec in self.methods:
            parse_method(spec)  # fail on a typo before any work


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


class HoldAfterSuccess(gym.Wrapper):
    """Once an episode is over (success, termination or truncation) the env stops simulating and
    repeats its last observation, end flags cleared so that a vector env without autoreset keeps
    stepping it; run_batch remembers which envs are done. Success counts at any step, so in a
    lockstep batch the envs that are done cost no physics steps while the others finish."""

    def reset(self, **kwargs):
        self._held = None
        return self.env.reset(**kwargs)

    def step(self, action):
        if self._held is not None:
            return self._held
        obs, reward, terminated, truncated, info = self.env.step(action)
        if info["success"] or terminated or truncated:
            self._held = obs, 0.0, False, False, info
        return obs, reward, terminated, truncated, info


def make_vector_env(spec: dict, num_envs: int) -> gym.vector.SyncVectorEnv:
    # no autoreset: every env starts together from its own seed and is truncated at the same horizon
    return gym.vector.SyncVectorEnv([lambda: HoldAfterSuccess(envs.make_env_from_spec(spec))] * num_envs,
                                    autoreset_mode=gym.vector.AutoresetMode.DISABLED)


def run_batch(policy, venv, seeds: list[int], record: list | None = None) -> np.ndarray:
    """One lockstep batch of episodes; returns success per env. Appends the observation histories
    (n_obs_steps, obs_dim) of the unfinished envs at chunk boundaries to `record` when given."""
    To, Ta = policy.config.n_obs_steps, policy.config.n_action_steps
    obs, _ = venv.reset(seed=seeds)
    policy.reset()
    policy.seed(seeds[0])  # a batch's sampling noise depends on its seeds only
    history = [obs] * To
    success = np.zeros(len(seeds), dtype=bool)
    done = np.zeros(len(seeds), dtype=bool)
    for t in range(10**6):
        if record is not None and t % Ta == 0:
            record.extend(np.stack(history, axis=1)[~done])
        action = policy.select_action(obs, done=done)  # finished envs cost no denoising
        obs, _, terminated, truncated, info = venv.step(action)
        history = history[1:] + [obs]
        success |= info["success"]
        done |= success | terminated | truncated
        if done.all():
            return success
    raise RuntimeError("env never truncated")


def run_success(policy, venv, seeds: list[int], desc: str, progress: bool, record: list | None = None,
                runner=run_batch) -> list[int]:
    """Successful seeds among `seeds`, run in batches of venv.num_envs (the last batch padded) by `runner`
    (run_batch, or eval/async_loop.AsyncRunner)."""
    n = venv.num_envs
    wins = []
    with tqdm(total=len(seeds), desc=desc, unit="ep", disable=not progress, leave=False) as bar:
        for i in range(0, len(seeds), n):
            batch = seeds[i:i + n]
            padded = batch + [seeds[-1] + 1 + j for j in range(n - len(batch))]
            success = runner(policy, venv, padded, record)[:len(batch)]
            wins += [s for s, ok in zip(batch, success, strict=True) if ok]
            bar.update(len(batch))
            bar.set_postfix(success=f"{len(wins)}/{bar.n}")
    return wins


def machine() -> dict:
    """Where latency was timed; the load average (taken right after timing, the timer itself counts 1)
    shows whether anything else was running."""
    return {"host": platform.node(), "cpu": platform.processor() or platform.machine(), "cpu_model": cpu_model(),
            "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "load_avg_1m": os.getloadavg()[0]}


def cpu_model() -> str:
    """The CPU's model name and its widest vector ISA (Linux; a VM may hide the model), so that tables
    timed on different machines are not compared."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    name = next((x.split(":", 1)[1].strip() for x in info.splitlines() if x.startswith("model name")), "unknown")
    flags = set(next((x.split(":", 1)[1].split() for x in info.splitlines() if x.startswith("flags")), []))
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} ({', '.join(isa) or 'no avx2'})"


def success_row(policy, venv, method, seeds: list[int], checkpoint, progress: bool = False,
                record: list | None = None, runner=run_batch) -> dict:
    """Apply `method`, run `seeds`, take the method off; the result row's success fields (and an async
    runner's loop counts)."""
    remover = apply_method(policy, method, checkpoint)
    start = time.perf_counter()
    try:
        wins = run_success(policy, venv, seeds, method.spec, progress, record, runner)
    finally:
        if remover:
            remover.remove()
    low, high = wilson_interval(len(wins), len(seeds))
    loop = {"async_loop": dict(runner.stats)} if hasattr(runner, "stats") else {}
    env = venv.envs[0].unwrapped
    return {"policy": Path(checkpoint).name, "task": env.name, "method": method.name,
            "setting": method.spec, "n_episodes": len(seeds), "successes": len(wins),
            "success_rate": len(wins) / len(seeds), "ci_low": low, "ci_high": high,
            "failed_seeds": sorted(set(seeds) - set(wins)), "success_wall_s": time.perf_counter() - start,
            **per_task(env, seeds, wins), **loop}


def per_task(env, seeds: list[int], wins: list[int]) -> dict:
    """On a multi-task set (MT10): {"per_task": {task: [successes, episodes]}}, the task of each seed as the
    env runs it; {} on a single task."""
    if len(getattr(env, "tasks", [])) < 2:
        return {}
    counts = {t: [0, 0] for t in env.tasks}
    won = set(wins)
    for s in seeds:
        c = counts[env.tasks[env.task_index_of_seed(s)]]
        c[0] += s in won
        c[1] += 1
    return {"per_task": counts}


def latency_fields(policy, methods: list, checkpoint, histories: list[np.ndarray], rounds: int, repeats: int,
                   warmup: int, progress: bool = False) -> dict[str, dict]:
    """Per method spec: batch-1 latency percentiles (ms), control frequency and FLOPs per chunk, and the
    per-chunk prefix (the same for every method: no cache touches it) with the loop's share of the p50."""
    prefix: list[float] = []
    times, flops = time_methods(policy, methods, checkpoint, histories, rounds, repeats, warmup, progress,
                                prefix=prefix)
    prefix_p50 = 1e3 * float(np.median(prefix))
    out = {}
    for m in methods:
        ms = 1e3 * np.array(times[m.spec])
        p50 = float(np.median(ms))
        out[m.spec] = dict(latency_ms_p50=p50, latency_ms_p95=float(np.percentile(ms, 95)),
                           latency_ms_p99=float(np.percentile(ms, 99)), latency_ms_max=float(ms.max()),
                           control_hz=policy.config.n_action_steps / (p50 / 1e3), latency_chunks=len(ms),
                           flops_per_chunk=flops[m.spec], prefix_ms_p50=prefix_p50, loop_ms_p50=p50 - prefix_p50)
    return out


def add_ratios(rows: list[dict]) -> None:
    """speedup (whole chunk), loop_speedup (the chunk without its prefix) and flops_ratio relative to the
    uncached row of the same run (None without one)."""
    base = next((r for r in rows if r["setting"] == "uncached"), None)
    for r in rows:
        r["speedup"] = base["latency_ms_p50"] / r["latency_ms_p50"] if base else None
        loops = base and "loop_ms_p50" in base and "loop_ms_p50" in r and r["loop_ms_p50"] > 0
        r["loop_speedup"] = base["loop_ms_p50"] / r["loop_ms_p50"] if loops else None
        r["flops_ratio"] = r["flops_per_chunk"] / base["flops_per_chunk"] if base else None


def pick_histories(recorded: list[np.ndarray], n: int) -> list[np.ndarray]:
    """n recorded histories spread over the recording, each shaped (1, n_obs_steps, obs_dim)."""
    return [h[None] for h in recorded[:: max(1, len(recorded) // n)][:n]]


def evaluate(cfg: RolloutConfig) -> dict:
    torch.set_num_threads(cfg.num_threads)
    if not Path(cfg.checkpoint).is_dir():
        raise FileNotFoundError(f"no checkpoint directory {cfg.checkpoint}; train one with "
                                f"`python eval/train.py env=<task>` (see README)")
    policy = pa.load_policy(cfg.checkpoint, device=cfg.device)
    spec = policy.config.info.get("env_spec")
    if not spec:
        raise ValueError(f"{cfg.checkpoint}: config.json has no info.env_spec; cannot tell which env to run")
    methods = [parse_method(m) for m in cfg.methods]
    seeds = list(range(cfg.seed, cfg.seed + cfg.episodes))
    n_batches = math.ceil(cfg.episodes / cfg.num_envs)
    venv = make_vector_env(spec, math.ceil(cfg.episodes / n_batches))
    recorded: list[np.ndarray] = []
    rows = []
    for i, m in enumerate(methods):
        runner = AsyncRunner(cfg.control_hz, cfg.inference_delay_ms) if cfg.async_loop else run_batch
        rows.append(success_row(policy, venv, m, seeds, cfg.checkpoint, cfg.progress, recorded if i == 0 else None,
                                runner))
        r = rows[-1]
        print(f"{spec['name']} {m.spec}: {r['successes']}/{r['n_episodes']} in {r['success_wall_s']:.0f} s", flush=True)
    venv.close()
    if cfg.latency:
        histories = pick_histories(recorded, cfg.latency_rounds * cfg.latency_repeats)
        latency = latency_fields(policy, methods, cfg.checkpoint, histories, cfg.latency_rounds,
                                 cfg.latency_repeats, cfg.latency_warmup, cfg.progress)
        for row in rows:
            row.update(latency[row["setting"]])
        add_ratios(rows)
    return {"checkpoint": cfg.checkpoint, "checkpoint_hash": policy.checkpoint_hash, "task": spec["name"],
            "seeds": [seeds[0], seeds[-1]], "machine": machine(), "config": asdict(cfg), "results": rows}


def format_table(rows: list[dict]) -> str:
    def ratio(x):
        return "-" if x is None else f"{x:.2f}"

    if any("latency_ms_p50" not in r for r in rows):  # latency=false: success only
        return "\n".join(f"{r['setting']:<22}{r['successes']:>6}/{r['n_episodes']:<3}{r['success_rate']:>6.0%}"
                         f"  [{r['ci_low']:.2f}, {r['ci_high']:.2f}]" for r in rows) + per_task_table(rows)

    head = (f"{'method':<22}{'success':>10}{'rate':>6}{'95% CI':>14}{'p50 ms':>9}{'p95':>8}{'p99':>8}{'max':>8}"
            f"{'ctrl Hz':>9}{'speedup':>9}{'FLOPs':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        ci = f"[{r['ci_low']:.2f}, {r['ci_high']:.2f}]"
        lines.append(f"{r['setting']:<22}{r['successes']:>6}/{r['n_episodes']:<3}{r['success_rate']:>6.0%}{ci:>14}"
                     f"{r['latency_ms_p50']:>9.1f}{r['latency_ms_p95']:>8.1f}{r['latency_ms_p99']:>8.1f}"
                     f"{r['latency_ms_max']:>8.1f}{r['control_hz']:>9.1f}{ratio(r['speedup']):>9}"
                     f"{ratio(r['flops_ratio']):>7}")
    return "\n".join(lines) + per_task_table(rows)


def per_task_table(rows: list[dict]) -> str:
    """Success per task and method on a multi-task set ("" otherwise)."""
    rows = [r for r in rows if "per_task" in r]
    if not rows:
        return ""
    lines = ["", f"{'task':<26}" + "".join(f"{r['setting'][:24]:>25}" for r in rows)]
    for task in rows[0]["per_task"]:
        cells = ("{}/{}".format(*r["per_task"][task]) for r in rows)
        lines.append(f"{task:<26}" + "".join(f"{c:>25}" for c in cells))
    return "\n".join(lines)


@hydra_app(RolloutConfig, "rollout")
def main(cfg: RolloutConfig) -> dict:
    summary = evaluate(cfg)
    tag = (f"_{cfg.method}" if cfg.method else "") + ("_async" if cfg.async_loop else "")
    tag += f"_delay{cfg.inference_delay_ms:g}ms" if cfg.inference_delay_ms is not None else ""
    out = Path(cfg.out or f"outputs/rollout_{summary['task']}{tag}.json")
    write_json(out, summary)
    m = summary["machine"]
    timing = f"latency at batch 1 on {m['cpu']}" if cfg.latency else "success only (latency=false)"
    print(f"{summary['task']}: {cfg.checkpoint}, seeds {summary['seeds'][0]}..{summary['seeds'][1]}, "
          f"{timing} ({m['threads']} thread(s), torch {m['torch']})")
    print(format_table(summary["results"]))
    print(f"wrote {out}")
    return summary


if __name__ == "__main__":
    main()
