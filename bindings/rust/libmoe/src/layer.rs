//! The layer: parameters, forward, backward and routing.
use crate::config::{Config, DType, Device};
use crate::context::Context;
use crate::error::{check, Error, Result, Status};
use libmoe_sys as sys;
use std::ffi::{c_void, CStr, CString};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::ptr::{self, NonNull};

/// One named parameter tensor (PyTorch nn.Linear layout, row-major).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamInfo {
    /// e.g. `"router.weight"`, `"experts.w1"`.
    pub name: String,
    /// 1 to 3 dimensions.
    pub shape: Vec<usize>,
    /// false for `router.bias` (changed by bias balancing, never by gradients).
    pub trainable: bool,
}

impl ParamInfo {
    /// Number of f32 elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A parameter and its gradient in the layer's memory, from [`Layer::param_mut`].
#[derive(Debug)]
pub struct ParamMut<'a> {
    /// The values, row-major in the parameter's shape; writes change the layer.
    pub data: &'a mut [f32],
    /// The accumulated gradient (`None` for `router.bias`, which is not trainable).
    pub grad: Option<&'a [f32]>,
}

/// A Mixture-of-Experts layer (`moe_layer`), freed when dropped.
///
/// Host-slice methods (`forward`, `backward`, `route`) need a CPU float32 layer; CUDA or bf16/f16
/// layers take device pointers through the `*_raw` methods.
///
/// # Threads
/// `Layer` is `Send` but not `Sync`. libmoe lets a layer (and the contexts created from it) be used
/// by one thread at a time, from any thread, and records errors per thread: moving a layer to
/// another thread is sound, so it is `Send`. Every method takes `&self` (the C library changes the
/// layer's state behind its opaque pointer, as a `RefCell` would), so sharing `&Layer` between
/// threads would let two threads call into the same layer at once: it is therefore not `Sync`.
/// A [`Context`] borrows its layer, so it cannot leave the layer's thread or outlive it.
/// To share one layer between threads, wrap it in a `Mutex`.
pub struct Layer {
    ptr: NonNull<sys::moe_layer>,
    // The communicator of an expert-parallel layer, dropped after the C layer (Drop below runs
    // before the fields are dropped).
    comm: Option<Box<dyn ExpertComm>>,
    d_model: usize,
    num_experts: usize,
    top_k: usize,
    host: bool,
    host_f32: bool,
}

// SAFETY: see "Threads" above: libmoe layers have no thread affinity; only concurrent use is
// forbidden, which !Sync (NonNull is !Sync) and the borrow of contexts prevent.
unsafe impl Send for Layer {}

/// A communicator a layer can spread its experts over: a `moe_comm` (moe.h) that lives as long as
/// the value, e.g. [`crate::mpi::Comm`] (feature `mpi`).
///
/// # Safety
/// `as_ptr` must return a valid `moe_comm` whose hooks stay usable until the value is dropped,
/// and the value must not be used by anything else while a layer owns it.
pub unsafe trait ExpertComm: Send {
    /// The `moe_comm` for `moe_config::comm`.
    fn as_ptr(&self) -> *const sys::moe_comm;

    /// Number of ranks.
    fn size(&self) -> usize {
        unsafe { (*self.as_ptr()).size as usize }
    }

    /// This process's rank: it holds experts `rank*E/size .. (rank+1)*E/size`.
    fn rank(&self) -> usize {
        unsafe { (*self.as_ptr()).rank as usize }
    }

    /// Sum `values` over the ranks, in place, through the comm's own all-to-all of rows: each rank
    /// sends its values to every rank and adds what it receives in rank order, so every rank gets
    /// the same bits. For the gradients of the replicated parameters (router, shared experts), of
    /// which each rank holds its own tokens' share. Collective: every rank calls it with the same
    /// length, between the same layer calls.
    fn all_reduce_sum(&self, values: &mut [f32]) -> Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        let comm = unsafe { &*self.as_ptr() };
        let size = comm.size as usize;
        let exchange = comm
            .exchange_rows
            .ok_or_else(|| Error::invalid("all_reduce_sum: the comm has no exchange_rows hook".to_string()))?;
        let counts = vec![1i64; size];
        let send: Vec<f32> = values.iter().copied().cycle().take(values.len() * size).collect();
        let mut recv = vec![0f32; values.len() * size];
        let row_bytes = values.len() * std::mem::size_of::<f32>();
        let status = unsafe {
            exchange(
                comm.user,
                send.as_ptr() as *const c_void,
                counts.as_ptr(),
                recv.as_mut_ptr() as *mut c_void,
                counts.as_ptr(),
                row_bytes,
                ptr::null_mut(),
            )
        };
        if status != sys::MOE_OK {
            let why = match comm.last_error {
                Some(f) => unsafe { CStr::from_ptr(f(comm.user)) }.to_string_lossy().into_owned(),
                None => String::new(),
            };
            let name = unsafe { CStr::from_ptr(sys::moe_status_name(status)) }.to_string_lossy().into_owned();
            return Err(Error::new(Status::from_raw(status), format!("all_reduce_sum: exchange_rows returned {}: {}", name, why)));
        }
        let n = values.len();
        for (i, v) in values.iter_mut().enumerate() {
            let mut sum = 0f32;
            for q in 0..size {
                sum += recv[q * n + i];
            }
            *v = sum;
        }
        Ok(())
    }
}

fn c_name(name: &str) -> Result<CString> {
    CString::new(name).map_err(|_| Error::invalid(format!("parameter name {:?} contains a NUL byte", name)))
}

fn c_path(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Error::invalid(format!("path {:?} contains a NUL byte", path)))
}

fn c_opt(s: Option<&str>, what: &str) -> Result<Option<CString>> {
    s.map(|v| CString::new(v).map_err(|_| Error::invalid(format!("{} {:?} contains a NUL byte", what, v))))
        .transpose()
}

impl Layer {
    /// Create a layer; parameters are initialised deterministically from `cfg.seed`.
    pub fn new(cfg: &Config) -> Result<Layer> {
        Layer::create(cfg.to_raw()?, None)
    }

    // The comm is boxed before its pointer is taken, so that the moe_comm stays where the C
    // layer saw it even when an implementation holds the struct inline.
    fn create(mut raw: sys::moe_config, comm: Option<Box<dyn ExpertComm>>) -> Result<Layer> {
        if let Some(c) = &comm {
            raw.comm = c.as_ptr();
        }
        let mut out: *mut sys::moe_layer = ptr::null_mut();
        check(unsafe { sys::moe_layer_create(&raw, &mut out) })?;
        let ptr = NonNull::new(out).ok_or_else(|| Error::new(Status::Internal, "moe_layer_create returned NULL"))?;
        // From here on the layer is freed by Drop, also if the lines below fail.
        let mut layer = Layer { ptr, comm, d_model: 0, num_experts: 0, top_k: 0, host: false, host_f32: false };
        let eff = layer.config()?;
        layer.d_model = eff.d_model;
        layer.num_experts = eff.num_experts;
        layer.top_k = eff.top_k;
        layer.host = eff.device == Device::Cpu;
        layer.host_f32 = layer.host && eff.dtype == DType::F32;
        Ok(layer)
    }

    /// Create a layer whose experts are spread over the ranks of `comm` (expert parallelism): this
    /// rank holds `num_experts / comm.size()` of them (rank order), reports their local shapes and
    /// gradients, and exchanges tokens with the other ranks inside every forward and backward.
    /// Every rank creates its layer with the same config (collective). The layer owns the comm
    /// and frees it after itself; [`Layer::comm`] lends it back (e.g. to sum the replicated
    /// parameters' gradients with [`ExpertComm::all_reduce_sum`]). A comm serves one layer: give
    /// each layer its own (e.g. one [`crate::mpi::Comm::world`] each).
    pub fn with_comm<C: ExpertComm + 'static>(cfg: &Config, comm: C) -> Result<Layer> {
        Layer::create(cfg.to_raw()?, Some(Box::new(comm)))
    }

    /// The communicator of a layer made by [`Layer::with_comm`]; `None` otherwise.
    pub fn comm(&self) -> Option<&dyn ExpertComm> {
        self.comm.as_deref()
    }

    /// The effective configuration (defaults filled in, d_ff_shared resolved).
    pub fn config(&self) -> Result<Config> {
        let mut raw = unsafe { std::mem::zeroed::<sys::moe_config>() };
        raw.struct_size = std::mem::size_of::<sys::moe_config>();
        check(unsafe { sys::moe_layer_get_config(self.ptr.as_ptr(), &mut raw) })?;
        Config::from_raw(&raw)
    }

    /// Model width d: activations are `[tokens, d_model]`.
    pub fn d_model(&self) -> usize {
        self.d_model
    }

    /// Number of routed experts E (the length of [`Context::expert_counts`]).
    pub fn num_experts(&self) -> usize {
        self.num_experts
    }

    /// k, the routing slots per token.
    pub fn top_k(&self) -> usize {
        self.top_k
    }

    /// The raw handle, for calling libmoe-sys directly. Still owned by this `Layer`.
    pub fn as_ptr(&self) -> *mut sys::moe_layer {
        self.ptr.as_ptr()
    }

    /// A new, empty context for training forwards and routing.
    pub fn context(&self) -> Result<Context<'_>> {
        Context::new(self)
    }

    // ---- parameters ------------------------------------------------------------------------

    /// Every named parameter, in the library's order.
    pub fn params(&self) -> Result<Vec<ParamInfo>> {
        let n = unsafe { sys::moe_layer_num_params(self.ptr.as_ptr()) };
        if n < 0 {
            return Err(Error::from_last(sys::MOE_ERR_INVALID_ARGUMENT));
        }
        (0..n)
            .map(|i| {
                let mut info = unsafe { std::mem::zeroed::<sys::moe_param_info>() };
                check(unsafe { sys::moe_layer_param_info(self.ptr.as_ptr(), i, &mut info) })?;
                let ndim = info.ndim.clamp(0, 3) as usize;
                Ok(ParamInfo {
                    name: unsafe { CStr::from_ptr(info.name) }.to_string_lossy().into_owned(),
                    shape: info.shape[..ndim].iter().map(|&s| s.max(0) as usize).collect(),
                    trainable: info.trainable != 0,
                })
            })
            .collect()
    }

    /// The description of parameter `name`.
    pub fn param_info(&self, name: &str) -> Result<ParamInfo> {
        self.params()?
            .into_iter()
            .find(|p| p.name == name)
            .ok_or_else(|| Error::invalid(format!("no parameter named {:?}", name)))
    }

    /// A copy of parameter `name` (f32, row-major).
    pub fn param(&self, name: &str) -> Result<Vec<f32>> {
        let mut v = vec![0f32; self.param_info(name)?.numel()];
        self.read_param(name, &mut v)?;
        Ok(v)
    }

    /// Copy parameter `name` into `out` (whose length must be its number of elements).
    pub fn read_param(&self, name: &str, out: &mut [f32]) -> Result<()> {
        let c = c_name(name)?;
        check(unsafe { sys::moe_layer_get_param(self.ptr.as_ptr(), c.as_ptr(), out.as_mut_ptr(), out.len() as i64) })
    }

    /// Overwrite parameter `name` with `values` (exactly its number of elements). Not between a
    /// training forward and its backward.
    pub fn set_param(&self, name: &str, values: &[f32]) -> Result<()> {
        let c = c_name(name)?;
        check(unsafe { sys::moe_layer_set_param(self.ptr.as_ptr(), c.as_ptr(), values.as_ptr(), values.len() as i64) })
    }

    /// Set every parameter from a safetensors checkpoint (`moe_layer_load`): `path` is a
    /// `.safetensors` file, a `model.safetensors.index.json` (sharded) or a directory holding
    /// either; `prefix` names the block (e.g. `Some("model.layers.3.mlp")`); `family` its naming
    /// and layout (`None` or `"libmoe"`, `"mixtral"`, `"qwen2-moe"`, `"qwen3-moe"`, `"olmoe"`,
    /// `"deepseek-v3"`, `"switch"`, `"gpt-oss"`). The layer's configuration must match the checkpoint; on any
    /// error (naming the file, the tensor and the fault) the layer is unchanged.
    pub fn load<P: AsRef<Path>>(&self, path: P, prefix: Option<&str>, family: Option<&str>) -> Result<()> {
        let p = c_path(path.as_ref())?;
        let pre = c_opt(prefix, "prefix")?;
        let fam = c_opt(family, "family")?;
        check(unsafe {
            sys::moe_layer_load(
                self.ptr.as_ptr(),
                p.as_ptr(),
                pre.as_ref().map_or(ptr::null(), |c| c.as_ptr()),
                fam.as_ref().map_or(ptr::null(), |c| c.as_ptr()),
            )
        })
    }

    /// Write every parameter to one safetensors file in libmoe's names (`prefix.name`, or the bare
    /// names with `None`), each in its storage dtype, atomically (`moe_layer_save`); [`Layer::load`]
    /// of it into a layer of the same configuration restores it bit for bit.
    pub fn save<P: AsRef<Path>>(&self, path: P, prefix: Option<&str>) -> Result<()> {
        let p = c_path(path.as_ref())?;
        let pre = c_opt(prefix, "prefix")?;
        check(unsafe {
            sys::moe_layer_save(self.ptr.as_ptr(), p.as_ptr(), pre.as_ref().map_or(ptr::null(), |c| c.as_ptr()))
        })
    }

    /// [`Layer::save`] in the key names and layout of `family` (`moe_layer_save_as`): a family
    /// [`Layer::load`] knows, written as transformers 5's fused experts for the gated families,
    /// Switch's per-expert modules and gpt-oss's plain tensors; `None` or `"libmoe"` is
    /// [`Layer::save`]. Refused (nothing written) while a parameter the family has no tensor for is
    /// not zero. [`Layer::load`] with the same `prefix` and `family` restores the layer bit for bit.
    pub fn save_as<P: AsRef<Path>>(&self, path: P, prefix: Option<&str>, family: Option<&str>) -> Result<()> {
        let p = c_path(path.as_ref())?;
        let pre = c_opt(prefix, "prefix")?;
        let fam = c_opt(family, "family")?;
        check(unsafe {
            sys::moe_layer_save_as(
                self.ptr.as_ptr(),
                p.as_ptr(),
                pre.as_ref().map_or(ptr::null(), |c| c.as_ptr()),
                fam.as_ref().map_or(ptr::null(), |c| c.as_ptr()),
            )
        })
    }

    /// A copy of the accumulated gradient of trainable parameter `name`.
    pub fn grad(&self, name: &str) -> Result<Vec<f32>> {
        let mut v = vec![0f32; self.param_info(name)?.numel()];
        self.read_grad(name, &mut v)?;
        Ok(v)
    }

    /// Copy the gradient of `name` into `out` (exactly its number of elements).
    pub fn read_grad(&self, name: &str, out: &mut [f32]) -> Result<()> {
        let c = c_name(name)?;
        check(unsafe { sys::moe_layer_get_grad(self.ptr.as_ptr(), c.as_ptr(), out.as_mut_ptr(), out.len() as i64) })
    }

    /// Set every gradient to zero.
    pub fn zero_grad(&self) -> Result<()> {
        check(unsafe { sys::moe_layer_zero_grad(self.ptr.as_ptr()) })
    }

    /// The layer's own storage of parameter `name` and of its gradient (NULL for router.bias), on
    /// the layer's device, contiguous, valid until the layer is dropped, in
    /// [`param_dtype`](Self::param_dtype)`(name)`: 4-byte f32 elements, or 2-byte bf16/f16 ones
    /// in a BF16/F16 layer (hence untyped pointers).
    ///
    /// # Safety
    /// The pointers alias the layer's state: write through them only when no forward, backward or
    /// parameter call runs, and never between a training forward and its backward; never past
    /// its number of elements of its dtype.
    pub unsafe fn param_buffers(&self, name: &str) -> Result<(*mut c_void, *mut c_void)> {
        let c = c_name(name)?;
        let mut data: *mut c_void = ptr::null_mut();
        let mut grad: *mut c_void = ptr::null_mut();
        check(sys::moe_layer_param_buffers(self.ptr.as_ptr(), c.as_ptr(), &mut data, &mut grad))?;
        Ok((data, grad))
    }

    /// The storage type of parameter `name` and of its gradient: the layer's dtype for `experts.*`
    /// and `shared.w1/w3/w2`, [`DType::F32`] for `router.*` and `shared.gate`.
    pub fn param_dtype(&self, name: &str) -> Result<DType> {
        let c = c_name(name)?;
        let mut raw: sys::moe_dtype = 0;
        check(unsafe { sys::moe_layer_param_dtype(self.ptr.as_ptr(), c.as_ptr(), &mut raw) })?;
        DType::from_raw(raw as u32)
    }

    /// Parameter `name` and its gradient in the layer's own memory, with no copy: what an
    /// optimiser step writes through (`p.data[i] -= lr * p.grad[i]`).
    ///
    /// Takes `&mut self`: while the slices live no other call can reach the layer, and no
    /// [`Context`] can exist (contexts borrow the layer), so no forward is waiting for its
    /// backward. A CPU layer only, and a parameter stored in f32 ([`param_dtype`](Self::param_dtype));
    /// otherwise `Status::InvalidArgument` naming the device or dtype (use
    /// [`param_buffers`](Self::param_buffers) then). `grad` is `None` for `router.bias`.
    pub fn param_mut(&mut self, name: &str) -> Result<ParamMut<'_>> {
        if !self.host {
            return Err(Error::invalid(format!(
                "param_mut({:?}): the parameters of a CUDA layer are in device memory; use param_buffers",
                name
            )));
        }
        let dtype = self.param_dtype(name)?;
        if dtype != DType::F32 {
            return Err(Error::invalid(format!(
                "param_mut({:?}): the parameter is stored as {:?}, not F32; use param_buffers",
                name, dtype
            )));
        }
        let n = self.param_info(name)?.numel();
        // SAFETY: CPU storage of n f32 values each (moe.h: the documented shape, contiguous),
        // valid while the layer lives; &mut self keeps every other access away for 'a.
        unsafe {
            let (data, grad) = self.param_buffers(name)?;
            Ok(ParamMut {
                data: std::slice::from_raw_parts_mut(data.cast::<f32>(), n),
                grad: if grad.is_null() { None } else { Some(std::slice::from_raw_parts(grad.cast::<f32>(), n)) },
            })
        }
    }

    // ---- compute on host slices --------------------------------------------------------------

    /// Tokens of an activation slice: its length must be a multiple of d_model.
    pub(crate) fn tokens_of(&self, what: &str, len: usize) -> Result<usize> {
        if !self.host_f32 {
            return Err(Error::invalid(format!(
                "{} is a host f32 slice but this layer is not a CPU float32 layer; use the *_raw methods with device pointers",
                what
            )));
        }
        if self.d_model == 0 || len % self.d_model != 0 {
            return Err(Error::invalid(format!(
                "{} has {} elements, not a multiple of d_model = {}",
                what, len, self.d_model
            )));
        }
        Ok(len / self.d_model)
    }

    fn same_len(what: &str, len: usize, want: usize) -> Result<()> {
        if len != want {
            return Err(Error::invalid(format!("{} has {} elements, expected {}", what, len, want)));
        }
        Ok(())
    }

    /// Inference: `y = MoE(x)`, both `[tokens, d_model]` (no noise, nothing saved).
    pub fn forward(&self, x: &[f32], y: &mut [f32]) -> Result<()> {
        let t = self.tokens_of("x", x.len())?;
        Self::same_len("y", y.len(), x.len())?;
        unsafe { self.forward_raw(x.as_ptr().cast(), t, y.as_mut_ptr().cast(), None) }
    }

    /// Training forward: like [`forward`](Self::forward) with router noise, the routing and
    /// activations saved in `ctx` for [`backward`](Self::backward), and the bias update.
    pub fn forward_train(&self, x: &[f32], y: &mut [f32], ctx: &mut Context<'_>) -> Result<()> {
        self.check_ctx(ctx)?;
        let t = self.tokens_of("x", x.len())?;
        Self::same_len("y", y.len(), x.len())?;
        unsafe { self.forward_raw(x.as_ptr().cast(), t, y.as_mut_ptr().cast(), Some(ctx)) }
    }

    /// Backward of the training forward in `ctx`: writes `dx` (if given) and adds to every
    /// gradient, aux losses included. `dy` and `dx` have the length of that forward's `x`.
    pub fn backward(&self, ctx: &mut Context<'_>, dy: &[f32], dx: Option<&mut [f32]>) -> Result<()> {
        // Ownership first: another layer's context holds another forward (or none), and asking it
        // for its token count would report that instead of the real mistake.
        self.check_ctx(ctx)?;
        self.tokens_of("dy", dy.len())?;
        // The token count of the forward held by ctx; none held is the caller's mistake in calling
        // backward, and the error says so (not the stats call used to ask).
        let want = match ctx.stats() {
            Ok(s) => s.num_tokens * self.d_model,
            Err(e) if e.status() == Status::State => {
                return Err(Error::new(
                    Status::State,
                    "Layer::backward: ctx holds no training forward: call forward_train with this context first",
                ))
            }
            Err(e) => return Err(e),
        };
        Self::same_len("dy", dy.len(), want)?;
        let dx_ptr = match dx {
            Some(dx) => {
                Self::same_len("dx", dx.len(), want)?;
                dx.as_mut_ptr().cast()
            }
            None => ptr::null_mut(),
        };
        unsafe { self.backward_raw(ctx, dy.as_ptr().cast(), dx_ptr) }
    }

    /// Route `x` without running the experts: fills `ctx` with the routing and statistics of an
    /// inference forward (the context cannot then be used for backward).
    pub fn route(&self, x: &[f32], ctx: &mut Context<'_>) -> Result<()> {
        self.check_ctx(ctx)?;
        let t = self.tokens_of("x", x.len())?;
        unsafe { self.route_raw(x.as_ptr().cast(), t, ctx) }
    }

    // ---- compute on raw (device) pointers ------------------------------------------------------

    /// A context may only be used with the layer that created it. Checked before anything else by
    /// every method that takes one.
    fn check_ctx(&self, ctx: &Context<'_>) -> Result<()> {
        let owner = ctx.layer();
        if !ptr::eq(owner, self) {
            return Err(Error::invalid(format!(
                "ctx belongs to another layer ({:?} at {:p}), not to this one ({:?} at {:p}): \
                 create it with this layer's context()",
                owner,
                owner.as_ptr(),
                self,
                self.as_ptr()
            )));
        }
        Ok(())
    }

    /// `moe_forward` on raw pointers in the layer's dtype on its device (`ctx` None: inference).
    ///
    /// # Safety
    /// `x` and `y` must each hold `num_tokens * d_model` elements of the layer's dtype on the
    /// layer's device, must not overlap, and must stay valid for the call (for CUDA layers: until
    /// the layer's stream has run the work).
    pub unsafe fn forward_raw(&self, x: *const c_void, num_tokens: usize, y: *mut c_void, ctx: Option<&mut Context<'_>>) -> Result<()> {
        let c = match ctx {
            Some(c) => {
                self.check_ctx(c)?;
                c.as_ptr()
            }
            None => ptr::null_mut(),
        };
        let t = i64::try_from(num_tokens).map_err(|_| Error::invalid(format!("num_tokens = {} is too large", num_tokens)))?;
        check(sys::moe_forward(self.ptr.as_ptr(), x, t, y, c))
    }

    /// `moe_backward` on raw pointers (`dx` may be NULL).
    ///
    /// # Safety
    /// As [`forward_raw`](Self::forward_raw), with the token count of the forward held by `ctx`.
    pub unsafe fn backward_raw(&self, ctx: &mut Context<'_>, dy: *const c_void, dx: *mut c_void) -> Result<()> {
        self.check_ctx(ctx)?;
        check(sys::moe_backward(self.ptr.as_ptr(), ctx.as_ptr(), dy, dx))
    }

    /// `moe_route` on a raw pointer.
    ///
    /// # Safety
    /// As [`forward_raw`](Self::forward_raw).
    pub unsafe fn route_raw(&self, x: *const c_void, num_tokens: usize, ctx: &mut Context<'_>) -> Result<()> {
        self.check_ctx(ctx)?;
        let t = i64::try_from(num_tokens).map_err(|_| Error::invalid(format!("num_tokens = {} is too large", num_tokens)))?;
        check(sys::moe_route(self.ptr.as_ptr(), x, t, ctx.as_ptr()))
    }

    /// Make a CUDA layer issue its work on `stream` (a `cudaStream_t`; NULL: the default stream).
    ///
    /// # Safety
    /// `stream` must be a valid CUDA stream of the layer's device that outlives its use.
    pub unsafe fn set_stream(&self, stream: *mut c_void) -> Result<()> {
        check(sys::moe_layer_set_stream(self.ptr.as_ptr(), stream))
    }
}

impl Drop for Layer {
    fn drop(&mut self) {
        // Contexts borrow the layer, so all of them are already destroyed.
        unsafe { sys::moe_layer_destroy(self.ptr.as_ptr()) }
    }
}

impl std::fmt::Debug for Layer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Layer")
            .field("d_model", &self.d_model)
            .field("num_experts", &self.num_experts)
            .field("top_k", &self.top_k)
            .finish_non_exhaustive()
    }
}
