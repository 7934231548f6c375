"""Offline fidelity: how far each method's actions move from the uncached ones, on demo observations.

    python eval/fidelity.py checkpoint=checkpoints/lift_dp_t
    python eval/fidelity.py checkpoint=... 'methods=[ddim10,bac10,bac10@ddim20]' observations=64

A quick proxy before the hours-long closed-loop sweep. Every method sees the same observation
histories (from the checkpoint's demo dataset), the same initial noise and, for DDPM, the same
per-step noise (the policy is reseeded before each method). Per method it prints the FLOP ratio and
the action error against two references:

  vs base    the uncached policy on the method's own sampler (DDPM-100, or DDIM-K for `@ddimK` and
             `ddimK`): the error the cache alone adds;
  vs native  the uncached policy on the native sampler (what the checkpoint was evaluated with).

Errors are in the action space the env receives: mean |Δa| and the 95th percentile of |Δa| over
all chunk entries, and the fraction of chunk entries whose last action dimension (the gripper on the
robosuite tasks) changes sign. For scale it also prints the sampling spread: the uncached policy against
itself with other initial and per-step noise (seed + 1), how far two draws of the policy lie apart.
Writes JSON and a PNG of error vs FLOP ratio (the spread as a dashed line).
"""

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python eval/fidelity.py` from the root

import policy_accel as pa  # noqa: E402
from eval.cli import hydra_app  # noqa: E402
from eval.methods import Method, apply_method, parse_method  # noqa: E402
from eval.report import FAMILY_STYLE  # noqa: E402
from policy_accel.calibration import demo_observations  # noqa: E402
from policy_accel.jsonfile import write_json  # noqa: E402
from policy_accel.recipes import STEP_FAMILIES  # noqa: E402


@dataclass
class FidelityConfig:
    checkpoint: str = "checkpoints/lift_dp_t"
    methods: list[str] = field(default_factory=lambda: [
        "ddim10", "ddim20", "uniform4", "taylorseer4o2", "bac10", "bac_taylor10o2",
        "bac10@ddim20", "bac_taylor10o2@ddim20"])
    observations: int = 32  # demo observation histories, run as one batch
    dataset: str | None = None  # demo dataset to draw them from; default the checkpoint's own
    seed: int = 0
    num_threads: int = 2
    out: str | None = None  # JSON; default outputs/fidelity_<policy>.json (and .png beside it)
    plot: bool = True

    def __post_init__(self):
        if self.observations < 1:
            raise ValueError(f"observations must be >= 1, got {self.observations}")
        for spec in self.methods:
            parse_method(spec)


def base_of(method: Method) -> str:
    """The uncached setting a method's cache error is measured against."""
    if method.family in STEP_FAMILIES:
        return method.spec
    return f"{method.base_kind}{method.base_steps}" if method.base_steps else "uncached"


def action_error(actions: np.ndarray, reference: np.ndarray) -> dict:
    diff = np.abs(actions - reference)
    flips = np.sign(actions[..., -1]) != np.sign(reference[..., -1])
    return {"mean_abs": float(diff.mean()), "p95_abs": float(np.percentile(diff, 95)),
            "last_dim_sign_flips": float(flips.mean())}


def run_method(policy, method: Method, checkpoint: str, history: np.ndarray, noise: torch.Tensor,
               seed: int) -> tuple[np.ndarray, float]:
    """Actions (B, Ta, Da) for the whole batch and FLOPs per chunk at batch 1."""
    remover = apply_method(policy, method, checkpoint)
    try:
        flops = pa.chunk_flops(policy, history[:1])
        policy.seed(seed)  # same per-step DDPM noise for every method
        actions = policy.predict_action_chunk(history, noise)
    finally:
        if remover:
            remover.remove()
    return actions, flops


def fidelity(cfg: FidelityConfig) -> dict:
    torch.set_num_threads(cfg.num_threads)
    policy = pa.load_policy(cfg.checkpoint)
    pc = policy.config
    dataset = cfg.dataset or pc.info.get("dataset")
    if not dataset or not Path(dataset).exists():
        raise SystemExit(f"dataset={dataset!r} does not exist" if cfg.dataset else
                         f"{cfg.checkpoint}: its demo dataset {dataset!r} is not here; collect it first "
                         f"(see the checkpoint's card.md) or pass dataset=<another demo set of its task>")
    history = np.stack(demo_observations(dataset, cfg.observations, pc.n_obs_steps, seed=cfg.seed))
    noise = torch.randn(len(history), pc.horizon, pc.action_dim, generator=torch.Generator().manual_seed(cfg.seed))
    methods = [parse_method(m) for m in cfg.methods]
    references = {base_of(m) for m in methods} | {"uncached"}
    outputs: dict[str, tuple[np.ndarray, float]] = {}
    for spec in tqdm(sorted(references) + [m.spec for m in methods if m.spec not in references], desc="methods"):
        outputs[spec] = run_method(policy, parse_method(spec), cfg.checkpoint, history, noise, cfg.seed)
    native_actions, native_flops = outputs["uncached"]
    other_noise = torch.randn(noise.shape, generator=torch.Generator().manual_seed(cfg.seed + 1))
    redrawn, _ = run_method(policy, parse_method("uncached"), cfg.checkpoint, history, other_noise, cfg.seed + 1)
    rows = []
    for m in methods:
        actions, flops = outputs[m.spec]
        rows.append({"method": m.name, "setting": m.spec, "base": base_of(m), "flops_ratio": flops / native_flops,
                     "vs_base": action_error(actions, outputs[base_of(m)][0]),
                     "vs_native": action_error(actions, native_actions)})
    return {"checkpoint": cfg.checkpoint, "dataset": dataset, "observations": len(history), "config": asdict(cfg),
            "sampling_spread": action_error(redrawn, native_actions), "results": rows}


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharex=True)
    titles = {"vs_native": "vs uncached on the native sampler",
              "vs_base": "vs uncached on its own sampler (cache error)"}
    for ax, (key, title) in zip(axes, titles.items(), strict=True):
        for r in result["results"]:
            colour, marker = FAMILY_STYLE.get(r["method"].removeprefix("compile+"), ("grey", "o"))
            x, y = r["flops_ratio"], r[key]["mean_abs"]
            ax.scatter(x, y, color=colour, marker=marker, s=50)
            ax.annotate(r["setting"], (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.axhline(result["sampling_spread"]["mean_abs"], color="grey", ls="--", lw=1,
                   label="uncached vs itself, other noise")
        ax.legend(fontsize=7, loc="upper right")
        ax.set_xscale("log")
        ax.set_xlabel("FLOPs per chunk / uncached")
        ax.set_ylabel("mean |Δ action|")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{Path(result['checkpoint']).name}: offline fidelity, {result['observations']} demo observations")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


@hydra_app(FidelityConfig, "fidelity")
def main(cfg: FidelityConfig) -> dict:
    result = fidelity(cfg)
    print(f"{cfg.checkpoint}: {result['observations']} observation histories from {result['dataset']}, "
          "same noise for every method")
    head = (f"{'method':<26}{'FLOPs':>7}{'base':>10}{'|Δa| vs base':>14}{'|Δa| vs native':>16}"
            f"{'p95 vs native':>15}{'last-dim flips':>16}")
    print(head + "\n" + "-" * len(head))
    for r in result["results"]:
        b, n = r["vs_base"], r["vs_native"]
        print(f"{r['setting']:<26}{r['flops_ratio']:>7.3f}{r['base']:>10}{b['mean_abs']:>14.4f}{n['mean_abs']:>16.4f}"
              f"{n['p95_abs']:>15.4f}{n['last_dim_sign_flips']:>16.1%}")
    sp = result["sampling_spread"]
    print(f"{'uncached, other noise':<34}{'':>10}{'':>14}{sp['mean_abs']:>16.4f}{sp['p95_abs']:>15.4f}"
          f"{sp['last_dim_sign_flips']:>16.1%}   (sampling spread, for scale)")
    out = Path(cfg.out or f"outputs/fidelity_{Path(cfg.checkpoint).name}.json")
    write_json(out, result)
    print(f"wrote {out}")
    if cfg.plot:
        plot(result, out.with_suffix(".png"))
        print(f"wrote {out.with_suffix('.png')}")
    return result


if __name__ == "__main__":
    main()
