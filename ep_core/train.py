"""Training with any estimator: the estimator's gradient ĝ takes the place of backprop's in a torch optimizer.

Step t = 1 … steps:

    batch_t ~ training data                       (data and mask generators, advanced step by step)
    ĝ_t     = estimator.estimate(model, batch_t)  (estimator generator)
    ĝ_t[k] ← ĝ_t[k] · min(1, clip / ||ĝ_t[k]||)   for each parameter group k
    η_t     = lr · t/warmup during warm-up, then lr · (m + (1 − m)·½(1 + cos π·u)), u ∈ [0, 1] the fraction
              of the post-warm-up steps done and m = min_lr
    θ      ← AdamW(θ, ĝ_t + λ·∇_θR, η_t)          (or SGD with momentum)

R = ||J_G(x*)ᵀv||² / ||v||², v ~ N(0, I), is Hutchinson's one-sample estimate of ||J_G||²_F / n at the free
equilibrium x* (Bai, Koltun & Kolter 2021, "Stabilizing equilibrium models by Jacobian regularization"),
with weight λ = ``jacobian_penalty`` (0: off). Training an equilibrium model can push the Jacobian of its
relaxation map past the stability boundary, ρ(J_G) ≥ 1, where the fixed point that every estimator assumes
stops attracting; the penalty pulls the other way. It is the same term whichever estimator is trained.

The training loss logged at step t is C(x*) at the free equilibrium the estimator reports, before the update.
Every ``eval_every`` steps (and at 0 and the end) the validation loss is the mean of C(x*) over
``eval_batches`` held-out batches, the same ones every time. Every ``diagnose_every`` steps (and after the last
one) the reference
estimator (bptt) runs on batch_t, before the update, and the cosine of ĝ_t to its gradient is logged per group:
how far the rule is from the exact gradient along the way, not only at initialisation.

A run directory holds ``run.json`` (what was run), ``log.jsonl`` (one JSON record per event) and
``checkpoint.pt``, written atomically every ``checkpoint_every`` steps and at the end. A checkpoint holds the
model, the optimizer, the schedule's position, the three generators' states and the estimator's own state
(``state_dict()``, for rules with e.g. random feedback matrices), so a resumed run continues exactly: on the same
device its parameters are bitwise those of a run that was never stopped. Checkpoints are read with
``torch.load(weights_only=True)``; run.json and the log are JSON.
"""

from __future__ import annotations

import fnmatch
import io
import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ep_core.capture import Runner
from ep_core.config import ConfigError
from ep_core.distributed import ONE_PROCESS, World, cost_share, shard, shard_share, summed_gradient
from ep_core.files import read_json, require, write_atomic
from ep_core.harness import environment, gradient_metrics, init_state, jsonable
from ep_core.errors import DistributedError, EpxError, FileFormatError, Interrupted, ResumeError
from ep_core.layernorm_study import surrogate_cosines
from ep_core.protocols import (Batch, ChoosesBackwardRules, HasMetrics, HasTrainingDefaults, LocalModel, Model,
                               ResidualModel, StatefulEstimator)
from ep_core.residual_stream import residual_stream
from ep_core.analysis import fixed_point_stability
from ep_core.schedule import TrainConfig, learning_rate
from ep_core.relax import inner, parameter_gradient, relaxation_map
from ep_core.plugins import Registry
from ep_core.seeding import (DATA_STREAM, ESTIMATOR_STREAM, EVAL_MASK_STREAM, EVAL_STREAM, MASK_STREAM,
                             PENALTY_STREAM, PROBE_STREAM, generator)
from ep_core.session import build_problem, draw_batch, samples_in

RUN_FORMAT = "epx.run/1"
CHECKPOINT_FORMAT = "epx.checkpoint/1"
RUN_FILE, LOG_FILE, CHECKPOINT_FILE = "run.json", "log.jsonl", "checkpoint.pt"


def frozen_parameters(model: Model, patterns: list[str]) -> set[str]:
    """The names of the parameters in the groups that match any of ``patterns`` (fnmatch globs); a pattern that
    matches no group is a ConfigError naming the groups there are."""
    groups = model.parameter_groups()
    names: set[str] = set()
    for pattern in patterns:
        matched = [group for group in groups if fnmatch.fnmatchcase(group, pattern)]
        if not matched:
            raise ConfigError("freeze", f"{pattern!r} matches no parameter group; the groups are "
                                        f"{', '.join(groups)}")
        names.update(name for group in matched for name in groups[group])
    if names >= {name for name, p in model.named_parameters() if p.requires_grad}:
        raise ConfigError("freeze", f"{','.join(patterns)} freezes every parameter; nothing would be trained")
    return names


def make_optimizer(model: torch.nn.Module, config: TrainConfig,
                   frozen: set[str] = frozenset()) -> torch.optim.Optimizer:
    trainable = [p for name, p in model.named_parameters() if p.requires_grad and name not in frozen]
    if config.optimizer == "sgd":
        return torch.optim.SGD(trainable, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    return torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)


def clip_groups(model: torch.nn.Module, clip: float | None) -> dict[str, float]:
    """Scale each parameter group's gradient (in ``param.grad``) to norm ≤ clip; return the norms before."""
    params = dict(model.named_parameters())
    norms = {}
    for group, names in model.parameter_groups().items():
        grads = [params[n].grad for n in names if params[n].grad is not None]
        if not grads:
            continue
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        norms[group] = float(total)
        if clip is not None and norms[group] > clip:
            torch._foreach_mul_(grads, clip / norms[group])
    return norms


@dataclass
class Run:
    """Everything a training run needs, built (by :func:`ep_core.session`-style code or the CLI) from names."""

    model: torch.nn.Module
    estimator: Any
    dataset: Any | None
    held_out: Any | None
    batch_size: int
    seed: int
    config: TrainConfig
    spec: dict[str, Any]
    """What was run, as JSON: names and settings of estimator, model, data, the config. A resume must match it."""
    reference: Any | None = None
    data_description: dict[str, Any] = field(default_factory=dict)
    frozen: set[str] = field(default_factory=set)
    """Parameters that training leaves as they were initialised (``--freeze``)."""
    steps_per_epoch: int | None = None


def build_run(registry: Registry, estimator: str, model: str, *, settings: Mapping[str, str] | None = None,
              model_settings: Mapping[str, str] | None = None, train_settings: Mapping[str, str] | None = None,
              data: str = "auto", data_dir: str | None = None, download: bool = True,
              warn: Callable[[str], None] | None = None, batch_size: int | None = None, seed: int = 0,
              dtype: str = "float32", device: str = "cpu", reference: str | None = "bptt",
              world: World = ONE_PROCESS) -> Run:
    """A :class:`Run` from names and ``key=value`` settings; every setting is validated before data are loaded.

    The held-out data are the dataset's test split ("test"; for text, the held-out tail). ``reference`` (None:
    no diagnostics) is skipped when it is the estimator being trained. With several processes (``world``) the
    model is built on this rank's device (:meth:`World.place`) while the spec records ``device`` as requested,
    and ``batch_size`` is the global batch, which must split evenly among the ranks.
    """
    model_class = registry.get("model", model).factory
    defaults = dict(model_class.training_defaults) if isinstance(model_class, HasTrainingDefaults) else {}
    config = TrainConfig.from_mapping({**defaults, **(train_settings or {})})
    compared_with = reference if reference not in (None, estimator) else None
    with world.main_first(what="loading the data"):
        problem = build_problem(registry, model, [estimator], settings=settings, model_settings=model_settings,
                                references=[compared_with] if compared_with else [], data=data, data_dir=data_dir,
                                download=download, warn=warn, batch_size=batch_size, seed=seed, dtype=dtype,
                                device=world.place(device), held_out=True)
    network, dataset, batch_size = problem.model, problem.dataset, problem.batch_size
    if batch_size % world.size:
        raise ConfigError("batch_size", f"the global batch of {batch_size} does not split into {world.size} equal "
                                        f"shards, one per process; use a --batch-size divisible by {world.size}")
    if not any(p.requires_grad for p in network.parameters()):
        raise ConfigError("model", f"{model} has no trainable parameters")
    rule, exact = problem.estimators[estimator], problem.estimators.get(compared_with)
    steps_per_epoch = None if dataset is None else samples_in(network, dataset) // batch_size
    config = config.resolved(steps_per_epoch)
    frozen = frozen_parameters(network, config.frozen_patterns)
    for built in (rule, exact):
        init_state(built, network, seed=seed)
    spec = {"estimator": {"name": estimator, "config": rule.config.to_dict()},
            "model": {"name": model, "config": network.config.to_dict()},
            "data": {"requested": data, "name": dataset.name if dataset is not None else "synthetic"},
            "batch_size": batch_size, "seed": seed, "dtype": dtype, "device": device,
            "reference": reference if exact is not None else None, "train": config.to_dict()}
    description = dataset.describe() if dataset is not None else {"name": "synthetic"}
    return Run(model=network, estimator=rule, dataset=dataset, held_out=problem.held_out, batch_size=batch_size,
               seed=seed, config=config, spec=spec, reference=exact, data_description=description, frozen=frozen,
               steps_per_epoch=steps_per_epoch)


@dataclass
class Progress:
    """What a caller sees after every event: the record just logged."""

    on_record: Callable[[dict[str, Any]], None] = lambda record: None
    stop: threading.Event = field(default_factory=threading.Event)
    """Set it (e.g. from a SIGINT handler) to stop after the current step, with a checkpoint."""


class Stopped(Interrupted):
    """Training stopped on request after ``step``; with a run directory, its checkpoint holds that step."""

    def __init__(self, step: int, directory: Path | None):
        saved = f" (checkpoint in {directory})" if directory is not None else " (no --out: nothing was saved)"
        super().__init__(f"after step {step}{saved}")
        self.step, self.directory = step, directory


def _generators(run: Run) -> dict[str, torch.Generator]:
    device = next(run.model.parameters()).device
    return {"data": generator(run.seed, DATA_STREAM), "mask": generator(run.seed, MASK_STREAM),
            "estimator": generator(run.seed, ESTIMATOR_STREAM, device), "penalty": generator(run.seed, PENALTY_STREAM)}


def jacobian_penalty(model, batch, state, *, weight: float, generator: torch.Generator,
                     world: World = ONE_PROCESS) -> tuple[dict[str, torch.Tensor], float]:
    """(∇_θ of λ·R, R) with R = ||J_G(x*)ᵀv||² / ||v||² for one v ~ N(0, I) drawn from ``generator``.

    With several processes, ``batch`` and ``state`` are this rank's shard. Every rank draws the probe of the whole
    batch, as one process would, and keeps its own rows. J_G is block-diagonal over the samples, so ||J_Gᵀv||² is
    the sum of the shards' parts, and each rank returns the gradient of its part, divided by the global ||v||²."""
    whole = tuple(torch.randn((t.shape[0] * world.size, *t.shape[1:]), generator=generator, dtype=t.dtype)
                  .to(t.device) for t in state)
    rows = state[0].shape[0]
    probe = tuple(v[world.rank * rows:(world.rank + 1) * rows] for v in whole)
    probe_norm = inner(whole, whole)
    relaxation_step = relaxation_map(model, batch)
    value = {}

    def penalty() -> torch.Tensor:
        x = tuple(t.detach().requires_grad_() for t in state)
        pulled_back = torch.autograd.grad(relaxation_step(x), x, grad_outputs=probe, create_graph=True)
        value["R"] = inner(pulled_back, pulled_back) / probe_norm
        return weight * value["R"]

    gradient = parameter_gradient(model, penalty)
    return gradient, world.sum_numbers([float(value["R"])], what="summing the Jacobian penalty")[0]


def validation_loss(run: Run, world: World = ONE_PROCESS) -> float:
    """Mean ``model.loss`` over the same ``eval_batches`` held-out batches every time it is called (for an
    equilibrium model: C after the T1 free steps). With several processes each rank scores its shard of every
    batch, and the shards' means are averaged."""
    data, mask = generator(run.seed, EVAL_STREAM), generator(run.seed, EVAL_MASK_STREAM)
    total = 0.0
    for _ in range(run.config.eval_batches):
        batch = shard(draw_batch(run.model, run.held_out, run.batch_size, data=data, mask=mask), world)
        with torch.no_grad():
            total += float(run.model.loss(batch))
    return world.mean_numbers([total], what="the validation loss")[0] / run.config.eval_batches


EVALUATION_BATCH = 1024
"""Samples of the fixed held-out batch on which a residual network's stream is diagnosed (seed 004's)."""
CHUNK = 1000
"""Samples per forward pass when the whole held-out set is scored."""


def epoch_record(run: Run, epoch: int, step: int, world: World = ONE_PROCESS) -> dict[str, Any]:
    """After an epoch: the model's metrics (accuracy) on the whole held-out set and, for a residual network, its
    stream diagnostics on a fixed evaluation batch (seed 004's per-epoch record). With several processes the
    held-out set's chunks are dealt out among the ranks."""
    model = run.model
    record: dict[str, Any] = {"kind": "epoch", "epoch": epoch, "step": step}
    if isinstance(model, HasMetrics) and run.held_out is not None:
        everything = draw_batch(model, run.held_out, samples_in(model, run.held_out),
                                data=generator(run.seed, EVAL_STREAM), mask=generator(run.seed, EVAL_MASK_STREAM))
        size = next(iter(everything.values())).shape[0]
        totals: dict[str, float] = {}
        for start in range(world.rank * CHUNK, size, world.size * CHUNK):
            chunk = {key: value[start:start + CHUNK] for key, value in everything.items()}
            for name, value in model.metrics(chunk).items():
                totals[name] = totals.get(name, 0.0) + value * next(iter(chunk.values())).shape[0]
        names = world.gather_json(sorted(totals), what="the held-out metrics")[0]  # rank 0 always has a chunk
        summed = world.sum_numbers([totals.get(name, 0.0) for name in names], what="the held-out metrics")
        record |= {f"test_{name}": total / size for name, total in zip(names, summed)}
    if isinstance(model, ResidualModel) and run.held_out is not None:
        fixed = draw_batch(model, run.held_out, min(EVALUATION_BATCH, samples_in(model, run.held_out)),
                           data=generator(run.seed, EVAL_STREAM), mask=generator(run.seed, EVAL_MASK_STREAM))
        record["stream"] = residual_stream(model, fixed)
    return record


def save_checkpoint(path: Path, run: Run, optimizer: torch.optim.Optimizer, generators: Mapping[str, torch.Generator],
                    step: int) -> None:
    payload = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "spec": json.dumps(run.spec, sort_keys=True),
        "model": run.model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "schedule": {"step": step},
        "rng": {name: g.get_state() for name, g in generators.items()},
        "estimator": run.estimator.state_dict() if isinstance(run.estimator, StatefulEstimator) else {},
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_atomic(path, buffer.getvalue())


RUN_SPEC_KEYS = ("estimator", "model", "data", "batch_size", "seed", "dtype", "device", "reference", "train")
LOG_KINDS = ("train", "eval", "checkpoint", "epoch")
_START_OVER = "delete the run directory or choose another --out to start over"


def read_run(directory: Path) -> dict[str, Any]:
    """The run ``directory``'s run.json, checked: a dict of format epx.run/1 with every key of the run's spec
    (:data:`RUN_SPEC_KEYS`) of the right type. It is what ``epx train --resume --out DIR`` rebuilds the run from."""
    path = Path(directory) / RUN_FILE
    if not path.exists():
        raise ResumeError(f"--out: {directory} holds no run to resume ({RUN_FILE} is missing); start one without "
                          "--resume")
    data = read_json(path, what=f"an {RUN_FORMAT} run description", remedy=_START_OVER)
    require(path, isinstance(data, dict), f"not an {RUN_FORMAT} run description: it holds a "
                                          f"{type(data).__name__}, not an object", _START_OVER)
    require(path, data.get("format") == RUN_FORMAT, f"not an {RUN_FORMAT} run description (format "
                                                     f"{data.get('format')!r})", _START_OVER)
    missing = [key for key in RUN_SPEC_KEYS if key not in data]
    require(path, not missing, f"incomplete run description: no {', '.join(missing)}", _START_OVER)
    named = {"estimator": ("name", "config"), "model": ("name", "config"), "data": ("requested", "name")}
    for key, fields in named.items():
        value = data[key]
        require(path, isinstance(value, dict) and all(f in value for f in fields),
                f"{key!r} must be an object with {' and '.join(fields)}", _START_OVER)
        require(path, isinstance(value[fields[0]], str) and isinstance(value[fields[1]], dict | str),
                f"{key!r} has a {fields[0]} or {fields[1]} of the wrong type", _START_OVER)
    for key, kind in (("batch_size", int), ("seed", int), ("dtype", str), ("device", str), ("train", dict)):
        require(path, isinstance(data[key], kind) and not isinstance(data[key], bool),
                f"{key!r} must be a {kind.__name__}, got {data[key]!r}", _START_OVER)
    require(path, data["reference"] is None or isinstance(data["reference"], str),
            f"'reference' must be a name or null, got {data['reference']!r}", _START_OVER)
    return data


def spec_differences(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for every leaf where two run specs differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [difference for key in sorted(set(old) | set(new), key=str)
                for difference in spec_differences(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [(prefix.rstrip("."), old, new)]


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The payload of an epx checkpoint, loaded with ``weights_only=True`` and checked key by key."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - whatever is wrong with the bytes, the message is the same
        reason = " ".join(str(exc).split())[:200]
        raise FileFormatError(path, f"not a readable epx checkpoint ({type(exc).__name__}: {reason})",
                              _START_OVER) from None
    require(path, isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT,
            f"not an {CHECKPOINT_FORMAT} checkpoint", _START_OVER)
    kinds = {"step": int, "spec": str, "model": dict, "optimizer": dict, "schedule": dict, "rng": dict,
             "estimator": dict}
    for key, kind in kinds.items():
        require(path, isinstance(payload.get(key), kind), f"checkpoint without a valid {key!r} "
                                                          f"(expected {kind.__name__})", _START_OVER)
    require(path, payload["step"] >= 0 and payload["schedule"].get("step") == payload["step"],
            "checkpoint with an inconsistent step", _START_OVER)
    for name, tensor in [*payload["model"].items(), *payload["rng"].items()]:
        require(path, isinstance(tensor, torch.Tensor), f"checkpoint entry {name!r} is not a tensor", _START_OVER)
    for name, state in payload["rng"].items():
        require(path, state.dtype == torch.uint8 and state.dim() == 1,
                f"generator state {name!r} is not a uint8 vector", _START_OVER)
    return payload


def checkpoint_step(directory: Path) -> int:
    """The step after which the checkpoint of run ``directory`` was taken; a ResumeError when there is none."""
    path = Path(directory) / CHECKPOINT_FILE
    if not path.exists():
        raise ResumeError(f"nothing to resume: {path} does not exist (the run stopped before its first "
                          f"checkpoint); {_START_OVER}")
    return read_checkpoint(path)["step"]


def load_checkpoint(path: Path, run: Run, optimizer: torch.optim.Optimizer,
                    generators: Mapping[str, torch.Generator]) -> int:
    """Restore ``run``, ``optimizer`` and ``generators`` from ``path``; return the step it was taken after.

    Every tensor is checked against the model (names, shapes, dtypes) before anything is changed, so a bad
    checkpoint is an error naming what does not fit, and the model is left as it was."""
    payload = read_checkpoint(path)
    try:
        written_by = json.loads(payload["spec"])
    except json.JSONDecodeError:
        raise FileFormatError(path, "the checkpoint's run description is not JSON", _START_OVER) from None
    if written_by != run.spec:
        differing = "; ".join(f"{key}: {then!r} there, {now!r} now"
                              for key, then, now in spec_differences(written_by, run.spec))
        raise ResumeError(f"{path} was written by a different run ({differing}); resume with the options in "
                          f"{path.parent / RUN_FILE} (`epx train --resume --out {path.parent}` alone uses them), or "
                          "choose another --out")
    expected = run.model.state_dict()
    saved = payload["model"]
    missing, extra = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    require(path, not missing and not extra,
            f"its model has other tensors than {type(run.model).__name__}: missing {missing}, unexpected {extra}",
            _START_OVER)
    wrong = [f"{name} {tuple(saved[name].shape)} {saved[name].dtype} (the model has {tuple(t.shape)} {t.dtype})"
             for name, t in expected.items() if saved[name].shape != t.shape or saved[name].dtype != t.dtype]
    require(path, not wrong, f"tensors of the wrong shape or dtype: {'; '.join(wrong)}", _START_OVER)
    require(path, set(payload["rng"]) == set(generators),
            f"generator states for {sorted(payload['rng'])}, expected {sorted(generators)}", _START_OVER)
    before = {name: t.clone() for name, t in expected.items()}
    try:
        optimizer.load_state_dict(payload["optimizer"])
        for name, g in generators.items():
            g.set_state(payload["rng"][name])
        if isinstance(run.estimator, StatefulEstimator):
            run.estimator.load_state_dict(payload["estimator"])
        run.model.load_state_dict(saved)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
        run.model.load_state_dict(before)
        reason = " ".join(str(exc).split())[:200]
        raise FileFormatError(path, f"cannot be restored ({type(exc).__name__}: {reason})", _START_OVER) from None
    return payload["step"]


def read_log(path: Path, upto: int | None = None) -> list[dict[str, Any]]:
    """The records of steps ≤ ``upto`` (all by default): later ones belong to steps a resumed run will redo. Only
    the last line
    may be cut short (a kill while it was written), and is skipped; anything else that is not a log record is an
    error naming the line."""
    if not path.exists():
        return []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise FileFormatError(path, f"cannot be read as text ({exc})", _START_OVER) from None
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise FileFormatError(path, f"line {number} is not JSON", _START_OVER) from None
        require(path, isinstance(record, dict) and record.get("kind") in LOG_KINDS
                and isinstance(record.get("step"), int) and not isinstance(record.get("step"), bool),
                f"line {number} is not an epx log record (needs a kind in {', '.join(LOG_KINDS)} and an integer "
                "step)", _START_OVER)
        if upto is None or record["step"] <= upto:
            records.append(record)
    return records


def train(run: Run, *, directory: Path | None = None, resume: bool = False,
          progress: Progress | None = None, eager: bool = False, world: World = ONE_PROCESS) -> list[dict[str, Any]]:
    """Train ``run.model`` with ``run.estimator``; return every log record (see the module docstring). On CUDA a
    capturable estimator's estimates are replays of one CUDA graph (:mod:`ep_core.capture`) unless ``eager``.

    Data-parallel with several processes (``world``, :mod:`ep_core.distributed`). Every rank draws the same global
    batch and estimates on its own shard. The estimates are summed into the global batch's gradient before the
    optimizer step, so every rank takes the same step. Evaluation is sharded too. The parameters and the
    estimator's state start as rank 0's. Only rank 0 writes the run directory, which a resume reads on every rank
    (it must be on a filesystem they share). The same seed and global batch give the parameters of a
    one-process run, to float tolerance; the few exceptions are listed in :mod:`ep_core.distributed`."""
    progress = progress or Progress()
    config, model = run.config, run.model
    runners = {"estimator": Runner((run.estimator, model), eager=eager),
               "reference": None if run.reference is None else Runner((run.reference, model), eager=eager)}
    optimizer = make_optimizer(model, config, run.frozen)
    generators = _generators(run)
    groups = model.parameter_groups()
    records: list[dict[str, Any]] = []
    start = 0
    directory = Path(directory) if directory is not None else None
    if directory is not None:
        checkpoint, log_path = directory / CHECKPOINT_FILE, directory / LOG_FILE
        if resume and checkpoint.exists():
            start = load_checkpoint(checkpoint, run, optimizer, generators)
            records = read_log(log_path, start)
        elif resume:
            checkpoint_step(directory)
        elif checkpoint.exists() or log_path.exists() or (directory / RUN_FILE).exists():
            raise ResumeError(f"--out: {directory} already holds a run; pass --resume to continue it, or choose "
                              "another --out")
        # Every rank has looked at the directory before rank 0 writes to it.
        world.barrier(what="checking the run directory")
    log = None
    if directory is not None and world.main:
        write_atomic(directory / RUN_FILE, json.dumps({"format": RUN_FORMAT, **run.spec,
                                                       "dataset": run.data_description, "processes": world.size,
                                                       "environment": environment()}, indent=2) + "\n")
        write_atomic(log_path, "".join(json.dumps(r) + "\n" for r in records))
        log = log_path.open("a")
    if world.size > 1:
        state = run.estimator.state_dict() if isinstance(run.estimator, StatefulEstimator) else {}
        world.broadcast_tensors([*model.parameters(), *model.buffers(), *state.values()],
                                what="starting from rank 0's parameters")
        if state:
            run.estimator.load_state_dict(state)

    def emit(record: dict[str, Any]) -> None:
        record = jsonable(record)  # a loss that overflowed is logged as null, not as invalid JSON
        records.append(record)
        if log is not None:
            log.write(json.dumps(record, allow_nan=False) + "\n")
            log.flush()
        progress.on_record(record)

    try:
        if start == 0:
            emit({"kind": "eval", "step": 0, "val_loss": validation_loss(run, world)})
        for step in range(start + 1, config.steps + 1):
            emit(_train_step(run, step, optimizer, generators, groups, runners, world))
            if step % config.eval_every == 0 or step == config.steps:
                emit({"kind": "eval", "step": step, "val_loss": validation_loss(run, world)})
            if config.epochs is not None and step % run.steps_per_epoch == 0:
                emit(epoch_record(run, step // run.steps_per_epoch, step, world))
            last = step == config.steps
            # A stop requested on any rank (Ctrl-C reaches them at different moments) stops all after this step.
            stop = bool(world.max_numbers([progress.stop.is_set()], what="agreeing on a stop")[0])
            if directory is not None and (step % config.checkpoint_every == 0 or last or stop):
                if world.main:
                    save_checkpoint(directory / CHECKPOINT_FILE, run, optimizer, generators, step)
                emit({"kind": "checkpoint", "step": step})
            if stop and not last:
                raise Stopped(step, directory)
    finally:
        if log is not None:
            log.close()
    return records


def _global_estimate(runner: Runner, model: Model, batch: Batch, *, generator: torch.Generator,
                     world: World) -> tuple[Any, dict[str, torch.Tensor]]:
    """The runner's estimate on this rank's shard ``batch`` and, from all the ranks' together, the global batch's
    gradient (:mod:`ep_core.distributed`)."""
    with cost_share(model, shard_share(world)):
        estimate = runner(batch, generator=generator)
    return estimate, summed_gradient(world, model, estimate.grads, what="summing the gradient")


def _train_step(run: Run, step: int, optimizer: torch.optim.Optimizer, generators: Mapping[str, torch.Generator],
                groups: Mapping[str, list[str]], runners: Mapping[str, Runner | None],
                world: World = ONE_PROCESS) -> dict[str, Any]:
    model, config = run.model, run.config
    started = time.perf_counter()
    batch = shard(draw_batch(model, run.dataset, run.batch_size, data=generators["data"], mask=generators["mask"],
                             augment=config.augment), world)
    try:
        estimate, grads = _global_estimate(runners["estimator"], model, batch, generator=generators["estimator"],
                                           world=world)
    except DistributedError:
        raise  # the job is ending, not the model diverging
    except EpxError as exc:
        raise EpxError(f"training step {step}: {exc}. If the loss or the residual grew over the previous steps "
                       "(see the log), training has pushed the model out of its stable regime: lower --lr") from exc
    equilibrium = estimate.equilibrium
    record: dict[str, Any] = {"kind": "train", "step": step, "lr": learning_rate(config, step),
                              "ms": 1000 * (time.perf_counter() - started)}
    broken = [name for name, g in grads.items() if not bool(torch.isfinite(g).all())]
    if broken:
        raise EpxError(f"step {step}: {type(run.estimator).name} returned non-finite gradients for "
                       f"{', '.join(broken)}; lower --lr or the model's eps")
    with torch.no_grad():
        loss = float(model.cost(equilibrium.state, batch) if equilibrium is not None else model.loss(batch))
    record["loss"] = world.mean_numbers([loss], what="the training loss")[0]
    if equilibrium is not None:
        record["residual"] = world.max_numbers([equilibrium.residual], what="the free-phase residual")[0]
    if run.reference is not None and config.diagnose_every and (step % config.diagnose_every == 0
                                                                or step == config.steps):
        exact, exact_grads = _global_estimate(runners["reference"], model, batch,
                                              generator=generator(run.seed, PROBE_STREAM), world=world)
        metrics = gradient_metrics(grads, exact_grads, groups)
        residual = exact.equilibrium.residual if exact.equilibrium else None
        record["diagnostic"] = {"cosine": metrics["cosine"], "groups": metrics["groups"],
                                "rel_error": metrics["rel_error"],
                                "reference_residual": None if residual is None else world.max_numbers(
                                    [residual], what="the reference's residual")[0]}
        if isinstance(run.estimator, ChoosesBackwardRules) and isinstance(model, LocalModel):
            cosines = surrogate_cosines(model, batch, run.estimator.backward_rules(model))
            # Under torchrun: the mean over the ranks of each shard's cosine.
            means = world.mean_numbers(list(cosines.values()), what="the LayerNorm study")
            record["diagnostic"]["layernorm"] = dict(zip(cosines, means))
        if equilibrium is not None:
            stability = fixed_point_stability(model, batch, equilibrium.state,
                                              generator=generator(run.seed, PROBE_STREAM))
            # J_G is block-diagonal over the samples: its spectral radius is the largest of the shards'.
            record["diagnostic"]["spectral_radius"] = world.max_numbers([stability["spectral_radius"]],
                                                                        what="the spectral radius")[0]
    if config.jacobian_penalty and equilibrium is not None:
        penalty_grads, record["jacobian"] = jacobian_penalty(model, batch, equilibrium.state,
                                                             weight=config.jacobian_penalty,
                                                             generator=generators["penalty"], world=world)
        penalty_grads = world.sum_tensors([penalty_grads[name] for name in grads], what="summing the penalty")
        grads = {name: g + penalty for (name, g), penalty in zip(grads.items(), penalty_grads)}
    for name, p in model.named_parameters():
        if p.requires_grad and name not in run.frozen:
            p.grad = grads[name].to(dtype=p.dtype)
    record["grad_norm"] = clip_groups(model, config.clip)
    for group in optimizer.param_groups:
        group["lr"] = record["lr"]
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return record
