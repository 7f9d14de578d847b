//! Raw FFI bindings to libmoe, generated at build time by bindgen from `include/moe/moe.h`.
//!
//! Everything here is `unsafe` C: the functions, structs, enum constants (`MOE_OK`,
//! `MOE_DEVICE_CPU`, ...) and version macros of moe.h, one for one. The contract of each function
//! is documented in moe.h. Use the `libmoe` crate for a safe interface.
//!
//! The build script finds libmoe in this order:
//!  1. `LIBMOE_LIB_DIR` (directory of libmoe.so) and `LIBMOE_INCLUDE_DIR` (directory holding
//!     `moe/moe.h`); either may be given alone, the other is then looked up below;
//!  2. `pkg-config libmoe` (`PKG_CONFIG` names another pkg-config binary, `PKG_CONFIG_PATH` as usual);
//!     skipped when `LIBMOE_NO_PKG_CONFIG` is set;
//!  3. the header only: `include/` of the source tree this crate sits in.
//!
//! Through `links = "moe"` dependents' build scripts see `DEP_MOE_INCLUDE` and `DEP_MOE_LIB_DIR`.
#![allow(non_upper_case_globals, non_camel_case_types, non_snake_case)]
#![allow(clippy::all)]

include!(concat!(env!("OUT_DIR"), "/bindings.rs"));

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;

    #[test]
    fn header_and_library_versions_agree() {
        let v = unsafe { moe_version() };
        assert_eq!(v, MOE_VERSION_NUMBER, "header and loaded library differ");
    }

    #[test]
    fn status_names() {
        let name = unsafe { CStr::from_ptr(moe_status_name(MOE_ERR_STATE)) };
        assert_eq!(name.to_str().unwrap(), "MOE_ERR_STATE");
    }

    #[test]
    fn config_init_sets_struct_size_and_defaults() {
        let mut cfg = std::mem::MaybeUninit::<moe_config>::zeroed();
        let cfg = unsafe {
            moe_config_init(cfg.as_mut_ptr());
            cfg.assume_init()
        };
        assert_eq!(cfg.struct_size, std::mem::size_of::<moe_config>());
        assert_eq!(cfg.num_experts, 8);
        assert_eq!(cfg.top_k, 2);
        assert!(cfg.comm.is_null());
    }

    #[test]
    fn raw_layer_round_trip() {
        unsafe {
            let mut cfg = std::mem::zeroed::<moe_config>();
            moe_config_init(&mut cfg);
            cfg.d_model = 8;
            cfg.d_ff = 16;
            let mut layer: *mut moe_layer = std::ptr::null_mut();
            assert_eq!(moe_layer_create(&cfg, &mut layer), MOE_OK);
            assert!(!layer.is_null());
            let x = vec![0.5f32; 3 * 8];
            let mut y = vec![0f32; 3 * 8];
            assert_eq!(moe_forward(layer, x.as_ptr().cast(), 3, y.as_mut_ptr().cast(), std::ptr::null_mut()), MOE_OK);
            assert!(y.iter().all(|v| v.is_finite()));
            assert_eq!(moe_forward(layer, x.as_ptr().cast(), -1, y.as_mut_ptr().cast(), std::ptr::null_mut()),
                       MOE_ERR_INVALID_ARGUMENT);
            assert!(!CStr::from_ptr(moe_last_error()).to_bytes().is_empty());
            moe_layer_destroy(layer);
            moe_layer_destroy(std::ptr::null_mut());
        }
    }
}
