"""Median time per training step of a small character GPT with dlc, beside PyTorch.

    python bench/bench_gpt.py                 # table: dlc vs PyTorch at 1 and all threads
    python bench/bench_gpt.py --threads 1 --no-profile
    python bench/bench_gpt.py --model my_gpt.dl --rounds 5    # another variant of the model

The frameworks alternate: `--rounds` rounds of (dlc, PyTorch) at each thread count, each
measurement in a fresh process, so a machine that gets busier or quieter meanwhile moves both
alike; a figure is the median over the rounds (the compile, the profile and the cross-check
run once, in the first round).

Workload (issue 8's reference): the model of `examples/gpt.dl` with a vocabulary of 65 --
token and learned position embeddings, 2 pre-norm blocks (causal self-attention, d 64,
4 heads; GELU feed-forward 4x), final layer norm, linear read-out; T 64, batch 16, float32,
softmax cross-entropy, Adam lr 3e-3. The data are random text over 65 characters, written
as gpt_bench.txt beside a copy of the model (read with the `text(...)` source), so both
frameworks train on the same batches. PyTorch: nn.MultiheadAttention(64, 4, batch_first=True)
with a causal mask, nn.LayerNorm, nn.Linear, nn.GELU; the cross-check maps dlc's Wq, Wk, Wv
onto the blocks of its packed in_proj_weight. Machinery: bench/common.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VOCAB, T, D, HEADS, BLOCKS = 65, 64, 64, 4, 2


def torch_model(prob, a):
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
            self.attn = nn.MultiheadAttention(D, HEADS, batch_first=True)
            self.ff1, self.ff2 = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)
            self.register_buffer("mask", torch.triu(torch.ones(T, T, dtype=torch.bool), 1))

        def forward(self, x):
            h = self.ln1(x)
            x = x + self.attn(h, h, h, attn_mask=self.mask, need_weights=False, is_causal=True)[0]
            return x + self.ff2(nn.functional.gelu(self.ff1(self.ln2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(VOCAB, D)
            self.pos = nn.Parameter(torch.randn(T, D) * 0.02)
            self.blocks = nn.ModuleList(Block() for _ in range(BLOCKS))
            self.norm, self.head = nn.LayerNorm(D), nn.Linear(D, VOCAB)

        def forward(self, x):
            h = self.tok(x.long()) + self.pos
            for b in self.blocks:
                h = b(h)
            return self.head(self.norm(h)).transpose(1, 2)      # [B, V, T]: F.cross_entropy's class axis

    return GPT()


def weight_pairs(model):
    same, t = (lambda w: w), (lambda w: w.T)
    pairs = [("gpt/tokens/E", model.tok.weight, same), ("gpt/learned_positions_1/P", model.pos, same)]
    for i, b in enumerate(model.blocks, 1):
        p = f"gpt/block{i}/"
        a = p + "multi_head_attention_1/"
        for ln, m in (("layer_norm_1", b.ln1), ("layer_norm_2", b.ln2)):
            pairs += [(p + ln + "/gamma", m.weight, same), (p + ln + "/beta", m.bias, same)]
        for j, q in enumerate("qkv"):       # views of the packed projection
            pairs += [(a + "W" + q, b.attn.in_proj_weight[j * D:(j + 1) * D], t),
                      (a + "b" + q, b.attn.in_proj_bias[j * D:(j + 1) * D], same)]
        pairs += [(a + "Wo", b.attn.out_proj.weight, t), (a + "bo", b.attn.out_proj.bias, same)]
        for k, lin in ((1, b.ff1), (2, b.ff2)):
            pairs += [(p + f"feed_forward_1/dense_{k}/W", lin.weight, t),
                      (p + f"feed_forward_1/dense_{k}/b", lin.bias, same)]
    return pairs + [("gpt/norm/gamma", model.norm.weight, same), ("gpt/norm/beta", model.norm.bias, same),
                    ("gpt/head/W", model.head.weight, t), ("gpt/head/b", model.head.bias, same)]


def prepare(a, tmp: Path) -> Path:
    """The model of `--model` (default examples/gpt.dl) over 65 characters, reading random
    text written in tmp: its vocabulary of 103 becomes 65 and its `text(...)` source reads
    that file."""
    import numpy as np
    rng = np.random.default_rng(a.data_seed)
    chars = np.array([chr(c) for c in range(48, 48 + VOCAB)])
    (tmp / "gpt_bench.txt").write_text("".join(rng.choice(chars, a.characters)), encoding="utf-8")
    src = Path(a.model).read_text()
    src = src.replace("103", str(VOCAB)).replace("text(context", 'text("gpt_bench.txt", context')
    dst = tmp / "gpt_bench.dl"
    dst.write_text(src)
    return dst


def add_args(ap):
    ap.add_argument("--characters", type=int, default=20000, help="random characters written (default 20000)")
    ap.add_argument("--data-seed", type=int, default=0, help="seed of the random text (default 0)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds of (dlc, PyTorch) at each thread count, alternating; figures are "
                         "medians over the rounds (default 3)")


def drive(bench, a, shown: str) -> dict:
    """`common.drive` `a.rounds` times: dlc and PyTorch alternate at every thread count. Each
    row's figures are the medians over the rounds of its per-round medians (min and max: the
    extremes over all rounds); the first round also compiles, profiles and cross-checks."""
    import copy
    import statistics
    outs = []
    for i in range(max(a.rounds, 1)):
        ai = copy.copy(a)
        if i:
            ai.no_compile, ai.profile, ai.check = True, False, False
        outs.append(common.drive(bench, ai, shown))
    out = outs[0]
    for r in out["results"]:
        rows = [next(x for x in o["results"] if x["framework"] == r["framework"] and x["threads"] == r["threads"])
                for o in outs]
        r["round_medians_ms"] = [x["median_ms"] for x in rows]
        r["median_ms"] = statistics.median(r["round_medians_ms"])
        r["steps_per_s"] = 1e3 / r["median_ms"]
        r["min_ms"], r["max_ms"] = min(x["min_ms"] for x in rows), max(x["max_ms"] for x in rows)
        r["other_load"] = statistics.median(x.get("other_load", 0.0) for x in rows)
        r["contended"] = common.contended(r, out["machine"]["cores"])
    med = {(r["framework"], r["threads"]): r["median_ms"] for r in out["results"]}
    for ratio in out["ratios"]:
        t = ratio["threads"]
        ratio["dlc_over_torch"] = med[("dlc", t)] / med[("torch", t)]
        ratio["contended"] = any(r["contended"] for r in out["results"] if r["threads"] == t)
    if out.get("best"):
        def best(fw):
            rows = [r for r in out["results"] if r["framework"] == fw]
            return min([r for r in rows if not r["contended"]] or rows, key=lambda r: r["median_ms"])
        d, p = best("dlc"), best("torch")
        out["best"] = {"dlc_threads": d["threads"], "torch_threads": p["threads"],
                       "dlc_over_torch": d["median_ms"] / p["median_ms"]}
    out["rounds"] = len(outs)
    out["load_avg_after"] = outs[-1]["load_avg_after"]
    return out



def jax_model(prob, a):
    import jax
    import jax.numpy as jnp
    keys = iter(jax.random.split(jax.random.PRNGKey(0), 64))

    def w(*shape):
        return jax.random.normal(next(keys), shape, jnp.float32) * 0.02
    params = {"tok": w(VOCAB, D), "pos": w(T, D), "head": w(D, VOCAB), "head_b": jnp.zeros(VOCAB),
              "ln_g": jnp.ones(D), "ln_b": jnp.zeros(D)}
    for i in range(BLOCKS):
        params.update({f"{i}/{n}": w(*s) for n, s in (("Wqkv", (D, 3 * D)), ("Wo", (D, D)),
                                                        ("W1", (D, 4 * D)), ("W2", (4 * D, D)))})
        params.update({f"{i}/{n}": jnp.zeros(s) for n, s in (("bqkv", 3 * D), ("bo", D), ("b1", 4 * D), ("b2", D),
                                                               ("ln1_b", D), ("ln2_b", D))})
        params.update({f"{i}/ln1_g": jnp.ones(D), f"{i}/ln2_g": jnp.ones(D)})
    mask = jnp.tril(jnp.ones((T, T), bool))

    def ln(x, g, b):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) * jax.lax.rsqrt(var + 1e-5) * g + b

    def apply(p, x):
        B = x.shape[0]
        h = p["tok"][x] + p["pos"]
        for i in range(BLOCKS):
            q = f"{i}/"
            qkv = ln(h, p[q + "ln1_g"], p[q + "ln1_b"]) @ p[q + "Wqkv"] + p[q + "bqkv"]
            qq, kk, vv = (t.reshape(B, T, HEADS, D // HEADS).transpose(0, 2, 1, 3) for t in jnp.split(qkv, 3, -1))
            att = jnp.where(mask, qq @ kk.transpose(0, 1, 3, 2) * (D // HEADS) ** -0.5, -jnp.inf)
            o = (jax.nn.softmax(att, -1) @ vv).transpose(0, 2, 1, 3).reshape(B, T, D)
            h = h + o @ p[q + "Wo"] + p[q + "bo"]
            f = jax.nn.gelu(ln(h, p[q + "ln2_g"], p[q + "ln2_b"]) @ p[q + "W1"] + p[q + "b1"], approximate=True)
            h = h + f @ p[q + "W2"] + p[q + "b2"]
        return ln(h, p["ln_g"], p["ln_b"]) @ p["head"] + p["head_b"]
    return params, apply


BENCH = common.Bench(
    script=Path(__file__).resolve(),
    default_model=ROOT / "examples" / "gpt.dl",
    shapes=f"GPT: {BLOCKS} pre-norm blocks, d {D}, {HEADS} heads, T {T}, batch 16, vocab {VOCAB}, GELU FF 4x, "
           "f32, softmax cross-entropy, Adam lr 3e-3 (random text)",
    torch_model=torch_model, weight_pairs=weight_pairs, jax_model=jax_model,
    steps=50, repeats=5, warmup=5, batches=8, max_seconds=10.0,
    prepare=prepare, add_args=add_args, drive=drive,
    description=__doc__,
)


def main(argv=None):
    return common.main(BENCH, argv)


if __name__ == "__main__":
    sys.exit(main())
