"""`python eval/bench_denoiser.py model=<...>`: the VLA profile (eval/profile_vla.py) on tiny configs of all five
models (default suite, seconds), and at real size with a very small method list (slow: minutes)."""

import pytest

from eval import bench_denoiser
from eval.profile_vla import check_methods

MODELS = ["pi0", "pi05", "smolvla", "groot_n15", "cogact_b"]


def run(model: str, tmp_path, *options: str) -> dict:
    return bench_denoiser.main([f"model={model}", f"out={tmp_path / model}.json", *options])


def check(result: dict, model: str) -> dict:
    rows = {r["method"]: r for r in result["results"]}
    base = rows["uncached"]
    assert result["baseline"] == "uncached" and base["loop_speedup"] == 1.0 and base["chunk_flops_ratio"] == 1.0
    assert 0 < result["loop_share"] < 1 and 0 < result["loop_flops_share"] < 1
    prefix = result["prefix"]
    assert prefix["ms"] > 0 and prefix["flops"] > 0 and "NOT included" in " ".join(result["notes"])
    assert ("vlm_stand_in" in prefix) == (model in ("pi0", "pi05", "smolvla"))
    loop = result["loop"]
    calls = 2 if model.startswith("cogact") else 1
    assert loop["calls_per_step"] == calls and loop["flops_per_step"] == pytest.approx(calls * loop["flops_per_call"])
    blocks = result["blocks"]
    assert sum(b["flops"] for b in blocks) + result["outside_blocks_flops_per_call"] == pytest.approx(
        loop["flops_per_call"])
    assert all(b["flops"] > 0 for b in blocks)
    for r in rows.values():  # the chunk is the prefix plus the loop, in time and in FLOPs
        assert r["chunk_ms"] == pytest.approx(prefix["vlm_stand_in"]["ms"] + r["prepare_ms"] + r["loop_ms"]
                                              if "vlm_stand_in" in prefix else r["prepare_ms"] + r["loop_ms"])
        lo, hi = sorted((1.0, r["loop_flops_ratio"]))  # the prefix dilutes the loop's saving
        assert lo - 1e-9 <= r["chunk_flops_ratio"] <= hi + 1e-9
    return rows


@pytest.mark.parametrize("model", MODELS)
def test_profile_covers_every_model_at_tiny_size(model, tmp_path):
    methods = None if model == "pi05" else "methods=[uncached,steps2,uniform2,taylorseer2o2,bac2,bac_taylor2o1]"
    result = run(model, tmp_path, "scale=tiny", "rounds=1", "observations=1", *([methods] if methods else []))
    rows = check(result, model)
    K = 4 if model == "groot_n15" else 10
    steps = "steps5" if model == "pi05" else "steps2"
    assert rows[steps]["loop_flops_ratio"] == pytest.approx(int(steps[5:]) / K)  # fewer steps: FLOPs in proportion
    # uniform2 computes every block on half the steps; embeddings, norms and the head run every step
    assert 0.5 < rows["uniform2"]["loop_flops_ratio"] < 1
    bac = next(r for name, r in rows.items() if name.startswith("bac_taylor"))
    assert "calibrated on 1 random condition" in bac["schedule"] and bac["loop_flops_ratio"] < 1
    if model.startswith("cogact"):
        assert any("not supported by the engine" in n for n in result["notes"])
    assert (tmp_path / f"{model}.json").is_file()


def test_profile_refuses_methods_it_cannot_run():
    check_methods(["uncached", "steps3", "every_step", "uniform4", "taylorseer2o2", "bac5nb", "bac_taylor5o1f"])
    for spec in ("ddim5", "uniform2@ddim5", "compile+uniform2", "diffusers_fbc0.1", "steps0"):
        with pytest.raises(ValueError):
            check_methods([spec])
    with pytest.raises(SystemExit, match="model must be one of"):
        bench_denoiser.main(["model=pi7"])


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_profile_at_real_size(model, tmp_path):
    """Real sizes, random weights, two methods, one timed chunk each: about a minute for π0 / π0.5."""
    result = run(model, tmp_path, "methods=[uncached,uniform2]", "rounds=1", "observations=1")
    check(result, model)
    blocks = {"pi0": 36, "pi05": 36, "smolvla": 32, "groot_n15": 32, "cogact_b": 24}[model]
    assert len(result["blocks"]) == blocks
    if model in ("pi0", "pi05", "smolvla"):
        v = result["prefix"]["vlm_stand_in"]
        assert (v["tokens"], v["depth"]) == {"pi0": (816, 18), "pi05": (968, 18), "smolvla": (241, 16)}[model]
