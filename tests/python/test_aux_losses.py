"""Auxiliary losses and load statistics against a direct numpy evaluation of DESIGN section 4, from
the routing the context reports (moe_context_topk / expert_counts) and scores recomputed here."""
import numpy as np
import pytest

import moe_ctypes as M
from oracle_util import draw_x, make_layer


def np_logits_scores(layer, x):
    wr = layer.get_param("router.weight").astype(np.float64)
    L = x.astype(np.float64) @ wr.T
    if layer.cfg.score == M.SCORE_SOFTMAX:
        S = np.exp(L - L.max(1, keepdims=True))
        S /= S.sum(1, keepdims=True)
    else:
        S = 1.0 / (1.0 + np.exp(-L))
    return L, S


def np_P(layer, S):
    return S if layer.cfg.score == M.SCORE_SOFTMAX else S / S.sum(1, keepdims=True)


def np_lb(n, P, k):
    T, E = P.shape
    return E * np.sum(n / (T * k) * P.mean(0))


def np_z(L):
    m = L.max(1, keepdims=True)
    lse = (m + np.log(np.exp(L - m).sum(1, keepdims=True)))[:, 0]
    return np.mean(lse ** 2)


def np_cv2(v):
    v = np.asarray(v, dtype=np.float64)
    return v.var() / max(v.mean() ** 2, 1e-10)


def np_topk_before_capacity(layer, S):
    """Token-choice top-k of S + router.bias (no groups), ties to the lower index."""
    sel = S + layer.get_param("router.bias").astype(np.float64)
    return np.argsort(-sel, axis=1, kind="stable")[:, : layer.top_k]


def check_against_formulas(layer, x, ctx):
    T, E, k = x.shape[0], layer.num_experts, layer.top_k
    cfg = layer.cfg
    st = ctx.stats()
    ids, w = ctx.topk()
    counts = ctx.expert_counts()
    L, S = np_logits_scores(layer, x)
    P = np_P(layer, S)

    kept = ids >= 0
    assert np.all(w[~kept] == 0)
    np.testing.assert_array_equal(counts, np.bincount(ids[kept], minlength=E))
    assert st["num_tokens"] == T and st["num_slots"] == T * k
    assert st["dropped_slots"] == int((~kept).sum())

    if cfg.capacity_factor > 0:
        before = np_topk_before_capacity(layer, S)
        np.testing.assert_array_equal(ids[kept], before[kept])
        n = np.bincount(before.ravel(), minlength=E)
        C = int(np.ceil(np.float64(cfg.capacity_factor) * T * k / E))
        assert np.all(counts <= C) and np.all(counts == np.minimum(n, C))
    else:
        assert kept.all()
        n = np.bincount(ids.ravel(), minlength=E)

    gsum = np.zeros(E)
    np.add.at(gsum, ids[kept], w[kept].astype(np.float64))
    want = {
        "load_balance_loss": np_lb(n, P, k),
        "z_loss": np_z(L),
        "importance_loss": np_cv2(gsum),
        "load_cv": counts.std() / counts.mean() if counts.mean() > 0 else 0.0,
        "max_load_ratio": counts.max() / counts.mean() if counts.mean() > 0 else 0.0,
    }
    want["aux_loss_total"] = (cfg.aux_loss_coef * want["load_balance_loss"] + cfg.z_loss_coef * want["z_loss"]
                              + cfg.importance_loss_coef * want["importance_loss"])
    for key, v in want.items():
        assert abs(st[key] - v) <= 1e-5 * abs(v) + 1e-6, "%s: library %.8g, formula %.8g" % (key, st[key], v)
    return want, n


CASES = {
    "softmax_k2": dict(d_model=32, d_ff=32, num_experts=8, top_k=2, z_loss_coef=0.01, importance_loss_coef=0.1),
    "softmax_k1_capacity_position": dict(d_model=32, d_ff=32, num_experts=8, top_k=1, capacity_factor=1.0,
                                         z_loss_coef=0.01, importance_loss_coef=0.1),
    "softmax_k2_capacity_probs": dict(d_model=32, d_ff=32, num_experts=8, top_k=2, capacity_factor=0.6,
                                      drop_policy=M.DROP_PROBS, importance_loss_coef=0.3),
    "sigmoid_k3_scaled_unnormalized": dict(d_model=32, d_ff=32, num_experts=6, top_k=3, score=M.SCORE_SIGMOID,
                                           routed_scale=2.5, normalize_topk=0, aux_loss_coef=0.2,
                                           z_loss_coef=0.02, importance_loss_coef=0.05),
    "sigmoid_capacity_position": dict(d_model=32, d_ff=32, num_experts=4, top_k=2, score=M.SCORE_SIGMOID,
                                      capacity_factor=0.7, z_loss_coef=0.3),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("mode", ["train", "route"])
def test_formulas_random(name, mode):
    layer = make_layer(**CASES[name])
    x = draw_x(layer, 41, 77, scale=2.0)
    ctx = layer.context()
    if mode == "train":
        layer.forward(x, ctx)
    else:
        layer.route(x, ctx)
    want, n = check_against_formulas(layer, x, ctx)
    if layer.cfg.capacity_factor > 0:
        assert ctx.stats()["dropped_slots"] > 0, "case drops nothing"
    if layer.cfg.score == M.SCORE_SIGMOID:
        # The sigmoid LB really normalises P per token: the raw-S formula is a different number.
        _, S = np_logits_scores(layer, x)
        assert abs(np_lb(n, S, layer.top_k) - want["load_balance_loss"]) > 1e-3


def _cyclic_layer_and_x(score, E=4, k=2, reps=3, a=2.0, b=1.0):
    """Router weights = identity on the first E input dims, token t = a*e_i + b*e_{i+1 mod E} with
    i = t mod E: expert loads are equal (k*reps each) and, by cyclic symmetry, mean_t P is uniform."""
    d = 8
    layer = make_layer(d_model=d, d_ff=16, num_experts=E, top_k=k, score=score, importance_loss_coef=0.1)
    wr = np.zeros((E, d), np.float32)
    wr[:, :E] = np.eye(E)
    layer.set_param("router.weight", wr)
    T = E * reps
    x = np.zeros((T, d), np.float32)
    for t in range(T):
        i = t % E
        x[t, i] = a
        x[t, (i + 1) % E] = b
    x[:, E:] = 0.5  # not routed (router weights 0 there) but keeps tokens non-trivial
    return layer, x


@pytest.mark.parametrize("score", [M.SCORE_SOFTMAX, M.SCORE_SIGMOID])
@pytest.mark.parametrize("k", [1, 2])
def test_balanced_assignment_gives_lb_one(score, k):
    layer, x = _cyclic_layer_and_x(score, k=k)
    ctx = layer.context()
    layer.forward(x, ctx)
    ids, _ = ctx.topk()
    T, E = x.shape[0], layer.num_experts
    want_ids = np.stack([(np.arange(T) + j) % E for j in range(k)], axis=1)
    np.testing.assert_array_equal(ids, want_ids)
    counts = ctx.expert_counts()
    assert np.all(counts == T * k // E)
    st = ctx.stats()
    assert abs(st["load_balance_loss"] - 1.0) < 1e-6, st["load_balance_loss"]
    assert st["load_cv"] == 0.0 and abs(st["max_load_ratio"] - 1.0) < 1e-7
    assert abs(st["importance_loss"]) < 1e-10
    check_against_formulas(layer, x, ctx)


def test_zero_router_uniform_scores():
    """Wr = 0: uniform softmax, every tie goes to the lower index, so all tokens choose experts
    0..k-1; LB is still 1 (uniform P), while the load statistics show the imbalance."""
    E, k, T = 4, 2, 10
    layer = make_layer(d_model=16, d_ff=16, num_experts=E, top_k=k, z_loss_coef=0.1, importance_loss_coef=0.1)
    layer.set_param("router.weight", np.zeros((E, 16), np.float32))
    x = np.random.default_rng(3).standard_normal((T, 16)).astype(np.float32)
    ctx = layer.context()
    layer.forward(x, ctx)
    ids, w = ctx.topk()
    np.testing.assert_array_equal(ids, np.tile(np.arange(k, dtype=np.int32), (T, 1)))
    np.testing.assert_allclose(w, 1.0 / k, rtol=1e-6)
    st = ctx.stats()
    assert abs(st["load_balance_loss"] - 1.0) < 1e-6
    assert abs(st["z_loss"] - np.log(E) ** 2) < 1e-5 * np.log(E) ** 2
    want, _ = check_against_formulas(layer, x, ctx)
    assert want["load_cv"] > 0.5 and want["importance_loss"] > 0.5  # the imbalance is visible


def test_imbalanced_lb_above_one():
    """All tokens prefer expert 0 strongly: LB > 1, equal to the formula."""
    E, k, d = 4, 1, 8
    layer = make_layer(d_model=d, d_ff=16, num_experts=E, top_k=k)
    wr = np.zeros((E, d), np.float32)
    wr[0, 0] = 3.0
    layer.set_param("router.weight", wr)
    rng = np.random.default_rng(11)
    x = rng.standard_normal((16, d)).astype(np.float32)
    x[:, 0] = 1.0 + np.abs(x[:, 0])
    ctx = layer.context()
    layer.forward(x, ctx)
    assert np.all(ctx.topk()[0] == 0)
    want, _ = check_against_formulas(layer, x, ctx)
    assert want["load_balance_loss"] > 2.0


def test_importance_mean_floor():
    """Gate sums so small that mean^2 < 1e-10: CV^2 divides by the floor 1e-10, not by mean^2."""
    layer = make_layer(d_model=16, d_ff=16, num_experts=4, top_k=1, normalize_topk=0, routed_scale=1e-6,
                       importance_loss_coef=1.0)
    x = draw_x(layer, 9, 5, scale=2.0)
    ctx = layer.context()
    layer.forward(x, ctx)
    ids, w = ctx.topk()
    gsum = np.zeros(4)
    np.add.at(gsum, ids.ravel(), w.ravel().astype(np.float64))
    assert gsum.mean() ** 2 < 1e-10
    assert gsum.var() > 0
    want, _ = check_against_formulas(layer, x, ctx)
    assert abs(want["importance_loss"] - gsum.var() / 1e-10) < 1e-12
    assert want["importance_loss"] < 0.5 * gsum.var() / gsum.mean() ** 2  # the floor matters here
