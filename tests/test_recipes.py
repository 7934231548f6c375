"""Method strings in the library: every setting of configs/sweep.yaml resolves on the shipped Lift
checkpoint through pa.accelerate, and comes off again."""

import re
from pathlib import Path

import pytest
import yaml

import policy_accel as pa
from policy_accel.cross_chunk import CarryErrors
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
    ablation = pa.accelerate(lift, "bac_taylor5o0f@ddim20").config  # reuse on the forecast-calibrated schedule
    assert (ablation.schedule, ablation.order) == (handle.config.schedule, 0)
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
    for bad, match in [("fast", "unknown method"), ("ddim10@ddim20", "combine with cache methods only"),
                       ("uniform4@ddpm50", "only '@ddim<K>'"), ("compile+diffusers_fbc0.1", "our methods only"),
                       ("bac_taylor4o2f", "needs order 1")]:
        with pytest.raises(ValueError, match=match):
            parse_method(bad)
    policy = make_dp_t_policy()
    with pytest.raises(ValueError, match="not loaded from one"):
        pa.accelerate(policy, "bac10")
    assert pa.accelerate(policy, "uniform3") is policy.cache  # no file needed


def test_flow_matching_policies_reduce_euler_steps_with_flow_k():
    native = pa.SamplerConfig("flow", 10)
    assert parse_method("flow4").sampler(native) == pa.SamplerConfig("flow", 4, native.num_train_steps)
    m = parse_method("bac3nb@flow5")
    assert m.sampler(native) == pa.SamplerConfig("flow", 5, native.num_train_steps) and m.base_kind == "flow"
    assert m.file("ckpt", native).name == "bac_s3_b0_flow5.json"
    assert "sampler=flow steps=5" in m.calibrate_command("ckpt", native)
    both = parse_method("uniform2/uniform4@flow6")
    assert both.sampler(native).kind == both.uncond.sampler(native).kind == "flow"
    with pytest.raises(ValueError, match="'@flow<K>'"):
        parse_method("uniform2@euler5")
    with pytest.raises(ValueError, match="combine with cache methods only"):
        parse_method("flow4@flow8")
    with pytest.raises(ValueError, match="predicts"):  # flow steps on an epsilon model: refused by the policy
        pa.accelerate(make_dp_t_policy(), "flow4")


def test_pooled_budget_method_strings_name_their_file_and_reject_what_does_not_apply(lift):
    m = parse_method("bacg1.5nb@ddim10")
    assert m.family == "bac" and m.params["calls"] == 1.5
    assert m.file(lift.path, lift.sampler).name == "bac_g1.5_b0_ddim10.json"
    assert "calls=1.5 bubble_blocks=0 sampler=ddim steps=10" in m.calibrate_command(lift.path, lift.sampler)
    assert parse_method("bac_taylorg2.0o1nb").file(lift.path, lift.sampler).name == "bac_g2_b0_ddpm100.json"
    with pytest.raises(ValueError, match="pooled budget"):
        parse_method("bac_taylorg1.5o1nbf")
    with pytest.raises(ValueError, match="at least 1.0"):
        parse_method("bacg0.5")


def test_carry_method_strings_pick_the_calibrated_blocks_and_refuse_what_does_not_combine(lift, tmp_path):
    m = parse_method("carry0.1r3+uniform10@ddim10")
    assert (m.name, m.carry, m.base_steps) == ("carry+uniform", (0.1, 3, True), 10)
    assert parse_method("carry0.1f+uniform10@ddim10").carry == (0.1, 2, False)
    assert m.file(lift.path, lift.sampler).name == "carry_ddim10.json"
    assert "carry=true sampler=ddim steps=10" in m.calibrate_command(lift.path, lift.sampler)
    handle = pa.accelerate(lift, "carry0.1+uniform10@ddim10")
    measured = CarryErrors.load(m.file(lift.path, lift.sampler)).errors
    assert {h.info.name for h in handle.carried} == {n for n, e in measured.items() if e <= 0.1}
    assert lift.episode_noise and handle.config.refresh == 2
    pa.remove_acceleration(lift)
    pa.accelerate(lift, "carry0.1f+uniform10@ddim10")
    assert not lift.episode_noise and isinstance(lift.cache, pa.cache.CarryCache)
    pa.remove_acceleration(lift)
    assert not lift.episode_noise and lift.cache is None
    for bad, why in [("carry0.1+bac10", "uniform and taylorseer"), ("compile+carry0.1+uniform5", "do not combine"),
                     ("carry0.1r1+uniform5", "refresh must be >= 2")]:
        with pytest.raises(ValueError, match=why):
            parse_method(bad)
    stale = tmp_path / "schedules"
    stale.mkdir()
    data = CarryErrors.load(m.file(lift.path, lift.sampler))
    data.checkpoint_hash = "0" * 64
    data.save(stale / "carry_ddim10.json")
    with pytest.raises(ValueError, match="measured on checkpoint 000000000000"):
        pa.accelerate(lift, "carry0.1+uniform10@ddim10", checkpoint_dir=tmp_path)
    assert lift.cache is None and lift.recipe is None
