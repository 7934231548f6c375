"""GPU check: batch-1 chunk latency and correctness of each deployment variant, in one run (<= 8 min).

    python eval/gpu_check.py                                       # checkpoints/lift_dp_t on cuda
    python eval/gpu_check.py checkpoint=checkpoints/can_dp_t best=bac_taylor5o1f@ddim20
    python eval/gpu_check.py device=cpu                            # the same on this CPU (CUDA variants skipped)
    python eval/gpu_check.py smoke=true device=cpu compile_backend=eager chunks=3 \
        'methods=[uncached,ddim2]' best=uniform2@ddim4                # a tiny DDPM-4 policy (the test)

Variants: method (`methods` and `best`) x mode x dtype (`dtypes`):
  eager     the policy as it is
  compiled  the whole chunk as one graph (policy.compile_chunk(): torch.compile, fullgraph=True)
  graphed   that graph captured as one CUDA graph and replayed (ChunkGraph.use_cuda_graph); CUDA only
Per variant: compile / capture seconds (the first chunk), batch-1 chunk latency p50 / p99 (observation
history in -> numpy actions out, so synchronised), the max |action error| against the CPU fp32 eager
reference of the same method on the same observations and noise (initial and per-step), within
`tolerance[dtype]` or not, and for compiled / graphed on CUDA one chunk run under
torch.cuda.set_sync_debug_mode("error"), where any host sync raises. All eager variants run first,
then the compiled ones from the smallest graph up: uncached (all native steps unrolled; DDPM-100's
dynamo trace alone took ~3 min on the dev CPU) compiles last, and `time_budget_s` stops what is left.
A variant that cannot run says why: "skipped: no CUDA", "skipped: time budget", "failed: <error>".
Writes one JSON file.
"""

import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python eval/gpu_check.py` from the root

import policy_accel as pa  # noqa: E402
from eval.cli import hydra_app  # noqa: E402
from eval.methods import apply_method, parse_method  # noqa: E402
from policy_accel.calibration import demo_observations  # noqa: E402
from policy_accel.jsonfile import write_json  # noqa: E402
from policy_accel.precision import parse_dtype  # noqa: E402
from policy_accel.sampling import build_sampler  # noqa: E402

MODES = ("eager", "compiled", "graphed")


@dataclass
class GPUCheckConfig:
    checkpoint: str = "checkpoints/lift_dp_t"
    methods: list[str] = field(default_factory=lambda: ["uncached", "ddim10", "uniform5@ddim10"])
    best: str = "bac_taylor5o1f@ddim20"  # the best setting, by method string
    modes: list[str] = field(default_factory=lambda: list(MODES))
    dtypes: list[str] = field(default_factory=lambda: ["float32", "bfloat16"])
    device: str = "cuda"
    observations: int = 8  # demo observation histories (reference and error check), cycled for timing
    chunks: int = 100  # timed chunks per variant
    warmup: int = 3
    tolerance: dict[str, float] = field(default_factory=lambda: {"float32": 5e-3, "bfloat16": 0.25, "float16": 0.1})
    compile_backend: str = "inductor"
    time_budget_s: float = 450.0  # variants not started by then are reported as skipped
    smoke: bool = False  # a tiny random policy instead of the checkpoint (CPU test)
    num_threads: int = 1
    out: str = "outputs/gpu_check.json"

    def __post_init__(self):
        for m in self.modes:
            if m not in MODES:
                raise ValueError(f"unknown mode {m!r}; expected some of {MODES}")
        self.dtypes = [str(parse_dtype(d)).removeprefix("torch.") for d in self.dtypes]  # "bf16" -> "bfloat16"
        for d in self.dtypes:
            if d not in self.tolerance:
                raise ValueError(f"no tolerance for dtype {d}: add tolerance.{d}=<max abs action error>")
        for spec in [*self.methods, self.best]:
            parse_method(spec)
        if self.observations < 1 or self.chunks < 1 or self.warmup < 0:
            raise ValueError("observations and chunks must be >= 1, warmup >= 0")


def tiny_checkpoint(path: Path) -> Path:
    """A random DP-T policy small enough to compile in seconds (smoke mode: DDPM-4, so give methods of
    at most 4 steps, e.g. methods=[uncached,ddim2] best=uniform2@ddim4)."""
    torch.manual_seed(0)
    cfg = pa.PolicyConfig(obs_dim=5, action_dim=3, horizon=8, n_obs_steps=2, n_action_steps=4,
                          model=dict(n_layer=1, n_head=2, n_emb=16), sampler=pa.SamplerConfig("ddpm", 4, 4))
    policy = pa.Policy(cfg)
    rng = np.random.default_rng(0)
    policy.fit_normalizers(rng.uniform(-2, 2, (100, 5)), rng.uniform(-1, 1, (100, 3)))
    return policy.save(path)


def histories(cfg: GPUCheckConfig, checkpoint) -> list[np.ndarray]:
    pc = pa.load_policy(checkpoint).config
    if cfg.smoke:
        rng = np.random.default_rng(0)
        return [rng.uniform(-2, 2, (1, pc.n_obs_steps, pc.obs_dim)).astype(np.float32) for _ in range(cfg.observations)]
    dataset = pc.info.get("dataset")
    if not dataset or not Path(dataset).exists():
        raise SystemExit(f"{checkpoint}: its demo dataset {dataset!r} is not here; copy data/ beside the checkpoints")
    return [h[None] for h in demo_observations(dataset, cfg.observations, pc.n_obs_steps)]


def noise_for(policy, i: int) -> tuple[torch.Tensor, list]:
    """Chunk i's initial and per-step noise on the CPU, for the sampler the method set."""
    gen = torch.Generator().manual_seed(i)
    noise = torch.randn(1, policy.config.horizon, policy.config.action_dim, generator=gen)
    return noise, build_sampler(policy.sampler).draw_step_noise(noise, gen)


def chunk_with_noise(policy, history: np.ndarray, i: int) -> np.ndarray:
    noise, step_noise = noise_for(policy, i)
    return policy.predict_action_chunk(history, noise.to(policy.device), step_noise)


def references(checkpoint, methods, obs) -> dict:
    """Per method spec: the CPU fp32 eager actions on each observation, or why the method cannot run."""
    policy = pa.load_policy(checkpoint)
    out = {}
    for m in methods:
        try:
            remover = apply_method(policy, m, checkpoint)
        except Exception as e:  # e.g. a missing schedule file: every variant of it says so
            out[m.spec] = f"failed: {type(e).__name__}: {e}"
            continue
        out[m.spec] = [chunk_with_noise(policy, h, i) for i, h in enumerate(obs)]
        remover.remove()
    return out


def sync_check(policy, history: np.ndarray) -> str:
    """One chunk of the compiled / graphed path under sync debug mode "error" (inputs already on the GPU)."""
    with torch.inference_mode():
        hist = torch.from_numpy(history).to(policy.device)
        noise = torch.randn(1, policy.config.horizon, policy.config.action_dim, device=policy.device)
        step_noise = build_sampler(policy.sampler).draw_step_noise(noise)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            policy.chunk_graph(hist, noise, step_noise)
        except RuntimeError as e:
            return f"host sync: {' '.join(str(e).split())[:300]}"
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
    return "ok: no host sync"


def run_variant(cfg, policy, mode: str, method, obs, reference) -> dict:
    row = {"method": method.spec, "mode": mode, "dtype": str(policy.dtype).removeprefix("torch.")}
    cuda = policy.device.type == "cuda"
    if mode == "graphed" and not cuda:
        return {**row, "status": "skipped: no CUDA"}
    if mode == "compiled":
        policy.compile_chunk(backend=cfg.compile_backend)
    elif mode == "graphed":
        if policy.chunk_graph is None:  # compiled was not run: compile here
            policy.compile_chunk(backend=cfg.compile_backend)
        policy.chunk_graph.use_cuda_graph()
    start = time.perf_counter()
    policy.predict_action_chunk(obs[0])  # compile / capture happens here
    row["first_chunk_s"] = time.perf_counter() - start
    for i in range(cfg.warmup):
        policy.predict_action_chunk(obs[i % len(obs)])
    errors = [np.abs(chunk_with_noise(policy, h, i) - reference[i]).max() for i, h in enumerate(obs)]
    times = []
    for i in range(cfg.chunks):
        start = time.perf_counter()
        policy.predict_action_chunk(obs[i % len(obs)])
        times.append(time.perf_counter() - start)
    ms = 1e3 * np.array(times)
    tol = cfg.tolerance[row["dtype"]]
    row |= {"status": "ok", "latency_ms_p50": float(np.median(ms)), "latency_ms_p99": float(np.percentile(ms, 99)),
            "chunks_timed": len(ms), "max_abs_error": float(max(errors)), "tolerance": tol,
            "within_tolerance": bool(max(errors) <= tol)}
    if mode == "eager":
        row["sync_check"] = "not checked: the eager chunk builds its timestep tensors on the device per chunk"
    else:
        row["sync_check"] = sync_check(policy, obs[0]) if cuda else "skipped: no CUDA"
    return row


def machine(device: str) -> dict:
    from eval.rollout import cpu_model

    info = {"host": platform.node(), "cpu": platform.processor() or platform.machine(), "cpu_model": cpu_model(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda, "float32_matmul_precision": torch.get_float32_matmul_precision()}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def plan(cfg: GPUCheckConfig, methods: list, native: pa.SamplerConfig) -> list[tuple]:
    """(method, dtype, mode) in the order they run: every eager variant first (no compile), then the
    compiled and graphed ones, the fewest steps (the smallest graph) first: the uncached chunk, which
    unrolls all native steps, compiles last. Compiled and graphed of one (method, dtype) run together."""
    eager = [(m, d, "eager") for m in methods for d in cfg.dtypes if "eager" in cfg.modes]
    by_steps = sorted(methods, key=lambda m: m.sampler(native).num_steps)
    modes = [mode for mode in ("compiled", "graphed") if mode in cfg.modes]
    graphs = [(m, d, mode) for m in by_steps for d in cfg.dtypes for mode in modes]
    return eager + graphs


def check(cfg: GPUCheckConfig, checkpoint) -> dict:
    begin = time.perf_counter()
    methods = [parse_method(s) for s in dict.fromkeys([*cfg.methods, cfg.best])]
    obs = histories(cfg, checkpoint)
    reference = references(checkpoint, methods, obs)
    policies = {d: pa.load_policy(checkpoint, device=cfg.device, dtype=d) for d in cfg.dtypes}
    rows, applied = [], {}  # dtype -> the method applied to that policy now
    for m, dtype, mode in plan(cfg, methods, policies[cfg.dtypes[0]].config.sampler):
        row = {"method": m.spec, "mode": mode, "dtype": dtype}
        if isinstance(reference[m.spec], str):  # the method cannot be applied (e.g. no schedule file)
            rows.append({**row, "status": reference[m.spec]})
            continue
        if time.perf_counter() - begin > cfg.time_budget_s:
            rows.append({**row, "status": f"skipped: time budget ({cfg.time_budget_s:.0f} s) spent"})
            continue
        policy = policies[dtype]
        if applied.get(dtype) != m.spec:
            torch._dynamo.reset()  # one compile per (method, dtype); its compiled and graphed variants share it
            apply_method(policy, m, checkpoint)  # also drops the previous chunk graph
            applied[dtype] = m.spec
        try:
            rows.append(run_variant(cfg, policy, mode, m, obs, reference[m.spec]))
        except Exception as e:
            rows.append({**row, "status": f"failed: {type(e).__name__}: {' '.join(str(e).split())[:500]}"})
    ok = all(r["status"] == "skipped: no CUDA" or (r["status"] == "ok" and r["within_tolerance"]
             and not r["sync_check"].startswith("host sync")) for r in rows)
    return {"checkpoint": str(checkpoint), "smoke": cfg.smoke, "device": cfg.device, "machine": machine(cfg.device),
            "config": asdict(cfg), "wall_s": time.perf_counter() - begin, "all_ok": ok, "results": rows}


def format_table(rows: list[dict]) -> str:
    head = f"{'method':<24}{'mode':<10}{'dtype':<10}{'first s':>9}{'p50 ms':>9}{'p99 ms':>9}{'max err':>10}  status"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['method']:<24}{r['mode']:<10}{r['dtype']:<10}{'':>37}  {r['status']}")
            continue
        flag = "ok" if r["within_tolerance"] else f"ERROR > {r['tolerance']}"
        lines.append(f"{r['method']:<24}{r['mode']:<10}{r['dtype']:<10}{r['first_chunk_s']:>9.1f}"
                     f"{r['latency_ms_p50']:>9.2f}{r['latency_ms_p99']:>9.2f}{r['max_abs_error']:>10.1e}  {flag}; "
                     f"{r['sync_check']}")
    return "\n".join(lines)


@hydra_app(GPUCheckConfig, "gpu_check")
def main(cfg: GPUCheckConfig) -> dict:
    torch.set_num_threads(cfg.num_threads)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run on a GPU machine, or device=cpu (smoke=true for the tiny policy)")
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = tiny_checkpoint(Path(tmp) / "tiny_dp_t") if cfg.smoke else cfg.checkpoint
        result = check(cfg, checkpoint)
    print(f"{result['checkpoint']} on {cfg.device} ({result['machine'].get('gpu', result['machine']['cpu'])}), "
          f"torch {torch.__version__}, {result['wall_s']:.0f} s")
    print(format_table(result["results"]))
    write_json(Path(cfg.out), result)
    print(f"all ok: {result['all_ok']}; wrote {cfg.out}")
    return result


if __name__ == "__main__":
    main()
