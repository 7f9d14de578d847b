//! Tests of the safe crate against the real libmoe (run by `cargo test`, from ctest).
use libmoe::{Activation, Config, DType, Device, Error, Noise, Routing, Status, PRESETS};
use std::sync::{Arc, Mutex};

fn small() -> Config {
    Config::new(16, 32).num_experts(4).top_k(2).seed(3)
}

/// Deterministic inputs in [-1, 1).
fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f64 / (1u64 << 24) as f64 * 2.0 - 1.0) as f32
        })
        .collect()
}

#[test]
fn version_matches_header() {
    assert_eq!(libmoe::version(), libmoe::HEADER_VERSION);
    let (ma, mi, pa) = libmoe::version_triple();
    assert_eq!(ma * 10000 + mi * 100 + pa, libmoe::version());
}

#[test]
fn config_defaults_and_builder() {
    let c = Config::new(64, 128);
    assert_eq!((c.d_model, c.d_ff, c.num_experts, c.top_k), (64, 128, 8, 2));
    assert_eq!(c.activation, Activation::SwiGlu);
    assert_eq!(c.device, Device::Cpu);
    assert_eq!(c.dtype, DType::F32);
    assert!(c.normalize_topk);
    assert!((c.aux_loss_coef - 0.01).abs() < 1e-7);
    let c = c.num_experts(16).top_k(4).activation(Activation::Relu).noise(Noise::Jitter).seed(99);
    assert_eq!((c.num_experts, c.top_k, c.seed), (16, 4, 99));
    let layer = c.build().unwrap();
    let eff = layer.config().unwrap();
    assert_eq!(eff.num_experts, 16);
    assert_eq!(eff.activation, Activation::Relu);
    assert_eq!(eff.noise, Noise::Jitter);
    assert_eq!(eff.d_ff_shared, 0);
    assert_eq!((layer.d_model(), layer.num_experts(), layer.top_k()), (64, 16, 4));
}

#[test]
fn presets() {
    for name in PRESETS {
        let c = Config::preset(name, 32, 64).unwrap_or_else(|e| panic!("{}: {}", name, e));
        assert_eq!((c.d_model, c.d_ff), (32, 64), "{}", name);
    }
    let sw = Config::preset("switch", 8, 16).unwrap();
    assert_eq!((sw.top_k, sw.activation), (1, Activation::Relu));
    assert!((sw.capacity_factor - 1.25).abs() < 1e-6);
    let ec = Config::preset("expert-choice", 8, 16).unwrap();
    assert_eq!(ec.routing, Routing::ExpertChoice);
    let ds = Config::preset("deepseek-v3", 8, 16).unwrap();
    assert_eq!((ds.num_experts, ds.top_k, ds.num_groups, ds.topk_groups, ds.num_shared_experts), (256, 8, 8, 4, 1));
    // A small layer from a preset.
    let l = Config::preset("mixtral", 8, 16).unwrap().num_experts(4).build().unwrap();
    assert_eq!(l.num_experts(), 4);

    let e = Config::preset("gpt-5", 8, 16).unwrap_err();
    assert_eq!(e.status(), Status::InvalidArgument);
    assert!(e.message().contains("gpt-5"), "message: {}", e.message());
    assert_eq!(Config::preset("mix\0tral", 8, 16).unwrap_err().status(), Status::InvalidArgument);
}

#[test]
fn create_errors_carry_status_and_message() {
    let e = Config::new(16, 32).num_experts(2).top_k(3).build().unwrap_err();
    assert_eq!(e.status(), Status::InvalidArgument);
    assert!(!e.message().is_empty());
    let shown = e.to_string();
    assert!(shown.starts_with("MOE_ERR_INVALID_ARGUMENT: "), "{}", shown);
    let boxed: Box<dyn std::error::Error + Send + Sync> = Box::new(e.clone());
    assert_eq!(boxed.to_string(), shown);
    assert_eq!(Config::new(0, 32).build().unwrap_err().status(), Status::InvalidArgument);
    assert_eq!(Status::State.name(), "MOE_ERR_STATE");
    assert_eq!(Status::NonFinite.code(), 7);
    let custom = Error::new(Status::Internal, "x");
    assert_eq!(custom.to_string(), "MOE_ERR_INTERNAL: x");
}

#[test]
fn forward_is_deterministic_and_checks_lengths() {
    let layer = small().build().unwrap();
    let x = data(5 * 16, 1);
    let mut y1 = vec![0f32; x.len()];
    let mut y2 = vec![1f32; x.len()];
    layer.forward(&x, &mut y1).unwrap();
    layer.forward(&x, &mut y2).unwrap();
    assert_eq!(y1, y2);
    assert!(y1.iter().any(|&v| v != 0.0));
    // Same seed, same parameters, same output.
    let other = small().build().unwrap();
    let mut y3 = vec![0f32; x.len()];
    other.forward(&x, &mut y3).unwrap();
    assert_eq!(y1, y3);

    let e = layer.forward(&x[..17], &mut y1[..17]).unwrap_err();
    assert_eq!(e.status(), Status::InvalidArgument);
    assert!(e.message().contains("multiple of d_model"), "{}", e);
    let e = layer.forward(&x, &mut y1[..16]).unwrap_err();
    assert_eq!(e.status(), Status::InvalidArgument);
    // Zero tokens is fine.
    layer.forward(&[], &mut []).unwrap();
    // Still usable, still the same.
    layer.forward(&x, &mut y2).unwrap();
    assert_eq!(y1, y2);
}

#[test]
fn training_step_backward_and_gradients() {
    let layer = small().build().unwrap();
    let t = 12;
    let x = data(t * 16, 2);
    let mut y = vec![0f32; x.len()];
    let mut ctx = layer.context().unwrap();
    ctx.forward(&x, &mut y).unwrap();
    let mut inf = vec![0f32; x.len()];
    layer.forward(&x, &mut inf).unwrap();
    assert_eq!(y, inf, "no noise configured: training and inference forwards agree");

    let dy: Vec<f32> = y.iter().map(|v| v / t as f32).collect();
    let mut dx = vec![0f32; x.len()];
    ctx.backward(&dy, Some(&mut dx)).unwrap();
    assert!(dx.iter().any(|&v| v != 0.0));
    let g1 = layer.grad("experts.w1").unwrap();
    assert!(g1.iter().any(|&v| v != 0.0));
    // Backward again on the same context accumulates.
    layer.backward(&mut ctx, &dy, None).unwrap();
    let g2 = layer.grad("experts.w1").unwrap();
    for (a, b) in g1.iter().zip(&g2) {
        assert!((2.0 * a - b).abs() <= 1e-5 * (1.0 + b.abs()));
    }
    layer.zero_grad().unwrap();
    assert!(layer.grad("experts.w1").unwrap().iter().all(|&v| v == 0.0));

    // Length checks of backward.
    assert_eq!(ctx.backward(&dy[..16], None).unwrap_err().status(), Status::InvalidArgument);
    assert_eq!(ctx.backward(&dy, Some(&mut dx[..16])).unwrap_err().status(), Status::InvalidArgument);
}

#[test]
fn backward_out_of_order_is_a_state_error() {
    let layer = small().build().unwrap();
    let x = data(4 * 16, 3);
    let mut ctx = layer.context().unwrap();
    let e = ctx.backward(&x, None).unwrap_err();
    assert_eq!(e.status(), Status::State);
    // The message names the call the user made, not the accessor used to check.
    assert!(e.message().contains("backward"), "{}", e.message());
    assert!(!e.message().contains("moe_context_stats"), "{}", e.message());
    ctx.route(&x).unwrap();
    let e = ctx.backward(&x, None).unwrap_err();
    assert_eq!(e.status(), Status::State);
    assert_eq!(ctx.stats().unwrap().num_tokens, 4);
}

#[test]
fn dx_matches_finite_differences() {
    // k = E: the selection never changes under a perturbation; no aux losses: L = sum(y * r).
    let layer = Config::new(4, 8).num_experts(3).top_k(3).aux_loss_coef(0.0).seed(11).build().unwrap();
    let t = 3;
    let x = data(t * 4, 4);
    let r = data(t * 4, 5);
    let loss = |x: &[f32]| -> f64 {
        let mut y = vec![0f32; x.len()];
        layer.forward(x, &mut y).unwrap();
        y.iter().zip(&r).map(|(a, b)| *a as f64 * *b as f64).sum()
    };
    let mut ctx = layer.context().unwrap();
    let mut y = vec![0f32; x.len()];
    ctx.forward(&x, &mut y).unwrap();
    let mut dx = vec![0f32; x.len()];
    ctx.backward(&r, Some(&mut dx)).unwrap();
    let h = 1e-2f32;
    for i in 0..x.len() {
        let (mut xp, mut xm) = (x.clone(), x.clone());
        xp[i] += h;
        xm[i] -= h;
        let fd = (loss(&xp) - loss(&xm)) / (2.0 * h as f64);
        assert!((fd - dx[i] as f64).abs() < 2e-3 + 2e-2 * fd.abs(), "dx[{}] = {} but finite difference {}", i, dx[i], fd);
    }
}

#[test]
fn params_by_name() {
    let layer = small().build().unwrap();
    let params = layer.params().unwrap();
    let names: Vec<&str> = params.iter().map(|p| p.name.as_str()).collect();
    for want in ["router.weight", "router.bias", "experts.w1", "experts.w3", "experts.w2"] {
        assert!(names.contains(&want), "{:?}", names);
    }
    let w1 = layer.param_info("experts.w1").unwrap();
    assert_eq!(w1.shape, vec![4, 32, 16]);
    assert!(w1.trainable);
    assert!(!layer.param_info("router.bias").unwrap().trainable);

    let w = layer.param("router.weight").unwrap();
    assert_eq!(w.len(), 4 * 16);
    let bound = 1.0 / (16f32).sqrt();
    assert!(w.iter().all(|v| v.abs() <= bound));
    let new: Vec<f32> = (0..w.len()).map(|i| i as f32 * 0.001).collect();
    layer.set_param("router.weight", &new).unwrap();
    assert_eq!(layer.param("router.weight").unwrap(), new);
    let mut buf = vec![0f32; new.len()];
    layer.read_param("router.weight", &mut buf).unwrap();
    assert_eq!(buf, new);

    assert_eq!(layer.set_param("router.weight", &new[1..]).unwrap_err().status(), Status::InvalidArgument);
    assert_eq!(layer.param("no.such").unwrap_err().status(), Status::InvalidArgument);
    let e = layer.read_param("no.such", &mut buf).unwrap_err();
    assert!(e.message().contains("no.such"), "{}", e);
    assert_eq!(layer.grad("router.bias").unwrap_err().status(), Status::InvalidArgument);
    assert_eq!(layer.param("bad\0name").unwrap_err().status(), Status::InvalidArgument);
    // Failed calls changed nothing.
    assert_eq!(layer.param("router.weight").unwrap(), new);

    let (data_ptr, grad_ptr) = unsafe { layer.param_buffers("router.bias").unwrap() };
    assert!(!data_ptr.is_null() && grad_ptr.is_null());
}

#[test]
fn routing_statistics() {
    let layer = small().build().unwrap();
    let t = 40;
    let x = data(t * 16, 6);
    let mut ctx = layer.context().unwrap();
    assert_eq!(ctx.stats().unwrap_err().status(), Status::State);
    let mut y = vec![0f32; x.len()];
    ctx.forward(&x, &mut y).unwrap();
    let s = ctx.stats().unwrap();
    assert_eq!((s.num_tokens, s.num_slots, s.dropped_slots), (t, t * 2, 0));
    assert!(s.load_balance_loss > 0.0 && s.aux_loss_total > 0.0);
    let counts = ctx.expert_counts().unwrap();
    assert_eq!(counts.len(), 4);
    assert_eq!(counts.iter().sum::<i64>() as usize, t * 2);
    let topk = ctx.topk().unwrap();
    assert_eq!((topk.k, topk.expert_ids.len(), topk.weights.len()), (2, t * 2, t * 2));
    for tok in 0..t {
        let w = &topk.weights[tok * 2..tok * 2 + 2];
        assert!(((w[0] + w[1]) - 1.0).abs() < 1e-5, "normalized top-k weights");
        let e = &topk.expert_ids[tok * 2..tok * 2 + 2];
        assert!(e[0] != e[1] && e.iter().all(|&v| (0..4).contains(&v)));
    }
    let asg = ctx.assignments().unwrap();
    assert_eq!(asg.len(), t * 2);
    assert!(asg.windows(2).all(|p| (p[0].expert, p[0].token) < (p[1].expert, p[1].token)));
    for (e, &c) in counts.iter().enumerate() {
        assert_eq!(asg.iter().filter(|a| a.expert == e).count() as i64, c);
    }
}

#[test]
fn expert_choice_has_no_topk() {
    let layer = Config::preset("expert-choice", 8, 16).unwrap().num_experts(4).build().unwrap();
    let x = data(16 * 8, 7);
    let mut ctx = layer.context().unwrap();
    ctx.route(&x).unwrap();
    assert_eq!(ctx.topk().unwrap_err().status(), Status::Unsupported);
    let s = ctx.stats().unwrap();
    assert_eq!(ctx.assignments().unwrap().len(), s.num_slots - s.dropped_slots);
}

#[test]
fn capacity_drops_are_reported() {
    let layer = small().capacity_factor(0.5).build().unwrap();
    let x = data(64 * 16, 8);
    let mut ctx = layer.context().unwrap();
    ctx.route(&x).unwrap();
    let s = ctx.stats().unwrap();
    assert!(s.dropped_slots > 0);
    let kept: i64 = ctx.expert_counts().unwrap().iter().sum();
    assert_eq!(kept as usize, s.num_slots - s.dropped_slots);
    let topk = ctx.topk().unwrap();
    assert_eq!(topk.expert_ids.iter().filter(|&&e| e == -1).count(), s.dropped_slots);
}

#[test]
fn aux_grad_scale_zero_drops_the_aux_gradient() {
    let x = data(20 * 16, 10);
    let dy = data(20 * 16, 11);
    let a = small().aux_loss_coef(0.5).build().unwrap();
    let mut ctx = a.context().unwrap();
    ctx.set_aux_grad_scale(0.0).unwrap();
    ctx.forward(&x, &mut vec![0f32; x.len()]).unwrap();
    ctx.backward(&dy, None).unwrap();
    assert_eq!(ctx.set_aux_grad_scale(f32::NAN).unwrap_err().status(), Status::InvalidArgument);
    let b = small().aux_loss_coef(0.0).build().unwrap();
    let mut ctx_b = b.context().unwrap();
    ctx_b.forward(&x, &mut vec![0f32; x.len()]).unwrap();
    ctx_b.backward(&dy, None).unwrap();
    let (ga, gb) = (a.grad("router.weight").unwrap(), b.grad("router.weight").unwrap());
    for (u, v) in ga.iter().zip(&gb) {
        assert!((u - v).abs() <= 1e-6, "{} vs {}", u, v);
    }
}

#[test]
fn check_finite_refuses_nan() {
    let layer = small().check_finite(true).build().unwrap();
    let mut x = data(3 * 16, 9);
    x[20] = f32::NAN;
    let mut y = vec![0f32; x.len()];
    let e = layer.forward(&x, &mut y).unwrap_err();
    assert_eq!(e.status(), Status::NonFinite);
    assert!(y.iter().all(|&v| v == 0.0), "a failed call leaves y untouched");
}

#[test]
fn context_of_another_layer_is_refused() {
    let a = small().build().unwrap();
    let b = small().build().unwrap();
    let mut ctx = a.context().unwrap();
    let x = data(2 * 16, 10);
    let mut y = vec![0f32; x.len()];
    let check = |e: Error, call: &str| {
        assert_eq!(e.status(), Status::InvalidArgument, "{}: {}", call, e);
        let m = e.message();
        assert!(m.starts_with("ctx belongs to another layer (Layer { d_model: 16, num_experts: 4, top_k: 2, .. } at "), "{}: {}", call, m);
        assert!(m.contains(&format!("{:p}", a.as_ptr())), "{}: names the context's layer: {}", call, m);
        assert!(m.contains(&format!("{:p}", b.as_ptr())), "{}: names this layer: {}", call, m);
    };
    // Before ctx holds anything, and after it holds a forward of a: b refuses it first, before the
    // sizes and before asking ctx for its forward ("ctx holds no forward" was the old answer).
    for round in 0..2 {
        if round == 1 {
            a.forward_train(&x, &mut y, &mut ctx).unwrap();
        }
        check(b.forward_train(&x, &mut y, &mut ctx).unwrap_err(), "forward_train");
        check(b.forward_train(&x[..3], &mut y[..3], &mut ctx).unwrap_err(), "forward_train, bad sizes");
        check(b.backward(&mut ctx, &y, None).unwrap_err(), "backward");
        check(b.backward(&mut ctx, &y[..5], None).unwrap_err(), "backward, bad sizes");
        check(b.route(&x, &mut ctx).unwrap_err(), "route");
        unsafe {
            check(b.forward_raw(x.as_ptr().cast(), 2, y.as_mut_ptr().cast(), Some(&mut ctx)).unwrap_err(), "forward_raw");
            check(b.backward_raw(&mut ctx, y.as_ptr().cast(), std::ptr::null_mut()).unwrap_err(), "backward_raw");
            check(b.route_raw(x.as_ptr().cast(), 2, &mut ctx).unwrap_err(), "route_raw");
        }
    }
    // nothing changed: ctx still holds a's forward, and a's backward runs
    assert_eq!(ctx.stats().unwrap().num_tokens, 2);
    a.backward(&mut ctx, &y, None).unwrap();
}

#[test]
fn param_mut_is_the_layers_memory() {
    let mut layer = small().num_shared_experts(1).build().unwrap();
    let x = data(8 * 16, 31);
    let mut y = vec![0f32; x.len()];
    {
        let mut ctx = layer.context().unwrap();
        ctx.forward(&x, &mut y).unwrap();
        let dy = y.clone();
        ctx.backward(&dy, None).unwrap();
    }
    let lr = 0.5f32;
    for p in layer.params().unwrap() {
        assert_eq!(layer.param_dtype(&p.name).unwrap(), DType::F32);
        let old = layer.param(&p.name).unwrap();
        let grad = if p.trainable { Some(layer.grad(&p.name).unwrap()) } else { None };
        let pm = layer.param_mut(&p.name).unwrap();
        assert_eq!(pm.data, &old[..], "{}", p.name);
        assert_eq!(pm.grad.map(|g| g.to_vec()), grad, "{}", p.name);
        if let Some(g) = pm.grad {
            for (w, g) in pm.data.iter_mut().zip(g) {
                *w -= lr * g;
            }
            let want: Vec<f32> = old.iter().zip(grad.as_ref().unwrap()).map(|(w, g)| w - lr * g).collect();
            assert_eq!(layer.param(&p.name).unwrap(), want, "{}: the step reached the layer", p.name);
        }
    }
    let e = layer.param_mut("experts.w9").unwrap_err();
    assert_eq!(e.status(), Status::InvalidArgument);
    assert!(e.message().contains("experts.w9"), "{}", e);
}

#[test]
fn param_mut_refuses_low_precision_storage() {
    let mut layer = match small().dtype(DType::Bf16).build() {
        Ok(l) => l,
        Err(e) => {
            assert_eq!(e.status(), Status::Unsupported, "{}", e);
            eprintln!("SKIPPED param_mut_refuses_low_precision_storage: no bf16 CPU layers in this build: {}", e);
            return;
        }
    };
    assert_eq!(layer.param_dtype("experts.w1").unwrap(), DType::Bf16);
    assert_eq!(layer.param_dtype("router.weight").unwrap(), DType::F32);
    let e = layer.param_mut("experts.w1").unwrap_err();
    assert_eq!(e.status(), Status::InvalidArgument);
    assert!(e.message().contains("stored as Bf16"), "{}", e);
    // the router stays f32 and can be stepped
    assert_eq!(layer.param_mut("router.weight").unwrap().data.len(), 4 * 16);
}

#[test]
#[allow(deprecated)]
fn the_names_of_0_1_still_compile() {
    assert_eq!(DType::BF16, DType::Bf16);
    assert_eq!(Noise::None, Noise::Off);
    assert!(matches!(Config::new(8, 16).noise, Noise::None));
    assert_eq!(Config::new(8, 16).noise, Noise::Off);
}

#[test]
fn param_buffers_are_in_the_param_dtype() {
    let layer = small().dtype(DType::Bf16).build().unwrap();
    assert_eq!(layer.param_dtype("experts.w2").unwrap(), DType::Bf16);
    assert_eq!(layer.param_dtype("router.weight").unwrap(), DType::F32);
    assert_eq!(layer.param_dtype("experts.w9").unwrap_err().status(), Status::InvalidArgument);
    // The last element of a bf16 parameter is 2 bytes at index numel - 1: written there, it is
    // what the f32 copy reads; values unrelated to the initial weights (bf16-exact).
    let n = layer.param_info("experts.w2").unwrap().numel();
    let want: [f32; 2] = [0.5, -1.75];
    let (data, grad) = unsafe { layer.param_buffers("experts.w2").unwrap() };
    assert!(!data.is_null() && !grad.is_null());
    for (j, &v) in want.iter().enumerate() {
        unsafe { *data.cast::<u16>().add(n - 1 - j) = (v.to_bits() >> 16) as u16 };
    }
    let got = layer.param("experts.w2").unwrap();
    assert_eq!((got[n - 1], got[n - 2]), (want[0], want[1]));
}

#[test]
fn host_slices_need_a_cpu_f32_layer() {
    // A bf16 CPU layer (if this build has one) cannot take f32 slices.
    match small().dtype(DType::Bf16).build() {
        Ok(layer) => {
            let x = data(16, 1);
            let mut y = vec![0f32; 16];
            assert_eq!(layer.forward(&x, &mut y).unwrap_err().status(), Status::InvalidArgument);
        }
        Err(e) => assert_eq!(e.status(), Status::Unsupported),
    }
    // A CUDA layer on a machine without CUDA says why.
    if let Err(e) = small().device(Device::Cuda).build() {
        assert!(matches!(e.status(), Status::Unsupported | Status::Device), "{}", e);
        assert!(!e.message().is_empty());
    }
}

#[test]
fn layer_is_send_and_works_on_another_thread() {
    let layer = small().build().unwrap();
    let x = data(4 * 16, 12);
    let mut here = vec![0f32; x.len()];
    layer.forward(&x, &mut here).unwrap();
    let xs = x.clone();
    let (layer, there) = std::thread::spawn(move || {
        let mut y = vec![0f32; xs.len()];
        layer.forward(&xs, &mut y).unwrap();
        (layer, y)
    })
    .join()
    .unwrap();
    assert_eq!(here, there);
    // Shared between threads behind a Mutex; errors are per thread.
    let shared = Arc::new(Mutex::new(layer));
    let handles: Vec<_> = (0..3)
        .map(|i| {
            let shared = Arc::clone(&shared);
            let x = x.clone();
            std::thread::spawn(move || {
                let layer = shared.lock().unwrap();
                if i == 1 {
                    assert_eq!(layer.param("nope").unwrap_err().status(), Status::InvalidArgument);
                }
                let mut y = vec![0f32; x.len()];
                layer.forward(&x, &mut y).unwrap();
                y
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), here);
    }
}

fn rss_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[test]
fn drop_frees_the_layer() {
    // Each layer holds 3 * 8 * 512 * 128 floats of parameters and as many of gradients (~12 MB)
    // plus what its context saves; 60 of them leaked would be ~750 MB. The bound leaves room for
    // the tests cargo runs beside this one in the same process (RSS is the process's).
    let cfg = Config::new(128, 512).num_experts(8);
    let x = data(8 * 128, 13);
    let mut y = vec![0f32; x.len()];
    {
        let l = cfg.build().unwrap();
        l.context().unwrap().forward(&x, &mut y).unwrap();
    }
    let before = rss_bytes();
    for _ in 0..60 {
        let l = cfg.build().unwrap();
        let mut ctx = l.context().unwrap();
        ctx.forward(&x, &mut y).unwrap();
    }
    let grown = rss_bytes().saturating_sub(before);
    assert!(grown < 300 << 20, "RSS grew by {} MB over 60 dropped layers", grown >> 20);
}

/// A valid text for field `f` other than its default.
fn other_value(f: &libmoe::FieldInfo) -> String {
    match f.field_type {
        libmoe::FieldType::Enum => {
            if f.values[0] == f.default { f.values.last().unwrap().clone() } else { f.values[0].clone() }
        }
        libmoe::FieldType::Bool => if f.default == "true" { "false" } else { "true" }.to_string(),
        libmoe::FieldType::Float => (f.default.parse::<f32>().unwrap() + 0.375).to_string(),
        _ => (f.default.parse::<i64>().unwrap() + 3).to_string(),
    }
}

#[test]
fn every_field_of_the_c_table_is_settable_by_name() {
    let fields = libmoe::config_fields().unwrap();
    assert_eq!(fields.len() as i32, unsafe { libmoe::sys::moe_config_num_fields() });
    let defaults = Config::default();
    let mut settable = 0;
    for f in &fields {
        if f.field_type == libmoe::FieldType::Pointer {
            let mut c = Config::default();
            assert_eq!(c.set(&f.name, "0x10").unwrap_err().status(), Status::InvalidArgument);
            continue;
        }
        assert_eq!(defaults.get(&f.name).unwrap(), f.default, "{}", f.name);
        let value = other_value(f);
        let mut c = Config::default();
        c.set(&f.name, &value).unwrap_or_else(|e| panic!("{} = {}: {}", f.name, value, e));
        assert_eq!(c.get(&f.name).unwrap(), value, "{}", f.name);
        assert_ne!(c, defaults, "{}", f.name);
        for g in fields.iter().filter(|g| g.name != f.name && g.field_type != libmoe::FieldType::Pointer) {
            assert_eq!(c.get(&g.name).unwrap(), g.default, "setting {} changed {}", f.name, g.name);
        }
        settable += 1;
    }
    assert!(settable >= 29, "{} settable fields", settable);
    // The typed fields and the names are the same storage.
    let mut c = Config::new(8, 16);
    c.set("dtype", "bf16").unwrap();
    c.set("capacity_factor", 1.25).unwrap();
    c.set("activation", "GeGLU").unwrap();
    c.set("seed", u64::MAX).unwrap();
    c.set("normalize_topk", false).unwrap();
    assert_eq!((c.dtype, c.capacity_factor, c.activation, c.seed), (DType::Bf16, 1.25, Activation::GeGlu, u64::MAX));
    assert!(!c.normalize_topk);
    assert_eq!(c.get("dtype").unwrap(), "bfloat16");
    let c = c.top_k(1);
    assert_eq!(c.get("top_k").unwrap(), "1");
    assert_eq!(c.build().unwrap().config().unwrap(), c);
}

#[test]
fn bad_names_and_values_name_the_field_and_change_nothing() {
    let mut c = Config::new(8, 16);
    let before = c.clone();
    let e = c.set("d_modle", 8).unwrap_err();
    assert_eq!(e.status(), Status::InvalidArgument);
    assert!(e.message().contains("d_modle") && e.message().contains("the fields are: d_model"), "{}", e);
    let e = c.set("activation", "swish").unwrap_err();
    assert!(e.message().contains("activation='swish' is not one of 'swiglu', 'geglu'"), "{}", e);
    let e = c.set("top_k", -1.5).unwrap_err();
    assert!(e.message().contains("top_k='-1.5'"), "{}", e);
    let e = c.set("seed", -1).unwrap_err();
    assert!(e.message().contains("out of range [0, 18446744073709551615]"), "{}", e);
    assert_eq!(c.set("dtype", "bf\016").unwrap_err().status(), Status::InvalidArgument);
    assert_eq!(c.get("nope").unwrap_err().status(), Status::InvalidArgument);
    assert_eq!(c, before);
}

#[test]
fn presets_are_the_librarys() {
    let presets = libmoe::presets();
    let names: Vec<&str> = presets.iter().map(|(n, _)| n.as_str()).collect();
    for name in PRESETS {
        assert!(names.contains(name), "{} not in {:?}", name, names);
    }
    assert!(presets.iter().all(|(_, d)| d.len() > 20));
    for (name, _) in &presets {
        Config::preset(name, 8, 16).unwrap_or_else(|e| panic!("{}: {}", name, e));
    }
}

#[test]
fn checkpoints_round_trip_and_refuse_bad_files() {
    let dir = std::env::temp_dir().join(format!("libmoe-rust-checkpoint-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let a = small().build().unwrap();
    a.set_param("experts.w1", &data(4 * 32 * 16, 5)).unwrap();
    let path = dir.join("m.safetensors");
    a.save(&path, Some("model.layers.0.mlp")).unwrap();
    let b = small().seed(11).build().unwrap();
    assert_ne!(a.param("experts.w1").unwrap(), b.param("experts.w1").unwrap());
    b.load(&path, Some("model.layers.0.mlp"), None).unwrap();
    for p in a.params().unwrap() {
        assert_eq!(a.param(&p.name).unwrap(), b.param(&p.name).unwrap(), "{}", p.name);
    }

    // A file cut short is refused, naming the file; the layer keeps its values.
    let bytes = std::fs::read(&path).unwrap();
    let cut = dir.join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() - 7]).unwrap();
    let e = b.load(&cut, Some("model.layers.0.mlp"), Some("libmoe")).unwrap_err();
    assert_eq!(e.status(), Status::InvalidArgument);
    assert!(e.message().contains("cut.safetensors"), "{}", e.message());
    assert_eq!(a.param("experts.w1").unwrap(), b.param("experts.w1").unwrap());
    // gpt-oss's naming needs a gpt-oss layer (clamped SwiGLU): refused for this one.
    let e = b.load(&path, Some("model.layers.0.mlp"), Some("gpt-oss")).unwrap_err();
    assert_eq!(e.status(), Status::InvalidArgument);
    assert_eq!(b.load(&path, Some("a\0b"), None).unwrap_err().status(), Status::InvalidArgument);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn saves_in_a_familys_names_and_loads_back_bit_for_bit() {
    let dir = std::env::temp_dir().join(format!("libmoe-rust-save-as-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let a = small().build().unwrap();
    a.set_param("experts.w1", &data(4 * 32 * 16, 5)).unwrap();
    a.set_param("experts.w3", &data(4 * 32 * 16, 6)).unwrap();
    a.set_param("router.bias", &[0.0; 4]).unwrap(); // qwen3-moe has no selection bias
    let path = dir.join("qwen3.safetensors");
    a.save_as(&path, Some("model.layers.1.mlp"), Some("qwen3-moe")).unwrap();
    let text = String::from_utf8_lossy(&std::fs::read(&path).unwrap()).into_owned();
    assert!(text.contains("\"model.layers.1.mlp.experts.gate_up_proj\""), "{}", &text[..200]);
    let b = small().seed(11).build().unwrap();
    assert_ne!(a.param("experts.w3").unwrap(), b.param("experts.w3").unwrap());
    b.load(&path, Some("model.layers.1.mlp"), Some("qwen3-moe")).unwrap();
    for p in a.params().unwrap() {
        assert_eq!(a.param(&p.name).unwrap(), b.param(&p.name).unwrap(), "{}", p.name);
    }

    // A selection bias qwen3-moe cannot hold: refused, naming it; the file is left as it was.
    let before = std::fs::read(&path).unwrap();
    a.set_param("router.bias", &[0.0, 0.0, 0.25, 0.0]).unwrap();
    let e = a.save_as(&path, Some("model.layers.1.mlp"), Some("qwen3-moe")).unwrap_err();
    assert_eq!(e.status(), Status::InvalidArgument);
    assert!(e.message().contains("router.bias") && e.message().contains("qwen3-moe"), "{}", e.message());
    assert_eq!(std::fs::read(&path).unwrap(), before);
    // `None` is libmoe's names, which hold it.
    a.save_as(&path, None, None).unwrap();
    b.load(&path, None, None).unwrap();
    assert_eq!(a.param("router.bias").unwrap(), b.param("router.bias").unwrap());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A safetensors file of f32 tensors, written by hand (header length, JSON, little-endian data).
fn write_safetensors(path: &std::path::Path, tensors: &[(&str, Vec<usize>, &[f32])]) {
    let (mut header, mut data) = (String::from("{"), Vec::new());
    for (i, (name, shape, v)) in tensors.iter().enumerate() {
        let shape: Vec<String> = shape.iter().map(|s| s.to_string()).collect();
        let begin = data.len();
        for x in v.iter() {
            data.extend_from_slice(&x.to_le_bytes());
        }
        header += &format!(
            "{}\"{}\":{{\"dtype\":\"F32\",\"shape\":[{}],\"data_offsets\":[{},{}]}}",
            if i == 0 { "" } else { "," },
            name,
            shape.join(","),
            begin,
            data.len()
        );
    }
    header += "}";
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(&data);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn gpt_oss_checkpoint_loads() {
    let dir = std::env::temp_dir().join(format!("libmoe-rust-gpt-oss-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (d, ff, e) = (6usize, 4usize, 4usize);
    // transformers' GptOssMLP: gate_up_proj [E, d, 2ff], gate and up interleaved on the last axis.
    let (router, rbias, gate_up) = (data(e * d, 1), data(e, 2), data(e * d * 2 * ff, 3));
    let (gate_up_bias, down, down_bias) = (data(e * 2 * ff, 4), data(e * ff * d, 5), data(e * d, 6));
    let path = dir.join("model.safetensors");
    write_safetensors(
        &path,
        &[
            ("model.layers.0.mlp.router.weight", vec![e, d], &router),
            ("model.layers.0.mlp.router.bias", vec![e], &rbias),
            ("model.layers.0.mlp.experts.gate_up_proj", vec![e, d, 2 * ff], &gate_up),
            ("model.layers.0.mlp.experts.gate_up_proj_bias", vec![e, 2 * ff], &gate_up_bias),
            ("model.layers.0.mlp.experts.down_proj", vec![e, ff, d], &down),
            ("model.layers.0.mlp.experts.down_proj_bias", vec![e, d], &down_bias),
        ],
    );
    let layer = Config::preset("gpt-oss", d, ff).unwrap().num_experts(e).top_k(2).build().unwrap();
    layer.load(&path, Some("model.layers.0.mlp"), Some("gpt-oss")).unwrap();
    assert_eq!(layer.param("router.weight").unwrap(), router);
    assert_eq!(layer.param("router.logit_bias").unwrap(), rbias);
    assert_eq!(layer.param("experts.b2").unwrap(), down_bias);
    let w1 = layer.param("experts.w1").unwrap();
    let w3 = layer.param("experts.w3").unwrap();
    let w2 = layer.param("experts.w2").unwrap();
    let (b1, b3) = (layer.param("experts.b1").unwrap(), layer.param("experts.b3").unwrap());
    for x in 0..e {
        for f in 0..ff {
            assert_eq!(b1[x * ff + f], gate_up_bias[x * 2 * ff + 2 * f]);
            assert_eq!(b3[x * ff + f], gate_up_bias[x * 2 * ff + 2 * f + 1]);
            for i in 0..d {
                assert_eq!(w1[(x * ff + f) * d + i], gate_up[(x * d + i) * 2 * ff + 2 * f]);
                assert_eq!(w3[(x * ff + f) * d + i], gate_up[(x * d + i) * 2 * ff + 2 * f + 1]);
                assert_eq!(w2[(x * d + i) * ff + f], down[(x * ff + f) * d + i]);
            }
        }
    }
    let mut y = vec![0.0f32; 3 * d];
    layer.forward(&data(3 * d, 7), &mut y).unwrap();
    assert!(y.iter().all(|v| v.is_finite()));
    std::fs::remove_dir_all(&dir).unwrap();
}
