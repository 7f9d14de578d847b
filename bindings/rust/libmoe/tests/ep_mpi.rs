//! Expert parallelism from Rust over MPI (feature `mpi`). Run by `cargo test --features mpi`, this
//! program starts itself under `mpiexec -n 2` (MPIEXEC names another launcher); each rank builds
//! the layer with a comm from libmoe_mpi, runs a training step on its share of a global batch and
//! compares with one layer holding every expert, run on the whole global batch in the same
//! process: outputs, input gradients, aux losses, its experts' gradients (a slice of the full
//! layer's) and the replicated parameters' gradients summed over the ranks (all_reduce_sum).
//! Prints "SKIPPED: ..." and passes where no MPI launcher can be run.
use libmoe::{mpi, Config, ExpertComm, Layer, Status};
use std::env;
use std::process::{exit, Command};

const RANKS: usize = 2;

fn main() {
    let under_mpi = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"].iter().any(|v| env::var_os(v).is_some());
    if under_mpi {
        exit(rank_main());
    }
    let launcher = env::var("MPIEXEC").unwrap_or_else(|_| "mpiexec".to_string());
    let version = match Command::new(&launcher).arg("--version").output() {
        Ok(v) => String::from_utf8_lossy(&v.stdout).to_string(),
        Err(e) => {
            println!("SKIPPED: cannot run the MPI launcher {:?} ({}): set MPIEXEC", launcher, e);
            return;
        }
    };
    let me = env::current_exe().expect("the test's own path");
    let mut cmd = Command::new(&launcher);
    if version.contains("Open MPI") || version.contains("OpenRTE") {
        // ranks may outnumber cores; root (CI containers) must be allowed explicitly
        cmd.args(["--oversubscribe"]).env("OMPI_ALLOW_RUN_AS_ROOT", "1").env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    }
    let out = cmd
        .args(["-n", &RANKS.to_string()])
        .arg(&me)
        .env("OMP_NUM_THREADS", "1")
        .output()
        .unwrap_or_else(|e| panic!("cannot start {}: {}", launcher, e));
    let stdout = String::from_utf8_lossy(&out.stdout);
    print!("{}", stdout);
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{} -n {} {} failed: {}", launcher, RANKS, me.display(), out.status);
    for r in 0..RANKS {
        let line = format!("rank {} of {}: Rust expert parallelism over MPI: ok", r, RANKS);
        assert!(stdout.contains(&line), "no \"{}\" in the output", line);
    }
}

/// splitmix64 to [-1, 1): the same global batch on every rank.
fn random(seed: u64, n: usize) -> Vec<f32> {
    let mut z = seed;
    (0..n)
        .map(|_| {
            z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut v = z;
            v = (v ^ (v >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            v = (v ^ (v >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            v ^= v >> 31;
            ((v >> 40) as f64 / 16_777_216.0 * 2.0 - 1.0) as f32
        })
        .collect()
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        num += (*x as f64 - *y as f64).powi(2);
        den += (*y as f64).powi(2);
    }
    num.sqrt() / (den.sqrt() + 1e-30)
}

fn config() -> Config {
    let mut cfg = Config::new(16, 24).num_experts(8).top_k(2).seed(11);
    for (k, v) in [("aux_loss_coef", "0.01"), ("z_loss_coef", "0.001"), ("importance_loss_coef", "0.01"), ("num_shared_experts", "1"), ("shared_gate", "true")] {
        cfg.set(k, v).unwrap();
    }
    cfg
}

fn rank_main() -> i32 {
    let mut failures = Vec::new();
    let mut checks = 0;
    let mut check = |ok: bool, what: String| {
        checks += 1;
        if !ok {
            failures.push(what);
        }
    };
    mpi::init().expect("moe_mpi_init");
    mpi::init().expect("a second moe_mpi_init is a no-op");
    let mut comm = mpi::Comm::world().expect("moe_mpi_comm_create_world");
    let (rank, size) = (comm.rank(), comm.size());
    check(size == RANKS, format!("size {}", size));
    let e = comm.set_timeout(-1.0).unwrap_err();
    check(e.status() == Status::InvalidArgument, format!("a negative timeout gave {:?}", e));
    comm.set_timeout(60.0).unwrap();
    // Uneven local batches: rank r holds 5 + 3r tokens of the global batch.
    let d = 16;
    let counts: Vec<usize> = (0..size).map(|r| 5 + 3 * r).collect();
    let total: usize = counts.iter().sum();
    let first: usize = counts[..rank].iter().sum();
    let tokens = counts[rank];
    let (xg, dyg) = (random(1, total * d), random(2, total * d));
    let (x, dy) = (&xg[first * d..(first + tokens) * d], &dyg[first * d..(first + tokens) * d]);

    let reference = Layer::new(&config()).unwrap();
    let mut rctx = reference.context().unwrap();
    let (mut yg, mut dxg) = (vec![0f32; total * d], vec![0f32; total * d]);
    rctx.forward(&xg, &mut yg).unwrap();
    rctx.backward(&dyg, Some(&mut dxg)).unwrap();

    let ep = Layer::with_comm(&config(), comm).expect("the expert-parallel layer");
    let mut ctx = ep.context().unwrap();
    let (mut y, mut dx) = (vec![0f32; tokens * d], vec![0f32; tokens * d]);
    ctx.forward(x, &mut y).unwrap();
    ctx.backward(dy, Some(&mut dx)).unwrap();
    let comm = ep.comm().expect("the layer's comm");

    let ey = rel_err(&y, &yg[first * d..(first + tokens) * d]);
    let edx = rel_err(&dx, &dxg[first * d..(first + tokens) * d]);
    check(ey < 1e-5, format!("y differs from the single layer's: rel err {}", ey));
    check(edx < 1e-5, format!("dx differs from the single layer's: rel err {}", edx));
    let (s, sr) = (ctx.stats().unwrap(), rctx.stats().unwrap());
    for (what, a, b) in [
        ("aux loss", s.aux_loss_total, sr.aux_loss_total),
        ("load-balance loss", s.load_balance_loss, sr.load_balance_loss),
        ("z loss", s.z_loss, sr.z_loss),
    ] {
        check((a - b).abs() <= 1e-5 * b.abs(), format!("{} {} vs {}", what, a, b));
    }
    check(s.num_tokens == tokens, format!("stats count {} tokens, expected {}", s.num_tokens, tokens));

    let (mut experts, mut replicated) = (0, 0);
    let params = ep.params().unwrap();
    check(params.len() == reference.params().unwrap().len(), "parameter lists differ in length".into());
    for p in &params {
        let expert = p.name.starts_with("experts.");
        let n = p.numel();
        let off = if expert { rank * n } else { 0 };
        let (full, mine) = (reference.param(&p.name).unwrap(), ep.param(&p.name).unwrap());
        check(full.len() == if expert { size * n } else { n }, format!("{}: {} local of {}", p.name, n, full.len()));
        check(mine[..] == full[off..off + n], format!("{}: initial values are not the full layer's slice", p.name));
        if !p.trainable {
            continue;
        }
        let mut g = ep.grad(&p.name).unwrap();
        if expert {
            experts += 1;
        } else {
            comm.all_reduce_sum(&mut g).unwrap(); // this rank's tokens' share, summed over the ranks
            replicated += 1;
        }
        let gref = reference.grad(&p.name).unwrap();
        let e = rel_err(&g, &gref[off..off + n]);
        check(e < 1e-5, format!("grad of {} differs: rel err {}", p.name, e));
    }
    check(experts == 3 && replicated >= 4, format!("compared {} expert and {} replicated gradients", experts, replicated));
    let mut v = [rank as f32 + 1.0, 1.0];
    comm.all_reduce_sum(&mut v).unwrap();
    check(v == [(size * (size + 1) / 2) as f32, size as f32], format!("all_reduce_sum gave {:?}", v));

    drop(ctx);
    drop(ep); // destroys the comm (collective)
    mpi::finalize().expect("moe_mpi_finalize");
    let e = mpi::Comm::world().unwrap_err();
    check(e.status() == Status::State, format!("a comm after finalize gave {:?}", e));
    for f in &failures {
        eprintln!("rank {}: FAIL {}", rank, f);
    }
    println!(
        "rank {} of {}: Rust expert parallelism over MPI: {} ({} checks, {} failed)",
        rank,
        size,
        if failures.is_empty() { "ok" } else { "FAIL" },
        checks,
        failures.len()
    );
    if failures.is_empty() {
        0
    } else {
        1
    }
}
