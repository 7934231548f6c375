"""Demo datasets: a zarr v3 replay buffer (Diffusion Policy layout) and a robomimic hdf5 export.

    data/obs           float32 (N, obs_dim)   all episodes concatenated in time
    data/action        float32 (N, act_dim)   the expert's clean actions
    meta/episode_ends  int64 (E,)             cumulative end index of each episode
    root attrs         env, obs_layout, env_spec, seeds, n_failures, expert, noise, ...

Writing goes to `<path>.tmp` and is renamed on close, so a crashed collection never leaves a
half-written dataset at `path`.
"""

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr


def package_version() -> str:
    try:
        import policy_accel

        return str(getattr(policy_accel, "__version__", "0.1.0"))
    except ImportError:
        return "0.1.0"


def _jsonable(x):
    """Turn numpy scalars/arrays and tuples inside attrs into plain JSON types."""
    return json.loads(json.dumps(x, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


class DatasetWriter:
    """Append episodes one at a time (memory stays at one episode), then `close(attrs)`."""

    def __init__(self, path, overwrite: bool = False, chunk_rows: int = 4096):
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise FileExistsError(f"dataset {self.path} already exists; pass overwrite=True to replace it")
        self.overwrite = overwrite
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.chunk_rows = chunk_rows
        self.root = zarr.open_group(str(self.tmp), mode="w", zarr_format=3)
        self.obs = self.action = None
        self.episode_ends: list[int] = []

    def _create(self, name: str, dim: int):
        return self.root.create_array(name, shape=(0, dim), chunks=(self.chunk_rows, dim), dtype="float32")

    def add_episode(self, obs, action):
        obs, action = np.asarray(obs, np.float32), np.asarray(action, np.float32)
        if obs.ndim != 2 or action.ndim != 2 or len(obs) != len(action) or len(obs) == 0:
            raise ValueError(f"episode needs obs (T, obs_dim) and action (T, act_dim), T > 0; "
                             f"got {obs.shape} and {action.shape}")
        if self.obs is None:
            self.obs = self._create("data/obs", obs.shape[1])
            self.action = self._create("data/action", action.shape[1])
        if obs.shape[1] != self.obs.shape[1] or action.shape[1] != self.action.shape[1]:
            raise ValueError(f"episode dims {obs.shape[1]}/{action.shape[1]} differ from the dataset's "
                             f"{self.obs.shape[1]}/{self.action.shape[1]}")
        start = self.episode_ends[-1] if self.episode_ends else 0
        end = start + len(obs)
        for arr, x in ((self.obs, obs), (self.action, action)):
            arr.resize((end, x.shape[1]))
            arr[start:end] = x
        self.episode_ends.append(end)

    def abort(self):
        """Drop everything written so far."""
        shutil.rmtree(self.tmp, ignore_errors=True)

    def close(self, attrs: dict) -> Path:
        if not self.episode_ends:
            self.abort()
            raise ValueError("no episodes were added; refusing to write an empty dataset")
        ends = np.asarray(self.episode_ends, dtype=np.int64)
        self.root.create_array("meta/episode_ends", shape=ends.shape, dtype="int64")[:] = ends
        self.root.attrs.update(_jsonable({**attrs, "n_episodes": len(ends), "n_steps": int(ends[-1])}))
        if self.path.exists():  # only reachable with overwrite=True
            shutil.rmtree(self.path)
        os.replace(self.tmp, self.path)
        return self.path


def write_dataset(path, episodes, attrs: dict, overwrite: bool = False) -> Path:
    """Write an iterable of episodes (dicts with "obs" and "action" arrays) to a zarr dataset."""
    writer = DatasetWriter(path, overwrite=overwrite)
    for ep in episodes:
        writer.add_episode(ep["obs"], ep["action"])
    return writer.close(attrs)


@dataclass
class Dataset:
    obs: np.ndarray
    action: np.ndarray
    episode_ends: np.ndarray
    attrs: dict = field(default_factory=dict)

    @property
    def n_episodes(self) -> int:
        return len(self.episode_ends)

    def episode(self, i: int) -> dict:
        start = 0 if i == 0 else int(self.episode_ends[i - 1])
        end = int(self.episode_ends[i])
        return {"obs": self.obs[start:end], "action": self.action[start:end]}


def check_env_match(attrs: dict, env, source: str = "dataset"):
    """Raise ValueError if `attrs` were not written for `env` (an env object or an env name)."""
    name = env if isinstance(env, str) else env.name
    if attrs.get("env") != name:
        raise ValueError(f"{source} was collected on env {attrs.get('env')!r}, not {name!r}")
    if not isinstance(env, str):
        layout = [list(x) for x in env.obs_layout]
        if attrs.get("obs_layout") != layout:
            raise ValueError(f"{source} obs_layout {attrs.get('obs_layout')} does not match env {name!r} "
                             f"obs_layout {layout}")


def load_dataset(path, expect_env=None) -> Dataset:
    """Read a dataset written by `write_dataset`; `expect_env` (name or env) checks it fits."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no dataset at {path}")
    root = zarr.open_group(str(path), mode="r")
    attrs = dict(root.attrs)
    if expect_env is not None:
        check_env_match(attrs, expect_env, source=f"dataset {path}")
    ds = Dataset(obs=root["data/obs"][:], action=root["data/action"][:],
                 episode_ends=root["meta/episode_ends"][:], attrs=attrs)
    if len(ds.obs) != len(ds.action) or (ds.n_episodes and ds.episode_ends[-1] != len(ds.obs)):
        raise ValueError(f"dataset {path} is inconsistent: {len(ds.obs)} obs, {len(ds.action)} actions, "
                         f"last episode end {ds.episode_ends[-1] if ds.n_episodes else None}")
    return ds


def export_robomimic_hdf5(dataset: Dataset, path, overwrite: bool = False) -> Path:
    """Write robomimic's hdf5 layout: data/demo_i/{actions, obs/<key>, next_obs/<key>, rewards, dones}
    with num_samples attrs, and data.attrs env_args (JSON). No sim states are stored."""
    import h5py

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    layout = dataset.attrs.get("obs_layout")
    if not layout:
        raise ValueError("dataset attrs have no obs_layout; cannot split obs into robomimic keys")
    bounds = np.cumsum([0] + [n for _, n in layout])
    env_name = dataset.attrs.get("env", "")
    env_type = 1 if env_name in ("lift", "can", "square") else 2  # robomimic EnvType: ROBOSUITE=1, GYM=2
    env_args = {"env_name": env_name, "type": env_type, "env_kwargs": dataset.attrs.get("env_spec", {})}
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["total"] = int(len(dataset.obs))
        data.attrs["env_args"] = json.dumps(env_args)
        for i in range(dataset.n_episodes):
            ep = dataset.episode(i)
            n = len(ep["obs"])
            next_obs = np.concatenate([ep["obs"][1:], ep["obs"][-1:]])  # last one repeated
            demo = data.create_group(f"demo_{i}")
            demo.attrs["num_samples"] = n
            demo.create_dataset("actions", data=ep["action"])
            dones = np.zeros(n, dtype=np.int64)
            dones[-1] = 1
            demo.create_dataset("dones", data=dones)
            demo.create_dataset("rewards", data=dones.astype(np.float64))
            for (key, _), lo, hi in zip(layout, bounds[:-1], bounds[1:], strict=True):
                demo.create_dataset(f"obs/{key}", data=ep["obs"][:, lo:hi])
                demo.create_dataset(f"next_obs/{key}", data=next_obs[:, lo:hi])
    return path
