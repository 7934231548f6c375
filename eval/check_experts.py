"""Measure scripted-expert success per task (clean actions unless noise > 0).

    python eval/check_experts.py ['tasks=[lift,can,square,push2d,push2d_multimodal,mt10]'] [episodes=50] [seed=0]

Prints: task, episodes, successes, success rate, mean length to first success, env steps per second.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python eval/check_experts.py` from the repo root

from envs.check_experts import CheckConfig, check_expert  # noqa: E402
from eval.cli import hydra_app  # noqa: E402


@hydra_app(CheckConfig, "check_experts")
def main(cfg: CheckConfig) -> list[dict]:
    print(f"{'task':<28}{'episodes':>9}{'successes':>10}{'rate':>7}{'mean_len':>9}{'steps/s':>9}", flush=True)
    rows = []
    for task in cfg.tasks:
        r = check_expert(task, cfg.episodes, cfg.seed, cfg.noise)
        rows.append(r)
        print(f"{r['task']:<28}{r['episodes']:>9}{r['successes']:>10}{r['rate']:>7.2f}{r['mean_len']:>9.1f}"
              f"{r['steps_per_s']:>9.0f}", flush=True)
    return rows


if __name__ == "__main__":
    main()
