"""eval/sweep.py (resumable, on ray) and eval/report.py's tables (full-call equivalents, the frontier table,
labels) on push2d with tiny policies."""

import json
import shutil

import numpy as np
import pytest
import torch

from eval.calibrate import main as calibrate_cli
from eval.methods import parse_method
from policy_accel.checkpoint import load_policy
from tests.test_rollout import SUMMARY_FIELDS, tiny_checkpoint
from tests.test_train import write_zarr


def test_sweep_end_to_end_on_ray_is_resumable_and_writes_schema(tmp_path, capsys):
    from eval import report, sweep

    ckpt = tiny_checkpoint(tmp_path / "push2d_tiny")
    args = [f"checkpoint={ckpt}", "episodes=4", "shards=2", "num_envs=2", "num_cpus=2", "latency_rounds=1",
            "latency_repeats=2", f"results_dir={tmp_path / 'results'}"]
    rows = sweep.main(args + ["methods=[uncached,ddim5,taylorseer4o1]"])
    summary = tmp_path / "results" / "summary.jsonl"
    lines = [json.loads(x) for x in summary.read_text().splitlines()]
    assert lines == rows and [r["setting"] for r in rows] == ["uncached", "ddim5", "taylorseer4o1"]
    for r in rows:
        assert SUMMARY_FIELDS <= set(r) and r["n_episodes"] == 4 and r["task"] == "push2d"
        assert r["method"] == parse_method(r["setting"]).name
    assert rows[0]["speedup"] == 1.0 and rows[1]["flops_ratio"] == pytest.approx(0.25, rel=0.02)
    assert (tmp_path / "results" / "pareto_push2d.png").stat().st_size > 10_000

    shard_files = sorted((tmp_path / "results" / "runs" / "push2d_tiny" / "success").glob("*.json"))
    assert len(shard_files) == 6
    stamps = {p: p.stat().st_mtime_ns for p in shard_files}
    capsys.readouterr()
    out = tmp_path / "card_rollout.json"
    again = sweep.main(args + ["methods=[uncached,ddim5,taylorseer4o1]", "plot=false", f"out={out}"])
    assert "every point is done" in capsys.readouterr().out
    assert again == rows and all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    latency = tmp_path / "results" / "runs" / "push2d_tiny" / "latency.json"
    timed = latency.stat().st_mtime_ns
    sweep.main(args + ["methods=[uncached,ddim5,taylorseer4o1]", "plot=false", "retime=true"])
    assert "timing 3 methods" in capsys.readouterr().out and latency.stat().st_mtime_ns != timed
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # re-timed, not re-run
    # the card reads a sweep's out= file as it reads a rollout's JSON
    from eval import card

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "log.jsonl").write_text(json.dumps({"step": 10, "sec_per_step": 360.0}) + "\n")
    text = card.main([f"checkpoint={ckpt}", f"run_dir={tmp_path / 'run'}", f"rollout={out}"]).read_text()
    assert f"`python eval/sweep.py checkpoint={ckpt} 'methods=[uncached,ddim5,taylorseer4o1]' episodes=4" in text
    u = rows[0]
    assert f"| uncached | {u['successes']}/4 | [{u['ci_low']:.2f}, {u['ci_high']:.2f}]" in text

    # a new setting runs only its own shards (and re-times all methods together); other rows are kept
    sweep.main(args + ["methods=[uncached,uniform4]", "plot=false"])
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    settings = [json.loads(x)["setting"] for x in summary.read_text().splitlines()]
    assert sorted(settings) == ["ddim5", "taylorseer4o1", "uncached", "uniform4"]
    with pytest.raises(SystemExit, match="budget=7 bubble_blocks=0 sampler=ddim steps=5"):
        sweep.main(args + ["methods=[uncached,bac7nb@ddim5]"])

    # shards made with another schedule file of the same name are redone, never merged with new ones
    rng = np.random.default_rng(0)
    data = write_zarr(tmp_path / "d.zarr", rng.uniform(-1, 1, (60, 6)).astype(np.float32),
                      rng.uniform(-1, 1, (60, 2)).astype(np.float32), np.array([30, 60]), {"env": "push2d"})
    calibrate = [f"checkpoint={ckpt}", f"dataset={data}", "budget=3", "bubble_blocks=0", "num_threads=1"]
    calibrate_cli(calibrate + ["observations=4"])
    sweep.main(args + ["methods=[uncached,bac3nb]", "plot=false"])
    run_dir = tmp_path / "results" / "runs" / "push2d_tiny" / "success"
    stamps = {p: p.stat().st_mtime_ns for p in run_dir.glob("*.json")}
    calibrate_cli(calibrate + ["observations=6"])  # same file name, other contents
    capsys.readouterr()
    sweep.main(args + ["methods=[uncached,bac3nb]", "plot=false"])
    assert "2 shard(s) were made with another schedule file" in capsys.readouterr().out
    for p, t in stamps.items():
        assert (p.stat().st_mtime_ns == t) == (not p.name.startswith("bac3nb")), p.name
    merged = [json.loads(x) for x in summary.read_text().splitlines()]
    assert "| push2d | uncached |" in report.headline_table(merged)
    full = report.settings_table(merged, "push2d").splitlines()[2:]
    settings = sorted(x.split(" | ")[0].strip("| ") for x in full)
    assert settings == ["bac3nb", "ddim5", "taylorseer4o1", "uncached", "uniform4"]
    assert {r["checkpoint_hash"] for r in merged} == {json.loads((run_dir.parent / "meta.json").read_text())
                                                       ["checkpoint_hash"]}

    # a retrained checkpoint under the same name: once its old run folder is moved away, the old rows go too
    shutil.rmtree(run_dir.parent)
    policy = load_policy(ckpt)
    with torch.no_grad():
        next(policy.model.parameters()).add_(0.01)
    policy.save(ckpt)
    capsys.readouterr()
    sweep.main(args + ["methods=[uncached]", "plot=false"])
    assert "push2d_tiny: dropping 5 row(s)" in capsys.readouterr().out
    rows = [json.loads(x) for x in summary.read_text().splitlines()]
    assert [r["setting"] for r in rows] == ["uncached"] and rows[0]["checkpoint_hash"] == policy.checkpoint_hash


def test_report_refuses_rows_of_one_policy_from_two_checkpoints(tmp_path):
    from eval import report

    row = {"policy": "can_dp_t", "task": "can", "setting": "uncached", "checkpoint_hash": "a" * 64}
    path = tmp_path / "summary.jsonl"
    path.write_text(json.dumps(row) + "\n" + json.dumps({**row, "setting": "ddim10"}) + "\n")
    assert len(report.load_rows(path)) == 2
    path.write_text(json.dumps(row) + "\n" + json.dumps({**row, "setting": "ddim10", "checkpoint_hash": "b" * 64}))
    with pytest.raises(ValueError, match="rows of can_dp_t come from 2 different checkpoints"):
        report.load_rows(path)


def test_full_call_equivalents_take_one_call_from_the_fewest_step_row_of_ddim_or_flow():
    from eval.report import full_calls

    for kind in ("ddim", "flow"):
        rows = [dict(method=kind, setting=f"{kind}4", flops_per_chunk=40.0),
                dict(method=kind, setting=f"{kind}2", flops_per_chunk=20.4),  # the reference: 10.2 per call
                dict(method="uniform", setting=f"uniform5@{kind}10", flops_per_chunk=21.42)]
        assert full_calls(rows) == pytest.approx({f"{kind}4": 40 / 10.2, f"{kind}2": 2.0, f"uniform5@{kind}10": 2.1})
    with pytest.raises(ValueError, match="step-reduction row"):
        full_calls([dict(method="uniform", setting="uniform5", flops_per_chunk=1.0)])


def test_frontier_table_compares_each_caching_point_with_the_best_step_reduction_no_slower():
    from eval.report import frontier_table

    def row(setting, method, ms, rate, low, high):
        return dict(task="lift", setting=setting, method=method, latency_ms_p50=ms, success_rate=rate,
                    ci_low=low, ci_high=high)

    rows = [row("uncached", "uncached", 1000, 0.95, 0.89, 0.98), row("ddim10", "ddim", 100, 0.60, 0.50, 0.69),
            row("ddim5", "ddim", 50, 0.30, 0.22, 0.40), row("bac10", "bac", 120, 0.90, 0.83, 0.94),
            row("uniform8", "uniform", 90, 0.20, 0.13, 0.29), row("bac5", "bac", 60, 0.35, 0.26, 0.45),
            row("uniform20", "uniform", 40, 0.10, 0.05, 0.17)]
    lines = {x.split(" | ")[1]: x for x in frontier_table(rows).splitlines()[2:]}
    assert set(lines) == {"bac10", "uniform8", "bac5", "uniform20"}
    assert "| ddim10 (100 ms) | 0.60 | better |" in lines["bac10"]  # uncached is slower than 120 ms
    assert "| ddim5 (50 ms) | 0.30 | worse |" in lines["uniform8"]
    assert "| ddim5 (50 ms) | 0.30 | within CI |" in lines["bac5"]
    assert "| none as fast | - |" in lines["uniform20"]
    from eval.report import zoom_floor

    assert zoom_floor(rows) == pytest.approx(0.15)  # the zoomed panel starts under ddim5's CI (0.22)
    assert zoom_floor([r for r in rows if r["method"] not in ("uncached", "ddim")]) == 0.0
    from eval.report import point_labels

    rows += [row("compile", "compile", 1030, 0.95, 0.89, 0.98), row("lossless", "lossless", 990, 0.96, 0.9, 0.99),
             row("bac20", "bac", 1100, 0.95, 0.89, 0.98)]
    labels = {text: (x, y) for x, y, text in point_labels(rows)}
    assert labels["uncached / compile"] == (1000, 0.95)  # same success, 3% apart: one label
    assert "lossless" in labels and "bac20" in labels  # other success / 10% slower: their own labels
    assert len(labels) == len(rows) - 1


def test_sweep_copies_finished_shards_of_the_same_run_from_another_results_dir(tmp_path, capsys):
    from eval import sweep

    ckpt = tiny_checkpoint(tmp_path / "push2d_tiny")
    args = [f"checkpoint={ckpt}", "episodes=2", "shards=1", "num_envs=2", "num_cpus=2", "latency=false"]
    main_dir, low_dir, other_envs = tmp_path / "main", tmp_path / "low", tmp_path / "other_envs"
    sweep.main(args + ["methods=[uncached,ddim5]", f"results_dir={main_dir}"])
    for name in ("uncached", "ddim5"):  # a marker only a copy can carry
        shard = main_dir / "runs" / "push2d_tiny" / "success" / f"{name}__100000-100001.json"
        shard.write_text(json.dumps({**json.loads(shard.read_text()), "successes": 12345}) + "\n")

    sweep.main(args + ["methods=[uncached,ddim5,ddim3]", f"results_dir={low_dir}", f"reuse_from=[{main_dir}]"])
    assert "1 finished shard(s) copied" in capsys.readouterr().out  # ddim5; uncached records the histories
    low = low_dir / "runs" / "push2d_tiny" / "success"
    assert json.loads((low / "ddim5__100000-100001.json").read_text())["successes"] == 12345
    assert json.loads((low / "uncached__100000-100001.json").read_text())["successes"] <= 2  # rerun here

    # another batching is another run: nothing is copied
    sweep.main(args[:3] + ["num_envs=1", "num_cpus=2", "latency=false", "methods=[uncached,ddim5]",
                           f"results_dir={other_envs}", f"reuse_from=[{main_dir}]"])
    for name in ("uncached", "ddim5"):
        assert json.loads((other_envs / f"runs/push2d_tiny/success/{name}__100000-100001.json").read_text())[
            "successes"] <= 2
    with pytest.raises(ValueError, match="not a directory"):
        sweep.SweepConfig(checkpoint=str(ckpt), reuse_from=[str(tmp_path / "missing")])
