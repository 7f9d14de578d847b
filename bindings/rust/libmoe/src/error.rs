//! Errors: every failure of a libmoe call, with the status and the library's message.
use libmoe_sys as sys;
use std::ffi::CStr;
use std::fmt;

/// The status of a failed call: `moe_status` without `MOE_OK`. Values are pinned by moe.h.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Status {
    /// A NULL pointer, a size out of range, a name that does not exist, a slice of the wrong length.
    InvalidArgument,
    /// A host or device allocation failed; nothing was changed.
    OutOfMemory,
    /// A feature this build or this backend does not provide.
    Unsupported,
    /// The CUDA runtime or a kernel failed, or no usable device.
    Device,
    /// A communicator hook returned an error.
    Comm,
    /// A call out of order, e.g. backward without a training forward.
    State,
    /// `check_finite` found NaN or Inf in an input.
    NonFinite,
    /// A bug in libmoe.
    Internal,
    /// A status this version of the crate does not know (a newer library).
    Other(u32),
}

impl Status {
    pub(crate) fn from_raw(s: sys::moe_status) -> Status {
        match s {
            sys::MOE_ERR_INVALID_ARGUMENT => Status::InvalidArgument,
            sys::MOE_ERR_OUT_OF_MEMORY => Status::OutOfMemory,
            sys::MOE_ERR_UNSUPPORTED => Status::Unsupported,
            sys::MOE_ERR_DEVICE => Status::Device,
            sys::MOE_ERR_COMM => Status::Comm,
            sys::MOE_ERR_STATE => Status::State,
            sys::MOE_ERR_NONFINITE => Status::NonFinite,
            sys::MOE_ERR_INTERNAL => Status::Internal,
            other => Status::Other(other as u32),
        }
    }

    /// The C value of this status.
    pub fn code(self) -> u32 {
        (match self {
            Status::InvalidArgument => sys::MOE_ERR_INVALID_ARGUMENT,
            Status::OutOfMemory => sys::MOE_ERR_OUT_OF_MEMORY,
            Status::Unsupported => sys::MOE_ERR_UNSUPPORTED,
            Status::Device => sys::MOE_ERR_DEVICE,
            Status::Comm => sys::MOE_ERR_COMM,
            Status::State => sys::MOE_ERR_STATE,
            Status::NonFinite => sys::MOE_ERR_NONFINITE,
            Status::Internal => sys::MOE_ERR_INTERNAL,
            Status::Other(v) => return v,
        }) as u32
    }

    /// The library's name of the status, e.g. `"MOE_ERR_INVALID_ARGUMENT"`.
    pub fn name(self) -> &'static str {
        // moe_status_name returns a static string for every value (thread-safe, never NULL).
        let p = unsafe { sys::moe_status_name(self.code() as sys::moe_status) };
        if p.is_null() {
            return "MOE_ERR_UNKNOWN";
        }
        unsafe { CStr::from_ptr(p) }.to_str().unwrap_or("MOE_ERR_UNKNOWN")
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A failed libmoe call: the status and the message that names the offending argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    status: Status,
    message: String,
}

/// `std::result::Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An error with the given status and message (used for checks done on the Rust side).
    pub fn new(status: Status, message: impl Into<String>) -> Error {
        Error { status, message: message.into() }
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Error {
        Error::new(Status::InvalidArgument, message)
    }

    /// The error of the call that just returned `st` on this thread. moe_last_error() is
    /// thread-local and valid until this thread's next libmoe call, so it is copied at once.
    pub(crate) fn from_last(st: sys::moe_status) -> Error {
        let p = unsafe { sys::moe_last_error() };
        let message = if p.is_null() {
            String::new()
        } else {
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        };
        Error { status: Status::from_raw(st), message }
    }

    /// Which kind of failure this is.
    pub fn status(&self) -> Status {
        self.status
    }

    /// The library's message (or this crate's, for a slice of the wrong length).
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.message.is_empty() {
            write!(f, "{}", self.status.name())
        } else {
            write!(f, "{}: {}", self.status.name(), self.message)
        }
    }
}

impl std::error::Error for Error {}

/// `Ok(())` for MOE_OK, the thread's last error otherwise. Must be called right after the call.
pub(crate) fn check(st: sys::moe_status) -> Result<()> {
    if st == sys::MOE_OK {
        Ok(())
    } else {
        Err(Error::from_last(st))
    }
}
