"""Demo data: a zarr v3 replay buffer reader and Diffusion Policy's sequence sampler.

    buffer = ReplayBuffer.load("data/lift.zarr")     # data/obs, data/action, meta/episode_ends
    ds = SequenceDataset(buffer, horizon=16, n_obs_steps=2, n_action_steps=8)
    obs, action = ds.batch(torch.arange(128))        # (128, 2, obs_dim), (128, 16, Da)

Windows of `horizon` steps never cross an episode boundary; they may start up to n_obs_steps-1
steps before an episode and end up to n_action_steps-1 steps after it, the missing steps filled
by repeating the episode's first / last step (DP's SequenceSampler with pad_before/pad_after).
"""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch


@dataclass
class ReplayBuffer:
    obs: np.ndarray  # (N, obs_dim) float32, all episodes concatenated
    action: np.ndarray  # (N, act_dim) float32
    episode_ends: np.ndarray  # (E,) int64, cumulative
    attrs: dict = field(default_factory=dict)

    @classmethod
    def load(cls, path) -> "ReplayBuffer":
        import zarr  # only needed to read datasets

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no dataset at {path}")
        root = zarr.open_group(str(path), mode="r")
        try:
            buf = cls(np.asarray(root["data/obs"][:], np.float32), np.asarray(root["data/action"][:], np.float32),
                      np.asarray(root["meta/episode_ends"][:], np.int64), dict(root.attrs))
        except KeyError as e:
            raise ValueError(f"dataset {path} lacks {e}; expected data/obs, data/action, meta/episode_ends") from None
        buf.check(str(path))
        return buf

    def check(self, name: str = "replay buffer") -> None:
        ends = self.episode_ends
        if self.obs.ndim != 2 or self.action.ndim != 2 or len(self.obs) != len(self.action):
            raise ValueError(f"{name}: obs {self.obs.shape} and action {self.action.shape} must be (N, dim) each")
        if len(ends) == 0 or ends[-1] != len(self.obs) or np.any(np.diff(ends) <= 0) or ends[0] <= 0:
            raise ValueError(f"{name}: episode_ends must increase strictly and end at N={len(self.obs)}")

    @property
    def n_episodes(self) -> int:
        return len(self.episode_ends)


def sequence_indices(episode_ends: np.ndarray, horizon: int, pad_before: int = 0, pad_after: int = 0) -> np.ndarray:
    """(num_windows, horizon) buffer indices of every window, padding by edge repetition."""
    windows = []
    start = 0
    for end in episode_ends:
        length = int(end) - start
        first = np.arange(-pad_before, length - horizon + pad_after + 1)  # window start within the episode
        if len(first):
            windows.append(np.clip(first[:, None] + np.arange(horizon)[None, :], 0, length - 1) + start)
        start = int(end)
    if not windows:
        return np.zeros((0, horizon), np.int64)
    return np.concatenate(windows).astype(np.int64)


class SequenceDataset(torch.utils.data.Dataset):
    """Training windows: obs (n_obs_steps, obs_dim) and action (horizon, act_dim), raw (unnormalised)."""

    def __init__(self, buffer: ReplayBuffer, horizon: int = 16, n_obs_steps: int = 2, n_action_steps: int = 8,
                 episodes: np.ndarray | None = None):
        buffer.check()
        ends = buffer.episode_ends
        if episodes is not None:  # a subset of episodes (e.g. a train/val split)
            starts = np.concatenate([[0], ends[:-1]])
            keep = [np.arange(starts[i], ends[i]) for i in np.asarray(episodes)]
            rows = np.concatenate(keep)
            buffer = ReplayBuffer(buffer.obs[rows], buffer.action[rows], np.cumsum([len(k) for k in keep]),
                                  buffer.attrs)
        self.obs = torch.from_numpy(buffer.obs)
        self.action = torch.from_numpy(buffer.action)
        self.n_obs_steps = n_obs_steps
        self.indices = torch.from_numpy(
            sequence_indices(buffer.episode_ends, horizon, pad_before=n_obs_steps - 1, pad_after=n_action_steps - 1))
        if len(self.indices) == 0:
            raise ValueError(f"no episode is long enough for a window of horizon {horizon}")

    def __len__(self) -> int:
        return len(self.indices)

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows idx (B,) -> obs (B, n_obs_steps, obs_dim), action (B, horizon, act_dim)."""
        rows = self.indices[idx]  # (B, horizon)
        return self.obs[rows[:, :self.n_obs_steps]], self.action[rows]

    def __getitem__(self, i: int) -> dict:
        obs, action = self.batch(torch.tensor([i]))
        return {"obs": obs[0], "action": action[0]}
