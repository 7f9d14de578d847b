//! Where libmoe is: the decision of build.rs, kept free of I/O beyond `Path::is_file` so that the
//! crate's tests can check every outcome and its message (src/lib.rs includes this file).
use std::path::{Path, PathBuf};

/// What `pkg-config` said about libmoe.
#[derive(Debug, Clone)]
pub enum PkgConfig {
    /// Not asked (`LIBMOE_NO_PKG_CONFIG` set).
    Skipped,
    /// The command, and why it did not find libmoe (its stderr, or why it could not run).
    NotFound { command: String, why: String },
    /// Found: its `includedir` and `libdir` variables.
    Found { command: String, include_dir: Option<PathBuf>, lib_dir: Option<PathBuf> },
}

/// Everything the decision depends on.
#[derive(Debug, Clone)]
pub struct Inputs {
    pub env_lib: Option<PathBuf>,
    pub env_inc: Option<PathBuf>,
    pub pkg_config: PkgConfig,
    /// `include/` of the source tree the crate sits in, when it has moe/moe.h.
    pub tree_include: Option<PathBuf>,
    /// The linker's default directories, searched when nothing above names a library directory.
    pub system_lib_dirs: Vec<PathBuf>,
}

/// The outcome: the directory holding moe/moe.h, and the one to link from (None: the linker's
/// default path, where `libmoe.so` was seen).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub include_dir: PathBuf,
    pub lib_dir: Option<PathBuf>,
    pub how: String,
}

pub const LIB_FILE: &str = "libmoe.so";

fn has_header(dir: &Path) -> bool {
    dir.join("moe").join("moe.h").is_file()
}

fn has_library(dir: &Path) -> bool {
    dir.join(LIB_FILE).exists()
}

const FIX: &str = "To fix it, either
  - install the development package (Debian: apt-get install libmoe-dev), or, for a libmoe built
    from source, `cmake --install build --prefix PREFIX` and put PREFIX/lib/pkgconfig (or
    PREFIX/lib/<triplet>/pkgconfig) on PKG_CONFIG_PATH; or
  - set LIBMOE_LIB_DIR to the directory holding libmoe.so and LIBMOE_INCLUDE_DIR to the one holding
    moe/moe.h (e.g. a CMake build folder and the source tree's include/).";

fn fail(problem: String, tried: &[String]) -> String {
    let mut m = format!("libmoe-sys: {}\nWhat was tried:\n", problem);
    for t in tried {
        m.push_str("  - ");
        m.push_str(t);
        m.push('\n');
    }
    m.push_str(FIX);
    m
}

/// Decides, or explains what was tried and how to fix it.
pub fn locate(i: &Inputs) -> Result<Found, String> {
    let mut tried: Vec<String> = Vec::new();

    // 1. the environment
    match (&i.env_lib, &i.env_inc) {
        (None, None) => tried.push("LIBMOE_LIB_DIR and LIBMOE_INCLUDE_DIR: not set".into()),
        _ => tried.push(format!(
            "LIBMOE_LIB_DIR={} LIBMOE_INCLUDE_DIR={}",
            i.env_lib.as_deref().map_or("(not set)".into(), |p| p.display().to_string()),
            i.env_inc.as_deref().map_or("(not set)".into(), |p| p.display().to_string())
        )),
    }
    if let Some(lib) = &i.env_lib {
        if !has_library(lib) {
            return Err(fail(format!("LIBMOE_LIB_DIR={} has no {}", lib.display(), LIB_FILE), &tried));
        }
    }
    if let Some(inc) = &i.env_inc {
        if !has_header(inc) {
            return Err(fail(format!("LIBMOE_INCLUDE_DIR={} has no moe/moe.h", inc.display()), &tried));
        }
    }
    if let (Some(lib), Some(inc)) = (&i.env_lib, &i.env_inc) {
        return Ok(Found { include_dir: inc.clone(), lib_dir: Some(lib.clone()), how: "LIBMOE_LIB_DIR/LIBMOE_INCLUDE_DIR".into() });
    }

    // 2. pkg-config, for what the environment left open
    let (mut inc, mut lib, mut how) = (i.env_inc.clone(), i.env_lib.clone(), String::from("LIBMOE_LIB_DIR/LIBMOE_INCLUDE_DIR"));
    match &i.pkg_config {
        PkgConfig::Skipped => tried.push("pkg-config: skipped (LIBMOE_NO_PKG_CONFIG is set)".into()),
        PkgConfig::NotFound { command, why } => tried.push(format!("`{}`: {}", command, why.trim())),
        PkgConfig::Found { command, include_dir, lib_dir } => {
            tried.push(format!("`{}`: found", command));
            how = command.clone();
            if lib.is_none() {
                if let Some(d) = lib_dir {
                    if !has_library(d) {
                        return Err(fail(format!("pkg-config names libdir {} but it has no {}", d.display(), LIB_FILE), &tried));
                    }
                    lib = Some(d.clone());
                }
            }
            if inc.is_none() {
                if let Some(d) = include_dir {
                    if has_header(d) {
                        inc = Some(d.clone());
                    }
                }
            }
        }
    }

    // 3. the header of the source tree; the library in the linker's default directories
    if inc.is_none() {
        inc = i.tree_include.clone();
    }
    let include_dir = match inc {
        Some(d) => d,
        None => return Err(fail("cannot find libmoe's header moe/moe.h".into(), &tried)),
    };
    if lib.is_none() {
        let dirs: Vec<String> = i.system_lib_dirs.iter().map(|d| d.display().to_string()).collect();
        if i.system_lib_dirs.iter().any(|d| has_library(d)) {
            if matches!(i.pkg_config, PkgConfig::Found { .. }) {
                // pkg-config found libmoe in a default directory (its libdir may be omitted)
            } else {
                how = "the linker's default directories".into();
            }
        } else {
            tried.push(format!("the linker's default directories ({}): no {}", dirs.join(", "), LIB_FILE));
            return Err(fail(format!("cannot find the library {} (libmoe)", LIB_FILE), &tried));
        }
    }
    Ok(Found { include_dir, lib_dir: lib, how })
}
