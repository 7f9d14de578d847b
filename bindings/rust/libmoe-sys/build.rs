//! Finds libmoe and generates the FFI from its moe.h with bindgen.
//!
//! Order (as openssl-sys / zstd-sys do): environment overrides, then pkg-config, then (for the
//! header only) the source tree this crate lives in. See the crate documentation.
use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// What was found: the directory holding `moe/moe.h`, and where to link from (None: the default
/// linker search path, e.g. /usr/lib/x86_64-linux-gnu).
struct Found {
    include_dir: Option<PathBuf>,
    lib_dir: Option<PathBuf>,
    how: String,
}

fn env_path(name: &str) -> Option<PathBuf> {
    println!("cargo:rerun-if-env-changed={}", name);
    env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from)
}

/// `pkg-config --variable=NAME libmoe`, None when pkg-config or libmoe.pc is missing.
fn pkg_config_variable(pkg_config: &str, variable: &str) -> Option<PathBuf> {
    let out = Command::new(pkg_config)
        .args(["--variable", variable, "libmoe"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?;
    let s = s.trim();
    if s.is_empty() {
        None
    } else {
        Some(PathBuf::from(s))
    }
}

fn pkg_config() -> Option<Found> {
    if env::var_os("LIBMOE_NO_PKG_CONFIG").is_some() {
        return None;
    }
    let pc = env::var("PKG_CONFIG").unwrap_or_else(|_| "pkg-config".to_string());
    // --exists first, so that a missing libmoe.pc gives one clear message below.
    let exists = Command::new(&pc)
        .args(["--exists", "libmoe >= 0.1"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !exists {
        return None;
    }
    Some(Found {
        include_dir: pkg_config_variable(&pc, "includedir"),
        lib_dir: pkg_config_variable(&pc, "libdir"),
        how: format!("{} libmoe", pc),
    })
}

fn has_header(dir: &Path) -> bool {
    dir.join("moe").join("moe.h").is_file()
}

fn main() {
    for v in ["PKG_CONFIG", "PKG_CONFIG_PATH", "PKG_CONFIG_LIBDIR", "PKG_CONFIG_SYSROOT_DIR"] {
        println!("cargo:rerun-if-env-changed={}", v);
    }
    let env_lib = env_path("LIBMOE_LIB_DIR");
    let env_inc = env_path("LIBMOE_INCLUDE_DIR");
    let _ = env_path("LIBMOE_NO_PKG_CONFIG");

    let mut found = if env_lib.is_some() && env_inc.is_some() {
        Found { include_dir: env_inc.clone(), lib_dir: env_lib.clone(), how: "LIBMOE_LIB_DIR/LIBMOE_INCLUDE_DIR".into() }
    } else if let Some(pc) = pkg_config() {
        Found {
            include_dir: env_inc.clone().or(pc.include_dir),
            lib_dir: env_lib.clone().or(pc.lib_dir),
            how: pc.how,
        }
    } else {
        Found { include_dir: env_inc.clone(), lib_dir: env_lib.clone(), how: "environment".into() }
    };

    // The header of the source tree this crate sits in (bindings/rust/libmoe-sys -> include/).
    if found.include_dir.as_deref().map_or(true, |d| !has_header(d)) {
        let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
        let tree = manifest.join("../../../include");
        if found.include_dir.is_none() && has_header(&tree) {
            found.include_dir = Some(tree.canonicalize().unwrap_or(tree));
        }
    }
    let include_dir = match found.include_dir {
        Some(d) if has_header(&d) => d,
        Some(d) => panic!(
            "libmoe-sys: {} gives include directory {} but it has no moe/moe.h",
            found.how,
            d.display()
        ),
        None => panic!(
            "libmoe-sys: cannot find libmoe's header moe/moe.h. Install libmoe-dev (pkg-config libmoe), or set \
             LIBMOE_INCLUDE_DIR to the directory holding moe/moe.h and LIBMOE_LIB_DIR to the one holding libmoe.so"
        ),
    };
    if let Some(lib) = &found.lib_dir {
        if !lib.is_dir() {
            panic!("libmoe-sys: {} gives library directory {} which does not exist", found.how, lib.display());
        }
        println!("cargo:rustc-link-search=native={}", lib.display());
        println!("cargo:lib_dir={}", lib.display());
    }
    println!("cargo:rustc-link-lib=dylib=moe");
    println!("cargo:include={}", include_dir.display());

    let header = include_dir.join("moe").join("moe.h");
    println!("cargo:rerun-if-changed={}", header.display());
    let bindings = bindgen::Builder::default()
        .header(header.to_string_lossy())
        .clang_arg(format!("-I{}", include_dir.display()))
        .allowlist_function("moe_.*")
        .allowlist_type("moe_.*")
        .allowlist_var("MOE_.*")
        // Enum constants keep their C names (MOE_OK, MOE_DEVICE_CPU); enum types are integers,
        // so a value the header does not know (a newer library) is never undefined behaviour.
        .prepend_enum_name(false)
        .size_t_is_usize(true)
        .generate_comments(true)
        .layout_tests(true)
        .rustfmt_bindings(false)
        .generate()
        .unwrap_or_else(|e| panic!("libmoe-sys: bindgen failed on {}: {:?}", header.display(), e));
    let out = PathBuf::from(env::var_os("OUT_DIR").unwrap()).join("bindings.rs");
    bindings
        .write_to_file(&out)
        .unwrap_or_else(|e| panic!("libmoe-sys: cannot write {}: {}", out.display(), e));
}
