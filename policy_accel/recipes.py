"""Method strings: one compact name per benchmark setting, resolved into a sampler, a cache config
and (for BAC and MagCache) the checkpoint's calibrated file, found by name.

    pa.accelerate(policy, "bac_taylor5o1f@ddim20")     # DDIM-20 + BAC+Taylor o1 on the shipped schedule
    pa.accelerate(policy, "ddim10")                    # step reduction only
    pa.remove_acceleration(policy)                     # back to the native sampler, no cache

Grammar: [compile+ | carry<E>[r<R>][f]+]<method>[/<method>][@ddim<K> | @flow<K>]

    uncached                 the checkpoint's native sampler (DDPM-100 for DP-T), no cache
    ddim10                   DDIM with 10 steps (step reduction, the baseline frontier)
    flow5                    the same for a flow-matching policy: 5 Euler steps
    every_step               hooks on every block, all compute (measures the hook overhead)
    uniform5                 reuse, all blocks refresh every 5 steps
    taylorseer4o2            Taylor forecast (order 2), uniform refresh every 4 steps after step 0 (1, 5, 9, ...);
                             w<N>: steps 0..N-1 full, then N, N+4, ... (taylorseer4o2w0: 0, 4, 8, ...)
    bac10 / bac10nb          BAC schedule with budget 10, with / without the Bubbling Union (5 blocks)
    bacg1.5nb                BAC on a pooled budget: 1.5 full-call equivalents of block-steps shared by all
                             blocks (at least step 0 each), placed by least squared reuse error
    bac_taylor10o2           BAC schedule + Taylor forecast of order 2 (ours); bac_taylorg1.5o1nb: pooled
    bac_taylor10o1f          ours, order 1, on a schedule calibrated against the order-1 forecast error
                             (bac_taylor10o0f: plain reuse on that schedule, an ablation)
    diffusers_taylorseer4o1  diffusers' own TaylorSeer hook (warm-up 3: steps 0, 1, 2, then 4, 8, ...; w<N>: N)
    diffusers_fbc0.05        diffusers' First Block Cache on whole layers, threshold 0.05 (dynamic)
    diffusers_magcache0.06   diffusers' MagCache, threshold 0.06, at most 3 skips in a row (k9: 9),
                             no skips in the first 20% of the steps (r0.05: 5%)
    <method>@ddim20          the same on top of DDIM-20 (@flow5: of 5 Euler steps, for flow-matching policies)
    compile / compile+ddim10 torch.compile of the whole denoiser (one graph)
    compile+<method>         the method with each block's computation compiled
    carry0.2+uniform10@ddim10  cross-chunk reuse (cache/carry.py): blocks whose step-0 output moves by <= 0.2
                             from a chunk to the next (<checkpoint>/schedules/carry_ddim10.json) start from the
                             previous chunk's on all but every 2nd chunk (r3: 3rd); uniform / taylorseer only;
                             one noise draw per episode (f: fresh noise every chunk, as without carry)
    uniform2/uniform5@ddim10 classifier-free guidance, each branch on its own schedule: the conditional one
                             before the '/', the unconditional one after (our static-schedule methods only)

Each family is one registered `Recipe`: a pattern and a function building its config; a new family
touches nothing else. BAC files live at <checkpoint>/schedules/<schedule_name(...)>.json, MagCache's at
<checkpoint>/schedules/magcache_<sampler><steps>.json (both made by `python eval/calibrate.py`).
"""

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from policy_accel.cache import (
    BACConfig,
    BACTaylorConfig,
    DiffusersFBCConfig,
    DiffusersMagCacheConfig,
    DiffusersTaylorSeerConfig,
    EveryStepConfig,
    TaylorSeerConfig,
    UniformConfig,
)
from policy_accel.cache.peers import mag_ratios_name
from policy_accel.sampling import SamplerConfig

BUBBLE_BLOCKS = 5
STEP_FAMILIES = ("ddim", "flow")  # step reduction alone: the frontier every cache is compared with
STATIC_FAMILIES = ("every_step", "uniform", "taylorseer", "bac", "bac_taylor")  # per-branch capable


def _warmup(p) -> dict:
    """TaylorSeer's full steps before its refresh grid: w<N> in the string, else the config's default."""
    return {} if p["warmup"] is None else {"warmup": p["warmup"]}


def schedule_name(budget: int, bubble_blocks: int, sampler: str, num_steps: int, forecast_order: int = 0) -> str:
    """File stem of a BAC schedule under <checkpoint>/schedules/."""
    return f"bac_s{budget}_b{bubble_blocks}_{sampler}{num_steps}" + (f"_f{forecast_order}" if forecast_order else "")


def pooled_schedule_name(calls: float, bubble_blocks: int, sampler: str, num_steps: int) -> str:
    """File stem of a BAC schedule on a pooled budget of `calls` full-call equivalents."""
    return f"bac_g{calls:g}_b{bubble_blocks}_{sampler}{num_steps}"


@dataclass(frozen=True)
class Recipe:
    family: str
    pattern: str
    build: Callable | None  # (params, file, compile) -> cache config; None: no cache (uncached, ddim)
    file: Callable | None = None  # (params, sampler) -> file stem under <checkpoint>/schedules/
    calibrate: Callable | None = None  # (params, sampler) -> the calibration command's own arguments
    ours: bool = True  # compile+ applies to our configs only


RECIPES: dict[str, Recipe] = {}


def register_recipe(recipe: Recipe) -> Recipe:
    RECIPES[recipe.family] = recipe
    return recipe


def _bac_file(p, s):
    bubble = 0 if p["nb"] else BUBBLE_BLOCKS
    if p["calls"] is not None:
        return pooled_schedule_name(p["calls"], bubble, s.kind, s.num_steps)
    return schedule_name(p["budget"], bubble, s.kind, s.num_steps, 1 if p["f"] else 0)


def _bac_args(p, s):
    size = f"budget={p['budget']}" if p["calls"] is None else f"calls={p['calls']:g}"
    return (f"{size} bubble_blocks={0 if p['nb'] else BUBBLE_BLOCKS} sampler={s.kind} "
            f"steps={s.num_steps}" + (" forecast_order=1" if p["f"] else ""))


for _r in [
    Recipe("uncached", r"uncached", None),
    Recipe("ddim", r"ddim(?P<steps>\d+)", None),
    Recipe("flow", r"flow(?P<steps>\d+)", None),
    Recipe("every_step", r"every_step", lambda p, f, c: EveryStepConfig(compile=c)),
    Recipe("uniform", r"uniform(?P<interval>\d+)", lambda p, f, c: UniformConfig(p["interval"], compile=c)),
    Recipe("taylorseer", r"taylorseer(?P<interval>\d+)o(?P<order>\d+)(?:w(?P<warmup>\d+))?",
           lambda p, f, c: TaylorSeerConfig(p["interval"], p["order"], **_warmup(p), compile=c)),
    Recipe("bac", r"bac(?:(?P<budget>\d+)|g(?P<calls>\d+\.\d+))(?P<nb>nb)?(?P<f>)",
           lambda p, f, c: BACConfig(schedule=f, compile=c), _bac_file, _bac_args),
    Recipe("bac_taylor", r"bac_taylor(?:(?P<budget>\d+)|g(?P<calls>\d+\.\d+))o(?P<order>\d+)(?P<nb>nb)?(?P<f>f)?",
           lambda p, f, c: BACTaylorConfig(schedule=f, order=p["order"], compile=c), _bac_file, _bac_args),
    Recipe("diffusers_taylorseer", r"diffusers_taylorseer(?P<interval>\d+)o(?P<order>\d+)(?:w(?P<warmup>\d+))?",
           lambda p, f, c: DiffusersTaylorSeerConfig(p["interval"], p["order"], **_warmup(p)), ours=False),
    Recipe("diffusers_fbc", r"diffusers_fbc(?P<threshold>\d+\.\d+)",
           lambda p, f, c: DiffusersFBCConfig(p["threshold"]), ours=False),
    Recipe("diffusers_magcache", r"diffusers_magcache(?P<threshold>\d+\.\d+)(k(?P<max_skip>\d+))?"
                                 r"(r(?P<retention>\d+\.\d+))?",
           lambda p, f, c: DiffusersMagCacheConfig(f, p["threshold"], p["max_skip"] or 3, p["retention"] or 0.2),
           lambda p, s: mag_ratios_name(s.kind, s.num_steps),
           lambda p, s: f"magcache=true sampler={s.kind} steps={s.num_steps}", ours=False),
]:
    register_recipe(_r)


@dataclass(frozen=True)
class Method:
    """A parsed method string."""

    spec: str
    family: str
    params: dict
    base_steps: int | None  # sampler steps underneath (None: the native sampler)
    compiled: bool = False
    carry: tuple[float, int, bool] | None = None  # cross-chunk reuse: (error threshold, refresh, episode noise)
    uncond: "Method | None" = None  # the unconditional guidance branch's method, when it has its own
    base_kind: str = "ddim"  # the sampler underneath: ddim (epsilon models) or flow (velocity models)

    @property
    def recipe(self) -> Recipe:
        return RECIPES[self.family]

    @property
    def name(self) -> str:
        """The `method` field of results: uncached, ddim, uniform, ..., compile, compile+bac."""
        family = f"{self.family}/{self.uncond.family}" if self.uncond else self.family
        if self.compiled:
            return "compile" if self.family == "uncached" else f"compile+{family}"
        return f"carry+{family}" if self.carry else family

    def sampler(self, native: SamplerConfig) -> SamplerConfig:
        if self.family in STEP_FAMILIES:
            kind, steps = self.family, self.params["steps"]
        elif self.base_steps is not None:
            kind, steps = self.base_kind, self.base_steps
        else:
            return native
        return SamplerConfig(kind=kind, num_steps=steps, num_train_steps=native.num_train_steps)

    @property
    def reads_file(self) -> bool:
        """Whether this method reads a calibrated file from the checkpoint."""
        return bool(self.carry) or self.recipe.file is not None or (self.uncond is not None and self.uncond.reads_file)

    def files(self, checkpoint_dir, native: SamplerConfig) -> list[Path]:
        """Every calibrated file this method reads (both guidance branches' when each has its own)."""
        own = [f for f in [self.file(checkpoint_dir, native)] if f is not None]
        return own + (self.uncond.files(checkpoint_dir, native) if self.uncond else [])

    def file(self, checkpoint_dir, native: SamplerConfig) -> Path | None:
        """The calibrated file this method (its conditional branch) reads (None for methods without one)."""
        if self.carry:
            from policy_accel.cross_chunk import carry_file_name

            sampler = self.sampler(native)
            return Path(checkpoint_dir) / "schedules" / f"{carry_file_name(sampler.kind, sampler.num_steps)}.json"
        if self.recipe.file is None:
            return None
        return Path(checkpoint_dir) / "schedules" / f"{self.recipe.file(self.params, self.sampler(native))}.json"

    def calibrate_command(self, checkpoint_dir, native: SamplerConfig) -> str:
        sampler = self.sampler(native)
        args = (f"carry=true sampler={sampler.kind} steps={sampler.num_steps}" if self.carry
                else self.recipe.calibrate(self.params, sampler))
        return f"python eval/calibrate.py checkpoint={checkpoint_dir} {args}"

    def config(self, checkpoint_dir, native: SamplerConfig, checkpoint_hash: str | None = None):
        """The cache config (None for uncached / ddim / compile alone); a missing file is an error that
        lists the files there are and prints the command that makes this one. With `checkpoint_hash`, a
        cross-chunk calibration made for other weights is an error."""
        if self.recipe.build is None:
            return None
        path = self.file(checkpoint_dir, native)
        if path is not None and not path.is_file():
            there = sorted(p.name for p in path.parent.glob("*.json")) if path.parent.is_dir() else []
            raise FileNotFoundError(f"method {self.spec!r} needs {path}, which does not exist (there: "
                                    f"{', '.join(there) or 'nothing'}); make it with: "
                                    f"{self.calibrate_command(checkpoint_dir, native)}")
        if self.carry:
            from policy_accel.cache import CarryConfig
            from policy_accel.cross_chunk import CarryErrors, carry_pattern

            errors = CarryErrors.load(path)
            if checkpoint_hash is not None and errors.checkpoint_hash != checkpoint_hash:
                raise ValueError(f"{path} was measured on checkpoint {errors.checkpoint_hash[:12]}, not "
                                 f"{checkpoint_hash[:12]}; make it again with: "
                                 f"{self.calibrate_command(checkpoint_dir, native)}")
            base = self.recipe.build(self.params, None, False)
            return CarryConfig(base, carry_pattern(errors.errors, self.carry[0]), refresh=self.carry[1],
                               episode_noise=self.carry[2])
        config = self.recipe.build(self.params, None if path is None else str(path), self.compiled)
        if self.uncond is not None:
            from policy_accel.cache import PerBranchConfig

            return PerBranchConfig(config, self.uncond.config(checkpoint_dir, native, checkpoint_hash))
        return config


def _value(key: str, v: str | None):
    if key in ("nb", "f"):
        return bool(v)
    if v is None:
        return None
    return float(v) if key in ("threshold", "retention", "calls") else int(v)


def parse_method(spec: str) -> Method:
    """Parse a method string; a typo is an error listing the families."""
    if not isinstance(spec, str):
        raise TypeError(f"a method string must be a str, got {type(spec).__name__}")
    compiled = spec == "compile" or spec.startswith("compile+")
    rest = "uncached" if spec == "compile" else spec.removeprefix("compile+")
    carry = re.match(r"carry(\d+\.\d+)(?:r(\d+))?(f)?\+", rest)
    if carry:
        rest = rest[carry.end():]
        carry = (float(carry.group(1)), int(carry.group(2) or 2), not carry.group(3))
        if carry[1] < 2:
            raise ValueError(f"method {spec!r}: the carry refresh must be >= 2")
        if compiled:
            raise ValueError(f"method {spec!r}: compile and carry do not combine (carry keeps state across chunks)")
    body, _, base = rest.partition("@")
    base_steps, base_kind = None, "ddim"
    if base:
        m = re.fullmatch(r"(ddim|flow)(\d+)", base)
        if not m:
            raise ValueError(f"method {spec!r}: only '@ddim<K>' or '@flow<K>' may follow a method, got '@{base}'")
        base_kind, base_steps = m.group(1), int(m.group(2))
    cond, slash, uncond = body.partition("/")
    if not slash:
        return _parse_body(spec, body, base_steps, base_kind, compiled, carry)
    if carry:
        raise ValueError(f"method {spec!r}: carry and per-branch schedules do not combine")
    if not (cond and uncond) or "/" in uncond:
        raise ValueError(f"method {spec!r}: a per-branch method is '<cond method>/<uncond method>', e.g. "
                         "'uniform2/uniform5@ddim10'")
    branches = [_parse_body(spec, b, base_steps, base_kind, compiled, None) for b in (cond, uncond)]
    for b in branches:
        if b.family not in STATIC_FAMILIES:
            raise ValueError(f"method {spec!r}: each guidance branch takes one of our static-schedule methods "
                             f"({', '.join(STATIC_FAMILIES)}), got {b.family}")
    return dataclasses.replace(branches[0], uncond=branches[1])


def _parse_body(spec: str, body: str, base_steps: int | None, base_kind: str, compiled: bool, carry) -> Method:
    for family, recipe in RECIPES.items():
        m = re.fullmatch(recipe.pattern, body)
        if not m:
            continue
        if recipe.build is None and base_steps:
            raise ValueError(f"method {spec!r}: '@ddim' / '@flow' combine with cache methods only")
        if compiled and not recipe.ours:
            raise ValueError(f"method {spec!r}: compile combines with our methods only")
        params = {k: _value(k, v) for k, v in m.groupdict().items()}
        if carry and family not in ("uniform", "taylorseer"):
            raise ValueError(f"method {spec!r}: carry combines with uniform and taylorseer (no file of their own)")
        if params.get("f") and params.get("calls") is not None:
            raise ValueError(f"method {spec!r}: a pooled budget (g) uses the reuse error; 'f' does not apply")
        if params.get("calls") is not None and params["calls"] < 1:
            raise ValueError(f"method {spec!r}: a pooled budget is at least 1.0 full call (step 0 of every block)")
        if params.get("f") and params["order"] > 1:
            raise ValueError(f"method {spec!r}: 'f' (schedule calibrated against the order-1 forecast) needs "
                             "order 1 (or 0: plain reuse on that schedule, an ablation)")
        return Method(spec, family, params, base_steps, compiled, carry, base_kind=base_kind)
    raise ValueError(f"unknown method {spec!r}; expected one of: {', '.join(RECIPES)} (see policy_accel/recipes.py)")
