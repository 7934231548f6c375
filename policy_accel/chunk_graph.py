"""One graph per chunk: the whole accelerated chunk compiled with torch.compile(fullgraph=True).

    pa.accelerate(policy, "uniform5@ddim10")      # or no cache: the plain chunk compiles the same way
    policy.compile_chunk()                        # normalise -> prepare -> K steps -> unnormalise, one graph
    policy.compile_chunk(mode="max-autotune")     # any torch.compile option (backend="eager" in the tests)
    policy.compile_chunk(cuda_graph=True)         # CUDA: and capture it as one CUDA graph per batch size
    actions = policy.predict_action_chunk(obs)    # as before; select_action too

What is traced is `Policy._chunk` on tensors (raw history, initial noise, per-step noise) -> raw
actions: the normalisers, the denoiser's `prepare`, the sampling loop unrolled over its K steps
(sampler updates with their coefficients as Python floats), each step's blocks, and the cache.

How the cache decides at trace time: a static-schedule method (uniform, TaylorSeer, BAC, BAC+Taylor,
every_step) is a compute mask per block and step. The loop sets the step clock with Python ints
(`clock.at(k, t)`), so when dynamo traces a block's hook, `mask[clock.step]` is a constant: it
records either the block's computation or the forecast's arithmetic (Python-float coefficients from
the known t values), never a branch on data. The hooks stay where they are (on the module instances,
taken off by `remove_acceleration`); two things change inside a trace only (`torch.compiler.
is_compiling()`): the hook does not count (the counts are added per chunk from the masks, see
`BlockHook.count_chunk`) nor probe FLOPs, and the cache drops its state at the chunk's end.

Where the cache's state lives: in the graph. The stored branch outputs and Newton differences are
intermediate tensors of the traced function (the Forecaster's Python lists are only trace-time
bookkeeping); since the state is dropped when the chunk ends, no tensor leaves the graph but the
actions, nothing is kept between chunks, and dynamo sees the same (empty) cache at every entry: one
compile per (method, sampler, dtype, batch size), no recompiles as chunks go by.

CUDA graphs: the traced chunk has no host sync (fullgraph would break on `.item()`), no Python
branch on data, and no allocation whose size depends on values; the timestep tensors it builds are
constants of the graph. `cuda_graph=True` captures the compiled chunk with static input buffers
(`torch.cuda.graph`); a replay runs no Python at all (the counts are still added per chunk).
`mode="reduce-overhead"` leaves the same capture to inductor instead.

Not supported (a clear error, never a fallback): caches that decide from the data or run diffusers'
hooks (First Block Cache, MagCache, diffusers' TaylorSeer), per-block `compile=True` (the whole chunk
is compiled instead), and `policy.compile()` of the denoiser alone.
"""

import torch

from policy_accel.cache.methods import BlockCache


class ChunkGraph:
    """The compiled chunk of one policy as it is now; `Policy.compile_chunk` makes it."""

    def __init__(self, policy, cuda_graph: bool = False, **compile_kwargs):
        cache = policy.cache
        if cache is not None and not isinstance(cache, BlockCache):
            raise ValueError(f"{cache.tag} cannot be compiled into one graph per chunk: it decides from the data or "
                             "runs diffusers' hooks; whole-chunk compile needs a static schedule (uniform, taylorseer, "
                             "bac, bac_taylor, every_step)")
        if cache is not None and cache.config.compile:
            raise ValueError(f"{cache.tag} compiles each block (compile=True); whole-chunk compile compiles "
                             "everything: use a config without compile=True")
        if policy.compiled_model is not None:
            raise RuntimeError("the denoiser alone is compiled (policy.compile()): call policy.compile(False) first")
        if "fullgraph" in compile_kwargs or "dynamic" in compile_kwargs:
            raise ValueError("compile_chunk always compiles with fullgraph=True and dynamic=False")
        self.policy = policy
        self.made_for = self._state()
        self.branches = ("cond",) if policy.config.guidance_scale is None else ("cond", "uncond")
        self.compiled = torch.compile(policy._chunk, fullgraph=True, dynamic=False, **compile_kwargs)
        self.cuda_graphs: dict | None = None  # batch size -> (static inputs, graph, output buffer)
        if cuda_graph:
            self.use_cuda_graph()

    def use_cuda_graph(self) -> None:
        """From the next chunk on, capture the compiled chunk as one CUDA graph per batch size and replay it."""
        if self.policy.device.type != "cuda":
            raise RuntimeError(f"cuda_graph=True needs the policy on a CUDA device; it is on {self.policy.device}")
        if self.cuda_graphs is None:
            self.cuda_graphs = {}

    def _state(self) -> tuple:
        p = self.policy
        return p.cache, p.sampler, p.dtype, p.device

    def __call__(self, history: torch.Tensor, noise: torch.Tensor, step_noise: list) -> torch.Tensor:
        """Raw history (B, To, obs_dim), noise (B, horizon, Da) and per-step noise (None where a step draws
        none), all on the policy's device -> raw actions (B, Ta, Da). With CUDA graphs the result is the
        graph's output buffer, overwritten by the next call: copy it (`.cpu()`) before then."""
        now = self._state()
        if now != self.made_for:
            names = ("cache", "sampler", "dtype", "device")
            changed = [f"{n} {a!r} -> {b!r}" for n, a, b in zip(names, self.made_for, now, strict=True) if a != b]
            raise RuntimeError(f"the chunk graph was compiled for another policy state ({'; '.join(changed)}): "
                               "call policy.compile_chunk() again")
        self.policy.clock.reset()  # the cache enters every chunk empty (an eager chunk may have run in between)
        with torch.inference_mode():  # inputs made outside it (a caller's noise) would not match the guards
            history, noise, *step_noise = [x if x is None or x.is_inference() else x.clone()
                                           for x in (history, noise, *step_noise)]
            if self.cuda_graphs is None:
                out = self.compiled(history, noise, step_noise)
            else:
                out = self._replay(history, noise, step_noise)
        if self.policy.cache is not None:
            for hook in self.policy.cache.hooks:
                hook.count_chunk(self.branches)
        return out

    def _replay(self, history, noise, step_noise) -> torch.Tensor:
        inputs = [history, noise, *step_noise]
        entry = self.cuda_graphs.get(history.shape[0])
        if entry is None:
            entry = self.cuda_graphs[history.shape[0]] = self._capture(inputs)
        static, graph, out = entry
        for dst, src in zip(static, inputs, strict=True):
            if dst is not None:
                dst.copy_(src, non_blocking=True)
        graph.replay()
        return out

    def _capture(self, inputs: list):
        """Warm up (compile, autotune) on a side stream, then capture one chunk into a CUDA graph."""
        static = [None if x is None else x.clone() for x in inputs]

        def run():
            return self.compiled(static[0], static[1], static[2:])

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                run()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = run()
        return static, graph, out
