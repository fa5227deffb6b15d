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

from compiler.driver import Executable, build, compile_programs, example_args, optimize
from compiler.lower import Lowerer, OptimizerSpec
from compiler.optim import bias_corrections
from compiler.passes import Context
from compiler.shapes import DTYPES
from dsl import ast as A
from dsl.diagnostics import DlcError
from dsl.parser import parse_file

from . import checkpoint, data
from .initializers import initialize

DEFAULTS = {"batch": 32, "epochs": 10, "seed": 0, "metrics": ["accuracy", "loss"]}


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


def _literal_setting(train: A.TrainDef, name: str):
    for st in train.body:
        if isinstance(st, A.Assign) and st.name == name and isinstance(st.value, A.Number):
            return st.value.value
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
        seed = self.opt.seed if self.opt.seed is not None else _literal_setting(train, "seed")
        self.seed = int(seed) if seed is not None else DEFAULTS["seed"]
        t1 = time.perf_counter()
        self.dataset = data.load(train.data, self.path.parent, self.seed)
        self.data_seconds = time.perf_counter() - t1
        eval_lowerer = Lowerer(self.module, self.opt.dtype, training=False, temperature=self.opt.temperature)
        self.eval_program = eval_lowerer.lower_train(eval_lowerer.trains[0], self.dataset.fields())
        self.program = self.lowerer.lower_train(train, self.dataset.fields()) if self.opt.train else self.eval_program
        s = self.program.settings
        self.settings = {**DEFAULTS, **{k: v for k, v in s.items() if k != "loss"}}
        self.settings["seed"] = self.seed
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
        t1 = time.perf_counter()
        self.eval_graph = optimize(self.eval_program.graph, "eval", Context(), self.opt.fuse)
        self.passes_seconds = time.perf_counter() - t1
        self.eval_ex = build(self.eval_graph)
        self.train_ex = None
        if self.opt.train:
            ctx = Context(params={k: v.node for k, v in self.params_info.items()}, optimizer=spec)
            t1 = time.perf_counter()
            self.train_graph = optimize(self.program.graph, "train", ctx, self.opt.fuse)
            self.passes_seconds += time.perf_counter() - t1
            self.train_ex = build(self.train_graph)
        self.params, self.state = self._init_params()
        self.step_count = 0
        self._compile()
        self.compile_seconds = time.perf_counter() - t0

    def compile_report(self) -> dict:
        """Where the compile time went (seconds: parsing and lowering, passes, code generation,
        Numba; loading the data is apart), and the kernels of both programs: call sites, and
        distinct kernels (each compiled once)."""
        exes = [ex for ex in (self.train_ex, self.eval_ex) if ex is not None]
        return {"front_end": round(self.lower_seconds - self.data_seconds, 3), "data": round(self.data_seconds, 3),
                "passes": round(self.passes_seconds, 3),
                "codegen": round(sum(ex.codegen_seconds for ex in exes), 3),
                "numba": round(sum(ex.numba_seconds for ex in exes), 3),
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
        for (name, kind, shape, dtype) in (self.train_ex.inputs if self.train_ex else []):
            if kind == "state" and name not in state:
                state[name] = np.zeros(shape, DTYPES[dtype])
        return params, state

    def _compile(self):
        b = int(self.settings["batch"])
        exes = [ex for ex in (self.train_ex, self.eval_ex) if ex is not None]
        compile_programs([(ex, example_args(ex, {"B": b})) for ex in exes])
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
        return (self.seed * 0x9E3779B1 + step * 0x85EBCA77) & 0x7FFFFFFFFFFFFFFF

    def evaluate(self, split: dict, batch_size: int = 512) -> dict:
        n = len(next(iter(split.values())))
        if n == 0:
            return {}
        total, outs = 0.0, []
        for s in range(0, n, batch_size):
            b = {k: np.ascontiguousarray(v[s:s + batch_size]) for k, v in split.items()}
            res = self.run_eval(b)
            total += float(res["loss"]) * len(b["x"] if "x" in b else next(iter(b.values())))
            outs.append(res["output"])
        out = np.concatenate(outs)
        return self._metrics(total / n, out, split.get("y"))

    def run_eval(self, batch: dict, step: int = 0) -> dict:
        """The evaluation program on one batch: {"loss", "output", "output2", ...}."""
        sc = {"rng": self.rng_seed(step)}
        return dict(zip(self.eval_ex.outputs, self.eval_ex(*self._args(self.eval_ex, batch, sc))))

    def _metrics(self, loss, out, y) -> dict:
        m = {"loss": loss}
        if y is not None and y.dtype.kind in "iu" and out.ndim == y.ndim + 1:
            m.update(label_metrics(out, y, self.settings["metrics"]))
        return m

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
        for ep in range(epochs):
            perm = rng.permutation(n)
            total, t_ep, outs, ys = 0.0, time.perf_counter(), [], []
            bar = tqdm(range(0, n, batch), desc=f"epoch {ep + 1}/{epochs}", leave=False, file=sys.stderr,
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
                if "y" in b and b["y"].dtype.kind in "iu" and out.ndim == b["y"].ndim + 1:
                    outs.append(out.argmax(-1))
                    ys.append(b["y"])
            ep_metrics = {"loss": total / n}
            if outs:
                ep_metrics.update(label_metrics(np.concatenate(outs), np.concatenate(ys), self.settings["metrics"],
                                                predicted=True))
            test = self.evaluate(self.dataset.test)
            history.append({"epoch": ep + 1, "train": ep_metrics, "test": test})
            if progress:
                msg = f"epoch {ep + 1:>3}/{epochs}  loss {ep_metrics['loss']:.4f}"
                if "accuracy" in ep_metrics:
                    msg += f"  acc {ep_metrics['accuracy']:.4f}"
                if test:
                    msg += f"  test_loss {test['loss']:.4f}"
                    if "accuracy" in test:
                        msg += f"  test_acc {test['accuracy']:.4f}"
                    if "exact" in test:
                        msg += f"  test_exact {test['exact']:.4f}"
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
            "compile": self.compile_report(),
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


def label_metrics(out: np.ndarray, y: np.ndarray, wanted, predicted: bool = False) -> dict:
    """Accuracy against integer labels; negative labels (padding) are skipped. For sequence
    labels [N, T] also the exact-match rate: every labelled position of a sequence right."""
    pred = out if predicted else out.argmax(-1)
    mask = y >= 0
    m = {}
    if "accuracy" in wanted and mask.any():
        m["accuracy"] = float((pred[mask] == y[mask]).mean())
    if y.ndim >= 2 and ("exact" in wanted or "accuracy" in wanted):
        right = (pred == y) | ~mask
        m["exact"] = float(right.reshape(len(y), -1).all(axis=1).mean())
    return m
