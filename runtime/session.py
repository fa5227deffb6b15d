"""A compiled `.dl` program with its parameters: the training step and the evaluation program.

    s = Session("examples/mlp.dl")
    report = s.fit()              # train with the file's settings, then test
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compiler.api import rng_seed
from compiler.driver import (DTYPES, Executable, Lowerer, Phase, SchedulePlan, ScheduleSpec, build, compile_programs,
                             example_args, index_reads, literal_setting, optimize_eval, optimize_phase, prepare,
                             resolve_target, step_scalars)
from dsl import ast as A
from dsl.diagnostics import DlcError
from dsl.parser import parse_file

from . import checkpoint, data, device, distributed, metrics, numerics, resources, threads
from .history import EarlyStopping, History
from .initializers import initialize

DEFAULTS = {"batch": 32, "epochs": 10, "seed": 0}       # metrics: the loss's (runtime/metrics.py)
EVAL_BATCH = 512                                        # examples per call of the evaluation program


@dataclass
class Options:
    dtype: str = "f32"
    fuse: bool = True
    epochs: int | None = None
    batch: int | None = None
    lr: float | None = None
    seed: int | None = None
    temperature: float = 0.0        # decoding in evaluation: 0 greedy, > 0 sampling
    threads: int | None = None      # at most this many cores (None: all; runtime/threads.py decides)
    train: bool = True              # False: compile the evaluation program only (predict)
    schedule: str | None = None     # --schedule NAME (with --warmup E): every phase's lr schedule
    warmup: float | None = None
    clip_norm: float | None = None  # --clip-norm / --clip-value: every phase's gradient clipping
    clip_value: float | None = None
    patience: int | None = None     # --patience N: stop after N epochs without a better validation metric
    monitor: str | None = None      # --monitor METRIC: the validation metric watched (default: the loss)
    save_best: str | None = None    # --save-best PATH: checkpoint the best epoch (by the monitored metric)
    log_path: str | None = None     # --log run.jsonl: one JSON line per epoch
    check_numerics: bool = False    # watch every step for NaNs and divergence, not only the first
    target: str = "cpu"             # --target cpu | cuda | auto (CUDA when numba.cuda sees a GPU)
    eval_beside: bool = False       # compile the evaluation program beside the first training steps
                                    # (`dlc run`, which trains, then evaluates; see Session._compile)


def _setting_loc(train: A.TrainDef, name: str):
    return next((st.value.loc for st in train.body if isinstance(st, A.Assign) and st.name == name), train.loc)


class Tensors(dict):
    """Parameters or state by name. Steps keep their argument lists from call to call (the
    arrays are updated in place); storing or removing a name counts in `version`, which tells
    them to gather the arrays again."""
    version = 0

    def __setitem__(self, k, v):
        super().__setitem__(k, v)
        self.version += 1

    def __delitem__(self, k):
        super().__delitem__(k)
        self.version += 1

    def update(self, *a, **kw):
        super().update(*a, **kw)
        self.version += 1

    def pop(self, *a):
        self.version += 1
        return super().pop(*a)

    def setdefault(self, k, v=None):
        self.version += 1
        return super().setdefault(k, v)

    def clear(self):
        super().clear()
        self.version += 1


class _BatchCheck:
    """A program's data inputs as it was compiled for them: every array of a batch must have
    their dtype, rank and fixed sizes, and one size for each symbolic dimension (the batch),
    before a kernel indexes it (a wrong shape would read past the array's end)."""

    def __init__(self, ex: Executable):
        self.spec = [(name, tuple(shape), np.dtype(DTYPES[dtype]), dtype)
                     for name, kind, shape, dtype in ex.inputs if kind == "data"]
        self.last = None

    def __call__(self, batch: dict) -> None:
        try:
            key = [(batch[name].shape, batch[name].dtype) for name, *_ in self.spec]
        except (KeyError, AttributeError):
            key = None
        if key is not None and key == self.last:
            return
        from compiler.api import check_shape      # the sizes' rule (symbolic dims bind on first use)
        sizes = {}
        for name, shape, dt, code in self.spec:
            a = batch.get(name)
            want = "[" + ", ".join(str(d) for d in shape) + f"] {dt}"
            if not hasattr(a, "shape") or not hasattr(a, "dtype"):
                raise DlcError(f"the batch has no array `{name}`; the program reads `{name}` as {want}")
            try:
                if a.dtype != dt:
                    raise ValueError
                check_shape(name, a.shape, shape, code, sizes)
            except ValueError:
                got = "[" + ", ".join(str(n) for n in a.shape) + f"] {a.dtype}"
                bound = ", ".join(f"{d} = {n}" for d, n in sizes.items())
                raise DlcError(f"`{name}` is {got}; the program reads {want}"
                               + (f" (with {bound})" if bound else "")) from None
        self.last = key


class _ArgPlan:
    """An executable's argument list with the parameter and state arrays in place, and the
    slots each call fills: data from the batch, scalars (as the program's dtype)."""

    def __init__(self, ex: Executable, params: dict, state: dict):
        self.params, self.state = params, state
        self.versions = (getattr(params, "version", None), getattr(state, "version", None))
        self.fixed, self.data, self.scalars = [None] * len(ex.inputs), [], []
        self.check = _BatchCheck(ex)
        for i, (name, kind, shape, dtype) in enumerate(ex.inputs):
            if kind == "data":
                self.data.append((i, name))
            elif kind in ("param", "state"):
                self.fixed[i] = (params if kind == "param" else state)[name]
            else:
                self.scalars.append((i, name, DTYPES[dtype]))

    def current(self, params: dict, state: dict) -> bool:
        """Still right for these dicts? (A plain dict, not Tensors, is gathered every call.)"""
        return (params is self.params and state is self.state and self.versions[0] is not None
                and self.versions[1] is not None and self.versions == (params.version, state.version))


class Session:
    PROGRESS_DELAY = 2.0        # seconds into an epoch before its progress bar appears (short epochs: none)

    def __init__(self, path: str | Path, options: Options | None = None):
        self.path = Path(path)
        self.opt = options or Options()
        t0 = time.perf_counter()
        self.module = parse_file(self.path)
        self.dist = distributed.world() if self.opt.train else None    # under mpiexec: data-parallel
        if self.dist is None:
            prepare(self.opt.target, self.opt.dtype)    # the common helpers compile beside the front end
        self.lowerer = Lowerer(self.module, self.opt.dtype, row_offsets=self.dist is not None)
        if not self.lowerer.trains:
            raise DlcError("this file has no `train` block, so there is nothing to run", self.module.loc,
                           ["`dlc check` type-checks a file without one"])
        train = self.lowerer.trains[0]
        seed = self.opt.seed if self.opt.seed is not None else literal_setting(self.lowerer, train, "seed")
        self.seed = int(seed) if seed is not None else DEFAULTS["seed"]
        if not 0 <= self.seed < 2 ** 32:       # the data split's generator takes 32 bits
            raise DlcError(f"the seed must be below 2**32 (4294967296), got {self.seed}",
                           _setting_loc(train, "seed") if self.opt.seed is None else None)
        t1 = time.perf_counter()
        self.dataset = data.load(train.data, self.path.parent, self.seed, self.opt.dtype)
        self.data_seconds = time.perf_counter() - t1
        eval_lowerer = Lowerer(self.module, self.opt.dtype, training=False, temperature=self.opt.temperature)
        self.eval_program = eval_lowerer.lower_train(eval_lowerer.trains[0], self.dataset.fields())
        self.program = self.lowerer.lower_train(train, self.dataset.fields()) if self.opt.train else self.eval_program
        self.index_reads = index_reads(self.eval_program.graph) + (index_reads(self.program.graph) if self.opt.train else [])
        for split in (self.dataset.train, self.dataset.val, self.dataset.test):
            data.check_indices(self.index_reads, split, data.describe(train.data), train.data.loc)
        s = self.program.settings
        self.settings = {**DEFAULTS, **{k: v for k, v in s.items() if k not in ("loss", "params")}}
        self.settings["seed"] = self.seed
        self.task = metrics.task_of(self.eval_program.task)
        self.settings.setdefault("metrics", self.task.defaults)
        metrics.check(self.task, self.settings["metrics"], self.program.setting_locs.get("metrics"))
        for k in ("epochs", "batch", "patience", "monitor"):
            if getattr(self.opt, k) is not None:
                self.settings[k] = getattr(self.opt, k)
        resources.check_program(self.program, int(self.settings["batch"]),
                                self.program.setting_locs.get("batch", train.loc) if self.opt.batch is None else None,
                                training=self.opt.train)
        self.phases: list[Phase] = self.program.phases
        if self.opt.lr is not None:             # --lr sets every phase's learning rate
            for ph in self.phases:
                ph.optimizer = ph.optimizer.replace(lr=self.opt.lr)
        self._override_optimizers()
        self.optimizer = self.phases[0].optimizer
        self.schedule = schedule(self.phases)
        if self.opt.train:
            self._early_stopping()              # a wrong patience/monitor/--save-best: before compiling
        self.lr_plans: dict[str, SchedulePlan] = {}          # set by fit: the run each lr schedule spans
        self.lower_seconds = time.perf_counter() - t0
        self.params_info = self.program.params
        # the evaluation program is the forward graph lowered with `training` false (dropout
        # off, batch norm on running statistics, decoders feeding back their own predictions);
        # each phase's training step adds its backward pass and its optimizer's update
        t1 = time.perf_counter()
        self.eval_graph = optimize_eval(self.eval_program.graph, self.opt.fuse)
        self.passes_seconds = time.perf_counter() - t1
        self.target = resolve_target(self.opt.target)
        if self.target == "cuda":
            device.require_gpu()
        self.eval_ex = build(self.eval_graph, self.target, compiled_step=False)
        self.train_exes: list[Executable] = []
        if self.dist is not None:
            self.dist.check_batch(int(self.settings["batch"]), self.program.setting_locs.get("batch", train.loc))
        if self.opt.train:
            for ph in self.phases:
                t1 = time.perf_counter()
                if self.dist is not None:      # a gradient and an update program, an allreduce between
                    self.train_exes += self.dist.build_phase(self.program, ph, self.opt.fuse)
                    self.passes_seconds += time.perf_counter() - t1
                    continue
                g = optimize_phase(self.program, ph, self.opt.fuse)
                self.passes_seconds += time.perf_counter() - t1
                self.train_exes.append(build(g, self.target))
        self.train_ex = self.train_exes[0] if self.train_exes else None
        self.train_graph = self.train_ex.graph if self.train_ex else None
        self.params, self.state = self._init_params()
        self._arg_plans: dict[int, _ArgPlan] = {}
        self._checks: dict[int, _BatchCheck] = {}       # the device path's batch checks
        self.last_target = None         # the last training step's output "target" (metrics: Task.computed)
        self._resumed_stopping = None   # early stopping's best epoch and wait, from a resumed checkpoint
        self.load_notes: list[str] = []  # how the loaded checkpoint's run differs from this one
        self.step_count = 0                                  # steps of every phase
        self.epoch = 0                                       # epochs done
        self.loss_history: dict[str, list[float]] = {}       # per phase: the first loss, the recent ones
        self.data_order = np.random.default_rng(self.seed + 1)  # shuffles each epoch (resumed)
        self.phase_steps = {ph.name: 0 for ph in self.phases}   # each phase's own (bias corrections)
        self._compile()
        self.compile_seconds = time.perf_counter() - t0
        # who uses the cores (runtime/threads.py): the training programs' plan from now on,
        # the evaluation program's around `evaluate`
        b = int(self.settings["batch"])
        cap = self.opt.threads or (self.dist.threads if self.dist is not None else None)
        self.core_plan = threads.plan([ex.graph for ex in self.train_exes] or [self.eval_ex.graph], {"B": b}, cap)
        self.eval_core_plan = threads.plan([self.eval_ex.graph], {"B": EVAL_BATCH}, cap)
        threads.apply(self.core_plan)
        self.tuner = threads.Tuner(self.core_plan) if self.dist is None else None

    def compile_report(self) -> dict:
        """Where the compile time went (seconds: parsing and lowering, passes, code generation,
        Numba; loading the data is apart), and the kernels of every program: call sites, and
        distinct kernels (each compiled once)."""
        exes = self.train_exes + [self.eval_ex]
        bg = getattr(self, "_eval_compile", None)
        background = {} if bg is None else {        # the evaluation program, compiled beside training
            "eval_background": round(bg.seconds, 3) if bg.done else None,   # its compile's wall time
            "eval_wait": round(bg.waited, 3) if bg.done else None}          # what evaluation waited for it
        return {**background, "front_end": round(self.lower_seconds - self.data_seconds, 3), "data": round(self.data_seconds, 3),
                "passes": round(self.passes_seconds, 3),
                "codegen": round(sum(ex.codegen_seconds for ex in exes), 3),
                "numba": round(sum(ex.numba_seconds for ex in exes), 3),
                "numba_compiled": sum(ex.numba_compiled for ex in exes),   # not loaded from the cache
                "kernels": sum(ex.kernels for ex in exes),
                "distinct_kernels": len({id(fn) for ex in exes for fn in ex.kernel_functions()})}

    # ---- setup ----------------------------------------------------------------------------------
    def _init_params(self):
        rng = np.random.default_rng(self.seed)
        params = {}
        for name, info in self.params_info.items():
            params[name] = initialize(info.init, info.shape, DTYPES[info.dtype], rng, info.loc)
        state = {}          # the model's own state (running statistics), then the optimizer's
        for name, info in self.program.states.items():
            state[name] = initialize(info.init, info.shape, DTYPES[info.dtype], rng, info.loc)
        for ex in self.train_exes:
            for (name, kind, shape, dtype) in ex.inputs:
                if kind == "state" and name not in state:
                    state[name] = np.zeros(shape, DTYPES[dtype])
        tgt = self.eval_ex.target          # on a GPU: kept on the device, read back on demand
        if tgt.name == "cpu":               # steps keep their argument lists (Tensors counts changes)
            return Tensors(params), Tensors(state)
        return device.on_target(params, tgt), device.on_target(state, tgt)

    def _override_optimizers(self):
        """--schedule/--warmup and --clip-norm/--clip-value apply to every phase's optimizer."""
        o = self.opt
        for ph in self.phases:
            spec, changes = ph.optimizer, {}
            if o.schedule is not None or o.warmup is not None:
                base = spec.schedule or ScheduleSpec.make("constant")
                name = o.schedule or base.name
                keep = {k: v for k, v in base.options if k != "warmup"} if name == base.name else {}
                warm = o.warmup if o.warmup is not None else dict(base.options)["warmup"]
                changes["schedule"] = ScheduleSpec.make(name, **keep, warmup=warm)
            if o.clip_norm is not None:
                changes["clip_norm"] = o.clip_norm
            if o.clip_value is not None:
                changes["clip_value"] = o.clip_value
            if changes:
                ph.optimizer = spec.replace(**changes)

    def _early_stopping(self) -> EarlyStopping:
        """From `patience`/`monitor` (train block or flags); the monitored metric must be one the
        validation split reports."""
        monitor, patience = self.settings.get("monitor", "loss"), int(self.settings.get("patience", 0))
        monitor = monitor.removeprefix("val_")
        if monitor == "loss" and self.phases[0].name:
            monitor = self.phases[0].output
        offered = [ph.output for ph in self.phases] + [m for m in self.settings["metrics"] if m != "loss"]
        if monitor not in offered:
            raise DlcError(f"cannot monitor `{monitor}`: the validation split reports {', '.join(offered)}",
                           self.program.setting_locs.get("monitor"))
        if (patience or self.opt.save_best) and not any(len(v) for v in self.dataset.val.values()):
            raise DlcError("early stopping and --save-best watch a validation split: give the data source "
                           "`val = 0.1`", self.program.setting_locs.get("patience") or self.lowerer.trains[0].data.loc)
        return EarlyStopping(monitor, patience)

    def _plan_schedules(self, n: int, batch: int, epochs: int) -> None:
        """Lay each phase's lr schedule over the run: its steps per epoch (its share of the
        batches) and its steps in all, from the first epoch (a resumed run included)."""
        batches = math.ceil(n / batch)
        for i, ph in enumerate(self.phases):
            per_epoch = max(1, round(batches * self.schedule.count(i) / len(self.schedule)))
            self.lr_plans[ph.name] = SchedulePlan(per_epoch, per_epoch * epochs)

    def lr(self, phase: Phase) -> float:
        """The learning rate the phase's next step uses."""
        return step_scalars(phase.optimizer, self.phase_steps[phase.name] + 1, self.lr_plans.get(phase.name))["lr"]

    def _compile(self):
        """Compile the training steps and the evaluation program. With `Options.eval_beside`
        (`dlc run`: it trains first) the compile workers take the evaluation program's kernels
        last and this process returns once the training steps are compiled: the evaluation
        program goes on compiling beside the first training steps, on the core a training step
        leaves idle; `run_eval` waits for what is left of it, compiling beside the workers
        (`compile_report`: `eval_background`, `eval_wait`)."""
        b = int(self.settings["batch"])
        exes = self.train_exes + [self.eval_ex]
        jobs = [(ex, example_args(ex, {"B": b})) for ex in exes]
        self._eval_compile = None
        if self.dist is not None:           # one rank per machine compiles, the others load its kernels
            self.dist.in_turn(lambda: compile_programs(jobs))
        elif self.train_exes and self.opt.eval_beside:
            self._eval_compile = compile_programs(jobs[:-1], later=jobs[-1:])
        else:
            compile_programs(jobs)
        self.cache_hit = all(ex.cache_hit for ex in exes)

    def eval_compiling(self) -> bool:
        """Is the evaluation program being compiled in the background?"""
        bg = getattr(self, "_eval_compile", None)
        return bg is not None and not bg.done

    def eval_ready(self) -> float:
        """Wait for the evaluation program's compile (see `_compile`); the seconds waited."""
        bg = getattr(self, "_eval_compile", None)
        if bg is None or bg.done:
            return 0.0
        waited = bg.wait()
        self.compile_seconds += waited           # the compile time a run waited for, all of it
        return waited

    def _args(self, ex: Executable, batch: dict, scalars: dict | None = None) -> list:
        """The executable's arguments. On the CPU its parameter and state arrays are kept from call
        to call (they are updated in place); only the batch and the scalars are filled in."""
        if isinstance(self.params, device.DeviceArrays) or isinstance(self.state, device.DeviceArrays):
            check = self._checks.get(id(ex))
            if check is None:
                check = self._checks[id(ex)] = _BatchCheck(ex)
            check(batch)
            args = []
            for name, kind, shape, dtype in ex.inputs:
                if kind == "data":
                    args.append(batch[name])
                elif kind == "param":
                    args.append(self.params.device(name) if isinstance(self.params, device.DeviceArrays)
                                else self.params[name])
                elif kind == "state":
                    args.append(self.state.device(name) if isinstance(self.state, device.DeviceArrays)
                                else self.state[name])
                else:
                    args.append(DTYPES[dtype](scalars[name]))
            return args
        plan = self._arg_plans.get(id(ex))
        if plan is None or not plan.current(self.params, self.state):
            plan = self._arg_plans[id(ex)] = _ArgPlan(ex, self.params, self.state)
        plan.check(batch)
        args = plan.fixed.copy()
        for i, name in plan.data:
            args[i] = batch[name]
        for i, name, make in plan.scalars:
            args[i] = make(scalars[name])
        return args

    # ---- running ---------------------------------------------------------------------------------
    @property
    def next_phase(self) -> int:
        """The phase the schedule runs at the next step (an index into `phases`)."""
        return self.schedule[self.step_count % len(self.schedule)]

    @property
    def kernels(self) -> int:
        return sum(ex.kernels for ex in self.train_exes)

    def train_step(self, batch: dict) -> tuple[float, np.ndarray]:
        """One step of the phase the schedule is at: its loss and the model's output. While
        watched (the first steps, or `check_numerics`), a step that makes a NaN or diverges
        raises a DlcError naming the op and line, or the divergence."""
        i = self.next_phase
        ph, ex = self.phases[i], self.train_exes[i]
        self.step_count += 1
        self.phase_steps[ph.name] += 1
        sc = {"rng": self.rng_seed(self.step_count), **step_scalars(ph.optimizer, self.phase_steps[ph.name],
                                                                  self.lr_plans.get(ph.name))}
        watched = self.opt.check_numerics or self.step_count <= numerics.WATCH_STEPS
        snapshot = ({k: v.copy() for k, v in self.params.items()},
                    {k: v.copy() for k, v in self.state.items()}) if watched else None
        if self.dist is None:
            args = self._args(ex, batch, sc)
            self.tuner.start()
            out = ex(*args)
            if self.tuner.stop() is not None:          # measured: the faster pool size from now on
                self.core_plan = dataclasses.replace(self.core_plan, threads=self.tuner.chosen)
            res = dict(zip(ex.outputs, out))
            for arrays in (self.params, self.state):
                if isinstance(arrays, device.DeviceArrays):
                    arrays.written()
            loss = float(res["loss"])
        else:                               # this rank's rows; the loss of the global batch
            res, loss = self.dist.step(self, i, batch, sc)
        self.last_target = res.get("target")     # where the loss compares with an expression: its value
        history = self.loss_history.setdefault(ph.name, [])
        if not math.isfinite(loss):
            raise numerics.explain_nonfinite(self, i, loss, self.step_count, self.epoch + 1, snapshot, batch, sc,
                                             history)
        history.append(loss)
        del history[1:-20]                  # the first loss and the recent ones
        numerics.check_loss(self, i, loss, self.step_count, history)
        if watched:
            if not all(np.isfinite(v).all() for v in self.params.values()):     # a finite loss, NaN gradients
                raise numerics.explain_nonfinite(self, i, loss, self.step_count, self.epoch + 1,
                                                 snapshot, batch, sc, history)
            numerics.check_update(self, i, snapshot[0], self.step_count)
        return loss, res["output"]

    def rng_seed(self, step: int) -> int:
        """The random stream of a step: a function of the run's seed and the step number."""
        return rng_seed(self.seed, step)

    def evaluate(self, split: dict, batch_size: int = EVAL_BATCH, details: bool = False):
        """The losses and metrics over a split; with `details`, also the split's full report
        (per-class precision/recall/F1 and confusion matrix, AUC, R², ...: metrics.Accumulator.report)."""
        with threads.using(self.eval_core_plan):
            return self._evaluate(split, batch_size, details)

    def _evaluate(self, split: dict, batch_size: int, details: bool):
        n = len(next(iter(split.values())))
        if n == 0:
            return ({}, {}) if details else {}
        totals = {ph.output: 0.0 for ph in self.phases}
        acc = metrics.Accumulator(self.task, self.settings["metrics"], keep=details)
        batches = []                        # (loss * examples, metric inputs) of each batch, in order
        starts = range(0, n, batch_size)
        if self.dist is not None:           # rank r runs batches r, r + N, r + 2N, ...
            starts = starts[self.dist.rank::self.dist.size]
        for s in starts:
            b = {k: np.ascontiguousarray(v[s:s + batch_size]) for k, v in split.items()}
            res = self.run_eval(b)
            one = metrics.Accumulator(self.task, self.settings["metrics"], keep=details)
            one.add(res["output"], b, res.get("target"))
            batches.append(({k: float(res[k]) * len(next(iter(b.values()))) for k in totals}, one.parts))
        if self.dist is not None:           # every rank's batches, in the order one process runs them
            batches = self.dist.gather_batches(batches)
        for sums, parts in batches:
            for k in totals:
                totals[k] += sums[k]
            acc.parts += parts
        result = {**{k: v / n for k, v in totals.items()}, **acc.result()}
        names = self.dataset.info.get("class_names") or self.dataset.info.get("vocab")
        return (result, acc.report(names)) if details else result

    def run_eval(self, batch: dict, step: int = 0) -> dict:
        """The evaluation program on one batch: {"loss", "output", "output2", ...}."""
        self.eval_ready()
        sc = {"rng": self.rng_seed(step)}
        return dict(zip(self.eval_ex.outputs, self.eval_ex(*self._args(self.eval_ex, batch, sc))))

    def fit(self, progress: bool = True, log=None) -> dict:
        """Train for the configured epochs; return the final report."""
        with threads.using(self.core_plan):
            return self._fit(progress, log)

    def _fit(self, progress: bool, log) -> dict:
        from tqdm import tqdm
        log = log or (lambda s: tqdm.write(s, file=sys.stderr))
        train = self.dataset.train
        n = len(train["x"])
        batch, epochs = int(self.settings["batch"]), int(self.settings["epochs"])
        first = self.epoch                  # a resumed run goes on counting epochs (and its log)
        step_times = []
        history = History(self.opt.log_path if self.dist is None or self.dist.lead else None, append=first > 0)
        stopper = self._stopper = self._early_stopping()
        saved = self._resumed_stopping or {}
        if saved.get("monitor") == stopper.monitor:      # the best epoch so far, and the wait, from the checkpoint
            stopper.best, stopper.best_epoch, stopper.waited = saved.get("best"), saved.get("best_epoch"), \
                int(saved.get("waited", 0))
        best = None                          # the best epoch's parameters and state (with validation)
        t_train = time.perf_counter()
        ep_metrics = {}
        self._plan_schedules(n, batch, first + epochs)
        for ep in range(first, first + epochs):
            perm = self.data_order.permutation(n)
            totals = {ph.output: [0.0, 0] for ph in self.phases}     # loss * examples, examples
            t_ep = time.perf_counter()
            lrs = {ph.output: self.lr(ph) for ph in self.phases}
            acc = metrics.Accumulator(self.task, self.settings["metrics"])
            # a live bar within the epoch, on a terminal only, once the epoch has run PROGRESS_DELAY seconds
            bar = tqdm(range(0, n, batch), desc=f"epoch {ep + 1}/{first + epochs}", leave=False, file=sys.stderr,
                       disable=not (progress and sys.stderr.isatty()), unit="batch", delay=self.PROGRESS_DELAY)
            for s in bar:
                idx = perm[s:s + batch]
                if self.dist is not None:
                    idx = self.dist.shard(idx)
                b = {k: np.ascontiguousarray(v[idx]) for k, v in train.items()}
                ph = self.phases[self.next_phase]
                t0 = time.perf_counter()
                loss, out = self.train_step(b)
                step_times.append(time.perf_counter() - t0)
                target = self.last_target
                totals[ph.output][0] += loss * len(idx)
                totals[ph.output][1] += len(idx)
                if not bar.disable and bar.n % 10 == 0:
                    bar.set_postfix_str(self.losses_text({k: t / m for k, (t, m) in totals.items() if m}), refresh=False)
                acc.add(out, b, target)
            self.epoch = ep + 1
            if self.dist is not None:       # every rank's share of the epoch; rank 0's parameters
                self.dist.reduce_epoch(totals, acc)
                self.dist.sync(self)
            ep_metrics = {k: t / m for k, (t, m) in totals.items() if m}
            ep_metrics.update(acc.result())
            val = self.evaluate(self.dataset.val)       # the test split waits for the end
            improved = stopper.update(ep + 1, val) if val else False
            if improved:
                best = ({k: v.copy() for k, v in self.params.items()}, {k: v.copy() for k, v in self.state.items()})
                if self.opt.save_best:
                    self.save(self.opt.save_best, "--save-best")
            history.add({"epoch": ep + 1, "lr": lrs if len(lrs) > 1 else lrs[self.phases[0].output],
                         "train": ep_metrics, "val": val, "seconds": round(time.perf_counter() - t_ep, 3)})
            if progress:
                msg = f"epoch {ep + 1:>3}/{first + epochs}  " + self.losses_text(ep_metrics) + metrics.text(ep_metrics)
                if val:
                    msg += "  " + self.losses_text(val, "val_") + metrics.text(val, "val_") + (" *" if improved else "")
                msg += f"  ({time.perf_counter() - t_ep:.2f}s)"
                log(msg)
            if stopper.should_stop:
                if progress:
                    log(f"early stop: val {stopper.monitor} has not improved for {stopper.patience} epochs "
                        f"(best {stopper.best:.4f} at epoch {stopper.best_epoch})")
                break
        if best is None and stopper.best_epoch is not None and stopper.best_epoch <= first and progress:
            log(f"the best epoch ({stopper.best_epoch}, val {stopper.monitor} {stopper.best:.4f}) was before this run "
                "resumed: the test is of the last epoch's model" +
                (f" ({self.opt.save_best} holds the best)" if self.opt.save_best else ""))
        if best is not None:                 # test the best epoch's model, as --save-best keeps it
            for k, v in best[0].items():
                self.params[k][...] = v
            for k, v in best[1].items():
                self.state[k][...] = v
        train_seconds = time.perf_counter() - t_train
        test, test_report = self.evaluate(self.dataset.test, 512, True)
        return {
            "model": self.program.model,
            "test": test,
            "test_report": test_report,
            "train": ep_metrics,
            "epochs": len(history.epochs),
            **({"best_epoch": stopper.best_epoch, f"best_val_{stopper.monitor}": stopper.best} if best else {}),
            "steps": self.step_count,
            **({"phase_steps": dict(self.phase_steps)} if self.phases[0].name else {}),
            "compile_seconds": round(self.compile_seconds, 3),
            "train_seconds": round(train_seconds, 3),
            "step_ms": round(1000 * float(np.median(step_times)), 4) if step_times else None,
            "kernel_cache_hit": self.cache_hit,
            "compile": self.compile_report(),
            "cores": {"train": self.core_plan.as_dict(), "eval": self.eval_core_plan.as_dict(),
                      **({"tuned": self.tuner.as_dict()} if self.tuner is not None and self.tuner.measured else {})},
            "parameters": int(sum(p.size for p in self.params.values())),
            "seed": self.seed,
            "history": history.epochs,
            **({"distributed": self.dist.report()} if self.dist is not None else {}),
        }

    def losses_text(self, metrics: dict, prefix: str = "") -> str:
        """`loss 0.1234`, or one `loss:PHASE` per phase."""
        return "  ".join(f"{prefix}{ph.output} {metrics[ph.output]:.4f}" for ph in self.phases if ph.output in metrics)

    # ---- checkpoints -----------------------------------------------------------------------------
    def save(self, path, flag: str = "--save") -> None:
        """Write a checkpoint (`flag`: the option that named the path, for its errors)."""
        if self.dist is not None and not self.dist.lead:      # rank 0 writes
            return
        checkpoint.save(path, self.params, self.state, {
            "step": self.step_count, "epoch": self.epoch, "model": self.program.model,
            "phases": {ph.name: {"optimizer": ph.optimizer.name, "step": self.phase_steps[ph.name]}
                       for ph in self.phases},
            "data_order": self.data_order.bit_generator.state,
            "data": f"{data.describe(self.lowerer.trains[0].data)}, seed {self.seed}",
            **({"early_stopping": {"monitor": st.monitor, "best": st.best, "best_epoch": st.best_epoch,
                                   "waited": st.waited}}
               if (st := getattr(self, "_stopper", None)) is not None and st.best_epoch is not None else {}),
            **({"class_names": self.dataset.info["class_names"]} if "class_names" in self.dataset.info else {})},
            flag)

    def load(self, path) -> None:
        """Parameters, state and the position of a run: a resumed run continues bit-identically.
        Every tensor must be there with the model's shape and dtype. The optimizer state and the
        step counts go together: a checkpoint of another optimizer restarts them from zero (and
        a session that does not train ignores them)."""
        params, state, meta = checkpoint.load(path)
        for k in sorted(set(self.params) - set(params)):
            raise DlcError(f"{path}: checkpoint lacks parameter `{k}`")
        for k in sorted(set(params) - set(self.params)):
            raise DlcError(f"{path}: checkpoint has parameter `{k}`, which this model does not")
        saved = meta.get("phases", {"": {"step": meta.get("step", 0)}})
        if not isinstance(saved, dict) or not all(isinstance(v, dict) for v in saved.values()):
            raise DlcError(f"{path}: metadata `phases` must map each phase to an object")
        same = all(saved.get(ph.name, {}).get("optimizer", ph.optimizer.name) == ph.optimizer.name
                   for ph in self.phases) and set(saved) == {ph.name for ph in self.phases}
        needed = set(self.state) if same else set(self.program.states)    # model state always
        for k in sorted(set(state) - set(self.state)):
            # optimizer state is ignored by a session that does not train (predict)
            if (same and self.opt.train) or k in self.program.states:
                raise DlcError(f"{path}: checkpoint has state `{k}`, which this model and optimizer do not")
        state = {k: v for k, v in state.items() if k in needed}
        for k in sorted(needed - set(state)):
            raise DlcError(f"{path}: checkpoint lacks state `{k}`")
        for k, v in params.items():
            checkpoint.check_tensor(path, "parameter", k, v, self.params[k])
        for k, v in state.items():
            checkpoint.check_tensor(path, "state", k, v, self.state[k])
        step = checkpoint.meta_int(meta, "step", path) if same else 0
        epoch = checkpoint.meta_int(meta, "epoch", path) if same else 0
        phase_steps = {ph.name: checkpoint.meta_int(saved.get(ph.name, {}), "step", path, where=f"phases.{ph.name}.")
                       if same else 0 for ph in self.phases}
        order = meta.get("data_order")
        rng = np.random.default_rng(self.seed + 1)
        if order is not None and same:
            try:
                rng.bit_generator.state = order
            except (TypeError, ValueError, KeyError) as e:
                raise DlcError(f"{path}: metadata `data_order` is not a generator state: {e}") from None
        names = meta.get("class_names")         # a text label column's classes, in the order trained
        if names is not None:
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise DlcError(f"{path}: metadata `class_names` must be a list of strings")
            mine = self.dataset.info.get("class_names")
            if mine is not None and mine != names:
                raise DlcError(f"{path}: the checkpoint was trained on the classes {', '.join(names)}; the data now "
                               f"holds {', '.join(mine)}", notes=["class ids would be read as the wrong names"])
        stopping = meta.get("early_stopping")
        if stopping is not None and not (isinstance(stopping, dict) and isinstance(stopping.get("best"), (int, float))
                                         and isinstance(stopping.get("best_epoch"), int)):
            raise DlcError(f"{path}: metadata `early_stopping` must hold a number `best` and an integer `best_epoch`")
        # what differs from the run that saved it: said, not refused (fine-tuning is a use)
        self.load_notes = []
        if not same and saved and any("optimizer" in v for v in saved.values()):
            was = ", ".join(sorted({str(v.get("optimizer")) for v in saved.values()}))
            self.load_notes.append(f"{path} was trained with {was}: its optimizer state is dropped and the "
                                   "step and epoch counts start again")
        trained_on = meta.get("data")
        here = f"{data.describe(self.lowerer.trains[0].data)}, seed {self.seed}"
        if isinstance(trained_on, str) and trained_on != here:
            self.load_notes.append(f"{path} was trained on {trained_on}; this run reads {here}: its held-out "
                                   "examples may include ones the checkpoint trained on")
        # all checked: now change the session
        self._resumed_stopping = stopping if same else None
        if names is not None:
            self.dataset.info["class_names"] = names
        for k, v in params.items():
            self.params[k][...] = v
        for k, v in state.items():
            self.state[k][...] = v
        self.step_count, self.epoch, self.phase_steps, self.data_order = step, epoch, phase_steps, rng


def schedule(phases: list[Phase]) -> list[int]:
    """One period of the phase schedule, as phase indices, one per step. Rounds r = 0, 1, ...
    run, in the block's order, each phase due in that round (r % every == 0) `steps` times;
    the period is lcm(every) rounds. Step s runs phase `period[s % len(period)]`, so the
    schedule follows from the step count alone (and resumes from a checkpoint)."""
    rounds = math.lcm(*(ph.every for ph in phases))
    return [i for r in range(rounds) for i, ph in enumerate(phases) if r % ph.every == 0 for _ in range(ph.steps)]

