//! Expert parallelism over MPI (feature `mpi`): a [`Comm`] made by libmoe_mpi, for
//! [`Layer::with_comm`](crate::Layer::with_comm).
//!
//! ```no_run
//! use libmoe::{mpi, Config, ExpertComm, Layer};
//! mpi::init()?;                                   // unless another library started MPI
//! let cfg = Config::new(64, 128).num_experts(8).top_k(2).seed(1);
//! let layer = Layer::with_comm(&cfg, mpi::Comm::world()?)?;  // this rank holds 8 / size experts
//! let mut ctx = layer.context()?;
//! # let (x, dy) = (vec![0.1f32; 4 * 64], vec![0.1f32; 4 * 64]);
//! let mut y = vec![0f32; x.len()];
//! ctx.forward(&x, &mut y)?;                       // this rank's tokens
//! ctx.backward(&dy, None)?;
//! let mut g = layer.grad("router.weight")?;       // this rank's share ...
//! layer.comm().unwrap().all_reduce_sum(&mut g)?;  // ... summed over the ranks
//! drop(ctx);
//! drop(layer);                                    // frees the comm too (collective)
//! mpi::finalize()?;
//! # Ok::<(), libmoe::Error>(())
//! ```
//!
//! Run the program under `mpirun -np R`. Each exchange waits at most the comm's deadline
//! (300 s by default, `MOE_MPI_TIMEOUT`, [`Comm::set_timeout`]); moe_mpi.h says what a missed
//! deadline leaves behind. A communicator of another MPI binding (e.g. rsmpi's `as_raw()`) is
//! passed with [`Comm::from_raw_mpi`] or by its Fortran handle with [`Comm::from_fortran`].
use crate::error::{Error, Result, Status};
use crate::layer::ExpertComm;
use libmoe_sys as sys;
use std::ptr::{self, NonNull};

fn checked(st: sys::moe_status, what: &str, meaning: &str) -> Result<()> {
    if st == sys::MOE_OK {
        return Ok(());
    }
    // libmoe_mpi's functions set no error text: the message is ours.
    let status = Status::from_raw(st);
    Err(Error::new(status, format!("{} returned {}: {}", what, status.name(), meaning)))
}

/// `MPI_Init_thread(MPI_THREAD_SERIALIZED)` unless MPI is initialised already (then Ok).
/// State if MPI was finalised.
pub fn init() -> Result<()> {
    checked(unsafe { sys::mpi::moe_mpi_init() }, "moe_mpi_init", "MPI was finalised, or MPI_Init_thread failed")
}

/// `MPI_Finalize` if MPI is initialised and not finalised; drop every comm (layer) first.
pub fn finalize() -> Result<()> {
    checked(unsafe { sys::mpi::moe_mpi_finalize() }, "moe_mpi_finalize", "MPI_Finalize failed")
}

/// A `moe_comm` over an MPI communicator (duplicated, so libmoe's traffic never mixes with the
/// caller's), freed (collectively) when dropped.
///
/// `Send` but not `Sync`: the comm may be used by one layer call at a time, from any thread MPI's
/// thread level allows (libmoe_mpi initialises MPI_THREAD_SERIALIZED).
#[derive(Debug)]
pub struct Comm {
    ptr: NonNull<sys::moe_comm>,
}

// SAFETY: see the type's documentation; NonNull keeps it !Sync.
unsafe impl Send for Comm {}

unsafe impl ExpertComm for Comm {
    fn as_ptr(&self) -> *const sys::moe_comm {
        self.ptr.as_ptr()
    }
}

impl Comm {
    fn made(st: sys::moe_status, out: *mut sys::moe_comm, what: &str) -> Result<Comm> {
        let meaning = match st {
            sys::MOE_ERR_STATE => "MPI is not initialised (libmoe::mpi::init) or already finalised",
            sys::MOE_ERR_INVALID_ARGUMENT => "a bad communicator or handle, or MOE_MPI_TIMEOUT is not a number of seconds >= 0",
            sys::MOE_ERR_COMM => "MPI_Comm_dup failed",
            _ => "see moe_mpi.h",
        };
        checked(st, what, meaning)?;
        NonNull::new(out).map(|ptr| Comm { ptr }).ok_or_else(|| Error::new(Status::Internal, format!("{} gave NULL", what)))
    }

    /// Every rank of the job (MPI_COMM_WORLD). Collective.
    pub fn world() -> Result<Comm> {
        let mut out = ptr::null_mut();
        let st = unsafe { sys::mpi::moe_mpi_comm_create_world(&mut out) };
        Comm::made(st, out, "moe_mpi_comm_create_world")
    }

    /// The communicator with this Fortran handle (`MPI_Comm_c2f`, mpi4py's `comm.py2f()`). Collective.
    pub fn from_fortran(handle: i64) -> Result<Comm> {
        let mut out = ptr::null_mut();
        let st = unsafe { sys::mpi::moe_mpi_comm_create_f(handle, &mut out) };
        Comm::made(st, out, "moe_mpi_comm_create_f")
    }

    /// A communicator of another MPI binding. Collective.
    ///
    /// # Safety
    /// `comm` must be a valid communicator of the MPI library libmoe_mpi is linked with.
    pub unsafe fn from_raw_mpi(comm: sys::mpi::MPI_Comm) -> Result<Comm> {
        let mut out = ptr::null_mut();
        let st = sys::mpi::moe_mpi_comm_create(comm, &mut out);
        Comm::made(st, out, "moe_mpi_comm_create")
    }

    /// How long each exchange waits for the other ranks: seconds > 0, or 0 or infinity for no
    /// deadline. Local; from the next exchange on.
    pub fn set_timeout(&mut self, seconds: f64) -> Result<()> {
        checked(
            unsafe { sys::mpi::moe_mpi_comm_set_timeout(self.ptr.as_ptr(), seconds) },
            "moe_mpi_comm_set_timeout",
            &format!("{} s: expected seconds > 0, or 0 or infinity for no deadline", seconds),
        )
    }
}

impl Drop for Comm {
    fn drop(&mut self) {
        unsafe { sys::mpi::moe_mpi_comm_destroy(self.ptr.as_ptr()) }
    }
}
