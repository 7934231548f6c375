"""Method settings for the benchmark, one compact string each:

    uncached                 the checkpoint's native sampler (DDPM-100 for DP-T), no cache
    ddim10                   DDIM with 10 steps (step reduction, the baseline frontier)
    lossless                 native sampler + exact per-chunk condition K/V only
    uniform5                 reuse, all blocks refresh every 5 steps
    taylorseer4o2            Taylor forecast (order 2), uniform refresh every 4 steps
    bac10 / bac10nb          BAC schedule with budget 10, with / without the Bubbling Union
    bac_taylor10o2           BAC schedule + Taylor forecast of order 2 (ours)
    bac_taylor10o1f          ours, order 1, on a schedule calibrated against the order-1 forecast error
    diffusers_taylorseer4o1  diffusers' own TaylorSeer hook (warm-up 3), for comparison
    diffusers_fbc0.05        diffusers' First Block Cache on whole layers, threshold 0.05 (dynamic)
    diffusers_magcache0.06   diffusers' MagCache on the layer stack, threshold 0.06 (calibrated ratios),
                             at most 3 skips in a row; diffusers_magcache0.2k9: at most 9;
                             diffusers_magcache0.3k9r0.05: never skips in the first 5% of steps (default 20%)
    every_step               hooks on every block, all compute (measures the hook overhead)
    <any>@ddim20             the same on top of DDIM-20
    compile / compile+ddim10 torch.compile of the whole denoiser (one graph), native sampler / DDIM-10
    compile+<method>         the method with each block's computation compiled (the cache logic stays eager)

BAC settings read `checkpoints/<name>/schedules/<schedule_name(...)>.json` and MagCache reads
`.../schedules/magcache_<sampler><steps>.json`, both made by `python -m policy_accel.cache.calibrate`.
"""

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import policy_accel as pa
from policy_accel.cache.calibration import schedule_name
from policy_accel.cache.peers import (
    MagRatios,
    apply_diffusers_first_block_cache,
    apply_diffusers_mag_cache,
    apply_diffusers_taylorseer,
    mag_ratios_name,
)
from policy_accel.sampling import SamplerConfig

_PATTERNS = {
    "uncached": r"uncached",
    "ddim": r"ddim(?P<steps>\d+)",
    "lossless": r"lossless",
    "every_step": r"every_step",
    "uniform": r"uniform(?P<interval>\d+)",
    "taylorseer": r"taylorseer(?P<interval>\d+)o(?P<order>\d+)",
    "bac": r"bac(?P<budget>\d+)(?P<nb>nb)?",
    "bac_taylor": r"bac_taylor(?P<budget>\d+)o(?P<order>\d+)(?P<nb>nb)?(?P<f>f)?",
    "diffusers_taylorseer": r"diffusers_taylorseer(?P<interval>\d+)o(?P<order>\d+)",
    "diffusers_fbc": r"diffusers_fbc(?P<threshold>\d+\.\d+)",
    "diffusers_magcache": r"diffusers_magcache(?P<threshold>\d+\.\d+)(k(?P<max_skip>\d+))?(r(?P<retention>\d+\.\d+))?",
}
BUBBLE_BLOCKS = 5
DIFFUSERS_WARMUP = 3


@dataclass
class Method:
    spec: str  # the string as given
    family: str  # key of _PATTERNS
    params: dict
    base_steps: int | None  # DDIM steps underneath (None: the native sampler)
    compiled: bool = False

    @property
    def name(self) -> str:
        """`method` field of the results: uncached, ddim, uniform, ..., compile, compile+bac."""
        if self.compiled:
            return "compile" if self.family == "uncached" else f"compile+{self.family}"
        return self.family


def parse_method(spec: str) -> Method:
    compiled = spec == "compile" or spec.startswith("compile+")
    rest = "uncached" if spec == "compile" else spec.removeprefix("compile+")
    body, _, base = rest.partition("@")
    base_steps = None
    if base:
        m = re.fullmatch(r"ddim(\d+)", base)
        if not m:
            raise ValueError(f"method {spec!r}: only '@ddim<K>' may follow a method, got '@{base}'")
        base_steps = int(m.group(1))
    for family, pattern in _PATTERNS.items():
        m = re.fullmatch(pattern, body)
        if m:
            if family in ("uncached", "ddim") and base:
                raise ValueError(f"method {spec!r}: '@ddim' combines with cache methods only")
            if compiled and family.startswith("diffusers"):
                raise ValueError(f"method {spec!r}: compile combines with our methods only")
            params = {k: (v is not None if k in ("nb", "f") else float(v) if k in ("threshold", "retention")
                          else int(v)) for k, v in m.groupdict().items() if v is not None or k in ("nb", "f")}
            if params.get("f") and params["order"] != 1:
                raise ValueError(f"method {spec!r}: 'f' (schedule calibrated against the order-1 forecast) "
                                 f"needs order 1")
            return Method(spec, family, params, base_steps, compiled)
    raise ValueError(f"unknown method {spec!r}; expected one of: {', '.join(_PATTERNS)} (see eval/methods.py)")


def sampler_for(method: Method, native: SamplerConfig) -> SamplerConfig:
    steps = method.params["steps"] if method.family == "ddim" else method.base_steps
    if steps is None:
        return native
    return SamplerConfig(kind="ddim", num_steps=steps, num_train_steps=native.num_train_steps)


def schedule_path(method: Method, checkpoint_dir: str | Path, native: SamplerConfig) -> Path | None:
    """The calibrated schedule a BAC method (or MagCache's ratios) reads (None for methods without one)."""
    sampler = sampler_for(method, native)
    if method.family == "diffusers_magcache":
        return Path(checkpoint_dir) / "schedules" / f"{mag_ratios_name(sampler.kind, sampler.num_steps)}.json"
    if method.family not in ("bac", "bac_taylor"):
        return None
    bubble = 0 if method.params["nb"] else BUBBLE_BLOCKS
    forecast_order = 1 if method.params.get("f") else 0
    name = schedule_name(method.params["budget"], bubble, sampler.kind, sampler.num_steps, forecast_order)
    return Path(checkpoint_dir) / "schedules" / f"{name}.json"


def schedule_digest(method: Method, checkpoint_dir: str | Path, native: SamplerConfig) -> str | None:
    """sha256 of the schedule (or MagCache ratios) file a method reads; None for methods without one.
    Results made with another file of the same name must not be merged with new ones."""
    path = schedule_path(method, checkpoint_dir, native)
    return hashlib.sha256(path.read_bytes()).hexdigest() if path is not None and path.is_file() else None


def calibrate_command(method: Method, checkpoint_dir: str | Path, native: SamplerConfig) -> str:
    sampler = sampler_for(method, native)
    if method.family == "diffusers_magcache":
        return (f"python -m policy_accel.cache.calibrate checkpoint={checkpoint_dir} magcache=true "
                f"sampler={sampler.kind} steps={sampler.num_steps}")
    return (f"python -m policy_accel.cache.calibrate checkpoint={checkpoint_dir} budget={method.params['budget']} "
            f"bubble_blocks={0 if method.params['nb'] else BUBBLE_BLOCKS} sampler={sampler.kind} "
            f"steps={sampler.num_steps}" + (" forecast_order=1" if method.params.get("f") else ""))


def apply_method(policy, method: Method, checkpoint_dir: str | Path, native: SamplerConfig):
    """Configure `policy` for `method`; returns an object with remove() (or None) to undo the cache."""
    pa.remove_acceleration(policy)
    if getattr(policy, "compiled_model", None) is not None:
        policy.compile(False)
    policy.set_sampler(sampler_for(method, native))
    p, fam = method.params, method.family
    compile = method.compiled
    if fam in ("uncached", "ddim"):
        if compile:  # the whole denoiser in one graph
            policy.compile()
            return _Uncompiler(policy)
        return None
    if fam == "diffusers_taylorseer":
        return apply_diffusers_taylorseer(policy, p["interval"], p["order"], DIFFUSERS_WARMUP)
    if fam == "diffusers_fbc":
        return apply_diffusers_first_block_cache(policy, p["threshold"])
    path = schedule_path(method, checkpoint_dir, native)
    if path is not None and not path.is_file():
        raise FileNotFoundError(f"method {method.spec!r} needs {path}; make it with: "
                                f"{calibrate_command(method, checkpoint_dir, native)}")
    if fam == "diffusers_magcache":
        return apply_diffusers_mag_cache(policy, MagRatios.load(path), p["threshold"], p.get("max_skip", 3),
                                         p.get("retention", 0.2))
    if fam == "every_step":  # every block computes every step through the hooks
        config = pa.LosslessConfig(lossless=False, compile=compile)
    elif fam == "lossless":
        config = pa.LosslessConfig(compile=compile)
    elif fam == "uniform":
        config = pa.UniformConfig(interval=p["interval"], compile=compile)
    elif fam == "taylorseer":
        config = pa.TaylorSeerConfig(interval=p["interval"], order=p["order"], compile=compile)
    else:
        config = (pa.BACConfig(schedule=path, compile=compile) if fam == "bac"
                  else pa.BACTaylorConfig(schedule=path, order=p["order"], compile=compile))
    pa.accelerate(policy, config)
    return _Remover(policy)


class _Remover:
    def __init__(self, policy):
        self.policy = policy

    def remove(self):
        pa.remove_acceleration(self.policy)


class _Uncompiler(_Remover):
    def remove(self):
        self.policy.compile(False)
