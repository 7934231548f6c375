"""Per-branch schedules (PerBranchConfig): under classifier-free guidance each branch runs on its own static
schedule, e.g. the unconditional branch refreshed more coarsely than the conditional one."""

import pytest
import torch

import policy_accel as pa
from tests.conftest import make_family

GUIDED = ["guided_dit", "cogact"]


def computed_steps(family, config) -> dict[str, list[int]]:
    """Which steps the first wrapped block really computed on, per guidance branch (a spy on its forward)."""
    handle = family.attach(config)
    hook = handle.hooks[0]
    seen: dict[str, list[int]] = {}
    compute = hook.compute

    def spy(*args, **kwargs):
        seen.setdefault(family.clock.branch_key, []).append(family.clock.step)
        return compute(*args, **kwargs)

    hook.compute = spy
    hook.flops_per_call = 0  # skip the FLOP probe, which calls the original forward instead of `compute`
    family.chunk(*family.inputs(2))
    handle.remove()
    return seen


@pytest.mark.parametrize("name", GUIDED)
def test_each_branch_computes_on_its_own_steps(name):
    family = make_family(name)
    K = family.sampler.num_steps
    seen = computed_steps(family, pa.PerBranchConfig(pa.UniformConfig(2), pa.UniformConfig(5)))
    assert seen == {"cond": list(range(0, K, 2)), "uncond": list(range(0, K, 5))}


@pytest.mark.parametrize("name", GUIDED)
@pytest.mark.parametrize("config", [pa.UniformConfig(3), pa.TaylorSeerConfig(3, order=2)])
def test_the_same_schedule_on_both_branches_is_the_method_itself(name, config):
    family = make_family(name)
    cond, noise = family.inputs(2)
    handle = family.attach(config)
    expected = family.chunk(cond, noise)
    handle.remove()
    handle = family.attach(pa.PerBranchConfig(config, config))
    assert torch.equal(family.chunk(cond, noise), expected)
    handle.remove()


@pytest.mark.parametrize("name", GUIDED)
def test_every_step_on_both_branches_is_the_uncached_chunk_and_a_coarse_uncond_changes_it(name):
    family = make_family(name)
    cond, noise = family.inputs(2)
    reference = family.chunk(cond, noise)
    handle = family.attach(pa.PerBranchConfig(pa.EveryStepConfig(), pa.EveryStepConfig()))
    assert torch.equal(family.chunk(cond, noise), reference)
    handle.remove()
    handle = family.attach(pa.PerBranchConfig(pa.EveryStepConfig(), pa.UniformConfig(3)))
    coarse = family.chunk(cond, noise)
    assert not torch.equal(coarse, reference)
    stats = handle.stats()
    K, n = family.sampler.num_steps, len(family.block_names)
    assert sum(b.computed for b in stats.blocks.values()) == n * (K + len(range(0, K, 3)))
    handle.remove()


def test_the_stack_shortcut_skips_per_branch():
    family = make_family("guided_dit")  # 10 steps: cond computes 0, 4, 8; uncond 0, 2, 4, 6, 8
    cond, noise = family.inputs(2)
    handle = family.attach(pa.PerBranchConfig(pa.UniformConfig(4), pa.UniformConfig(2)))
    fast = family.chunk(cond, noise)
    stack = handle.stack
    assert stack.calls == 7 + 5  # cond skips 1-3, 5-7, 9; uncond skips 1, 3, 5, 7, 9
    stack.enabled = False
    torch.testing.assert_close(family.chunk(cond, noise), fast, rtol=1e-5, atol=1e-6)


def test_bad_per_branch_configs_name_the_problem():
    with pytest.raises(TypeError, match="static-schedule config"):
        pa.PerBranchConfig(pa.DiffusersFBCConfig(), pa.UniformConfig(2))
    with pytest.raises(ValueError, match="same blocks"):
        pa.PerBranchConfig(pa.UniformConfig(2), pa.UniformConfig(2, blocks=r"blocks\.0\.attn"))
    family = make_family("guided_dit")
    with pytest.raises(ValueError, match="per-branch schedules"):
        family.attach(pa.CarryConfig(pa.PerBranchConfig(pa.UniformConfig(2), pa.UniformConfig(4)), carry=".*"))
    assert not family.clock.listeners


def test_per_branch_method_strings_set_each_branch_and_refuse_what_does_not_apply():
    from policy_accel.recipes import parse_method
    from tests.conftest import make_dp_t_policy
    from tests.test_cache_vla import OBS, vla_policy

    m = parse_method("uniform2/taylorseer5o1@ddim10")
    assert (m.name, m.params["interval"], m.base_steps) == ("uniform/taylorseer", 2, 10)
    assert (m.uncond.family, m.uncond.params["interval"], m.uncond.params["order"]) == ("taylorseer", 5, 1)
    for bad, why in [("uniform2/diffusers_fbc0.1", "static-schedule"), ("uniform2/", "'<cond method>/<uncond"),
                     ("uniform2/uniform3/uniform4", "'<cond method>/<uncond"), ("ddim10/uniform2", "static-schedule"),
                     ("carry0.1+uniform2/uniform5", "do not combine")]:
        with pytest.raises(ValueError, match=why):
            parse_method(bad)
    with pytest.raises(ValueError, match="needs classifier-free guidance"):
        pa.accelerate(make_dp_t_policy(), "uniform2/uniform5")

    policy = vla_policy("cogact")  # guided DDIM-10: cond computes on steps 0,2,4,6,8, uncond on 0,5
    obs = OBS[0][None]

    def actions(method):
        pa.remove_acceleration(policy)
        if method != "uncached":
            pa.accelerate(policy, method)
        policy.seed(7)
        return torch.as_tensor(policy.predict_action_chunk(obs))

    uncached, same = actions("uncached"), actions("uniform2")
    actions("uniform2/uniform5")  # (its chunk differs: test_every_step_on_both_branches_... above)
    assert isinstance(policy.cache.config, pa.PerBranchConfig)
    for stats in policy.cache.stats().blocks.values():
        assert (stats.computed, stats.skipped) == (5 + 2, 5 + 8)
    torch.testing.assert_close(actions("every_step/every_step"), uncached, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(actions("uniform2/uniform2"), same, rtol=1e-5, atol=1e-6)
