"""Does the instruction decide what a multi-task policy does? Run each task told its own instruction and
told another task's, and count the task's own success.

    python eval/swap_instructions.py policy=mt10_flow_expert
    python eval/swap_instructions.py policy=mt10_action_dit episodes=50 \
        'pairs=[[drawer-open-v3,drawer-close-v3],[window-open-v3,window-close-v3]]' method=uncached

Each pair (a, b) runs a's test episodes told a's instruction, then told b's, and the same for b. The
scene is the task's own (a drawer-open episode starts with the drawer shut), so a policy that reads the
scene and ignores the instruction keeps succeeding when told the other task; one that follows the
instruction fails. MiniLM puts "open the drawer" and "close the drawer" at cosine 0.905, which is why
these pairs are the test. Same test seeds as eval/rollout.py (seed mod 10 is the MT10 task).
"""

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python eval/swap_instructions.py` from the root

import policy_accel as pa  # noqa: E402
from eval import rollout  # noqa: E402
from eval.cli import hydra_app  # noqa: E402
from eval.methods import parse_method  # noqa: E402
from policy_accel.jsonfile import write_json  # noqa: E402


@dataclass
class SwapConfig:
    checkpoint: str = "checkpoints/mt10_flow_expert"
    pairs: list[list[str]] = field(default_factory=lambda: [["drawer-open-v3", "drawer-close-v3"],
                                                             ["window-open-v3", "window-close-v3"]])
    episodes: int = 50  # per task and instruction
    method: str = "uncached"
    seed: int = 100000  # first test seed
    num_envs: int = 25
    num_threads: int = 1
    device: str = "cpu"
    out: str | None = None  # JSON; default outputs/swap_instructions_<policy>.json
    progress: bool = True

    def __post_init__(self):
        for name in ("episodes", "num_envs", "num_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for pair in self.pairs:
            if len(pair) != 2 or pair[0] == pair[1]:
                raise ValueError(f"each pair names two different tasks, got {pair}")
        parse_method(self.method)


def task_seeds(env, task: str, first: int, n: int) -> list[int]:
    """The first n test seeds from `first` on which a seeded reset runs `task`."""
    if task not in env.tasks:
        raise ValueError(f"task {task!r} is not in {env.name}: {env.tasks}")
    k = env.tasks.index(task)
    return [s for s in range(first, first + n * len(env.tasks) * 2) if env.task_index_of_seed(s) == k][:n]


def format_table(rows: list[dict]) -> str:
    lines = ["| task | told | success |", "|---|---|---|"]
    lines += [f"| {r['task']} | {r['told']!r}{' (its own)' if r['own'] else ''} | {r['successes']}/{r['n_episodes']} |"
              for r in rows]
    return "\n".join(lines)


@hydra_app(SwapConfig, "swap_instructions")
def main(cfg: SwapConfig) -> dict:
    torch.set_num_threads(cfg.num_threads)
    policy = pa.load_policy(cfg.checkpoint, device=cfg.device)
    spec = policy.config.info.get("env_spec", {})
    if "instruction_table" not in spec or len(spec.get("tasks", [])) < 2:
        raise SystemExit(f"{cfg.checkpoint}: not a multi-task policy told its task by instruction")
    venv = rollout.make_vector_env(spec, min(cfg.num_envs, cfg.episodes))
    env = venv.envs[0].unwrapped
    method = parse_method(cfg.method)
    rows = []
    for a, b in cfg.pairs:
        for task, other in ((a, b), (b, a)):
            seeds = task_seeds(env, task, cfg.seed, cfg.episodes)
            for told_task in (task, other):
                told = {env.instructions[env.tasks.index(task)]: env.instructions[env.tasks.index(told_task)]}
                for e in venv.envs:
                    e.set_wrapper_attr("told", told)
                row = rollout.success_row(policy, venv, method, seeds, cfg.checkpoint, cfg.progress)
                rows.append({**row, "task": task, "told": next(iter(told.values())), "own": told_task == task})
                print(f"{task} told {rows[-1]['told']!r}: {row['successes']}/{row['n_episodes']}", flush=True)
    for e in venv.envs:
        e.set_wrapper_attr("told", {})
    venv.close()
    result = {"checkpoint": cfg.checkpoint, "checkpoint_hash": policy.checkpoint_hash, "config": asdict(cfg),
              "results": rows}
    print(format_table(rows))
    out = Path(cfg.out or f"outputs/swap_instructions_{Path(cfg.checkpoint).name}.json")
    write_json(out, result)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
