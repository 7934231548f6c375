"""Is process memory flat over a long control loop? Many select_action calls across many reset()s.

    python eval/memory_check.py checkpoint=checkpoints/lift_dp_t calls=10000 method=taylorseer2o2@ddim10

Observations come from the checkpoint's env (a few real resets, then replayed) so that the loop
measures the policy, not the simulator. Prints resident memory (RSS) every `report_every` calls and
the growth from the first report (after warm-up) to the last.
"""

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python eval/memory_check.py` from the root

import envs  # noqa: E402
import policy_accel as pa  # noqa: E402
from eval.cli import hydra_app  # noqa: E402
from eval.methods import apply_method, parse_method  # noqa: E402


@dataclass
class MemoryConfig:
    checkpoint: str = "checkpoints/lift_dp_t"
    method: str = "ddim10"  # any eval/methods.py string; a cached one also checks the cache frees its state
    calls: int = 10_000
    reset_every: int = 200  # select_action calls per episode
    report_every: int = 1000
    num_threads: int = 1


@hydra_app(MemoryConfig, "memory_check")
def main(cfg: MemoryConfig) -> dict:
    torch.set_num_threads(cfg.num_threads)
    policy = pa.load_policy(cfg.checkpoint)
    apply_method(policy, parse_method(cfg.method), cfg.checkpoint)
    env = envs.make_env_from_spec(policy.config.info["env_spec"])
    starts = [env.reset(seed=100000 + i)[0] for i in range(4)]
    env.close()
    rng = np.random.default_rng(0)
    process = psutil.Process()
    rss = {}
    for i in tqdm(range(cfg.calls), desc="select_action", unit="call"):
        if i % cfg.reset_every == 0:
            policy.reset()
        obs = starts[i % len(starts)] + rng.normal(0, 0.01, starts[0].shape).astype(np.float32)
        policy.select_action(obs)
        if (i + 1) % cfg.report_every == 0:
            rss[i + 1] = process.memory_info().rss / 2**20
    first, last = rss[min(rss)], rss[max(rss)]
    for calls, mb in rss.items():
        print(f"after {calls:>6} calls: RSS {mb:8.1f} MiB")
    print(f"{cfg.method}: RSS growth from call {min(rss)} to {max(rss)}: {last - first:+.1f} MiB "
          f"({cfg.calls} select_action calls, reset every {cfg.reset_every})")
    return {"rss_mib": rss, "growth_mib": last - first}


if __name__ == "__main__":
    main()
