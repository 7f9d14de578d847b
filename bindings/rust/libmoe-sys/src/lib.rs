//! Raw FFI bindings to libmoe, generated at build time by bindgen from `include/moe/moe.h`.
//!
//! Everything here is `unsafe` C: the functions, structs, enum constants (`MOE_OK`,
//! `MOE_DEVICE_CPU`, ...) and version macros of moe.h, one for one. The contract of each function
//! is documented in moe.h. Use the `libmoe` crate for a safe interface.
//!
//! The build script finds libmoe in this order:
//!  1. `LIBMOE_LIB_DIR` (directory of libmoe.so) and `LIBMOE_INCLUDE_DIR` (directory holding
//!     `moe/moe.h`); either may be given alone, the other is then looked up below;
//!  2. `pkg-config libmoe` (>= 0.2; `PKG_CONFIG` names another pkg-config binary,
//!     `PKG_CONFIG_PATH` as usual); skipped when `LIBMOE_NO_PKG_CONFIG` is set;
//!  3. `include/` of the source tree this crate sits in for the header, and libmoe.so in the
//!     linker's default directories.
//!
//! When that gives no libmoe.so or no moe/moe.h, the build stops with what it tried and how to fix
//! it (install libmoe-dev, or set the two variables), not with a linker error later.
//!
//! Through `links = "moe"` dependents' build scripts see `DEP_MOE_INCLUDE` and `DEP_MOE_LIB_DIR`.
#![allow(non_upper_case_globals, non_camel_case_types, non_snake_case)]
#![allow(clippy::all)]

include!(concat!(env!("OUT_DIR"), "/bindings.rs"));

/// libmoe_mpi (`moe/moe_mpi.h`), with the feature `mpi`: a `moe_comm` over an MPI communicator,
/// and MPI's start and end for programs without an MPI binding. Links `libmoe_mpi`, found in
/// `LIBMOE_MPI_LIB_DIR` or beside libmoe; MPI's header through `MPI_INCLUDE_DIRS`,
/// `pkg-config mpi-c` or `mpicc -showme:incdirs`.
#[cfg(feature = "mpi")]
pub mod mpi {
    use super::*;
    include!(concat!(env!("OUT_DIR"), "/mpi_bindings.rs"));
}

// build.rs's decision of where libmoe is, tested below without running cargo.
#[cfg(test)]
#[path = "../build/find.rs"]
#[allow(dead_code)]
mod find;

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
            moe_config_init_size(cfg.as_mut_ptr(), std::mem::size_of::<moe_config>());
            cfg.assume_init()
        };
        assert_eq!(cfg.struct_size, std::mem::size_of::<moe_config>());
        assert_eq!(cfg.num_experts, 8);
        assert_eq!(cfg.top_k, 2);
        assert!(cfg.comm.is_null());
        // The plain function is the entry point of programs built against the 0.1 header: it fills
        // only the fields that struct has, and leaves the rest alone.
        let mut old = std::mem::MaybeUninit::<moe_config>::zeroed();
        let old = unsafe {
            (*old.as_mut_ptr()).min_capacity = 77;
            moe_config_init(old.as_mut_ptr());
            old.assume_init()
        };
        // (offset_of! is newer than Debian 12's rustc 1.63: the field's address less the struct's.)
        let min_capacity_offset = std::ptr::addr_of!(old.min_capacity) as usize - std::ptr::addr_of!(old) as usize;
        assert_eq!(old.struct_size, min_capacity_offset);
        assert_eq!(old.num_experts, 8);
        assert_eq!(old.min_capacity, 77);
    }

    /// A scratch tree: `lib/` with or without libmoe.so, `include/` with or without moe/moe.h.
    struct Tree(std::path::PathBuf);
    impl Tree {
        fn new(tag: &str, lib: bool, header: bool) -> Tree {
            let root = std::env::temp_dir().join(format!("libmoe-sys-find-{}-{}", tag, std::process::id()));
            let _ = std::fs::remove_dir_all(&root);
            std::fs::create_dir_all(root.join("lib")).unwrap();
            std::fs::create_dir_all(root.join("include/moe")).unwrap();
            if lib {
                std::fs::write(root.join("lib/libmoe.so"), b"").unwrap();
            }
            if header {
                std::fs::write(root.join("include/moe/moe.h"), b"").unwrap();
            }
            Tree(root)
        }
        fn lib(&self) -> std::path::PathBuf {
            self.0.join("lib")
        }
        fn inc(&self) -> std::path::PathBuf {
            self.0.join("include")
        }
    }
    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn inputs(pkg_config: find::PkgConfig) -> find::Inputs {
        find::Inputs { env_lib: None, env_inc: None, pkg_config, tree_include: None, system_lib_dirs: vec![] }
    }

    fn not_found() -> find::PkgConfig {
        find::PkgConfig::NotFound {
            command: "pkg-config --exists --print-errors 'libmoe >= 0.2'".into(),
            why: "Package libmoe was not found in the pkg-config search path.".into(),
        }
    }

    #[test]
    fn find_nothing_says_what_was_tried_and_how_to_fix_it() {
        let empty = Tree::new("empty", false, true);
        let mut i = inputs(not_found());
        i.tree_include = Some(empty.inc());
        i.system_lib_dirs = vec![empty.lib()];
        let m = find::locate(&i).unwrap_err();
        assert!(m.starts_with("libmoe-sys: cannot find the library libmoe.so"), "{}", m);
        for part in ["LIBMOE_LIB_DIR and LIBMOE_INCLUDE_DIR: not set", "Package libmoe was not found",
                     "the linker's default directories", "apt-get install libmoe-dev", "PKG_CONFIG_PATH",
                     "set LIBMOE_LIB_DIR"] {
            assert!(m.contains(part), "message lacks {:?}:\n{}", part, m);
        }
        i.pkg_config = find::PkgConfig::Skipped;
        let m = find::locate(&i).unwrap_err();
        assert!(m.contains("LIBMOE_NO_PKG_CONFIG"), "{}", m);
        // no header anywhere
        i.tree_include = None;
        assert!(find::locate(&i).unwrap_err().starts_with("libmoe-sys: cannot find libmoe's header moe/moe.h"));
    }

    #[test]
    fn find_names_a_directory_that_lacks_its_file() {
        let t = Tree::new("lacks", false, false);
        let mut i = inputs(not_found());
        i.env_lib = Some(t.lib());
        i.env_inc = Some(t.inc());
        let m = find::locate(&i).unwrap_err();
        assert!(m.starts_with(&format!("libmoe-sys: LIBMOE_LIB_DIR={} has no libmoe.so", t.lib().display())), "{}", m);
        let good = Tree::new("good", true, false);
        i.env_lib = Some(good.lib());
        let m = find::locate(&i).unwrap_err();
        assert!(m.starts_with(&format!("libmoe-sys: LIBMOE_INCLUDE_DIR={} has no moe/moe.h", t.inc().display())), "{}", m);
        // pkg-config pointing at a directory without the library (a half-installed package)
        let mut i = inputs(find::PkgConfig::Found { command: "pkg-config".into(), include_dir: Some(good.inc()), lib_dir: Some(t.lib()) });
        i.tree_include = Some(good.inc());
        let m = find::locate(&i).unwrap_err();
        assert!(m.contains(&format!("pkg-config names libdir {} but it has no libmoe.so", t.lib().display())), "{}", m);
    }

    #[test]
    fn find_in_order_environment_pkg_config_default_directories() {
        let env = Tree::new("env", true, true);
        let pc = Tree::new("pc", true, true);
        let sys_dir = Tree::new("sys", true, false);
        let pc_found = || find::PkgConfig::Found { command: "pkg-config".into(), include_dir: Some(pc.inc()), lib_dir: Some(pc.lib()) };
        let mut i = inputs(pc_found());
        i.env_lib = Some(env.lib());
        i.env_inc = Some(env.inc());
        let f = find::locate(&i).unwrap();
        assert_eq!((f.include_dir, f.lib_dir), (env.inc(), Some(env.lib())));
        // the environment gives the library only: the header comes from pkg-config
        i.env_inc = None;
        let f = find::locate(&i).unwrap();
        assert_eq!((f.include_dir, f.lib_dir), (pc.inc(), Some(env.lib())));
        let f = find::locate(&inputs(pc_found())).unwrap();
        assert_eq!((f.include_dir, f.lib_dir), (pc.inc(), Some(pc.lib())));
        // no pkg-config: the tree's header and a library in a default directory
        let mut i = inputs(not_found());
        i.tree_include = Some(env.inc());
        i.system_lib_dirs = vec![pc.inc(), sys_dir.lib()];
        let f = find::locate(&i).unwrap();
        assert_eq!((f.include_dir, f.lib_dir), (env.inc(), None));
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
