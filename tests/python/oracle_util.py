"""Helpers shared by the oracle tests: build a layer, draw well-conditioned inputs, run the library
and the reference, compare arrays."""
import numpy as np
import torch

import moe_ctypes as M
import reference as R

# A routing gap below this (in score units) could be decided differently by float32 and float64.
MARGIN = 2e-5


def make_layer(**fields):
    fields.setdefault("seed", 1234)
    return M.Layer(**fields)


def ref_config(layer):
    return R.RefConfig.from_struct(layer.cfg)


def draw_x(layer, T, seed, params=None, scale=1.0, max_tries=50):
    """Random x (never zeros) whose routing has every decision gap above MARGIN in the reference."""
    cfg = ref_config(layer)
    params = layer.params() if params is None else params
    for i in range(max_tries):
        rng = np.random.default_rng(seed + 7919 * i)
        x = (scale * rng.standard_normal((T, layer.d_model))).astype(np.float32)
        with torch.no_grad():
            out = R.forward(cfg, R.to_tensors(params, requires_grad=False), torch.tensor(x, dtype=torch.float64))
        if out.margin > MARGIN:
            return x
    raise AssertionError("no well-conditioned input in %d draws" % max_tries)


def run_library(layer, x, dy=None):
    """Training forward (+ backward if dy is given) on a fresh context with zeroed gradients."""
    layer.zero_grad()
    ctx = layer.context()
    y = layer.forward(x, ctx)
    res = {"y": y, "stats": ctx.stats(), "counts": ctx.expert_counts(), "ctx": ctx}
    res["ids"], res["w"] = ctx.topk()
    if dy is not None:
        res["dx"] = layer.backward(ctx, dy)
        res["grads"] = layer.grads()
    return res


def rel_err(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    nb = np.linalg.norm(b)
    return np.linalg.norm(a - b) / (nb if nb > 0 else 1.0)


def assert_close(got, want, name, rtol=1e-4, atol=1e-5, elem_rtol=1e-4):
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, "%s: shape %s, expected %s" % (name, got.shape, want.shape)
    assert np.all(np.isfinite(got)), "%s: non-finite values" % name
    # Norm test: ||got - want|| <= rtol ||want|| + norm_floor; the floor (1e-6 per element, ten
    # times below the elementwise atol) only matters for a tensor that is itself float32
    # cancellation noise (e.g. the router gradient of k=1 normalised routing, where only the
    # load-balance term survives).
    e = rel_err(got, want)
    floor = 1e-6 * np.sqrt(got.size)
    norm_ok = np.linalg.norm(got - want) <= rtol * np.linalg.norm(want) + floor
    bad = ~np.isclose(got, want, rtol=elem_rtol, atol=atol)
    msg = "%s: relative norm error %.3g (limit %.1g, ||want|| %.3g), %d/%d elements off (atol %.0e)" % (
        name, e, rtol, np.linalg.norm(want), int(bad.sum()), got.size, atol)
    if bad.any():
        i = np.unravel_index(np.argmax(np.abs(got - want) * bad), got.shape)
        msg += "; worst at %s: got %.8g expected %.8g" % (tuple(int(v) for v in i), got[i], want[i])
    assert norm_ok and not bad.any(), msg


def assert_stats_match(stats, out, T, k, tol=1e-4):
    assert stats["num_tokens"] == T
    assert stats["num_slots"] == T * k
    assert stats["dropped_slots"] == out.dropped, (stats["dropped_slots"], out.dropped)
    for key, want in (("load_balance_loss", out.lb), ("z_loss", out.z), ("importance_loss", out.importance),
                      ("aux_loss_total", out.aux_total), ("load_cv", out.load_cv),
                      ("max_load_ratio", out.max_load_ratio)):
        want = float(want)
        got = float(stats[key])
        assert abs(got - want) <= tol * abs(want) + 1e-6, "%s: got %.8g expected %.8g" % (key, got, want)
