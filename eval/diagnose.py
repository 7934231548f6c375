"""Diagnose what limits closed-loop success on a robosuite task: expert vs policy success, a per-phase funnel,
frames of failed episodes, and how far failure states are from the demos. Lockstep vector envs as eval/rollout.py
(seeds `seed`, `seed + 1`, ...; noise_seeds=[0] = its sampling noise). Writes <out_dir>/<task>.json and
<task>_failures.png (8 frames each of `n_render` failed episodes: the policy's, else the expert's).

    MUJOCO_GL=egl python eval/diagnose.py task=can                      # expert + checkpoints/can_dp_t, DDIM-10
    MUJOCO_GL=egl python eval/diagnose.py task=can 'noise_seeds=[0,1]'  # policy twice, other sampling noise
    MUJOCO_GL=egl python eval/diagnose.py task=square run_policy=false      # expert only (no DART noise)
    MUJOCO_GL=egl python eval/diagnose.py task=square method=bac5 expert=false  # the funnel of a cached setting

Phases, from the simulator each step (rest_z: object centre height when resting on the table / bin floor):
reached: eef within 2.5 cm of the grasp point (can centre; square: the nut's handle site). grasped: gripper
commanded closed, finger gap > 2 cm (can) / 1.5 cm (square) (not closed on air), eef within 4 / 3 cm of the
grasp point, object > 1 cm above rest_z. lifted: object > 5 cm above rest_z. Can: over_bin = can xy inside the
target bin quarter (PickPlace.not_in_bin bounds, any height); in_bin = not_in_bin is False (also z below the
floor + 10 cm). Square: aligned = nut centre within 1 cm of the peg axis, yaw within 0.1 rad of a multiple of
pi/2, nut > 2 cm above rest_z; inserted = NutAssembly.on_peg (|dx|, |dy| < 3 cm, z < table + 5 cm).
success: the env's (which also needs the eef > 4.24 cm from the object centre). Flags: tipped (object axis
> 45 deg from vertical), dropped (lifted, later below rest_z + 1 cm off the goal), closures (open -> closed
commands; the gripper follows the command's sign). Coverage: observations at chunk boundaries, min-max
normalised on the demos (as the policy's normaliser); nn = RMS-per-dim distance to the nearest demo
observation. At the stall = the chunk boundary after a failed episode first reached its highest phase,
compared with successful episodes (and the expert) at the same phase. OOD = nn above the expert's maximum.
"""

import json
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python eval/diagnose.py` from the repo root

import envs  # noqa: E402
import policy_accel as pa  # noqa: E402
from envs.collect import derived_seed  # noqa: E402
from envs.robosuite_experts import wrap, yaw_of  # noqa: E402
from eval.cli import hydra_app  # noqa: E402
from eval.methods import apply_method, parse_method  # noqa: E402
from eval.rollout import make_vector_env  # noqa: E402
from policy_accel.data import ReplayBuffer  # noqa: E402
from policy_accel.normalizer import MinMaxNormalizer  # noqa: E402
from policy_accel.sampling import SamplerConfig  # noqa: E402

PHASES = {"can": ("reached", "grasped", "lifted", "over_bin", "in_bin", "success"),
          "square": ("reached", "grasped", "lifted", "aligned", "inserted", "success")}
REST_DZ = {"can": 0.04, "square": 0.01}
MIN_GAP, HOLD_TOL = {"can": 0.02, "square": 0.015}, {"can": 0.04, "square": 0.03}  # as the experts
OBS_GROUPS = (("obj_pos", 0, 3), ("obj_quat", 3, 7), ("obj_to_eef_pos", 7, 10), ("obj_to_eef_quat", 10, 14),
              ("eef_pos", 14, 17), ("eef_quat", 17, 21), ("gripper_qpos", 21, 23))


@dataclass
class DiagnoseConfig:
    task: str = "can"
    checkpoint: str | None = None  # default checkpoints/<task>_dp_t
    run_policy: bool = True
    expert: bool = True
    episodes: int = 100
    expert_episodes: int = 100
    seed: int = 100000  # first held-out seed
    num_envs: int = 25
    sampler: str | None = None  # ddim<K> or ddpm<K>; ddim10 unless `method` is given
    method: str | None = None  # or a benchmark method (policy_accel/recipes.py), e.g. bac5 or uniform4@ddim10
    noise_seeds: list[int] = field(default_factory=lambda: [0])  # one policy pass per sampling-noise seed
    data: str | None = None  # demos, default data/<task>.zarr
    n_render: int = 3
    out_dir: str = "eval/results/diagnosis"

    def __post_init__(self):
        if self.sampler and self.method:
            raise ValueError(f"give sampler ({self.sampler}) or method ({self.method}), not both")
        if self.method:
            parse_method(self.method)


def phase_flags(task: str, env, grip_cmd: float) -> tuple[dict, np.ndarray, float]:
    """Phase conditions at this step, the object position and its rest height."""
    s, e = env.task_state(), env.sim_env
    obj, rest = s["object_pos"], s["table_z"] + REST_DZ[task]
    dist = np.linalg.norm(s["eef_pos"] - (s["handle_pos"] if task == "square" else obj))
    gap = s["gripper_qpos"][0] - s["gripper_qpos"][1]
    f = {"reached": dist < 0.025, "lifted": obj[2] > rest + 0.05, "tipped": s["object_mat"][2, 2] < math.sqrt(0.5),
         "grasped": grip_cmd > 0 and gap > MIN_GAP[task] and dist < HOLD_TOL[task] and obj[2] > rest + 0.01}
    if task == "can":
        f["over_bin"] = not e.not_in_bin(np.array([obj[0], obj[1], e.bin2_pos[2] + 0.05]), e.object_to_id["can"])
        f["in_bin"] = not e.not_in_bin(obj, e.object_to_id["can"])
    else:
        yaw_err = abs(wrap(4 * yaw_of(s["object_mat"]))) / 4  # to the nearest multiple of pi/2
        f["aligned"] = np.linalg.norm(obj[:2] - s["goal_pos"][:2]) < 0.01 and yaw_err < 0.1 and obj[2] > rest + 0.02
        f["inserted"] = e.on_peg(obj, 0)
    return {k: bool(v) for k, v in f.items()}, obj, rest


def highest(task: str, e: dict, until: int = 10**9) -> str:
    """The furthest phase episode `e` reached (by step `until`), "none" if none."""
    return max((p for p, t in e["first"].items() if t <= until), key=PHASES[task].index, default="none")


def update(ep: dict, task: str, env, action: np.ndarray, t: int, success: bool) -> None:
    """`action` as the env takes it: the gripper command is its last entry (action[6] of a delta action,
    action[9] of an absolute rot6d one)."""
    f, obj, rest = phase_flags(task, env, float(action[-1]))
    f["success"] = success
    for p in PHASES[task]:
        if f[p] and p not in ep["first"]:
            ep["first"][p] = t
    ep["tipped"] |= f["tipped"]
    ep["dropped"] |= "lifted" in ep["first"] and bool(obj[2] < rest + 0.01) and not f.get("in_bin", f.get("inserted"))
    closed = bool(action[-1] > 0)
    ep["closures"] += int(closed and not ep["_closed"])
    ep["_closed"], ep["success"], ep["steps"] = closed, success, t


def run_batch(task: str, venv, seeds: list[int], act, chunk: int) -> list[dict]:
    """A lockstep batch as eval/rollout.run_batch; phases every step, obs and sim states at chunk boundaries."""
    np.random.seed(seeds[0])  # RobosuiteTask.reset also seeds the global RNGs from each env's seed
    obs, _ = venv.reset(seed=seeds)
    inner = [e.unwrapped for e in venv.envs]
    eps = [{"seed": s, "success": False, "steps": 0, "first": {}, "tipped": False, "dropped": False, "closures": 0,
            "init_xy": o[:2].tolist(), "obs": [], "obs_t": [], "states": [], "_closed": False}
           for s, o in zip(seeds, obs, strict=True)]
    done = np.zeros(len(seeds), dtype=bool)
    for t in range(10**6):
        for i in np.flatnonzero(~done) if t % chunk == 0 else []:
            eps[i]["obs"].append(obs[i].copy())
            eps[i]["obs_t"].append(t)
            eps[i]["states"].append((t, inner[i].sim_env.sim.get_state().flatten()))
        action = act(obs, done)
        obs, _, terminated, truncated, info = venv.step(action)
        ended = info["success"] | terminated | truncated
        for i in np.flatnonzero(~done):
            update(eps[i], task, inner[i], action[i], t + 1, bool(info["success"][i]))
            if ended[i]:
                eps[i]["states"].append((t + 1, inner[i].sim_env.sim.get_state().flatten()))
        done |= ended
        if done.all():
            return eps
    raise RuntimeError("env never truncated")


def run_all(task, venv, seeds, make_act, chunk, label) -> tuple[list[dict], float]:
    """`seeds` in batches of venv.num_envs (the last padded); make_act(batch seeds) -> the batch's act."""
    n, out, start = venv.num_envs, [], time.time()
    for i in range(0, len(seeds), n):
        batch = seeds[i:i + n]
        padded = batch + [seeds[-1] + 1 + j for j in range(n - len(batch))]
        out += run_batch(task, venv, padded, make_act(padded), chunk)[:len(batch)]
        print(f"{label}: {sum(e['success'] for e in out)}/{len(out)} ({time.time() - start:.0f} s)", flush=True)
    return out, time.time() - start


def _stats(x) -> dict:
    x = np.asarray(x, dtype=float)
    return {"n": len(x), "mean": float(x.mean()), "p50": float(np.median(x)), "p90": float(np.percentile(x, 90)),
            "max": float(x.max())} if len(x) else {"n": 0}


def summarise(task: str, eps: list[dict]) -> dict:
    phases, fails = PHASES[task], [e for e in eps if not e["success"]]
    return {"n": len(eps), "successes": len(eps) - len(fails), "success_rate": 1 - len(fails) / len(eps),
            "funnel_reached": {p: sum(p in e["first"] for e in eps) for p in phases},
            "failures_by_highest_phase": dict(Counter(highest(task, e) for e in fails)),
            "median_first_step": {p: float(np.median([e["first"][p] for e in eps if p in e["first"]]))
                                  for p in phases if any(p in e["first"] for e in eps)},
            "failures_tipped": sum(e["tipped"] for e in fails), "failures_dropped": sum(e["dropped"] for e in fails),
            "mean_closures": {k: _stats([e["closures"] for e in eps if e["success"] == (k == "success")]).get("mean")
                              for k in ("success", "failure")},
            "failed_seeds": [e["seed"] for e in fails]}


def coverage(task: str, groups: dict[str, list[dict]], demo_obs: np.ndarray, demo_starts: np.ndarray) -> dict:
    """Nearest-demo distances of chunk-boundary observations per group of episodes; initial object positions."""
    norm = MinMaxNormalizer(demo_obs.shape[1]).fit(demo_obs)
    ref = norm.normalize(torch.from_numpy(demo_obs))
    out = {"nn_all_chunks": {}, "at_stall": {}, "ood": {}, "initial_xy": {}}
    for name, eps in groups.items():
        for e in eps:
            q = norm.normalize(torch.from_numpy(np.stack(e["obs"])))
            diff = (q - ref[torch.cdist(q, ref).argmin(1)]).abs()
            e["nn"] = diff.square().mean(1).sqrt().tolist()
            e["nn_groups"] = [{g: float(d[a:b].square().mean().sqrt()) for g, a, b in OBS_GROUPS} for d in diff]
            e["nn_at"] = {p: e["nn"][min(int(np.searchsorted(e["obs_t"], t)), len(e["nn"]) - 1)]  # chunk after phase p
                          for p, t in {"none": 0, **e["first"]}.items()}
        out["nn_all_chunks"][name] = _stats([d for e in eps for d in e["nn"]])
    fails = groups.get("policy_failure", [])
    for e in fails:
        p = highest(task, e)
        out["at_stall"].setdefault(p, {"failure": []})["failure"].append(e["nn_at"][p])
    for p, v in out["at_stall"].items():
        v["failure"] = _stats(v["failure"])
        for name in ("policy_success", "expert"):
            v[name] = _stats([e["nn_at"][p] for e in groups.get(name, []) if p in e["nn_at"]])
    thr = out["nn_all_chunks"].get("expert", {}).get("max")  # out of distribution: farther than the expert ever got
    for name, eps in groups.items() if thr else []:
        ood = [(e, next(k for k, d in enumerate(e["nn"]) if d > thr)) for e in eps if max(e["nn"]) > thr]
        for e, k in ood:
            e["ood_onset_step"] = e["obs_t"][k]
        out["ood"][name] = {"threshold": thr, "episodes": len(eps), "ever_ood": len(ood),
                            "highest_phase_at_onset": dict(Counter(highest(task, e, e["obs_t"][k]) for e, k in ood)),
                            "group_rms_at_onset": {g: _stats([e["nn_groups"][k][g] for e, k in ood]).get("mean")
                                                   for g, _, _ in OBS_GROUPS}}
    demo_xy = demo_starts[:, :2]  # initial object xy; for the demos: distance to the nearest other demo
    starts = {n: np.array([e["init_xy"] for e in eps]).reshape(-1, 2) for n, eps in groups.items()}
    for name, xy in {"demos": demo_xy, **starts}.items():
        dist = np.sort(np.linalg.norm(xy[:, None] - demo_xy[None], axis=2), axis=1)[:, int(name == "demos")]
        out["initial_xy"][name] = {"mean": xy.mean(0).tolist(), "std": xy.std(0).tolist(),
                                   "nn_to_demo_cm": _stats(100 * dist)} if len(xy) else {"n": 0}
    return out


def render_strip(spec: dict, eps: list[dict], task: str, path: Path, n_frames: int = 8) -> None:
    """Replay recorded sim states in a render-only env (offscreen, no shadows/reflections/MSAA) into a PNG."""
    import matplotlib.pyplot as plt  # Agg without a display
    import robosuite

    meta = spec["env_meta"]
    env = robosuite.make(meta["env_name"], **{**meta["env_kwargs"], "has_offscreen_renderer": True})
    env.reset()
    model, ctx = env.sim.model._model, env.sim._render_context_offscreen
    model.light_castshadow[:], model.mat_reflectance[:], model.vis.quality.offsamples = 0, 0, 0
    ctx.con.free()
    ctx._set_mujoco_context_and_buffers()  # a new GL context picks up offsamples = 0
    fig, axes = plt.subplots(len(eps), n_frames, figsize=(2 * n_frames, 2.3 * len(eps)), squeeze=False)
    for row, e in zip(axes, eps, strict=True):
        for ax, k in zip(row, np.linspace(0, len(e["states"]) - 1, n_frames).round().astype(int), strict=True):
            t, state = e["states"][k]
            env.sim.set_state_from_flattened(state)
            env.sim.forward()
            ax.imshow(env.sim.render(width=256, height=256, camera_name="agentview")[::-1])
            ax.set_title(f"seed {e['seed']} t={t}\n{highest(task, e, t)}", fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80, bbox_inches="tight")
    env.close()


@hydra_app(DiagnoseConfig, "diagnose")
def main(cfg: DiagnoseConfig) -> dict:
    torch.set_num_threads(1)
    args = " ".join(f"{k}={v}" for k, v in vars(cfg).items() if v != getattr(DiagnoseConfig, k, None))
    out = {"command": f"python eval/diagnose.py {args}".strip(), "config": vars(cfg).copy()}
    out_dir, groups, policy = Path(cfg.out_dir), {}, None
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.run_policy:
        checkpoint = Path(cfg.checkpoint or f"checkpoints/{cfg.task}_dp_t")
        policy = pa.load_policy(checkpoint)
        setting = cfg.method or cfg.sampler or "ddim10"
        if cfg.method:
            apply_method(policy, parse_method(cfg.method), checkpoint)
        else:
            sampler = setting
            kind = sampler.rstrip("0123456789")
            policy.set_sampler(SamplerConfig(kind, int(sampler[len(kind):]), policy.config.sampler.num_train_steps))
        out["policy"] = {"checkpoint": str(checkpoint), "checkpoint_hash": policy.checkpoint_hash, "passes": [],
                         "method": cfg.method,
                         "sampler": policy.sampler.to_dict(), "native_sampler": policy.config.sampler.to_dict()}
    spec = policy.config.info["env_spec"] if policy else envs.make_env(cfg.task).spec_dict()
    chunk = policy.config.n_action_steps if policy else 8
    n_envs = max(cfg.episodes * cfg.run_policy, cfg.expert_episodes * cfg.expert)
    venv = make_vector_env(spec, min(cfg.num_envs, n_envs))
    if cfg.expert:
        def expert_act(padded):
            experts = [envs.make_expert(cfg.task, e.unwrapped, seed=derived_seed(s, 1))  # as envs.collect
                       for e, s in zip(venv.envs, padded, strict=True)]
            return lambda obs, done: np.stack([np.zeros(7, np.float32) if d else x.act()
                                               for x, d in zip(experts, done, strict=True)])
        groups["expert"], wall = run_all(cfg.task, venv, list(range(cfg.seed, cfg.seed + cfg.expert_episodes)),
                                         expert_act, chunk, "expert")
        out["expert"] = {**summarise(cfg.task, groups["expert"]), "wall_s": wall}
    for k in cfg.noise_seeds if policy else []:
        def policy_act(padded, k=k):
            policy.reset()
            policy.seed(padded[0] + 10**6 * k)  # k = 0: the sampling noise of eval/rollout.py
            return lambda obs, done: policy.select_action(obs, done=done)
        eps, wall = run_all(cfg.task, venv, list(range(cfg.seed, cfg.seed + cfg.episodes)), policy_act, chunk,
                            f"policy {setting} noise_seed={k}")
        out["policy"]["passes"].append({"noise_seed": k, **summarise(cfg.task, eps), "wall_s": wall})
        groups.setdefault("policy_success", []).extend(e for e in eps if e["success"])
        groups.setdefault("policy_failure", []).extend(e for e in eps if not e["success"])
    fails = [set(p["failed_seeds"]) for p in out.get("policy", {}).get("passes", [])]  # same starts in every pass?
    out["failed_in_every_policy_pass"] = sorted(set.intersection(*fails)) if fails else None
    venv.close()
    data = Path(cfg.data or f"data/{cfg.task}.zarr")
    out["demos"] = f"no dataset at {data}: coverage not computed"
    if data.exists():
        buf = ReplayBuffer.load(data)
        out["demos"] = {"path": str(data), "episodes": buf.n_episodes, "steps": len(buf.obs),
                        "collection_failures": buf.attrs.get("n_failures"), "noise": buf.attrs.get("noise")}
        if policy:  # the demos should be those the policy's normaliser was fitted on
            lim = policy.obs_normalizer
            out["demos"]["max_abs_diff_to_policy_normaliser_limits"] = float(max(
                np.abs(buf.obs.min(0) - lim.min.numpy()).max(), np.abs(buf.obs.max(0) - lim.max.numpy()).max()))
        out["coverage"] = coverage(cfg.task, groups, buf.obs, buf.obs[np.r_[0, buf.episode_ends[:-1]]])
    failed = groups.get("policy_failure") or [e for e in groups.get("expert", []) if not e["success"]]
    if failed and cfg.n_render:  # failures that got to different phases first
        by_phase = list({highest(cfg.task, e): e for e in reversed(failed)}.values())
        shown = (by_phase + [e for e in failed if all(e is not b for b in by_phase)])[:cfg.n_render]
        render_strip(spec, shown, cfg.task, out_dir / f"{cfg.task}_failures.png")
        out["failure_frames"] = {"png": str(out_dir / f"{cfg.task}_failures.png"), "seeds": [e["seed"] for e in shown],
                                 "source": "policy" if groups.get("policy_failure") else "expert"}
    drop = ("obs", "obs_t", "states", "nn_groups", "_closed")
    out["episodes"] = {n: [{k: v for k, v in e.items() if k not in drop} for e in eps] for n, eps in groups.items()}
    (out_dir / f"{cfg.task}.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {out_dir / f'{cfg.task}.json'}")
    return out


if __name__ == "__main__":
    main()
