#!/usr/bin/env python3
"""Builds the deepseek2 reference nobody here wrote: a tiny random DeepseekV3ForCausalLM from
Hugging Face transformers with the shape of ktune's `tiny-deepseek` preset (MLA with compressed
queries, YaRN, sigmoid routing with a selection bias over 4 groups of which 2 are searched, one
shared expert, one dense leading layer), saved with save_pretrained, plus its logits for a fixed
prompt and continuation.

Run on a machine with torch + transformers (the GPU machine has torch 2.11, transformers 5.17):
    python3 tests/reference/make_deepseek_fixture.py tests/data/deepseek-v3-tiny-hf

Writes into OUT: config.json + model.safetensors (float32, as save_pretrained writes them) and
reference.json with the logits of every prompt position ("prefill") and of each continuation
token fed one at a time with the KV cache ("decode"), computed in float64 from the same float32
weights; plus what transformers derived from the config (rope inv_freq, the cos/sin factor, the
attention softmax scale) so a mismatch can be told apart from an engine bug.
tests/unit/test_deepseek_hf_reference.cpp compares ktune with it and skips while OUT is absent.

The shape must stay equal to engine/model/presets.cpp's tiny-deepseek (the test checks it).
"""
import json
import math
import os
import sys

import torch
import transformers
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

SEED = 4321
PROMPT = [5, 77, 200, 31, 142, 9, 250, 100, 1, 0, 255]
CONTINUATION = [17, 230, 64, 3, 128]

# tiny-deepseek (engine/model/presets.cpp). max_position_embeddings = factor x original: some
# transformers versions take the YaRN factor from their ratio, others from `factor`; equal here.
SHAPE = dict(
    vocab_size=256,
    hidden_size=128,
    intermediate_size=256,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_shared_experts=1,
    n_routed_experts=16,
    routed_scaling_factor=2.5,
    kv_lora_rank=64,
    q_lora_rank=64,
    qk_rope_head_dim=16,
    v_head_dim=32,
    qk_nope_head_dim=32,
    n_group=4,
    topk_group=2,
    num_experts_per_tok=4,
    first_k_dense_replace=1,
    norm_topk_prob=True,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    rope_interleave=True,
    tie_word_embeddings=False,
    attention_bias=False,
)
ROPE = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 1024,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}


def make_config() -> DeepseekV3Config:
    try:  # transformers 5: rope_parameters holds theta and the scaling together
        cfg = DeepseekV3Config(**SHAPE, rope_parameters=dict(ROPE))
    except TypeError:  # transformers 4
        scaling = {k: v for k, v in ROPE.items() if k != "rope_theta"}
        cfg = DeepseekV3Config(**SHAPE, rope_theta=ROPE["rope_theta"], rope_scaling=scaling)
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    print("rope settings as transformers keeps them:", rope)
    assert (rope.get("rope_type") or rope.get("type")) == "yarn", rope
    assert getattr(cfg, "rope_interleave", True) is True, "this transformers rotates halves"
    cfg._attn_implementation = "eager"
    return cfg


def redraw(model: torch.nn.Module) -> None:
    """HF's init (std 0.02, norms 1) gives nearly flat logits; re-draw every parameter so each
    part of the network matters: linear weights with std 1/sqrt(fan_in), embeddings std 1, norm
    weights around 1 (so a missing q_a/kv_a norm shows), router rows sharper than the rest so
    routing decisions are clear-cut. The selection bias is positive (0..0.3): transformers
    versions differ in whether excluded groups are masked with 0 or -inf, which only agree while
    every biased score is positive (sigmoid scores are)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.copy_(torch.randn_like(p))
            elif name.endswith("mlp.gate.weight"):
                p.copy_(torch.randn_like(p) * 3.0 / math.sqrt(p.shape[-1]))
            elif "e_score_correction_bias" in name:
                p.copy_(0.3 * torch.rand_like(p))
            else:
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1]))
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:  # a buffer in some versions
                b.copy_(0.3 * torch.rand_like(b))


def main() -> None:
    out = sys.argv[1] if len(sys.argv) > 1 else "deepseek-v3-tiny-hf"
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(SEED)
    model = DeepseekV3ForCausalLM(make_config()).eval()
    redraw(model)
    model.save_pretrained(out, safe_serialization=True)

    # Reference logits in float64 from exactly the saved float32 weights; the grouped-matmul
    # experts path has no float64 kernel, so ask for the eager loop over experts.
    try:
        model64 = DeepseekV3ForCausalLM.from_pretrained(
            out, dtype=torch.float32, attn_implementation="eager",
            experts_implementation="eager").eval().double()
    except TypeError:
        model64 = DeepseekV3ForCausalLM.from_pretrained(out, dtype=torch.float32).eval().double()
        model64.config._experts_implementation = "eager"
    print("experts implementation:", getattr(model64.config, "_experts_implementation", "?"))

    # What transformers derived from the config (ktune's test compares its own derivation).
    rotary = model64.model.rotary_emb
    attn0 = model64.model.layers[0].self_attn
    derived = {
        "inv_freq": [float(v) for v in rotary.inv_freq.tolist()],
        "cos_sin_scale": float(rotary.attention_scaling),
        "softmax_scale": float(attn0.scaling),
    }
    print("derived rope:", derived)

    with torch.no_grad():
        pre = model64(torch.tensor([PROMPT]), use_cache=True)
        prefill = pre.logits[0].tolist()
        past = pre.past_key_values
        decode = []
        for tok in CONTINUATION:
            step = model64(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
            past = step.past_key_values
            decode.append(step.logits[0, -1].tolist())
        # Cross-check: one pass over prompt + continuation must agree with prefill + decode.
        full = model64(torch.tensor([PROMPT + CONTINUATION])).logits[0]
        worst = max(
            max(abs(a - b) for a, b in zip(full[len(PROMPT) + i].tolist(), decode[i]))
            for i in range(len(CONTINUATION)))
        print(f"full-sequence vs cached decode max |diff| = {worst:.3g}")

        # Routing of the prompt's tokens in the first MoE layer, for diagnosis: which experts
        # each token chose (the router re-run on that layer's input). Best effort: the router's
        # interface differs between transformers versions.
        chosen = None
        try:
            captured = {}
            moe_layer = SHAPE["first_k_dense_replace"]
            mlp = model64.model.layers[moe_layer].mlp
            handle = mlp.register_forward_hook(lambda m, i, o: captured.setdefault("x", i[0]))
            model64(torch.tensor([PROMPT]))
            handle.remove()
            x = captured["x"].reshape(-1, SHAPE["hidden_size"])
            if hasattr(mlp, "route_tokens_to_experts"):
                indices = mlp.route_tokens_to_experts(mlp.gate(x))[0]
            else:
                indices = mlp.gate(x)[0]
            chosen = [sorted(int(e) for e in row) for row in indices.tolist()]
            print("experts chosen in layer", moe_layer, ":", chosen)
        except Exception as e:  # noqa: BLE001 - diagnosis only
            print("could not record the routing:", e)

    ref = {
        "generator": "tests/reference/make_deepseek_fixture.py",
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "seed": SEED,
        "reference_dtype": "float64",
        "prompt": PROMPT,
        "continuation": CONTINUATION,
        "hf_rope": derived,
        "first_moe_layer_experts": chosen,
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
