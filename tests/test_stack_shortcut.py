"""The fully cached step (policy_accel/cache/stack.py): on a step on which every block is skipped, a denoiser
with the `skip_stack` seam does not enter its layer stack; the cache adds the sum of the blocks' forecasts
once. Families here: every family of tests/conftest.py (tiny DP-T, the guided flow DiT, SmolVLA, π0.5,
GR00T N1.5, CogACT).

Exactness: the per-block path adds the forecasts to the stream one at a time, ((h + F_1) + F_2) + ...; the
shortcut adds their sum, h + (F_1 + F_2 + ...). Against the same sum the step is bit-exact; against the
per-block path it differs by the float rounding of that summation order (a few ulp of the stream), hence
the tolerances below."""

import functools

import pytest
import torch

import policy_accel as pa
from tests.conftest import FAMILIES, make_family

SEAM = FAMILIES
# summation order only, amplified by order-2 forecasts, guidance and the sampler update: 3e-6 measured on
# CogACT with BAC+Taylor on an AVX-512 CPU, where 1e-6 had held on an AVX2 one
CLOSE = dict(rtol=1e-4, atol=1e-5)
UNEVEN = {0: [0, 1, 4, 5, 9], 1: [0, 4, 9], 2: [0, 2, 4, 7, 9]}  # per-layer BAC-like steps: 3, 6, 8 skip every block


def bac_schedule(family) -> pa.Schedule:
    layer = {b.name: b.layer for b in pa.find_blocks(family.denoiser)}
    K = family.sampler.num_steps  # GR00T runs 4 steps: {0, 1}, {0}, {0, 2}; step 3 skips every block
    return pa.Schedule(blocks={n: [k for k in UNEVEN[layer[n] % 3] if k < K] for n in family.block_names}, num_steps=K,
                       sampler=family.sampler.kind, checkpoint_hash=family.binding.checkpoint_hash)


CONFIGS = {
    "uniform": lambda f: pa.UniformConfig(interval=3),
    "taylorseer": lambda f: pa.TaylorSeerConfig(interval=3, order=2),
    "taylorseer_backward": lambda f: pa.TaylorSeerConfig(interval=3, order=1, differences="backward"),
    "bac": lambda f: pa.BACConfig(schedule=bac_schedule(f)),
    "bac_taylor": lambda f: pa.BACTaylorConfig(schedule=bac_schedule(f), order=2),
}


@pytest.mark.parametrize("name", SEAM)
@pytest.mark.parametrize("method", CONFIGS)
def test_chunks_equal_the_per_block_path(name, method):
    family = make_family(name)
    cond, noise = family.inputs(2)
    handle = family.attach(CONFIGS[method](family))
    assert handle.stack is not None and any(handle.stack.skip)
    fast = family.chunk(cond, noise)
    assert handle.stack.calls == sum(handle.stack.skip) * (2 if family.guidance else 1)
    counts = {n: (b.computed, b.skipped) for n, b in handle.stats().blocks.items()}
    handle.stack.enabled = False
    slow = family.chunk(cond, noise)
    torch.testing.assert_close(fast, slow, **CLOSE)
    assert {n: (b.computed, b.skipped) for n, b in handle.stats().blocks.items()} == \
        {n: (2 * c, 2 * s) for n, (c, s) in counts.items()}  # a skipped stack counts as every block's skip
    handle.stack.enabled = True
    assert torch.equal(family.chunk(cond, noise), fast)  # no state carried from the per-block chunk


@pytest.mark.parametrize("name", SEAM)
@pytest.mark.parametrize("order", [0, 2])
def test_a_fully_skipped_step_is_the_reference_computation_with_the_cached_residuals(name, order):
    family = make_family(name)
    model, clock = family.denoiser, family.clock
    ts = family.sampler.timesteps()
    iv = 4 if len(ts) >= 8 else 2  # steps 0, iv, 2 iv, ... compute; step iv + 1 skips every block
    handle = family.attach(pa.TaylorSeerConfig(interval=iv, order=order, warmup=0))
    cond, x = family.inputs(2)
    with torch.no_grad():
        ctx = model.prepare(cond, ts)
        clock.begin_chunk(2, family.sampler.kind, ts)
        for k in (0, iv):  # what the stored points would be at step iv + 1 of a chunk
            clock.at(k, ts[k])
            model(x + k, torch.tensor(ts[k]), ctx.at_step(k))
        k = iv + 1
        clock.at(k, ts[k])
        t = torch.tensor(ts[k])
        fast = model(x, t, ctx.at_step(k))
        forecasts = [h.forecasters["cond"].predict(ts[k]) for h in handle.hooks]
        if order == 0:  # reuse: the same additions in the same order -> bit-exact
            residual = functools.reduce(torch.add, forecasts)
            assert torch.equal(fast, model.skip_stack(x, t, ctx.at_step(k), residual=residual))
        handle.stack.enabled = False
        slow = model(x, t, ctx.at_step(k))  # the per-block path: each block's forecast added in turn
        clock.end_chunk()
        assert not torch.equal(fast, model.skip_stack(x, t, ctx.at_step(k), residual=torch.zeros_like(forecasts[0])))
    assert handle.stack.calls == 1
    torch.testing.assert_close(fast, slow, **CLOSE)


def test_the_guidance_branches_keep_their_own_sums():
    family = make_family("guided_dit")
    handle = family.attach(pa.UniformConfig(interval=4))  # steps 1-3, 5-7 and 9 skip the stack
    cond, noise = family.inputs(2)
    out = family.chunk(cond, noise)
    stack = handle.stack
    assert set(stack.sums) == {"cond", "uncond"}  # held since step 8, the last computed one
    for branch, groups in stack.sums.items():
        assert len(groups) == 1 and groups[0].nodes == [family.sampler.timesteps()[8]]
        expected = functools.reduce(torch.add, [h.forecasters[branch].coeffs[0] for h in handle.hooks])
        assert torch.equal(groups[0].coeffs[0], expected)
    assert not torch.allclose(stack.sums["cond"][0].coeffs[0], stack.sums["uncond"][0].coeffs[0])
    assert family.clock.branch_key == "cond"
    stack.enabled = False
    torch.testing.assert_close(family.chunk(cond, noise), out, **CLOSE)


@pytest.mark.parametrize("name", SEAM)
def test_remove_takes_the_stack_shortcut_off_too(name):
    family = make_family(name)
    cond, noise = family.inputs(2)
    ref = family.chunk(cond, noise)
    handle = family.attach(pa.UniformConfig(interval=3))
    assert "forward" in family.denoiser.__dict__
    family.chunk(cond, noise)
    assert handle.stats().cache_bytes > 0
    handle.remove()
    assert "forward" not in family.denoiser.__dict__ and handle.stack.sums == {}
    assert all("forward" not in m.__dict__ for m in family.denoiser.modules())
    assert torch.equal(family.chunk(cond, noise), ref)


def test_no_shortcut_without_fully_skipped_steps_or_when_some_blocks_are_not_wrapped():
    family = make_family("dp_t")
    assert family.attach(pa.EveryStepConfig()).stack is None  # nothing to skip: no wrapper on the denoiser
    family.clock.listeners.clear()
    for m in family.denoiser.modules():
        m.__dict__.pop("forward", None)
    handle = family.attach(pa.UniformConfig(interval=3, blocks=r"decoder\.layers\.\d+\.ff"))
    assert handle.stack is None  # the attention blocks would still compute: the stack must run


def test_a_denoiser_call_outside_a_sampling_pass_runs_the_stack():
    family = make_family("dp_t")
    cond, noise = family.inputs(2)
    ctx = family.denoiser.prepare(cond)
    t = torch.tensor(family.sampler.timesteps()[1])
    with torch.no_grad():
        ref = family.denoiser(noise, t, ctx)
        family.attach(pa.UniformConfig(interval=5))
        family.chunk(cond, noise)
        assert torch.equal(family.denoiser(noise, t, ctx), ref)
