"""The engine through the VLA families' seam (flow experts SmolVLA / π0.5, action DiTs GR00T N1.5 / CogACT), tiny
sizes: BAC calibration on 4- and 10-step samplers (through a Policy and on a bare denoiser), guided calibration,
no host sync on the static-schedule path, and (slow) one fullgraph torch.compile graph per chunk.
That the cond and uncond branches never share cache state (CogACT) is in test_cache_contract.py."""

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import policy_accel as pa
from policy_accel.calibration import calibrate_denoiser
from policy_accel.sampling import build_sampler
from tests.conftest import Family, make_family

NEW = ["flow_smolvla", "flow_pi05", "groot_n15", "cogact"]
FLOW_ARCH = dict(n_layer=3, width=32, n_head=4, n_kv_head=2, head_dim=8, mlp_dim=48, prefix_width=24, prefix_mlp_dim=40)
DIT_ARCH = dict(num_layers=3, num_heads=2, head_dim=8)
GROOT_ARCH = DIT_ARCH | dict(mode="groot_n15", cross_attention_dim=16, vl_heads=2, vl_head_dim=8, hidden_size=16,
                             num_future_tokens=2, max_seq_len=8)
POLICIES = {  # name: (model_type, arch, native sampler, guidance scale, BAC budget)
    "groot_n15": ("action_dit", GROOT_ARCH, pa.SamplerConfig("flow", 4), None, 2),
    "smolvla": ("flow_expert", FLOW_ARCH | dict(mode="smolvla"), pa.SamplerConfig("flow", 10), None, 4),
    "pi05": ("flow_expert", FLOW_ARCH | dict(mode="pi05", n_kv_head=1), pa.SamplerConfig("flow", 10), None, 4),
    "cogact": ("action_dit", DIT_ARCH | dict(mode="cogact", cond_dim=16), pa.SamplerConfig("ddim", 10), 1.5, 4),
}
OBS = list(np.random.default_rng(3).uniform(-2, 2, (5, 2, 5)).astype(np.float32))


def vla_policy(name: str) -> pa.Policy:
    model_type, arch, sampler, guidance, _ = POLICIES[name]
    torch.manual_seed(0)
    policy = pa.Policy(pa.PolicyConfig(obs_dim=5, action_dim=3, horizon=8, n_obs_steps=2, n_action_steps=4,
                                       model_type=model_type, model=arch, sampler=sampler, guidance_scale=guidance))
    rng = np.random.default_rng(0)
    policy.fit_normalizers(rng.uniform(-2, 2, (100, 5)), rng.uniform(-1, 1, (100, 3)))
    return policy


@pytest.mark.parametrize("name", list(POLICIES))
def test_calibration_through_the_policy_yields_a_schedule_the_engine_attaches(name):
    """A 4-step flow sampler (GR00T), 10-step flow (SmolVLA, π0.5) and guided DDIM-10 (CogACT: each branch is
    profiled as a sample of its own, the schedule is over the sampler's 10 steps, not its 20 denoiser calls)."""
    policy, budget = vla_policy(name), POLICIES[name][4]
    K, calls = policy.sampler.num_steps, 2 if policy.config.guidance_scale else 1
    sched = pa.calibrate(policy, OBS, budget=budget, bubble_blocks=2, batch_size=3)
    assert (sched.num_steps, sched.sampler, sched.checkpoint_hash) == (K, policy.sampler.kind, policy.checkpoint_hash)
    assert set(sched.blocks) == {b.name for b in pa.find_blocks(policy.model)}
    assert sched.calibration["n_observations"] == len(OBS)
    acs = sched.calibration["acs_steps_before_union"]
    assert all(len(s) == budget and s[0] == 0 and s[-1] < K for s in acs.values())
    assert all(set(acs[n]) <= set(steps) for n, steps in sched.blocks.items())  # the union only adds steps
    handle = pa.accelerate(policy, pa.BACTaylorConfig(schedule=sched, order=1))
    assert np.isfinite(policy.predict_action_chunk(OBS[0][None])).all()
    for block, stats in handle.stats().blocks.items():
        assert (stats.computed, stats.skipped) == (calls * len(sched.blocks[block]),
                                                   calls * (K - len(sched.blocks[block])))


@pytest.mark.parametrize("name", NEW)
def test_calibration_of_a_bare_denoiser_attaches_and_matches_a_per_pass_profile(name):
    family = make_family(name)
    cond, noise = family.inputs(3)
    chunks = [lambda i=i: family.chunk(cond[i:i + 1], noise[i:i + 1]) for i in range(3)]
    sched = calibrate_denoiser(family.denoiser, family.clock, family.binding, chunks, budget=4, bubble_blocks=1)
    assert sched.calibration["n_observations"] == 3 and family.clock.listeners == []
    # the same passes as one batch of 3: the same per-sample statistics, so the same schedule
    batched = calibrate_denoiser(family.denoiser, family.clock, family.binding, [lambda: family.chunk(cond, noise)],
                                 budget=4, bubble_blocks=1)
    assert batched.blocks == sched.blocks
    family.attach(pa.BACConfig(schedule=sched))
    assert torch.isfinite(family.chunk(cond, noise)).all()
    with pytest.raises(RuntimeError, match="uncached"):
        calibrate_denoiser(family.denoiser, family.clock, family.binding, chunks, budget=4)


class NoHostSync(TorchDispatchMode):
    """Fails on any op that copies a tensor value to the host (.item(), float(t), bool(t), ...)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            raise AssertionError("host sync")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", NEW)
def test_a_static_schedule_chunk_never_syncs_the_host(name):
    """prepare (per-step tensors from the sampler's Python t values) and the cached loop read no tensor value.
    (GR00T's prepare used to turn its timesteps into a tensor and read them back, one sync per step.)"""
    family = make_family(name)
    cond, noise = family.inputs(2)
    family.attach(pa.BACTaylorConfig(schedule=family.schedule([0, 1, 4, 5, 9]), order=1))
    eager = family.chunk(cond, noise)
    with NoHostSync():
        assert torch.equal(family.chunk(cond, noise), eager)


def short(name: str, steps: int = 3) -> Family:
    """A family on a 3-step sampler of its kind (tracing unrolls every step)."""
    f = make_family(name)
    return Family(name, f.denoiser, f.cond_shape, f.action_shape, pa.SamplerConfig(f.sampler.kind, steps), f.guidance)


@pytest.mark.slow
@pytest.mark.parametrize("name", NEW)
def test_a_static_schedule_chunk_compiles_to_one_graph_and_matches_eager(name):
    """torch.compile(fullgraph=True) of a whole chunk (prepare + the cached loop, the step clock and the
    hooks' Python logic unrolled at trace time): no graph break, eager's output. Backend "eager" (dynamo's
    capture only; inductor's codegen takes minutes here). ~10 s per family on this CPU. The first call starts
    from the hook state the eager chunks left, the next from the state a traced chunk leaves, so the second
    call may recompile once; after that the graph stays. (The policy-level whole-chunk graph is
    policy_accel/chunk_graph.py, tested on DP-T in test_chunk_graph.py.)"""
    from torch._dynamo.utils import counters

    family = short(name)
    family.attach(pa.BACTaylorConfig(schedule=family.schedule([0, 2]), order=1))
    inputs = [family.inputs(2, seed=s) for s in (0, 1, 2)]
    eager = [family.chunk(c, n) for c, n in inputs]
    ts, sampler = family.sampler.timesteps(), build_sampler(family.sampler)

    def chunk(cond, noise):
        ctx = family.denoiser.prepare(cond, ts)
        return pa.sample(family.denoiser, ctx, noise, sampler, clock=family.clock, guidance=family.guidance)

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(chunk, fullgraph=True, backend="eager")
    with torch.no_grad():
        for (cond, noise), ref in zip(inputs, eager, strict=True):
            torch.testing.assert_close(compiled(cond, noise), ref, rtol=1e-6, atol=1e-6)
        graphs = counters["stats"]["unique_graphs"]
        assert graphs <= 2
        torch.testing.assert_close(compiled(*inputs[0]), eager[0], rtol=1e-6, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.parametrize("name", ["cogact", "groot_n15"])
def test_diffusers_first_block_cache_runs_on_the_action_dits_whole_layers(name):
    """Threshold 0 never skips (the uncached chunk); an infinite one skips every layer but the first after step 0
    (on each guidance branch): the same chunk as our reuse with layer 0's blocks on every step, the rest on 0."""
    family = make_family(name)
    cond, noise = family.inputs(1)
    uncached = family.chunk(cond, noise)
    for threshold, steps_after_layer_0 in [(0.0, range(family.sampler.num_steps)), (1e9, [0])]:
        handle = family.attach(pa.DiffusersFBCConfig(threshold=threshold))
        theirs = family.chunk(cond, noise)
        handle.remove()
        steps = {b.name: list(range(family.sampler.num_steps)) if b.layer == 0 else list(steps_after_layer_0)
                 for b in pa.find_blocks(family.denoiser)}
        handle = family.attach(pa.BACConfig(schedule=pa.Schedule(steps, family.sampler.num_steps,
                                                                 family.sampler.kind)), allow_unbound=True)
        torch.testing.assert_close(theirs, family.chunk(cond, noise), rtol=1e-5, atol=1e-5)
        handle.remove()
    assert not torch.equal(theirs, uncached)  # the skips happened
    assert all(not m._diffusers_hook.hooks for m in family.denoiser.modules() if hasattr(m, "_diffusers_hook"))


def test_diffusers_block_level_caches_refuse_the_flow_expert_whose_layers_are_not_modules_to_call():
    with pytest.raises(ValueError, match="no stack of >= 2 whole layers"):
        make_family("flow_pi05").attach(pa.DiffusersFBCConfig())
