//! moe_train: a training loop of many steps with the safe crate.
//!
//! A layer with ReLU experts learns a random linear map, target = A x, on fresh random batches:
//! each step runs a training forward, takes the loss L = 1/(2T) sum |y - target|^2, runs the
//! backward with dy = (y - target) / T, and updates every trainable parameter with plain SGD
//! written straight into the layer's memory (`Layer::param_mut`, no copies). It prints the loss as
//! it goes and exits 1 unless the mean loss of the last 10 steps is below a quarter of the first 10's.
//!
//!   moe_train [--steps N] [--tokens T] [--experts E] [--top-k K] [--d-model D] [--d-ff F] [--lr LR] [--seed S]
use libmoe::{Activation, Config, Layer};
use std::process::ExitCode;

struct Options {
    steps: usize,
    tokens: usize,
    experts: usize,
    top_k: usize,
    d_model: usize,
    d_ff: usize,
    lr: f32,
    seed: u64,
}

const USAGE: &str = "usage: moe_train [--steps N] [--tokens T] [--experts E] [--top-k K] [--d-model D] [--d-ff F]\n\
                     \x20                [--lr LR] [--seed S]\n\
                     defaults: --steps 300 --tokens 64 --experts 4 --top-k 2 --d-model 16 --d-ff 32 --lr 0.3 --seed 1\n";

fn parse_args() -> Result<Options, String> {
    let mut o = Options { steps: 300, tokens: 64, experts: 4, top_k: 2, d_model: 16, d_ff: 32, lr: 0.3, seed: 1 };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "-h" || flag == "--help" {
            print!("{}", USAGE);
            std::process::exit(0);
        }
        let value = args.next().ok_or_else(|| format!("{} needs a value", flag))?;
        let bad = |_| format!("{} expects a number, got '{}'", flag, value);
        match flag.as_str() {
            "--steps" => o.steps = value.parse().map_err(bad)?,
            "--tokens" => o.tokens = value.parse().map_err(bad)?,
            "--experts" => o.experts = value.parse().map_err(bad)?,
            "--top-k" => o.top_k = value.parse().map_err(bad)?,
            "--d-model" => o.d_model = value.parse().map_err(bad)?,
            "--d-ff" => o.d_ff = value.parse().map_err(bad)?,
            "--lr" => o.lr = value.parse().map_err(|_| format!("{} expects a number, got '{}'", flag, value))?,
            "--seed" => o.seed = value.parse().map_err(bad)?,
            _ => return Err(format!("unknown option '{}'\n{}", flag, USAGE)),
        }
    }
    if o.steps < 20 || o.tokens == 0 {
        return Err("--steps must be at least 20 and --tokens at least 1".into());
    }
    Ok(o)
}

/// Uniform in [-1, 1) from a splitmix64 stream.
fn batch(n: usize, state: &mut u64) -> Vec<f32> {
    (0..n)
        .map(|_| {
            *state = state.wrapping_add(0x9E3779B97F4A7C15);
            let mut z = *state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
            z ^= z >> 31;
            ((z >> 11) as f64 * (1.0 / (1u64 << 52) as f64) - 1.0) as f32
        })
        .collect()
}

/// target = A x for each token of x (A is [d, d], row-major).
fn linear_map(a: &[f32], x: &[f32], d: usize) -> Vec<f32> {
    x.chunks(d).flat_map(|xt| a.chunks(d).map(move |row| row.iter().zip(xt).map(|(a, x)| a * x).sum::<f32>())).collect()
}

/// One step: forward, loss, backward, SGD, zero_grad. Returns the loss before the update.
fn step(layer: &mut Layer, x: &[f32], target: &[f32], trainable: &[String], lr: f32) -> libmoe::Result<f64> {
    let mut y = vec![0f32; x.len()];
    let tokens = (x.len() / layer.d_model()) as f32;
    let loss;
    {
        // the context borrows the layer; it is dropped before the update below needs &mut
        let mut ctx = layer.context()?;
        ctx.forward(x, &mut y)?;
        loss = y.iter().zip(target).map(|(a, b)| 0.5 * ((a - b) as f64).powi(2)).sum::<f64>() / tokens as f64;
        let dy: Vec<f32> = y.iter().zip(target).map(|(a, b)| (a - b) / tokens).collect();
        ctx.backward(&dy, None)?;
    }
    for name in trainable {
        let p = layer.param_mut(name)?;
        if let Some(g) = p.grad {
            for (w, g) in p.data.iter_mut().zip(g) {
                *w -= lr * g;
            }
        }
    }
    layer.zero_grad()?;
    Ok(loss)
}

fn run(o: &Options) -> Result<bool, libmoe::Error> {
    let cfg = Config::new(o.d_model, o.d_ff).num_experts(o.experts).top_k(o.top_k).activation(Activation::Relu).seed(o.seed);
    let mut layer = cfg.build()?;
    let trainable: Vec<String> = layer.params()?.into_iter().filter(|p| p.trainable).map(|p| p.name).collect();
    println!(
        "learning target = A x: d_model {}  d_ff {}  experts {}  top-k {}  ReLU; {} steps of {} tokens, SGD lr {}",
        o.d_model, o.d_ff, o.experts, o.top_k, o.steps, o.tokens, o.lr
    );
    let mut rng = o.seed ^ 0xD1B54A32D192ED03;
    let scale = 1.0 / (o.d_model as f32).sqrt();
    let a: Vec<f32> = batch(o.d_model * o.d_model, &mut rng).iter().map(|v| v * scale).collect();
    let mut losses = Vec::with_capacity(o.steps);
    for s in 0..o.steps {
        let x = batch(o.tokens * o.d_model, &mut rng);
        let target = linear_map(&a, &x, o.d_model);
        let loss = step(&mut layer, &x, &target, &trainable, o.lr)?;
        if !loss.is_finite() {
            eprintln!("moe_train: the loss is not finite at step {}", s);
            return Ok(false);
        }
        losses.push(loss);
        if s % 25 == 0 || s + 1 == o.steps {
            println!("step {:4}  loss {:.6}", s, loss);
        }
    }
    let window = 10;
    let head = losses[..window].iter().sum::<f64>() / window as f64;
    let tail = losses[o.steps - window..].iter().sum::<f64>() / window as f64;
    println!("mean loss of the first {} steps {:.6}, of the last {} steps {:.6} ({:.1}x lower)", window, head, window, tail, head / tail);
    Ok(tail < 0.25 * head)
}

fn main() -> ExitCode {
    let o = match parse_args() {
        Ok(o) => o,
        Err(m) => {
            eprintln!("moe_train: {}", m);
            return ExitCode::from(2);
        }
    };
    match run(&o) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("moe_train: the loss did not fall to a quarter");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("moe_train: {}", e);
            ExitCode::from(2)
        }
    }
}
