"""Asynchronous inference: the next chunk is computed in a background thread while the robot executes
the current one (as LeRobot's asynchronous inference and real-time chunking do).

    with pa.AsyncPolicy(policy, control_period=1 / 20) as agent:
        obs = robot.observe()
        while running:
            robot.apply(agent.act(obs))   # returns at once unless the queue ran dry
            obs = robot.observe()         # the loop holds the control period

The timeline is counted in control steps, one `act` call each. A chunk requested at step s (from the
observation history ending at step s) holds the actions for steps s, s+1, ... It is requested when the
queue has fallen to `lead` actions: the number executed during one inference. When it arrives at step
s + j, its first j actions (for steps already executed from the old queue) are dropped and the rest
replaces the queue. So every step executes exactly one action, and each chunk's actions run in order
from the offset that matches the steps spent. If the queue runs dry first, `act` waits for the chunk
(a stall, counted in `stats`): that step's action comes late, but none is skipped or repeated.

    lead      lead_steps=k, or ceil(max of the last `latency_window` inference times / control_period)
    arrival   as soon as the chunk is ready (real time), or delay_steps=d: exactly d steps after the
              request, waiting for it if it is not ready (a deterministic injected delay: simulation, tests)

With delay_steps=0 (and lead 0) it acts exactly as `policy.select_action`. The wrapped policy belongs to
the inference thread while a chunk is pending: call it only through this wrapper. Needs of the policy:
`config.n_obs_steps`, `config.obs_dim`, `predict_action_chunk(history (B, To, obs_dim))` and `reset()`.
"""

import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np

THREAD_NAME = "policy-inference"


class AsyncPolicy:
    def __init__(self, policy, control_period: float | None = None, lead_steps: int | None = None,
                 delay_steps: int | None = None, latency_window: int = 10):
        if control_period is not None and not control_period > 0:
            raise ValueError(f"control_period must be > 0 seconds, got {control_period}")
        for name, value in (("lead_steps", lead_steps), ("delay_steps", delay_steps)):
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if control_period is None and lead_steps is None and delay_steps is None:
            raise ValueError("give control_period (to turn measured latency into steps), lead_steps or delay_steps")
        self.policy, self.control_period = policy, control_period
        self.lead_steps, self.delay_steps = lead_steps, delay_steps
        self.latencies: deque[float] = deque(maxlen=latency_window)  # seconds, written by the inference thread
        self.stats = {"chunks": 0, "stalls": 0, "dropped": 0}  # since start(); dropped = stale actions skipped
        self._executor: ThreadPoolExecutor | None = None
        self._history: deque[np.ndarray] = deque(maxlen=policy.config.n_obs_steps)
        self._queue: deque[np.ndarray] = deque()
        self._pending = None  # (future, request step)
        self.step = 0  # control steps executed in this episode

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "AsyncPolicy":
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=THREAD_NAME)
        return self

    def close(self) -> None:
        """Wait for a running inference, then join the thread. Idempotent."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        self._pending = None

    def __enter__(self) -> "AsyncPolicy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def reset(self) -> None:
        """A new episode: drop a pending chunk (after it finishes), the queue and the history; reset the policy."""
        if self._pending is not None:
            self._pending[0].exception()  # wait; an error of a chunk nobody will use is dropped with it
            self._pending = None
        self._queue.clear()
        self._history.clear()
        self.step = 0
        self.policy.reset()

    # ------------------------------------------------------------------ acting
    @property
    def lead(self) -> int:
        """Actions left in the queue when the next chunk is requested."""
        if self.lead_steps is not None:
            return self.lead_steps
        if self.delay_steps is not None:
            return self.delay_steps
        if not self.latencies:
            return 0
        return math.ceil(max(self.latencies) / self.control_period)

    def act(self, obs) -> np.ndarray:
        """This control step's action: obs (obs_dim,) -> (Da,), or a batch (B, obs_dim) -> (B, Da)."""
        if self._executor is None:
            raise RuntimeError("AsyncPolicy is not running: call start() or use it in a with block")
        batch = np.array(np.atleast_2d(obs), dtype=np.float32)  # a copy: envs may reuse their buffers
        if batch.ndim != 2 or batch.shape[1] != self.policy.config.obs_dim:
            raise ValueError(f"obs must have shape ({self.policy.config.obs_dim},) or (B, "
                             f"{self.policy.config.obs_dim}), got {np.shape(obs)}")
        if not self._history:
            self._history.extend([batch] * self.policy.config.n_obs_steps)
        else:
            self._history.append(batch)
        self._take(wait=False)
        if self._pending is None and len(self._queue) <= self.lead:
            self._request()
            self._take(wait=False)  # zero delay: due at once
        while not self._queue:  # ran dry: wait for the chunk (or, if it came too late to use, for a fresh one)
            if self._pending is None:
                self._request()
            self.stats["stalls"] += 1
            self._take(wait=True)
        self.step += 1
        action = self._queue.popleft()
        return action[0] if np.ndim(obs) == 1 else action

    def _request(self) -> None:
        history = np.stack(self._history, axis=1)  # (B, To, obs_dim)
        self._pending = (self._executor.submit(self._infer, history), self.step)

    def _infer(self, history: np.ndarray) -> np.ndarray:  # in the inference thread
        start = time.perf_counter()
        chunk = self.policy.predict_action_chunk(history)  # (B, Ta, Da)
        self.latencies.append(time.perf_counter() - start)
        return np.asarray(chunk).transpose(1, 0, 2)  # (Ta, B, Da)

    def _take(self, wait: bool) -> None:
        """Install the pending chunk if it is due (or, with wait, as soon as it is ready)."""
        if self._pending is None:
            return
        future, requested = self._pending
        if self.delay_steps is not None and not wait:
            due = self.step - requested >= self.delay_steps
        else:
            due = wait or future.done()
        if not due:
            return
        self._pending = None
        chunk = future.result()  # waits if needed; an error in the inference thread is raised here
        offset = self.step - requested  # steps executed since the request: their actions are stale
        self._queue = deque(chunk[offset:])
        self.stats["chunks"] += 1
        self.stats["dropped"] += min(offset, len(chunk))
