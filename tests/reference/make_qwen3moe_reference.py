#!/usr/bin/env python3
"""Builds the reference nobody here wrote: a tiny random Qwen3MoeForCausalLM from Hugging Face
transformers, saved with save_pretrained, plus its logits for a fixed prompt and continuation.

Run on a machine with torch + transformers (the GPU machine has torch 2.11, transformers 5.17):
    python3 tests/reference/make_qwen3moe_reference.py tests/data/qwen3moe-tiny-hf

Writes into OUT: config.json + model.safetensors (float32, as save_pretrained writes them) and
reference.json with the logits of every prompt position ("prefill") and of each continuation
token fed one at a time with the KV cache ("decode"), computed in float64 from the same float32
weights, so the reference's own rounding is far below the 1e-4 tolerance the test uses.
"""
import json
import math
import os
import sys

import torch
import transformers
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

SEED = 1234
PROMPT = [5, 77, 200, 31, 142, 9, 250]
CONTINUATION = [17, 230, 64, 3]


def main() -> None:
    out = sys.argv[1] if len(sys.argv) > 1 else "qwen3moe-tiny-hf"
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(SEED)
    cfg = Qwen3MoeConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
        attention_bias=False,
    )
    cfg._attn_implementation = "eager"
    model = Qwen3MoeForCausalLM(cfg).eval()

    # HF's init (std 0.02, norms 1) gives nearly flat logits; re-draw every parameter so each
    # part of the network matters: linear weights with std 1/sqrt(fan_in), embeddings std 1,
    # norm weights around 1 (so a missing q/k norm shows), router rows sharper than the rest so
    # routing decisions are clear-cut.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.copy_(torch.randn_like(p))
            elif name.endswith("mlp.gate.weight"):
                p.copy_(torch.randn_like(p) * 3.0 / math.sqrt(p.shape[-1]))
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn_like(p) / math.sqrt(fan_in))

    model.save_pretrained(out, safe_serialization=True)

    # Reference logits in float64 from exactly the saved float32 weights.
    # The grouped-matmul experts path has no float64 kernel: ask for the eager loop over experts.
    try:
        model64 = Qwen3MoeForCausalLM.from_pretrained(
            out, dtype=torch.float32, attn_implementation="eager",
            experts_implementation="eager").eval().double()
    except TypeError:
        model64 = Qwen3MoeForCausalLM.from_pretrained(out, dtype=torch.float32).eval().double()
        model64.config._experts_implementation = "eager"
    print("experts implementation:", getattr(model64.config, "_experts_implementation", "?"))
    with torch.no_grad():
        pre = model64(torch.tensor([PROMPT]), use_cache=True)
        prefill = pre.logits[0].tolist()
        past = pre.past_key_values
        decode = []
        for i, tok in enumerate(CONTINUATION):
            step = model64(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
            past = step.past_key_values
            decode.append(step.logits[0, -1].tolist())
        # Cross-check: one pass over prompt + continuation must agree with prefill + decode.
        full = model64(torch.tensor([PROMPT + CONTINUATION])).logits[0]
        worst = max(
            max(abs(a - b) for a, b in zip(full[len(PROMPT) - 1 + i + 1].tolist(), decode[i]))
            for i in range(len(CONTINUATION)))
        print(f"full-sequence vs cached decode max |diff| = {worst:.3g}")

    ref = {
        "generator": "tests/reference/make_qwen3moe_reference.py",
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "seed": SEED,
        "reference_dtype": "float64",
        "prompt": PROMPT,
        "continuation": CONTINUATION,
        "prefill": [[round(v, 9) for v in row] for row in prefill],
        "decode": [[round(v, 9) for v in row] for row in decode],
    }
    with open(os.path.join(out, "reference.json"), "w") as f:
        json.dump(ref, f)
    from safetensors import safe_open
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        for k in sorted(f.keys()):
            print(k, tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype())
    print(open(os.path.join(out, "config.json")).read())
    print("wrote", out, sorted(os.listdir(out)))


if __name__ == "__main__":
    main()
