"""Data-parallel training on MPI: `mpiexec -n N dlc run FILE`.

Every rank (one process each) compiles the same program, initializes the same parameters from
the run's seed and walks the same shuffled order of the training set. Of each global batch
(the file's `batch`, unchanged) rank r takes a contiguous block of rows, as even as can be
(`shard`). A training step is then split in two compiled programs per phase:

* the **gradient program**: forward, loss and backward on the rank's rows (the step graph
  through the `grad` pipeline: d loss / d every parameter as outputs; model state such as
  batch norm's running statistics is updated in place as in a fused step);
* the **update program**: the phase's optimizer alone (clipping, weight decay, the rule), its
  inputs the parameters and the *averaged* gradients.

Between them one allreduce averages, weighted by each rank's rows, the gradients, the model
state the step updated, and the loss: with a loss that is a mean over the batch's examples
(plus terms of the parameters alone, as every dlc loss is), sum_r n_r / n * (d loss_r / d p)
is the gradient of the global batch's loss, so N ranks take the same steps as one process up
to the order of float additions. The values travel in buckets (one flat buffer each, at most
DLC_BUCKET_MB megabytes, default 4), all in flight at once (non-blocking allreduces).

Rank 0 writes checkpoints, logs, plots and the report; training metrics are reduced across
ranks at the end of each epoch. Evaluation (validation, test) shares its batches round robin
and gathers their sums in one process's order, so every rank computes one process's figures
and takes the same early-stopping decisions. Parameters and state are broadcast from rank 0
at the end of each epoch, so that ranks cannot drift apart through the reduction's rounding.

Nothing here is tied to one machine: it is plain MPI, so `mpiexec -hosts a,b -n 8 dlc run
FILE` runs on several (each host needs the same dlc, Python packages, `.dl` file and data at
the same path; only rank 0 writes files). A run outside mpiexec (or with one rank) never
imports mpi4py and is unchanged.

Random draws (dropout, `normal`, ...) are a function of the step's seed and of the element's
counter in its call site's stream; the training program of a data-parallel run is lowered
with `row_offsets`, so that a rank's rows draw the counters of their global rows (the step's
scalar `rng_row`, see `Lowerer.draw_seed`): every example gets the numbers it gets in one
process. Batch normalization normalizes over each rank's rows (as PyTorch's
DistributedDataParallel without SyncBatchNorm), so a model with it takes steps close to, not
equal to, one process's; its running statistics are averaged over the ranks at every step.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

from dsl.diagnostics import DlcError

# the compiler (and Numba) is imported where a program is built: `dlc` imports this module
# for `launched()` and `fail()`, and `dlc check` compiles nothing

# what the common launchers export: MPICH's and Intel's Hydra (PMI), Open MPI, MVAPICH
_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
_world: World | None = None


def _env_int(names) -> int | None:
    return next((int(os.environ[k]) for k in names if os.environ.get(k, "").isdigit()), None)


def launched() -> bool:
    """Whether this process is one of several that mpiexec started (read from the environment,
    without importing MPI)."""
    return (_env_int(_SIZE_VARS) or 1) > 1


def env_rank() -> int:
    return _env_int(_RANK_VARS) or 0


def world() -> World | None:
    """The MPI world when this process is one of several ranks, else None (and no MPI)."""
    global _world
    if _world is None and launched():
        try:
            from mpi4py import MPI
        except ImportError:
            raise DlcError("this run was started by mpiexec with several ranks, but mpi4py is not "
                           "installed: pip install 'dlc[mpi]'") from None
        _world = World(MPI.COMM_WORLD, MPI)
    return _world


def fail(code: int, message: str, grace: float = 3.0) -> int:
    """End a run of several ranks after an error on this one, printing the message once and
    leaving no rank waiting in a collective forever. Errors are usually the same on every rank
    (the program and data are): the failing ranks meet in a barrier of their own communicator,
    and when every rank arrives within `grace` seconds, rank 0 prints and all exit with `code`.
    A rank whose error was its own prints it and aborts the job (MPI_Abort, with `code`).
    Before MPI is started (an error found before the session), every rank exits; rank 0 prints."""
    if _world is None:
        if env_rank() == 0:
            print(message, file=sys.stderr)
        return code
    barrier, deadline = _world.errors.Ibarrier(), time.monotonic() + grace
    while not barrier.Test():
        if time.monotonic() > deadline:
            print(message if _world.rank == 0 else f"rank {_world.rank}: {message}", file=sys.stderr, flush=True)
            # MPI_Abort has mpiexec's proxies kill every rank at once, and a proxy killed before
            # it has read this rank's stderr pipe loses the message (13 runs of 60 here):
            # give it a moment to forward the line first.
            time.sleep(0.3)
            _world.comm.Abort(code)
        time.sleep(0.01)
    if _world.rank == 0:
        print(message, file=sys.stderr)
    return code


@dataclass
class _Bucket:
    buffer: np.ndarray              # flat, the reduced values of several tensors
    views: dict                     # name -> a view of `buffer` in the tensor's shape


class Reducer:
    """Weighted averages across ranks of named tensors and scalars, in flat buckets of at most
    `bucket_bytes` each: `average(values, weight)` fills the buckets with weight * value, sums
    them over ranks (every bucket's allreduce in flight at once) and divides by the sum of the
    weights. The scalars and the weight ride in the first bucket."""

    def __init__(self, comm, mpi, tensors: list[tuple[str, tuple]], scalars: list[str], dtype,
                 bucket_bytes: int):
        self.comm, self.mpi, self.dtype = comm, mpi, np.dtype(dtype)
        self.scalars = scalars
        groups: list[list] = [[("", (len(scalars) + 1,))]]       # the scalars, then the weight
        size = groups[0][0][1][0] * self.dtype.itemsize
        for name, shape in tensors:
            nbytes = math.prod(shape) * self.dtype.itemsize
            if size + nbytes > bucket_bytes:        # (a tensor larger than a bucket has its own)
                groups.append([])
                size = 0
            groups[-1].append((name, shape))
            size += nbytes
        self.buckets = []
        for group in groups:
            buf = np.zeros(sum(math.prod(s) for _, s in group), self.dtype)
            views, off = {}, 0
            for name, shape in group:
                views[name] = buf[off:off + math.prod(shape)].reshape(shape)
                off += math.prod(shape)
            self.buckets.append(_Bucket(buf, views))
        self.head = self.buckets[0].views[""]

    def average(self, values: dict, scalars: dict, weight: float) -> tuple[dict, dict]:
        """Each named value (and scalar) averaged over ranks with these weights: the tensors as
        views into the buckets (valid until the next call), the scalars as floats."""
        requests = []
        for i, b in enumerate(self.buckets):
            for name, view in b.views.items():
                if name and weight:
                    np.multiply(values[name], weight, out=view)
                elif name:                          # no rows here: nothing to add
                    view.fill(0)
            if i == 0:
                self.head[:-1] = [scalars[k] * weight if weight else 0.0 for k in self.scalars]
                self.head[-1] = weight
            requests.append(self.comm.Iallreduce(self.mpi.IN_PLACE, b.buffer, op=self.mpi.SUM))
        self.mpi.Request.Waitall(requests)
        total = float(self.head[-1])
        for b in self.buckets:
            b.buffer /= total
        out = {k: v for b in self.buckets for k, v in b.views.items() if k}
        return out, dict(zip(self.scalars, map(float, self.head[:-1])))


@dataclass
class PhaseStep:
    grad: object                    # an Executable: forward, loss, backward: d loss / d p as outputs `grad:NAME`
    update: object                  # an Executable: the optimizer: parameters and averaged gradients in
    state: list[str]                # the float model state the gradient program updates
    reducer: Reducer
    empty_output: np.ndarray | None = None   # the output of no rows (a rank whose shard is empty)


class World:
    def __init__(self, comm, mpi):
        self.comm, self.mpi = comm, mpi
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.errors = comm.Dup()        # where failing ranks meet (`fail`), apart from training's messages
        node = comm.Split_type(mpi.COMM_TYPE_SHARED)
        # pool threads per rank (unless --threads): the machine's cores shared by its ranks, as
        # ranks that each start a thread per core slow down many times over
        self.threads = max(1, (os.cpu_count() or 1) // node.Get_size())
        node.Free()
        self.steps: list[PhaseStep] = []
        self.row0 = 0                   # the global index of this rank's first row in the batch
        self.seconds = {"gradient": 0.0, "allreduce": 0.0, "update": 0.0}    # rank 0's steps, split
        self.bucket_bytes = int(float(os.environ.get("DLC_BUCKET_MB", "4")) * 2 ** 20)

    @property
    def lead(self) -> bool:
        return self.rank == 0

    # ---- compiling -------------------------------------------------------------------------------
    def build_phase(self, program, phase, fuse: bool) -> list:
        """The phase's gradient and update programs (compiled by the session with the rest)."""
        from compiler.driver import build, optimize_gradients, optimize_update
        grad = build(optimize_gradients(program, phase, fuse))
        update = build(optimize_update(program, phase, fuse))
        gg = grad.graph
        state = [gg[s]["name"] for s in gg.updates
                 if gg.attrs(s)["kind"] == "state" and gg.dtype(s) in ("f32", "f64")]
        shapes = {name: tuple(shape) for name, kind, shape, dtype in grad.inputs if kind in ("param", "state")}
        tensors = [(f"grad:{n}", shapes[n]) for n in reversed(phase.params)] + [(n, shapes[n]) for n in state]
        dtype = {"f32": np.float32, "f64": np.float64}[program.params[phase.params[0]].dtype]
        self.steps.append(PhaseStep(grad, update, state,
                                    Reducer(self.comm, self.mpi, tensors, ["loss"], dtype, self.bucket_bytes)))
        return [grad, update]

    def in_turn(self, fn) -> None:
        """Run `fn` (compiling) on the first rank of each machine, then on the others: they find
        its kernels in the shared disk cache instead of compiling the same ones side by side."""
        node = self.comm.Split_type(self.mpi.COMM_TYPE_SHARED)
        if node.Get_rank() == 0:
            fn()                        # (an error here ends the job: see `fail`)
        node.Barrier()
        if node.Get_rank() != 0:
            fn()
        node.Barrier()                  # and training starts together
        node.Free()

    def check_batch(self, batch: int, loc) -> None:
        if batch < self.size:
            raise DlcError(f"a batch of {batch} cannot be shared by {self.size} ranks: give each rank "
                           "at least one example", loc)

    # ---- training --------------------------------------------------------------------------------
    def shard(self, idx: np.ndarray) -> np.ndarray:
        """This rank's contiguous block of a global batch's rows (sizes differ by at most one)."""
        base, extra = divmod(len(idx), self.size)
        self.row0 = self.rank * base + min(self.rank, extra)
        return idx[self.row0:self.row0 + base + (self.rank < extra)]

    def step(self, session, phase: int, batch: dict, scalars: dict) -> tuple[dict, float]:
        """One data-parallel step of a phase on this rank's rows: gradients, their average over
        every rank's rows, the update. Returns the gradient program's outputs on these rows and
        the loss over the global batch. Random draws take the stream of the rows' global
        indices: `scalars` gains `rng_row`, the global index of this rank's first row."""
        st = self.steps[phase]
        scalars["rng_row"] = self.row0
        n = len(next(iter(batch.values())))
        t0 = time.perf_counter()
        if n:
            res = dict(zip(st.grad.outputs, st.grad(*session._args(st.grad, batch, scalars))))
            if st.empty_output is None:
                st.empty_output = res["output"][:0].copy()
            values = {**res, **{k: session.state[k] for k in st.state}}
        else:                                       # the tail of an epoch: no rows here
            res, values = {"output": st.empty_output}, {}
        t1 = time.perf_counter()
        avg, scal = st.reducer.average(values, {"loss": float(res.get("loss", 0.0))}, float(n))
        t2 = time.perf_counter()
        for k in st.state:
            session.state[k][...] = avg[k]
        st.update(*session._args(st.update, avg, scalars))
        self.seconds["gradient"] += t1 - t0
        self.seconds["allreduce"] += t2 - t1
        self.seconds["update"] += time.perf_counter() - t2
        return res, scal["loss"]

    def reduce_epoch(self, totals: dict, acc) -> None:
        """The epoch's training loss sums and metric inputs from every rank (in place)."""
        keys = sorted(totals)
        sums = np.array([v for k in keys for v in totals[k]], np.float64)
        self.comm.Allreduce(self.mpi.IN_PLACE, sums, op=self.mpi.SUM)
        for i, k in enumerate(keys):
            totals[k][:] = [float(sums[2 * i]), int(sums[2 * i + 1])]
        acc.parts = [p for parts in self.comm.allgather(acc.parts) for p in parts]

    def gather_batches(self, mine: list) -> list:
        """Evaluation: rank r ran batches r, r + N, r + 2N, ...; every rank gets all of them in
        order, so that its sums, and so its early-stopping decisions, are one process's."""
        every = self.comm.allgather(mine)
        return [every[i % self.size][i // self.size] for i in range(sum(map(len, every)))]

    def sync(self, session) -> None:
        """Parameters and state as rank 0 has them (the ranks' copies agree up to rounding)."""
        for arrays in (session.params, session.state):
            for k in sorted(arrays):
                self.comm.Bcast(arrays[k], root=0)

    def report(self) -> dict:
        """The run's shape, and where rank 0's training steps spent their time (seconds)."""
        return {"ranks": self.size, "buckets": max(len(s.reducer.buckets) for s in self.steps),
                **{f"{k}_seconds": round(v, 4) for k, v in self.seconds.items()}}
