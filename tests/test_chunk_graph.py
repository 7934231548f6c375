"""One graph per chunk (policy_accel/chunk_graph.py) on a tiny DP-T policy: the whole chunk, cached or
not, traces with fullgraph=True (any graph break raises), into one graph, without recompiling as chunks
go by, and gives the eager outputs. The default suite traces with dynamo's "eager" backend (the graph is
run op by op: a few seconds); inductor, which takes minutes on this CPU, is in the slow test."""

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

import policy_accel as pa
from policy_accel.cache import Schedule
from tests.conftest import OBS_DIM, make_dp_t_policy

STEPS = 6
OBS = np.random.default_rng(1).uniform(-2, 2, (3, 2, OBS_DIM)).astype(np.float32)
UNEVEN = [0, 1, 4]  # BAC-like uneven refresh steps, where Newton differences matter


def make_policy(kind="ddpm"):
    return make_dp_t_policy(pa.SamplerConfig(kind, STEPS, 12))


def uneven(policy) -> Schedule:
    names = [b.name for b in pa.find_blocks(policy.model)]
    steps = {n: UNEVEN if i % 2 else [0, 2, 3, 5] for i, n in enumerate(names)}  # per-block schedules differ
    return Schedule(blocks=steps, num_steps=STEPS, sampler=policy.sampler.kind, checkpoint_hash=policy.checkpoint_hash)


METHODS = {
    "uncached": lambda p: None,
    "uniform": lambda p: pa.UniformConfig(interval=2),
    "taylorseer": lambda p: pa.TaylorSeerConfig(interval=2, order=2),
    "bac": lambda p: pa.BACConfig(schedule=uneven(p)),
    "bac_taylor": lambda p: pa.BACTaylorConfig(schedule=uneven(p), order=2),
}


def chunk(policy, seed, obs=OBS):
    policy.seed(seed)
    policy.reset()
    return policy.predict_action_chunk(obs)


def compile_fresh(policy, **kwargs):
    torch._dynamo.reset()
    counters.clear()
    return policy.compile_chunk(backend="eager", **kwargs)


@pytest.mark.parametrize("method", METHODS)
def test_the_whole_chunk_is_one_graph_with_the_eager_outputs(method):
    policy = make_policy()  # DDPM: the per-step noise goes in as tensors, drawn as the eager loop draws it
    config = METHODS[method](policy)
    if config is not None:
        pa.accelerate(policy, config)
    eager = [chunk(policy, s) for s in (0, 1)]
    counts = None if config is None else {n: (b.computed, b.skipped) for n, b in pa.cache_stats(policy).blocks.items()}
    if config is not None:  # fresh counters, FLOPs not probed: the first chunk runs compiled
        pa.remove_acceleration(policy)
        pa.accelerate(policy, config)
    compile_fresh(policy)
    np.testing.assert_array_equal(chunk(policy, 0), eager[0])
    assert counters["stats"]["unique_graphs"] == 1  # fullgraph=True: a graph break would have raised
    with torch.compiler.set_stance("fail_on_recompile"):  # the next chunk reuses the graph
        np.testing.assert_array_equal(chunk(policy, 1), eager[1])
    if config is not None:
        stats = pa.cache_stats(policy)
        assert {n: (b.computed, b.skipped) for n, b in stats.blocks.items()} == counts  # added from the masks
        assert stats.cache_bytes == 0 and "FLOPs not measured" in str(stats)  # the state stayed in the graph
        pa.remove_acceleration(policy)  # hooks come off, the graph goes with them
        assert policy.chunk_graph is None and policy.clock.listeners == []
        assert all("forward" not in m.__dict__ for m in policy.model.modules())
        plain = make_policy()
        np.testing.assert_array_equal(chunk(policy, 0), chunk(plain, 0))


def test_explain_finds_no_graph_break_and_done_rows_share_the_batch_graph():
    policy = make_policy("ddim")
    pa.accelerate(policy, pa.BACTaylorConfig(schedule=uneven(policy), order=1))
    history = torch.from_numpy(OBS)
    noise = torch.randn(3, policy.config.horizon, policy.config.action_dim)
    with torch.inference_mode():
        explained = torch._dynamo.explain(policy._chunk)(history, noise, [None] * STEPS)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    done = np.array([False, True, False])
    policy.seed(3)
    policy.reset()
    eager = policy.select_action(OBS[:, -1], done=done)  # rows 0 and 2 computed as a batch of 2
    compile_fresh(policy)
    policy.seed(3)
    policy.reset()
    compiled = policy.select_action(OBS[:, -1], done=done)  # all 3 rows in the batch-3 graph, row 1 zeroed
    np.testing.assert_allclose(compiled, eager, rtol=0, atol=1e-6)
    assert not compiled[1].any()
    with torch.compiler.set_stance("fail_on_recompile"):
        for _ in range(5):  # the queue empties and a second chunk is computed by the same graph
            policy.select_action(OBS[:, -1], done=~done)
        policy.predict_action_chunk(OBS, noise)  # a caller's noise, made outside inference mode
    assert counters["stats"]["unique_graphs"] == 1


def test_what_cannot_be_one_graph_is_refused_by_name():
    policy = make_policy()
    pa.accelerate(policy, pa.DiffusersFBCConfig(threshold=0.05))
    with pytest.raises(ValueError, match="decides from the data.*static schedule"):
        policy.compile_chunk()
    pa.remove_acceleration(policy)
    pa.accelerate(policy, pa.UniformConfig(interval=2, compile=True))
    with pytest.raises(ValueError, match="compile=True"):
        policy.compile_chunk()
    pa.remove_acceleration(policy)
    with pytest.raises(ValueError, match="fullgraph=True"):
        policy.compile_chunk(fullgraph=False)
    with pytest.raises(RuntimeError, match="CUDA"):
        policy.compile_chunk(cuda_graph=True)
    policy.compile()
    with pytest.raises(RuntimeError, match="compile\\(False\\)"):
        policy.compile_chunk()
    policy.compile(False)
    policy.compile_chunk(backend="eager")
    with pytest.raises(RuntimeError, match="compile_chunk\\(False\\)"):
        pa.accelerate(policy, pa.UniformConfig(interval=2))
    with pytest.raises(RuntimeError, match="compile_chunk\\(False\\)"):
        policy.compile()
    policy.set_sampler(pa.SamplerConfig("ddim", STEPS, 12))
    with pytest.raises(RuntimeError, match="another policy state.*sampler.*compile_chunk"):
        policy.predict_action_chunk(OBS)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["uncached", "taylorseer"])
def test_inductor_compiles_the_whole_chunk_to_the_eager_outputs(method):
    policy = make_policy()
    config = METHODS[method](policy)
    if config is not None:
        pa.accelerate(policy, config)
    eager = [chunk(policy, s) for s in (0, 1)]
    torch._dynamo.reset()
    policy.compile_chunk()
    np.testing.assert_allclose(chunk(policy, 0), eager[0], rtol=1e-4, atol=1e-5)
    with torch.compiler.set_stance("fail_on_recompile"):
        np.testing.assert_allclose(chunk(policy, 1), eager[1], rtol=1e-4, atol=1e-5)
