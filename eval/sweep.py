"""The full benchmark for one policy: every method of configs/sweep.yaml on the same test seeds,
parallel on Ray, resumable, merged into eval/results/summary.jsonl and plotted by eval/report.py.

    python eval/sweep.py checkpoint=checkpoints/lift_dp_t                 # local Ray on all cores
    python eval/sweep.py checkpoint=... ray_address=ray://head:10001       # the same on a cluster
    python eval/sweep.py checkpoint=... 'methods=[uncached,ddim10,bac10]' episodes=20

Success: one Ray task per (method, seed shard), each a lockstep vector-env rollout (eval/rollout.py);
a finished shard is a JSON file under <results_dir>/runs/<policy>/success/ and is never recomputed;
with reuse_from=[<other results_dir>] one finished there for the same run is copied instead.
Latency: after all success tasks, one Ray task that reserves every CPU of its node (so it runs on an
otherwise idle worker) times every method at batch 1 in interleaved rounds, on observation histories
recorded by the first method's first shard; it records the host that timed it. It is redone only
when the method list changes, since speedups must come from one process run.
"""

import json
import math
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python eval/sweep.py` from the repo root

from eval.cli import hydra_app  # noqa: E402
from eval.methods import parse_method, schedule_digest  # noqa: E402
from policy_accel.jsonfile import write_json  # noqa: E402
from policy_accel.recipes import STEP_FAMILIES  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@dataclass
class SweepConfig:
    checkpoint: str = "checkpoints/lift_dp_t"
    methods: list[str] = field(default_factory=lambda: ["uncached", "ddim10"])  # configs/sweep.yaml: full list
    episodes: int = 100
    seed: int = 100000
    shards: int = 4  # seed shards per method (Ray tasks); episodes / shards ideally a multiple of num_envs
    num_envs: int = 25
    latency_rounds: int = 5
    latency_repeats: int = 6
    latency_warmup: int = 2
    results_dir: str = "eval/results"
    ray_address: str | None = None  # None: start Ray locally; "auto" or "ray://host:port": join a cluster
    num_cpus: int | None = None  # local Ray only; default all cores
    plot: bool = True
    latency: bool = True  # false: run the missing success shards only (no timing, no merge), e.g. beside other work
    retime: bool = False  # time again even if latency.json holds these methods (another machine, a quieter one)
    out: str | None = None  # also write this run's rows as a rollout-style JSON (what eval/card.py reads)
    # other results dirs: a finished shard of the same checkpoint, num_envs, seeds and schedule file is copied
    # from there, not rerun (rollouts are deterministic given these; the low-latency list shares the main one's)
    reuse_from: list[str] = field(default_factory=list)

    def __post_init__(self):
        for name in ("episodes", "shards", "num_envs", "latency_rounds", "latency_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.shards > self.episodes:
            raise ValueError(f"shards={self.shards} > episodes={self.episodes}")
        for d in self.reuse_from:
            if not Path(d).is_dir():
                raise ValueError(f"reuse_from: {d} is not a directory")
        specs = [parse_method(m).spec for m in self.methods]
        if len(set(specs)) != len(specs):
            raise ValueError(f"methods lists a setting twice: {specs}")


def shard_seeds(cfg: SweepConfig) -> list[list[int]]:
    size = math.ceil(cfg.episodes / cfg.shards)
    seeds = list(range(cfg.seed, cfg.seed + cfg.episodes))
    return [seeds[i:i + size] for i in range(0, len(seeds), size)]


def success_task(checkpoint: str, spec: str, seeds: list[int], num_envs: int, record: bool) -> dict:
    """One shard of one method (runs in a Ray worker, one thread)."""
    import platform

    import torch

    import policy_accel as pa
    from eval.rollout import make_vector_env, success_row

    torch.set_num_threads(1)
    policy = pa.load_policy(checkpoint)
    venv = make_vector_env(policy.config.info["env_spec"], min(num_envs, len(seeds)))
    recorded: list[np.ndarray] = []
    method = parse_method(spec)
    row = success_row(policy, venv, method, seeds, checkpoint, record=recorded if record else None)
    venv.close()
    row["host"] = platform.node()
    row["schedule_sha256"] = schedule_digest(method, checkpoint, policy.config.sampler)
    return {"row": row, "histories": np.stack(recorded).tolist() if record else None}


def latency_task(checkpoint: str, specs: list[str], histories: list, rounds: int, repeats: int, warmup: int) -> dict:
    """Batch-1 latency of every method in one process (runs alone on its node)."""
    import torch

    import policy_accel as pa
    from eval.rollout import latency_fields, machine

    torch.set_num_threads(1)
    policy = pa.load_policy(checkpoint)
    hist = [np.asarray(h, np.float32)[None] for h in histories]
    methods = [parse_method(s) for s in specs]
    fields = latency_fields(policy, methods, checkpoint, hist, rounds, repeats, warmup)
    digests = {m.spec: schedule_digest(m, checkpoint, policy.config.sampler) for m in methods}
    return {"specs": specs, "fields": fields, "machine": machine(), "schedule_sha256": digests}


def _init_ray(cfg: SweepConfig):
    import ray

    if cfg.ray_address:  # a cluster: ship the code (not the venv, data or results) to the workers
        runtime_env = {"working_dir": str(REPO), "excludes": [".venv", "data", "runs", ".git", "eval/results"]}
        ray.init(address=cfg.ray_address, runtime_env=runtime_env)
    else:
        ray.init(num_cpus=cfg.num_cpus, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}})
    return ray


def check_run_dir(cfg: SweepConfig, run_dir: Path) -> None:
    """Finished shards are reused only for the same checkpoint weights and batching."""
    from policy_accel.checkpoint import load_policy

    meta = {"checkpoint_hash": load_policy(cfg.checkpoint).checkpoint_hash, "num_envs": cfg.num_envs}
    path = run_dir / "meta.json"
    if path.exists():
        old = {k: v for k, v in json.loads(path.read_text()).items() if k in meta}
        if old != meta:
            raise SystemExit(f"{run_dir} holds results for {old}, not {meta} (another checkpoint or num_envs); "
                             f"delete it or pass another results_dir")
    path.write_text(json.dumps({**meta, "config": asdict(cfg)}, indent=1) + "\n")


def reusable_shard(cfg: SweepConfig, run_dir: Path, path: Path, digest: str | None) -> Path | None:
    """The same shard finished under another results dir of cfg.reuse_from, if its run matches ours."""
    ours = {k: v for k, v in json.loads((run_dir / "meta.json").read_text()).items() if k != "config"}
    for d in cfg.reuse_from:
        other = Path(d) / "runs" / run_dir.name
        source = other / "success" / path.name
        if not source.exists() or not (other / "meta.json").exists():
            continue
        theirs = {k: v for k, v in json.loads((other / "meta.json").read_text()).items() if k in ours}
        if theirs == ours and json.loads(source.read_text()).get("schedule_sha256") == digest:
            return source
    return None


def check_schedules(cfg: SweepConfig) -> None:
    """Fail before any work when a BAC setting has no calibrated schedule; say how to make them."""
    from policy_accel.policy import PolicyConfig

    native = PolicyConfig.from_dict(json.loads((Path(cfg.checkpoint) / "config.json").read_text())).sampler
    missing = {}
    for method in map(parse_method, cfg.methods):
        for m in [method, method.uncond] if method.uncond else [method]:
            path = m.file(cfg.checkpoint, native)
            if path is not None and not path.is_file():
                missing[path] = m.calibrate_command(cfg.checkpoint, native)
    if missing:
        raise SystemExit(f"{len(missing)} schedule(s) missing for this sweep; make them with:\n  "
                         + "\n  ".join(sorted(set(missing.values()))))


def current_digests(cfg: SweepConfig) -> dict[str, str | None]:
    """Per method, the sha256 of the schedule file it reads now (None without one)."""
    from policy_accel.policy import PolicyConfig

    native = PolicyConfig.from_dict(json.loads((Path(cfg.checkpoint) / "config.json").read_text())).sampler
    return {spec: schedule_digest(parse_method(spec), cfg.checkpoint, native) for spec in cfg.methods}


def run_sweep(cfg: SweepConfig) -> list[dict]:
    from tqdm import tqdm

    policy_name = Path(cfg.checkpoint).name
    run_dir = Path(cfg.results_dir) / "runs" / policy_name
    (run_dir / "success").mkdir(parents=True, exist_ok=True)
    check_run_dir(cfg, run_dir)
    check_schedules(cfg)
    shards = shard_seeds(cfg)
    digests = current_digests(cfg)
    hist_path = run_dir / "latency_histories.npy"
    todo, stale, reused = [], [], []
    for spec in cfg.methods:
        for i, seeds in enumerate(shards):
            path = shard_path(run_dir, spec, seeds)
            if path.exists() and json.loads(path.read_text()).get("schedule_sha256") != digests[spec]:
                stale.append(path.name)  # made with another schedule file of the same name: redo
                path.unlink()
            records = spec == cfg.methods[0] and i == 0  # this shard records the timing's observations
            source = None if path.exists() or (records and not hist_path.exists()) else \
                reusable_shard(cfg, run_dir, path, digests[spec])
            if source is not None:
                shutil.copyfile(source, path)
                reused.append(path.name)
            if not path.exists():
                todo.append((spec, seeds, path, records))
    if stale:
        print(f"{policy_name}: {len(stale)} shard(s) were made with another schedule file; redoing them: "
              + ", ".join(stale[:6]) + (" ..." if len(stale) > 6 else ""))
    if reused:
        print(f"{policy_name}: {len(reused)} finished shard(s) copied from {', '.join(cfg.reuse_from)}")
    lat_path = run_dir / "latency.json"
    lat = json.loads(lat_path.read_text()) if lat_path.exists() else None
    need_latency = cfg.latency and (cfg.retime or lat is None or lat["specs"] != list(cfg.methods)
                                    or lat.get("schedule_sha256") != digests)
    if not todo and not need_latency:
        print(f"{policy_name}: every point is done; merging")
    else:
        ray = _init_ray(cfg)
        task = ray.remote(num_cpus=1)(success_task)
        pending = {task.remote(cfg.checkpoint, spec, seeds, cfg.num_envs, rec): (spec, path)
                   for spec, seeds, path, rec in todo}
        with tqdm(total=len(pending), desc=f"{policy_name} success shards", unit="shard") as bar:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                spec, path = pending.pop(done[0])
                result = ray.get(done[0])
                if result["histories"] is not None:
                    np.save(hist_path, np.asarray(result["histories"], np.float32))
                path.write_text(json.dumps(result["row"]) + "\n")
                bar.set_postfix(last=f"{spec} {result['row']['successes']}/{result['row']['n_episodes']}")
                bar.update(1)
        if need_latency:
            node_cpus = int(min(n["Resources"].get("CPU", 1) for n in ray.nodes() if n["Alive"]))
            n_hist = cfg.latency_rounds * cfg.latency_repeats
            recorded = np.load(hist_path)
            histories = recorded[:: max(1, len(recorded) // n_hist)][:n_hist].tolist()
            print(f"{policy_name}: timing {len(cfg.methods)} methods at batch 1 (alone on a node, {node_cpus} CPUs)")
            ref = ray.remote(num_cpus=node_cpus)(latency_task).remote(
                cfg.checkpoint, list(cfg.methods), histories, cfg.latency_rounds, cfg.latency_repeats,
                cfg.latency_warmup)
            lat = ray.get(ref)
            lat_path.write_text(json.dumps(lat, indent=1) + "\n")
        ray.shutdown()
    if not cfg.latency:
        print(f"{policy_name}: success shards done; latency=false, so no timing and no merge")
        return []
    return merge(cfg, run_dir, shards, lat)


def shard_path(run_dir: Path, spec: str, seeds: list[int]) -> Path:
    """One method's success on one seed shard (a per-branch spec's '/' becomes '_uncond_')."""
    return run_dir / "success" / f"{spec.replace('/', '_uncond_')}__{seeds[0]}-{seeds[-1]}.json"


def merge(cfg: SweepConfig, run_dir: Path, shards: list[list[int]], lat: dict) -> list[dict]:
    from eval.rollout import add_ratios, wilson_interval

    checkpoint_hash = json.loads((run_dir / "meta.json").read_text())["checkpoint_hash"]
    rows = []
    for spec in cfg.methods:
        parts = [json.loads(shard_path(run_dir, spec, s).read_text()) for s in shards]
        n, k = sum(p["n_episodes"] for p in parts), sum(p["successes"] for p in parts)
        low, high = wilson_interval(k, n)
        row = {key: parts[0][key] for key in ("policy", "task", "method", "setting")}
        row["checkpoint_hash"] = checkpoint_hash
        row.update(n_episodes=n, successes=k, success_rate=k / n, ci_low=low, ci_high=high,
                   failed_seeds=sorted(s for p in parts for s in p["failed_seeds"]),
                   success_hosts=sorted({p["host"] for p in parts}), **lat["fields"][spec],
                   latency_host=lat["machine"]["host"], latency_machine=lat["machine"])
        if "per_task" in parts[0]:  # a multi-task set: success per task, summed over the shards
            row["per_task"] = {t: [sum(p["per_task"][t][i] for p in parts) for i in (0, 1)]
                               for t in parts[0]["per_task"]}
        rows.append(row)
    add_ratios(rows)
    summary = Path(cfg.results_dir) / "summary.jsonl"
    keep = []
    if summary.exists():  # rows of other policies, and this checkpoint's settings not in this sweep, stay
        policy, ours = rows[0]["policy"], {r["setting"] for r in rows}
        old = [json.loads(x) for x in summary.read_text().splitlines() if x.strip()]
        replaced = [r for r in old if r["policy"] == policy and r.get("checkpoint_hash") != checkpoint_hash]
        if replaced:  # a retrained checkpoint under the same name: its predecessor's rows never mix with its own
            print(f"{policy}: dropping {len(replaced)} row(s) of {summary} measured on other weights than "
                  f"{checkpoint_hash[:12]} (checkpoint_hash {replaced[0].get('checkpoint_hash')})")
        keep = [r for r in old if r["policy"] != policy
                or (r.get("checkpoint_hash") == checkpoint_hash and r["setting"] not in ours)]
    summary.write_text("".join(json.dumps(r) + "\n" for r in keep + rows))
    return rows


@hydra_app(SweepConfig, "sweep")
def main(cfg: SweepConfig) -> list[dict]:
    rows = run_sweep(cfg)
    if not rows:
        return rows
    from eval.rollout import format_table

    print(format_table(rows))
    print(f"wrote {Path(cfg.results_dir) / 'summary.jsonl'} ({len(rows)} rows for {Path(cfg.checkpoint).name})")
    if cfg.out:
        run_dir = Path(cfg.results_dir) / "runs" / Path(cfg.checkpoint).name
        meta = json.loads((run_dir / "meta.json").read_text())
        methods = "[" + ",".join(cfg.methods) + "]"
        write_json(cfg.out, {
            "checkpoint": cfg.checkpoint, "checkpoint_hash": meta["checkpoint_hash"], "task": rows[0]["task"],
            "seeds": [cfg.seed, cfg.seed + cfg.episodes - 1], "machine": rows[0]["latency_machine"],
            "command": f"python eval/sweep.py checkpoint={cfg.checkpoint} 'methods={methods}' "
                       f"episodes={cfg.episodes} seed={cfg.seed} num_envs={cfg.num_envs}",
            "config": asdict(cfg), "results": rows})
        print(f"wrote {cfg.out}")
    if cfg.plot:
        from eval.report import plot_calls, plot_task

        summary = Path(cfg.results_dir) / "summary.jsonl"
        print(f"wrote {plot_task(summary, rows[0]['task'], cfg.results_dir)}")
        if any(r["method"] in STEP_FAMILIES for r in rows):
            print(f"wrote {plot_calls(summary, rows[0]['task'], cfg.results_dir)}")
    return rows


if __name__ == "__main__":
    main()
