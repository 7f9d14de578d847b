#!/usr/bin/python3
"""Checks moe-bench-mpi's JSON (bench_ep_mpi_smoke) without expecting any value: it parses; it ran
on RANKS ranks; a step took time; every figure is there and consistent with what expert parallelism
must do: with R >= 2 ranks and random routing some token rows go to other ranks in both phases (out to
the experts and back, in forward and in backward),
backward sends what forward sent (the gradients retrace the rows' path), and a bandwidth follows.
usage: moe-bench-mpi ... | check_ep_mpi_json.py RANKS"""
import json
import sys


def main():
    ranks = int(sys.argv[1])
    text = sys.stdin.read()
    out = json.loads(text)
    b, a = out["bytes_per_token_per_rank"], out["alltoall"]
    errors = []
    if out["ranks"] != ranks or out["hosts"] < 1:
        errors.append(f"ranks {out['ranks']}, hosts {out['hosts']}")
    if not out["step_ms"]["median"] > 0 or out["step_ms"]["min"] > out["step_ms"]["median"]:
        errors.append(f"step_ms {out['step_ms']}")
    if not b["fwd_rows_remote"] > 0 or abs(b["fwd_rows_remote"] - b["bwd_rows_remote"]) > 1e-6 * b["fwd_rows_remote"]:
        errors.append(f"token rows per token: forward {b['fwd_rows_remote']}, backward {b['bwd_rows_remote']}")
    row = out["shape"]["d_model"] * 4
    # A forward sends each local token's rows to the experts' ranks (at most k per token) and the
    # experts' outputs back to the tokens' ranks (as many, over the ranks): about 2k rows per token
    # at most, with room for uneven routing.
    if b["fwd_rows_remote"] > 3 * out["shape"]["top_k"] * row:
        errors.append(f"forward sends {b['fwd_rows_remote']} bytes per token, more than 3k rows of {row} bytes")
    if not b["metadata_remote"] > 0:
        errors.append("no counts were exchanged")
    if not (a["per_rank_gbytes_per_s"]["mean"] > 0 and a["aggregate_gbytes_per_s"] > 0 and 0 < a["share_of_step"] <= 1.5):
        errors.append(f"alltoall {a}")
    for e in errors:
        print("FAIL:", e)
    print(text)
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
