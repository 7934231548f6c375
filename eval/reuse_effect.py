"""What a method does to the action distribution, offline on the demos (issue: why does reuse beat the
uncached policy on an under-trained Can policy?).

    python eval/reuse_effect.py checkpoint=checkpoints/can_dp_t
    python eval/reuse_effect.py checkpoint=... 'methods=[uncached,ddim10,uniform5@ddim10,ddim2]' observations=32 draws=8

On `observations` demo histories t (and the histories one chunk later, t + n_action_steps), each method
samples `draws` chunks per history with the same noise across methods. Per method, in the normalised
action space ([-1, 1] per dim, so dims weigh alike), the executed actions' (n_action_steps):
  spread      mean over histories of the per-step std over noise draws (how random the policy is)
  demo_error  mean distance of a draw to the demo's own next actions (how close it stays to the expert)
  mean_error  the same for the mean over draws (the error the randomness does not explain)
  jump        mean distance between a chunk's last executed action and the next chunk's first, on the
              demo's own next history (a discontinuity the robot feels at every chunk boundary)
  step        mean distance between consecutive actions inside a chunk (for scale: the demos' own step
              and boundary distances are printed as the `demo` row)
Writes eval/results/reuse_effect/<policy>.json and prints a table.
"""

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python eval/reuse_effect.py` from the repo root

import policy_accel as pa  # noqa: E402
from eval.cli import hydra_app  # noqa: E402
from eval.methods import apply_method, parse_method  # noqa: E402
from policy_accel.cross_chunk import consecutive_histories  # noqa: E402
from policy_accel.jsonfile import write_json  # noqa: E402


@dataclass
class ReuseEffectConfig:
    checkpoint: str = "checkpoints/can_dp_t"
    methods: list[str] = field(default_factory=lambda: ["uncached", "ddim10", "uniform5@ddim10", "ddim2"])
    observations: int = 32
    draws: int = 8
    seed: int = 0
    num_threads: int = 2
    out: str | None = None  # default eval/results/reuse_effect/<policy>.json

    def __post_init__(self):
        if self.observations < 1 or self.draws < 2:
            raise ValueError(f"need observations >= 1 and draws >= 2, got {self.observations} and {self.draws}")
        for m in self.methods:
            parse_method(m)


def demo_next_actions(dataset, n: int, policy, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Histories at t and t + Ta (as consecutive_histories draws them) and the demo's actions t..t+Ta-1."""
    from policy_accel.data import ReplayBuffer

    cfg = policy.config
    this, nxt = consecutive_histories(dataset, n, cfg.n_obs_steps, cfg.n_action_steps, seed)
    buffer = ReplayBuffer.load(dataset)
    index = {obs.tobytes(): i for i, obs in enumerate(buffer.obs)}  # the row of each history's last obs
    rows = [index[h[-1].tobytes()] for h in this]
    actions = np.stack([buffer.action[r:r + cfg.n_action_steps + 1] for r in rows])  # one past the chunk
    return this, nxt, actions


def sample_chunks(policy, histories: np.ndarray, noise: torch.Tensor) -> np.ndarray:
    """(N, draws, Ta, Da) normalised executed actions: every history with every noise draw."""
    n, draws = len(histories), noise.shape[0]
    batch = np.repeat(histories, draws, axis=0)
    policy.reset()
    raw = policy.predict_action_chunk(batch, noise.repeat(n, 1, 1))
    policy.reset()
    normed = policy.action_normalizer.normalize(torch.from_numpy(raw)).numpy()
    return normed.reshape(n, draws, *normed.shape[1:])


def measure(policy, method, checkpoint, this, nxt, demo, noise) -> dict:
    remover = apply_method(policy, method, checkpoint)
    try:
        a, b = sample_chunks(policy, this, noise), sample_chunks(policy, nxt, noise)
    finally:
        if remover:
            remover.remove()
    demo = demo[:, None, :-1]  # (N, 1, Ta, Da)
    return {
        "spread": float(a.std(axis=1).mean()),
        "demo_error": float(np.linalg.norm(a - demo, axis=-1).mean()),
        "mean_error": float(np.linalg.norm(a.mean(axis=1, keepdims=True) - demo, axis=-1).mean()),
        "jump": float(np.linalg.norm(b[:, :, 0] - a[:, :, -1], axis=-1).mean()),
        "step": float(np.linalg.norm(np.diff(a, axis=2), axis=-1).mean()),
    }


@hydra_app(ReuseEffectConfig, "reuse_effect")
def main(cfg: ReuseEffectConfig) -> dict:
    torch.set_num_threads(cfg.num_threads)
    policy = pa.load_policy(cfg.checkpoint)
    dataset = policy.config.info.get("dataset")
    if not dataset or not Path(dataset).exists():
        raise SystemExit(f"{cfg.checkpoint}: its demo dataset {dataset!r} is not here; collect it first")
    this, nxt, demo = demo_next_actions(dataset, cfg.observations, policy, cfg.seed)
    demo = policy.action_normalizer.normalize(torch.from_numpy(demo)).numpy()
    shape = (cfg.draws, policy.config.horizon, policy.config.action_dim)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(cfg.seed))
    steps = np.linalg.norm(np.diff(demo, axis=1), axis=-1)  # (N, Ta): the last one crosses the boundary
    rows = {"demo": {"spread": 0.0, "demo_error": 0.0, "mean_error": 0.0, "jump": float(steps[:, -1].mean()),
                     "step": float(steps[:, :-1].mean())}}
    print(f"{'demo':<28}" + "".join(f"{k} {v:.4f}  " for k, v in rows["demo"].items()), flush=True)
    for spec in cfg.methods:
        rows[spec] = measure(policy, parse_method(spec), cfg.checkpoint, this, nxt, demo, noise)
        print(f"{spec:<28}" + "".join(f"{k} {v:.4f}  " for k, v in rows[spec].items()), flush=True)
    out = Path(cfg.out or f"eval/results/reuse_effect/{Path(cfg.checkpoint).name}.json")
    write_json(out, {"checkpoint": cfg.checkpoint, "checkpoint_hash": policy.checkpoint_hash,
                     "config": asdict(cfg), "results": rows})
    print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    main()
