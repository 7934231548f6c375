"""Write a shipped checkpoint's card.md from what was run: its config, the training log and a rollout.

    python eval/card.py checkpoint=checkpoints/lift_dp_t run_dir=runs/lift_dp_t rollout=eval/results/rollout_lift.json

The rollout JSON (eval/rollout.py, or eval/sweep.py with out=...) must hold an `uncached` row made on
this checkpoint (same hash). For the fp16 weight file of a run still in training (train.py's
snapshot_dir) it writes a card that says so and lists every segment; no rollout needed:

    python eval/card.py checkpoint=checkpoints/can_dp_t/in_training
"""

import json
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python eval/card.py` from the repo root

import policy_accel as pa  # noqa: E402
from eval.cli import hydra_app  # noqa: E402


@dataclass
class CardConfig:
    checkpoint: str = "checkpoints/lift_dp_t"
    run_dir: str = "runs/lift_dp_t"  # where training wrote log.jsonl
    rollout: str = "eval/results/rollout_lift.json"
    train_command: str | None = None  # how it was trained, if not `python eval/train.py env=<env>`


FAMILIES = {"dp_t": "DP-T diffusion policy", "flow_expert": "flow-matching action expert (π0 / π0.5 / SmolVLA style)",
            "action_dit": "action DiT (GR00T / CogACT style)"}


def training_hours(log_path: Path) -> float:
    """Compute time summed over log.jsonl records, each covering the steps since the previous one.
    A resumed run restarts from a save point (a multiple of log_every), so when the step goes back
    the record covers one log interval; steps redone after a restart count, as they cost time."""
    records = [json.loads(x) for x in log_path.read_text().splitlines() if x.strip()]
    log_every = records[0]["step"] if records else 0
    seconds, last = 0.0, 0
    for r in records:
        covered = r["step"] - last
        if not 0 < covered <= log_every:
            covered = log_every
        seconds += r["sec_per_step"] * covered
        last = r["step"]
    return seconds / 3600


def _run_scope(info: dict) -> str:
    """After a warm start the run's log covers only the steps after the checkpoint it started from."""
    init = [s for s in info.get("train_segments") or [] if "init_from" in s]
    return f" for the last {info['train_steps'] - init[0]['init_train_steps']} of them" if init else ""


def flat_segments(segments: list[dict], end_step: int) -> list[dict]:
    """Every stretch of training behind a checkpoint, oldest first, with global step ranges; the
    history of warm starts (init_from) is unrolled."""
    init = next((s for s in segments if "init_from" in s), None)
    offset = init["init_train_steps"] if init else 0
    rows = flat_segments(init.get("history") or [], offset) if init else []
    runs = [s for s in segments if "init_from" not in s]
    if not runs:  # a warm start's source that recorded no segments (checkpoints older than the records)
        return rows + [{"first": 0, "last": end_step, "lr_steps": None, "precision": "-", "hours": None,
                        "cpu_hours": None, "dataset": "-", "init_from": None}] if end_step else rows
    ends = [s["from_step"] for s in runs[1:]] + [end_step - offset]
    for s, end in zip(runs, ends, strict=True):
        start = init if init and s is runs[0] else {}  # the warm start this stretch began from
        rows.append({"first": offset + s["from_step"], "last": offset + end, "lr_steps": s["steps"],
                     "precision": s["precision"], "hours": s.get("hours"), "cpu_hours": s.get("cpu_hours"),
                     "dataset": s.get("dataset", "-"), "episodes": s.get("episodes"),
                     "init_from": start.get("init_from"), "normalizers": start.get("normalizers")})
    return rows


def render_in_training(checkpoint: str) -> str:
    policy = pa.load_policy(checkpoint)
    info = policy.config.info
    rows = flat_segments(info.get("train_segments") or [], info["train_steps"])
    hours = sum(r["hours"] or 0 for r in rows)
    lines = [f"# {checkpoint}: in training", "",
             f"An intermediate weight file (EMA weights in fp16) of a run that spans several sittings; not a "
             f"shipped policy and not benchmarked. {info['train_steps']} steps so far, {hours:.1f} h of "
             f"wall time recorded (pauses included; the table's CPU hours, where recorded, exclude them). "
             f"Data: `{info.get('dataset_command')}` ({info.get('n_episodes')} episodes, "
             f"{info.get('n_windows')} windows; env options {(info.get('env_spec') or {}).get('kwargs')}). "
             f"Next sitting: `make train-{info['env']}`, or `python eval/train.py env={info['env']} "
             f"dataset={info.get('dataset')} init_from={checkpoint} snapshot_dir={checkpoint} ...`.", "",
             *segment_table(rows)]
    return "\n".join(lines) + "\n"


def segment_table(rows: list[dict]) -> list[str]:
    """A table of flat_segments' rows: each stretch of training, with the warm start it began from."""
    lines = ["| steps | LR schedule | precision | wall hours | CPU hours | data | started from |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        h, cpu = (f"{r[k]:.2f}" if r.get(k) is not None else "-" for k in ("hours", "cpu_hours"))
        refit = f"; normalisers {r['normalizers']}" if r.get("normalizers") else ""
        origin = f"`{r['init_from']}` (its EMA weights{refit})" if r["init_from"] else "-"
        lr = f"cosine over {r['lr_steps']}" if r["lr_steps"] is not None else "not recorded"
        data = f"`{r['dataset']}`" + (f" ({r['episodes']} episodes)" if r.get("episodes") else "")
        lines.append(f"| {r['first']}-{r['last']} | {lr} | {r['precision']} | {h} | {cpu} | {data} | {origin} |")
    return lines


def _history_lines(info: dict) -> list[str]:
    """Every stretch of training behind the weights, when there was more than one (extended, resumed in
    another precision, or warm-started from another checkpoint)."""
    rows = flat_segments(info.get("train_segments") or [], info.get("train_steps") or 0)
    return ["", "Every stretch of training behind these weights:", "", *segment_table(rows)] if len(rows) > 1 else []


def render(cfg: CardConfig) -> str:
    policy = pa.load_policy(cfg.checkpoint)
    info, pc = policy.config.info, policy.config
    if info.get("in_training"):
        return render_in_training(cfg.checkpoint)
    summary = json.loads(Path(cfg.rollout).read_text())
    if summary["checkpoint_hash"] != policy.checkpoint_hash:
        raise SystemExit(f"{cfg.rollout} was measured on another checkpoint (hash differs from {cfg.checkpoint})")
    rows = {r["setting"]: r for r in summary["results"]}
    if "uncached" not in rows:
        raise SystemExit(f"{cfg.rollout} has no uncached row")
    params = sum(p.numel() for p in policy.model.parameters())
    mode = f", mode {pc.model['mode']}" if "mode" in pc.model else ""
    guidance = f", classifier-free guidance scale {pc.guidance_scale:g}" if pc.guidance_scale else ""
    train_command = (f"`{cfg.train_command}`" if cfg.train_command else
                     f"`python eval/train.py env={info['env']}` (configs/train.yaml)")
    lines = [
        f"# {Path(cfg.checkpoint).name}",
        "",
        f"{FAMILIES[pc.model_type]} ({pc.model_type}{mode}{guidance}) for `{info['env']}`, low-dim observation "
        f"({pc.obs_dim} dims: {', '.join(f'{n} {d}' for n, d in info.get('obs_layout') or [])}), "
        f"{pc.action_dim}-dim actions. {params / 1e6:.1f} M parameters "
        f"({json.dumps(pc.model)}), horizon {pc.horizon}, {pc.n_obs_steps} observation steps, "
        f"{pc.n_action_steps} actions executed per chunk. Native sampler: {pc.sampler.kind.upper()}-"
        f"{pc.sampler.num_steps}. Weights: EMA.",
        "",
        "## Data",
        f"- `{info.get('dataset_command')}` -> `{info.get('dataset')}`: {info.get('n_episodes')} scripted "
        f"demonstrations (seeds from 0), {info.get('n_windows')} training windows.",
        "",
        "## Training",
        f"- {train_command}: {info.get('train_steps')} steps, "
        f"{training_hours(Path(cfg.run_dir) / 'log.jsonl'):.1f} h of compute{_run_scope(info)} on this 2-core CPU "
        "(1-2 threads, at times sharing the machine with other jobs; includes steps redone after restarts).",
        *_history_lines(info),
        "",
        "## Measured closed-loop success",
        f"`{summary.get('command') or _rollout_command(summary)}`",
        "",
        "| method | success | 95% Wilson CI | p50 ms/chunk | speedup |",
        "|---|---|---|---|---|",
    ]
    for r in summary["results"]:
        speed = f"{r['speedup']:.1f}x" if r.get("speedup") else "-"
        lines.append(f"| {r['setting']} | {r['successes']}/{r['n_episodes']} | "
                     f"[{r['ci_low']:.2f}, {r['ci_high']:.2f}] | {r['latency_ms_p50']:.0f} | {speed} |")
    lines += per_task_lines(summary["results"])
    m = summary["machine"]
    load = f", load average {m['load_avg_1m']:.1f} on {m['cores']} cores" if "load_avg_1m" in m else ""
    lines += ["", f"Test seeds {summary['seeds'][0]}..{summary['seeds'][1]} (disjoint from the demo seeds); "
              f"latency at batch 1 on {m['cpu']}, {m['threads']} thread(s){load}."]
    return "\n".join(lines + schedule_lines(Path(cfg.checkpoint) / "schedules")) + "\n"


def per_task_lines(rows: list[dict]) -> list[str]:
    """On a multi-task set: success per task (columns: the rollout's settings)."""
    rows = [r for r in rows if "per_task" in r]
    if not rows:
        return []
    lines = ["", "Per task:", "", "| task | " + " | ".join(r["setting"] for r in rows) + " |",
             "|---|" + "---|" * len(rows)]
    for task in rows[0]["per_task"]:
        lines.append(f"| {task} | " + " | ".join("{}/{}".format(*r["per_task"][task]) for r in rows) + " |")
    return lines


def schedule_lines(folder: Path) -> list[str]:
    """A table of the shipped BAC schedules: where each computes and how stable calibration found it
    (and the MagCache ratio files that sit beside them, for diffusers' MagCache)."""
    schedules = [(pa.Schedule.load(p), p.name) for p in folder.glob("bac_*.json")]
    if not schedules:
        return []
    lines = ["", "## Shipped schedules", "",
             "Stability: mean Jaccard similarity between each calibration observation's own schedule and "
             "the shipped one (1 = every observation picks the same steps; measured on the first 8 "
             "observations for the forecast criterion).", "",
             "| file | sampler | budget S | bubbling union blocks | criterion | block-steps computed | stability |",
             "|---|---|---|---|---|---|---|"]
    schedules.sort(key=lambda x: (-x[0].num_steps, x[0].sampler, x[0].budget or 0, x[0].bubble_blocks, x[1]))
    for s, name in schedules:
        criterion = s.calibration.get("criterion", "reuse (cosine)")
        budget = s.budget if s.budget is not None else "pooled"
        lines.append(f"| `schedules/{name}` | {s.sampler.upper()}-{s.num_steps} | {budget} | "
                     f"{s.bubble_blocks} | {criterion} | {s.computed_fraction():.1%} | "
                     f"{s.calibration['mean_jaccard_to_aggregate']:.2f} |")
    lines += ["", f"Calibration data: {s.calibration['description']}."]
    mag = sorted(p.name for p in folder.glob("magcache_*.json"))
    if mag:
        lines += ["", "MagCache ratios for diffusers' MagCache (a peer in the benchmark), from the same data: "
                  + ", ".join(f"`schedules/{n}`" for n in mag) + "."]
    return lines


def _rollout_command(summary: dict) -> str:
    c = summary["config"]
    return (f"python eval/rollout.py checkpoint={c['checkpoint']} methods=[{','.join(c['methods'])}] "
            f"episodes={c['episodes']} seed={c['seed']} num_envs={c['num_envs']}")


@hydra_app(CardConfig, "card")
def main(cfg: CardConfig) -> Path:
    out = Path(cfg.checkpoint) / "card.md"
    out.write_text(render(cfg))
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
