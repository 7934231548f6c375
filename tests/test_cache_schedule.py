"""Forecaster exactness, ACS optimality against brute force, Bubbling Union, schedule files."""

import itertools

import numpy as np
import pytest
import torch

from policy_accel.cache import Binding, Forecaster, Schedule, acs_steps, bubbling_union, uniform_steps
from policy_accel.cache.schedule import forecast_acs_steps, pooled_acs_steps, segment_scores

UNEVEN_T = [99.0, 97.0, 90.0, 88.5, 71.0, 70.0]


def poly_feature(t: float, degree: int) -> torch.Tensor:
    """A (2, 3) feature whose every entry is a different polynomial of degree `degree` in t."""
    coef = torch.arange(1, 7, dtype=torch.float64).reshape(2, 3) / 10
    return sum(coef ** (p + 1) * (t / 50) ** p for p in range(degree + 1))


@pytest.mark.parametrize("order", [0, 1, 2, 3, 4])
def test_newton_forecast_exact_on_polynomials_with_uneven_spacing(order):
    f = Forecaster(order)
    for t in UNEVEN_T[: order + 1]:
        f.update(t, poly_feature(t, order))
    for t_query in [65.0, 50.2, 3.0]:
        torch.testing.assert_close(f.predict(t_query), poly_feature(t_query, order), rtol=1e-9, atol=1e-9)


def test_newton_keeps_only_order_plus_one_points_and_stays_exact():
    f = Forecaster(2)
    for t in UNEVEN_T:  # more points than needed: the window slides
        f.update(t, poly_feature(t, 2))
    assert len(f.coeffs) == 3 and f.nodes == UNEVEN_T[-1:-4:-1]
    torch.testing.assert_close(f.predict(40.0), poly_feature(40.0, 2), rtol=1e-9, atol=1e-9)


def test_latest_gap_rule_is_wrong_under_uneven_spacing_but_order1_agrees():
    newton, backward = Forecaster(2), Forecaster(2, differences="backward")
    for t in [99.0, 90.0, 88.0]:
        newton.update(t, poly_feature(t, 2))
        backward.update(t, poly_feature(t, 2))
    err_newton = (newton.predict(80.0) - poly_feature(80.0, 2)).abs().max()
    err_backward = (backward.predict(80.0) - poly_feature(80.0, 2)).abs().max()
    assert err_newton < 1e-9 < 1e-3 < err_backward
    # order 1 (linear extrapolation from the last two points) is the same rule in both forms
    n1, b1 = Forecaster(1), Forecaster(1, differences="backward")
    for t in [99.0, 90.0, 88.0]:
        n1.update(t, poly_feature(t, 3))
        b1.update(t, poly_feature(t, 3))
    torch.testing.assert_close(n1.predict(70.0), b1.predict(70.0))


def test_forecaster_rejects_bad_input():
    with pytest.raises(ValueError, match="order"):
        Forecaster(-1)
    with pytest.raises(ValueError, match="differences"):
        Forecaster(1, differences="central")
    f = Forecaster(1)
    with pytest.raises(RuntimeError, match="before any computed step"):
        f.predict(1.0)
    f.update(5.0, torch.ones(2))
    with pytest.raises(ValueError, match="same t"):
        f.update(5.0, torch.ones(2))


def brute_force_acs(sim: np.ndarray, budget: int) -> tuple[float, list[int]]:
    K = sim.shape[0]
    score = segment_scores(sim)
    best = (-np.inf, [])
    for rest in itertools.combinations(range(1, K), budget - 1):
        starts = [0, *rest]
        ends = [*(s - 1 for s in starts[1:]), K - 1]
        value = sum(score[s, e] for s, e in zip(starts, ends, strict=True))
        if value > best[0] + 1e-12:
            best = (value, starts)
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("budget", [1, 2, 3, 5])
def test_acs_dynamic_program_matches_brute_force(seed, budget):
    rng = np.random.default_rng(seed)
    K = 9
    feats = rng.normal(size=(K, 4)).cumsum(axis=0)  # a drifting feature, like denoising
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    sim = feats @ feats.T
    steps = acs_steps(sim, budget)
    value, _ = brute_force_acs(sim, budget)
    score = segment_scores(sim)
    ends = [*(s - 1 for s in steps[1:]), K - 1]
    assert steps[0] == 0 and len(steps) == budget == len(set(steps))
    assert sum(score[s, e] for s, e in zip(steps, ends, strict=True)) == pytest.approx(value, abs=1e-9)


def test_acs_puts_updates_where_the_feature_jumps():
    sim = np.ones((8, 8))
    sim[:5, 5:] = sim[5:, :5] = 0.1  # the feature changes once, at step 5
    assert acs_steps(sim, 2) == [0, 5]
    with pytest.raises(ValueError, match="budget"):
        acs_steps(sim, 9)


def forecast_error_by_running_the_forecaster(feats: np.ndarray, t: np.ndarray, steps: list[int]) -> float:
    """Total relative squared error of the order-1 Forecaster over the skipped steps, run as the engine does."""
    forecaster, total = Forecaster(order=1), 0.0
    for k, f in enumerate(torch.from_numpy(feats)):
        if k in steps:
            forecaster.update(float(t[k]), f)
        else:
            total += float(((forecaster.predict(float(t[k])) - f) ** 2).sum() / (f**2).sum())
    return total


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("budget", [1, 2, 3, 5])
def test_forecast_acs_matches_brute_force_over_the_real_forecaster_at_uneven_t(seed, budget):
    rng = np.random.default_rng(seed)
    K = 9
    feats = rng.normal(size=(K, 5)).cumsum(axis=0)
    t = np.sort(rng.uniform(0, 100, K))[::-1].copy()  # decreasing, unevenly spaced, like a sampler's t
    steps = forecast_acs_steps(feats @ feats.T, t, budget)
    best = min(forecast_error_by_running_the_forecaster(feats, t, [0, *rest])
               for rest in itertools.combinations(range(1, K), budget - 1))
    assert steps[0] == 0 and len(steps) == budget == len(set(steps))
    assert forecast_error_by_running_the_forecaster(feats, t, steps) == pytest.approx(best, rel=1e-9, abs=1e-12)


def test_forecast_acs_skips_steps_a_line_predicts_and_rejects_bad_input():
    t = np.array([9.0, 7.0, 4.0, 3.0, 1.0, 0.0])
    feats = np.stack([1 + 2 * t, 1 - t, 5 + 0 * t], axis=1)  # linear in t: two points predict all
    steps = forecast_acs_steps(feats @ feats.T, t, 2)
    assert forecast_error_by_running_the_forecaster(feats, t, steps) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="budget"):
        forecast_acs_steps(feats @ feats.T, t, 7)
    with pytest.raises(ValueError, match="distinct"):
        forecast_acs_steps(feats @ feats.T, np.zeros(6), 2)


def reuse_error_by_replaying(feats: np.ndarray, steps: list[int]) -> float:
    """Summed squared error of holding each computed output until the next computed step."""
    held, total = None, 0.0
    for k, f in enumerate(feats):
        held = f if k in steps else held
        total += float(((held - f) ** 2).sum())
    return total


def test_pooled_budget_goes_to_the_block_whose_output_moves_most():
    # Scalar outputs, worked by hand. A = [1, 1, 3]: from step 0 alone its error is (3-1)^2 = 4; a
    # second step at 2 removes it. B = [1, 2, 2]: error 1 + 1 = 2; a step at 1 removes it. One spare
    # step (total 3 for two blocks) goes to A at step 2; a second one (total 4) to B at step 1. Cosine
    # cannot tell: positive scalars all have cosine 1, so per-block BAC sees no two steps differ.
    a, b = np.array([[1.0], [1.0], [3.0]]), np.array([[1.0], [2.0], [2.0]])
    assert pooled_acs_steps({"a": a @ a.T, "b": b @ b.T}, total=3) == {"a": [0, 2], "b": [0]}
    assert pooled_acs_steps({"a": a @ a.T, "b": b @ b.T}, total=4) == {"a": [0, 2], "b": [0, 1]}
    with pytest.raises(ValueError, match="total must be in"):
        pooled_acs_steps({"a": a @ a.T, "b": b @ b.T}, total=1)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("total", [3, 5, 8])
def test_pooled_acs_matches_brute_force_over_every_split_and_every_step_set(seed, total):
    rng = np.random.default_rng(seed)
    K, names = 5, ["x", "y", "z"]
    feats = {n: rng.normal(size=(K, 4)).cumsum(axis=0) * rng.uniform(0.2, 3.0) for n in names}
    out = pooled_acs_steps({n: f @ f.T for n, f in feats.items()}, total)
    assert sum(len(s) for s in out.values()) == total and all(s[0] == 0 for s in out.values())
    choices = {n: [[0, *rest] for r in range(K) for rest in itertools.combinations(range(1, K), r)] for n in names}
    best = min(sum(reuse_error_by_replaying(feats[n], s) for n, s in zip(names, combo, strict=True))
               for combo in itertools.product(*choices.values()) if sum(map(len, combo)) == total)
    got = sum(reuse_error_by_replaying(feats[n], out[n]) for n in names)
    assert got == pytest.approx(best, rel=1e-9, abs=1e-12)


def test_bubbling_union_minimal_case_from_the_paper_rule():
    # the chosen block gains the FFN's steps; the FFN's own set does not change
    out = bubbling_union({"l0.sa": [0, 7], "l0.ff": [0, 3]}, {"l0.sa": 1.0, "l0.ff": 0.5}, {"l0.sa": 0, "l0.ff": 0},
                         {"l0.ff"}, n_blocks=1)
    assert out == {"l0.sa": [0, 3, 7], "l0.ff": [0, 3]}


def test_bubbling_union_on_hand_made_three_layer_case():
    steps = {"l0.sa": [0, 3], "l0.ff": [0, 5], "l1.sa": [0, 2], "l1.ff": [0, 6], "l2.ff": [0, 7]}
    layer = {"l0.sa": 0, "l0.ff": 0, "l1.sa": 1, "l1.ff": 1, "l2.ff": 2}
    ffn = {"l0.ff", "l1.ff", "l2.ff"}
    vol = {"l0.sa": 0.1, "l0.ff": 0.2, "l1.sa": 0.9, "l1.ff": 0.3, "l2.ff": 0.05}
    # n=1: l1.sa (layer 1) gains the steps of l1.ff {0,6} and l2.ff {0,7}; nothing else changes
    assert bubbling_union(steps, vol, layer, ffn, n_blocks=1) == {
        "l0.sa": [0, 3], "l0.ff": [0, 5], "l1.sa": [0, 2, 6, 7], "l1.ff": [0, 6], "l2.ff": [0, 7]}
    # n=2: l1.ff (layer 1) also gains l2.ff's {0,7}; l0.ff is below layer 1 and gives nothing
    assert bubbling_union(steps, vol, layer, ffn, n_blocks=2) == {
        "l0.sa": [0, 3], "l0.ff": [0, 5], "l1.sa": [0, 2, 6, 7], "l1.ff": [0, 6, 7], "l2.ff": [0, 7]}
    # n=3: l0.ff (layer 0) gains every FFN's steps; l0.sa (least but one volatile) is not chosen
    assert bubbling_union(steps, vol, layer, ffn, n_blocks=3) == {
        "l0.sa": [0, 3], "l0.ff": [0, 5, 6, 7], "l1.sa": [0, 2, 6, 7], "l1.ff": [0, 6, 7], "l2.ff": [0, 7]}
    assert bubbling_union(steps, vol, layer, ffn, n_blocks=0) == steps
    with pytest.raises(ValueError, match="bubble_blocks"):
        bubbling_union(steps, vol, layer, ffn, n_blocks=-1)


def test_uniform_steps():
    assert uniform_steps(10, 4) == [0, 4, 8]
    assert uniform_steps(10, 4, warmup=3) == [0, 1, 2, 3, 7]
    with pytest.raises(ValueError, match="interval"):
        uniform_steps(10, 0)


def test_schedule_round_trip_and_mismatch_errors(tmp_path):
    sched = Schedule(blocks={"a": [0, 4], "b": [0, 1, 9]}, num_steps=10, sampler="ddim",
                     checkpoint_hash="abc123", budget=2)
    path = tmp_path / "s.json"
    sched.save(path)
    loaded = Schedule.load(path)
    assert loaded == sched and loaded.mask("a") == [True, False, False, False, True] + [False] * 5
    loaded.check_compatible(["a", "b"], Binding("abc123", "ddim", 10))
    with pytest.raises(ValueError, match="checkpoint"):
        loaded.check_compatible(["a", "b"], Binding("fff000", "ddim", 10))
    with pytest.raises(ValueError, match="made for 10 steps, policy samples 20"):
        loaded.check_compatible(["a", "b"], Binding("abc123", "ddim", 20))
    with pytest.raises(ValueError, match="sampler"):
        loaded.check_compatible(["a", "b"], Binding("abc123", "ddpm", 10))
    with pytest.raises(ValueError, match="block names"):
        loaded.check_compatible(["a", "c"], Binding("abc123", "ddim", 10))
    with pytest.raises(ValueError, match="start at 0"):
        Schedule(blocks={"a": [1, 4]}, num_steps=10, sampler="ddim")
    with pytest.raises(FileNotFoundError):
        Schedule.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Schedule.load(tmp_path / "bad.json")


@pytest.mark.parametrize("order", [0, 2])
def test_a_model_changing_block_outputs_in_place_cannot_corrupt_the_store(order):
    f = Forecaster(order)
    values = [torch.full((2, 3), v) for v in (1.0, 2.0, 4.0)]
    for t, v in zip((3.0, 2.0, 1.0), values, strict=True):
        f.update(t, v)
    before = f.predict(0.0).clone()
    for v in values:
        v.mul_(0)  # the model scales what the block returned, in place
    f.predict(0.0).add_(100)  # and what the forecast returned
    assert torch.equal(f.predict(0.0), before)
