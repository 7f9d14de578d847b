# rust_outside_crate: a crate outside the source tree depends on libmoe the way README.md says
# (a path dependency, Debian's crate sources through a cargo source replacement, offline), is
# built with cargo and run. Run with cmake -P:
#   -DCARGO=...         cargo
#   -DSOURCE_DIR=...    bindings/rust of the source tree
#   -DWORK_DIR=...      where the crate is generated (replaced on every run)
# The environment (LIBMOE_LIB_DIR, LIBMOE_INCLUDE_DIR, CARGO_TARGET_DIR, LD_LIBRARY_PATH) comes from
# ctest, as for the other Rust tests, so that the crates built by rust_build are reused.
foreach(v CARGO SOURCE_DIR WORK_DIR)
  if(NOT DEFINED ${v})
    message(FATAL_ERROR "check_outside_crate.cmake: -D${v}=... is required")
  endif()
endforeach()
file(REMOVE_RECURSE ${WORK_DIR})
file(MAKE_DIRECTORY ${WORK_DIR}/src ${WORK_DIR}/.cargo)

file(WRITE ${WORK_DIR}/Cargo.toml "[package]
name = \"outside-user\"
version = \"0.1.0\"
edition = \"2021\"
publish = false

[dependencies]
libmoe = { path = \"${SOURCE_DIR}/libmoe\" }

# its own workspace, whatever folder it is generated in
[workspace]
")
# The source replacement of README.md: bindgen (libmoe-sys's build dependency) from Debian's
# librust-bindgen-dev, no network.
file(WRITE ${WORK_DIR}/.cargo/config.toml "[source.crates-io]
replace-with = \"debian\"

[source.debian]
directory = \"/usr/share/cargo/registry\"

[net]
offline = true
")
file(WRITE ${WORK_DIR}/src/main.rs [=[
//! A user's program: a few SGD steps of a layer; prints the losses.
use libmoe::{Config, DType, Noise};

fn main() -> Result<(), libmoe::Error> {
    let cfg = Config::new(8, 16).num_experts(4).top_k(2).noise(Noise::Off).dtype(DType::F32).seed(5);
    let mut layer = cfg.build()?;
    let x: Vec<f32> = (0..32 * 8).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
    let mut y = vec![0f32; x.len()];
    let mut losses = Vec::new();
    for _ in 0..30 {
        {
            let mut ctx = layer.context()?;
            ctx.forward(&x, &mut y)?;
            losses.push(y.iter().map(|v| 0.5 * v * v).sum::<f32>() / 32.0);
            let dy: Vec<f32> = y.iter().map(|v| v / 32.0).collect();
            ctx.backward(&dy, None)?;
        }
        for p in layer.params()? {
            let pm = layer.param_mut(&p.name)?;
            if let Some(g) = pm.grad {
                pm.data.iter_mut().zip(g).for_each(|(w, g)| *w -= 0.5 * g);
            }
        }
        layer.zero_grad()?;
    }
    let (first, last) = (losses[0], losses[losses.len() - 1]);
    println!("outside crate: libmoe {:?}, loss {} -> {}", libmoe::version_triple(), first, last);
    assert!(last < first, "the loss did not fall");
    Ok(())
}
]=])

execute_process(COMMAND ${CARGO} build --offline
  WORKING_DIRECTORY ${WORK_DIR} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
message("${out}")
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "cargo build of the outside crate failed (${rc})")
endif()
if(DEFINED ENV{CARGO_TARGET_DIR})
  set(exe $ENV{CARGO_TARGET_DIR}/debug/outside-user)
else()
  set(exe ${WORK_DIR}/target/debug/outside-user)
endif()
execute_process(COMMAND ${exe} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
message("${out}${err}")
if(NOT rc EQUAL 0 OR NOT out MATCHES "^outside crate: libmoe ")
  message(FATAL_ERROR "the outside crate's program failed (${rc})")
endif()
