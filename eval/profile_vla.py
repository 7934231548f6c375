"""Real-size profile of a VLA denoiser with random weights (latency and FLOPs only), for eval/bench_denoiser.py:

    python eval/bench_denoiser.py model=pi0         # pi0 | pi05 | smolvla | groot_n15 | cogact_b (cogact_s, cogact_l)
    python eval/bench_denoiser.py model=pi05 scale=tiny 'methods=[uncached,uniform2]' rounds=1   # seconds

At batch 1, in one process: (1) the per-chunk prefix cost: flow experts (π0, π0.5, SmolVLA), a stand-in with
the real VLM's text-transformer dimensions run over the upstream number of prefix tokens (the vision encoder
is not included), plus the expert's own `prepare`; GR00T N1.5, its `prepare` (vlln + vl_self_attention +
state encoder + the cross blocks' VL K/V; the Eagle backbone not included); CogACT, its `prepare` (the LLM
not included); (2) the expert loop per chunk and per step; (3) the loop's share of the uncached chunk;
(4) per-block FLOPs of one step (torch's FlopCounterMode, grouped by cache block); (5) per method the
speedup of the loop and of the whole chunk (prefix + loop) and the FLOP ratios.

Timing is interleaved as in the checkpoint benchmark: each round times the stand-in VLM once and `repeats`
chunks of every method. The stand-in VLM is timed on `prefix_layers` of its layers (default 1) and scaled to
its depth (the layers are identical in shape). Each method's first chunk is untimed: it counts the FLOPs and
warms up. The expert reads a random N(0, 1) prefix K/V of upstream length, not the stand-in's output.

Methods: `uncached` (the native sampler), `steps<K>` (the native sampler kind with K steps), and the cache
method strings of policy_accel/recipes.py without '@ddim' (every_step, uniform<N>, taylorseer<N>o<m>,
bac<S>[nb], bac_taylor<S>o<m>[nb][f]); BAC schedules are calibrated here on `calib_chunks` random conditions
with the random weights (a real schedule of this model, meaningless for a trained one).
"""

import re
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

import policy_accel as pa
from policy_accel.cache import Binding
from policy_accel.calibration import calibrate_denoiser
from policy_accel.models.action_dit import ActionDiT, ActionDiTConfig
from policy_accel.models.flow_expert import FlowExpert, FlowExpertConfig, Layer
from policy_accel.models.flow_expert_io import rope_table
from policy_accel.models.stand_ins import random_prefix
from policy_accel.recipes import BUBBLE_BLOCKS, parse_method
from policy_accel.sampling import build_sampler

MODELS = ("pi0", "pi05", "smolvla", "groot_n15", "cogact_s", "cogact_b", "cogact_l")
SCALES = ("real", "tiny")
CACHE_FAMILIES = ("every_step", "uniform", "taylorseer", "bac", "bac_taylor")
GROOT_VL_TOKENS = 64 + 32  # assumed: 1 camera x 64 Eagle tokens (224 px, patch 14, pixel shuffle 0.5) + 32 text
VLM = {  # the text transformer a flow expert reads its prefix K/V from (its width, MLP and heads: the config's)
    "pi0": "PaliGemma's gemma_2b", "pi05": "PaliGemma's gemma_2b", "smolvla": "SmolVLM2-500M's first 16 layers"}
EXCLUDED = {"pi0": "the SigLIP vision encoder", "pi05": "the SigLIP vision encoder",
            "smolvla": "the SigLIP vision encoder and connector", "groot_n15": "the Eagle 2.5 VLM backbone",
            "cogact": "the VLM (Llama-2 7B and its vision encoders)"}


@dataclass
class Subject:
    """One model at one scale: its denoiser, native sampler and guidance, random conditions, stand-in VLM."""

    name: str
    denoiser: nn.Module
    sampler: pa.SamplerConfig
    guidance: pa.Guidance | None
    action_shape: tuple[int, int]
    conds: list = field(default_factory=list)
    vlm: nn.ModuleList | None = None  # the stand-in VLM's timed layers
    vlm_depth: int = 0  # the real VLM's layers
    vlm_tokens: int = 0

    @property
    def family(self) -> str:
        return "cogact" if self.name.startswith("cogact") else self.name

    def binding(self, sampler: pa.SamplerConfig) -> Binding:
        return Binding(f"random-{self.name}", sampler.kind, sampler.num_steps)


def flow_config(name: str, scale: str) -> FlowExpertConfig:
    mode = {"pi0": "pi0", "pi05": "pi05", "smolvla": "smolvla"}[name]
    if scale == "real":
        return getattr(FlowExpertConfig, mode)()
    return FlowExpertConfig(mode=mode, action_dim=4, horizon=8, n_layer=2, width=32, n_head=4,
                            n_kv_head=2 if mode == "smolvla" else 1, head_dim=8, mlp_dim=48, prefix_len=12,
                            prefix_width=24, prefix_mlp_dim=40, state_dim=4 if mode == "pi0" else 0)


def dit_config(name: str, scale: str) -> ActionDiTConfig:
    if scale == "real":
        return ActionDiTConfig.groot_n15() if name == "groot_n15" else ActionDiTConfig.cogact(name[-1].upper())
    if name == "groot_n15":
        return ActionDiTConfig(action_dim=4, mode="groot_n15", horizon=8, num_layers=2, num_heads=2, head_dim=8,
                               cross_attention_dim=16, hidden_size=16, state_dim=4, num_embodiments=2,
                               num_future_tokens=2, max_seq_len=8, vl_heads=2, vl_head_dim=8)
    return ActionDiTConfig(action_dim=4, mode="cogact", horizon=8, num_layers=2, num_heads=2, head_dim=8, cond_dim=16)


@torch.no_grad()
def build(name: str, scale: str, n_conds: int, prefix_layers: int = 1, seed: int = 0, device: str = "cpu"
          ) -> Subject:
    """The model `name` at `scale` with seeded random weights, `n_conds` random conditions of upstream length."""
    if name not in MODELS or scale not in SCALES:
        raise ValueError(f"model must be one of {MODELS} and scale one of {SCALES}, got {name!r}, {scale!r}")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    if name in ("pi0", "pi05", "smolvla"):
        cfg = flow_config(name, scale)
        depth = cfg.n_layer  # expert layer i reads VLM layer i: the VLM has (at least) as many
        style = "llama" if cfg.mode == "smolvla" else "gemma"
        with torch.device(device):  # built in place (no host copy of a GPU model)
            model = FlowExpert(cfg).eval()
            layers = nn.ModuleList(Layer(cfg, cfg.prefix_width, cfg.prefix_mlp_dim, style)
                                   for _ in range(min(prefix_layers, depth))).eval()
        conds = [random_prefix(cfg, 1, gen, device) for _ in range(n_conds)]
        return Subject(name, model, pa.SamplerConfig("flow", 10), None, (cfg.horizon, cfg.action_dim), conds,
                       layers, depth, cfg.prefix_len)
    cfg = dit_config(name, scale)
    with torch.device(device):
        model = ActionDiT(cfg).eval()
    randn = lambda *shape: torch.randn(shape, generator=gen).to(device)  # noqa: E731
    if name == "groot_n15":
        tokens = GROOT_VL_TOKENS if scale == "real" else 6
        conds = [{"backbone_features": randn(1, tokens, cfg.cross_attention_dim), "state": randn(1, 1, cfg.state_dim),
                  "embodiment_id": torch.zeros(1, dtype=torch.long, device=device)} for _ in range(n_conds)]
        return Subject(name, model, pa.SamplerConfig("flow", 4), None, (cfg.horizon, cfg.action_dim), conds)
    nn.init.normal_(model.final_layer.linear.weight, std=0.02)  # zero-initialised upstream: make eps depend on x
    conds = [{"cognition_features": randn(1, 1, cfg.cond_dim)} for _ in range(n_conds)]
    return Subject(name, model, pa.SamplerConfig("ddim", 10), pa.Guidance(1.5), (cfg.horizon, cfg.action_dim), conds)


@dataclass
class Setting:
    """One method of the profile: its sampler and cache config (None: uncached)."""

    spec: str
    sampler: pa.SamplerConfig
    config: object = None
    schedule: str = ""  # how its schedule was made


def default_methods(subject: Subject) -> list[str]:
    K = subject.sampler.num_steps
    return ["uncached", f"steps{K // 2}", "uniform2", "taylorseer2o1", "taylorseer2o2", f"bac{K // 2}",
            f"bac_taylor{K // 2}o1"]


def check_methods(specs: list[str]) -> None:
    for spec in specs:
        if spec == "uncached" or re.fullmatch(r"steps[1-9]\d*", spec):
            continue
        m = parse_method(spec)
        if m.family not in CACHE_FAMILIES or m.base_steps is not None or m.compiled:
            raise ValueError(f"method {spec!r} is not available in the VLA profile: use uncached, steps<K> or one of "
                             f"{', '.join(CACHE_FAMILIES)} without '@ddim' or 'compile+' (eval/profile_vla.py)")


def settings(subject: Subject, specs: list[str], calib_chunks: int, notes: list[str]) -> list[Setting]:
    """Resolve method strings; calibrate each BAC schedule they need once, on random conditions."""
    native, out, schedules = subject.sampler, [], {}
    for spec in specs:
        if spec == "uncached":
            out.append(Setting(spec, native))
            continue
        if spec.startswith("steps"):
            out.append(Setting(spec, pa.SamplerConfig(native.kind, int(spec[5:]), native.num_train_steps)))
            continue
        m = parse_method(spec)
        if m.family not in ("bac", "bac_taylor"):
            out.append(Setting(spec, native, m.recipe.build(m.params, None, False)))
            continue
        bubble, order = 0 if m.params["nb"] else BUBBLE_BLOCKS, 1 if m.params["f"] else 0
        key = (m.params["budget"], bubble, order, m.params["calls"])
        if key not in schedules:
            schedules[key] = calibrate(subject, *key, calib_chunks)
        sched = schedules[key]
        size = f"budget {key[0]}" if key[3] is None else f"pooled budget {key[3]:g} calls"
        how = (f"calibrated on {calib_chunks} random condition(s), {size}, bubbling union over {bubble} "
               f"blocks, {'order-1 forecast' if order else 'reuse'} criterion; computes "
               f"{sched.computed_fraction():.0%} of block-steps")
        out.append(Setting(spec, native, m.recipe.build(m.params, sched, False), how))
    if schedules:
        notes.append("BAC schedules are calibrated here on random conditions with the random weights: a real "
                     "schedule of this model, not of a trained one")
    return out


def calibrate(subject: Subject, budget: int | None, bubble_blocks: int, forecast_order: int, calls: float | None,
              chunks: int) -> pa.Schedule:
    clock, sampler = pa.StepClock(), subject.sampler
    gen = torch.Generator().manual_seed(1234)
    runs = [(subject.conds[i % len(subject.conds)], torch.randn(1, *subject.action_shape, generator=gen))
            for i in range(chunks)]

    def run(cond, noise):
        return lambda: pa.sample(subject.denoiser, subject.denoiser.prepare(cond, sampler.timesteps()),
                                 noise.to(_device(subject)), sampler, clock=clock, guidance=subject.guidance)

    with torch.no_grad():
        return calibrate_denoiser(subject.denoiser, clock, subject.binding(sampler), [run(c, n) for c, n in runs],
                                  budget, bubble_blocks, forecast_order=forecast_order, calls=calls,
                                  description=f"{chunks} random condition(s), random weights")


def _device(subject: Subject) -> torch.device:
    return next(subject.denoiser.parameters()).device


def vlm_pass(subject: Subject, tokens: torch.Tensor, rope) -> torch.Tensor:
    """The stand-in VLM's timed layers, full (self-attention over all prefix tokens, then the MLP)."""
    h, empty = tokens, tokens.new_zeros(1, subject.denoiser.config.n_kv_head, 0, subject.denoiser.config.head_dim)
    for layer in subject.vlm:
        h = h + layer.attn(h, (empty, empty), None, rope)
        h = h + layer.mlp(h)
    return h


def timed_chunk(subject: Subject, sampler: pa.SamplerConfig, clock, cond, noise, prepare_mode=None,
                loop_mode=None) -> tuple[float, float]:
    """One chunk at batch 1: seconds in `prepare` and in the sampling loop (optionally inside two modes)."""
    den, ts = subject.denoiser, sampler.timesteps()
    t0 = time.perf_counter()
    with prepare_mode or nullcontext():
        ctx = den.prepare(cond, ts)
    t1 = time.perf_counter()
    with loop_mode or nullcontext():
        pa.sample(den, ctx, noise, build_sampler(sampler), clock=clock, guidance=subject.guidance)
    return t1 - t0, time.perf_counter() - t1


def block_flops(subject: Subject) -> tuple[list[dict], float, float]:
    """FLOPs of one denoiser call (one branch), per cache block, and outside the blocks."""
    model, sampler = subject.denoiser, subject.sampler
    ctx = model.prepare(subject.conds[0], sampler.timesteps()).at_step(0)
    x = torch.randn(1, *subject.action_shape, device=_device(subject))
    with FlopCounterMode(display=False) as counter:
        model(x, torch.tensor(sampler.timesteps()[0], device=x.device), ctx)
    counts, root, modules = counter.get_flop_counts(), type(model).__name__, dict(model.named_modules())
    blocks = []
    for b in pa.find_blocks(model):
        m, kind = modules[b.name], b.kind
        if hasattr(m, "cross"):  # a flow expert's attention: joint with the prefix, or cross to it
            kind += " (cross)" if m.cross else " (joint)"
        elif hasattr(m, "is_cross"):
            kind += " (cross)" if m.is_cross else " (self)"
        blocks.append({"block": b.name, "kind": kind, "flops": float(sum(counts.get(f"{root}.{b.name}", {}).values()))})
    total = float(counter.get_total_flops())
    return blocks, total, total - sum(b["flops"] for b in blocks)


@torch.no_grad()
def profile(model: str, scale: str = "real", methods: list[str] | None = None, rounds: int = 2, repeats: int = 1,
            observations: int = 2, prefix_layers: int = 1, calib_chunks: int = 1, seed: int = 0,
            device: str = "cpu", progress: bool = True) -> dict:
    notes = []
    subject = build(model, scale, observations, prefix_layers, seed, device)
    specs = methods or default_methods(subject)
    check_methods(specs)
    todo = settings(subject, specs, calib_chunks, notes)
    blocks, step_flops, outside = block_flops(subject)
    dev, den = _device(subject), subject.denoiser
    gen = torch.Generator().manual_seed(seed + 1)
    noises = [torch.randn(1, *subject.action_shape, generator=gen).to(dev) for _ in subject.conds]
    clock = pa.StepClock()

    vlm = None
    if subject.vlm is not None:
        c = den.config
        tokens = torch.randn(1, subject.vlm_tokens, c.prefix_width, generator=gen).to(dev)
        rope = rope_table(torch.arange(subject.vlm_tokens, device=dev)[None], c.head_dim, c.rope_max_wavelength)
        with FlopCounterMode(display=False) as counter:  # also the warm-up pass
            vlm_pass(subject, tokens, rope)
        vlm = {"flops_timed": float(counter.get_total_flops()), "seconds_timed": []}

    times = {s.spec: {"prepare": [], "loop": []} for s in todo}
    flops = {}
    bar = tqdm(total=rounds * (len(todo) + (vlm is not None)), desc="profile", unit="item", disable=not progress)
    for r in range(rounds):
        if vlm is not None:
            start = time.perf_counter()
            vlm_pass(subject, tokens, rope)
            vlm["seconds_timed"].append(time.perf_counter() - start)
            bar.update(1)
        for s in todo:
            handle = None if s.config is None else pa.attach(den, s.config, clock, subject.binding(s.sampler))
            if r == 0:  # untimed: FLOPs (prepare and loop apart) and warm-up
                fp, fl = FlopCounterMode(display=False), FlopCounterMode(display=False)
                timed_chunk(subject, s.sampler, clock, subject.conds[0], noises[0], fp, fl)
                flops[s.spec] = (float(fp.get_total_flops()), float(fl.get_total_flops()))
            for i in range(r * repeats, (r + 1) * repeats):
                tp, tl = timed_chunk(subject, s.sampler, clock, subject.conds[i % len(subject.conds)],
                                     noises[i % len(noises)])
                times[s.spec]["prepare"].append(tp)
                times[s.spec]["loop"].append(tl)
            if handle is not None:
                handle.remove()
            bar.update(1)
    bar.close()
    return summarise(subject, todo, times, flops, vlm, blocks, step_flops, outside, notes,
                     dict(model=model, scale=scale, methods=specs, rounds=rounds, repeats=repeats,
                          observations=observations, prefix_layers=prefix_layers, calib_chunks=calib_chunks,
                          seed=seed, device=device))


def summarise(subject, todo, times, flops, vlm, blocks, step_flops, outside, notes, config) -> dict:
    med = lambda xs: float(np.median(xs))  # noqa: E731
    vlm_s = vlm_flops = 0.0
    prefix = {"excluded": EXCLUDED[subject.family]}
    if vlm is not None:
        c, timed = subject.denoiser.config, len(subject.vlm)
        scale = subject.vlm_depth / timed
        vlm_s, vlm_flops = med(vlm["seconds_timed"]) * scale, vlm["flops_timed"] * scale
        prefix["vlm_stand_in"] = {
            "what": f"{VLM[subject.name]}: {subject.vlm_depth} x {c.prefix_width}, "
                    f"{c.n_head} q / {c.n_kv_head} kv heads x {c.head_dim}, MLP {c.prefix_mlp_dim}",
            "tokens": subject.vlm_tokens, "layers_timed": timed, "depth": subject.vlm_depth,
            "ms": 1e3 * vlm_s, "ms_per_layer": 1e3 * vlm_s / subject.vlm_depth, "flops": vlm_flops}
    base = "uncached" if "uncached" in times else todo[0].spec  # the baseline of the speedups and shares
    rows = []
    for s in todo:
        prep, loop = med(times[s.spec]["prepare"]), med(times[s.spec]["loop"])
        fprep, floop = flops[s.spec]
        rows.append({"method": s.spec, "sampler": f"{s.sampler.kind}{s.sampler.num_steps}", "schedule": s.schedule,
                     "prepare_ms": 1e3 * prep, "loop_ms": 1e3 * loop, "chunk_ms": 1e3 * (vlm_s + prep + loop),
                     "loop_flops": floop, "chunk_flops": vlm_flops + fprep + floop,
                     "loop_ms_p95": 1e3 * float(np.percentile(times[s.spec]["loop"], 95)),
                     "chunks_timed": len(times[s.spec]["loop"])})
    b = next(r for r in rows if r["method"] == base)
    for r in rows:
        r.update(loop_speedup=b["loop_ms"] / r["loop_ms"], chunk_speedup=b["chunk_ms"] / r["chunk_ms"],
                 loop_flops_ratio=r["loop_flops"] / b["loop_flops"],
                 chunk_flops_ratio=r["chunk_flops"] / b["chunk_flops"])
    K, calls = subject.sampler.num_steps, 2 if subject.guidance else 1
    prefix.update(prepare_ms=b["prepare_ms"], prepare_flops=flops[base][0], ms=vlm_s * 1e3 + b["prepare_ms"],
                  flops=vlm_flops + flops[base][0])
    if subject.guidance is not None:
        notes.append("guidance (CFG 1.5): both branches run every cache with the same per-block schedule, each with "
                     "its own state; a coarser cache on the uncond branch is not supported by the engine (one compute "
                     "mask per block, shared by the branches)")
    if vlm is not None:
        notes.append(f"prefix = stand-in VLM pass ({prefix['vlm_stand_in']['layers_timed']} of "
                     f"{subject.vlm_depth} layers timed, scaled to {subject.vlm_depth}) + the expert's prepare; "
                     f"{EXCLUDED[subject.family]} NOT included; the expert reads a random prefix K/V of that length")
    else:
        notes.append(f"prefix = the denoiser's prepare only; {EXCLUDED[subject.family]} NOT included")
    return {
        "model": subject.name, "scale": config["scale"], "weights": f"random weights (seed {config['seed']}): "
        "latency and FLOPs only", "batch": 1, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "sampler": f"{subject.sampler.kind}{K}", "guidance": None if subject.guidance is None else
        subject.guidance.scale, "baseline": base, "prefix": prefix,
        "loop": {"ms": b["loop_ms"], "ms_per_step": b["loop_ms"] / K, "flops": b["loop_flops"],
                 "flops_per_step": b["loop_flops"] / K, "flops_per_call": step_flops, "calls_per_step": calls},
        "loop_share": b["loop_ms"] / b["chunk_ms"], "loop_flops_share": b["loop_flops"] / b["chunk_flops"],
        "blocks": blocks, "outside_blocks_flops_per_call": outside, "results": rows, "notes": notes,
        "config": config}


def _g(flops: float) -> str:
    return f"{flops / 1e12:.2f} TFLOP" if flops >= 1e12 else f"{flops / 1e9:.3g} GFLOP"


def report(result: dict) -> str:
    """The printed table."""
    p, lp = result["prefix"], result["loop"]
    lines = [f"{result['model']} at {result['scale']} size, {result['weights']}; batch 1, {result['threads']} "
             f"thread(s), torch {result['torch']}; sampler {result['sampler']}"
             + (f", guidance {result['guidance']}" if result["guidance"] else "")]
    if "vlm_stand_in" in p:
        v = p["vlm_stand_in"]
        lines.append(f"prefix per chunk: {1e-3 * p['ms']:.3f} s, {_g(p['flops'])} = stand-in VLM ({v['what']}) over "
                     f"{v['tokens']} tokens {1e-3 * v['ms']:.3f} s ({v['ms_per_layer']:.1f} ms per layer, "
                     f"{v['layers_timed']} timed) + the expert's prepare {p['prepare_ms']:.1f} ms; "
                     f"vision encoder NOT included")
    else:
        lines.append(f"prefix per chunk: the denoiser's prepare {p['prepare_ms']:.1f} ms, {_g(p['flops'])}; "
                     f"{p['excluded']} NOT included")
    lines.append(f"expert loop: {lp['ms']:.1f} ms per chunk, {lp['ms_per_step']:.1f} ms per step "
                 f"({_g(lp['flops_per_step'])} per step{', 2 calls (guidance)' if lp['calls_per_step'] == 2 else ''})")
    lines.append(f"loop share of the uncached chunk: {result['loop_share']:.1%} of the time, "
                 f"{result['loop_flops_share']:.1%} of the FLOPs")
    groups: dict[tuple, int] = {}
    for b in result["blocks"]:
        groups[(b["kind"], b["flops"])] = groups.get((b["kind"], b["flops"]), 0) + 1
    per = ", ".join(f"{kind} {n} x {_g(f)}" for (kind, f), n in groups.items())
    lines.append(f"per-block FLOPs per call: {per}; outside the blocks {_g(result['outside_blocks_flops_per_call'])}")
    head = f"{'method':<18}{'sampler':>8}{'loop ms':>11}{'loop x':>8}{'chunk ms':>11}{'chunk x':>9}" \
           f"{'loop FLOPs':>12}{'chunk FLOPs':>13}"
    lines += [head, "-" * len(head)]
    for r in result["results"]:
        lines.append(f"{r['method']:<18}{r['sampler']:>8}{r['loop_ms']:>11.1f}{r['loop_speedup']:>8.2f}"
                     f"{r['chunk_ms']:>11.1f}{r['chunk_speedup']:>9.2f}{r['loop_flops_ratio']:>12.3f}"
                     f"{r['chunk_flops_ratio']:>13.3f}")
    lines += [f"  {r['method']}: {r['schedule']}" for r in result["results"] if r["schedule"]]
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)
