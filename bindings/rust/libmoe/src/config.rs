//! The layer configuration (`moe_config`): a plain struct with public fields, chainable setters
//! of the same names, and the published presets.
use crate::error::{check, Error, Result};
use crate::layer::Layer;
use libmoe_sys as sys;
use std::ffi::CString;

macro_rules! c_enum {
    ($(#[$m:meta])* $name:ident : $what:literal { $($(#[$vm:meta])* $v:ident = $c:ident),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum $name { $($(#[$vm])* $v),+ }
        impl $name {
            /// The C enum value (pinned by moe.h).
            pub fn to_raw(self) -> u32 {
                match self { $($name::$v => sys::$c as u32),+ }
            }
            /// The variant of a C value.
            pub fn from_raw(v: u32) -> Result<$name> {
                $(if v == sys::$c as u32 { return Ok($name::$v); })+
                Err(Error::new(crate::Status::Internal, format!("unknown {} value {}", $what, v)))
            }
        }
    };
}

c_enum!(
    /// Where the layer's activations and parameters live.
    Device: "moe_device" { Cpu = MOE_DEVICE_CPU, Cuda = MOE_DEVICE_CUDA });
c_enum!(
    /// Storage type of the activations (host copies of parameters are always f32).
    DType: "moe_dtype" {
        /// IEEE float32
        F32 = MOE_DTYPE_F32,
        /// bfloat16 (the upper 16 bits of a float32)
        Bf16 = MOE_DTYPE_BF16,
        /// IEEE binary16
        F16 = MOE_DTYPE_F16,
    });
c_enum!(
    /// Expert FFN activation.
    Activation: "moe_activation" {
        /// (silu(x W1ᵀ) * (x W3ᵀ)) W2ᵀ
        SwiGlu = MOE_ACT_SWIGLU,
        /// (gelu(x W1ᵀ) * (x W3ᵀ)) W2ᵀ, exact GELU
        GeGlu = MOE_ACT_GEGLU,
        /// relu(x W1ᵀ) W2ᵀ
        Relu = MOE_ACT_RELU,
        /// gelu(x W1ᵀ) W2ᵀ, exact GELU
        Gelu = MOE_ACT_GELU,
        /// silu(x W1ᵀ) W2ᵀ
        Silu = MOE_ACT_SILU,
    });
c_enum!(
    /// Token choice (each token picks k experts) or expert choice (each expert picks its tokens).
    Routing: "moe_routing" { TokenChoice = MOE_ROUTE_TOKEN_CHOICE, ExpertChoice = MOE_ROUTE_EXPERT_CHOICE });
c_enum!(
    /// Router score function.
    Score: "moe_score" { Softmax = MOE_SCORE_SOFTMAX, Sigmoid = MOE_SCORE_SIGMOID });
c_enum!(
    /// Router noise in training.
    Noise: "moe_noise" {
        /// No noise (the default).
        Off = MOE_NOISE_NONE,
        /// Logits += N(0,1) * softplus(x Wnᵀ) (Shazeer et al. 2017).
        Gaussian = MOE_NOISE_GAUSSIAN,
        /// Router input scaled by U(1-eps, 1+eps) (Switch).
        Jitter = MOE_NOISE_JITTER,
    });

// The names of 0.1, kept as deprecated constants: they still compile (in expressions and patterns).
impl DType {
    /// Renamed [`DType::Bf16`] (the style of `Activation::SwiGlu`).
    #[deprecated(since = "0.2.0", note = "use DType::Bf16")]
    pub const BF16: DType = DType::Bf16;
}
impl Noise {
    /// Renamed [`Noise::Off`] (`None` read as `Option::None`).
    #[deprecated(since = "0.2.0", note = "use Noise::Off")]
    #[allow(non_upper_case_globals)]
    pub const None: Noise = Noise::Off;
}
c_enum!(
    /// Which slots an over-full expert keeps.
    DropPolicy: "moe_drop_policy" { Position = MOE_DROP_POSITION, Probs = MOE_DROP_PROBS });

/// Everything that defines a layer (`moe_config` without its `struct_size` and `comm`).
///
/// Start from [`Config::new`] (library defaults) or [`Config::preset`], then change fields,
/// either directly or with the chainable setters of the same names:
///
/// ```no_run
/// use libmoe::{Activation, Config};
/// let layer = Config::new(512, 1024).num_experts(16).top_k(2).activation(Activation::GeGlu).seed(7).build()?;
/// # Ok::<(), libmoe::Error>(())
/// ```
/// The meaning and default of each field is documented in moe.h.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub d_model: usize,
    pub d_ff: usize,
    pub num_experts: usize,
    pub top_k: usize,
    pub activation: Activation,
    pub routing: Routing,
    pub score: Score,
    pub normalize_topk: bool,
    pub routed_scale: f32,
    pub num_groups: usize,
    pub topk_groups: usize,
    /// > 0: C = ceil(cf * T * k / E) slots per expert; <= 0: dropless.
    pub capacity_factor: f32,
    pub drop_policy: DropPolicy,
    pub noise: Noise,
    pub noise_eps: f32,
    pub aux_loss_coef: f32,
    pub z_loss_coef: f32,
    pub importance_loss_coef: f32,
    pub load_loss_coef: f32,
    pub bias_update_rate: f32,
    pub num_shared_experts: usize,
    /// 0: d_ff.
    pub d_ff_shared: usize,
    pub shared_gate: bool,
    pub device: Device,
    pub device_index: i32,
    pub dtype: DType,
    pub allow_tf32: bool,
    pub seed: u64,
    pub check_finite: bool,
}

macro_rules! setters {
    ($($(#[$m:meta])* $field:ident : $ty:ty),+ $(,)?) => {
        $(
            $(#[$m])*
            #[must_use]
            pub fn $field(mut self, value: $ty) -> Config {
                self.$field = value;
                self
            }
        )+
    };
}

/// The names accepted by [`Config::preset`].
pub const PRESETS: &[&str] =
    &["mixtral", "switch", "shazeer", "expert-choice", "deepseek-v3", "qwen2-moe", "qwen3-moe", "olmoe"];

fn raw_init() -> sys::moe_config {
    let mut raw = std::mem::MaybeUninit::<sys::moe_config>::zeroed();
    // moe_config_init writes every field (and struct_size); zeroed memory is a valid moe_config.
    unsafe {
        sys::moe_config_init(raw.as_mut_ptr());
        raw.assume_init()
    }
}

fn dim(what: &str, v: i64) -> Result<usize> {
    usize::try_from(v).map_err(|_| Error::new(crate::Status::Internal, format!("{} is negative: {}", what, v)))
}

fn to_i64(what: &str, v: usize) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::invalid(format!("{} = {} does not fit in int64", what, v)))
}

impl Default for Config {
    /// The library defaults, with d_model = d_ff = 0 (they must be set).
    fn default() -> Config {
        Config::from_raw(&raw_init()).expect("moe_config_init gives a valid config")
    }
}

impl Config {
    /// The library defaults (`moe_config_init`) with the two widths set.
    pub fn new(d_model: usize, d_ff: usize) -> Config {
        Config { d_model, d_ff, ..Config::default() }
    }

    /// The routing recipe of a published model (see [`PRESETS`] and moe.h), widths set.
    /// `num_experts` and `top_k` may be changed afterwards.
    pub fn preset(name: &str, d_model: usize, d_ff: usize) -> Result<Config> {
        let cname = CString::new(name).map_err(|_| Error::invalid(format!("preset name {:?} contains a NUL byte", name)))?;
        let mut raw = raw_init();
        check(unsafe { sys::moe_config_preset(&mut raw, cname.as_ptr()) })?;
        let mut cfg = Config::from_raw(&raw)?;
        cfg.d_model = d_model;
        cfg.d_ff = d_ff;
        Ok(cfg)
    }

    /// Create the layer (same as [`Layer::new`]).
    pub fn build(&self) -> Result<Layer> {
        Layer::new(self)
    }

    setters! {
        /// Model (token) width.
        d_model: usize,
        /// Hidden width of each routed expert.
        d_ff: usize,
        /// E, the number of routed experts.
        num_experts: usize,
        /// k, the experts per token.
        top_k: usize,
        activation: Activation,
        routing: Routing,
        score: Score,
        normalize_topk: bool,
        routed_scale: f32,
        num_groups: usize,
        topk_groups: usize,
        capacity_factor: f32,
        drop_policy: DropPolicy,
        noise: Noise,
        noise_eps: f32,
        aux_loss_coef: f32,
        z_loss_coef: f32,
        importance_loss_coef: f32,
        load_loss_coef: f32,
        bias_update_rate: f32,
        num_shared_experts: usize,
        d_ff_shared: usize,
        shared_gate: bool,
        device: Device,
        device_index: i32,
        dtype: DType,
        allow_tf32: bool,
        seed: u64,
        check_finite: bool,
    }

    pub(crate) fn from_raw(r: &sys::moe_config) -> Result<Config> {
        Ok(Config {
            d_model: dim("d_model", r.d_model)?,
            d_ff: dim("d_ff", r.d_ff)?,
            num_experts: dim("num_experts", r.num_experts)?,
            top_k: dim("top_k", r.top_k)?,
            activation: Activation::from_raw(r.activation as u32)?,
            routing: Routing::from_raw(r.routing as u32)?,
            score: Score::from_raw(r.score as u32)?,
            normalize_topk: r.normalize_topk != 0,
            routed_scale: r.routed_scale,
            num_groups: dim("num_groups", r.num_groups)?,
            topk_groups: dim("topk_groups", r.topk_groups)?,
            capacity_factor: r.capacity_factor,
            drop_policy: DropPolicy::from_raw(r.drop_policy as u32)?,
            noise: Noise::from_raw(r.noise as u32)?,
            noise_eps: r.noise_eps,
            aux_loss_coef: r.aux_loss_coef,
            z_loss_coef: r.z_loss_coef,
            importance_loss_coef: r.importance_loss_coef,
            load_loss_coef: r.load_loss_coef,
            bias_update_rate: r.bias_update_rate,
            num_shared_experts: dim("num_shared_experts", r.num_shared_experts)?,
            d_ff_shared: dim("d_ff_shared", r.d_ff_shared)?,
            shared_gate: r.shared_gate != 0,
            device: Device::from_raw(r.device as u32)?,
            device_index: r.device_index,
            dtype: DType::from_raw(r.dtype as u32)?,
            allow_tf32: r.allow_tf32 != 0,
            seed: r.seed,
            check_finite: r.check_finite != 0,
        })
    }

    /// The C struct: moe_config_init, then every field (comm NULL).
    pub fn to_raw(&self) -> Result<sys::moe_config> {
        let mut r = raw_init();
        r.d_model = to_i64("d_model", self.d_model)?;
        r.d_ff = to_i64("d_ff", self.d_ff)?;
        r.num_experts = to_i64("num_experts", self.num_experts)?;
        r.top_k = to_i64("top_k", self.top_k)?;
        r.activation = self.activation.to_raw() as _;
        r.routing = self.routing.to_raw() as _;
        r.score = self.score.to_raw() as _;
        r.normalize_topk = self.normalize_topk as i32;
        r.routed_scale = self.routed_scale;
        r.num_groups = to_i64("num_groups", self.num_groups)?;
        r.topk_groups = to_i64("topk_groups", self.topk_groups)?;
        r.capacity_factor = self.capacity_factor;
        r.drop_policy = self.drop_policy.to_raw() as _;
        r.noise = self.noise.to_raw() as _;
        r.noise_eps = self.noise_eps;
        r.aux_loss_coef = self.aux_loss_coef;
        r.z_loss_coef = self.z_loss_coef;
        r.importance_loss_coef = self.importance_loss_coef;
        r.load_loss_coef = self.load_loss_coef;
        r.bias_update_rate = self.bias_update_rate;
        r.num_shared_experts = to_i64("num_shared_experts", self.num_shared_experts)?;
        r.d_ff_shared = to_i64("d_ff_shared", self.d_ff_shared)?;
        r.shared_gate = self.shared_gate as i32;
        r.device = self.device.to_raw() as _;
        r.device_index = self.device_index;
        r.dtype = self.dtype.to_raw() as _;
        r.allow_tf32 = self.allow_tf32 as i32;
        r.seed = self.seed;
        r.check_finite = self.check_finite as i32;
        Ok(r)
    }
}
