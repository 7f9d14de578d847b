"""Writes a small Mixtral-style checkpoint (transformers 4 naming, bfloat16, two shards plus
model.safetensors.index.json, with attention tensors beside the MoE block) for the run_checkpoint
example: python3 write_mixtral_checkpoint.py DIR [--d-model 32 --d-ff 64 --experts 8 --layers 2]."""
import argparse
import os

import numpy as np

import safetensors_np as ST


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--d-model", type=int, default=32)
    ap.add_argument("--d-ff", type=int, default=64)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--layers", type=int, default=2)
    a = ap.parse_args()
    os.makedirs(a.dir, exist_ok=True)
    rng = np.random.default_rng(2024)
    d, ff, E = a.d_model, a.d_ff, a.experts
    w = lambda *s: (rng.standard_normal(s) / np.sqrt(s[-1])).astype(np.float32)
    t = {"model.embed_tokens.weight": ("BF16", w(100, d))}
    for layer in range(a.layers):
        p = "model.layers.%d." % layer
        t[p + "self_attn.q_proj.weight"] = ("BF16", w(d, d))
        t[p + "block_sparse_moe.gate.weight"] = ("BF16", w(E, d))
        for e in range(E):
            q = p + "block_sparse_moe.experts.%d." % e
            t[q + "w1.weight"] = ("BF16", w(ff, d))
            t[q + "w3.weight"] = ("BF16", w(ff, d))
            t[q + "w2.weight"] = ("BF16", w(d, ff))
    ST.write_sharded(a.dir, t, 2)


if __name__ == "__main__":
    main()
