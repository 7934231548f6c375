"""The engine on bare denoisers (no policy): counts, memory, forecasting quality, configs, and the
diffusers peers on a model family the engine has never seen (the tiny guided flow DiT)."""

from types import SimpleNamespace

import pytest
import torch

import policy_accel as pa
from policy_accel.cache.peers import diffusers_refresh_steps
from tests.conftest import make_family


@pytest.fixture
def dit():
    return make_family("guided_dit")


def test_uniform_counts_and_cache_memory_bound(dit):
    cond, noise = dit.inputs(3)
    handle = dit.attach(pa.UniformConfig(interval=4))
    dit.chunk(cond, noise)
    stats = handle.stats()
    assert all((b.computed, b.skipped) == (2 * 3, 2 * 7) for b in stats.blocks.values())  # 2 branches x steps 0, 4, 8
    one = 3 * 6 * 16 * 4  # one (B, 1 + T, C) float32 branch output
    # order 0: one tensor per block and branch, plus the stack shortcut's summed residual per branch
    assert stats.cache_bytes == 6 * 2 * one + 2 * one
    handle.remove()
    handle = dit.attach(pa.TaylorSeerConfig(interval=4, order=2))
    dit.chunk(cond, noise)
    assert handle.stats().cache_bytes == 6 * 2 * 3 * one  # order + 1 tensors per block and branch
    handle.remove()
    assert all(h.nbytes == 0 for h in handle.hooks)


def test_taylor_beats_reuse_on_a_smooth_trajectory(dit):
    cond, noise = dit.inputs(3)
    ref = dit.chunk(cond, noise)
    errors = {}
    for cfg in [pa.UniformConfig(interval=3), pa.TaylorSeerConfig(interval=3, order=1)]:
        handle = dit.attach(cfg)
        errors[cfg.tag] = (dit.chunk(cond, noise) - ref).abs().max().item()
        handle.remove()
    assert 0 < errors["taylorseer_n3_o1_w1"] < errors["uniform_n3"]


def test_bad_configs_raise_clear_errors(dit):
    with pytest.raises(TypeError, match="unknown acceleration config"):
        dit.attach(SimpleNamespace(blocks=None))
    with pytest.raises(ValueError, match="interval"):
        pa.UniformConfig(interval=0)
    with pytest.raises(ValueError, match="order"):
        pa.TaylorSeerConfig(order=-1)
    with pytest.raises(ValueError, match="differences"):
        pa.BACTaylorConfig(schedule="x.json", differences="forward")
    with pytest.raises(ValueError, match="schedule=.*or budget"):
        pa.BACConfig()
    with pytest.raises(ValueError, match="has no schedule yet"):
        dit.attach(pa.BACConfig(budget=3))
    with pytest.raises(FileNotFoundError, match="schedule file not found"):
        dit.attach(pa.BACConfig(schedule="missing.json"))
    with pytest.raises(ValueError, match="matches the block pattern"):
        dit.attach(pa.UniformConfig(interval=2, blocks=r"nothing\.here"))
    with pytest.raises(ValueError, match="retention_ratio"):
        pa.DiffusersMagCacheConfig(ratios="m.json", retention_ratio=1.0)


def test_a_failed_attach_leaves_no_wrapper_behind(dit):
    from policy_accel.cache.hooks import BlockHook, BlockInfo

    with pytest.raises(ValueError, match="step 0 must compute"):
        BlockHook(dit.denoiser.blocks[0].attn, BlockInfo("blocks.0.attn", 0, "attn"), [False, True], 0, "newton",
                  dit.clock)
    other = pa.Schedule(blocks=dit.schedule([0]).blocks, num_steps=10, sampler="ddim",
                        checkpoint_hash=dit.binding.checkpoint_hash)
    with pytest.raises(ValueError, match="made for sampler 'ddim'"):
        dit.attach(pa.BACConfig(schedule=other))
    assert all("forward" not in m.__dict__ for m in dit.denoiser.modules()) and dit.clock.listeners == []


def test_diffusers_taylorseer_matches_ours_with_its_conventions_on_both_branches(dit):
    steps = diffusers_refresh_steps(10, interval=3, warmup=2)
    assert steps == [0, 1, 3, 6, 9]
    cond, noise = dit.inputs(3)
    handle = dit.attach(pa.DiffusersTaylorSeerConfig(interval=3, order=2, warmup=2))
    theirs = dit.chunk(cond, noise)
    assert torch.equal(dit.chunk(cond, noise), theirs)  # state reset per chunk
    handle.remove()
    dit.attach(pa.BACTaylorConfig(schedule=dit.schedule(steps), order=2, differences="backward"))
    torch.testing.assert_close(dit.chunk(cond, noise), theirs, rtol=1e-5, atol=1e-6)
