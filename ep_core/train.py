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
``eval_batches`` held-out batches, the same ones every time. Every ``diagnose_every`` steps the reference
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

import io
import json
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ep_core.config import Config, ConfigError, option
from ep_core.files import write_atomic
from ep_core.harness import environment, gradient_metrics, jsonable
from ep_core.errors import EpxError, Interrupted
from ep_core.protocols import parameter_groups
from ep_core.analysis import fixed_point_stability
from ep_core.relax import free_phase, inner, parameter_gradient, relaxation_map
from ep_core.plugins import Registry
from ep_core.seeding import (DATA_STREAM, ESTIMATOR_STREAM, EVAL_MASK_STREAM, EVAL_STREAM, MASK_STREAM,
                             PENALTY_STREAM, PROBE_STREAM, generator)
from ep_core.session import (DTYPES, build_estimator, build_model, check_requires, data_kind, default_batch_size,
                             draw_batch, load_data)

RUN_FORMAT = "epx.run/1"
CHECKPOINT_FORMAT = "epx.checkpoint/1"
RUN_FILE, LOG_FILE, CHECKPOINT_FILE = "run.json", "log.jsonl", "checkpoint.pt"


@dataclass(frozen=True)
class TrainConfig(Config):
    steps: int = option(300, "optimizer steps", ge=1)
    lr: float = option(3e-3, "peak learning rate", gt=0)
    warmup: int = option(20, "steps of linear warm-up to lr", ge=0)
    min_lr: float = option(0.1, "learning rate at the end of the cosine decay, as a fraction of lr", ge=0, le=1)
    weight_decay: float = option(0.01, "decoupled weight decay (AdamW) or L2 penalty (SGD)", ge=0)
    optimizer: str = option("adamw", "the optimizer: adamw, or sgd with momentum 0.9", choices=("adamw", "sgd"))
    clip: float | None = option(1.0, "largest gradient norm of each parameter group; none: no clipping", gt=0,
                                optional=True)
    eval_every: int = option(25, "steps between validation losses (also at step 0 and at the end)", ge=1)
    eval_batches: int = option(4, "held-out batches per validation loss", ge=1)
    jacobian_penalty: float = option(0.0, "weight λ of the Jacobian penalty λ·||J_G(x*)||²_F/n; 0: off", ge=0)
    diagnose_every: int = option(50, "steps between comparisons with the reference gradient; 0: never", ge=0)
    checkpoint_every: int = option(50, "steps between checkpoints (also at the end)", ge=1)


def learning_rate(config: TrainConfig, step: int) -> float:
    """η for the update of step ``step`` (1-based): linear warm-up, then cosine decay to min_lr·lr."""
    if step <= config.warmup:
        return config.lr * step / config.warmup
    decay_steps = config.steps - config.warmup
    done = (step - config.warmup) / decay_steps
    return config.lr * (config.min_lr + (1 - config.min_lr) * 0.5 * (1 + math.cos(math.pi * done)))


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    trainable = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(trainable, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    return torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)


def clip_groups(model: torch.nn.Module, clip: float | None) -> dict[str, float]:
    """Scale each parameter group's gradient (in ``param.grad``) to norm ≤ clip; return the norms before."""
    params = dict(model.named_parameters())
    norms = {}
    for group, names in parameter_groups(model).items():
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


def build_run(registry: Registry, estimator: str, model: str, *, settings: Mapping[str, str] | None = None,
              model_settings: Mapping[str, str] | None = None, train_settings: Mapping[str, str] | None = None,
              data: str = "auto", data_dir: str | None = None, download: bool = True,
              warn: Callable[[str], None] | None = None, batch_size: int | None = None, seed: int = 0,
              dtype: str = "float32", device: str = "cpu", reference: str | None = "bptt") -> Run:
    """A :class:`Run` from names and ``key=value`` settings; every setting is validated before data are loaded.

    The held-out data are the dataset's test split ("test"; for text, the held-out tail). ``reference`` (None:
    no diagnostics) is skipped when it is the estimator being trained.
    """
    if dtype not in DTYPES:
        raise ConfigError("dtype", f"{dtype!r} is not valid; valid: {', '.join(DTYPES)}")
    rule = build_estimator(registry, estimator, settings)
    exact = build_estimator(registry, reference) if reference not in (None, estimator) else None
    config = TrainConfig.from_mapping(train_settings or {})
    model_class = registry.get("model", model).factory
    model_class.Config.from_mapping(model_settings or {})
    kind = data_kind(model_class)
    dataset = load_data(registry, data, kind=kind, data_dir=data_dir, download=download, warn=warn)
    held_out = None
    if dataset is not None:
        # The dataset actually used, so that 'auto' neither warns twice nor mixes real and generated data.
        name = dataset.name if dataset.name in registry.entries["dataset"] else data
        held_out = load_data(registry, name, kind=kind, data_dir=data_dir, download=download, warn=warn,
                             split="test")
    network = build_model(registry, model, model_settings, seed=seed, dtype=DTYPES[dtype], device=device,
                          dataset=dataset)
    if not any(p.requires_grad for p in network.parameters()):
        raise ConfigError("model", f"{model} has no trainable parameters")
    check_requires(estimator, type(rule), network, model)
    batch_size = default_batch_size(model_class) if batch_size is None else batch_size
    spec = {"estimator": {"name": estimator, "config": rule.config.to_dict()},
            "model": {"name": model, "config": network.config.to_dict()},
            "data": {"requested": data, "name": dataset.name if dataset is not None else "synthetic"},
            "batch_size": batch_size, "seed": seed, "dtype": dtype, "device": device,
            "reference": reference if exact is not None else None, "train": config.to_dict()}
    description = dataset.describe() if dataset is not None else {"name": "synthetic"}
    return Run(model=network, estimator=rule, dataset=dataset, held_out=held_out, batch_size=batch_size, seed=seed,
               config=config, spec=spec, reference=exact, data_description=description)


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


def jacobian_penalty(model, batch, state, *, weight: float,
                     generator: torch.Generator) -> tuple[dict[str, torch.Tensor], float]:
    """(∇_θ of λ·R, R) with R = ||J_G(x*)ᵀv||² / ||v||² for one v ~ N(0, I) drawn from ``generator``."""
    probe = tuple(torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device) for t in state)
    relaxation_step = relaxation_map(model, batch)
    value = {}

    def penalty() -> torch.Tensor:
        x = tuple(t.detach().requires_grad_() for t in state)
        pulled_back = torch.autograd.grad(relaxation_step(x), x, grad_outputs=probe, create_graph=True)
        value["R"] = inner(pulled_back, pulled_back) / inner(probe, probe)
        return weight * value["R"]

    return parameter_gradient(model, penalty), float(value["R"])


def validation_loss(run: Run) -> float:
    """Mean C(x*) over the same ``eval_batches`` held-out batches every time it is called."""
    data, mask = generator(run.seed, EVAL_STREAM), generator(run.seed, EVAL_MASK_STREAM)
    total = 0.0
    for _ in range(run.config.eval_batches):
        batch = draw_batch(run.model, run.held_out, run.batch_size, data=data, mask=mask)
        with torch.no_grad():
            total += float(run.model.cost(free_phase(run.model, batch).state, batch))
    return total / run.config.eval_batches


def save_checkpoint(path: Path, run: Run, optimizer: torch.optim.Optimizer, generators: Mapping[str, torch.Generator],
                    step: int) -> None:
    state_dict = getattr(run.estimator, "state_dict", None)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "spec": json.dumps(run.spec, sort_keys=True),
        "model": run.model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "schedule": {"step": step},
        "rng": {name: g.get_state() for name, g in generators.items()},
        "estimator": state_dict() if callable(state_dict) else {},
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_atomic(path, buffer.getvalue())


def load_checkpoint(path: Path, run: Run, optimizer: torch.optim.Optimizer,
                    generators: Mapping[str, torch.Generator]) -> int:
    """Restore ``run``, ``optimizer`` and ``generators`` from ``path``; return the step it was taken after."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise EpxError(f"{path}: not a readable epx checkpoint ({type(exc).__name__}: {exc}); delete the run "
                       "directory or choose another --out") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise EpxError(f"{path}: not an {CHECKPOINT_FORMAT} checkpoint")
    if json.loads(payload["spec"]) != run.spec:
        raise EpxError(f"{path} was written by a different run; resume with the options in "
                       f"{path.parent / RUN_FILE}, or choose another --out")
    run.model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    for name, g in generators.items():
        g.set_state(payload["rng"][name])
    load_state = getattr(run.estimator, "load_state_dict", None)
    if callable(load_state):
        load_state(payload["estimator"])
    return int(payload["schedule"]["step"])


def _read_log(path: Path, upto: int) -> list[dict[str, Any]]:
    """The records of steps ≤ ``upto``: later ones belong to steps the resumed run will redo. A line cut short
    by a kill is skipped."""
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step", 0) <= upto:
                records.append(record)
    return records


def train(run: Run, *, directory: Path | None = None, resume: bool = False,
          progress: Progress | None = None) -> list[dict[str, Any]]:
    """Train ``run.model`` with ``run.estimator``; return every log record (see the module docstring)."""
    progress = progress or Progress()
    config, model = run.config, run.model
    optimizer = make_optimizer(model, config)
    generators = _generators(run)
    groups = parameter_groups(model)
    records: list[dict[str, Any]] = []
    start = 0
    directory = Path(directory) if directory is not None else None
    if directory is not None:
        checkpoint, log_path = directory / CHECKPOINT_FILE, directory / LOG_FILE
        if resume and checkpoint.exists():
            start = load_checkpoint(checkpoint, run, optimizer, generators)
            records = _read_log(log_path, start)
        elif resume:
            raise EpxError(f"nothing to resume: {checkpoint} does not exist")
        elif checkpoint.exists() or log_path.exists():
            raise EpxError(f"{directory} already holds a run; pass --resume to continue it, or choose another --out")
        write_atomic(directory / RUN_FILE, json.dumps({"format": RUN_FORMAT, **run.spec,
                                                       "dataset": run.data_description,
                                                       "environment": environment()}, indent=2) + "\n")
        write_atomic(log_path, "".join(json.dumps(r) + "\n" for r in records))
        log = log_path.open("a")
    else:
        log = None

    def emit(record: dict[str, Any]) -> None:
        record = jsonable(record)  # a loss that overflowed is logged as null, not as invalid JSON
        records.append(record)
        if log is not None:
            log.write(json.dumps(record, allow_nan=False) + "\n")
            log.flush()
        progress.on_record(record)

    try:
        if start == 0:
            emit({"kind": "eval", "step": 0, "val_loss": validation_loss(run)})
        for step in range(start + 1, config.steps + 1):
            emit(_train_step(run, step, optimizer, generators, groups))
            if step % config.eval_every == 0 or step == config.steps:
                emit({"kind": "eval", "step": step, "val_loss": validation_loss(run)})
            last = step == config.steps
            if directory is not None and (step % config.checkpoint_every == 0 or last or progress.stop.is_set()):
                save_checkpoint(directory / CHECKPOINT_FILE, run, optimizer, generators, step)
                emit({"kind": "checkpoint", "step": step})
            if progress.stop.is_set() and not last:
                raise Stopped(step, directory)
    finally:
        if log is not None:
            log.close()
    return records


def _train_step(run: Run, step: int, optimizer: torch.optim.Optimizer, generators: Mapping[str, torch.Generator],
                groups: Mapping[str, list[str]]) -> dict[str, Any]:
    model, config = run.model, run.config
    started = time.perf_counter()
    batch = draw_batch(model, run.dataset, run.batch_size, data=generators["data"], mask=generators["mask"])
    try:
        estimate = run.estimator.estimate(model, batch, generator=generators["estimator"])
    except EpxError as exc:
        raise EpxError(f"training step {step}: {exc}. If the loss or the residual grew over the previous steps "
                       "(see the log), training has pushed the model out of its stable regime: lower --lr") from exc
    record: dict[str, Any] = {"kind": "train", "step": step, "lr": learning_rate(config, step),
                              "ms": 1000 * (time.perf_counter() - started)}
    broken = [name for name, g in estimate.grads.items() if not bool(torch.isfinite(g).all())]
    if broken:
        raise EpxError(f"step {step}: {type(run.estimator).name} returned non-finite gradients for "
                       f"{', '.join(broken)}; lower --lr or the model's eps")
    if estimate.fixed_point is not None:
        with torch.no_grad():
            record["loss"] = float(model.cost(estimate.fixed_point, batch))
    if "residual" in estimate.stats:
        record["residual"] = estimate.stats["residual"]
    if run.reference is not None and config.diagnose_every and step % config.diagnose_every == 0:
        exact = run.reference.estimate(model, batch, generator=generator(run.seed, PROBE_STREAM))
        metrics = gradient_metrics(estimate.grads, exact.grads, groups)
        record["diagnostic"] = {"cosine": metrics["cosine"], "groups": metrics["groups"],
                                "rel_error": metrics["rel_error"], "reference_residual": exact.stats.get("residual")}
        if estimate.fixed_point is not None:
            stability = fixed_point_stability(model, batch, estimate.fixed_point,
                                              generator=generator(run.seed, PROBE_STREAM))
            record["diagnostic"]["spectral_radius"] = stability["spectral_radius"]
    grads = estimate.grads
    if config.jacobian_penalty and estimate.fixed_point is not None:
        penalty_grads, record["jacobian"] = jacobian_penalty(model, batch, estimate.fixed_point,
                                                             weight=config.jacobian_penalty,
                                                             generator=generators["penalty"])
        grads = {name: g + penalty_grads[name] for name, g in grads.items()}
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.grad = grads[name].to(dtype=p.dtype)
    record["grad_norm"] = clip_groups(model, config.clip)
    for group in optimizer.param_groups:
        group["lr"] = record["lr"]
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return record
