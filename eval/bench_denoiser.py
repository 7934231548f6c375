"""Micro-benchmark of one chunk (observation history in -> actions out) at batch 1, per method.

    python eval/bench_denoiser.py checkpoint=checkpoints/lift_dp_t
    python eval/bench_denoiser.py checkpoint=... 'methods=[uncached,every_step,bac10,compile,compile+bac10]'
    python eval/bench_denoiser.py model=pi0      # a VLA denoiser at real size, random weights (eval/profile_vla.py)

One process, the same observation histories (from the checkpoint's demo dataset) and the same noise
for every method. Methods are timed in interleaved rounds (each round times `repeats` chunks of every
method) so that a slow period on a shared machine hits all of them alike. Prints per method: median
chunk latency, speedup over uncached, FLOP ratio (counted by torch's FlopCounterMode on the chunk),
achieved / ideal = speedup x FLOP ratio (1.0 = the time saved matches the FLOPs saved), and for a static
schedule that skips every block on some steps, the median time of such a fully cached step
(`fully_cached_step_ms`: from the loop's `clock.at(k)` to the next step's, i.e. the step's context view,
the denoiser call and the sampler update; stamped during the timed chunks, ~1 us per step).
"""

import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python eval/bench_denoiser.py` from the root

import policy_accel as pa  # noqa: E402
from eval.cli import hydra_app  # noqa: E402
from eval.methods import apply_method, parse_method  # noqa: E402
from eval.profile_vla import MODELS, SCALES, check_methods, profile, report  # noqa: E402
from policy_accel.calibration import demo_observations  # noqa: E402
from policy_accel.jsonfile import write_json  # noqa: E402

CHECKPOINT_METHODS = ["uncached", "every_step", "ddim10", "uniform10", "taylorseer10o2", "bac10", "bac_taylor10o2"]


@dataclass
class BenchConfig:
    checkpoint: str = "checkpoints/lift_dp_t"
    model: str | None = None  # instead of a checkpoint: a VLA denoiser with random weights (eval/profile_vla.py)
    scale: str = "real"  # model=...: "real" (upstream sizes) or "tiny" (the same code path in seconds)
    methods: list[str] | None = None  # default: CHECKPOINT_METHODS, or profile_vla.default_methods
    observations: int | None = None  # distinct observation histories, cycled; default 8 (model=...: 2 conditions)
    rounds: int | None = None  # default 5 (model=...: 2)
    repeats: int | None = None  # chunks per method per round; default 4 (model=...: 1)
    warmup: int = 2  # untimed chunks per method after applying it (compile happens here); model=...: its FLOP chunk
    prefix_layers: int = 1  # model=...: stand-in VLM layers timed per pass (scaled to the VLM's depth)
    calib_chunks: int = 1  # model=...: random conditions a BAC schedule is calibrated on
    seed: int = 0  # model=...: weights, conditions and noise
    num_threads: int = 1
    device: str = "cpu"
    out: str | None = None  # JSON results; default outputs/bench_<policy or model[_tiny]>.json

    def __post_init__(self):
        for name in ("observations", "rounds", "repeats", "num_threads", "prefix_layers", "calib_chunks"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.model is None:
            for spec in self.methods or CHECKPOINT_METHODS:
                parse_method(spec)
            return
        if self.model not in MODELS or self.scale not in SCALES:
            raise ValueError(f"model must be one of {MODELS} and scale one of {SCALES}")
        check_methods(self.methods or [])


def time_chunks(policy, histories, noises, count: int, offset: int = 0) -> list[float]:
    times = []
    for i in range(offset, offset + count):
        h, noise = histories[i % len(histories)], noises[i % len(noises)]
        start = time.perf_counter()
        policy.predict_action_chunk(h, noise)  # numpy out: synchronised on a GPU too
        times.append(time.perf_counter() - start)
    return times


def time_prefix(policy, histories) -> list[float]:
    """Seconds of the per-chunk prefix alone, once per history: normalising the observations and
    `model.prepare` (a VLA's stand-in VLM prefix K/V or condition tokens, DP-T's condition encoder, the
    per-chunk time tables). No cache touches it; a chunk's latency minus it is the denoising loop's."""
    times = []
    with torch.no_grad():
        for h in histories:
            start = time.perf_counter()
            cond = policy.obs_normalizer.normalize(torch.from_numpy(h).to(policy.device))
            policy.model.prepare(cond.to(policy.dtype), policy.timesteps)
            times.append(time.perf_counter() - start)
    return times


@contextmanager
def fully_cached_steps(policy, out: list[float]):
    """Append to `out` the seconds of every step on which the policy's cache skips every block (its stack
    shortcut's steps), stamped at the clock's step changes; nothing when the cache has no such step."""
    stack = getattr(policy.cache, "stack", None)
    if stack is None or not stack.enabled or not any(stack.skip):
        yield
        return
    clock, stamp = policy.clock, []

    def at(k, t):
        now = time.perf_counter()
        if stamp and stack.skip[stamp[0]]:
            out.append(now - stamp[1])
        stamp[:] = k, now
        type(clock).at(clock, k, t)

    def end_chunk():
        at(None, None)
        stamp.clear()
        type(clock).end_chunk(clock)

    clock.at, clock.end_chunk = at, end_chunk  # instance attributes over the class's methods
    try:
        yield
    finally:
        del clock.at, clock.end_chunk


def time_methods(policy, methods: list, checkpoint, histories: list[np.ndarray], rounds: int, repeats: int,
                 warmup: int, progress: bool = True, cached_steps: dict | None = None,
                 prefix: list | None = None) -> tuple[dict, dict]:
    """Interleaved batch-1 timing: per method spec, chunk seconds (rounds x repeats) and FLOPs per chunk.
    `histories` are (1, n_obs_steps, obs_dim); every method sees the same histories and noise. FLOPs of a
    cache that decides from the data (a `batch_coupled` hook: First Block Cache) are the mean over all
    histories, history i with noise seed i; schedules and MagCache's calibrated ratios do not see the input.
    `cached_steps`, if given, receives per method spec the seconds of its fully cached steps (see above);
    `prefix`, if given, the seconds of the per-chunk prefix alone (time_prefix), once per history each round."""
    pc = policy.config
    gen = torch.Generator().manual_seed(0)
    noises = [torch.randn(1, pc.horizon, pc.action_dim, generator=gen) for _ in histories]
    times: dict[str, list[float]] = {m.spec: [] for m in methods}
    flops: dict[str, int] = {}
    with tqdm(total=rounds * len(methods), desc="latency", unit="method", disable=not progress) as bar:
        for r in range(rounds):
            for m in methods:
                remover = apply_method(policy, m, checkpoint)
                # the first chunk after attaching probes each hook's FLOPs (and compiles): never timed,
                # as a deployed policy is accelerated once
                time_chunks(policy, histories, noises, warmup if r == 0 else 1)
                if r == 0:
                    data_driven = policy.cache is not None and policy.cache.batch_coupled
                    counted = histories if data_driven else histories[:1]
                    flops[m.spec] = float(np.mean([pa.chunk_flops(policy, h, seed=i) for i, h in enumerate(counted)]))
                stamping = nullcontext() if cached_steps is None else \
                    fully_cached_steps(policy, cached_steps.setdefault(m.spec, []))
                with stamping:
                    times[m.spec] += time_chunks(policy, histories, noises, repeats, r * repeats)
                if remover:
                    remover.remove()
                bar.update(1)
            if prefix is not None:
                prefix += time_prefix(policy, histories)
    return times, flops


def bench(cfg: BenchConfig) -> dict:
    torch.set_num_threads(cfg.num_threads)
    policy = pa.load_policy(cfg.checkpoint, device=cfg.device)
    rounds, repeats = cfg.rounds or 5, cfg.repeats or 4
    pc = policy.config
    dataset = policy.config.info.get("dataset")
    if not dataset or not Path(dataset).exists():
        raise SystemExit(f"{cfg.checkpoint}: its demo dataset {dataset!r} is not here; collect it first "
                         f"(see the checkpoint's card.md)")
    histories = [h[None] for h in demo_observations(dataset, cfg.observations or 8, pc.n_obs_steps)]
    methods = [parse_method(m) for m in cfg.methods or CHECKPOINT_METHODS]
    cached_steps: dict[str, list[float]] = {}
    times, flops = time_methods(policy, methods, cfg.checkpoint, histories, rounds, repeats, cfg.warmup,
                                cached_steps=cached_steps)
    base = "uncached" if "uncached" in times else methods[0].spec
    base_ms = 1e3 * float(np.median(times[base]))
    rows = []
    for m in methods:
        ms, steps = 1e3 * float(np.median(times[m.spec])), cached_steps[m.spec]
        speedup, flop_ratio = base_ms / ms, flops[m.spec] / flops[base]
        rows.append({"method": m.name, "setting": m.spec, "latency_ms_p50": ms,
                     "latency_ms_mean": 1e3 * float(np.mean(times[m.spec])),  # cross-chunk reuse: p50 is bimodal
                     "latency_ms_p95": 1e3 * float(np.percentile(times[m.spec], 95)), "speedup": speedup,
                     "flops_ratio": flop_ratio, "achieved_over_ideal": speedup * flop_ratio,
                     "chunks_timed": len(times[m.spec]),
                     "fully_cached_step_ms": 1e3 * float(np.median(steps)) if steps else None,
                     "fully_cached_steps_timed": len(steps)})
    return {"checkpoint": cfg.checkpoint, "baseline": base, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "config": asdict(cfg), "results": rows}


def bench_model(cfg: BenchConfig) -> dict:
    torch.set_num_threads(cfg.num_threads)
    result = profile(cfg.model, cfg.scale, cfg.methods, cfg.rounds or 2, cfg.repeats or 1,
                     cfg.observations or 2, cfg.prefix_layers, cfg.calib_chunks, cfg.seed, cfg.device)
    print(report(result))
    out = Path(cfg.out or f"outputs/bench_{cfg.model}{'' if cfg.scale == 'real' else '_' + cfg.scale}.json")
    write_json(out, result)
    print(f"wrote {out}")
    return result


@hydra_app(BenchConfig, "bench")
def main(cfg: BenchConfig) -> dict:
    if cfg.model is not None:
        return bench_model(cfg)
    result = bench(cfg)
    n = (cfg.rounds or 5) * (cfg.repeats or 4)
    print(f"{cfg.checkpoint}: batch 1, {result['threads']} thread(s), torch {result['torch']}; "
          f"median of {n} chunks per method, interleaved")
    head = (f"{'method':<28}{'ms/chunk':>10}{'mean':>8}{'p95':>8}{'speedup':>9}{'FLOPs':>8}{'achieved/ideal':>16}"
            f"{'cached step ms':>16}")
    print(head + "\n" + "-" * len(head))
    for r in result["results"]:
        step = "-" if r["fully_cached_step_ms"] is None else f"{r['fully_cached_step_ms']:.3f}"
        print(f"{r['setting']:<28}{r['latency_ms_p50']:>10.1f}{r['latency_ms_mean']:>8.1f}{r['latency_ms_p95']:>8.1f}"
              f"{r['speedup']:>9.2f}"
              f"{r['flops_ratio']:>8.3f}{r['achieved_over_ideal']:>16.2f}{step:>16}")
    out = Path(cfg.out or f"outputs/bench_{Path(cfg.checkpoint).name}.json")
    write_json(out, result)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
