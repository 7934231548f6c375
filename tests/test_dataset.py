import json

import h5py
import numpy as np
import pytest
import zarr

import envs
from envs.check_experts import check_expert
from envs.collect import collect
from envs.dataset import export_robomimic_hdf5, load_dataset, write_dataset
from eval.collect import main

LAYOUT = [["agent_pos", 2], ["object_pos", 2], ["goal_pos", 2]]


def fake_episodes(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return [{"obs": rng.normal(size=(t, 6)).astype(np.float32), "action": rng.normal(size=(t, 2)).astype(np.float32)}
            for t in rng.integers(3, 9, n)]


def test_round_trip(tmp_path):
    eps = fake_episodes()
    attrs = {"env": "push2d", "obs_layout": LAYOUT, "seeds": np.arange(3), "noise": np.float32(0.1)}
    write_dataset(tmp_path / "d.zarr", eps, attrs)
    ds = load_dataset(tmp_path / "d.zarr", expect_env="push2d")
    assert np.array_equal(ds.obs, np.concatenate([e["obs"] for e in eps]))
    assert np.array_equal(ds.action, np.concatenate([e["action"] for e in eps]))
    assert ds.episode_ends.dtype == np.int64
    assert list(ds.episode_ends) == list(np.cumsum([len(e["obs"]) for e in eps]))
    assert ds.attrs["seeds"] == [0, 1, 2] and ds.attrs["obs_layout"] == LAYOUT
    assert ds.attrs["n_episodes"] == 3
    for i, e in enumerate(eps):
        assert np.array_equal(ds.episode(i)["action"], e["action"])
    root = zarr.open_group(str(tmp_path / "d.zarr"), mode="r")
    assert root.metadata.zarr_format == 3
    assert root["data/obs"].dtype == np.float32


def test_refuses_overwrite(tmp_path):
    path = tmp_path / "d.zarr"
    write_dataset(path, fake_episodes(seed=0), {"env": "push2d"})
    with pytest.raises(FileExistsError, match="overwrite"):
        write_dataset(path, fake_episodes(seed=1), {"env": "push2d"})
    assert len(load_dataset(path).obs) == len(np.concatenate([e["obs"] for e in fake_episodes(seed=0)]))
    write_dataset(path, fake_episodes(seed=1), {"env": "push2d"}, overwrite=True)
    assert np.array_equal(load_dataset(path).obs, np.concatenate([e["obs"] for e in fake_episodes(seed=1)]))


def test_bad_episodes_rejected(tmp_path):
    with pytest.raises(ValueError, match="episode"):
        write_dataset(tmp_path / "d.zarr", [{"obs": np.zeros((3, 6)), "action": np.zeros((2, 2))}], {})
    with pytest.raises(ValueError, match="empty"):
        write_dataset(tmp_path / "e.zarr", [], {})
    assert not (tmp_path / "e.zarr").exists()


def test_env_mismatch_raises(tmp_path):
    path = tmp_path / "d.zarr"
    write_dataset(path, fake_episodes(), {"env": "push2d", "obs_layout": LAYOUT})
    with pytest.raises(ValueError, match="push2d_multimodal"):
        load_dataset(path, expect_env="push2d_multimodal")
    env = envs.make_env("push2d")
    load_dataset(path, expect_env=env)
    env.obs_layout = [("agent_pos", 2), ("goal_pos", 2), ("object_pos", 2)]
    with pytest.raises(ValueError, match="obs_layout"):
        load_dataset(path, expect_env=env)
    with pytest.raises(FileNotFoundError):
        load_dataset(tmp_path / "missing.zarr")


def test_collect_is_deterministic(tmp_path):
    a = collect("push2d", 4, seed=7, noise=0.2, out=tmp_path / "a.zarr", progress=False)
    b = collect("push2d", 4, seed=7, noise=0.2, out=tmp_path / "b.zarr", progress=False)
    da, db = load_dataset(a, expect_env="push2d"), load_dataset(b, expect_env="push2d")
    assert np.array_equal(da.obs, db.obs) and np.array_equal(da.action, db.action)
    assert np.array_equal(da.episode_ends, db.episode_ends) and da.attrs == db.attrs
    assert da.n_episodes == 4 and da.attrs["seeds"][0] == 7 and da.attrs["n_failures"] == 0
    assert da.attrs["expert"]["name"] and da.attrs["noise"] == pytest.approx(0.2)
    assert da.attrs["env_spec"]["name"] == "push2d"
    # noise changes the visited states, but recorded actions stay the expert's clean ones
    clean = load_dataset(collect("push2d", 4, seed=7, noise=0.0, out=tmp_path / "c.zarr", progress=False))
    assert not np.array_equal(clean.obs[:50], da.obs[:50])
    env, ep = envs.make_env("push2d"), da.episode(0)
    expert = envs.make_expert("push2d", env)
    from envs.collect import derived_seed

    expert.reset(seed=derived_seed(7, 1))
    assert np.allclose([expert.act(o) for o in ep["obs"]], ep["action"], atol=1e-6)


def test_collect_cli(tmp_path, capsys):
    out = tmp_path / "cli.zarr"
    main(["env=push2d_multimodal", "episodes=2", f"out={out}", "noise=0.1"])
    ds = load_dataset(out, expect_env="push2d_multimodal")
    assert ds.n_episodes == 2 and ds.obs.shape[1] == 8
    assert ds.attrs["command"].startswith("python eval/collect.py env=push2d_multimodal")
    with pytest.raises(FileExistsError):
        main(["env=push2d_multimodal", "episodes=2", f"out={out}"])
    main(["env=push2d_multimodal", "episodes=2", f"out={out}", "overwrite=true"])
    with pytest.raises(SystemExit, match="bogus"):
        main(["env=push2d", "bogus=1"])


def test_episodes_stop_after_success(tmp_path):
    ds = load_dataset(collect("push2d", 3, seed=0, noise=0.0, out=tmp_path / "d.zarr", steps_after_success=5,
                              progress=False))
    env = envs.make_env("push2d")
    for i in range(3):
        ep = ds.episode(i)
        env.reset(seed=ds.attrs["seeds"][i])
        successes = [env.step(a)[4]["success"] for a in ep["action"]]
        assert successes.index(True) == len(successes) - 6


def test_check_expert():
    r = check_expert("push2d", 5)
    assert r["successes"] == 5 and r["mean_len"] > 0


def test_export_robomimic_hdf5(tmp_path):
    ds = load_dataset(collect("push2d", 3, seed=0, out=tmp_path / "d.zarr", progress=False))
    path = export_robomimic_hdf5(ds, tmp_path / "d.hdf5")
    with h5py.File(path, "r") as f:
        data = f["data"]
        assert json.loads(data.attrs["env_args"])["env_name"] == "push2d"
        assert data.attrs["total"] == len(ds.obs)
        assert sorted(data.keys()) == ["demo_0", "demo_1", "demo_2"]
        demo = data["demo_1"]
        n = demo.attrs["num_samples"]
        assert np.array_equal(demo["actions"][:], ds.episode(1)["action"])
        assert sorted(demo["obs"].keys()) == sorted(k for k, _ in LAYOUT)
        assert np.array_equal(demo["obs/object_pos"][:], ds.episode(1)["obs"][:, 2:4])
        assert demo["next_obs/agent_pos"].shape == (n, 2) and demo["dones"][-1] == 1
    with pytest.raises(FileExistsError):
        export_robomimic_hdf5(ds, path)


def test_robomimic_sequence_dataset_reads_export(tmp_path):
    pytest.importorskip("torch")
    obs_utils = pytest.importorskip("robomimic.utils.obs_utils")
    rm_dataset = pytest.importorskip("robomimic.utils.dataset")
    ds = load_dataset(collect("push2d", 2, seed=0, out=tmp_path / "d.zarr", progress=False))
    path = export_robomimic_hdf5(ds, tmp_path / "d.hdf5")
    keys = [k for k, _ in LAYOUT]
    obs_utils.initialize_obs_utils_with_obs_specs({"obs": {"low_dim": keys}})
    seq = rm_dataset.SequenceDataset(str(path), obs_keys=keys, dataset_keys=["actions"], seq_length=4,
                                     hdf5_cache_mode="all")
    assert len(seq) == len(ds.obs)
    item = seq[0]
    assert item["actions"].shape == (4, 2) and item["obs"]["goal_pos"].shape == (4, 2)
    assert np.allclose(item["actions"], ds.action[:4])


def test_collect_gives_up_cleanly(tmp_path):
    out = tmp_path / "d.zarr"
    with pytest.raises(RuntimeError, match="only 2/3"):
        collect("push2d", 3, max_attempts=2, out=out, progress=False)
    assert not out.exists() and not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="unknown env"):
        collect("nope", 1, out=out, progress=False)
    assert not list(tmp_path.iterdir())
