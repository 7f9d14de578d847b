//! The layer configuration (`moe_config`): a plain struct with public fields, chainable setters
//! of the same names, the published presets, and every field by its name and text through
//! libmoe's own table of the struct (`moe_config_field`, `moe_config_set`, `moe_config_get`).
use crate::error::{check, Error, Result};
use crate::layer::Layer;
use libmoe_sys as sys;
use std::ffi::{CStr, CString};
use std::os::raw::c_char;

macro_rules! c_enum {
    ($(#[$m:meta])* $name:ident : $what:literal { $($(#[$vm:meta])* $v:ident = $c:ident),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum $name { $($(#[$vm])* $v),+ }
        impl FromC<u32> for $name {
            fn from_c(v: u32, _: &str) -> Result<$name> { $name::from_raw(v) }
        }
        impl FromC<i32> for $name {
            fn from_c(v: i32, _: &str) -> Result<$name> { $name::from_raw(v as u32) }
        }
        impl ToC<u32> for $name {
            fn to_c(self, _: &str) -> Result<u32> { Ok(self.to_raw()) }
        }
        impl ToC<i32> for $name {
            fn to_c(self, _: &str) -> Result<i32> { Ok(self.to_raw() as i32) }
        }
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
        /// gpt-oss: ((clamp(x W3ᵀ, -l, l) + 1) · hc · σ(α hc)) W2ᵀ, hc = min(x W1ᵀ, l)
        SwiGluClamped = MOE_ACT_SWIGLU_CLAMPED,
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

/// How a field is stored (`moe_config_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FieldType {
    Int64,
    Int,
    /// An int used as a flag.
    Bool,
    Float,
    Uint64,
    /// One of the moe_* enums; [`FieldInfo::values`] names its values.
    Enum,
    /// A pointer (the expert-parallel comm): not settable by name.
    Pointer,
    /// A type this crate does not know (from a newer libmoe): set it by its text.
    Other(u32),
}

/// One field of `moe_config` as the loaded libmoe describes it (`moe_config_field`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldInfo {
    /// Its name in moe.h, e.g. `"top_k"`.
    pub name: String,
    pub field_type: FieldType,
    /// The canonical text of its default (`moe_config_init`).
    pub default: String,
    /// For [`FieldType::Enum`], the names of its values in the order of their C values.
    pub values: Vec<String>,
    /// One line: meaning, units, range.
    pub description: String,
}

fn owned(p: *const c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

/// Every field of `moe_config` the loaded libmoe describes, in the struct's order.
pub fn config_fields() -> Result<Vec<FieldInfo>> {
    let n = unsafe { sys::moe_config_num_fields() };
    let mut out = Vec::with_capacity(n.max(0) as usize);
    for i in 0..n {
        let mut info = unsafe { std::mem::zeroed::<sys::moe_config_field_info>() };
        info.struct_size = std::mem::size_of::<sys::moe_config_field_info>();
        check(unsafe { sys::moe_config_field(i, &mut info) })?;
        let t = info.type_ as u32;
        let field_type = [
            (sys::MOE_CONFIG_INT64 as u32, FieldType::Int64),
            (sys::MOE_CONFIG_INT as u32, FieldType::Int),
            (sys::MOE_CONFIG_BOOL as u32, FieldType::Bool),
            (sys::MOE_CONFIG_FLOAT as u32, FieldType::Float),
            (sys::MOE_CONFIG_UINT64 as u32, FieldType::Uint64),
            (sys::MOE_CONFIG_ENUM as u32, FieldType::Enum),
            (sys::MOE_CONFIG_POINTER as u32, FieldType::Pointer),
        ]
        .iter()
        .find(|(c, _)| *c == t)
        .map_or(FieldType::Other(t), |(_, f)| *f);
        let values = (0..info.num_values.max(0) as usize).map(|v| owned(unsafe { *info.value_names.add(v) })).collect();
        out.push(FieldInfo {
            name: owned(info.name),
            field_type,
            default: owned(info.default_value),
            values,
            description: owned(info.description),
        });
    }
    Ok(out)
}

/// Every preset the loaded libmoe knows: (name, one-line description), in its order.
pub fn presets() -> Vec<(String, String)> {
    let n = unsafe { sys::moe_config_num_presets() };
    (0..n)
        .map(|i| unsafe { (owned(sys::moe_config_preset_name(i)), owned(sys::moe_config_preset_description(i))) })
        .collect()
}

fn c_string(what: &str, s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::invalid(format!("{} {:?} contains a NUL byte", what, s)))
}

fn set_text(raw: &mut sys::moe_config, name: &str, value: &str) -> Result<()> {
    let (n, v) = (c_string("name", name)?, c_string("value", value)?);
    check(unsafe { sys::moe_config_set(raw, n.as_ptr(), v.as_ptr()) })
}

fn get_text(raw: &sys::moe_config, name: &str) -> Result<String> {
    let n = c_string("name", name)?;
    let mut buf = [0 as c_char; sys::MOE_CONFIG_VALUE_MAX as usize];
    check(unsafe { sys::moe_config_get(raw, n.as_ptr(), buf.as_mut_ptr(), buf.len()) })?;
    Ok(owned(buf.as_ptr()))
}

// A typed field's value to and from its C storage (the C type is inferred from the struct).
trait FromC<C>: Sized {
    fn from_c(v: C, what: &str) -> Result<Self>;
}
trait ToC<C> {
    fn to_c(self, what: &str) -> Result<C>;
}
impl FromC<i64> for usize {
    fn from_c(v: i64, what: &str) -> Result<usize> {
        usize::try_from(v).map_err(|_| Error::new(crate::Status::Internal, format!("{} is negative: {}", what, v)))
    }
}
impl ToC<i64> for usize {
    fn to_c(self, what: &str) -> Result<i64> {
        i64::try_from(self).map_err(|_| Error::invalid(format!("{} = {} does not fit in int64", what, self)))
    }
}
macro_rules! same_in_c {
    ($($t:ty),+) => {$(
        impl FromC<$t> for $t { fn from_c(v: $t, _: &str) -> Result<$t> { Ok(v) } }
        impl ToC<$t> for $t { fn to_c(self, _: &str) -> Result<$t> { Ok(self) } }
    )+};
}
same_in_c!(f32, i32, u64);
impl FromC<i32> for bool {
    fn from_c(v: i32, _: &str) -> Result<bool> {
        Ok(v != 0)
    }
}
impl ToC<i32> for bool {
    fn to_c(self, _: &str) -> Result<i32> {
        Ok(self as i32)
    }
}

/// The fields of a newer libmoe that [`Config`] has no typed field for, by name and canonical
/// text; read and written with [`Config::get`] and [`Config::set`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct OtherFields(Vec<(String, String)>);

// The typed fields, each once: the struct's public fields, their chainable setters, and the
// conversions to and from moe_config come from this list.
macro_rules! config_struct {
    ($($(#[$m:meta])* $field:ident : $ty:ty),+ $(,)?) => {
        /// Everything that defines a layer (`moe_config` without its `struct_size` and `comm`).
        ///
        /// Start from [`Config::new`] (library defaults) or [`Config::preset`], then change fields,
        /// either directly, with the chainable setters of the same names, or by name and text
        /// with [`Config::set`] (every field of the loaded libmoe, see [`config_fields`]):
        ///
        /// ```no_run
        /// use libmoe::{Activation, Config};
        /// let layer = Config::new(512, 1024).num_experts(16).top_k(2).activation(Activation::GeGlu).seed(7).build()?;
        /// let mut cfg = Config::new(512, 1024);
        /// cfg.set("dtype", "bf16")?;
        /// cfg.set("capacity_factor", 1.25)?;
        /// assert_eq!(cfg.get("dtype")?, "bfloat16");
        /// # Ok::<(), libmoe::Error>(())
        /// ```
        /// The meaning and default of each field is documented in moe.h.
        #[derive(Debug, Clone, PartialEq)]
        pub struct Config {
            $($(#[$m])* pub $field: $ty,)+
            /// Fields of the loaded libmoe without a typed field above (see [`Config::set`]).
            #[doc(hidden)]
            pub other_fields: OtherFields,
        }

        const TYPED_FIELDS: &[&str] = &[$(stringify!($field)),+];

        impl Config {
            $(
                $(#[$m])*
                #[must_use]
                pub fn $field(mut self, value: $ty) -> Config {
                    self.$field = value;
                    self
                }
            )+

            pub(crate) fn from_raw(r: &sys::moe_config) -> Result<Config> {
                let mut other = Vec::new();
                for f in config_fields()? {
                    if f.field_type != FieldType::Pointer && !TYPED_FIELDS.contains(&f.name.as_str()) {
                        let text = get_text(r, &f.name)?;
                        other.push((f.name, text));
                    }
                }
                Ok(Config { $($field: FromC::from_c(r.$field, stringify!($field))?,)+ other_fields: OtherFields(other) })
            }

            /// The C struct: moe_config_init, then every field (comm NULL).
            pub fn to_raw(&self) -> Result<sys::moe_config> {
                let mut r = raw_init();
                for (name, text) in &self.other_fields.0 {
                    set_text(&mut r, name, text)?;
                }
                $(r.$field = ToC::to_c(self.$field, stringify!($field))?;)+
                Ok(r)
            }
        }
    };
}

config_struct! {
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
    /// > 0: C = ceil(cf * T * k / E) slots per expert; <= 0: dropless.
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
    /// 0: d_ff.
    d_ff_shared: usize,
    shared_gate: bool,
    device: Device,
    device_index: i32,
    dtype: DType,
    allow_tf32: bool,
    seed: u64,
    check_finite: bool,
}

/// The names accepted by [`Config::preset`] when this crate was written; [`presets`] asks the
/// loaded libmoe, which may know more.
pub const PRESETS: &[&str] =
    &["mixtral", "switch", "shazeer", "expert-choice", "deepseek-v3", "qwen2-moe", "qwen3-moe", "olmoe", "gpt-oss"];

fn raw_init() -> sys::moe_config {
    let mut raw = std::mem::MaybeUninit::<sys::moe_config>::zeroed();
    // moe_config_init_size writes every field (and struct_size); zeroed memory is a valid
    // moe_config. The sized call, because bindgen does not see moe.h's moe_config_init macro and
    // the plain function fills only the fields of the 0.1 struct.
    unsafe {
        sys::moe_config_init_size(raw.as_mut_ptr(), std::mem::size_of::<sys::moe_config>());
        raw.assume_init()
    }
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

    /// The routing recipe of a published model (see [`presets`] and moe.h), widths set.
    /// `num_experts` and `top_k` may be changed afterwards.
    pub fn preset(name: &str, d_model: usize, d_ff: usize) -> Result<Config> {
        let cname = CString::new(name).map_err(|_| Error::invalid(format!("preset name {:?} contains a NUL byte", name)))?;
        let mut raw = raw_init();
        check(unsafe { sys::moe_config_preset_size(&mut raw, std::mem::size_of::<sys::moe_config>(), cname.as_ptr()) })?;
        let mut cfg = Config::from_raw(&raw)?;
        cfg.d_model = d_model;
        cfg.d_ff = d_ff;
        Ok(cfg)
    }

    /// Set field `name` (its moe.h name) from `value`'s text, as `moe_config_set` reads it:
    /// `"bf16"`, `"expert-choice"`, `0.01`, `true`, `8`. The value's form and range are checked at
    /// once (an [`Error`] with status InvalidArgument naming the field and what it accepts; the
    /// config is then unchanged); how fields fit together is checked by [`Config::build`].
    pub fn set(&mut self, name: &str, value: impl std::fmt::Display) -> Result<()> {
        let mut r = self.to_raw()?;
        set_text(&mut r, name, &value.to_string())?;
        *self = Config::from_raw(&r)?;
        Ok(())
    }

    /// The canonical text of field `name` (`"swiglu"`, `"0.01"`, `"true"`), as `moe_config_get` writes it.
    pub fn get(&self, name: &str) -> Result<String> {
        get_text(&self.to_raw()?, name)
    }

    /// Create the layer (same as [`Layer::new`]).
    pub fn build(&self) -> Result<Layer> {
        Layer::new(self)
    }
}
