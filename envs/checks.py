"""Input checks shared by every env wrapper: a bad action fails here, not inside the simulator."""

import numpy as np


def check_action(action, dim: int, low: float = -1.0, high: float = 1.0) -> np.ndarray:
    """Return `action` as a float64 vector of length `dim`, clipped to [low, high].

    Raises TypeError for non-numeric input and ValueError for a wrong shape or NaN/inf values.
    """
    arr = np.asarray(action)
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"action must be a numeric array, got dtype {arr.dtype}")
    if arr.shape != (dim,):
        raise ValueError(f"action must have shape ({dim},), got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"action contains NaN or inf: {arr}")
    return np.clip(arr.astype(np.float64), low, high)
