"""What `attach` returns, for every method (ours and diffusers' peers): a listener on the sampling
loop's clock that checks each chunk runs the sampler it was attached for, and takes itself off."""

from policy_accel.cache.schedule import Binding
from policy_accel.clock import ClockListener, StepClock


class CacheHandle(ClockListener):
    batch_coupled = False  # True: decisions over the whole batch (sample each row alone for batch-1 results)

    def __init__(self, config, tag: str, clock: StepClock, binding: Binding):
        self.config, self.tag, self.clock, self.binding = config, tag, clock, binding
        self.attached = False

    def _attach(self) -> None:
        self.clock.listeners.append(self)
        self.attached = True

    chunks_per_cycle = 1  # consecutive chunks over which the work per chunk repeats (cross-chunk reuse: more)

    def begin_chunk(self, batch_size: int, sampler_kind: str, timesteps: tuple[float, ...]) -> None:
        self.check_sampler(sampler_kind, timesteps)
        self.reset()

    def check_sampler(self, sampler_kind: str, timesteps: tuple[float, ...]) -> None:
        b = self.binding
        if (sampler_kind, len(timesteps)) != (b.sampler, b.num_steps):
            raise ValueError(f"cache {self.tag} was attached for {b.sampler}-{b.num_steps} but the sampler runs "
                             f"{sampler_kind}-{len(timesteps)}; re-apply acceleration after changing the sampler")

    def remove(self) -> None:
        """Take every wrapper off and free the cache: the denoiser behaves exactly as before `attach`."""
        if self.attached:
            self.clock.listeners.remove(self)
            self.attached = False
        self._detach()

    def _detach(self) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.tag}, {self.binding})"
