#!/usr/bin/python3
"""Checks moe-bench --ep-ranks R --json output (bench_ep_smoke): it parses, and the bytes per token
are there and consistent with what expert parallelism must do, without expecting any value:
  - every rank with tokens sent token rows to other ranks in both phases (random routing over
    R >= 2 ranks sends some rows away) and to itself;
  - per rank, backward sends exactly what forward sent (the gradients retrace the rows' path);
  - max >= mean, the uniform-routing expectation is given and > 0.
usage: check_ep_json.py RANKS FILE"""
import json
import sys


def main():
    ranks, path = int(sys.argv[1]), sys.argv[2]
    with open(path) as f:
        out = json.load(f)
    errors = []
    ep = out.get("ep")
    if out.get("ep_ranks") != ranks or not isinstance(ep, dict) or ep.get("ranks") != ranks:
        sys.exit(f"no 'ep' object for {ranks} ranks in {path}")
    have_tokens = [t > 0 for t in ep["tokens_per_rank"]]
    per_phase = {}
    for phase in ("fwd", "bwd"):
        b = ep["bytes_per_token"][phase]
        for key in ("remote", "self", "metadata_remote"):
            fig = b[key]
            if len(fig["per_rank"]) != ranks:
                errors.append(f"{phase}.{key}: {len(fig['per_rank'])} ranks")
            if fig["max"] < fig["mean"]:
                errors.append(f"{phase}.{key}: max {fig['max']} < mean {fig['mean']}")
        for r, v in enumerate(b["remote"]["per_rank"]):
            if have_tokens[r] and not v > 0:
                errors.append(f"{phase}: rank {r} sent {v} bytes per token to other ranks")
        if not b["expected_uniform_remote"] > 0:
            errors.append(f"{phase}: expected_uniform_remote is {b['expected_uniform_remote']}")
        per_phase[phase] = b["remote"]["per_rank"]
    if per_phase["fwd"] != per_phase["bwd"]:
        errors.append(f"backward sent {per_phase['bwd']} bytes per token, forward {per_phase['fwd']}")
    for e in errors:
        print("FAIL:", e)
    print(f"ep json: {ranks} ranks, fwd remote bytes/token mean {ep['bytes_per_token']['fwd']['remote']['mean']}, "
          f"uniform routing expects {ep['bytes_per_token']['fwd']['expected_uniform_remote']}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
