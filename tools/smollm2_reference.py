#!/usr/bin/env python3
"""Reference outputs for SmolLM2-135M-Instruct (Q4_1 GGUF) from an independent numpy implementation.

Writes tests/fixtures/smollm2/reference.json, which the Rust tests compare the engine against.

Usage (from the repository root):
    scripts/get-smollm2.sh                      # fetches models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    python3 -m pip install -r tools/requirements.txt
    python3 tools/smollm2_reference.py [--model PATH] [--out PATH]

Dependencies: numpy, gguf (the llama.cpp project's Python package, for GGUFReader and dequantize),
tokenizers (Hugging Face, for the BPE tokenizer), jinja2 (chat template). No torch, no transformers.

How it works
- Weights: every tensor is read with gguf.GGUFReader and dequantized with gguf.quants.dequantize
  (Q4_1 / Q8_0 -> float32, exactly as llama.cpp dequantizes), then widened to float64.
- Math: the whole forward pass runs in float64 (the model is small enough), so the reference is as
  close to "exact math over the dequantized weights" as is practical. An f32 engine will differ
  slightly (rounding over 30 layers), so compare logits with a tolerance. Takes ~3 minutes on 2 cores.
- Attention Q/K layout: llama.cpp's convert_hf_to_gguf permutes the rows of q_proj/k_proj
  (w.reshape(n_head, 2, hd//2, dim).swapaxes(1, 2)) so that its "normal" RoPE rotates adjacent pairs.
  We INVERT that permutation to get back Hugging Face's layout and then use HF's rotate-half RoPE
  (pairs (i, i + hd/2)). As a self-check, the script also runs one prompt with the GGUF layout kept
  and interleaved (GPT-J style, pairs (2i, 2i+1)) RoPE and asserts that the logits agree.
- No KV cache: each greedy step recomputes the whole sequence (causal mask), so nothing depends on
  cache code.
- Tokenizer: built here with the `tokenizers` library straight from the GGUF metadata
  (tokenizer.ggml.tokens / merges / token_type): byte-level BPE; pre-tokenizer = individual digits,
  then the GPT-2 regex (what llama.cpp's "smollm" pre-tokenizer type and SmolLM2's own
  tokenizer.json do); tokens of type CONTROL (3) are special added tokens. No BOS is added
  (tokenizer.ggml.add_bos_token is false). transformers' GGUF tokenizer loading was not used: it
  needs torch, and the installed version only converts some architectures.
- Chat template: tokenizer.chat_template rendered with jinja2 (trim_blocks, lstrip_blocks, as
  transformers does), add_generation_prompt=True.
- Perplexity: no BOS; ppl = exp(mean over positions t = 1..n-1 of -log softmax(logits[t-1])[ids[t]]),
  i.e. the first token is not scored. shuffled_ppl uses the same ids permuted with
  numpy.random.default_rng(1234).permutation.
"""

import argparse
import hashlib
import json
import os
import sys

import numpy as np

import gguf
import jinja2
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = os.path.join(ROOT, "models", "smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
DEFAULT_OUT = os.path.join(ROOT, "tests", "fixtures", "smollm2", "reference.json")

GREEDY_STEPS = 16
TOP_K = 20
SAMPLE_IDS = [0, 100, 1000, 10000, 49151]
PROMPTS = ["The capital of France is", "def fibonacci(n):", "1 2 3 4 5 6"]
CHAT_USER_MESSAGE = "What is the capital of France?"
PPL_TEXT = (
    "The river runs slowly through the old town, past the market square and the stone bridge "
    "that was built more than three hundred years ago. In the morning, farmers bring fresh bread, "
    "cheese and vegetables to sell, and children walk to school along the water. In the evening, "
    "the lights of the small houses shine on the surface of the river, and people sit outside to "
    "talk about the weather, their families and the news of the day."
)


def field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def build_tokenizer(reader):
    tokens = field(reader, "tokenizer.ggml.tokens")
    merges = field(reader, "tokenizer.ggml.merges")
    types = field(reader, "tokenizer.ggml.token_type")
    assert field(reader, "tokenizer.ggml.model") == "gpt2", "expected a byte-level BPE vocabulary"
    pre = field(reader, "tokenizer.ggml.pre")
    assert pre == "smollm", f"pre-tokenizer {pre!r} not handled"
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == len(tokens), "duplicate tokens in the vocabulary"
    merge_pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merge_pairs, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    special = [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t == 3]
    tok.add_special_tokens(special)
    for s in special:
        assert tok.token_to_id(s.content) == vocab[s.content]
    return tok


def render_chat(reader, user_message):
    template = field(reader, "tokenizer.chat_template")
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(
        messages=[{"role": "user", "content": user_message}], add_generation_prompt=True
    )


class Model:
    def __init__(self, reader):
        arch = field(reader, "general.architecture")
        assert arch == "llama", arch
        self.n_layer = int(field(reader, "llama.block_count"))
        self.dim = int(field(reader, "llama.embedding_length"))
        self.n_head = int(field(reader, "llama.attention.head_count"))
        self.n_kv = int(field(reader, "llama.attention.head_count_kv"))
        self.ffn = int(field(reader, "llama.feed_forward_length"))
        self.theta = float(field(reader, "llama.rope.freq_base"))
        self.eps = float(field(reader, "llama.attention.layer_norm_rms_epsilon"))
        self.hd = self.dim // self.n_head
        assert int(field(reader, "llama.rope.dimension_count", self.hd)) == self.hd
        assert field(reader, "llama.rope.scaling.type") in (None, "none")
        self.types = {}
        w = {}
        for t in reader.tensors:
            self.types[t.name] = t.tensor_type.name
            a = gguf.quants.dequantize(t.data, t.tensor_type)
            shape = tuple(int(x) for x in reversed(list(t.shape)))  # GGUF lists ne0 (innermost) first
            w[t.name] = np.asarray(a, dtype=np.float32).reshape(shape).astype(np.float64)
        self.tied = "output.weight" not in w
        self.w = w
        self.embed = w["token_embd.weight"]
        self.lm_head = w["token_embd.weight"] if self.tied else w["output.weight"]
        self.vocab = self.embed.shape[0]
        # GGUF (llama.cpp) layout -> Hugging Face layout for q/k rows.
        self.wq = [self.unpermute(w[f"blk.{i}.attn_q.weight"], self.n_head) for i in range(self.n_layer)]
        self.wk = [self.unpermute(w[f"blk.{i}.attn_k.weight"], self.n_kv) for i in range(self.n_layer)]

    def unpermute(self, m, n_head):
        out, inp = m.shape
        hd = out // n_head
        return m.reshape(n_head, hd // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)

    def rmsnorm(self, x, g):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * g

    def rope(self, x, interleaved):
        # x: (heads, seq, hd)
        seq, hd = x.shape[1], x.shape[2]
        inv = 1.0 / (self.theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))  # (hd/2,)
        ang = np.arange(seq, dtype=np.float64)[:, None] * inv[None, :]  # (seq, hd/2)
        cos, sin = np.cos(ang), np.sin(ang)
        if interleaved:
            x1, x2 = x[..., 0::2], x[..., 1::2]
            out = np.empty_like(x)
            out[..., 0::2] = x1 * cos - x2 * sin
            out[..., 1::2] = x2 * cos + x1 * sin
            return out
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

    def forward(self, ids, gguf_layout=False):
        """Logits (seq, vocab) in float64 for the whole sequence."""
        n, hd, H, KV = len(ids), self.hd, self.n_head, self.n_kv
        x = self.embed[np.asarray(ids)]
        mask = np.triu(np.full((n, n), -np.inf), k=1)
        for i in range(self.n_layer):
            p = f"blk.{i}."
            h = self.rmsnorm(x, self.w[p + "attn_norm.weight"])
            wq = self.w[p + "attn_q.weight"] if gguf_layout else self.wq[i]
            wk = self.w[p + "attn_k.weight"] if gguf_layout else self.wk[i]
            q = (h @ wq.T).reshape(n, H, hd).transpose(1, 0, 2)
            k = (h @ wk.T).reshape(n, KV, hd).transpose(1, 0, 2)
            v = (h @ self.w[p + "attn_v.weight"].T).reshape(n, KV, hd).transpose(1, 0, 2)
            q, k = self.rope(q, gguf_layout), self.rope(k, gguf_layout)
            rep = H // KV
            k, v = np.repeat(k, rep, axis=0), np.repeat(v, rep, axis=0)  # head h uses kv head h // rep
            s = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + mask
            s = np.exp(s - s.max(axis=-1, keepdims=True))
            s /= s.sum(axis=-1, keepdims=True)
            o = (s @ v).transpose(1, 0, 2).reshape(n, H * hd)
            x = x + o @ self.w[p + "attn_output.weight"].T
            h = self.rmsnorm(x, self.w[p + "ffn_norm.weight"])
            g = h @ self.w[p + "ffn_gate.weight"].T
            u = h @ self.w[p + "ffn_up.weight"].T
            x = x + ((g / (1.0 + np.exp(-g))) * u) @ self.w[p + "ffn_down.weight"].T
        x = self.rmsnorm(x, self.w["output_norm.weight"])
        return x @ self.lm_head.T


def top2_margin(logits):
    a = np.partition(logits, -2)[-2:]
    return float(abs(a[1] - a[0]))


def run_case(model, tok, prompt, chat):
    ids = tok.encode(prompt, add_special_tokens=False).ids
    logits = model.forward(ids)[-1]
    order = np.argsort(-logits, kind="stable")[:TOP_K]
    seq = list(ids)
    greedy, margins = [], []
    step_logits = logits
    for step in range(GREEDY_STEPS):
        if step > 0:
            step_logits = model.forward(seq)[-1]
        nxt = int(np.argmax(step_logits))
        margins.append(top2_margin(step_logits))
        greedy.append(nxt)
        seq.append(nxt)
    return {
        "prompt": prompt,
        "chat": chat,
        "input_ids": [int(i) for i in ids],
        "greedy_ids": greedy,
        "last_logits_top": [[int(i), float(logits[i])] for i in order],
        "last_logits_sample": [[int(i), float(logits[i])] for i in SAMPLE_IDS],
    }, margins


def perplexity(model, ids):
    logits = model.forward(ids)[:-1]
    m = logits.max(axis=-1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(axis=-1, keepdims=True))
    nll = -logp[np.arange(len(ids) - 1), np.asarray(ids[1:])]
    return float(np.exp(nll.mean()))


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args()

    reader = gguf.GGUFReader(args.model)
    tok = build_tokenizer(reader)
    model = Model(reader)
    print(
        f"layers={model.n_layer} dim={model.dim} heads={model.n_head}/{model.n_kv} hd={model.hd} "
        f"ffn={model.ffn} vocab={model.vocab} theta={model.theta} eps={model.eps} tied={model.tied}"
    )
    print("tensor types:", sorted(set(model.types.values())), "token_embd:", model.types["token_embd.weight"])

    # Self-check: GGUF layout + interleaved RoPE == unpermuted (HF) layout + rotate-half RoPE.
    check_ids = tok.encode(PROMPTS[0]).ids
    a, b = model.forward(check_ids), model.forward(check_ids, gguf_layout=True)
    diff = float(np.max(np.abs(a - b)))
    print(f"layout self-check max |diff| = {diff:.3e}")
    assert diff < 1e-8, diff

    prompts = [(p, False) for p in PROMPTS] + [(render_chat(reader, CHAT_USER_MESSAGE), True)]
    cases = []
    worst = (float("inf"), None)
    for prompt, chat in prompts:
        case, margins = run_case(model, tok, prompt, chat)
        cases.append(case)
        text = tok.decode(case["greedy_ids"], skip_special_tokens=False)
        print(f"\nprompt {prompt!r} ids={case['input_ids']}")
        print(f"  greedy ids {case['greedy_ids']}")
        print(f"  greedy text {text!r}")
        print("  top1-top2 margins " + " ".join(f"{m:.4f}" for m in margins))
        low = [(i, m) for i, m in enumerate(margins) if m < 1e-2]
        if low:
            print(f"  WARNING near-tie (<1e-2) at steps {low}")
        if min(margins) < worst[0]:
            worst = (min(margins), prompt)
    print(f"\nsmallest greedy margin over all cases: {worst[0]:.4f} (prompt {worst[1]!r})")

    ppl_ids = tok.encode(PPL_TEXT).ids
    shuffled = [int(i) for i in np.random.default_rng(1234).permutation(np.asarray(ppl_ids))]
    ppl, sppl = perplexity(model, ppl_ids), perplexity(model, shuffled)
    print(f"perplexity: {len(ppl_ids)} tokens, ppl={ppl:.4f}, shuffled_ppl={sppl:.4f}")

    out = {
        "model_file": os.path.basename(args.model),
        "model_sha256": sha256(args.model),
        "tokenizer": (
            "tokenizers BPE built from GGUF metadata (tokens/merges; byte-level; pre-tokenizer: "
            "individual digits then GPT-2 regex; CONTROL tokens as special added tokens; no BOS added)"
        ),
        "cases": cases,
        "perplexity": {
            "text": PPL_TEXT,
            "input_ids": [int(i) for i in ppl_ids],
            "ppl": ppl,
            "shuffled_ids": shuffled,
            "shuffled_ppl": sppl,
        },
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
