"""Static compute schedules: for each cached block, the denoising steps on which it computes.

    uniform_steps(num_steps, interval)          every block on steps 0, N, 2N, ...
    acs_steps(similarity, budget)               BAC's Adaptive Caching Scheduler (dynamic program)
    forecast_acs_steps(gram, t, budget)         the same against the error of a linear forecast in t
    pooled_acs_steps(grams, total)              ACS with one budget shared by all blocks (reuse error)
    bubbling_union(steps, volatility, ffn, n)   BAC's Bubbling Union across layers

A `Schedule` is bound to the checkpoint, sampler and step count it was made for (a `Binding`);
attaching it to anything else raises.
"""

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from policy_accel.jsonfile import read_json, write_json

FORMAT_VERSION = 1


def uniform_steps(num_steps: int, interval: int, warmup: int = 0) -> list[int]:
    """Steps 0..warmup-1, then every `interval`-th step from `warmup` on."""
    if interval < 1:
        raise ValueError(f"interval must be >= 1, got {interval}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    return sorted({*range(min(warmup, num_steps)), *range(warmup, num_steps, interval)} | {0})


def segment_scores(similarity: np.ndarray) -> np.ndarray:
    """score[j, i] = sum_{t=j..i} S[j, t]: value of computing at j and reusing it through step i."""
    upper = np.triu(similarity)
    return np.cumsum(upper, axis=1)


def _acs_table(sim: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """ACS's dynamic program: best[s][i], the best value covering steps 0..i with s segments, and
    arg[s][i], the start of the last one."""
    K = sim.shape[0]
    score = segment_scores(sim)
    best = np.full((budget + 1, K), -np.inf)
    arg = np.zeros((budget + 1, K), dtype=np.int64)
    best[1] = score[0]
    starts = np.arange(K)
    for s in range(2, budget + 1):
        # candidate[j, i] = best[s-1][j-1] + score[j, i] for a last segment j..i (j >= 1, j <= i)
        prev = np.concatenate([[-np.inf], best[s - 1][:-1]])
        cand = prev[:, None] + score
        cand[starts[:, None] > starts[None, :]] = -np.inf
        cand[0] = -np.inf
        arg[s] = np.argmax(cand, axis=0)
        best[s] = cand[arg[s], starts]
    return best, arg


def _check_square(matrix, what: str) -> np.ndarray:
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"{what} must be square, got shape {m.shape}")
    return m


def acs_steps(similarity: np.ndarray, budget: int) -> list[int]:
    """Choose `budget` update steps (step 0 always) partitioning 0..K-1 into contiguous segments
    that maximise sum over segments of sum_{t in segment} S[start, t]. O(budget * K^2)."""
    sim = _check_square(similarity, "similarity")
    K = sim.shape[0]
    if not 1 <= budget <= K:
        raise ValueError(f"budget must be in [1, {K}] for {K} steps, got {budget}")
    _, arg = _acs_table(sim, budget)
    steps, i = [], K - 1
    for s in range(budget, 1, -1):
        j = int(arg[s][i])
        steps.append(j)
        i = j - 1
    return [0, *sorted(steps)]


def reuse_errors(gram: np.ndarray) -> np.ndarray:
    """err[j, t] = |F_t - F_j|^2, the squared error of reusing step j's output at step t, from the
    Gram matrix gram[i, j] = <F_i, F_j> (a mean over observations gives the mean error)."""
    G = _check_square(gram, "gram")
    d = np.diag(G)
    return np.maximum(d[:, None] + d[None, :] - 2 * G, 0.0)


def pooled_acs_steps(grams: dict[str, np.ndarray], total: int) -> dict[str, list[int]]:
    """ACS with one budget for all blocks: `total` compute steps (each block at least step 0) placed to
    minimise the summed squared reuse error of every block's output. The error is absolute, not
    cosine, so that blocks whose outputs move the residual stream more weigh more. Exact: per block,
    ACS's table gives the least error at every budget; a knapsack over blocks splits `total`."""
    names = list(grams)
    errs = {n: reuse_errors(grams[n]) for n in names}
    K = next(iter(errs.values())).shape[0] if names else 0
    if any(e.shape != (K, K) for e in errs.values()):
        raise ValueError("every block's Gram matrix must have the same number of steps")
    if not len(names) <= total <= len(names) * K:
        raise ValueError(f"total must be in [{len(names)}, {len(names) * K}] for {len(names)} blocks of "
                         f"{K} steps (each block computes at least step 0), got {total}")
    top = min(K, total - len(names) + 1)  # most steps one block can get
    cost = {n: -_acs_table(-errs[n], top)[0][1:, K - 1] for n in names}  # cost[n][s - 1]: least error, s steps
    # knapsack over blocks: best[c], least error of the blocks so far with c steps in all
    best, picks = np.zeros(1), []
    for n in names:
        new = np.full(len(best) + top - 1, np.inf)
        pick = np.zeros(len(new), dtype=np.int64)
        for s in range(1, top + 1):
            cand = best + cost[n][s - 1]
            better = cand < new[s - 1:s - 1 + len(best)]
            new[s - 1:s - 1 + len(best)][better] = cand[better]
            pick[s - 1:s - 1 + len(best)][better] = s
        best, picks = new, picks + [pick]
    budgets, c = {}, total - len(names)  # index c: extra steps beyond one per block
    for n, pick in zip(reversed(names), reversed(picks), strict=True):
        budgets[n] = int(pick[c])
        c -= budgets[n] - 1
    return {n: acs_steps(-errs[n], budgets[n]) for n in names}


def linear_forecast_errors(gram: np.ndarray, t) -> np.ndarray:
    """err[a + 1, b, j]: squared error of forecasting a block's output at step j > b from its outputs
    at computed steps a < b, linearly in the sampler's t (order 1, as Forecaster does); row 0
    (a = -1, only b computed so far) is the reuse error. Relative to |F_j|^2, from the Gram matrix
    gram[i, j] = <F_i, F_j> alone. Zero where j <= b."""
    G = np.asarray(gram, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64)
    K = G.shape[0]
    if G.shape != (K, K) or t.shape != (K,):
        raise ValueError(f"gram must be (K, K) and t (K,), got {G.shape} and {t.shape}")
    if len(set(t.tolist())) != K:
        raise ValueError("the step positions t must be distinct")
    d = np.diag(G)
    a, b, j = np.ogrid[:K, :K, :K]
    reuse = d[j] - 2 * G[b, j] + d[b]  # |F_j - F_b|^2, (1, K, K)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = (t[j] - t[b]) / (t[b] - t[a])  # forecast weight on the slope, (K, K, K)
        cross = G[b, j] - G[a, j] - d[b] + G[a, b]  # <F_j - F_b, F_b - F_a>
        slope2 = d[b] - 2 * G[a, b] + d[a]  # |F_b - F_a|^2
        linear = reuse - 2 * r * cross + r**2 * slope2
    err = np.concatenate([reuse, linear]) / np.maximum(d, 1e-12)[None, None, :]
    valid = np.concatenate([np.ones((1, K, 1), bool), a < b]) & (j > b)
    return np.where(valid, np.maximum(err, 0.0), 0.0)


def forecast_acs_steps(gram: np.ndarray, t, budget: int) -> list[int]:
    """Choose `budget` compute steps (step 0 always) minimising the total relative error of the order-1
    forecast that fills every skipped step from the last two computed ones (reuse after step 0 alone).
    Dynamic program over (previous, last) computed step pairs: O(budget * K^3) time, O(budget * K^2) memory."""
    err = linear_forecast_errors(gram, t)
    K = err.shape[1]
    if not 1 <= budget <= K:
        raise ValueError(f"budget must be in [1, {K}] for {K} steps, got {budget}")
    # cost[a + 1, b, c]: error of the skipped steps b < j < c, with a, b the last two computed steps
    cost = np.concatenate([np.zeros((K + 1, K, 1)), np.cumsum(err, axis=2)], axis=2)
    best = np.full((K + 1, K), np.inf)  # best[a + 1, b]: steps 0..b covered, last two computed a < b
    best[0, 0] = 0.0
    back = []
    later = np.arange(K)[:, None] < np.arange(K)[None, :]  # c > b
    for _ in range(budget - 1):
        cand = best[:, :, None] + cost[:, :, :K]  # (a + 1, b, c): next computed step c
        arg = np.argmin(cand, axis=0)  # (b, c)
        new = np.full((K + 1, K), np.inf)
        new[1:] = np.where(later, np.take_along_axis(cand, arg[None], 0)[0], np.inf)
        back.append(arg)
        best = new
    prev, last = np.unravel_index(np.argmin(best + cost[:, :, K]), best.shape)
    steps = [int(last)]
    for arg in reversed(back):
        prev, last = arg[prev - 1, last], prev - 1
        steps.append(int(last))
    return sorted(steps)


def bubbling_union(
    steps: dict[str, list[int]],
    volatility: dict[str, float],
    layer_of: dict[str, int],
    ffn_blocks: set[str],
    n_blocks: int,
) -> dict[str, list[int]]:
    """BAC's Bubbling Union. Rank blocks by volatility; each of the top `n_blocks` (at layer L) gains
    the update steps of every FFN block at layer >= L (its own layer's FFN included). The FFNs' sets
    do not change. So whenever a downstream FFN recomputes, the volatile block upstream of it is
    fresh, and no FFN recomputes on an input made stale by that block.

    Example: {l0.sa: [0, 7], l0.ff: [0, 3]} with l0.sa chosen -> {l0.sa: [0, 3, 7], l0.ff: [0, 3]}.
    """
    if n_blocks < 0:
        raise ValueError(f"bubble_blocks must be >= 0, got {n_blocks}")
    unknown = (set(volatility) | set(ffn_blocks)) - set(steps)
    if unknown:
        raise ValueError(f"blocks without steps: {sorted(unknown)[:4]}")
    out = {name: set(s) for name, s in steps.items()}
    for name in sorted(volatility, key=lambda b: -volatility[b])[:n_blocks]:
        for ffn in ffn_blocks:
            if layer_of[ffn] >= layer_of[name]:
                out[name] |= set(steps[ffn])  # the FFNs' own (pre-union) steps
    return {name: sorted(s) for name, s in out.items()}


@dataclass(frozen=True)
class Binding:
    """What a cache is attached for: the checkpoint's weights and the sampler that drives it."""

    checkpoint_hash: str
    sampler: str  # kind: ddpm | ddim | flow
    num_steps: int

    def __str__(self) -> str:
        return f"{self.sampler}-{self.num_steps} on checkpoint {self.checkpoint_hash[:12] or '(none)'}"


@dataclass
class Schedule:
    """Per-block compute steps for one checkpoint, sampler and step count."""

    blocks: dict[str, list[int]]
    num_steps: int
    sampler: str
    checkpoint_hash: str = ""
    method: str = "bac"
    budget: int | None = None
    bubble_blocks: int = 0
    calibration: dict = field(default_factory=dict)
    package_version: str = ""
    format: int = FORMAT_VERSION

    def __post_init__(self):
        for name, s in self.blocks.items():
            if not s or s[0] != 0 or s != sorted(set(s)) or s[-1] >= self.num_steps:
                raise ValueError(
                    f"block {name!r}: steps must be sorted, unique, start at 0 and be < {self.num_steps}; got {s}"
                )

    def mask(self, name: str) -> list[bool]:
        row = [False] * self.num_steps
        for k in self.blocks[name]:
            row[k] = True
        return row

    def computed_fraction(self) -> float:
        return sum(len(s) for s in self.blocks.values()) / (len(self.blocks) * self.num_steps)

    def check_compatible(self, block_names: list[str], binding: "Binding", allow_unbound: bool = False) -> None:
        """Raise ValueError naming every mismatch between this schedule and what it is attached for."""
        problems = []
        if not self.checkpoint_hash and not allow_unbound:
            problems.append("it names no checkpoint (empty checkpoint_hash; pass allow_unbound=True to use it anyway)")
        elif self.checkpoint_hash and self.checkpoint_hash != binding.checkpoint_hash:
            problems.append(f"made for checkpoint {self.checkpoint_hash[:12]}, "
                            f"policy is {binding.checkpoint_hash[:12]}")
        if self.sampler != binding.sampler:
            problems.append(f"made for sampler {self.sampler!r}, policy uses {binding.sampler!r}")
        if self.num_steps != binding.num_steps:
            problems.append(f"made for {self.num_steps} steps, policy samples {binding.num_steps}")
        if set(self.blocks) != set(block_names):
            missing, extra = set(block_names) - set(self.blocks), set(self.blocks) - set(block_names)
            problems.append(f"block names differ (missing {sorted(missing)[:4]}, unknown {sorted(extra)[:4]})")
        if problems:
            raise ValueError("schedule does not match this policy: " + "; ".join(problems))

    def save(self, path: str | Path) -> None:
        write_json(path, asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> "Schedule":
        data = read_json(path, "schedule")
        if data.get("format") != FORMAT_VERSION:
            raise ValueError(f"schedule file {path} has format {data.get('format')}, expected {FORMAT_VERSION}")
        return cls(**data)
