"""Speed of a small transformers MoE model before and after libmoe.hf.replace_moe_blocks, on the CPU.

    python3 bench/hf_swap_speed.py [--family mixtral] [--hidden 512] [--ff 1024] [--experts 8]
        [--top-k 2] [--layers 4] [--batch 4] [--seq 256] [--threads 2] [--repeat 10] [--dtype float32]

Builds the model from a config (random weights, nothing downloaded), copies it, swaps libmoe into
the copy, checks both give the same logits, then times (median of --repeat runs of each, the two
models alternating, after a warm-up) an inference forward (eval, no_grad) and a training step (forward + backward of the LM loss) of
each. torch and libmoe both get --threads threads (torch.set_num_threads, OMP_NUM_THREADS). Prints
the CPU model and its matrix extensions with the figures: CPUs differ.
"""

import argparse
import copy
import os
import platform
import statistics
import sys
import time


def cpu_description():
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:
        pass
    ext = [name for flag, name in (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_bf16", "AVX512-BF16"),
                                   ("amx_bf16", "AMX-BF16")) if flag in flags]
    return f"{model} ({', '.join(ext) or 'no AVX2'})"


def config(transformers, a):
    common = dict(vocab_size=1024, hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=8,
                  num_key_value_heads=4, max_position_embeddings=max(1024, a.seq), tie_word_embeddings=False,
                  num_experts_per_tok=a.top_k)
    if a.family == "mixtral":
        return transformers.MixtralConfig(**common, intermediate_size=a.ff, num_local_experts=a.experts)
    if a.family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**common, intermediate_size=a.ff, moe_intermediate_size=a.ff,
                                           num_experts=a.experts, norm_topk_prob=True)
    if a.family == "olmoe":
        return transformers.OlmoeConfig(**common, intermediate_size=a.ff, num_experts=a.experts)
    raise SystemExit(f"--family {a.family}: choose mixtral, qwen3_moe or olmoe")


def timed_pair(fa, fb, repeat):
    """Median milliseconds of fa and of fb, run alternately after a warm-up of each, so that a
    change in the machine's load touches both alike."""
    fa()
    fb()
    ta, tb = [], []
    for _ in range(repeat):
        for fn, times in ((fa, ta), (fb, tb)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(ta) * 1e3, statistics.median(tb) * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", default="mixtral")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ff", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    a = p.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(a.threads)  # before libmoe's OpenMP runtime starts

    import torch
    import transformers

    import libmoe.hf

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, a.dtype)
    original = transformers.AutoModelForCausalLM.from_config(config(transformers, a)).to(dtype)
    swapped = copy.deepcopy(original)
    report = libmoe.hf.replace_moe_blocks(swapped)
    if len(report.replaced) != a.layers:
        print(report)
        return 1
    ids = torch.randint(0, 1024, (a.batch, a.seq), generator=torch.Generator().manual_seed(1))
    labels = torch.roll(ids, 1, 1)
    original.eval()
    swapped.eval()
    with torch.no_grad():
        lo, ls = original(input_ids=ids).logits.float(), swapped(input_ids=ids).logits.float()
    diff = float((lo - ls).abs().max() / lo.abs().max())

    def infer(m):
        with torch.no_grad():
            m(input_ids=ids, use_cache=False)

    def train(m):
        m.zero_grad(set_to_none=True)
        m(input_ids=ids, labels=labels, use_cache=False).loss.backward()

    print(f"CPU: {cpu_description()}; {a.threads} threads; torch {torch.__version__}, transformers "
          f"{transformers.__version__}, libmoe {libmoe.library_version()}")
    print(f"{a.family}: {a.layers} layers, d {a.hidden}, ff {a.ff}, E {a.experts}, k {a.top_k}, {a.dtype}, "
          f"batch {a.batch} x seq {a.seq} = {a.batch * a.seq} tokens; logits max relative difference {diff:.1e}")
    rows = []
    for name, fn in (("inference forward", infer), ("training step (fwd+bwd)", train)):
        if name.startswith("training"):
            original.train()
            swapped.train()
        t_o, t_s = timed_pair(lambda: fn(original), lambda: fn(swapped), a.repeat)
        rows.append((name, t_o, t_s))
    print(f"| {'':24} | transformers | libmoe swapped | speed-up |")
    for name, t_o, t_s in rows:
        print(f"| {name:24} | {t_o:9.1f} ms | {t_s:11.1f} ms | {t_o / t_s:6.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
