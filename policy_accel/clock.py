"""The step clock: where the sampling loop is, for whoever listens (block caches, recorders, peers).

    clock = StepClock()
    clock.listeners.append(listener)
    sample(denoiser, ctx, noise, sampler, clock=clock)   # the loop drives it:
        begin_chunk(batch_size, sampler_kind, timesteps) -> at(k, t) per step
        -> branch("uncond") around guidance calls -> end_chunk()

Listeners read `clock.step`, `clock.t` and `clock.branch_key` (plain Python values: no host sync)
when a block runs. Outside a chunk (`running` is False) a listener must let blocks compute exactly.
"""

from contextlib import contextmanager

COND = "cond"
UNCOND = "uncond"  # the guidance branch sampling.sample runs on ctx.uncond()


class ClockListener:
    """Base for what listens to a StepClock; every method is a no-op unless overridden."""

    def begin_chunk(self, batch_size: int, sampler_kind: str, timesteps: tuple[float, ...]) -> None: ...

    def branch_changed(self, branch: str) -> None: ...

    def end_chunk(self) -> None: ...

    def reset(self) -> None:
        """A new episode: drop any state kept across chunks."""


class StepClock:
    def __init__(self):
        self.listeners: list[ClockListener] = []
        self.running = False
        self.step = 0
        self.t = 0.0
        self.branch_key = COND
        self.num_steps = 0

    def begin_chunk(self, batch_size: int, sampler_kind: str, timesteps) -> None:
        if self.running:
            raise RuntimeError("a sampling pass is already running on this clock (nested or unfinished chunk)")
        timesteps = tuple(float(t) for t in timesteps)
        self.running, self.step, self.t, self.branch_key = True, 0, timesteps[0], COND
        self.num_steps = len(timesteps)
        try:
            for listener in self.listeners:
                listener.begin_chunk(batch_size, sampler_kind, timesteps)
        except BaseException:
            self.running = False
            raise

    def at(self, step: int, t: float) -> None:
        self.step, self.t = step, t

    @contextmanager
    def branch(self, name: str):
        """Calls inside the block belong to guidance branch `name` (each branch keeps its own cache state)."""
        previous = self.branch_key
        self._switch(name)
        try:
            yield
        finally:
            self._switch(previous)

    def _switch(self, name: str) -> None:
        if name != self.branch_key:
            self.branch_key = name
            for listener in self.listeners:
                listener.branch_changed(name)

    def end_chunk(self) -> None:
        self.running, self.branch_key = False, COND
        for listener in self.listeners:
            listener.end_chunk()

    def reset(self) -> None:
        for listener in self.listeners:
            listener.reset()
