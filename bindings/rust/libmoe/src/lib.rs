//! Safe Rust interface to libmoe, a Mixture-of-Experts layer with a C ABI.
//!
//! ```no_run
//! use libmoe::Config;
//! let layer = Config::new(64, 128).num_experts(8).top_k(2).seed(42).build()?;
//! let x = vec![0.1f32; 16 * 64];
//! let mut y = vec![0f32; x.len()];
//! let mut ctx = layer.context()?;
//! ctx.forward(&x, &mut y)?;                    // training forward
//! let dy: Vec<f32> = y.iter().map(|v| v / 16.0).collect();
//! let mut dx = vec![0f32; x.len()];
//! ctx.backward(&dy, Some(&mut dx))?;           // gradients accumulate in the layer
//! println!("aux loss {}", ctx.stats()?.aux_loss_total);
//! let g = layer.grad("experts.w1")?;
//! # Ok::<(), libmoe::Error>(())
//! ```
//!
//! Every fallible call returns [`Result`]; an [`Error`] carries the [`Status`] and the library's
//! message (read from `moe_last_error` on the calling thread right after the failure). Slice
//! lengths are checked before libmoe is called. [`Layer`] and [`Context`] free their C objects
//! when dropped. `Layer` is `Send` but not `Sync` (see its documentation).
//!
//! ```compile_fail
//! fn must_be_sync<T: Sync>() {}
//! must_be_sync::<libmoe::Layer>(); // a Layer cannot be shared between threads
//! ```
//! ```compile_fail
//! fn must_be_send<T: Send>() {}
//! must_be_send::<libmoe::Context<'static>>(); // a Context stays on its layer's thread
//! ```
//! ```compile_fail
//! let layer = libmoe::Config::new(8, 16).build().unwrap();
//! let ctx = layer.context().unwrap();
//! drop(layer); // a Context cannot outlive its layer
//! drop(ctx);
//! ```
#![warn(missing_debug_implementations)]
// C enums are c_uint with GCC/Clang but c_int with MSVC: the `as u32` casts are kept on purpose.
#![allow(clippy::unnecessary_cast)]

mod config;
mod context;
mod error;
mod layer;
#[cfg(feature = "mpi")]
pub mod mpi;

pub use config::{
    config_fields, presets, Activation, Config, DType, Device, DropPolicy, FieldInfo, FieldType, Noise, Routing, Score, PRESETS,
};
pub use context::{Assignment, Context, Stats, TopK};
pub use error::{Error, Result, Status};
pub use layer::{ExpertComm, Layer, ParamInfo, ParamMut};
/// The raw FFI, for what the safe layer does not cover (e.g. expert-parallel communicators).
pub use libmoe_sys as sys;

/// `MOE_VERSION_NUMBER` of the header these bindings were generated from.
pub const HEADER_VERSION: u32 = sys::MOE_VERSION_NUMBER as u32;

/// MAJOR*10000 + MINOR*100 + PATCH of the libmoe actually loaded.
pub fn version() -> u32 {
    unsafe { sys::moe_version() }
}

/// (major, minor, patch) of the libmoe actually loaded.
pub fn version_triple() -> (u32, u32, u32) {
    let v = version();
    (v / 10000, v / 100 % 100, v % 100)
}
