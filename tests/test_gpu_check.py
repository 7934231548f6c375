"""eval/gpu_check.py in its CPU smoke mode: the same code on a tiny policy; every CUDA-only part says
"skipped: no CUDA", a method that cannot be applied says why, nothing is left out silently."""

import json

import pytest
import torch

from eval import gpu_check


def test_gpu_check_smoke_on_cpu_reports_every_variant(tmp_path):
    out = tmp_path / "gpu_check.json"
    result = gpu_check.main(["smoke=true", "device=cpu", "compile_backend=eager", "chunks=2", "warmup=1",
                             "observations=2", "methods=[uncached,ddim2,bac2]", "best=uniform2@ddim4", f"out={out}"])
    assert json.loads(out.read_text()) == result
    rows = {(r["method"], r["mode"], r["dtype"]): r for r in result["results"]}
    dtypes = ("float32", "bfloat16")
    eager = [(m, "eager", d) for m in ("uncached", "ddim2", "bac2", "uniform2@ddim4") for d in dtypes]
    by_steps = ["ddim2", "uncached", "bac2", "uniform2@ddim4"]  # eager first, then the smallest graph first
    assert list(rows) == eager + [(m, mode, d) for m in by_steps for d in dtypes for mode in ("compiled", "graphed")]
    for (method, mode, dtype), r in rows.items():
        if method == "bac2":  # no calibrated schedule in the tiny checkpoint
            assert r["status"].startswith("failed: FileNotFoundError") and "eval/calibrate.py" in r["status"]
        elif mode == "graphed":
            assert r["status"] == "skipped: no CUDA"
        else:
            assert r["status"] == "ok" and r["within_tolerance"], r
            assert r["latency_ms_p50"] <= r["latency_ms_p99"] and r["chunks_timed"] == 2
            assert r["sync_check"] == ("skipped: no CUDA" if mode == "compiled" else r["sync_check"])
            if dtype == "float32":  # the compiled graph ("eager" backend) and the eager chunk give the reference
                assert r["max_abs_error"] == 0.0
    assert not result["all_ok"]  # bac2 failed
    assert result["config"]["tolerance"]["bfloat16"] == 0.25


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_gpu_check_without_cuda_says_so():
    with pytest.raises(SystemExit, match="no CUDA device"):
        gpu_check.main(["smoke=true"])
    with pytest.raises(SystemExit, match="unknown mode"):
        gpu_check.main(["smoke=true", "device=cpu", "modes=[eager,fastest]"])
