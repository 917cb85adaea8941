#!/usr/bin/env python3
"""Prints a markdown table of decode metrics from several `ktune profile` outputs.

    python3 tools/profile-table.py p-*.json

One row per profile.json: MoE kernel, CUDA Graph, layers of experts on the GPU, decode tok/s
(the median of the untraced windows), tok/s of the traced window, and from the traced window GPU
idle %, median kernel gap, kernels per token, GPU and CPU expert effective bandwidth and the
tracing overhead (definitions: docs/metrics.md). Used for docs/performance.md's profile table.
"""
import json
import sys


def bandwidth(window, device):
    for e in window.get("expert_bandwidth", []):
        if e.get("device") == device and e.get("gb_s", 0) > 0:
            return "%.0f" % e["gb_s"]
    return "-"


def gpu_layers(run):
    # The quick placement's label names the layers whose experts are on cuda:0.
    label = str(run.get("placement", ""))
    for word in label.replace(",", " ").split():
        if word.isdigit():
            return int(word)
    return label


def row(path):
    doc = json.load(open(path))
    run, win = doc["run"], doc["windows"]["decode"]
    gpu = win["gpus"][0] if win.get("gpus") else {}
    over = doc.get("overhead", {})
    untraced = over.get("untraced_median_tok_s")
    return [run.get("moe_kernel", "?"), "on" if run.get("cuda_graph") in (True, "on", "true") else "off",
            gpu_layers(run), "%.2f" % untraced if untraced else "-", "%.2f" % win["tok_s"],
            "%.1f" % (100 * gpu.get("idle_fraction", 0)) if gpu else "-",
            "%.1f" % gpu["gaps"]["median_us"] if gpu else "-",
            "%.0f" % gpu.get("kernels_per_token", 0) if gpu else "-",
            bandwidth(win, "cuda:0"), bandwidth(win, "cpu"),
            "%.1f" % (100 * over["overhead_fraction"]) if "overhead_fraction" in over else "-"]


head = ["MoE kernel", "graph", "GPU expert layers", "decode tok/s", "traced tok/s", "GPU idle %",
        "median gap µs", "kernels/token", "GPU experts GB/s", "CPU experts GB/s", "tracing cost %"]
rows = []
for p in sys.argv[1:]:
    if p.endswith(".timeline.json"):  # the complete timeline beside each profile.json
        continue
    try:
        rows.append(row(p))
    except (OSError, KeyError, ValueError, IndexError) as e:
        print("skipped %s: %s" % (p, e), file=sys.stderr)
rows.sort(key=lambda r: (r[0] != "unfused", r[1], r[2] if isinstance(r[2], int) else 0))
print("| " + " | ".join(head) + " |")
print("|" + " --- |" * len(head))
for r in rows:
    print("| " + " | ".join(str(c) for c in r) + " |")
