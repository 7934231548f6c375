"""Method strings in the library: every setting of configs/sweep.yaml resolves on the shipped Lift
checkpoint through pa.accelerate, and comes off again."""

import re
from pathlib import Path

import pytest
import yaml

import policy_accel as pa
from policy_accel.recipes import parse_method
from tests.conftest import make_dp_t_policy

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lift():
    return pa.load_policy(REPO / "checkpoints" / "lift_dp_t")


def test_every_sweep_setting_resolves_on_the_shipped_checkpoint_and_comes_off(lift):
    native = lift.sampler
    specs = yaml.safe_load((REPO / "configs" / "sweep.yaml").read_text())["methods"]
    for spec in specs:
        method = parse_method(spec)
        handle = pa.accelerate(lift, spec)
        assert lift.sampler == method.sampler(native), spec
        if method.recipe.build is None:
            assert handle is None and (lift.compiled_model is not None) == method.compiled, spec
        else:
            assert handle is lift.cache and handle.binding == lift.binding(), spec
            if method.file(lift.path, native) is not None:
                assert Path(method.file(lift.path, native)).stem in str(handle.config), spec
        with pytest.raises(RuntimeError, match=f"already accelerated with {re.escape(spec)}"):
            pa.accelerate(lift, "ddim10")
        pa.remove_acceleration(lift)
        assert lift.sampler == native and lift.cache is None and lift.compiled_model is None and lift.recipe is None


def test_method_strings_resolve_to_the_configs_they_name(lift):
    handle = pa.accelerate(lift, "bac_taylor5o1f@ddim20")
    assert lift.sampler == pa.SamplerConfig("ddim", 20, 100)
    assert handle.config == pa.BACTaylorConfig(schedule=str(lift.path / "schedules" / "bac_s5_b5_ddim20_f1.json"),
                                               order=1)
    pa.remove_acceleration(lift)
    assert pa.accelerate(lift, "uniform5@ddim10").config == pa.UniformConfig(5)
    pa.remove_acceleration(lift)
    cfg = pa.accelerate(lift, "diffusers_magcache0.3k9r0.05").config
    assert (cfg.threshold, cfg.max_skip_steps, cfg.retention_ratio) == (0.3, 9, 0.05)
    pa.remove_acceleration(lift)
    assert pa.accelerate(lift, "compile+taylorseer4o2").config == pa.TaylorSeerConfig(4, 2, compile=True)
    pa.remove_acceleration(lift)


def test_a_missing_schedule_lists_what_exists_and_how_to_make_it(lift):
    with pytest.raises(FileNotFoundError) as err:
        pa.accelerate(lift, "bac7@ddim10")
    msg = str(err.value)
    assert "bac_s7_b5_ddim10.json" in msg and "bac_s10_b0_ddpm100.json" in msg
    assert "python eval/calibrate.py checkpoint=" in msg
    assert "budget=7 bubble_blocks=5 sampler=ddim steps=10" in msg
    assert lift.sampler == pa.SamplerConfig("ddpm", 100, 100) and lift.recipe is None  # nothing half-applied


def test_bad_method_strings_raise_clear_errors():
    for bad, match in [("fast", "unknown method"), ("ddim10@ddim20", "combines with cache methods only"),
                       ("uniform4@ddpm50", "only '@ddim<K>'"), ("compile+diffusers_fbc0.1", "our methods only"),
                       ("bac_taylor4o2f", "needs order 1")]:
        with pytest.raises(ValueError, match=match):
            parse_method(bad)
    policy = make_dp_t_policy()
    with pytest.raises(ValueError, match="not loaded from one"):
        pa.accelerate(policy, "bac10")
    assert pa.accelerate(policy, "uniform3") is policy.cache  # no file needed
