"""The presets of moe_config_preset against the published recipes, and each one run against the
PyTorch reference at small widths: DeepSeek-V3 (sigmoid scores, group-limited selection,
routed_scale, shared expert, auxiliary-loss-free bias balancing), Qwen2-MoE (shared experts behind
a sigmoid gate), the dense soft mixture (top_k = E), Switch, Shazeer and expert choice; and a
summary of every routing method's statistics on one clustered batch."""
import math

import numpy as np
import pytest
import torch

import moe_ctypes as M
import reference as R
import routing_ref as RR
from oracle_util import assert_close, make_layer, run_library
from routing_util import fields, preset


def close(a, b):
    return abs(a - b) <= 1e-7 * max(1.0, abs(b))


# ---- the recipes ---------------------------------------------------------------------------------

def test_switch_preset_is_the_switch_transformer():
    """Fedus et al. 2021: top-1 routing whose gate value is the router probability p_i(x) (no
    renormalisation), softmax router, expert capacity = cf * tokens / experts with cf 1.25 and
    overflow tokens dropped in position order (they pass through the residual), multiplicative
    input jitter U(1-eps, 1+eps) with eps 1e-2 in training only, load-balancing loss
    alpha * N * sum_i f_i P_i with alpha 1e-2 and f_i from the argmax (before dropping), a ReLU FFN
    (T5); router z-loss 1e-3 from ST-MoE (Zoph et al. 2022)."""
    c = preset("switch")
    assert (c.num_experts, c.top_k, c.routing, c.score, c.normalize_topk) == (8, 1, M.ROUTE_TOKEN_CHOICE,
                                                                             M.SCORE_SOFTMAX, 0)
    assert c.activation == M.ACT_RELU and close(c.routed_scale, 1.0)
    assert close(c.capacity_factor, 1.25) and c.drop_policy == M.DROP_POSITION
    assert c.noise == M.NOISE_JITTER and close(c.noise_eps, 0.01)
    assert close(c.aux_loss_coef, 0.01) and close(c.z_loss_coef, 0.001)
    assert c.importance_loss_coef == 0 and c.load_loss_coef == 0 and c.bias_update_rate == 0
    assert c.num_shared_experts == 0 and c.num_groups == 1


def test_switch_capacity_and_aux_loss_follow_the_paper():
    """C = ceil(1.25 * T / E); n_e for the aux loss counts argmax assignments before dropping;
    a dropped token's output is 0; aux = 0.01 * E * sum_e f_e P_e + 0.001 * z."""
    layer = make_layer(**fields(preset("switch", d_model=16, d_ff=32, num_experts=4)))
    T, E = 64, 4
    wr = layer.get_param("router.weight")
    wr[0] += 0.4  # make expert 0 popular so that it overflows
    layer.set_param("router.weight", wr)
    x = RR.draw_x(layer, T, 91, steps=(0,), scale=1.0)
    cfg = RR.cfg_of(layer)
    noise, jit = RR.training_randomness(cfg, 0, T)
    with torch.no_grad():
        ref = RR.forward(cfg, R.to_tensors(layer.params(), requires_grad=False), torch.tensor(x, dtype=torch.float64),
                         noise, jit)
    ctx = layer.context()
    y = layer.forward(x, ctx)
    st, counts, (ids, w) = ctx.stats(), ctx.expert_counts(), ctx.topk()
    C = math.ceil(1.25 * T / E)
    assert ref.capacity == C == 20
    argmax = ref.topk_ids[:, 0].numpy()
    n = np.bincount(argmax, minlength=E)
    assert n.max() > C, "no expert overflows"
    np.testing.assert_array_equal(counts, np.minimum(n, C))
    # Position dropping: an over-full expert keeps its first C tokens in token order.
    for e in range(E):
        toks = np.nonzero(argmax == e)[0]
        kept = np.nonzero(ids[:, 0] == e)[0]
        np.testing.assert_array_equal(kept, toks[:C])
    assert st["dropped_slots"] == int((n - np.minimum(n, C)).sum()) > 0
    assert np.all(y[ids[:, 0] < 0] == 0)
    S = ref.scores.numpy()
    np.testing.assert_allclose(w[ids[:, 0] >= 0, 0], S[ids[:, 0] >= 0, argmax[ids[:, 0] >= 0]], rtol=1e-5)
    lb = E * np.sum(n / T * S.mean(0))
    z = float(ref.z)
    assert abs(st["load_balance_loss"] - lb) < 1e-5 * lb
    assert abs(st["aux_loss_total"] - (0.01 * lb + 0.001 * z)) < 1e-5 * st["aux_loss_total"]


def test_shazeer_preset():
    """Shazeer et al. 2017: k = 2 of the noisy logits H = x Wg + N(0,1) softplus(x Wnoise), gates the
    softmax over the k kept noisy logits, ReLU experts, importance and load losses, no other
    balancing loss; Wnoise starts at zero (noise std softplus(0) = ln 2 at the start)."""
    c = preset("shazeer")
    assert (c.num_experts, c.top_k, c.score, c.normalize_topk, c.activation) == (8, 2, M.SCORE_SOFTMAX, 1, M.ACT_RELU)
    assert c.noise == M.NOISE_GAUSSIAN and c.routing == M.ROUTE_TOKEN_CHOICE and c.capacity_factor <= 0
    assert close(c.importance_loss_coef, 0.01) and close(c.load_loss_coef, 0.01)
    assert c.aux_loss_coef == 0 and c.z_loss_coef == 0 and c.bias_update_rate == 0
    layer = make_layer(**fields(preset("shazeer", d_model=8, d_ff=8)))
    assert layer.param_info()["router.noise_weight"] == ((8, 8), True)
    assert np.all(layer.get_param("router.noise_weight") == 0)
    # Gates = softmax over the k kept noisy logits (= normalised top-k of the full softmax).
    x = RR.draw_x(layer, 20, 5)
    noise, _ = RR.training_randomness(RR.cfg_of(layer), 0, 20)
    ctx = layer.context()
    layer.forward(x, ctx)
    ids, w = ctx.topk()
    H = x.astype(np.float64) @ layer.get_param("router.weight").T.astype(np.float64) + noise * np.log(2.0)
    Hk = np.take_along_axis(H, ids.astype(np.int64), 1)
    want = np.exp(Hk - Hk.max(1, keepdims=True))
    np.testing.assert_allclose(w, want / want.sum(1, keepdims=True), rtol=1e-5)


def test_expert_choice_preset():
    """Zhou et al. 2022, EC-CF2: capacity k = n * c / e with c = 2 experts per token on average;
    libmoe writes it C = ceil(cf * T * k / E) with k = 2 and cf = 1, i.e. c = cf * k = 2."""
    c = preset("expert-choice")
    assert c.routing == M.ROUTE_EXPERT_CHOICE and c.num_experts == 8 and c.score == M.SCORE_SOFTMAX
    assert c.aux_loss_coef == 0 and c.noise == M.NOISE_NONE
    assert close(c.capacity_factor * c.top_k, 2.0), "experts per token on average (the paper's c)"
    layer = make_layer(**fields(preset("expert-choice", d_model=8, d_ff=8)))
    T = 64
    ctx = layer.context()
    layer.forward(np.random.default_rng(0).standard_normal((T, 8)).astype(np.float32), ctx)
    assert ctx.assignments()[0].size / T == 2.0


def test_deepseek_v3_preset():
    """DeepSeek-V3 (DeepSeek-AI 2024): 256 routed experts, 8 per token, sigmoid affinities, 8 groups
    of which 4 are kept by the sum of their top-2 (biased) affinities, weights normalised over the 8
    and scaled by 2.5, one shared expert, bias update speed 0.001, sequence-wise balance alpha 1e-4."""
    c = preset("deepseek-v3")
    assert (c.num_experts, c.top_k, c.score, c.normalize_topk) == (256, 8, M.SCORE_SIGMOID, 1)
    assert (c.num_groups, c.topk_groups, c.num_shared_experts, c.shared_gate) == (8, 4, 1, 0)
    assert close(c.routed_scale, 2.5) and close(c.bias_update_rate, 0.001) and close(c.aux_loss_coef, 1e-4)
    assert c.capacity_factor <= 0 and c.noise == M.NOISE_NONE and c.activation == M.ACT_SWIGLU


def test_qwen2_moe_preset():
    """Qwen1.5-MoE-A2.7B / Qwen2-MoE: 60 experts, 4 per token, softmax, norm_topk_prob false, router
    aux coef 1e-3, a shared expert of 4 x the routed width behind sigmoid(x . gate): libmoe's 4
    shared experts of the routed width under one gate (the same function, checked below)."""
    c = preset("qwen2-moe")
    assert (c.num_experts, c.top_k, c.score, c.normalize_topk) == (60, 4, M.SCORE_SOFTMAX, 0)
    assert (c.num_shared_experts, c.shared_gate, c.d_ff_shared) == (4, 1, 0)
    assert close(c.aux_loss_coef, 1e-3) and c.capacity_factor <= 0 and c.activation == M.ACT_SWIGLU


def test_qwen3_moe_preset():
    """Qwen3-30B-A3B: 128 experts, 8 per token, softmax, norm_topk_prob true, no shared expert,
    router aux coef 1e-3."""
    c = preset("qwen3-moe")
    assert (c.num_experts, c.top_k, c.score, c.normalize_topk) == (128, 8, M.SCORE_SOFTMAX, 1)
    assert (c.num_shared_experts, c.shared_gate, c.num_groups) == (0, 0, 1)
    assert close(c.aux_loss_coef, 1e-3) and c.z_loss_coef == 0 and c.capacity_factor <= 0
    assert c.activation == M.ACT_SWIGLU and c.noise == M.NOISE_NONE


def test_olmoe_preset():
    """OLMoE-1B-7B: 64 experts, 8 per token, softmax, norm_topk_prob false, aux 0.01, z-loss 0.001."""
    c = preset("olmoe")
    assert (c.num_experts, c.top_k, c.score, c.normalize_topk) == (64, 8, M.SCORE_SOFTMAX, 0)
    assert (c.num_shared_experts, c.num_groups) == (0, 1)
    assert close(c.aux_loss_coef, 1e-2) and close(c.z_loss_coef, 1e-3) and c.capacity_factor <= 0
    assert c.activation == M.ACT_SWIGLU and c.noise == M.NOISE_NONE


# ---- each preset against the reference at small widths ---------------------------------------------

def _against_reference(layer, x, dy, name):
    cfg = RR.cfg_of(layer)
    out, dx_ref, grads_ref = RR.forward_backward(cfg, layer.params(), x, dy)
    lib = run_library(layer, x, dy)
    np.testing.assert_array_equal(lib["ids"], out.ids_final.numpy(), err_msg=name + " ids")
    assert_close(lib["w"], out.w_final.detach().numpy(), name + " weights", atol=1e-6)
    np.testing.assert_array_equal(lib["counts"], out.counts_kept.numpy())
    st = lib["stats"]
    assert st["dropped_slots"] == out.dropped and st["num_slots"] == out.num_slots
    for key, v in (("load_balance_loss", out.lb), ("z_loss", out.z), ("importance_loss", out.importance),
                   ("aux_loss_total", out.aux_total), ("load_cv", out.load_cv),
                   ("max_load_ratio", out.max_load_ratio)):
        v = float(v)
        assert abs(st[key] - v) <= 1e-4 * abs(v) + 1e-6, "%s %s: got %.8g expected %.8g" % (name, key, st[key], v)
    assert_close(lib["y"], out.y.detach().numpy(), name + " y")
    assert_close(lib["dx"], dx_ref, name + " dx")
    assert set(lib["grads"]) == set(grads_ref)
    for n in sorted(grads_ref):
        assert_close(lib["grads"][n], grads_ref[n], name + " grad " + n)
    return out, lib


def test_deepseek_v3_against_reference_with_bias_balancing():
    """The full preset (E 256, k 8, groups) at d 16: three training steps, each compared with the
    reference under the bias the previous steps left; the bias moves by +-0.001 * sign(mean - n_e)."""
    layer = make_layer(**fields(preset("deepseek-v3", d_model=16, d_ff=8, seed=3)))
    E, gs = 256, 32  # 8 groups of 32 experts
    T = 48
    x = RR.draw_x(layer, T, 61, scale=2.0)
    dy = np.random.default_rng(62).standard_normal(x.shape).astype(np.float32)
    layer.set_param("router.bias", 0.02 * np.random.default_rng(63).standard_normal(E).astype(np.float32))
    for step in range(3):
        b0 = layer.get_param("router.bias")
        out, lib = _against_reference(layer, x, dy, "deepseek-v3 step %d" % step)
        ids = lib["ids"]
        assert all(len(np.unique(ids[t] // gs)) <= 4 for t in range(T))  # at most topk_groups groups
        assert max(len(np.unique(ids[t] // gs)) for t in range(T)) > 1
        np.testing.assert_allclose(lib["w"].sum(1), 2.5, rtol=1e-5)  # normalised, times routed_scale
        n = out.counts_before.numpy().astype(np.float64)
        want = (b0 + np.float32(0.001) * np.sign(n.mean() - n).astype(np.float32)).astype(np.float32)
        np.testing.assert_allclose(layer.get_param("router.bias"), want, rtol=0, atol=1e-7)
        if step == 0:
            # The group limit matters: without it some token would pick other experts.
            free = RR.Cfg(**{**RR.cfg_of(layer).__dict__, "num_groups": 1, "topk_groups": 1})
            with torch.no_grad():
                o = RR.forward(free, R.to_tensors(layer.params(), requires_grad=False),
                               torch.tensor(x, dtype=torch.float64), bias=torch.tensor(b0, dtype=torch.float64))
            assert not torch.equal(o.topk_ids, out.topk_ids)


def test_bias_balancing_evens_the_load():
    """Aux-loss-free balancing on its own: one skewed batch routed repeatedly; the bias steps move
    tokens off the busy experts and the load CV falls (the selection changes, the weights do not
    use the bias)."""
    E, T, d = 8, 256, 16
    layer = make_layer(d_model=d, d_ff=8, num_experts=E, top_k=2, score=M.SCORE_SIGMOID, aux_loss_coef=0.0,
                       bias_update_rate=0.02, seed=5)
    wr = layer.get_param("router.weight")
    wr[:2] += 0.5  # experts 0 and 1 are everyone's favourites
    layer.set_param("router.weight", wr)
    x = np.abs(np.random.default_rng(6).standard_normal((T, d))).astype(np.float32)
    cvs = []
    for _ in range(60):
        ctx = layer.context()
        layer.forward(x, ctx)
        cvs.append(ctx.stats()["load_cv"])
    bias = layer.get_param("router.bias")
    assert cvs[0] > 1.0, cvs[0]
    assert cvs[-1] < 0.25 * cvs[0], (cvs[0], cvs[-1])
    assert bias[:2].max() < bias[2:].min()  # the favourites were pushed down
    # The weights are the unbiased scores of the chosen experts, normalised.
    ids, w = ctx.topk()
    S = 1 / (1 + np.exp(-(x.astype(np.float64) @ wr.T.astype(np.float64))))
    Sk = np.take_along_axis(S, ids.astype(np.int64), 1)
    np.testing.assert_allclose(w, Sk / Sk.sum(1, keepdims=True), rtol=1e-5)


def test_qwen2_moe_against_reference():
    layer = make_layer(**fields(preset("qwen2-moe", d_model=16, d_ff=8, seed=4)))
    assert "shared.gate" in layer.param_info()
    x = RR.draw_x(layer, 40, 71, scale=1.5)
    dy = np.random.default_rng(72).standard_normal(x.shape).astype(np.float32)
    out, lib = _against_reference(layer, x, dy, "qwen2-moe")
    assert not np.allclose(lib["w"].sum(1), 1.0)  # not normalised


@pytest.mark.parametrize("name", ["qwen3-moe", "olmoe"])
def test_qwen3_olmoe_against_reference(name):
    layer = make_layer(**fields(preset(name, d_model=16, d_ff=8, num_experts=16, seed=5)))
    x = RR.draw_x(layer, 40, 73, scale=1.5)
    dy = np.random.default_rng(74).standard_normal(x.shape).astype(np.float32)
    out, lib = _against_reference(layer, x, dy, name)
    assert np.allclose(lib["w"].sum(1), 1.0, atol=1e-5) == (name == "qwen3-moe")  # normalised or not


def test_qwen2_moe_shared_experts_equal_one_wide_shared_expert():
    """4 shared SwiGLU experts of width f under one gate compute what Qwen2-MoE's single shared
    expert of width 4f does (hidden units concatenated)."""
    a = make_layer(**fields(preset("qwen2-moe", d_model=16, d_ff=8, num_experts=8, seed=9)))
    b = make_layer(**fields(preset("qwen2-moe", d_model=16, d_ff=8, num_experts=8, num_shared_experts=1,
                                   d_ff_shared=32, seed=9)))
    for n in ("router.weight", "experts.w1", "experts.w3", "experts.w2", "shared.gate"):
        b.set_param(n, a.get_param(n))
    b.set_param("shared.w1", a.get_param("shared.w1").reshape(1, 32, 16))
    b.set_param("shared.w3", a.get_param("shared.w3").reshape(1, 32, 16))
    b.set_param("shared.w2", np.concatenate(list(a.get_param("shared.w2")), axis=1)[None])
    x = np.random.default_rng(1).standard_normal((24, 16)).astype(np.float32)
    np.testing.assert_allclose(a.forward(x), b.forward(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("normalize", [1, 0])
def test_dense_soft_mixture(normalize):
    """top_k = E, dropless: y = sum_e softmax(L)_e FFN_e(x) for every token (normalising changes
    nothing but the 1e-20), every expert has every token."""
    E, T = 6, 29
    layer = make_layer(d_model=16, d_ff=24, num_experts=E, top_k=E, normalize_topk=normalize, aux_loss_coef=0.1,
                       z_loss_coef=0.05, importance_loss_coef=0.2, seed=12)
    x = RR.draw_x(layer, T, 13, scale=1.5)
    dy = np.random.default_rng(14).standard_normal(x.shape).astype(np.float32)
    out, lib = _against_reference(layer, x, dy, "dense")
    np.testing.assert_array_equal(np.sort(lib["ids"], 1), np.tile(np.arange(E), (T, 1)))
    np.testing.assert_array_equal(lib["counts"], np.full(E, T))
    np.testing.assert_allclose(lib["w"].sum(1), 1.0, rtol=1e-5)
    assert lib["stats"]["load_cv"] == 0 and lib["stats"]["dropped_slots"] == 0
    # The soft mixture written directly.
    p = layer.params()
    L = x.astype(np.float64) @ p["router.weight"].T.astype(np.float64)
    S = np.exp(L - L.max(1, keepdims=True))
    S /= S.sum(1, keepdims=True)
    y = np.zeros_like(x, dtype=np.float64)
    for e in range(E):
        h = x.astype(np.float64) @ p["experts.w1"][e].T
        g = (h / (1 + np.exp(-h))) * (x.astype(np.float64) @ p["experts.w3"][e].T)
        y += S[:, e : e + 1] * (g @ p["experts.w2"][e].T)
    assert_close(lib["y"], y, "dense y")


# ---- what every method does with one clustered batch -------------------------------------------------

METHODS = {
    "mixtral": preset("mixtral"),
    "switch": preset("switch"),
    "shazeer": preset("shazeer"),
    "expert-choice": preset("expert-choice"),
    "deepseek-v3": preset("deepseek-v3", num_experts=32, num_groups=8, topk_groups=4),
    "qwen2-moe": preset("qwen2-moe", num_experts=16),
    "qwen3-moe": preset("qwen3-moe", num_experts=16),
    "olmoe": preset("olmoe", num_experts=16),
    "dense": preset("mixtral", top_k=8),
}


def test_catalogue_statistics(capsys):
    """One training step of every method on the same batch from 4 clusters: the statistics the
    context reports agree with its own counts and assignments. Printed with pytest -s."""
    d, T = 16, 256
    rng = np.random.default_rng(2024)
    centers = 3.0 * rng.standard_normal((4, d))
    x = (centers[rng.integers(0, 4, T)] + rng.standard_normal((T, d))).astype(np.float32)
    lines = ["%-14s %4s %2s %6s %7s %7s %7s %8s  %s" % ("method", "E", "k", "slots", "dropped", "load_cv",
                                                       "max/mean", "aux", "per-expert kept slots")]
    for name, c in METHODS.items():
        c.d_model, c.d_ff, c.seed = d, 16, 1
        layer = M.Layer(c)
        ctx = layer.context()
        layer.forward(x, ctx)
        st, counts = ctx.stats(), ctx.expert_counts()
        tok, exp, _ = ctx.assignments()
        E = layer.num_experts
        np.testing.assert_array_equal(np.bincount(exp, minlength=E), counts)
        assert st["num_slots"] - st["dropped_slots"] == counts.sum() == tok.size
        mean = counts.mean()
        assert abs(st["load_cv"] - counts.std() / mean) < 1e-5
        assert abs(st["max_load_ratio"] - counts.max() / mean) < 1e-5
        if c.routing == M.ROUTE_EXPERT_CHOICE:
            assert counts.min() == counts.max() and st["load_cv"] == 0
        if c.capacity_factor > 0 and c.routing == M.ROUTE_TOKEN_CHOICE:
            assert counts.max() <= math.ceil(c.capacity_factor * T * c.top_k / E)
        lines.append("%-14s %4d %2d %6d %7d %7.3f %7.2f %8.4f  %s" % (
            name, E, layer.top_k, st["num_slots"], st["dropped_slots"], st["load_cv"], st["max_load_ratio"],
            st["aux_loss_total"], " ".join(str(int(v)) for v in counts[:16]) + (" ..." if E > 16 else "")))
    with capsys.disabled():
        print("\n" + "\n".join(lines))
