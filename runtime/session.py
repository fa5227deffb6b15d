"""A compiled `.dl` program with its parameters: the training step and the evaluation program.

    s = Session("examples/mlp.dl")
    report = s.fit()              # train with the file's settings, then test
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compiler.api import rng_seed
from compiler.bounds import index_reads
from compiler.driver import Executable, build, example_args, optimize
from compiler.lower import Lowerer, OptimizerSpec
from compiler.optim import bias_corrections
from compiler.passes import Context
from compiler.shapes import DTYPES
from dsl import ast as A
from dsl.diagnostics import DlcError
from dsl.parser import parse_file

from . import checkpoint, data, metrics
from .initializers import initialize

DEFAULTS = {"batch": 32, "epochs": 10, "seed": 0}       # metrics: the loss's (runtime/metrics.py)


@dataclass
class Options:
    dtype: str = "f32"
    fuse: bool = True
    epochs: int | None = None
    batch: int | None = None
    lr: float | None = None
    seed: int | None = None
    temperature: float = 0.0        # decoding in evaluation: 0 greedy, > 0 sampling
    threads: int | None = None      # BLAS threads while running (None: the library's default)
    train: bool = True              # False: compile the evaluation program only (predict)


def _literal_setting(lowerer: Lowerer, train: A.TrainDef, name: str):
    """A setting needed before lowering (the seed splits the data), when it is a compile-time
    integer such as `seed = 2 * 3`; lowering reports any other value."""
    from compiler.lower import Frame
    for st in train.body:
        if isinstance(st, A.Assign) and st.name == name:
            v = lowerer.eval(st.value, Frame({}, {}, "", "train", None))
            return v if isinstance(v, int) and not isinstance(v, bool) else None
    return None


class Session:
    def __init__(self, path: str | Path, options: Options | None = None):
        self.path = Path(path)
        self.opt = options or Options()
        t0 = time.perf_counter()
        self.module = parse_file(self.path)
        self.lowerer = Lowerer(self.module, self.opt.dtype)
        if not self.lowerer.trains:
            raise DlcError("this file has no `train` block, so there is nothing to run", self.module.loc,
                           ["`dlc check` type-checks a file without one"])
        train = self.lowerer.trains[0]
        seed = self.opt.seed if self.opt.seed is not None else _literal_setting(self.lowerer, train, "seed")
        self.seed = int(seed) if seed is not None else DEFAULTS["seed"]
        self.dataset = data.load(train.data, self.path.parent, self.seed, self.opt.dtype)
        eval_lowerer = Lowerer(self.module, self.opt.dtype, training=False, temperature=self.opt.temperature)
        self.eval_program = eval_lowerer.lower_train(eval_lowerer.trains[0], self.dataset.fields())
        self.program = self.lowerer.lower_train(train, self.dataset.fields()) if self.opt.train else self.eval_program
        self.index_reads = index_reads(self.eval_program.graph) + (index_reads(self.program.graph) if self.opt.train else [])
        for split in (self.dataset.train, self.dataset.test):
            data.check_indices(self.index_reads, split, data.describe(train.data), train.data.loc)
        s = self.program.settings
        self.settings = {**DEFAULTS, **{k: v for k, v in s.items() if k != "loss"}}
        self.settings["seed"] = self.seed
        user_defs = {k: f for k, f in self.lowerer.funcs.items() if f.loc.file in self.lowerer.user_files}
        self.task = metrics.task_of(train, user_defs, self.dataset.train)
        self.settings.setdefault("metrics", self.task.defaults)
        metrics.check(self.task, self.settings["metrics"], self.program.setting_locs.get("metrics"))
        for k in ("epochs", "batch"):
            if getattr(self.opt, k) is not None:
                self.settings[k] = getattr(self.opt, k)
        spec = self.settings.get("optimizer") or OptimizerSpec("sgd", 0.01)
        if self.opt.lr is not None:
            spec = OptimizerSpec(**{**spec.__dict__, "lr": self.opt.lr})
        self.optimizer = spec
        self.lower_seconds = time.perf_counter() - t0
        self.params_info = self.program.params
        # the evaluation program is the forward graph lowered with `training` false (dropout
        # off, batch norm on running statistics, decoders feeding back their own predictions);
        # the training step adds the backward pass and the optimizer's update
        self.eval_graph = optimize(self.eval_program.graph, "eval", Context(), self.opt.fuse)
        self.eval_ex = build(self.eval_graph)
        self.train_ex = None
        if self.opt.train:
            ctx = Context(params={k: v.node for k, v in self.params_info.items()}, optimizer=spec)
            self.train_graph = optimize(self.program.graph, "train", ctx, self.opt.fuse)
            self.train_ex = build(self.train_graph)
        self.params, self.state = self._init_params()
        self.step_count = 0
        self._compile()
        self.compile_seconds = time.perf_counter() - t0

    # ---- setup ----------------------------------------------------------------------------------
    def _init_params(self):
        rng = np.random.default_rng(self.seed)
        params = {}
        for name, info in self.params_info.items():
            params[name] = initialize(info.init, info.shape, DTYPES[info.dtype], rng, info.loc)
        state = {}          # the model's own state (running statistics), then the optimizer's
        for name, info in self.program.states.items():
            state[name] = initialize(info.init, info.shape, DTYPES[info.dtype], rng, info.loc)
        for (name, kind, shape, dtype) in (self.train_ex.inputs if self.train_ex else []):
            if kind == "state" and name not in state:
                state[name] = np.zeros(shape, DTYPES[dtype])
        return params, state

    def _compile(self):
        b = int(self.settings["batch"])
        exes = [ex for ex in (self.train_ex, self.eval_ex) if ex is not None]
        for ex in exes:
            ex.compile_for(example_args(ex, {"B": b}))
        self.cache_hit = all(ex.cache_hit for ex in exes)

    def _args(self, ex: Executable, batch: dict, scalars: dict | None = None) -> list:
        args = []
        for name, kind, shape, dtype in ex.inputs:
            if kind == "data":
                args.append(batch[name])
            elif kind == "param":
                args.append(self.params[name])
            elif kind == "state":
                args.append(self.state[name])
            else:
                args.append(DTYPES[dtype](scalars[name]))
        return args

    # ---- running ---------------------------------------------------------------------------------
    def train_step(self, batch: dict) -> tuple[float, np.ndarray]:
        self.step_count += 1
        sc = {"lr": self.optimizer.lr, "rng": self.rng_seed(self.step_count),
              **bias_corrections(self.optimizer, self.step_count)}
        res = dict(zip(self.train_ex.outputs, self.train_ex(*self._args(self.train_ex, batch, sc))))
        return float(res["loss"]), res["output"]

    def rng_seed(self, step: int) -> int:
        """The random stream of a step: a function of the run's seed and the step number."""
        return rng_seed(self.seed, step)

    def evaluate(self, split: dict, batch_size: int = 512) -> dict:
        n = len(next(iter(split.values())))
        if n == 0:
            return {}
        total, acc = 0.0, metrics.Accumulator(self.task, self.settings["metrics"])
        for s in range(0, n, batch_size):
            b = {k: np.ascontiguousarray(v[s:s + batch_size]) for k, v in split.items()}
            res = self.run_eval(b)
            total += float(res["loss"]) * len(b["x"] if "x" in b else next(iter(b.values())))
            acc.add(res["output"], b)
        return {"loss": total / n, **acc.result()}

    def run_eval(self, batch: dict, step: int = 0) -> dict:
        """The evaluation program on one batch: {"loss", "output", "output2", ...}."""
        sc = {"rng": self.rng_seed(step)}
        return dict(zip(self.eval_ex.outputs, self.eval_ex(*self._args(self.eval_ex, batch, sc))))

    def fit(self, progress: bool = True, log=None) -> dict:
        """Train for the configured epochs; return the final report."""
        from threadpoolctl import threadpool_limits
        if self.opt.threads is None:
            return self._fit(progress, log)
        with threadpool_limits(self.opt.threads):
            return self._fit(progress, log)

    def _fit(self, progress: bool, log) -> dict:
        from tqdm import tqdm
        log = log or (lambda s: tqdm.write(s, file=sys.stderr))
        train = self.dataset.train
        n = len(train["x"])
        batch, epochs = int(self.settings["batch"]), int(self.settings["epochs"])
        rng = np.random.default_rng(self.seed + 1)
        step_times, history = [], []
        t_train = time.perf_counter()
        ep_metrics = {}
        first = self.step_count // math.ceil(n / batch)     # a resumed run goes on counting epochs
        for ep in range(first, first + epochs):
            perm = rng.permutation(n)
            total, t_ep = 0.0, time.perf_counter()
            acc = metrics.Accumulator(self.task, self.settings["metrics"])
            bar = tqdm(range(0, n, batch), desc=f"epoch {ep + 1}/{first + epochs}", leave=False, file=sys.stderr,
                       disable=not (progress and sys.stderr.isatty()), unit="batch")
            for s in bar:
                idx = perm[s:s + batch]
                b = {k: np.ascontiguousarray(v[idx]) for k, v in train.items()}
                t0 = time.perf_counter()
                loss, out = self.train_step(b)
                step_times.append(time.perf_counter() - t0)
                if not math.isfinite(loss):
                    raise DlcError(f"the loss became {loss} at epoch {ep + 1}, step {self.step_count}; "
                                   "try a smaller learning rate", self.program.setting_locs.get("optimizer"))
                total += loss * len(idx)
                acc.add(out, b)
            ep_metrics = {"loss": total / n, **acc.result()}
            test = self.evaluate(self.dataset.test)
            history.append({"epoch": ep + 1, "train": ep_metrics, "test": test})
            if progress:
                msg = f"epoch {ep + 1:>3}/{first + epochs}  loss {ep_metrics['loss']:.4f}" + metrics.text(ep_metrics)
                if test:
                    msg += f"  test_loss {test['loss']:.4f}" + metrics.text(test, "test_")
                msg += f"  ({time.perf_counter() - t_ep:.2f}s)"
                log(msg)
        train_seconds = time.perf_counter() - t_train
        return {
            "model": self.program.model,
            "test": self.evaluate(self.dataset.test),
            "train": ep_metrics,
            "epochs": epochs,
            "steps": self.step_count,
            "compile_seconds": round(self.compile_seconds, 3),
            "train_seconds": round(train_seconds, 3),
            "step_ms": round(1000 * float(np.median(step_times)), 4) if step_times else None,
            "kernel_cache_hit": self.cache_hit,
            "parameters": int(sum(p.size for p in self.params.values())),
            "seed": self.seed,
        }

    # ---- checkpoints -----------------------------------------------------------------------------
    def save(self, path) -> None:
        checkpoint.save(path, self.params, self.state, {"step": self.step_count, "model": self.program.model,
                                                        "optimizer": self.optimizer.name})

    def load(self, path) -> None:
        params, state, meta = checkpoint.load(path)
        missing = sorted(set(self.params) - set(params))
        if missing:
            raise DlcError(f"checkpoint {path} lacks parameters: {', '.join(missing)}")
        for k, v in params.items():
            if k not in self.params:
                raise DlcError(f"checkpoint {path} has parameter `{k}`, which this model does not")
            if v.shape != self.params[k].shape:
                raise DlcError(f"checkpoint parameter `{k}` is {list(v.shape)}, the model's is {list(self.params[k].shape)}")
            self.params[k][...] = v
        for k, v in state.items():
            if k in self.state and v.shape == self.state[k].shape:
                self.state[k][...] = v
        self.step_count = int(meta.get("step", 0)) if set(state) == set(self.state) else 0
