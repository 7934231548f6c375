"""Half-precision inference: how far bf16 / fp16 actions move from fp32, per method; optionally closed loop.

    python eval/half_precision.py checkpoint=checkpoints/lift_dp_t
    python eval/half_precision.py checkpoint=... 'methods=[uncached,ddim10,bac_taylor5o1f@ddim20]' observations=64
    python eval/half_precision.py checkpoint=checkpoints/lift_dp_t closed_loop=true episodes=50   # + success

Offline: the same demo observation histories, the same initial noise and (DDPM) the same per-step
noise for the fp32 policy and for each half-precision copy (loaded with `dtype=`: denoiser weights
and activations in half precision; normalisers, noise and the sampler's update in fp32, see
Policy.set_dtype). Per method and dtype: mean and max |a_half - a_fp32| in action units (what the env
receives), the largest per action dimension, and whether every action is finite (fp16 can overflow).

closed_loop=true also runs each method in each of `closed_loop_dtypes` through eval/rollout.py's
machinery (lockstep envs, the same test seeds); compare with an fp32 rollout of the same seeds.
"""

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python eval/half_precision.py` from the root

import policy_accel as pa  # noqa: E402
from eval import rollout  # noqa: E402
from eval.cli import hydra_app  # noqa: E402
from eval.methods import apply_method, parse_method  # noqa: E402
from policy_accel.calibration import demo_observations  # noqa: E402
from policy_accel.jsonfile import write_json  # noqa: E402
from policy_accel.precision import parse_dtype  # noqa: E402


@dataclass
class HalfPrecisionConfig:
    checkpoint: str = "checkpoints/lift_dp_t"
    methods: list[str] = field(default_factory=lambda: ["uncached", "ddim10", "uniform5@ddim10"])
    dtypes: list[str] = field(default_factory=lambda: ["bfloat16", "float16"])
    observations: int = 32  # demo observation histories, run as one batch
    seed: int = 0
    closed_loop: bool = False  # also measure success in closed loop (eval/rollout.py's machinery)
    closed_loop_dtypes: list[str] = field(default_factory=lambda: ["bfloat16"])
    episodes: int = 50
    first_seed: int = 100000  # test seeds, as eval/rollout.py
    num_envs: int = 25
    num_threads: int = 2
    device: str = "cpu"
    out: str | None = None  # JSON; default outputs/half_precision_<policy>.json
    progress: bool = True

    def __post_init__(self):
        for name in ("observations", "episodes", "num_envs", "num_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for dtype in [*self.dtypes, *self.closed_loop_dtypes]:
            parse_dtype(dtype)
        for spec in self.methods:
            parse_method(spec)


def chunk_actions(policy, method, checkpoint, history: np.ndarray, noise: torch.Tensor, seed: int) -> np.ndarray:
    """Actions (B, Ta, Da) of `method` on the whole batch, the DDPM per-step noise drawn from `seed`."""
    remover = apply_method(policy, method, checkpoint)
    try:
        policy.seed(seed)
        policy.reset()
        return policy.predict_action_chunk(history, noise)
    finally:
        remover.remove()


def action_error(actions: np.ndarray, reference: np.ndarray) -> dict:
    finite = bool(np.isfinite(actions).all())
    diff = np.abs(actions - reference)
    return {"finite": finite, "mean_abs": float(diff.mean()) if finite else None,
            "max_abs": float(diff.max()) if finite else None,
            "max_abs_per_dim": diff.reshape(-1, diff.shape[-1]).max(0).tolist() if finite else None}


def offline_errors(cfg: HalfPrecisionConfig, history: np.ndarray) -> list[dict]:
    fp32 = pa.load_policy(cfg.checkpoint, device=cfg.device)
    pc = fp32.config
    noise = torch.randn(len(history), pc.horizon, pc.action_dim, generator=torch.Generator().manual_seed(cfg.seed))
    methods = [parse_method(m) for m in cfg.methods]
    reference = {m.spec: chunk_actions(fp32, m, cfg.checkpoint, history, noise, cfg.seed) for m in methods}
    rows = []
    for dtype in cfg.dtypes:
        half = pa.load_policy(cfg.checkpoint, device=cfg.device, dtype=dtype)
        for m in methods:
            actions = chunk_actions(half, m, cfg.checkpoint, history, noise, cfg.seed)
            rows.append({"setting": m.spec, "dtype": dtype, **action_error(actions, reference[m.spec])})
            r = rows[-1]
            err = "non-finite actions" if not r["finite"] else f"mean {r['mean_abs']:.2e}, max {r['max_abs']:.2e}"
            print(f"{m.spec:<24}{dtype:<10} |a - a_fp32|: {err}", flush=True)
    return rows


def closed_loop_rows(cfg: HalfPrecisionConfig) -> list[dict]:
    seeds = list(range(cfg.first_seed, cfg.first_seed + cfg.episodes))
    rows = []
    for dtype in cfg.closed_loop_dtypes:
        policy = pa.load_policy(cfg.checkpoint, device=cfg.device, dtype=dtype)
        venv = rollout.make_vector_env(policy.config.info["env_spec"], min(cfg.num_envs, cfg.episodes))
        for spec in cfg.methods:
            row = rollout.success_row(policy, venv, parse_method(spec), seeds, cfg.checkpoint, cfg.progress)
            rows.append({**row, "dtype": dtype})
            print(f"{row['task']} {spec} {dtype}: {row['successes']}/{row['n_episodes']} "
                  f"[{row['ci_low']:.2f}, {row['ci_high']:.2f}] in {row['success_wall_s']:.0f} s", flush=True)
        venv.close()
    return rows


@hydra_app(HalfPrecisionConfig, "half_precision")
def main(cfg: HalfPrecisionConfig) -> dict:
    torch.set_num_threads(cfg.num_threads)
    info = pa.load_policy(cfg.checkpoint).config
    dataset = info.info.get("dataset")
    if not dataset or not Path(dataset).exists():
        raise SystemExit(f"{cfg.checkpoint}: its demo dataset {dataset!r} is not here; collect it first "
                         "(see the checkpoint's card.md)")
    history = np.stack(demo_observations(dataset, cfg.observations, info.n_obs_steps, seed=cfg.seed))
    result = {"checkpoint": cfg.checkpoint, "torch": torch.__version__, "device": cfg.device,
              "config": asdict(cfg), "offline": offline_errors(cfg, history)}
    if cfg.closed_loop:
        result["closed_loop"] = closed_loop_rows(cfg)
    out = Path(cfg.out or f"outputs/half_precision_{Path(cfg.checkpoint).name}.json")
    write_json(out, result)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
