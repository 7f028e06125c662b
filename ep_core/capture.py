"""Captured estimates: on CUDA, the whole device work of one gradient estimate recorded once as a CUDA graph and
replayed for every later batch of the same shapes.

A relaxation step is a dozen small kernels; run eagerly, the GPU waits on Python between them. Replaying a
graph launches them all at once. The graph holds the whole estimate — free phase, nudged phases, the vjp
closures built at x*, the adjoint iteration, the final parameter gradient — rather than chunks of one
relaxation, because the EP family's nudged phases depend on tensors made inside the estimate (x*, the closure of
Jᵀ at x*): recorded in one graph they live in its memory pool, and the only inputs are the batch's tensors and the
parameters, which the graph reads in place.

Code that runs inside an estimate obeys two rules, eager or captured, so that the same code serves both:

- finiteness is checked through :func:`finite`: eagerly it reads the flag; during a capture it records the flag
  and answers True, and after each replay the recorded flags are read together, once. A non-finite replay is
  run again eagerly, which reports the exact step of the divergence (:func:`ep_core.solvers.iterate`);
- a number for a report goes through :func:`report`: eagerly a float; during a capture a :class:`DeviceScalar`
  that becomes a float when the replay's result is read out.

A graph is valid for one (estimator config, model config, parameter and buffer storage, batch shapes and dtypes,
grad mode). In-place parameter updates (optimizer steps) are seen by the next replay, since the graph reads the
storage itself; replacing a parameter or a buffer changes the key, and the estimate is captured again. Terms of
the parameters alone that the model caches (:class:`~ep_core.protocols.CachesParameterTerms`, lm's gain bound)
are recomputed inside the graph at every replay, never taken from a cache the graph could not see change; what
they need that cannot be recorded (lm's eigendecomposition) is computed before the replay and copied in with the
batch.

Capture is used on CUDA for an estimator that declares it (:class:`~ep_core.protocols.Capturable`) for the model
at hand, and never on the CPU, where there is nothing to gain; ``eager=True`` (``--eager``) forces eager runs. A
capture that fails falls back to eager runs of that key, with a warning naming the reason.

Several problems (the seeds of ``--seeds N``, a sweep point's seeds) are recorded in one graph: one estimate per
problem, each on a stream of its own, so that the device runs them side by side. Where they share an estimator
and model configuration and the estimator treats problems independently (:class:`~ep_core.protocols.Batchable`),
a graph of one estimate of their stack (:mod:`ep_core.batching`), whose every kernel does the work of all of
them, is recorded too, and the faster of the two is kept.
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch

from ep_core.batching import (Stacked, estimator_key, member_residuals, nudge_ratios, split, stack, stackable,
                              stacking_key, stacks_step_size)
from ep_core.protocols import Batch, Batchable, CachesParameterTerms, Capturable, GradientEstimate

GRAPHS_PER_RUNNER = 8
"""Graphs one runner keeps (least recently used dropped first): each holds its own memory pool."""

_recorded: ContextVar[list[torch.Tensor | None] | None] = ContextVar("epx_recorded_flags", default=None)
"""During a capture, a one-element list holding the running conjunction of the finiteness checks (a device
boolean): one tensor replaced at each check, so the graph's memory does not grow with the number of chunks."""
_capture_streams: dict[torch.device, torch.cuda.Stream] = {}


def capturing() -> bool:
    """Whether the caller runs inside an estimate being recorded as a graph."""
    return _recorded.get() is not None


def finite(flag: torch.Tensor) -> bool:
    """Whether ``flag`` (a sum of the entries to check) is finite. During a capture the flag is recorded, to be read
    after each replay, and the answer is True."""
    recorded = _recorded.get()
    if recorded is None:
        return bool(torch.isfinite(flag))
    _conjoin(recorded, torch.isfinite(flag.detach().reshape(())))
    return True


def _conjoin(recorded: list[torch.Tensor | None], check: torch.Tensor) -> None:
    recorded[0] = check if recorded[0] is None else torch.logical_and(recorded[0], check)


class DeviceScalar:
    """A number a captured estimate reports (a residual), held on the device until the replay has run."""

    def __init__(self, value: torch.Tensor):
        self.value = value

    def __float__(self) -> float:
        return float(self.value)

    def __repr__(self) -> str:
        return f"DeviceScalar({self.value!r})"


def report(value: torch.Tensor) -> float:
    """``float(value)``; during a capture, a :class:`DeviceScalar` read out after the replay."""
    if capturing():
        return DeviceScalar(value.detach().reshape(()))  # type: ignore[return-value]
    return float(value)


@contextmanager
def _recording() -> Iterator[list[torch.Tensor | None]]:
    flags: list[torch.Tensor | None] = [None]
    token = _recorded.set(flags)
    try:
        yield flags
    finally:
        _recorded.reset(token)


def _capture_stream(device: torch.device) -> torch.cuda.Stream:
    """The stream estimates are recorded on, one per device: the warm-up runs on it too, so that the library
    workspaces made for it (cuBLAS keeps one per stream) are made then, not inside a graph's memory pool."""
    if device not in _capture_streams:
        _capture_streams[device] = torch.cuda.Stream(device)
    return _capture_streams[device]


def _read_out(value: Any) -> Any:
    """A captured estimate's outputs as its caller would have them eagerly: tensors copied out of the graph's
    memory (the next replay overwrites them) and device scalars as floats."""
    if isinstance(value, DeviceScalar):
        return float(value)
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _read_out(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_read_out(v) for v in value)
    if isinstance(value, list):
        return [_read_out(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: _read_out(getattr(value, f.name))
                                             for f in dataclasses.fields(value) if f.init})
    return value


def with_parameter_terms(model: Any, batch: Batch) -> Batch:
    """The batch carrying the model's parameter terms (computed here, with their autograd graph), so that every
    force evaluation of one estimate uses the same ones and a graph recomputes them at each replay."""
    if not isinstance(model, CachesParameterTerms):
        return batch
    with torch.enable_grad():
        return model.with_parameter_terms(batch)


@dataclasses.dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    load: Callable[[list[Batch]], None]
    """Copies the members' batches (and, for a stack, their parameters) into the tensors the graph reads."""
    outputs: list[GradientEstimate]
    all_finite: torch.Tensor | None
    peak_bytes: int
    batched: bool


Member = tuple[Any, Any]
"""(estimator, model): one problem of a :class:`Runner`."""


class Runner:
    """Runs estimators on models: captured on CUDA where each estimator declares it can be (module docstring),
    eagerly otherwise. ``members`` are (estimator, model) pairs — one, or several problems (seeds, grid points)
    that run together: captured, their estimates are recorded in one graph, as one estimate of their stack or
    on one stream each; their results are those of separate runs, to rounding. Where the group can be stacked
    (:meth:`batchable`), ``stacking`` None keeps the faster of the two graphs (:meth:`_capture_fastest`), True
    the stacked one, False the other. ``mode`` says how the last call ran: "eager", "captured", or "stacked"
    (captured as one estimate of the stack); ``peak_bytes`` is the device memory the captured graph needed (its
    pool's high-water mark)."""

    def __init__(self, members: Member | list[Member], *, eager: bool = False, stacking: bool | None = None):
        self.members = [members] if isinstance(members, tuple) else list(members)
        if not self.members:
            raise ValueError("a Runner needs at least one (estimator, model) pair")
        self.eager = eager
        self.stacking = stacking
        self.mode = "eager"
        self.peak_bytes: int | None = None
        self._graphs: OrderedDict[tuple, _Graph | str] = OrderedDict()

    def capture_wanted(self) -> bool:
        if self.eager:
            return False
        for estimator, model in self.members:
            parameter = next(model.parameters(), None)
            if (parameter is None or parameter.device.type != "cuda" or not isinstance(estimator, Capturable)
                    or not estimator.capturable(model)):
                return False
        return True

    def __call__(self, batch: Batch, *, generator: torch.Generator) -> GradientEstimate:
        """The estimate of the one member on ``batch``."""
        if len(self.members) != 1:
            raise ValueError(f"this runner holds {len(self.members)} problems; call run() with one batch each")
        return self.run([batch], [generator])[0]

    def run(self, batches: list[Batch], generators: list[torch.Generator]) -> list[GradientEstimate]:
        """Each member's estimate on its batch, with its generator."""
        if len(batches) != len(self.members) or len(generators) != len(self.members):
            raise ValueError(f"{len(self.members)} problems need as many batches and generators, got "
                             f"{len(batches)} and {len(generators)}")
        if not self.capture_wanted():
            return self._eager(batches, generators)
        batches = [{**batch, **model.parameter_term_inputs()} if isinstance(model, CachesParameterTerms) else batch
                   for (_, model), batch in zip(self.members, batches)]
        key = self._key(batches)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture_fastest(batches, generators)
            self._graphs[key] = entry
            while len(self._graphs) > GRAPHS_PER_RUNNER:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        if isinstance(entry, str):
            return self._eager(batches, generators)
        entry.load(batches)
        entry.graph.replay()
        if entry.all_finite is not None and not bool(entry.all_finite):
            # The eager runs retrace the replay step by step and raise the DivergenceError with its step.
            estimates = self._eager(batches, generators)
            warnings.warn(f"{self._names()}: a replay found a non-finite value that the same estimates run eagerly "
                          "did not; the eager results are returned", RuntimeWarning, stacklevel=2)
            return estimates
        self.mode = "stacked" if entry.batched else "captured"
        self.peak_bytes = entry.peak_bytes
        return [_read_out(output) for output in entry.outputs]

    def _names(self) -> str:
        return ", ".join(dict.fromkeys(type(estimator).name for estimator, _ in self.members))

    def _eager(self, batches: list[Batch], generators: list[torch.Generator]) -> list[GradientEstimate]:
        self.mode = "eager"
        return [eager_estimate(estimator, model, batch, generator=gen)
                for (estimator, model), batch, gen in zip(self.members, batches, generators)]

    def _key(self, batches: list[Batch]) -> tuple:
        keys = []
        for (estimator, model), batch in zip(self.members, batches):
            storage = tuple((name, t.data_ptr(), t.shape, t.dtype, t.requires_grad)
                            for name, t in (*model.named_parameters(), *model.named_buffers()))
            inputs = tuple((name, t.shape, t.dtype, t.device) for name, t in batch.items())
            keys.append((type(estimator), estimator.config, model.config, storage, inputs))
        return tuple(keys), torch.is_grad_enabled()

    def batchable(self, batches: list[Batch]) -> bool:
        """Whether the members run as one stacked model (:mod:`ep_core.batching`): several of them, with one
        estimator configuration (but for a nudge it stacks, :func:`~ep_core.batching.estimator_key`) and one model
        type and configuration (but for the knobs the model reads from buffers, and for the step size where the
        estimator scales with the force, :func:`~ep_core.batching.stacking_key`), an estimator that declares it
        treats problems independently, and batches that stack."""
        if len(self.members) < 2:
            return False
        estimator, model = self.members[0]
        step_size = stacks_step_size(estimator)
        kind = (estimator_key(estimator), stacking_key(model, step_size=step_size))
        return (all((estimator_key(e), stacking_key(m, step_size=step_size)) == kind for e, m in self.members)
                and isinstance(estimator, Batchable) and estimator.batchable(model) and stackable(batches))

    def _capture_fastest(self, batches: list[Batch], generators: list[torch.Generator]) -> _Graph | str:
        """The group's graph: where it can be stacked, both the stacked graph and the one with a stream per
        problem are recorded and the one whose replay is faster is kept. Neither always wins: stacking makes
        each kernel do the work of all problems, which pays while kernels are small, but a batched kernel can be
        slower than its members' side by side (a differentiated attention runs as its math decomposition under
        vmap; lm's bptt: 47 against 38 ms for 8 problems on an H200)."""
        if self.stacking is False or not self.batchable(batches):
            return self._capture(batches, generators, as_stack=False)
        if self.stacking:
            return self._capture(batches, generators, as_stack=True)
        try:
            stacked = self._capture(batches, generators, as_stack=True)
        except Exception as error:  # noqa: BLE001 — a model vmap cannot run stacked runs side by side
            warnings.warn(f"{self._names()}: could not run the problems stacked ({type(error).__name__}: {error}); "
                          "capturing them side by side", RuntimeWarning, stacklevel=3)
            stacked = "not stacked"
        recorded = [graph for graph in (stacked, self._capture(batches, generators, as_stack=False))
                    if isinstance(graph, _Graph)]
        if not recorded:
            return "neither the stacked estimate nor the estimates side by side could be captured"
        return min(recorded, key=lambda graph: _replay_ms(graph, batches))

    def _capture(self, batches: list[Batch], generators: list[torch.Generator], *,
                 as_stack: bool) -> _Graph | str:
        device = next(self.members[0][1].parameters()).device
        stacked = (stack([model for _, model in self.members],
                         nudge_ratios=nudge_ratios([estimator for estimator, _ in self.members]))
                   if as_stack else None)
        if stacked is not None:
            inputs = [stacked.batch(batches)]

            def load(new: list[Batch]) -> None:
                stacked.load(new, into=inputs[0])
        else:
            inputs = [{name: tensor.clone() for name, tensor in batch.items()} for batch in batches]

            def load(new: list[Batch]) -> None:
                for tensors, batch in zip(inputs, new):
                    for name, tensor in tensors.items():
                        tensor.copy_(batch[name])
        main = torch.cuda.current_stream(device)
        capture = _capture_stream(device)
        streams = [torch.cuda.Stream(device) for _ in self.members] if len(self.members) > 1 and not stacked else []
        # Library handles and lazily built kernels are made before recording, as capture requires: one estimate of
        # each distinct estimator type and model shape is enough, not one per member.
        warmed = set()
        capture.wait_stream(main)
        with torch.cuda.stream(capture):
            if stacked is not None:
                eager_estimate(self.members[0][0], stacked, inputs[0], generator=generators[0])
            else:
                for (estimator, model), batch, gen in zip(self.members, inputs, generators):
                    kind = (type(estimator), estimator.config, model.config)
                    if kind not in warmed:
                        warmed.add(kind)
                        eager_estimate(estimator, model, batch, generator=gen)
        main.wait_stream(capture)
        torch.cuda.synchronize(device)
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        graph = torch.cuda.CUDAGraph()
        # A graph freed while another is recorded (a garbage-collected cycle holding an old runner) would reset
        # itself mid-capture, which invalidates the capture: no collection until it ends.
        collecting = gc.isenabled()
        gc.disable()
        try:
            with _recording() as flags, torch.cuda.graph(graph, stream=capture):
                outputs = (self._record_stacked(stacked, inputs[0], generators[0]) if stacked is not None
                           else self._record(inputs, generators, streams, flags))
                all_finite = flags[0]
        except Exception as error:  # noqa: BLE001 — any failure to record means: run this key eagerly
            torch.cuda.synchronize(device)
            what, instead = (("the problems' stack", "capturing them side by side") if stacked is not None
                             else ("the estimate", "running it eagerly"))
            warnings.warn(f"{self._names()}: could not capture {what} as a CUDA graph "
                          f"({type(error).__name__}: {error}); {instead}", RuntimeWarning, stacklevel=4)
            return f"{type(error).__name__}: {error}"
        finally:
            if collecting:
                gc.enable()
        peak = torch.cuda.max_memory_allocated(device) - baseline
        return _Graph(graph=graph, load=load, outputs=outputs, all_finite=all_finite, peak_bytes=peak,
                      batched=stacked is not None)

    def _record_stacked(self, stacked: Stacked, batch: Batch, generator: torch.Generator) -> list[GradientEstimate]:
        """The members' estimates as one estimate of their stack, with each member's own free-phase residual."""
        estimate = eager_estimate(self.members[0][0], stacked, batch, generator=generator)
        if estimate.equilibrium is None:
            return split(estimate, [None] * len(stacked), stacked.cost_weights)
        residuals = member_residuals(stacked, batch, estimate.equilibrium.state)
        return split(estimate, [report(residual) for residual in residuals], stacked.cost_weights)

    def _record(self, inputs: list[Batch], generators: list[torch.Generator],
                streams: list[torch.cuda.Stream], flags: list[torch.Tensor | None]) -> list[GradientEstimate]:
        """The members' estimates, recorded on the capturing stream (one member) or forked from it, one stream
        each, all forked before any is recorded and joined after, so that the graph has no edge between them;
        each member's finiteness checks join ``flags`` (the capture's) once the streams are joined."""
        if len(self.members) == 1:
            (estimator, model), = self.members
            return [eager_estimate(estimator, model, inputs[0], generator=generators[0])]
        capturing_stream = torch.cuda.current_stream()
        for stream in streams:
            stream.wait_stream(capturing_stream)
        outputs, checks = [], []
        # Each member conjoins its finiteness checks on its own stream; one chain through all of them would have
        # a member read the flag another stream writes, with no edge between them in the graph: a race.
        for (estimator, model), batch, gen, stream in zip(self.members, inputs, generators, streams):
            with torch.cuda.stream(stream), _recording() as member_checks:
                outputs.append(eager_estimate(estimator, model, batch, generator=gen))
            checks.append(member_checks[0])
        for stream in streams:
            capturing_stream.wait_stream(stream)
        for check in checks:
            if check is not None:
                _conjoin(flags, check)
        return outputs


def _replay_ms(graph: _Graph, batches: list[Batch], repeats: int = 3) -> float:
    """The median ms of ``repeats`` replays of ``graph`` on ``batches``, after one untimed."""
    graph.load(batches)
    graph.graph.replay()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        graph.graph.replay()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def eager_estimate(estimator: Any, model: Any, batch: Batch, *, generator: torch.Generator) -> GradientEstimate:
    """One estimate run step by step, with the model's parameter terms computed once for it
    (:func:`with_parameter_terms`), as a captured one computes them."""
    return estimator.estimate(model, with_parameter_terms(model, batch), generator=generator)
