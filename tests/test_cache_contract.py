"""The cache contract, on every model family (tests/conftest.py: DP-T, a tiny flow DiT with classifier-free
guidance, the VLA flow experts and action DiTs): exactness, clean removal, batching, no leaked state (chunks, episodes,
batch sizes, guidance branches), and binding errors."""

import inspect

import pytest
import torch

import policy_accel as pa
from policy_accel.cache import Binding
from tests.conftest import make_family

STATIC = [lambda f: pa.UniformConfig(interval=3), lambda f: pa.TaylorSeerConfig(interval=3, order=2),
          lambda f: pa.BACTaylorConfig(schedule=f.schedule([0, 1, 4, 5, 9]), order=1)]


@pytest.mark.parametrize("make_config", [lambda f: pa.EveryStepConfig(),
                                         lambda f: pa.BACTaylorConfig(schedule=f.schedule(range(f.sampler.num_steps)),
                                                                      order=2)])
def test_compute_every_step_equals_uncached_exactly(family, make_config):
    cond, noise = family.inputs(3)
    ref = family.chunk(cond, noise)
    handle = family.attach(make_config(family))
    assert torch.equal(family.chunk(cond, noise), ref)
    assert handle.stats().skipped_fraction == 0
    per_call = 2 if family.guidance else 1
    assert all(b.computed == family.sampler.num_steps * per_call for b in handle.stats().blocks.values())


def test_remove_restores_exact_behaviour_and_signature(family):
    name = family.block_names[-1]
    module = dict(family.denoiser.named_modules())[name]
    sig = inspect.signature(module.forward)
    state = {k: v.clone() for k, v in family.denoiser.state_dict().items()}
    cond, noise = family.inputs(3)
    ref = family.chunk(cond, noise)
    handle = family.attach(pa.TaylorSeerConfig(interval=3, order=2))
    assert not torch.equal(family.chunk(cond, noise), ref)
    assert "forward" in module.__dict__ and inspect.signature(module.forward) == sig
    handle.remove()
    assert "forward" not in module.__dict__ and inspect.signature(module.forward) == sig
    assert family.clock.listeners == [] and all(h.nbytes == 0 for h in handle.hooks)
    assert all(torch.equal(v, state[k]) for k, v in family.denoiser.state_dict().items())
    assert torch.equal(family.chunk(cond, noise), ref)


@pytest.mark.parametrize("make_config", STATIC)
def test_batch_equals_per_sample_under_static_schedule(family, make_config):
    cond, noise = family.inputs(3)
    family.attach(make_config(family))
    batch = family.chunk(cond, noise)
    single = torch.cat([family.chunk(cond[i:i + 1], noise[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(batch, single, rtol=1e-5, atol=1e-5)


def test_no_state_leaks_across_chunks_episodes_or_batch_sizes(family):
    cond, noise = family.inputs(3)
    family.attach(pa.TaylorSeerConfig(interval=3, order=2))
    first = family.chunk(cond[:2], noise[:2])
    family.chunk(cond, noise)  # another chunk, another batch size
    family.clock.reset()  # a new episode
    assert torch.equal(family.chunk(cond[:2], noise[:2]), first)
    fresh = make_family(family.name)
    fresh.attach(pa.TaylorSeerConfig(interval=3, order=2))
    assert torch.equal(fresh.chunk(cond[:2], noise[:2]), first)


@pytest.mark.parametrize("guided", ["guided_dit", "cogact"])
def test_guidance_branches_never_share_cache_state(guided):
    family = make_family(guided)
    name = family.block_names[2]  # blocks.1.attn / transformer_blocks.1.attn
    module = dict(family.denoiser.named_modules())[name]
    handle = family.attach(pa.UniformConfig(interval=4))  # steps 0, 4, 8 compute; the others reuse
    if handle.stack is not None:  # per block here (the skipped stack's branches: test_stack_shortcut.py)
        handle.stack.enabled = False
    wrapped, calls = module.forward, []  # record what the cache's wrapper gives the layer at each call

    def record(*args):
        calls.append((family.clock.step, family.clock.branch_key, wrapped(*args)))
        return calls[-1][2]

    module.forward = record
    cond, noise = family.inputs(2)
    family.chunk(cond, noise)
    assert [(k, b) for k, b, _ in calls] == [(k, b) for k in range(10) for b in ("cond", "uncond")]
    for k, branch, out in calls:
        last = max(s for s in (0, 4, 8) if s <= k)
        stored = next(o for s, b, o in calls if s == last and b == branch)
        assert torch.equal(out, stored), (k, branch)  # reuse of its own branch's last computed output
    cond_out = next(o for s, b, o in calls if s == 0 and b == "cond")
    assert not torch.allclose(cond_out, next(o for s, b, o in calls if s == 0 and b == "uncond"))
    assert set(next(h for h in handle.hooks if h.info.name == name).forecasters) == {"cond", "uncond"}
    assert family.clock.branch_key == "cond"


def test_a_denoiser_call_outside_a_sampling_pass_computes_exactly(family):
    cond, noise = family.inputs(2)
    ctx = family.denoiser.prepare(cond)
    t = torch.tensor(family.sampler.timesteps()[3])
    with torch.no_grad():
        ref = family.denoiser(noise, t, ctx)
        family.attach(pa.UniformConfig(interval=5))
        family.chunk(cond, noise)  # the cache now holds this chunk's outputs
        assert torch.equal(family.denoiser(noise, t, ctx), ref)


def test_schedule_binding_errors(family):
    good = family.schedule([0, 5])
    family.attach(pa.BACConfig(schedule=good)).remove()
    b = family.binding
    with pytest.raises(ValueError, match="made for checkpoint"):
        pa.attach(family.denoiser, pa.BACConfig(schedule=good), family.clock, Binding("other", b.sampler, b.num_steps))
    other_kind = "ddpm" if b.sampler != "ddpm" else "ddim"
    with pytest.raises(ValueError, match="made for sampler"):  # same step count, another sampler kind
        pa.attach(family.denoiser, pa.BACConfig(schedule=good), family.clock, Binding(b.checkpoint_hash, other_kind,
                                                                                      b.num_steps))
    with pytest.raises(ValueError, match="made for .* steps"):
        pa.attach(family.denoiser, pa.BACConfig(schedule=good), family.clock, Binding(b.checkpoint_hash, b.sampler, 20))
    unbound = pa.Schedule(**{**good.__dict__, "checkpoint_hash": ""})
    with pytest.raises(ValueError, match="names no checkpoint"):
        family.attach(pa.BACConfig(schedule=unbound))
    family.attach(pa.BACConfig(schedule=unbound), allow_unbound=True)
    with pytest.raises(RuntimeError, match="already accelerated"):
        family.attach(pa.UniformConfig(interval=2))


def test_a_sampler_changed_after_attach_is_rejected_even_with_the_same_step_count(family):
    family.attach(pa.UniformConfig(interval=2))
    cond, noise = family.inputs(1)
    K = family.sampler.num_steps
    other = pa.SamplerConfig("ddpm", K, K) if family.sampler.kind == "ddim" else pa.SamplerConfig("flow", K - 1)
    with pytest.raises(ValueError, match=f"attached for {family.sampler.kind}-{K}"):
        family.chunk(cond, noise, sampler=other)
    assert not family.clock.running  # the failed pass left the clock usable
    family.chunk(cond, noise)


def test_configs_round_trip_through_plain_dicts(tmp_path):
    for cfg in [pa.UniformConfig(interval=4, compile=True), pa.TaylorSeerConfig(interval=3, order=1, warmup=2),
                pa.BACTaylorConfig(schedule=str(tmp_path / "s.json"), order=1), pa.EveryStepConfig(),
                pa.DiffusersFBCConfig(threshold=0.2), pa.DiffusersMagCacheConfig(ratios="m.json", retention_ratio=0.1)]:
        data = pa.config_to_dict(cfg)
        assert all(isinstance(v, (str, int, float, bool, type(None))) for v in data.values())
        assert pa.config_from_dict(data) == cfg
    with pytest.raises(ValueError, match="unknown acceleration config type"):
        pa.config_from_dict({"type": "Nope"})
    with pytest.raises(ValueError, match="bad fields for UniformConfig"):
        pa.config_from_dict({"type": "UniformConfig", "intervall": 3})
    sched = pa.Schedule(blocks={"a": [0]}, num_steps=2, sampler="ddim")
    with pytest.raises(ValueError, match="save it and give its path"):
        pa.config_to_dict(pa.BACConfig(schedule=sched))
