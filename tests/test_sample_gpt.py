"""Sampling a character GPT: the `top_k` primitive, `generate` blocks with a prompt input and
options, the key/value-cached decoding step of dsl/stdlib/transformer.dl, the sliding window
of `dlc sample`, and the attention maps.

A tiny GPT (d 16, 2 heads, 1 block, context 8) with random weights saved in a checkpoint is
decoded by the compiled programs -- with the cache (`text`) and with a full recompute of the
window per character (`text_full`) -- and by a plain NumPy forward pass and decoding loop, in
float64: greedy and seeded top-k sampling give the same characters, across window slides.
"""
from pathlib import Path

import numpy as np
import pytest

from compiler.api import compile_function
from compiler.ops_nn import uniform_ref
from dsl.diagnostics import DlcError
from test_ops import grad_check

ROOT = Path(__file__).resolve().parent.parent
TEXT = "the quick brown fox jumps over the lazy dog; " * 12
CHARS = sorted(set(TEXT))
V, D, HEADS, C = len(CHARS), 16, 2, 8

TINY = f'''
model gpt(x: i32[B, {C}]) -> f32[B, {C}, {V}] {{
    h = learned_positions(embedding(x, {V}, {D}, name = "tokens"))
    h = transformer_encoder_block(h, heads = {HEADS}, causal = true, activation = "gelu_tanh", name = "block1")
    return dense(layer_norm(h, name = "norm"), {V}, name = "head")
}}

train gpt on text("tiny.txt", context = {C}, test = 0.1) {{
    loss = cross_entropy(gpt(x), y)
}}

def gpt_step(tok: [N], pos, k1, v1) {{
    h = reshape(embedding(tok, {V}, {D}, name = "tokens"), [N, 1, {D}])
    h = h + reshape(learned_position(pos, {C}, {D}, name = "learned_positions_1"), [1, 1, {D}])
    h, k1, v1 = transformer_encoder_block_step(h, pos, k1, v1, heads = {HEADS}, activation = "gelu_tanh",
                                               name = "block1")
    return reshape(dense(layer_norm(h, name = "norm"), {V}, name = "head"), [N, {V}]), k1, v1
}}

generate text(n, prompt: i32[1, P], temperature: float = 0.0, top_k: int = 0) {{
    cache = zeros([1, {HEADS}, {C}, {D // HEADS}])
    scan c in prompt, pos = full([1], -1, dtype = "i32"), logits = zeros([1, {V}]), k1 = cache, v1 = cache {{
        pos = pos + 1
        logits, k1, v1 = gpt_step(c, pos, k1, v1, name = "gpt")
    }}
    tokens = scan i in reshape(arange(n), [1, n]), pos = pos, logits = logits, k1 = k1, v1 = v1 {{
        tok = next_token(logits, temperature, top_k)
        pos = pos + 1
        logits, k1, v1 = gpt_step(tok, pos, k1, v1, name = "gpt")
        yield tok
    }}
    return reshape(tokens, [n])
}}

generate text_full(n, prompt: i32[1, P], temperature: float = 0.0, top_k: int = 0) {{
    scan c in prompt, pos = full([1], -1, dtype = "i32"), window = full([1, {C}], 0, dtype = "i32") {{
        pos = pos + 1
        window = where(iota([1, {C}], 1) == pos, reshape(c, [1, 1]), window)
    }}
    tokens = scan i in reshape(arange(n), [1, n]), pos = pos, window = window {{
        last = sum(where(reshape(iota([{C}], 0) == pos, [1, {C}, 1]), gpt(window), 0.0), axis = 1)
        tok = next_token(last, temperature, top_k)
        pos = pos + 1
        window = where(iota([1, {C}], 1) == pos, reshape(tok, [1, 1]), window)
        yield tok
    }}
    return reshape(tokens, [n])
}}
'''


# ---- the top_k primitive --------------------------------------------------------------------------
def np_top_k(x, k):
    """Independent: each row's k largest by a full sort, ties with the k-th kept."""
    out = np.full_like(x, -np.inf)
    for idx in np.ndindex(x.shape[:-1]):
        row = x[idx]
        kth = sorted(row.tolist(), reverse=True)[k - 1]
        out[idx] = [v if v >= kth else -np.inf for v in row]
    return out


def test_top_k_kernel_reference_and_ties():
    f = compile_function("model m(x: f64[B, 3, 7]) { return top_k(x, 3) }")
    x = np.random.default_rng(0).normal(size=(2, 3, 7))
    x[0, 0] = [1, 5, 5, 2, 5, 0, 1]                  # a tie at the 3rd largest: all three 5s stay
    x[0, 1] = [4, 3, 3, 3, 1, 0, 2]                  # a tie below the 2nd: the three 3s stay
    got = f(x=x)["output"]
    np.testing.assert_array_equal(got, np_top_k(x, 3))
    assert (np.isfinite(got[0, 0]) == [False, True, True, False, True, False, False]).all()
    assert np.isfinite(got[0, 1]).sum() == 4
    assert (np.isfinite(got[1:]).sum(-1) == 3).all()
    from compiler.ops import OPS
    np.testing.assert_array_equal(OPS["top_k"].ref(x, k=3), np_top_k(x, 3))


def test_top_k_gradient_passes_to_the_kept_logits():
    x = np.random.default_rng(1).normal(size=(3, 6))
    # (through a softmax: the dropped logits are -inf, and their probabilities 0)
    _, grads = grad_check(lambda g, n: g.add("softmax", g.add("top_k", n["x"], k=3)), {"x": x})
    kept = np.isfinite(np_top_k(x, 3))
    assert (grads["x"][~kept] == 0).all() and (grads["x"][kept] != 0).all()


@pytest.mark.parametrize("src,msg", [
    ("model m(x: f64[B, 5]) { return top_k(x, 6) }", "top_k: keeps 1 to 5 of the 5 classes, not 6"),
    ("model m(x: f64[B, 5]) { return top_k(x, 0) }", "k must be an integer >= 1"),
    ("model m(x: i32[B, 5]) { return top_k(x, 2) }", "top_k takes float logits"),
])
def test_top_k_mistakes(src, msg):
    with pytest.raises(DlcError, match=msg):
        compile_function(src)


# ---- a tiny GPT: the compiled decoders against NumPy -------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny GPT's file and a checkpoint of random weights (std 0.5: peaked predictions)."""
    from compiler.lower import Lowerer
    from dsl.parser import parse_file
    from runtime import checkpoint
    d = tmp_path_factory.mktemp("tiny")
    (d / "tiny.txt").write_text(TEXT)
    path = d / "tiny.dl"
    path.write_text(TINY)
    params = Lowerer(parse_file(path), "f32", training=False).lower_model("gpt").params
    rng = np.random.default_rng(5)              # (a seed whose greedy text is not one repeated character)
    values = {name: rng.normal(0, 0.5, size=p.shape).astype(np.float32) for name, p in params.items()}
    checkpoint.save(d / "ck.safetensors", values, {}, {})
    return path, d / "ck.safetensors", {k: v.astype(np.float64) for k, v in values.items()}


def np_gpt(p, ids):
    """The tiny GPT's logits [T, V] for ids [T], in NumPy (float64)."""
    def ln(z, name):
        mu = z.mean(-1, keepdims=True)
        var = ((z - mu) ** 2).mean(-1, keepdims=True)
        return (z - mu) / np.sqrt(var + 1e-5) * p[f"{name}/gamma"] + p[f"{name}/beta"]
    T, dh = len(ids), D // HEADS
    h = p["gpt/tokens/E"][ids] + p["gpt/learned_positions_1/P"][:T]
    a, m = ln(h, "gpt/block1/layer_norm_1"), "gpt/block1/multi_head_attention_1/"
    q, k, v = ((a @ p[m + f"W{c}"] + p[m + f"b{c}"]).reshape(T, HEADS, dh).transpose(1, 0, 2) for c in "qkv")
    s = np.where(np.tril(np.ones((T, T), bool)), q @ k.transpose(0, 2, 1) / np.sqrt(dh), -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    o = (w / w.sum(-1, keepdims=True)) @ v
    h = h + o.transpose(1, 0, 2).reshape(T, D) @ p[m + "Wo"] + p[m + "bo"]
    f = ln(h, "gpt/block1/layer_norm_2") @ p["gpt/block1/feed_forward_1/dense_1/W"] + p["gpt/block1/feed_forward_1/dense_1/b"]
    f = 0.5 * f * (1 + np.tanh(np.sqrt(2 / np.pi) * (f + 0.044715 * f ** 3)))
    h = h + f @ p["gpt/block1/feed_forward_1/dense_2/W"] + p["gpt/block1/feed_forward_1/dense_2/b"]
    return ln(h, "gpt/norm") @ p["gpt/head/W"] + p["gpt/head/b"]


def np_decode(p, prompt, n, temperature=0.0, top_k=0, seed=0):
    """A plain loop: the window slides by half the context when the text fills it; token i is
    drawn with the stream's seed + i (the one `sample` call site: salt 1)."""
    ids, start = list(prompt), (0 if len(prompt) < C else len(prompt) - C // 2)
    for i in range(n):
        if len(ids) - start >= C:
            start = len(ids) - C // 2
        z = np_gpt(p, np.array(ids[start:]))[-1]
        if top_k:
            z = np.where(z >= np.sort(z)[-top_k], z, -np.inf)
        if temperature == 0:
            ids.append(int(np.argmax(z)))
            continue
        cdf = np.cumsum(np.exp((z - z.max()) / temperature))
        u = uniform_ref(seed + i, 1, 1)[0] * cdf[-1]
        ids.append(min(int(np.searchsorted(cdf, u, side="right")), V - 1))
    return ids[len(prompt):]


@pytest.fixture(scope="module")
def samplers(tiny):
    from runtime.sample import Sampler
    path, ck, _ = tiny
    made = {}

    def get(program, temperature=0.0, top_k=0):
        key = (program, temperature, top_k)
        if key not in made:
            made[key] = Sampler(path, program, "f64", options={"temperature": temperature, "top_k": top_k})
            made[key].load(ck)
        return made[key]
    return get


PROMPT = [CHARS.index(c) for c in "the "]


@pytest.mark.parametrize("program", ["text", pytest.param("text_full", marks=pytest.mark.slow)])
def test_greedy_decoding_matches_numpy_across_window_slides(tiny, samplers, program):
    from runtime.sample import generate_text
    ref = np_decode(tiny[2], PROMPT, 20)
    assert generate_text(samplers(program), PROMPT, 20, C) == ref       # 20 characters: 4 windows of 8
    assert len(set(ref)) > 1


@pytest.mark.parametrize("program", ["text", "text_full"])
def test_seeded_top_k_sampling_matches_numpy(tiny, samplers, program):
    from runtime.sample import generate_text
    s = samplers(program, 0.8, 5)
    for seed in (0, 7):
        assert generate_text(s, PROMPT, 20, C, seed) == np_decode(tiny[2], PROMPT, 20, 0.8, 5, seed)
    assert generate_text(s, PROMPT, 20, C, 0) != generate_text(s, PROMPT, 20, C, 7)


def test_cached_step_writes_the_caches_of_the_positions_seen(tiny, samplers):
    """A long prompt starts the window at its last half context; any cut of the text into
    calls gives the same characters (a call draws from the seed plus the characters before)."""
    from runtime.sample import generate_text
    s = samplers("text", 0.8, 5)
    long = [CHARS.index(c) for c in "over the lazy do"]           # 16 > C characters
    assert generate_text(s, long, 12, C, 3) == np_decode(tiny[2], long, 12, 0.8, 5, 3)
    first = generate_text(s, PROMPT, 3, C, 3)
    assert generate_text(s, PROMPT + first, 2, C, 3 + 3) == generate_text(s, PROMPT, 5, C, 3)[3:]


def test_cli_prints_text_json_and_attention(tiny, capsys, tmp_path):
    import json

    from runtime.cli import main
    from runtime.sample import attention_maps
    path, ck, p = tiny
    png = tmp_path / "attention.png"
    assert main(["sample", str(path), "--load", str(ck), "--prompt", "the ", "-n", "12", "--temperature", "0.8",
                 "--top-k", "5", "--seed", "3", "--json", "--attention", str(png), "--dtype", "f64"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["text"] == "".join(CHARS[t] for t in np_decode(p, PROMPT, 12, 0.8, 5, 3))
    assert out["tokens"] == 12 and out["tokens_per_s"] > 0 and out["top_k"] == 5
    assert png.stat().st_size > 1000
    maps, window = attention_maps(path, ck, PROMPT + [1, 2], "f64")
    (label, w), = maps
    assert label == "layer 1 (tiny.dl:4)" and w.shape == (HEADS, 6, 6) and window == PROMPT + [1, 2]
    np.testing.assert_allclose(w.sum(-1), 1, rtol=1e-12)
    assert (w[:, np.triu_indices(6, 1)[0], np.triu_indices(6, 1)[1]] == 0).all()      # causal


@pytest.mark.parametrize("argv,msg", [
    (["--prompt", "THE"], "the prompt has characters the model never saw: 'EHT'"),
    (["--top-k", "99"], "top_k: keeps 1 to 28 of the 28 classes, not 99"),
    (["--program", "nope"], "unknown sampling program `nope`"),
])
def test_sample_mistakes(tiny, capsys, argv, msg):
    from runtime.cli import main
    path, ck, _ = tiny
    assert main(["sample", str(path), "--load", str(ck), "-n", "3"] + argv) == 2
    assert msg in capsys.readouterr().err


def test_options_and_inputs_of_a_generate_block_are_checked(dl_file):
    from compiler.lower import Lowerer
    from dsl.parser import parse_file
    src = "generate g(n, x: i32[1, P], t: float) { return zeros([n, 2]) }"
    with pytest.raises(DlcError, match="option `t` of `g` needs a default value"):
        Lowerer(parse_file(dl_file(src)), training=False).lower_generate("g")
    src = "generate g(n, t: float = 1.0) { return zeros([n, 2]) * t }"
    with pytest.raises(DlcError, match="takes no option `top_k`"):
        Lowerer(parse_file(dl_file(src)), training=False).lower_generate("g", {"top_k": 3})


@pytest.mark.slow
def test_gpt_example_samples_with_and_without_the_cache(tmp_path):
    """examples/gpt.dl, briefly trained: the cached decode gives the full recompute's
    characters (greedy and sampled, float32) and is faster."""
    from runtime.sample import Sampler, generate_text
    from runtime.session import Options, Session
    s = Session(ROOT / "examples" / "gpt.dl", Options(threads=1, epochs=1))
    s.fit(progress=False)
    s.save(tmp_path / "gpt.safetensors")
    vocab = s.dataset.info["vocab"]
    prompt = [vocab.index(c) for c in "def "]
    for opts in ({}, {"temperature": 0.8, "top_k": 10}):
        got = {}
        for program in ("text", "text_full"):
            sm = Sampler(ROOT / "examples" / "gpt.dl", program, options=opts)
            sm.load(tmp_path / "gpt.safetensors")
            got[program] = generate_text(sm, prompt, 100, 64, seed=1)
        assert got["text"] == got["text_full"], opts
