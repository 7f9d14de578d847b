"""Router noise in training: the counter-based generator (direct checks through the routing the
library reports), noisy top-k gating with the importance and smooth load losses (Shazeer et al.
2017) and Switch-style jitter of the router input, each against the PyTorch reference over two
consecutive training steps (step 0 and step 1), forward, statistics and every gradient."""
import math

import numpy as np
import pytest
import torch

import moe_ctypes as M
import rng_ref
import routing_ref as RR
from oracle_util import assert_close, make_layer, run_library
from routing_util import preset_fields


def _log_scores_centered(ids, w):
    """From a k = E, unnormalised top-k (w[t,j] = S[t, ids[t,j]]): log S per expert, centred per token,
    which is the centred logit vector."""
    T, E = ids.shape
    logS = np.empty((T, E))
    np.put_along_axis(logS, ids.astype(np.int64), np.log(w.astype(np.float64)), axis=1)
    return logS - logS.mean(1, keepdims=True)


def test_gaussian_noise_draws_match_generator():
    """Wr = 0, Wn = 0: the training logits are N * softplus(0) = N ln 2, so the scores of a k = E,
    unnormalised layer reveal the draws. Step s draws rng_normal(seed, kStreamNoise + s, t*E + e)."""
    T, E, d, seed = 64, 8, 8, 987654321
    layer = make_layer(d_model=d, d_ff=8, num_experts=E, top_k=E, normalize_topk=0, noise=M.NOISE_GAUSSIAN,
                       seed=seed, aux_loss_coef=0.0)
    layer.set_param("router.weight", np.zeros((E, d), np.float32))
    x = np.random.default_rng(1).standard_normal((T, d)).astype(np.float32)
    seen = []
    for step in range(3):
        if step == 1:
            # Inference, routing and a second context do not advance the step counter.
            layer.forward(x)
            layer.route(x, layer.context())
        ctx = layer.context()
        layer.forward(x, ctx)
        ids, w = ctx.topk()
        N = rng_ref.noise_draws(seed, step, T, E).astype(np.float64)
        want = np.log(2.0) * (N - N.mean(1, keepdims=True))
        np.testing.assert_allclose(_log_scores_centered(ids, w), want, atol=2e-5, err_msg="step %d" % step)
        np.testing.assert_array_equal(ids, np.argsort(-N, axis=1, kind="stable"), err_msg="step %d" % step)
        seen.append(ids.copy())
    assert not np.array_equal(seen[0], seen[1]) and not np.array_equal(seen[1], seen[2])
    # No noise in inference: uniform scores, ties to the lower index.
    ctx = layer.context()
    layer.route(x, ctx)
    ids, w = ctx.topk()
    assert np.all(ids == np.arange(E)) and np.allclose(w, 1.0 / E)
    # Another seed draws other numbers.
    other = make_layer(d_model=d, d_ff=8, num_experts=E, top_k=E, normalize_topk=0, noise=M.NOISE_GAUSSIAN,
                       seed=seed + 1, aux_loss_coef=0.0)
    other.set_param("router.weight", np.zeros((E, d), np.float32))
    ctx = other.context()
    other.forward(x, ctx)
    assert not np.array_equal(ctx.topk()[0], seen[0])


def test_jitter_factors_match_generator():
    """Wr = 5 I (E = d), x = 1: the training logits are 5 * jitter[t, e] with the factor of element
    t*d + c, 1 - eps + 2 eps rng_uniform(seed, kStreamJitter + step, t*d + c)."""
    T, d, seed, eps = 48, 8, 4242, 0.1
    layer = make_layer(d_model=d, d_ff=8, num_experts=d, top_k=d, normalize_topk=0, noise=M.NOISE_JITTER,
                       noise_eps=eps, seed=seed, aux_loss_coef=0.0)
    layer.set_param("router.weight", 5.0 * np.eye(d, dtype=np.float32))
    x = np.ones((T, d), np.float32)
    for step in range(2):
        ctx = layer.context()
        layer.forward(x, ctx)
        ids, w = ctx.topk()
        J = rng_ref.jitter_factors(seed, step, T, d, eps).astype(np.float64)
        assert J.min() >= 1 - eps and J.max() < 1 + eps and J.std() > 0.3 * eps
        want = 5.0 * (J - J.mean(1, keepdims=True))
        np.testing.assert_allclose(_log_scores_centered(ids, w), want, atol=2e-5, err_msg="step %d" % step)
    ctx = layer.context()
    layer.route(x, ctx)  # no jitter outside training: equal logits
    assert np.allclose(ctx.topk()[1], 1.0 / d)


def _noisy_layer(fields, wn_scale, seed):
    layer = make_layer(**fields)
    if wn_scale:
        rng = np.random.default_rng(seed)
        layer.set_param("router.noise_weight",
                        wn_scale * rng.standard_normal((layer.num_experts, layer.d_model)).astype(np.float32))
    return layer


SHAZEER = preset_fields("shazeer", d_model=16, d_ff=32, seed=2017)

NOISY_CASES = {
    # The preset itself (importance and load losses 0.01, noise weight left at its zero init).
    "shazeer_preset": (dict(SHAZEER), 0.0, 40),
    # Larger coefficients and a learned-looking noise weight so every loss gradient shows.
    "shazeer_k2_losses": (dict(SHAZEER, importance_loss_coef=0.3, load_loss_coef=0.5, z_loss_coef=0.01), 0.4, 40),
    "shazeer_k1": (dict(SHAZEER, top_k=1, normalize_topk=0, num_experts=4, importance_loss_coef=0.2,
                        load_loss_coef=0.4, aux_loss_coef=0.05), 0.3, 33),
    "shazeer_k3_swiglu": (dict(SHAZEER, top_k=3, activation=M.ACT_SWIGLU, importance_loss_coef=0.2,
                               load_loss_coef=0.6), 0.3, 29),
    "shazeer_capacity": (dict(SHAZEER, capacity_factor=0.75, importance_loss_coef=0.2, load_loss_coef=0.5), 0.3,
                         48),
    "dense_noisy": (dict(SHAZEER, num_experts=4, top_k=4, importance_loss_coef=0.2, load_loss_coef=0.3), 0.3, 21),
    # Noise alone: no importance or load loss, the Switch-style balance loss instead.
    "noise_lb_only": (dict(SHAZEER, importance_loss_coef=0.0, load_loss_coef=0.0, aux_loss_coef=0.1), 0.3, 30),
}


def _compare_step(layer, cfg, x, dy, step, name):
    params = layer.params()
    noise, jit = RR.training_randomness(cfg, step, x.shape[0])
    out, dx_ref, grads_ref = RR.forward_backward(cfg, params, x, dy, noise, jit)
    lib = run_library(layer, x, dy)
    where = "%s step %d: " % (name, step)
    np.testing.assert_array_equal(lib["ids"], out.ids_final.numpy(), err_msg=where + "top-k ids")
    assert_close(lib["w"], out.w_final.detach().numpy(), where + "top-k weights", atol=1e-6)
    np.testing.assert_array_equal(lib["counts"], out.counts_kept.numpy(), err_msg=where + "counts")
    st = lib["stats"]
    assert st["num_tokens"] == x.shape[0] and st["num_slots"] == out.num_slots
    assert st["dropped_slots"] == out.dropped, where + "dropped"
    for key, want in (("load_balance_loss", out.lb), ("z_loss", out.z), ("importance_loss", out.importance),
                      ("load_loss", out.load), ("aux_loss_total", out.aux_total), ("load_cv", out.load_cv),
                      ("max_load_ratio", out.max_load_ratio)):
        want = float(want)
        assert abs(st[key] - want) <= 1e-4 * abs(want) + 1e-6, where + "%s: got %.8g expected %.8g" % (
            key, st[key], want)
    assert_close(lib["y"], out.y.detach().numpy(), where + "y")
    assert_close(lib["dx"], dx_ref, where + "dx")
    assert set(lib["grads"]) == set(grads_ref), (sorted(lib["grads"]), sorted(grads_ref))
    for n in sorted(grads_ref):
        assert_close(lib["grads"][n], grads_ref[n], where + "grad " + n)
    return out, grads_ref


@pytest.mark.parametrize("name", sorted(NOISY_CASES))
def test_noisy_topk_against_reference(name):
    fields, wn_scale, T = NOISY_CASES[name]
    layer = _noisy_layer(fields, wn_scale, 11)
    cfg = RR.cfg_of(layer)
    assert "router.noise_weight" in layer.param_names(trainable_only=True)
    x = RR.draw_x(layer, T, 100 + T, steps=(0, 1))
    dy = np.random.default_rng(T).standard_normal(x.shape).astype(np.float32)
    outs = []
    for step in (0, 1):  # two consecutive training forwards of the same layer
        outs.append(_compare_step(layer, cfg, x, dy, step, name))
    (o0, g0), (o1, g1) = outs
    # The step keys the noise: the two steps route differently, and the step-0 noise would not
    # have given step 1's routing.
    assert not torch.equal(o0.logits.detach(), o1.logits.detach())
    if cfg.top_k < cfg.num_experts:
        assert not torch.equal(o0.ids_final, o1.ids_final), "both steps route alike: the test cannot see the step"
    assert float(o1.load) > 0 or cfg.top_k == cfg.num_experts
    if cfg.load_loss_coef >= 0.1 and cfg.top_k < cfg.num_experts:
        # The load-loss gradient (through the clean logit, the std and the threshold) is visible
        # above the comparison tolerance: without it the router gradients differ.
        c0 = RR.Cfg(**{**cfg.__dict__, "load_loss_coef": 0.0})
        noise, _ = RR.training_randomness(cfg, 1, x.shape[0])
        _, _, gz = RR.forward_backward(c0, layer.params(), x, dy, noise)
        for n in ("router.weight", "router.noise_weight"):
            diff = np.linalg.norm(gz[n] - g1[n])
            assert diff > 1e-3 * np.linalg.norm(g1[n]), "%s: load-loss gradient too small to test" % n
    if cfg.top_k == cfg.num_experts:
        assert abs(float(o1.load)) < 1e-12  # every expert always in the top k: P = 1


def test_load_loss_threshold_paths():
    """A hand-made token: the smooth load P and its gradient follow the k-th largest noisy logit
    excluding e (the (k+1)-th for experts in the noisy top k), checked on the reference itself
    against an explicit loop, so that the library comparison above tests the definition."""
    torch.manual_seed(0)
    cfg = RR.Cfg(num_experts=5, top_k=2)
    Lc = torch.randn(3, 5, dtype=torch.float64)
    std = torch.rand(3, 5, dtype=torch.float64) + 0.5
    L = Lc + torch.randn(3, 5, dtype=torch.float64) * std
    P, _ = RR.load_loss_terms(cfg, Lc, L, std)
    for t in range(3):
        for e in range(5):
            others = sorted((float(L[t, j]) for j in range(5) if j != e), reverse=True)
            thr = others[cfg.top_k - 1]
            want = 0.5 * (1 + math.erf((float(Lc[t, e]) - thr) / float(std[t, e]) / np.sqrt(2)))
            assert abs(float(P[t, e]) - want) < 1e-12


SWITCH = preset_fields("switch", d_model=16, d_ff=32, seed=2021)

JITTER_CASES = {
    # The preset: top-1, capacity 1.25 with position dropping, jitter 0.01, aux 0.01, z 0.001.
    "switch_preset": (dict(SWITCH, num_experts=4), 64),
    # Wider jitter so that it changes routing decisions between the steps.
    "switch_eps0.2": (dict(SWITCH, noise_eps=0.2, z_loss_coef=0.05, aux_loss_coef=0.1), 64),
    "jitter_top2_probs": (dict(SWITCH, top_k=2, normalize_topk=1, noise_eps=0.15, drop_policy=M.DROP_PROBS,
                               capacity_factor=0.8, importance_loss_coef=0.1), 40),
}


@pytest.mark.parametrize("name", sorted(JITTER_CASES))
def test_jitter_against_reference(name):
    fields, T = JITTER_CASES[name]
    layer = make_layer(**fields)
    cfg = RR.cfg_of(layer)
    x = RR.draw_x(layer, T, 300 + T, steps=(0, 1), scale=2.0)
    dy = np.random.default_rng(T + 1).standard_normal(x.shape).astype(np.float32)
    outs = [_compare_step(layer, cfg, x, dy, step, name)[0] for step in (0, 1)]
    assert outs[0].dropped > 0, "case drops nothing"
    assert not torch.equal(outs[0].logits.detach(), outs[1].logits.detach())
    if cfg.noise_eps >= 0.1:
        assert not torch.equal(outs[0].ids_final, outs[1].ids_final), "jitter changes no decision"
    # Inference: no jitter, the reference without it.
    with torch.no_grad():
        ref = RR.forward(cfg, RR.R.to_tensors(layer.params(), requires_grad=False), torch.tensor(x, dtype=torch.float64))
    y_inf = layer.forward(x)
    assert_close(y_inf, ref.y.numpy(), name + " inference y")
    # Dropped tokens of a top-1 layer output exactly 0 (the caller's residual carries them).
    if cfg.top_k == 1:
        dropped = (ref.ids_final[:, 0] < 0).numpy()
        assert dropped.any() and np.all(y_inf[dropped] == 0)


@pytest.mark.parametrize("noise", ["gaussian", "jitter"])
def test_backward_uses_its_own_step(noise):
    """Training forward A (step 0), then B (step 1) on another context, then backward of A: A's
    gradients are those of the step-0 noise, however many forwards ran since."""
    if noise == "gaussian":
        layer = _noisy_layer(dict(SHAZEER, importance_loss_coef=0.2, load_loss_coef=0.4), 0.3, 5)
    else:
        layer = make_layer(**dict(SWITCH, noise_eps=0.2, capacity_factor=0.0))
    cfg = RR.cfg_of(layer)
    T = 24
    x = RR.draw_x(layer, T, 808, steps=(0,), scale=1.5)
    dy = np.random.default_rng(809).standard_normal(x.shape).astype(np.float32)
    params = layer.params()
    n0, j0 = RR.training_randomness(cfg, 0, T)
    out, dx_ref, grads_ref = RR.forward_backward(cfg, params, x, dy, n0, j0)
    layer.zero_grad()
    a, b = layer.context(), layer.context()
    y = layer.forward(x, a)
    layer.forward(x[::-1].copy(), b)
    dx = layer.backward(a, dy)
    assert_close(y, out.y.detach().numpy(), noise + " y")
    assert_close(dx, dx_ref, noise + " dx")
    for n, g in layer.grads().items():
        assert_close(g, grads_ref[n], noise + " grad " + n)
