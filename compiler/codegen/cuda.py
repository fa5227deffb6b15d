"""The CUDA target: `numba.cuda` kernels launched from a Python step, buffers on the device.

How each kind of fused group maps onto the GPU (no cuBLAS/cuDNN):

* elementwise and fused elementwise chains: a grid-stride loop over the output's elements, one
  element per thread per iteration (the flat index is unflattened only where a read needs it);
* reductions: one block per output element (a grid-stride loop over blocks); the block's threads
  stride over the reduced elements, computing any fused prologue, then combine their partial
  results in shared memory (a tree); thread 0 applies the fused epilogue;
* matmul: 16x16 tiles of both operands staged through shared memory, any operand transposed,
  a batch of matmuls on the grid's z axis; the fused epilogue runs on each thread's own result;
* conv2d: a direct kernel, one output element per thread, with the fused epilogue; its
  gradients, pooling and pooling's gradients are gathers (each thread sums what lands on its
  element: no atomics, so results are deterministic);
* softmax and log-softmax: one block per row, the row's max and sum reduced in shared memory;
* the scan: the host loop of the CPU target, in plain Python, launching the body's kernels.

The step is plain Python: it moves its array arguments to the device (a no-op for arrays
already there: parameters and optimizer state stay on the device across steps), allocates
device buffers and launches each kernel in order. Random ops draw from the CPU's counter-based
stream (`ops_nn.RNG_HELPERS`); a float32 uniform is the float64 draw rounded to float32 without
doubles, so dropout masks are bit-identical to the CPU's.

float32 programs contain no float64 instruction: literals are typed (`np.float32(c)`),
accumulators have the value's dtype, and math goes through `math.*` (libdevice's float
functions for float arguments).
"""
from __future__ import annotations

import re

from ..ops import OPS
from .target import Target

# Block shapes on a GPU. The simulator runs each thread of a block as a Python thread, so
# there the same kernels are generated with small blocks (any power of two is correct).
TPB = 256        # threads per block of a grid-stride kernel
RB = 128         # threads per block of a reduction (a power of two: the shared-memory tree)
TILE = 16        # matmul tile
GRID = 4096      # at most this many blocks along an axis of the grid (every kernel strides over its work)
SIM_BLOCKS = {"TPB": 32, "RB": 8, "TILE": 4, "GRID": 2}


def sim_blocks() -> dict:
    """The simulator's block shapes; DLC_CUDASIM_BLOCKS="TPB,RB,TILE,GRID" overrides them (the
    end-to-end simulator tests run one-thread blocks: a simulated barrier costs milliseconds)."""
    import os
    env = os.environ.get("DLC_CUDASIM_BLOCKS")
    if not env:
        return SIM_BLOCKS
    return dict(zip(("TPB", "RB", "TILE", "GRID"), (int(v) for v in env.split(","))))

PRELUDE = """\
from numba import cuda
from compiler.codegen.cuda import grid_blocks as _grid, cdiv as _cdiv
from compiler.codegen.cuda import device_copy as _copy, to_device as _dev"""

RNG_HELPERS = '''\
@cuda.jit(device=True, inline=True)
def _bits(seed, salt, i):
    z = np.uint64(seed) + np.uint64(salt) * np.uint64(0xD1B54A32D192ED03) + np.uint64(i) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return z >> np.uint64(11)


@cuda.jit(device=True, inline=True)
def _uniform_f64(seed, salt, i):
    return np.float64(_bits(seed, salt, i)) * (1.0 / 9007199254740992.0)


@cuda.jit(device=True, inline=True)
def _uniform_f32(seed, salt, i):
    # the CPU's float64 draw rounded to float32, without doubles: the 53-bit integer rounded to
    # float32 (to nearest even, like the CPU's rounding of the exact float64), times 2**-53 (exact)
    return np.float32(_bits(seed, salt, i)) * np.float32(1.1102230246251565e-16)


@cuda.jit(device=True, inline=True)
def _normal_f64(seed, salt, i):
    u1 = _uniform_f64(seed, salt, 2 * i)
    u2 = _uniform_f64(seed, salt, 2 * i + 1)
    return math.sqrt(-2.0 * math.log(1.0 - u1)) * math.cos(6.283185307179586 * u2)


@cuda.jit(device=True, inline=True)
def _normal_f32(seed, salt, i):
    u1 = _uniform_f32(seed, salt, 2 * i)
    u2 = _uniform_f32(seed, salt, 2 * i + 1)
    return math.sqrt(np.float32(-2.0) * math.log(np.float32(1.0) - u1)) * math.cos(np.float32(6.283185307179586) * u2)
'''

# ---- opaque ops: CUDA lowerings by op name (the registry's templates are the CPU's) -----------
# Placeholders as in the registry: {x0} {x1} arguments, {out}, {T} the output dtype, the op's
# named sizes (`kernel_sizes`) and numeric attributes; {U} the uniform draw of the dtype.
# Every template but the row-wise ones is a grid-stride loop over `for f in ...` (FOR).
FOR = "for f in range(cuda.grid(1), {work}, cuda.gridsize(1)):\n"


def _unflat(var: str, names: list[str], extents: list[str], indent: str = "    ") -> str:
    """Statements splitting flat index `var` into row-major `names` over `extents`."""
    out, rest = [], var
    for k in range(len(names) - 1, 0, -1):
        out.append(f"{names[k]} = {rest} % {extents[k]}")
        out.append(f"r{k} = {rest} // {extents[k]}")
        rest = f"r{k}"
    out.append(f"{names[0]} = {rest}")
    return "".join(indent + s + "\n" for s in out)


_TREE = """\
    sm[tid] = {acc}
    cuda.syncthreads()
    h = {{HALF}}
    while h > 0:
        if tid < h:
            {combine}
        cuda.syncthreads()
        h //= 2
    {acc} = sm[0]
    cuda.syncthreads()
"""


def _tree(acc: str, combine: str) -> str:
    return _TREE.format(acc=acc, combine=combine)


_MAX_COMBINE = "if sm[tid + h] > sm[tid]:\n                sm[tid] = sm[tid + h]"

_ROW = """\
sm = cuda.shared.array({RB}, {T})
tid = cuda.threadIdx.x
for r in range(cuda.blockIdx.x, {rows}, cuda.gridDim.x):
    m = {T}(-np.inf)
    for j in range(tid, {n}, {RB}):
        if {x0}[r, j] > m:
            m = {x0}[r, j]
""" + _tree("m", _MAX_COMBINE) + """\
    s = {T}(0.0)
    for j in range(tid, {n}, {RB}):
        s += math.exp({x0}[r, j] - m)
""" + _tree("s", "sm[tid] += sm[tid + h]")

SOFTMAX = _ROW + """\
    inv = {T}(1.0) / s
    for j in range(tid, {n}, {RB}):
        {out}[r, j] = math.exp({x0}[r, j] - m) * inv
"""

LOG_SOFTMAX = _ROW + """\
    lse = m + math.log(s)
    for j in range(tid, {n}, {RB}):
        {out}[r, j] = {x0}[r, j] - lse
"""

_NCHW = _unflat("f", ["n", "c", "ih", "iw"], ["{N}", "{C}", "{H}", "{W}"])
_NCOO = _unflat("f", ["n", "c", "oh", "ow"], ["{N}", "{C}", "{HO}", "{WO}"])

# dx[n, c, ih, iw] = sum of w[o, c, kh, kw] * dy[n, o, oh, ow] over the windows covering (ih, iw)
CONV_GRAD_X = FOR + _NCHW + """\
    acc = {T}(0.0)
    for kh in range({KH}):
        th = ih + {PH} - kh * {DH}
        if th >= 0 and th % {SH} == 0 and th // {SH} < {HO}:
            oh = th // {SH}
            for kw in range({KW}):
                tw = iw + {PW} - kw * {DW}
                if tw >= 0 and tw % {SW} == 0 and tw // {SW} < {WO}:
                    ow = tw // {SW}
                    for o in range({O}):
                        acc += {x0}[n, o, oh, ow] * {x1}[o, c, kh, kw]
    {out}[n, c, ih, iw] = acc
"""

# dw[o, c, kh, kw]: a sum over N * HO * WO products, one block per weight (a reduction)
CONV_GRAD_W = """\
sm = cuda.shared.array({RB}, {T})
tid = cuda.threadIdx.x
for f in range(cuda.blockIdx.x, {O} * {C} * {KH} * {KW}, cuda.gridDim.x):
""" + _unflat("f", ["o", "c", "kh", "kw"], ["{O}", "{C}", "{KH}", "{KW}"]) + """\
    acc = {T}(0.0)
    for q in range(tid, {N} * {HO} * {WO}, {RB}):
""" + _unflat("q", ["n", "oh", "ow"], ["{N}", "{HO}", "{WO}"], " " * 8) + """\
        ih = oh * {SH} - {PH} + kh * {DH}
        iw = ow * {SW} - {PW} + kw * {DW}
        if ih >= 0 and ih < {H} and iw >= 0 and iw < {W}:
            acc += {x1}[n, o, oh, ow] * {x0}[n, c, ih, iw]
""" + _tree("acc", "sm[tid] += sm[tid + h]") + """\
    if tid == 0:
        {out}[o, c, kh, kw] = acc
"""

_WINDOW_MAX = """\
{i}m = {T}(-np.inf)
{i}bi = -1
{i}bj = -1
{i}for kh2 in range({KH}):
{i}    jh = oh * {SH} - {PH} + kh2
{i}    if jh >= 0 and jh < {H}:
{i}        for kw2 in range({KW}):
{i}            jw = ow * {SW} - {PW} + kw2
{i}            if jw >= 0 and jw < {W} and {x0}[n, c, jh, jw] > m:
{i}                m = {x0}[n, c, jh, jw]
{i}                bi = jh
{i}                bj = jw
"""

MAX_POOL = FOR + _NCOO + _WINDOW_MAX.replace("{i}", "    ") + """\
    {out}[n, c, oh, ow] = m
"""

# the windows covering (ih, iw): (oh, ow) with oh * SH - PH + kh = ih for some kh in range(KH)
_COVER = """\
    for kh in range({KH}):
        th = ih + {PH} - kh
        if th >= 0 and th % {SH} == 0 and th // {SH} < {HO}:
            oh = th // {SH}
            for kw in range({KW}):
                tw = iw + {PW} - kw
                if tw >= 0 and tw % {SW} == 0 and tw // {SW} < {WO}:
                    ow = tw // {SW}
"""

# the gradient goes to the first maximum of each window (as the CPU kernel and PyTorch)
MAX_POOL_GRAD = FOR + _NCHW + "    acc = {T}(0.0)\n" + _COVER + _WINDOW_MAX.replace("{i}", " " * 20) + """\
                    if bi == ih and bj == iw:
                        acc += {x1}[n, c, oh, ow]
    {out}[n, c, ih, iw] = acc
"""

AVG_POOL = FOR + _NCOO + """\
    s = {T}(0.0)
    for kh in range({KH}):
        ih = oh * {SH} - {PH} + kh
        if ih >= 0 and ih < {H}:
            for kw in range({KW}):
                iw = ow * {SW} - {PW} + kw
                if iw >= 0 and iw < {W}:
                    s += {x0}[n, c, ih, iw]
    {out}[n, c, oh, ow] = s / {T}({K})
"""

AVG_POOL_GRAD = FOR + _NCHW + "    acc = {T}(0.0)\n" + _COVER + """\
                    acc += {x0}[n, c, oh, ow]
    {out}[n, c, ih, iw] = acc / {T}({K})
"""

# out[k, j] = sum of rows[m, j] over the m with ids[m] == k: a gather, so no atomics
SCATTER_ADD = """\
ids = {x0}.reshape(({M},))
rows = {x1}.reshape(({M}, {D}))
""" + FOR + _unflat("f", ["k", "j"], ["{V}", "{D}"]) + """\
    acc = {T}(0.0)
    for m in range({M}):
        if ids[m] == k:
            acc += rows[m, j]
    {out}[k, j] = acc
"""

ARGMAX = """\
xin = {x0}.reshape(({R}, {C}))
yout = {out}.reshape(({R},))
""" + FOR + """\
    best = 0
    for j in range(1, {C}):
        if xin[f, j] > xin[f, best]:
            best = j
    yout[f] = best
"""

FLIP = """\
xin = {x0}.reshape(({P}, {N}, {Q}))
yout = {out}.reshape(({P}, {N}, {Q}))
""" + FOR + _unflat("f", ["p", "k", "q"], ["{P}", "{N}", "{Q}"]) + """\
    yout[p, k, q] = xin[p, {N} - 1 - k, q]
"""

CUMSUM = """\
xin = {x0}.reshape(({P}, {N}, {Q}))
yout = {out}.reshape(({P}, {N}, {Q}))
for f in range(cuda.grid(1), {P} * {Q}, cuda.gridsize(1)):
""" + _unflat("f", ["p", "q"], ["{P}", "{Q}"]) + """\
    acc = {T}(0)
    for s in range({N}):
        k = {N} - 1 - s if {reverse} else s
        acc += xin[p, k, q]
        yout[p, k, q] = acc
"""

SAMPLE = """\
xin = {x0}.reshape(({R}, {C}))
yout = {out}.reshape(({R},))
""" + FOR + """\
    m = xin[f, 0]
    for j in range(1, {C}):
        if xin[f, j] > m:
            m = xin[f, j]
    total = {X}(0.0)
    for j in range({C}):
        total += math.exp((xin[f, j] - m) / {X}({temperature}))
    u = {U}({x1}, {salt}, f) * total
    acc = {X}(0.0)
    k = {C} - 1
    for j in range({C}):
        acc += math.exp((xin[f, j] - m) / {X}({temperature}))
        if acc > u:
            k = j
            break
    yout[f] = k
"""

TEMPLATES = {"softmax": SOFTMAX, "log_softmax": LOG_SOFTMAX, "conv2d_grad_x": CONV_GRAD_X,
             "conv_transpose2d": CONV_GRAD_X, "conv2d_grad_w": CONV_GRAD_W, "max_pool2d": MAX_POOL,
             "max_pool2d_grad": MAX_POOL_GRAD, "avg_pool2d": AVG_POOL, "avg_pool2d_grad": AVG_POOL_GRAD,
             "scatter_add": SCATTER_ADD, "argmax": ARGMAX, "flip": FLIP, "cumsum": CUMSUM, "sample": SAMPLE}
ROWWISE = ("softmax", "log_softmax")
BLOCK_PER_ITEM = ("conv2d_grad_w",)        # templates that reduce in a block per output element

NP_DTYPE = {"f32": "np.float32", "f64": "np.float64", "i32": "np.int32", "i64": "np.int64", "bool": "np.bool_"}


def _math_templates() -> dict:
    """The registry's scalar templates with NumPy's scalar functions replaced by `math`'s
    (numba.cuda has no NumPy ufuncs on scalars; `math` on a float32 is libdevice's float
    function), and the random draws typed per dtype."""
    out = {}
    for name, op in OPS.items():
        if op.scalar and re.search(r"np\.(exp|log|sqrt|tanh|floor|sin|cos)\(", op.scalar):
            out[name] = re.sub(r"np\.(exp|log|sqrt|tanh|floor|sin|cos)\(", r"math.\1(", op.scalar)
    out["sign"] = "({T}(1) if {0} > 0 else ({T}(-1) if {0} < 0 else {T}(0)))"
    for dt in ("f32", "f64"):
        out[("rand_uniform", dt)] = f"_uniform_{dt}({{0}}, {{salt}}, {{flat}})"
        out[("rand_normal", dt)] = f"_normal_{dt}({{0}}, {{salt}}, {{flat}})"
    return out


class CudaTarget(Target):
    name = "cuda"
    prelude = PRELUDE
    kernel_decorator = ""                  # scan loops and bodies: host Python
    function_decorator = "@cuda.jit"
    inline_wrapper = ""
    step_decorator = ""
    allow_compiled_step = False
    eager_compile = False                  # compiled at the first launch, for its argument types
    kernel_templates = TEMPLATES

    def __init__(self, simulator: bool | None = None):
        if simulator is None:
            from numba import config
            simulator = bool(config.ENABLE_CUDASIM)
        blocks = sim_blocks() if simulator else {"TPB": TPB, "RB": RB, "TILE": TILE, "GRID": GRID}
        self.TPB, self.RB, self.TILE, self.GRID = blocks["TPB"], blocks["RB"], blocks["TILE"], blocks["GRID"]
        self.scalar_templates = _math_templates()
        # the registry's helpers are CPU (@njit) functions: none is used here but the draws
        self.helpers = {name: "" for name, op in OPS.items() if op.helpers}
        for name in ("rand_uniform", "rand_normal", "sample"):
            self.helpers[name] = RNG_HELPERS

    # ---- memory and the step -------------------------------------------------------------------
    @staticmethod
    def alloc(shape: str, dtype: str) -> str:
        return f"cuda.device_array({shape}, {dtype})"

    @staticmethod
    def full(shape: str, value: str, dtype: str) -> str:
        raise NotImplementedError("the CUDA target allocates no buffer inside a kernel")

    @staticmethod
    def copy(dst: str, src: str) -> str:
        return f"_copy({dst}, {src})"

    @staticmethod
    def bind_input(arg: str, kind: str) -> list[str]:
        return [] if kind == "scalar" else [f"{arg} = _dev({arg})"]

    def launch(self, kernel: str, args: list[str], group, config=None) -> str:
        if config is None:                 # a scan: host code
            return f"{kernel}({', '.join(args)})"
        config, *views = config.split(";")
        args = list(args)
        for v in views:                    # arrays the kernel reads as reshaped views
            pos, _, shape = v.split("=", 2)
            a = args[int(pos)]
            args[int(pos)] = f"{a}.reshape({a}.size)" if shape == "-1" else f"{a}.reshape({shape})"
        kind, *ext = config.split(":")
        if kind == "flat":
            cfg = f"_grid({ext[0]}, {self.TPB}, {self.GRID}), {self.TPB}"
        elif kind == "rows":
            cfg = f"_grid({ext[0]}, 1, {self.GRID}), {self.RB}"
        else:                              # tile: M, N, batches
            t, cap = self.TILE, self.GRID
            cfg = f"(_grid({ext[1]}, {t}, {cap}), _grid({ext[0]}, {t}, {cap}), _grid({ext[2]}, 1, {cap})), ({t}, {t})"
        return f"{kernel}[{cfg}]({', '.join(args)})"

    @staticmethod
    def call_types(types: list, config) -> list:
        """The kernel's argument types: a reshaped view has its view's rank."""
        types = list(types)
        for v in (config or "").split(";")[1:]:
            pos, nd, _ = v.split("=", 2)
            types[int(pos)] = types[int(pos)][:2] + (int(nd),)
        return types

    @staticmethod
    def to_device(a):
        return to_device(a)

    @staticmethod
    def to_host(a):
        return a.copy_to_host() if is_device(a) else a

    # ---- kernels -------------------------------------------------------------------------------
    def render_kernel(self, k) -> list[str]:
        g, grp = k.g, k.grp
        op = g.op(grp.nodes[0])
        if grp.pattern == "elementwise" or (grp.pattern == "opaque" and OPS[op].scalar):
            body = self._elementwise(k, grp.nodes, g.shape(grp.nodes[-1]))
        elif grp.pattern == "reduce":
            body = self._reduce(k)
        elif grp.pattern == "anchored":
            body = self._matmul(k) if g.op(grp.anchor) == "matmul" else self._conv(k)
        elif grp.pattern == "opaque":
            body = self._template(k, grp.nodes[0])
        else:
            raise AssertionError(grp.pattern)
        return self._host_views(k, body)

    @staticmethod
    def _host_views(k, body: list[str]) -> list[str]:
        """Reshape on the host, not in the kernel: Numba's in-kernel `reshape` checks the size
        with a float64 comparison (a `.f64` instruction in every float32 kernel). A kernel line
        `v = x0.reshape(shape)` becomes `v = x0`, and the launch passes `x0` reshaped; the
        views go into the launch configuration as `;position=ndim=shape`."""
        views = {}
        for p, v in k.flat_views.items():            # the renderer's 1-D views
            body = [f"{v} = {p}"] + body
            views[p] = (1, "-1")
        k.flat_views = {}
        pat = re.compile(r"^(\w+) = ([xy]\d+)\.reshape\((.*)\)$")
        out = []
        for line in body:
            m = pat.match(line)
            if m and m.group(2) not in views:
                shape = m.group(3)
                views[m.group(2)] = (shape.count(",") + (0 if shape.rstrip(")").endswith(",") else 1), shape)
                line = f"{m.group(1)} = {m.group(2)}"
            out.append(line)
        text = "\n".join(out)
        for p in views:                               # the array itself must not be indexed as well
            assert len(re.findall(rf"\b{p}\b", text)) == 1, f"{p} is both viewed and used in:\n{text}"
        position = {name: i for i, name in enumerate(list(k.params.values()) + list(k.outs.values()))}
        k.launch += "".join(f";{position[p]}={nd}={shape}" for p, (nd, shape) in views.items())
        return out

    def _elementwise(self, k, nodes, shape) -> list[str]:
        dims = [k.r.dim(d) for d in shape]
        total = " * ".join(dims) or "1"
        k.shapes.append(tuple(shape))
        local: dict = {}
        if k.flat_ok(nodes, shape):
            k.flat_loop = True
            inner = [k.compute(n, ["i"], (total,), local) for n in nodes]      # (`read` names it i)
            inner += [f"{k.flat_view(k.out(n))}[i] = {local[n]}" for n in nodes if n in k.grp.outputs]
            k.flat_loop = False
        else:
            idx = [f"i{j}" for j in range(len(shape))]
            inner = _unflat("i", idx, dims, "").splitlines() if idx else []
            inner += [k.compute(n, idx, shape, local) for n in nodes]
            inner += k.stores(nodes, idx, shape, local)
        k.launch = f"flat:{total}"
        return [f"for i in range(cuda.grid(1), {total}, cuda.gridsize(1)):"] + ["    " + x for x in inner]

    def _reduce(self, k) -> list[str]:
        g, grp = k.g, k.grp
        r = grp.anchor
        x = g.args(r)[0]
        in_shape, out_shape = g.shape(x), g.shape(r)
        axes = set(g.attrs(r)["axes"])
        keep = g.attrs(r).get("keepdims", False)
        k.shapes.append(in_shape)
        T = NP_DTYPE[g.dtype(r)]
        dims = [k.r.dim(d) for d in in_shape]
        idx = [f"i{j}" for j in range(len(in_shape))]
        kept = [j for j in range(len(in_shape)) if j not in axes]
        red = [j for j in range(len(in_shape)) if j in axes]
        nout = " * ".join(dims[j] for j in kept) or "1"
        nred = " * ".join(dims[j] for j in red) or "1"
        is_max = g.op(r) == "reduce_max"
        lowest = {"i32": "-2147483648", "i64": "-9223372036854775808", "bool": "False"}.get(g.dtype(r), "-np.inf")
        lines = [f"sm = cuda.shared.array({self.RB}, {T})", "tid = cuda.threadIdx.x",
                 f"for o in range(cuda.blockIdx.x, {nout}, cuda.gridDim.x):"]
        body = _unflat("o", [idx[j] for j in kept], [dims[j] for j in kept], "").splitlines() if kept else []
        body += [f"acc = {T}({lowest if is_max else 0})", f"for q in range(tid, {nred}, {self.RB}):"]
        inner = _unflat("q", [idx[j] for j in red], [dims[j] for j in red], "").splitlines() if red else []
        local: dict = {}
        inner += [k.compute(n, idx, in_shape, local) for n in grp.prologue]
        inner += k.stores(grp.prologue, idx, in_shape, local)
        val = k.read(x, r, 0, idx, in_shape, local)
        inner += [f"xv = {val}", "if xv > acc:", "    acc = xv"] if is_max else [f"acc += {val}"]
        body += ["    " + s for s in inner]
        tree = _tree("acc", _MAX_COMBINE if is_max else "sm[tid] += sm[tid + h]").format(HALF=self.RB // 2)
        body += tree.replace("\n    ", "\n").strip().splitlines()
        oidx = [idx[j] if j in kept else "0" for j in range(len(in_shape))] if keep else [idx[j] for j in kept]
        epi = [n for n in grp.nodes if n not in grp.prologue and n != r]
        local = {r: f"v{r}"}
        ep = [f"v{r} = acc"] + [k.compute(n, oidx, out_shape, local) for n in epi]
        ep += k.stores([r] + epi, oidx, out_shape, local)
        body += ["if tid == 0:"] + ["    " + s for s in ep]
        lines += ["    " + s for s in body]
        k.launch = f"rows:{nout}"
        return lines

    def _matmul(self, k) -> list[str]:
        g, grp = k.g, k.grp
        m = grp.anchor
        a, b = g.args(m)
        ta, tb = g.attrs(m).get("ta", False), g.attrs(m).get("tb", False)
        sa, sb, so = g.shape(a), g.shape(b), g.shape(m)
        A, B = k.param(a), k.param(b)
        k.shapes += [sa, sb, so]
        T = NP_DTYPE[g.dtype(m)]
        d = k.r.dim
        pre = []
        TILE = self.TILE
        if len(sa) == 2 and len(sb) == 2:
            nb, M, N = "1", d(so[0]), d(so[1])
            K = d(sa[0] if ta else sa[1])
            aget = (lambda i, kk: f"{A}[{kk}, {i}]") if ta else (lambda i, kk: f"{A}[{i}, {kk}]")
            bget = (lambda kk, j: f"{B}[{j}, {kk}]") if tb else (lambda kk, j: f"{B}[{kk}, {j}]")
            oidx = ["row", "col"]
        elif len(sb) == 2 and not ta:            # [..., K] @ [K, N]: the leading axes are rows
            nb, N, K = "1", d(so[-1]), d(sa[-1])
            M = " * ".join(d(x) for x in sa[:-1])
            pre = [f"a2 = {A}.reshape(({M}, {K}))"]
            aget = lambda i, kk: f"a2[{i}, {kk}]"                       # noqa: E731
            bget = (lambda kk, j: f"{B}[{j}, {kk}]") if tb else (lambda kk, j: f"{B}[{kk}, {j}]")
            lead = [f"i{j}" for j in range(len(so) - 1)]
            pre_ep = _unflat("row", lead, [d(x) for x in so[:-1]], "").splitlines()
            oidx = lead + ["col"]
        elif len(sa) == len(sb) and all(x == y for x, y in zip(sa[:-2], sb[:-2])):
            nb = " * ".join(d(x) for x in sa[:-2])
            M, N = d(so[-2]), d(so[-1])
            K = d(sa[-2] if ta else sa[-1])
            pre = [f"a3 = {A}.reshape(({nb}, {d(sa[-2])}, {d(sa[-1])}))",
                   f"b3 = {B}.reshape(({nb}, {d(sb[-2])}, {d(sb[-1])}))"]
            aget = (lambda i, kk: f"a3[bz, {kk}, {i}]") if ta else (lambda i, kk: f"a3[bz, {i}, {kk}]")
            bget = (lambda kk, j: f"b3[bz, {j}, {kk}]") if tb else (lambda kk, j: f"b3[bz, {kk}, {j}]")
            lead = [f"i{j}" for j in range(len(so) - 2)]
            pre_ep = _unflat("bz", lead, [d(x) for x in so[:-2]], "").splitlines()
            oidx = lead + ["row", "col"]
        else:
            raise NotImplementedError("matmul with broadcast batch dimensions")
        if len(sa) == 2 and len(sb) == 2:
            pre_ep = []
        lines = pre + [
            f"ta_ = cuda.shared.array(({TILE}, {TILE}), {T})",
            f"tb_ = cuda.shared.array(({TILE}, {TILE}), {T})",
            "tx = cuda.threadIdx.x", "ty = cuda.threadIdx.y",
            f"for bz in range(cuda.blockIdx.z, {nb}, cuda.gridDim.z):",
            f"    for by in range(cuda.blockIdx.y, ({M} + {TILE - 1}) // {TILE}, cuda.gridDim.y):",
            f"        for bx in range(cuda.blockIdx.x, ({N} + {TILE - 1}) // {TILE}, cuda.gridDim.x):"]
        tile = [
            f"row = by * {TILE} + ty", f"col = bx * {TILE} + tx",
            f"acc = {T}(0.0)",
            f"for k0 in range(0, {K}, {TILE}):",
            "    ka = k0 + tx",
            f"    ta_[ty, tx] = {aget('row', 'ka')} if row < {M} and ka < {K} else {T}(0.0)",
            "    kb = k0 + ty",
            f"    tb_[ty, tx] = {bget('kb', 'col')} if kb < {K} and col < {N} else {T}(0.0)",
            "    cuda.syncthreads()",
            f"    for kk in range({TILE}):",
            "        acc += ta_[ty, kk] * tb_[kk, tx]",
            "    cuda.syncthreads()",
            f"if row < {M} and col < {N}:"]
        tile += ["    " + s for s in pre_ep + self._epilogue(k, m, oidx, so, "acc")]
        lines += [" " * 12 + s for s in tile]
        k.launch = f"tile:{M}:{N}:{nb}"
        return lines

    def _conv(self, k) -> list[str]:
        g, grp = k.g, k.grp
        m = grp.anchor
        x, w = g.args(m)
        sizes = OPS["conv2d"].kernel_sizes(g, m)
        k.shapes.append(tuple(sizes.values()))
        s = {name: k.r.dim(v) for name, v in sizes.items()}
        X, Wt = k.param(x), k.param(w)
        T = NP_DTYPE[g.dtype(m)]
        work = f"{s['N']} * {s['O']} * {s['HO']} * {s['WO']}"
        lines = [FOR.format(work=work).rstrip()]
        lines += _unflat("f", ["n", "o", "oh", "ow"], [s["N"], s["O"], s["HO"], s["WO"]]).rstrip("\n").split("\n")
        body = [f"acc = {T}(0.0)",
                f"for c in range({s['C']}):",
                f"    for kh in range({s['KH']}):",
                f"        ih = oh * {s['SH']} - {s['PH']} + kh * {s['DH']}",
                f"        if ih >= 0 and ih < {s['H']}:",
                f"            for kw in range({s['KW']}):",
                f"                iw = ow * {s['SW']} - {s['PW']} + kw * {s['DW']}",
                f"                if iw >= 0 and iw < {s['W']}:",
                f"                    acc += {X}[n, c, ih, iw] * {Wt}[o, c, kh, kw]"]
        body += self._epilogue(k, m, ["n", "o", "oh", "ow"], g.shape(m), "acc")
        k.launch = f"flat:{work}"
        return lines + ["    " + b for b in body]

    @staticmethod
    def _epilogue(k, m, idx, shape, value) -> list[str]:
        """The anchor's value at `idx`, its fused elementwise epilogue, and the stores."""
        epi = [n for n in k.grp.nodes if n != m]
        local = {m: f"v{m}"}
        out = [f"v{m} = {value}"] + [k.compute(n, idx, shape, local) for n in epi]
        return out + k.stores([m] + epi, idx, shape, local)

    def _template(self, k, n) -> list[str]:
        g = k.g
        spec = OPS[g.op(n)]
        if spec.name not in self.kernel_templates:
            raise NotImplementedError(f"the CUDA target has no lowering of `{spec.name}`")
        out = k.out(n)
        names = {f"x{i}": k.param(a) for i, a in enumerate(g.args(n))}
        dt = g.dtype(n)
        T = NP_DTYPE[dt]
        # a float op's own dtype; an op producing indices (sample) computes in its input's
        X = NP_DTYPE[g.dtype(g.args(n)[0])]
        U = "_uniform_f32" if X == "np.float32" else "_uniform_f64"
        numel = " * ".join(k.r.dim(x) for x in g.shape(n)) or "1"
        k.shapes.append(g.shape(n))
        attrs = {a: v for a, v in g.attrs(n).items() if a not in names and isinstance(v, (int, float))}
        if spec.name in ROWWISE:
            shape = g.shape(g.args(n)[0])
            k.shapes.append(shape)
            rows = " * ".join(k.r.dim(x) for x in shape[:-1]) or "1"
            ncol = k.r.dim(shape[-1])
            pre = [f"xin = {names['x0']}.reshape(({rows}, {ncol}))", f"yout = {out}.reshape(({rows}, {ncol}))"]
            body = self.kernel_templates[spec.name].format(x0="xin", out="yout", rows=rows, n=ncol, T=T,
                                                           RB=self.RB, HALF=self.RB // 2)
            k.launch = f"rows:{rows}"
            return pre + body.rstrip().split("\n")
        sizes = dict(spec.kernel_sizes(g, n))
        if spec.name == "scatter_add":
            sizes["V"] = g.shape(n)[0]
        k.shapes.append(tuple(sizes.values()))
        sz = {name: k.r.dim(v) for name, v in sizes.items()}
        body = self.kernel_templates[spec.name].format(out=out, T=T, X=X, U=U, work=numel, RB=self.RB,
                                                       HALF=self.RB // 2, **names, **sz, **attrs)
        k.launch = f"{'rows' if spec.name in BLOCK_PER_ITEM else 'flat'}:{numel}"
        return body.rstrip().split("\n")


# ---- host side: what the generated step calls ------------------------------------------------
def cdiv(a: int, b: int) -> int:
    return -(-int(a) // b)


def grid_blocks(n: int, per_block: int, cap: int) -> int:
    """Blocks along a grid axis for n items, per_block to a block: enough to fill the GPU, at
    most `cap` (each kernel strides over the rest)."""
    return max(1, min(cdiv(n, per_block), cap))


def is_device(a) -> bool:
    """A numba.cuda device array (or the simulator's stand-in for one)."""
    return hasattr(a, "copy_to_host")


def to_device(a):
    """An array on the device (an array already there is returned as is)."""
    import numpy as np
    from numba import cuda
    if is_device(a):
        return a
    return cuda.to_device(np.ascontiguousarray(a))


def device_copy(dst, src) -> None:
    """dst[...] = src for two contiguous device arrays of one size (any shapes): on the device."""
    dst.reshape(dst.size).copy_to_device(src.reshape(src.size))
