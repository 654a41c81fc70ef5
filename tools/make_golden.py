#!/usr/bin/env python3
"""Golden fixtures: tiny random-weight Hugging Face models and their expected outputs.

Usage:
    python3 tools/make_golden.py OUTDIR          # e.g. OUTDIR = tests/fixtures/golden

Needs torch, transformers (5.x: configs are written with `rope_parameters`), tokenizers and
safetensors (see tools/requirements.txt). Runs on the CPU in well under a minute. Everything is
seeded, so a re-run with the same library versions reproduces the same files.

For each model OUTDIR/<name>/ holds what `save_pretrained` writes (config.json,
generation_config.json, model.safetensors, tokenizer.json, tokenizer_config.json, and for
llama-gqa-bf16 chat_template.jinja) plus expected.json:

    {"name", "dtype", "transformers_version", "torch_version", "max_new_tokens",
     "cases": [{"prompt", "input_ids", "greedy_ids", "last_logits", "min_top2_margin"}]}

- input_ids: exactly tokenizer(prompt)["input_ids"]; none of these tokenizers adds special tokens.
- greedy_ids: MAX_NEW_TOKENS tokens, EOS does not stop generation. Each step calls the full model
  on the whole sequence (use_cache=False, eager attention) and takes the argmax at the last position.
- last_logits: float32 logits at the last prompt position (vocab entries).
- min_top2_margin: the smallest top1 - top2 logit gap over the greedy steps. Seeds are re-picked
  until every case's gap is at least MIN_MARGIN, so an f32 engine's argmax cannot flip on rounding.

Models (all float32 unless noted):
- llama-gqa: LlamaForCausalLM, hidden 64, 2 layers, 4 heads / 2 KV heads (GQA), intermediate 128,
  rope theta 1e4 with llama3 rope scaling (factor 8, low 1, high 4, original max positions 32: with
  head_dim 16 this leaves some frequencies unchanged, divides some by 8 and smooths one), untied
  lm_head. Its tokenizer_config.json carries a chat template.
- llama-gqa-bf16: the same weights rounded to bfloat16 and saved in bfloat16; expected.json is float32
  math over the bf16-rounded weights. Its chat template is saved the transformers 5 default way,
  as chat_template.jinja.
- qwen2-tied: Qwen2ForCausalLM, same sizes, q/k/v biases, rope theta 1e6, tied embeddings.
- opt: OPTForCausalLM, hidden 64, 2 layers, 4 heads, ffn 128, pre-layer-norm, relu, learned
  positions (table of max_position_embeddings + 2, OPT's offset 2), tied embeddings.
"""

import copy
import json
import os
import sys

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

MAX_NEW_TOKENS = 12
MIN_MARGIN = 1e-2  # stricter than needed (1e-3): f32 engines differ from torch by ~1e-5
VOCAB_SIZE = 400
MAX_SEED_TRIES = 200

TRAIN_TEXT = """\
The old lighthouse stood at the edge of the harbour, where the land gave way to the sea. For more
than a hundred years its keepers had climbed the narrow stairs every evening to light the great
lamp, and every morning they came down again, tired but proud of the work they had done. Ships
from many countries passed the point at night, and their captains knew that the steady light
meant safety: the rocks were close, the water was deep, and the way into the harbour was clear.
In the town below, the people lived simple lives. Fishermen mended their nets on the beach,
children ran between the boats, and the baker opened his shop before the sun was up. On market
days the square was full of voices. Farmers from the hills brought apples, cheese, eggs and wool,
and traders from the city came with cloth, tools and news of the wider world. When the weather
turned and the wind blew hard from the west, everyone stayed inside. The waves broke over the
harbour wall, the rain beat against the windows, and the light on the point kept turning, hour
after hour, until the storm was over and the morning came again. Today the lamp is electric and
no keeper lives in the tower, but the people of the town still look up at it in the evening, and
they still tell their children the stories of the men and women who kept the light burning.
"""

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<s>user: ' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'assistant: ' + message['content'] + '</s>\\n' }}"
    "{% else %}{{ message['role'] + ': ' + message['content'] + '\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
)

# Prompts of 1, ~5, ~20 and ~40 tokens (the exact counts are checked below).
PROMPTS = [
    "The",
    "In the town the",
    "Ships from many countries passed the point at night.",
    "When the wind blew hard from the west, everyone stayed inside and the rain beat against the "
    "windows.",
]
PROMPT_TOKEN_RANGES = [(1, 1), (4, 7), (16, 28), (34, 50)]


def build_tokenizer():
    """Byte-level BPE (~400 tokens) trained on TRAIN_TEXT, wrapped as a transformers tokenizer."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TRAIN_TEXT.splitlines(keepends=True), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        clean_up_tokenization_spaces=False,
        model_max_length=256,
    )
    return fast


def check_prompts(tokenizer):
    for prompt, (lo, hi) in zip(PROMPTS, PROMPT_TOKEN_RANGES):
        ids = tokenizer(prompt)["input_ids"]
        assert lo <= len(ids) <= hi, (prompt, len(ids), ids)
        assert tokenizer.decode(ids) == prompt, (prompt, tokenizer.decode(ids))


def special_ids(tokenizer):
    return dict(
        bos_token_id=tokenizer.convert_tokens_to_ids("<s>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("</s>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<pad>"),
    )


def llama_config(vocab, ids):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_act="silu",
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
        attention_bias=False,
        mlp_bias=False,
        attn_implementation="eager",
        **ids,
    )


def qwen2_config(vocab, ids):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_act="silu",
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        use_sliding_window=False,
        max_window_layers=2,
        attn_implementation="eager",
        **ids,
    )


def opt_config(vocab, ids):
    from transformers import OPTConfig

    return OPTConfig(
        vocab_size=vocab,
        hidden_size=64,
        num_hidden_layers=2,
        ffn_dim=128,
        num_attention_heads=4,
        max_position_embeddings=256,
        do_layer_norm_before=True,
        word_embed_proj_dim=64,
        activation_function="relu",
        enable_bias=True,
        layer_norm_elementwise_affine=True,
        dropout=0.0,
        attention_dropout=0.0,
        layerdrop=0.0,
        tie_word_embeddings=True,
        attn_implementation="eager",
        **ids,
    )


def build_model(cls, config, seed):
    """Model of class cls with all parameters drawn from a seeded generator, in eval mode."""
    import torch

    torch.manual_seed(seed)
    model = cls(config).eval()
    if config.tie_word_embeddings and not tied(model):
        model.tie_weights()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # named_parameters() yields a tied parameter once.
        for name, p in sorted(model.named_parameters()):
            if p.dim() >= 2:  # projections, embeddings, lm_head
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            else:  # rms/layer norm gains
                p.copy_(1.0 + torch.randn(p.shape, generator=g) * 0.1)
    assert tied(model) == bool(config.tie_word_embeddings), "lm_head tying is not what the config says"
    return model


def tied(model):
    return model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def run_cases(model, tokenizer):
    import torch

    cases = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tokenizer(prompt)["input_ids"]
            seq = list(ids)
            greedy, margins, last_logits = [], [], None
            for step in range(MAX_NEW_TOKENS):
                out = model(input_ids=torch.tensor([seq], dtype=torch.long), use_cache=False)
                logits = out.logits[0, -1].to(torch.float32)
                if step == 0:
                    last_logits = [float(x) for x in logits.tolist()]
                top2 = torch.topk(logits, 2).values
                margins.append(float(top2[0] - top2[1]))
                nxt = int(torch.argmax(logits))
                greedy.append(nxt)
                seq.append(nxt)
            cases.append(
                {
                    "prompt": prompt,
                    "input_ids": [int(i) for i in ids],
                    "greedy_ids": greedy,
                    "last_logits": last_logits,
                    "min_top2_margin": min(margins),
                }
            )
    return cases


def expected_json(name, dtype, cases):
    import torch
    import transformers

    return {
        "name": name,
        "dtype": dtype,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "max_new_tokens": MAX_NEW_TOKENS,
        "cases": cases,
    }


def ok(cases):
    return min(c["min_top2_margin"] for c in cases) >= MIN_MARGIN


def pick(name, make, tokenizer, base_seed, also=None):
    """First seed from base_seed whose model (and also(model), if given) has well-separated argmaxes."""
    for seed in range(base_seed, base_seed + MAX_SEED_TRIES):
        model = make(seed)
        cases = run_cases(model, tokenizer)
        extra = also(model) if also else None
        if ok(cases) and (extra is None or ok(extra[1])):
            print(f"{name}: seed {seed}, attention {model.config._attn_implementation}")
            return model, cases, extra
        print(f"{name}: seed {seed} rejected (argmax margin below {MIN_MARGIN})")
    raise SystemExit(f"{name}: no seed in {MAX_SEED_TRIES} tries gives margins >= {MIN_MARGIN}")


def save(outdir, name, model, tokenizer, expected, save_jinja_files=False):
    d = os.path.join(outdir, name)
    os.makedirs(d, exist_ok=True)
    model.save_pretrained(d)
    tokenizer.save_pretrained(d, save_jinja_files=save_jinja_files)
    if not os.path.exists(os.path.join(d, "generation_config.json")):
        from transformers import GenerationConfig

        GenerationConfig.from_model_config(model.config).save_pretrained(d)
    with open(os.path.join(d, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
        f.write("\n")
    report(d, expected)


def report(d, expected):
    from safetensors import safe_open

    with safe_open(os.path.join(d, "model.safetensors"), "pt") as f:
        tensors = {k: (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in f.keys()}
    print(f"== {d}: files {sorted(os.listdir(d))}")
    for k in sorted(tensors):
        print(f"   {k} {tensors[k][0]} {tensors[k][1]}")
    for c in expected["cases"]:
        print(
            f"   prompt {len(c['input_ids']):2d} tokens -> greedy {c['greedy_ids']} "
            f"min_top2_margin {c['min_top2_margin']:.4f}"
        )


def verify_reload(d):
    """Reload a saved fixture with from_pretrained (upcast to f32) and check it reproduces expected.json."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with open(os.path.join(d, "expected.json")) as f:
        expected = json.load(f)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(d)
    worst = 0.0
    with torch.no_grad():
        for c in expected["cases"]:
            assert tokenizer(c["prompt"])["input_ids"] == c["input_ids"], d
            logits = model(input_ids=torch.tensor([c["input_ids"]]), use_cache=False).logits[0, -1]
            worst = max(worst, float((logits - torch.tensor(c["last_logits"])).abs().max()))
    print(f"reload check {d}: max |logit diff| {worst:.2e}")
    assert worst < 1e-4, (d, worst)


def main():
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    outdir = sys.argv[1]

    import torch
    from transformers import LlamaForCausalLM, OPTForCausalLM, Qwen2ForCausalLM

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)

    tokenizer = build_tokenizer()
    check_prompts(tokenizer)
    vocab = len(tokenizer)
    ids = special_ids(tokenizer)
    print(f"tokenizer: {vocab} tokens, special ids {ids}")
    for p in PROMPTS:
        print(f"   {len(tokenizer(p)['input_ids']):2d} tokens: {p!r}")

    chat_tokenizer = copy.deepcopy(tokenizer)
    chat_tokenizer.chat_template = CHAT_TEMPLATE

    def bf16_variant(model):
        bf16 = copy.deepcopy(model).to(torch.bfloat16)
        # f32 math over bf16-rounded weights. A fresh f32 model (not bf16.to(float32)), so that
        # buffers such as the rotary inv_freq are not bf16-rounded too.
        ref = type(model)(model.config).eval()
        ref.load_state_dict({k: v.to(torch.float32) for k, v in bf16.state_dict().items()})
        return bf16, run_cases(ref, tokenizer)

    llama, llama_cases, (llama_bf16, bf16_cases) = pick(
        "llama-gqa",
        lambda s: build_model(LlamaForCausalLM, llama_config(vocab, ids), s),
        tokenizer,
        1000,
        also=bf16_variant,
    )
    save(outdir, "llama-gqa", llama, chat_tokenizer, expected_json("llama-gqa", "float32", llama_cases))
    save(
        outdir,
        "llama-gqa-bf16",
        llama_bf16,
        chat_tokenizer,
        expected_json("llama-gqa-bf16", "bfloat16", bf16_cases),
        save_jinja_files=True,
    )

    qwen, qwen_cases, _ = pick(
        "qwen2-tied", lambda s: build_model(Qwen2ForCausalLM, qwen2_config(vocab, ids), s), tokenizer, 2000
    )
    save(outdir, "qwen2-tied", qwen, tokenizer, expected_json("qwen2-tied", "float32", qwen_cases))

    opt, opt_cases, _ = pick(
        "opt", lambda s: build_model(OPTForCausalLM, opt_config(vocab, ids), s), tokenizer, 3000
    )
    save(outdir, "opt", opt, tokenizer, expected_json("opt", "float32", opt_cases))

    for name in ("llama-gqa", "llama-gqa-bf16", "qwen2-tied", "opt"):
        verify_reload(os.path.join(outdir, name))

    total = 0
    for root, _, files in os.walk(outdir):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    print(f"total size {total / 1e6:.2f} MB")
    assert total < 3e6, total


if __name__ == "__main__":
    main()
