//! Contexts: what one training forward keeps for its backward, and the routing it decided.
use crate::error::{check, Error, Result, Status};
use crate::layer::Layer;
use libmoe_sys as sys;
use std::ptr::{self, NonNull};

/// Routing statistics of the forward or route held by a context (`moe_stats`).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Stats {
    /// T of the forward.
    pub num_tokens: usize,
    /// Routing slots: T*k (token choice) or E*C (expert choice).
    pub num_slots: usize,
    /// Slots dropped by capacity.
    pub dropped_slots: usize,
    /// Load-balance loss, 1.0 when perfectly balanced.
    pub load_balance_loss: f32,
    /// Mean over tokens of logsumexp(logits)^2.
    pub z_loss: f32,
    /// CV^2 of per-expert gate-weight sums.
    pub importance_loss: f32,
    /// CV^2 of the smooth per-expert load (noisy routing).
    pub load_loss: f32,
    /// The coefficient-weighted sum that backward differentiates.
    pub aux_loss_total: f32,
    /// std/mean of per-expert kept slot counts.
    pub load_cv: f32,
    /// max/mean of per-expert kept slot counts.
    pub max_load_ratio: f32,
}

/// One kept (token, expert, weight) routing assignment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Assignment {
    pub token: usize,
    pub expert: usize,
    pub weight: f32,
}

/// Token-choice routing decisions: `expert_ids` and `weights` are `[tokens, k]`, in choice order;
/// a slot dropped by capacity has expert `-1` and weight 0.
#[derive(Debug, Clone, PartialEq)]
pub struct TopK {
    pub k: usize,
    pub expert_ids: Vec<i32>,
    pub weights: Vec<f32>,
}

/// A `moe_context` bound to (and borrowing) its layer; freed when dropped.
///
/// Created by [`Layer::context`]. It is neither `Send` nor `Sync` (it holds a `&Layer`, and
/// `Layer` is not `Sync`): a layer and its contexts stay on one thread together.
pub struct Context<'l> {
    ptr: NonNull<sys::moe_context>,
    layer: &'l Layer,
}

impl<'l> Context<'l> {
    pub(crate) fn new(layer: &'l Layer) -> Result<Context<'l>> {
        let mut out: *mut sys::moe_context = ptr::null_mut();
        check(unsafe { sys::moe_context_create(layer.as_ptr(), &mut out) })?;
        let ptr = NonNull::new(out).ok_or_else(|| Error::new(Status::Internal, "moe_context_create returned NULL"))?;
        Ok(Context { ptr, layer })
    }

    /// The layer this context belongs to.
    pub fn layer(&self) -> &'l Layer {
        self.layer
    }

    /// The raw handle, still owned by this `Context`.
    pub fn as_ptr(&self) -> *mut sys::moe_context {
        self.ptr.as_ptr()
    }

    /// Training forward of the layer into this context (see [`Layer::forward_train`]).
    pub fn forward(&mut self, x: &[f32], y: &mut [f32]) -> Result<()> {
        let layer = self.layer;
        layer.forward_train(x, y, self)
    }

    /// Backward of the forward held here (see [`Layer::backward`]).
    pub fn backward(&mut self, dy: &[f32], dx: Option<&mut [f32]>) -> Result<()> {
        let layer = self.layer;
        layer.backward(self, dy, dx)
    }

    /// Route `x` into this context (see [`Layer::route`]).
    pub fn route(&mut self, x: &[f32]) -> Result<()> {
        let layer = self.layer;
        layer.route(x, self)
    }

    /// Scale the auxiliary-loss gradient that backward adds for this context (default 1, kept
    /// until changed). 0 reports the aux losses without training on them; a loss scaler passes
    /// its scale. The reported loss values are not scaled. `Status::InvalidArgument` if not finite.
    pub fn set_aux_grad_scale(&mut self, scale: f32) -> Result<()> {
        check(unsafe { sys::moe_context_set_aux_grad_scale(self.ptr.as_ptr(), scale) })
    }

    /// Statistics of the held forward or route (`Status::State` if none).
    pub fn stats(&self) -> Result<Stats> {
        let mut s = unsafe { std::mem::zeroed::<sys::moe_stats>() };
        s.struct_size = std::mem::size_of::<sys::moe_stats>();
        check(unsafe { sys::moe_context_stats(self.ptr.as_ptr(), &mut s) })?;
        let n = |v: i64| v.max(0) as usize;
        Ok(Stats {
            num_tokens: n(s.num_tokens),
            num_slots: n(s.num_slots),
            dropped_slots: n(s.dropped_slots),
            load_balance_loss: s.load_balance_loss,
            z_loss: s.z_loss,
            importance_loss: s.importance_loss,
            load_loss: s.load_loss,
            aux_loss_total: s.aux_loss_total,
            load_cv: s.load_cv,
            max_load_ratio: s.max_load_ratio,
        })
    }

    /// Kept slots of each expert, `[E]` (after capacity).
    pub fn expert_counts(&self) -> Result<Vec<i64>> {
        let mut v = vec![0i64; self.layer.num_experts()];
        check(unsafe { sys::moe_context_expert_counts(self.ptr.as_ptr(), v.as_mut_ptr()) })?;
        Ok(v)
    }

    /// Token-choice decisions `[tokens, k]` (`Status::Unsupported` for expert-choice routing).
    pub fn topk(&self) -> Result<TopK> {
        let k = self.layer.top_k();
        let n = self.stats()?.num_tokens * k;
        let mut ids = vec![0i32; n];
        let mut w = vec![0f32; n];
        check(unsafe { sys::moe_context_topk(self.ptr.as_ptr(), ids.as_mut_ptr(), w.as_mut_ptr()) })?;
        Ok(TopK { k, expert_ids: ids, weights: w })
    }

    /// Every kept assignment, ordered by expert then token.
    pub fn assignments(&self) -> Result<Vec<Assignment>> {
        let mut count: i64 = 0;
        let c = self.ptr.as_ptr();
        check(unsafe { sys::moe_context_assignments(c, 0, ptr::null_mut(), ptr::null_mut(), ptr::null_mut(), &mut count) })?;
        let n = count.max(0) as usize;
        let (mut t, mut e, mut w) = (vec![0i32; n], vec![0i32; n], vec![0f32; n]);
        check(unsafe {
            sys::moe_context_assignments(c, n as i64, t.as_mut_ptr(), e.as_mut_ptr(), w.as_mut_ptr(), &mut count)
        })?;
        let n = (count.max(0) as usize).min(n);
        Ok((0..n)
            .map(|i| Assignment { token: t[i].max(0) as usize, expert: e[i].max(0) as usize, weight: w[i] })
            .collect())
    }
}

impl Drop for Context<'_> {
    fn drop(&mut self) {
        unsafe { sys::moe_context_destroy(self.ptr.as_ptr()) }
    }
}

impl std::fmt::Debug for Context<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").field("layer", self.layer).finish_non_exhaustive()
    }
}
