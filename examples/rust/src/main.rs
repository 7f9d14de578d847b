//! moe_demo: one training step of a libmoe layer on random data (Rust version of examples/c/moe_demo.c).
//!
//! Creates a layer, runs a training forward on random tokens, takes the loss
//! L = 1/(2T) * sum_t |y_t|^2, runs the backward with dy = y / T, and prints the routing summary,
//! a bar chart of the load of each expert and a few gradient norms: the same lines, for the same
//! flags, as the C and Java versions (tests/examples_compare checks that).
//!
//!   moe_demo [--device cpu|cuda] [--tokens T] [--experts E] [--top-k K] [--d-model D] [--d-ff F] [--seed S]
//!
//! With --device cuda the activations live on the GPU, allocated through the CUDA runtime reached
//! with dlopen (the demo depends on libmoe only).
use libmoe::{Config, Context, Device, Error, Layer};
use std::ffi::{c_void, CStr, CString};
use std::io::Write;
use std::os::raw::{c_char, c_int};
use std::process::ExitCode;

// ---- options ------------------------------------------------------------------------------------
struct Options {
    device: Device,
    tokens: i64,
    experts: i64,
    top_k: i64,
    d_model: i64,
    d_ff: i64,
    seed: u64,
}

const USAGE: &str = "usage: moe_demo [--device cpu|cuda] [--tokens T] [--experts E] [--top-k K]\n\
                     \x20               [--d-model D] [--d-ff F] [--seed S]\n\
                     defaults: --device cpu --tokens 512 --experts 8 --top-k 2 --d-model 64 --d-ff 128 --seed 42\n";

/// strtoll(s, &end, 10) with *end == '\0' required, as the C demo parses: leading white space and
/// a sign are accepted, out-of-range values saturate.
fn parse_i64(flag: &str, s: Option<&str>) -> Option<i64> {
    let s = match s {
        Some(s) => s,
        None => {
            eprintln!("moe_demo: {} needs a value", flag);
            return None;
        }
    };
    let t = s.trim_start_matches(|c: char| c == ' ' || ('\t'..='\r').contains(&c));
    let (neg, digits) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        eprintln!("moe_demo: {} expects an integer, got '{}'", flag, s);
        return None;
    }
    let mut v: i128 = 0;
    for b in digits.bytes() {
        v = (v * 10 + (b - b'0') as i128).min(i64::MAX as i128 + 1);
    }
    let v = if neg { -v } else { v };
    Some(v.clamp(i64::MIN as i128, i64::MAX as i128) as i64)
}

fn parse_args() -> Option<Options> {
    let mut o = Options { device: Device::Cpu, tokens: 512, experts: 8, top_k: 2, d_model: 64, d_ff: 128, seed: 42 };
    let args: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < args.len() {
        let flag = args[i].as_str();
        if flag == "-h" || flag == "--help" {
            print!("{}", USAGE);
            std::process::exit(0);
        }
        let (name, val): (&str, Option<&str>) = match flag.find('=') {
            Some(eq) if eq < 64 => (&flag[..eq], Some(&flag[eq + 1..])),
            _ => {
                i += 1;
                (flag, args.get(i).map(|s| s.as_str()))
            }
        };
        match name {
            "--device" => match val {
                Some("cpu") => o.device = Device::Cpu,
                Some("cuda") => o.device = Device::Cuda,
                v => {
                    eprintln!("moe_demo: --device expects cpu or cuda, got '{}'", v.unwrap_or(""));
                    return None;
                }
            },
            "--tokens" => o.tokens = parse_i64(name, val)?,
            "--experts" => o.experts = parse_i64(name, val)?,
            "--top-k" => o.top_k = parse_i64(name, val)?,
            "--d-model" => o.d_model = parse_i64(name, val)?,
            "--d-ff" => o.d_ff = parse_i64(name, val)?,
            "--seed" => o.seed = parse_i64(name, val)? as u64,
            _ => {
                eprintln!("moe_demo: unknown option '{}'", flag);
                eprint!("{}", USAGE);
                return None;
            }
        }
        i += 1;
    }
    if o.tokens < 0 {
        eprintln!("moe_demo: --tokens must be >= 0, got {}", o.tokens);
        return None;
    }
    Some(o)
}

// ---- a small deterministic PRNG (splitmix64), as in the C demo ------------------------------------
fn rng_next(s: &mut u64) -> u64 {
    *s = s.wrapping_add(0x9E3779B97F4A7C15);
    let mut z = *s;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
    z ^ (z >> 31)
}

/// uniform in [-1, 1)
fn rng_uniform(s: &mut u64) -> f32 {
    ((rng_next(s) >> 11) as f64 * (1.0 / (1u64 << 52) as f64) - 1.0) as f32
}

// ---- device memory: host, or the CUDA runtime reached through dlopen ------------------------------
#[link(name = "dl")]
extern "C" {
    fn dlopen(filename: *const c_char, flag: c_int) -> *mut c_void;
    fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
    fn dlerror() -> *mut c_char;
}
const RTLD_NOW: c_int = 2;

type CudaMalloc = unsafe extern "C" fn(*mut *mut c_void, usize) -> c_int;
type CudaFree = unsafe extern "C" fn(*mut c_void) -> c_int;
type CudaMemcpy = unsafe extern "C" fn(*mut c_void, *const c_void, usize, c_int) -> c_int;
type CudaErrorString = unsafe extern "C" fn(c_int) -> *const c_char;

struct Cuda {
    malloc: CudaMalloc,
    free: CudaFree,
    memcpy: CudaMemcpy,
    error_string: CudaErrorString,
}

const CUDA_MEMCPY_H2D: c_int = 1;
const CUDA_MEMCPY_D2H: c_int = 2;

impl Cuda {
    fn open() -> Option<Cuda> {
        let mut lib = std::ptr::null_mut();
        for name in ["libcudart.so", "libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0"] {
            let c = CString::new(name).unwrap();
            lib = unsafe { dlopen(c.as_ptr(), RTLD_NOW) };
            if !lib.is_null() {
                break;
            }
        }
        if lib.is_null() {
            let e = unsafe { dlerror() };
            let e = if e.is_null() { String::new() } else { unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned() };
            eprintln!("moe_demo: CUDA is unavailable: the CUDA runtime library (libcudart.so) could not be loaded: {}", e);
            return None;
        }
        let sym = |n: &str| {
            let c = CString::new(n).unwrap();
            unsafe { dlsym(lib, c.as_ptr()) }
        };
        let (m, f, c, e) = (sym("cudaMalloc"), sym("cudaFree"), sym("cudaMemcpy"), sym("cudaGetErrorString"));
        if m.is_null() || f.is_null() || c.is_null() || e.is_null() {
            eprintln!("moe_demo: CUDA is unavailable: libcudart lacks cudaMalloc/cudaFree/cudaMemcpy");
            return None;
        }
        // SAFETY: the symbols of the CUDA runtime API with these C signatures.
        unsafe {
            Some(Cuda {
                malloc: std::mem::transmute::<*mut c_void, CudaMalloc>(m),
                free: std::mem::transmute::<*mut c_void, CudaFree>(f),
                memcpy: std::mem::transmute::<*mut c_void, CudaMemcpy>(c),
                error_string: std::mem::transmute::<*mut c_void, CudaErrorString>(e),
            })
        }
    }

    fn err(&self, e: c_int) -> String {
        unsafe { CStr::from_ptr((self.error_string)(e)) }.to_string_lossy().into_owned()
    }
}

/// A device buffer of n floats, freed on drop.
struct DeviceBuf<'a> {
    cuda: &'a Cuda,
    ptr: *mut c_void,
    bytes: usize,
}

impl<'a> DeviceBuf<'a> {
    fn new(cuda: &'a Cuda, n: usize) -> Option<DeviceBuf<'a>> {
        let bytes = (n * 4).max(1);
        let mut ptr = std::ptr::null_mut();
        let e = unsafe { (cuda.malloc)(&mut ptr, bytes) };
        if e != 0 {
            eprintln!("moe_demo: cudaMalloc({} bytes) failed: {}", bytes, cuda.err(e));
            return None;
        }
        Some(DeviceBuf { cuda, ptr, bytes: n * 4 })
    }

    fn upload(&self, host: &[f32]) -> Option<()> {
        self.copy(self.ptr, host.as_ptr().cast(), CUDA_MEMCPY_H2D)
    }

    fn download(&self, host: &mut [f32]) -> Option<()> {
        self.copy(host.as_mut_ptr().cast(), self.ptr, CUDA_MEMCPY_D2H)
    }

    fn copy(&self, dst: *mut c_void, src: *const c_void, kind: c_int) -> Option<()> {
        if self.bytes == 0 {
            return Some(());
        }
        let e = unsafe { (self.cuda.memcpy)(dst, src, self.bytes, kind) };
        if e != 0 {
            eprintln!("moe_demo: cudaMemcpy failed: {}", self.cuda.err(e));
            return None;
        }
        Some(())
    }
}

impl Drop for DeviceBuf<'_> {
    fn drop(&mut self) {
        unsafe { (self.cuda.free)(self.ptr) };
    }
}

// ---- output helpers -------------------------------------------------------------------------------
fn l2norm(v: &[f32]) -> f64 {
    v.iter().fold(0.0f64, |s, &x| s + x as f64 * x as f64).sqrt()
}

/// A horizontal bar of width value/max * width cells, drawn with eighth blocks.
fn bar(value: f64, max: f64, width: i64) -> String {
    const EIGHTHS: [&str; 8] = ["", "\u{258F}", "\u{258E}", "\u{258D}", "\u{258C}", "\u{258B}", "\u{258A}", "\u{2589}"];
    let cells = if max > 0.0 { (value / max * width as f64 * 8.0).round() as i64 } else { 0 };
    let (full, rest) = (cells / 8, cells % 8);
    let used = full + (rest > 0) as i64;
    let mut s = "\u{2588}".repeat(full as usize);
    s.push_str(EIGHTHS[rest as usize]);
    s.push_str(&" ".repeat((width - used).max(0) as usize));
    s
}

fn print_load_chart(out: &mut impl Write, counts: &[i64], slots: i64) -> std::io::Result<()> {
    let experts = counts.len() as i64;
    let max = counts.iter().copied().max().unwrap_or(0).max(0);
    let mean = if experts > 0 { slots as f64 / experts as f64 } else { 0.0 };
    writeln!(out, "\nper-expert load (kept slots; perfectly balanced = {:.1} each)", mean)?;
    for (e, &c) in counts.iter().enumerate() {
        let pct = if slots > 0 { 100.0 * c as f64 / slots as f64 } else { 0.0 };
        writeln!(out, "  expert {:>3} \u{2502}{}\u{2502} {:>6}  {:>5.1}%", e, bar(c as f64, max as f64, 40), c, pct)?;
    }
    Ok(())
}

// ---- main -----------------------------------------------------------------------------------------
fn report(what: &str, e: &Error) {
    eprintln!("moe_demo: {} failed: {}: {}", what, e.status().name(), e.message());
}

/// Any failure has been reported on stderr when this returns Err.
enum Fail {
    Moe(&'static str, Error),
    Reported,
}

impl From<std::io::Error> for Fail {
    fn from(e: std::io::Error) -> Fail {
        eprintln!("moe_demo: writing the output failed: {}", e);
        Fail::Reported
    }
}

fn moe<T>(what: &'static str, r: libmoe::Result<T>) -> Result<T, Fail> {
    r.map_err(|e| Fail::Moe(what, e))
}

fn dim(flag: &str, v: i64) -> Result<usize, Fail> {
    usize::try_from(v).map_err(|_| {
        eprintln!("moe_demo: moe_layer_create failed: MOE_ERR_INVALID_ARGUMENT: {} must be > 0, got {}", flag, v);
        Fail::Reported
    })
}

fn run(o: &Options) -> Result<(), Fail> {
    if libmoe::version() != libmoe::HEADER_VERSION {
        println!("note: built against libmoe {} but running with {}", libmoe::HEADER_VERSION, libmoe::version());
    }
    let cfg = Config::new(dim("d_model", o.d_model)?, dim("d_ff", o.d_ff)?)
        .num_experts(dim("num_experts", o.experts)?)
        .top_k(dim("top_k", o.top_k)?)
        .device(o.device)
        .seed(o.seed)
        .z_loss_coef(0.001);
    let layer = match Layer::new(&cfg) {
        Ok(l) => l,
        Err(e) if o.device == Device::Cuda && matches!(e.status(), libmoe::Status::Unsupported | libmoe::Status::Device) => {
            eprintln!("moe_demo: CUDA is unavailable ({}): {}", e.status().name(), e.message());
            eprintln!("moe_demo: run with --device cpu to use the CPU backend");
            return Err(Fail::Reported);
        }
        Err(e) => return Err(Fail::Moe("moe_layer_create", e)),
    };
    let cuda = if o.device == Device::Cuda { Some(Cuda::open().ok_or(Fail::Reported)?) } else { None };
    let mut ctx = moe("moe_context_create", layer.context())?;

    let v = libmoe::version_triple();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    writeln!(
        out,
        "libmoe {}.{}.{}  device {}  tokens {}  d_model {}  d_ff {}  experts {}  top-k {}  seed {}",
        v.0,
        v.1,
        v.2,
        if o.device == Device::Cuda { "cuda" } else { "cpu" },
        o.tokens,
        o.d_model,
        o.d_ff,
        o.experts,
        o.top_k,
        o.seed
    )?;

    // random tokens, deterministic in the seed
    let n = (o.tokens * o.d_model) as usize;
    let mut rng = o.seed ^ 0xD1B54A32D192ED03;
    let hx: Vec<f32> = (0..n).map(|_| rng_uniform(&mut rng)).collect();
    let mut hy = vec![0f32; n];
    let mut hdx = vec![0f32; n];

    // training forward, loss = 1/(2T) sum |y|^2, so dy = y / T, then backward
    let t = o.tokens as usize;
    let loss = match &cuda {
        None => {
            moe("moe_forward", ctx.forward(&hx, &mut hy))?;
            let loss = finish_forward(&mut hy, t)?;
            moe("moe_backward", ctx.backward(&hy, Some(&mut hdx)))?;
            loss
        }
        Some(cuda) => {
            let bufs = (DeviceBuf::new(cuda, n), DeviceBuf::new(cuda, n), DeviceBuf::new(cuda, n), DeviceBuf::new(cuda, n));
            let (x, y, dy, dx) = match bufs {
                (Some(x), Some(y), Some(dy), Some(dx)) => (x, y, dy, dx),
                _ => return Err(Fail::Reported),
            };
            x.upload(&hx).ok_or(Fail::Reported)?;
            moe("moe_forward", unsafe { layer.forward_raw(x.ptr, t, y.ptr, Some(&mut ctx)) })?;
            y.download(&mut hy).ok_or(Fail::Reported)?;
            let loss = finish_forward(&mut hy, t)?;
            dy.upload(&hy).ok_or(Fail::Reported)?;
            moe("moe_backward", unsafe { layer.backward_raw(&mut ctx, dy.ptr, dx.ptr) })?;
            dx.download(&mut hdx).ok_or(Fail::Reported)?;
            loss
        }
    };
    if !hdx.iter().all(|v| v.is_finite()) {
        eprintln!("moe_demo: the backward produced a non-finite dL/dx");
        return Err(Fail::Reported);
    }

    summary(&mut out, &layer, &ctx, &hx, &hdx, loss)
}

/// Check y, compute the loss and turn y into dy = y / T in place.
fn finish_forward(hy: &mut [f32], tokens: usize) -> Result<f64, Fail> {
    if !hy.iter().all(|v| v.is_finite()) {
        eprintln!("moe_demo: the forward produced a non-finite output");
        return Err(Fail::Reported);
    }
    let mut loss = hy.iter().fold(0.0f64, |s, &v| s + 0.5 * v as f64 * v as f64);
    if tokens > 0 {
        loss /= tokens as f64;
    }
    for v in hy.iter_mut() {
        *v = if tokens > 0 { *v / tokens as f32 } else { 0.0 };
    }
    Ok(loss)
}

fn summary(out: &mut impl Write, layer: &Layer, ctx: &Context<'_>, hx: &[f32], hdx: &[f32], loss: f64) -> Result<(), Fail> {
    let stats = moe("moe_context_stats", ctx.stats())?;
    let counts = moe("moe_context_expert_counts", ctx.expert_counts())?;
    let kept: i64 = counts.iter().sum();

    writeln!(out, "\nrouting summary")?;
    writeln!(out, "  tokens               {}", stats.num_tokens)?;
    writeln!(out, "  routing slots        {} (tokens x top-k)", stats.num_slots)?;
    writeln!(out, "  dropped slots        {}", stats.dropped_slots)?;
    writeln!(out, "  load-balance loss    {:.4} (1.0 = perfectly balanced)", stats.load_balance_loss)?;
    writeln!(out, "  router z-loss        {:.4}", stats.z_loss)?;
    writeln!(out, "  aux loss (weighted)  {:.6}", stats.aux_loss_total)?;
    writeln!(out, "  load CV              {:.4} (std/mean of expert loads)", stats.load_cv)?;
    writeln!(out, "  max/mean load        {:.3}", stats.max_load_ratio)?;
    print_load_chart(out, &counts, kept)?;

    writeln!(out, "\ntraining step: loss = 1/(2T) sum |y|^2 = {:.6}", loss)?;
    writeln!(out, "  |x|  {:.4}   |dL/dx|  {:.6}", l2norm(hx), l2norm(hdx))?;
    writeln!(out, "  gradient norms:")?;
    for p in moe("moe_layer_param_info", layer.params())? {
        let shape = p.shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(" x ");
        if !p.trainable {
            writeln!(out, "    {:<20} [{}]  (not trainable)", p.name, shape)?;
            continue;
        }
        let g = moe("moe_layer_get_grad", layer.grad(&p.name))?;
        writeln!(out, "    {:<20} [{}]  |grad| = {:.6}", p.name, shape, l2norm(&g))?;
        if !g.iter().all(|v| v.is_finite()) {
            eprintln!("moe_demo: the gradient of {} is not finite", p.name);
            return Err(Fail::Reported);
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let o = match parse_args() {
        Some(o) => o,
        None => return ExitCode::from(1),
    };
    match run(&o) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Fail::Moe(what, e)) => {
            report(what, &e);
            ExitCode::from(1)
        }
        Err(Fail::Reported) => ExitCode::from(1),
    }
}
