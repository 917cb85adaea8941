#!/usr/bin/env python3
"""One MoE layer of a Qwen3-30B-A3B-like model, decoded token by token in PyTorch, four ways:

  unfused        the way Python MoE code often runs: router on the GPU, the selected experts read
                 back to the host (.tolist()), then a Python loop with three matmuls per selected
                 expert (eager launches, one host sync per step)
  unfused-graph  the same loop cannot be captured in a CUDA graph: the host read (.tolist()) is a
                 device-to-host sync, which capture forbids, and the loop's shape depends on the
                 values read. This mode says so and runs eagerly (--try-capture attempts the
                 capture first and prints PyTorch's error).
  fused          no host read: the top-k expert weights are gathered on the device and applied
                 with batched matmuls (torch.bmm) - the same launches every step
  fused-graph    the fused step captured once in a torch.cuda.CUDAGraph and replayed

Every step is one NVTX range "decode_step" (torch.cuda.nvtx.range_push/pop) with inner ranges
"router" and "moe_experts", so `ktune profile --exec` finds the steps and the phases by itself:

  ktune profile --exec -o unfused.json -- python3 tools/exec-demo/moe_torch.py --mode unfused
  ktune compare unfused.json fused-graph.json

Shapes (bf16): hidden 2048, 128 experts, top-8, expert ffn 768 (gate, up: 2048x768; down:
768x2048), batch 1 (decode). The layer's weights are random (seeded); the point is the launch
pattern, not the numbers. `--check` compares the fused output with the unfused one.
"""
import argparse
import sys
import time

import torch

HIDDEN, EXPERTS, TOPK, FFN = 2048, 128, 8, 768


def make_layer(device, dtype, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    s = HIDDEN ** -0.5

    def rnd(*shape, scale):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    return {
        "router": rnd(EXPERTS, HIDDEN, scale=s),
        "gate": rnd(EXPERTS, FFN, HIDDEN, scale=s),
        "up": rnd(EXPERTS, FFN, HIDDEN, scale=s),
        "down": rnd(EXPERTS, HIDDEN, FFN, scale=FFN ** -0.5),
    }


def route(layer, x):
    logits = x @ layer["router"].t()                      # [1, E]
    probs = torch.softmax(logits.float(), dim=-1)
    w, ids = torch.topk(probs, TOPK, dim=-1)              # [1, K]
    w = (w / w.sum(dim=-1, keepdim=True)).to(x.dtype)
    return w, ids


def step_unfused(layer, x):
    """Per-expert launches with the routing read on the host (a sync every step)."""
    nvtx = torch.cuda.nvtx
    nvtx.range_push("router")
    w, ids = route(layer, x)
    ids_host = ids[0].tolist()                            # device -> host: the step waits here
    w_host = w[0]
    nvtx.range_pop()
    nvtx.range_push("moe_experts")
    out = torch.zeros_like(x)
    for k, e in enumerate(ids_host):
        h = torch.nn.functional.silu(x @ layer["gate"][e].t()) * (x @ layer["up"][e].t())
        out = out + w_host[k] * (h @ layer["down"][e].t())
    nvtx.range_pop()
    return out


def step_fused(layer, x):
    """No host read: gather the selected experts' weights and run batched matmuls."""
    nvtx = torch.cuda.nvtx
    nvtx.range_push("router")
    w, ids = route(layer, x)
    nvtx.range_pop()
    nvtx.range_push("moe_experts")
    idx = ids[0]                                          # [K], stays on the device
    xb = x.expand(TOPK, -1).unsqueeze(1)                  # [K, 1, H]
    g = torch.bmm(xb, layer["gate"].index_select(0, idx).transpose(1, 2))  # [K, 1, F]
    u = torch.bmm(xb, layer["up"].index_select(0, idx).transpose(1, 2))
    h = torch.nn.functional.silu(g) * u
    y = torch.bmm(h, layer["down"].index_select(0, idx).transpose(1, 2))   # [K, 1, H]
    out = (w[0].view(TOPK, 1, 1) * y).sum(dim=0)          # [1, H]
    nvtx.range_pop()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["unfused", "unfused-graph", "fused", "fused-graph"],
                    required=True)
    ap.add_argument("--steps", type=int, default=200, help="decode steps measured")
    ap.add_argument("--warmup", type=int, default=20, help="steps before the measured ones")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", action="store_true", help="compare fused with unfused first")
    ap.add_argument("--try-capture", action="store_true",
                    help="unfused-graph: attempt the capture (it fails) before running eagerly")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("moe_torch: no CUDA device", file=sys.stderr)
        return 1
    dev, dtype = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(a.seed)
    layer = make_layer(dev, dtype, a.seed)
    x = torch.randn(1, HIDDEN, device=dev, dtype=dtype)

    if a.check:
        ref, got = step_unfused(layer, x).float(), step_fused(layer, x).float()
        err = (ref - got).abs().max().item() / max(ref.abs().max().item(), 1e-6)
        print(f"moe_torch: fused vs unfused max relative difference {err:.2e}")
        if err > 3e-2:
            print("moe_torch: fused and unfused disagree", file=sys.stderr)
            return 1

    step = step_fused if a.mode.startswith("fused") else step_unfused
    run = lambda: step(layer, x)  # noqa: E731
    graph_note = "eager"
    if a.mode == "unfused-graph" and not a.try_capture:
        print("moe_torch: unfused-graph: the step reads the routing on the host (.tolist()), a "
              "sync that CUDA graph capture forbids; running it eagerly", file=sys.stderr)
        graph_note = "eager (not capturable)"
    elif a.mode.endswith("graph"):
        # Warm up on a side stream (as torch's docs ask) before capturing.
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                step(layer, x)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                static_out = step(layer, x)
            run = lambda: (graph.replay(), static_out)[1]  # noqa: E731
            graph_note = "CUDA graph"
        except Exception as e:  # the unfused step's .tolist() is a sync: capture fails
            torch.cuda.synchronize()
            print(f"moe_torch: {a.mode}: cannot capture the step in a CUDA graph ({type(e).__name__}:"
                  f" {str(e).splitlines()[0][:120]}); running it eagerly", file=sys.stderr)
            graph_note = "eager (capture failed)"
            # A failed capture can leave the CUDA context unusable for graphs only; eager work
            # still runs.

    for _ in range(a.warmup):
        run()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(a.steps):
        torch.cuda.nvtx.range_push("decode_step")
        run()
        torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    print(f"moe_torch: mode {a.mode} ({graph_note}): {a.steps} steps in {dt * 1e3:.1f} ms, "
          f"{a.steps / dt:.1f} steps/s, {dt / a.steps * 1e6:.1f} µs/step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
