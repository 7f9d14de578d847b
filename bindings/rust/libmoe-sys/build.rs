//! Finds libmoe and generates the FFI from its moe.h with bindgen.
//!
//! Order (as openssl-sys / zstd-sys do): environment overrides, then pkg-config, then the header
//! of the source tree this crate lives in with the library in the linker's default directories.
//! When libmoe is not found the build stops here with what was tried and how to fix it, rather
//! than with a linker error later. The decision itself is in build/find.rs.
use std::env;
use std::path::PathBuf;
use std::process::Command;

#[path = "build/find.rs"]
mod find;
use find::{Inputs, PkgConfig};

/// The oldest libmoe whose API these bindings cover (moe_layer_param_dtype came with 0.2).
const MIN_VERSION: &str = "0.2";

fn env_path(name: &str) -> Option<PathBuf> {
    println!("cargo:rerun-if-env-changed={}", name);
    env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from)
}

/// `pkg-config --variable=NAME libmoe`.
fn pkg_config_variable(pc: &str, variable: &str) -> Option<PathBuf> {
    let out = Command::new(pc).args(["--variable", variable, "libmoe"]).output().ok()?;
    let s = String::from_utf8(out.stdout).ok()?;
    let s = s.trim();
    if !out.status.success() || s.is_empty() {
        None
    } else {
        Some(PathBuf::from(s))
    }
}

fn pkg_config() -> PkgConfig {
    if env::var_os("LIBMOE_NO_PKG_CONFIG").is_some() {
        return PkgConfig::Skipped;
    }
    let pc = env::var("PKG_CONFIG").unwrap_or_else(|_| "pkg-config".to_string());
    let spec = format!("libmoe >= {}", MIN_VERSION);
    let command = format!("{} --exists --print-errors '{}'", pc, spec);
    match Command::new(&pc).args(["--exists", "--print-errors", &spec]).output() {
        Err(e) => PkgConfig::NotFound { command, why: format!("cannot run {}: {}", pc, e) },
        Ok(out) if !out.status.success() => {
            // the first line says it ("Package libmoe was not found in the pkg-config search path.")
            let why = String::from_utf8_lossy(&out.stderr).lines().next().unwrap_or("").trim().to_string();
            PkgConfig::NotFound { command, why: if why.is_empty() { "failed".into() } else { why } }
        }
        Ok(_) => PkgConfig::Found {
            command,
            include_dir: pkg_config_variable(&pc, "includedir"),
            lib_dir: pkg_config_variable(&pc, "libdir"),
        },
    }
}

/// The linker's usual directories on Linux (Debian's multiarch ones first).
fn system_lib_dirs() -> Vec<PathBuf> {
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let triplet = match arch.as_str() {
        "x86" => "i386-linux-gnu".to_string(),
        "arm" => "arm-linux-gnueabihf".to_string(),
        a => format!("{}-linux-gnu", a),
    };
    ["/usr/local/lib", &format!("/usr/lib/{}", triplet), "/usr/lib64", "/usr/lib", &format!("/lib/{}", triplet), "/lib64", "/lib"]
        .iter()
        .map(PathBuf::from)
        .collect()
}

fn main() {
    println!("cargo:rerun-if-changed=build/find.rs");
    for v in ["PKG_CONFIG", "PKG_CONFIG_PATH", "PKG_CONFIG_LIBDIR", "PKG_CONFIG_SYSROOT_DIR"] {
        println!("cargo:rerun-if-env-changed={}", v);
    }
    let _ = env_path("LIBMOE_NO_PKG_CONFIG");
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let tree = manifest.join("../../../include");
    let inputs = Inputs {
        env_lib: env_path("LIBMOE_LIB_DIR"),
        env_inc: env_path("LIBMOE_INCLUDE_DIR"),
        pkg_config: pkg_config(),
        tree_include: if tree.join("moe/moe.h").is_file() { Some(tree.canonicalize().unwrap_or(tree)) } else { None },
        system_lib_dirs: system_lib_dirs(),
    };
    let found = match find::locate(&inputs) {
        Ok(f) => f,
        Err(message) => {
            // cargo shows a failed build script's stderr: the message alone, no panic backtrace.
            eprintln!("{}", message);
            std::process::exit(1);
        }
    };
    if let Some(lib) = &found.lib_dir {
        println!("cargo:rustc-link-search=native={}", lib.display());
        println!("cargo:lib_dir={}", lib.display());
    }
    println!("cargo:rustc-link-lib=dylib=moe");
    println!("cargo:include={}", found.include_dir.display());

    let include_dir = found.include_dir;
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
        .unwrap_or_else(|e| panic!("libmoe-sys: bindgen failed on {} (found through {}): {:?}", header.display(), found.how, e));
    let out = PathBuf::from(env::var_os("OUT_DIR").unwrap()).join("bindings.rs");
    bindings
        .write_to_file(&out)
        .unwrap_or_else(|e| panic!("libmoe-sys: cannot write {}: {}", out.display(), e));

    if env::var_os("CARGO_FEATURE_MPI").is_some() {
        if let Err(message) = mpi_bindings(&include_dir, found.lib_dir.as_deref()) {
            eprintln!("{}", message);
            std::process::exit(1);
        }
    }
}

/// The include directories of MPI's C header: `MPI_INCLUDE_DIRS` (separated by ':'), else
/// `pkg-config --cflags-only-I mpi-c` (Open MPI, Debian's libopenmpi-dev), else `mpicc -showme:incdirs`.
fn mpi_include_dirs() -> Result<Vec<PathBuf>, String> {
    println!("cargo:rerun-if-env-changed=MPI_INCLUDE_DIRS");
    if let Some(v) = env::var_os("MPI_INCLUDE_DIRS").filter(|v| !v.is_empty()) {
        return Ok(env::split_paths(&v).collect());
    }
    let pc = env::var("PKG_CONFIG").unwrap_or_else(|_| "pkg-config".to_string());
    let mut tried = Vec::new();
    for (prog, args) in [(pc.as_str(), vec!["--cflags-only-I", "mpi-c"]), ("mpicc", vec!["-showme:incdirs"])] {
        tried.push(format!("{} {}", prog, args.join(" ")));
        if let Ok(out) = Command::new(prog).args(&args).output() {
            if out.status.success() {
                let text = String::from_utf8_lossy(&out.stdout).to_string();
                let dirs: Vec<PathBuf> =
                    text.split_whitespace().map(|w| PathBuf::from(w.trim_start_matches("-I"))).filter(|d| d.join("mpi.h").is_file()).collect();
                if !dirs.is_empty() {
                    return Ok(dirs);
                }
            }
        }
    }
    Err(format!(
        "libmoe-sys (feature \"mpi\"): MPI's mpi.h was not found (tried MPI_INCLUDE_DIRS, {}). Install MPI's \
         development files (Debian: apt-get install libopenmpi-dev) or set MPI_INCLUDE_DIRS.",
        tried.join(", ")
    ))
}

/// Feature "mpi": links libmoe_mpi and generates its functions (moe/moe_mpi.h) into the module
/// `mpi`. The library is looked for in `LIBMOE_MPI_LIB_DIR`, else beside libmoe.
fn mpi_bindings(include_dir: &std::path::Path, libmoe_dir: Option<&std::path::Path>) -> Result<(), String> {
    let header = include_dir.join("moe").join("moe_mpi.h");
    if !header.is_file() {
        return Err(format!("libmoe-sys (feature \"mpi\"): {} is missing (Debian: libmoe-dev with libmoe-mpi0)", header.display()));
    }
    println!("cargo:rerun-if-changed={}", header.display());
    match env_path("LIBMOE_MPI_LIB_DIR").or_else(|| libmoe_dir.map(|d| d.to_path_buf())) {
        Some(dir) => {
            if !dir.join("libmoe_mpi.so").exists() {
                return Err(format!(
                    "libmoe-sys (feature \"mpi\"): no libmoe_mpi.so in {} (set LIBMOE_MPI_LIB_DIR to the directory that has it)",
                    dir.display()
                ));
            }
            println!("cargo:rustc-link-search=native={}", dir.display());
        }
        None => {}
    }
    println!("cargo:rustc-link-lib=dylib=moe_mpi");
    let mut builder = bindgen::Builder::default()
        .header(header.to_string_lossy())
        .clang_arg(format!("-I{}", include_dir.display()))
        // moe.h's types come from the main bindings (the module `mpi` uses them); MPI_Comm is the
        // one type of MPI's that the header needs, opaque (a pointer with Open MPI, an int with MPICH).
        .allowlist_recursively(false)
        .allowlist_function("moe_mpi_.*")
        .allowlist_type("MPI_Comm")
        .allowlist_type("ompi_communicator_t")
        .opaque_type("ompi_communicator_t")
        .size_t_is_usize(true)
        .generate_comments(true)
        .layout_tests(false)
        .rustfmt_bindings(false);
    for dir in mpi_include_dirs()? {
        builder = builder.clang_arg(format!("-I{}", dir.display()));
    }
    let bindings = builder.generate().map_err(|e| format!("libmoe-sys: bindgen failed on {}: {:?}", header.display(), e))?;
    let out = PathBuf::from(env::var_os("OUT_DIR").unwrap()).join("mpi_bindings.rs");
    bindings.write_to_file(&out).map_err(|e| format!("libmoe-sys: cannot write {}: {}", out.display(), e))
}
