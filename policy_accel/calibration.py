"""Profile every block's output at every denoising step over calibration observations and build
BAC schedules from it.

    sched = pa.calibrate(policy, observations, budget=10, bubble_blocks=5)
    sched.save("checkpoints/lift_dp_t/schedules/bac_s10.json")
    sched = calibrate_denoiser(denoiser, clock, binding, [run_chunk, ...], budget=5)   # a bare denoiser

Command line (observations from the checkpoint's demo dataset): eval/calibrate.py.

forecast_order=0 (default) is BAC's criterion: choose the steps that minimise the reuse error (cosine).
forecast_order=1 chooses them against the error of the linear forecast that BAC+Taylor order 1 makes
in the gaps (schedule.forecast_acs_steps).
calls=E instead of budget: one budget of E full-call equivalents (E x the number of blocks block-steps)
shared by all blocks, placed where the squared reuse error is least (schedule.pooled_acs_steps).
"""

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from policy_accel.cache.handle import CacheHandle
from policy_accel.cache.hooks import BlockInfo, find_blocks
from policy_accel.cache.peers import MagCalibration, MagRatios
from policy_accel.cache.schedule import (
    Binding,
    Schedule,
    acs_steps,
    bubbling_union,
    forecast_acs_steps,
    pooled_acs_steps,
    reuse_errors,
)
from policy_accel.clock import COND, ClockListener


@dataclass
class BlockProfile:
    """Per-block statistics over calibration observations."""

    similarity: dict[str, np.ndarray]  # (K, K) mean pairwise cosine similarity of branch outputs
    volatility: dict[str, float]  # mean over step pairs of mean |F_i - F_j|
    per_sample_similarity: dict[str, list[np.ndarray]]  # one (K, K) matrix per observation
    n_observations: int
    gram: dict[str, np.ndarray] | None = None  # (K, K) mean <F_i, F_j> over observations
    per_sample_gram: dict[str, list[np.ndarray]] | None = None  # the first STABILITY_SAMPLES observations
    timesteps: list[float] | None = None  # the sampler's t at each step

STABILITY_SAMPLES = 8  # observations whose own forecast-criterion schedules measure stability (K^3 DP each)


class _StepRecorder(ClockListener):
    """Clock listener + forward hooks collecting each block's output per step and guidance branch:
    feats[name][branch][k] = (B, D). A guided sampler calls every block once per branch and step; each
    branch is profiled as its own sample (the schedule is shared by both branches)."""

    def __init__(self, model: torch.nn.Module, blocks: list[BlockInfo], clock):
        self.clock = clock
        self.feats: dict[str, dict[str, list[torch.Tensor]]] = {b.name: {} for b in blocks}
        modules = dict(model.named_modules())
        self.handles = [modules[b.name].register_forward_hook(self._hook(b.name)) for b in blocks]

    def _hook(self, name):
        def record(module, args, output):
            if self.clock.running:
                self.feats[name].setdefault(self.clock.branch_key, []).append(output.detach().flatten(1).float().cpu())

        return record

    def begin_chunk(self, batch_size, sampler_kind, timesteps):
        self.timesteps = list(timesteps)
        for f in self.feats.values():
            f.clear()

    def remove(self):
        for h in self.handles:
            h.remove()


def _cosine_from_gram(gram: torch.Tensor) -> torch.Tensor:
    norm = gram.diagonal().sqrt().clamp_min(1e-12)  # as F.normalize: |F_i|, at least eps
    return gram / (norm[:, None] * norm[None, :])


def _check_forecast_order(forecast_order: int) -> None:
    if forecast_order not in (0, 1):
        raise ValueError(f"forecast_order must be 0 (reuse error) or 1 (linear forecast error), got {forecast_order}")


def profile_chunks(model: torch.nn.Module, clock, blocks: list[BlockInfo], chunks: Iterable[Callable[[], object]],
                   progress: bool = True) -> BlockProfile:
    """Per-block similarity and volatility over sampling passes: each of `chunks` runs one uncached pass of
    `model` on `clock` (any batch size; with guidance each branch's rows are samples of their own)."""
    recorder = _StepRecorder(model, blocks, clock)
    clock.listeners.append(recorder)
    sims = {b.name: [] for b in blocks}
    gram_sum = {b.name: 0.0 for b in blocks}
    grams = {b.name: [] for b in blocks}  # per sample, the first STABILITY_SAMPLES only
    vol_sum = {b.name: 0.0 for b in blocks}
    n = n_cond = 0
    try:
        for run in tqdm(chunks, desc="calibrate", unit="batch", disable=not progress):
            run()
            for name, branches in recorder.feats.items():
                for steps in branches.values():
                    feats = torch.stack(steps, dim=1)  # (B, K, D)
                    K, D = feats.shape[1], feats.shape[2]
                    for f in feats:
                        gram = f.double() @ f.double().T  # (K, K) <F_i, F_j>
                        sims[name].append(_cosine_from_gram(gram).numpy())
                        gram_sum[name] = gram_sum[name] + gram.numpy()
                        if len(grams[name]) < STABILITY_SAMPLES:
                            grams[name].append(gram.numpy())
                        dist = torch.cdist(f.double(), f.double(), p=1) / D  # (K, K) mean |F_i - F_j|
                        vol_sum[name] += float(dist.sum() / (K * (K - 1))) if K > 1 else 0.0
            first = recorder.feats[blocks[0].name]
            n += sum(len(steps[0]) for steps in first.values())
            n_cond += len(first[COND][0]) if COND in first else 0
    finally:
        recorder.remove()
        clock.listeners.remove(recorder)
    if n == 0:
        raise ValueError("calibration needs at least one sampling pass")
    return BlockProfile(
        similarity={name: np.mean(s, axis=0) for name, s in sims.items()},
        volatility={name: v / n for name, v in vol_sum.items()},
        per_sample_similarity=sims,
        n_observations=n_cond,
        gram={name: g / n for name, g in gram_sum.items()},
        per_sample_gram=grams,
        timesteps=recorder.timesteps,
    )


def profile_blocks(policy, observations: list, blocks: list[BlockInfo], batch_size: int = 8,
                   seed: int = 0) -> BlockProfile:
    """Run the uncached policy on `observations` and collect per-block similarity and volatility.
    The sampling noise comes from `seed` (the same profile every time); the policy's own noise
    generator is left as it was."""
    if not observations:
        raise ValueError("calibration needs at least one observation")
    generator_state = policy.generator.get_state()
    policy.generator.manual_seed(seed)

    def chunk(batch):
        def run():
            policy.reset()
            policy.predict_action_chunk(batch)

        return run

    batches = [np.stack([np.asarray(o) for o in observations[s:s + batch_size]])
               for s in range(0, len(observations), batch_size)]
    try:
        return profile_chunks(policy.model, policy.clock, blocks, [chunk(b) for b in batches])
    finally:
        policy.reset()
        policy.generator.set_state(generator_state)


def _jaccard(a: list[int], b: list[int]) -> float:
    return len(set(a) & set(b)) / len(set(a) | set(b))


def calibrate(policy, observations: list, budget: int | None = None, bubble_blocks: int = 5, blocks: str | None = None,
              batch_size: int = 8, description: str = "", forecast_order: int = 0, seed: int = 0,
              calls: float | None = None) -> Schedule:
    """BAC schedule for `policy`: ACS per block on the mean similarity (forecast_order=0) or on the
    order-1 forecast error (forecast_order=1), or on one pooled budget of `calls` full-call
    equivalents (squared reuse error), then the Bubbling Union.

    The schedule records how stable each block's chosen steps are across observations
    (mean Jaccard index between the per-observation ACS steps and the aggregate ones).
    """
    infos = blocks_to_profile(policy, blocks, [] if budget is None else [budget], forecast_order)
    profile = profile_blocks(policy, observations, infos, batch_size, seed)
    return schedule_from_profile(policy.binding(), profile, infos, budget, bubble_blocks, description,
                                 forecast_order, calls)


def calibrate_denoiser(denoiser: torch.nn.Module, clock, binding: Binding, chunks: Iterable[Callable[[], object]],
                       budget: int | None, bubble_blocks: int = 5, blocks: str | None = None, description: str = "",
                       forecast_order: int = 0, calls: float | None = None) -> Schedule:
    """`calibrate` for a bare denoiser (no Policy): each of `chunks` runs one uncached sampling pass of
    `denoiser` on `clock` with the sampler of `binding`, e.g.
    `lambda: pa.sample(denoiser, denoiser.prepare(cond, ts), noise, sampler, clock=clock)`."""
    _check_forecast_order(forecast_order)
    if any(isinstance(x, CacheHandle) for x in clock.listeners):
        raise RuntimeError("calibrate an uncached denoiser: remove the cache attached to this clock first")
    if budget is not None and not 1 <= budget <= binding.num_steps:
        raise ValueError(f"budget must be in [1, {binding.num_steps}] for a {binding.num_steps}-step sampler, "
                         f"got {budget}")
    infos = find_blocks(denoiser, blocks)
    profile = profile_chunks(denoiser, clock, infos, chunks, progress=False)
    if len(profile.timesteps) != binding.num_steps:
        raise ValueError(f"the chunks ran {len(profile.timesteps)} steps; the binding is for {binding.num_steps}")
    return schedule_from_profile(binding, profile, infos, budget, bubble_blocks, description, forecast_order, calls)


def blocks_to_profile(policy, blocks: str | None, budgets: list[int], forecast_order: int = 0) -> list[BlockInfo]:
    """The blocks a calibration of `policy` profiles, after checking it is uncached and the budgets fit."""
    _check_forecast_order(forecast_order)
    if policy.cache is not None:
        raise RuntimeError("calibrate an uncached policy: call pa.remove_acceleration(policy) first")
    num_steps = policy.sampler.num_steps
    for budget in budgets:
        if not 1 <= budget <= num_steps:
            raise ValueError(f"budget must be in [1, {num_steps}] for a {num_steps}-step sampler, got {budget}")
    return find_blocks(policy.model, blocks)


def schedule_from_profile(binding: Binding, profile: BlockProfile, infos: list[BlockInfo], budget: int | None,
                          bubble_blocks: int, description: str = "", forecast_order: int = 0,
                          calls: float | None = None) -> Schedule:
    """ACS per block with `budget` steps each, or (calls=E) ACS on a pooled budget of E full-call
    equivalents, then the Bubbling Union."""
    _check_forecast_order(forecast_order)
    if (budget is None) == (calls is None):
        raise ValueError(f"give exactly one of budget (per block) and calls (pooled), got {budget} and {calls}")
    if calls is not None:
        if forecast_order != 0:
            raise ValueError("a pooled budget (calls=) uses the reuse error; forecast_order must be 0")
        total = round(calls * len(infos))
        acs = pooled_acs_steps({b.name: profile.gram[b.name] for b in infos}, total)
        stat, samples = profile.gram, profile.per_sample_gram

        def choose(gram, name):  # the block's share of the pooled budget, on one observation
            return acs_steps(-reuse_errors(gram), len(acs[name]))
    elif forecast_order == 0:  # BAC: the statistic is the cosine similarity matrix
        stat, samples = profile.similarity, profile.per_sample_similarity

        def choose(similarity, name):
            return acs_steps(similarity, budget)
    else:  # the statistic is the Gram matrix, from which forecast errors follow
        stat, samples = profile.gram, profile.per_sample_gram

        def choose(gram, name):
            return forecast_acs_steps(gram, profile.timesteps, budget)

    if calls is None:
        acs = {b.name: choose(stat[b.name], b.name) for b in infos}
    steps = bubbling_union(acs, profile.volatility, {b.name: b.layer for b in infos},
                           {b.name for b in infos if b.is_ffn}, bubble_blocks)
    stability = {name: float(np.mean([_jaccard(choose(x, name), acs[name]) for x in xs]))
                 for name, xs in samples.items()}
    from policy_accel import __version__

    return Schedule(
        blocks=steps,
        num_steps=binding.num_steps,
        sampler=binding.sampler,
        checkpoint_hash=binding.checkpoint_hash,
        method="bac",
        budget=budget,
        bubble_blocks=bubble_blocks,
        calibration={
            "description": description,
            "n_observations": profile.n_observations,
            "criterion": ("order-1 forecast error" if forecast_order else
                          f"squared reuse error, pooled budget of {calls:g} full calls" if calls else "reuse (cosine)"),
            "mean_jaccard_to_aggregate": float(np.mean(list(stability.values()))),
            "jaccard_per_block": stability,
            "volatility": profile.volatility,
            "acs_steps_before_union": acs,
        },
        package_version=__version__,
    )


def calibrate_mag_ratios(policy, observations: np.ndarray, description: str = "", seed: int = 0) -> MagRatios:
    """MagCache's calibration mode on a batch of observation histories (B, n_obs_steps, obs_dim)."""
    if policy.cache is not None:
        raise RuntimeError("calibrate an uncached policy: call pa.remove_acceleration(policy) first")
    binding = policy.binding()
    generator_state = policy.generator.get_state()
    policy.generator.manual_seed(seed)
    handle = MagCalibration(policy.model, policy.clock, binding)
    try:
        policy.predict_action_chunk(np.asarray(observations))
        ratios = handle.ratios()
    finally:
        handle.remove()
        policy.generator.set_state(generator_state)
    return MagRatios(ratios, binding.sampler, binding.num_steps, binding.checkpoint_hash, description)


def demo_observations(dataset, n: int, n_obs_steps: int, seed: int = 0) -> list[np.ndarray]:
    """`n` observation histories (n_obs_steps, obs_dim) drawn evenly from a demo dataset's time steps."""
    from policy_accel.data import ReplayBuffer

    buffer = ReplayBuffer.load(dataset)
    starts = np.concatenate([[0], buffer.episode_ends[:-1]])
    episode = np.searchsorted(buffer.episode_ends, np.arange(len(buffer.obs)), side="right")
    rows = np.random.default_rng(seed).choice(len(buffer.obs), size=min(n, len(buffer.obs)), replace=False)
    lags = np.arange(n_obs_steps - 1, -1, -1)
    return [buffer.obs[np.maximum(r - lags, starts[episode[r]])] for r in np.sort(rows)]
