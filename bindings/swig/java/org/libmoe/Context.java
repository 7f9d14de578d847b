package org.libmoe;

import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.FloatBuffer;
import java.nio.IntBuffer;
import java.nio.LongBuffer;
import org.libmoe.jni.MoeNative;
import org.libmoe.jni.moe_stats;

/**
 * What one training forward keeps for its backward, and the routing it decided
 * ({@code moe_context}). Made by {@link Layer#newContext()}, bound to that layer, freed by
 * {@link #close()} (or when the layer is closed). Reusing a context for the next step reuses its
 * memory. All methods lock the layer.
 */
public final class Context implements AutoCloseable {
  private final Layer layer;
  private long handle;

  Context(Layer layer, long handle) {
    this.layer = layer;
    this.handle = handle;
  }

  /** The layer this context belongs to. */
  public Layer layer() {
    return layer;
  }

  /** Frees the context. Calling it again (or after the layer was closed) does nothing. */
  @Override
  public void close() {
    synchronized (layer) {
      closeLocked();
      layer.forget(this);
    }
  }

  void closeLocked() {
    if (handle == 0) return;
    MoeNative.moe_context_destroy(handle);
    handle = 0;
  }

  /** Whether the context (or its layer) has been closed. */
  public boolean isClosed() {
    synchronized (layer) {
      return handle == 0;
    }
  }

  long live() {
    if (handle == 0) throw new MoeException(Status.STATE, "the context is closed");
    return handle;
  }

  // ---- compute through the layer ---------------------------------------------------------------

  /** Training forward into this context (see {@link Layer#forward(FloatBuffer, FloatBuffer, Context)}). */
  public void forward(FloatBuffer x, FloatBuffer y) {
    layer.forward(x, y, this);
  }

  /** Training forward into this context, with arrays. */
  public void forward(float[] x, float[] y) {
    layer.forward(x, y, this);
  }

  /** Backward of the forward held here; dx may be null. */
  public void backward(FloatBuffer dy, FloatBuffer dx) {
    layer.backward(this, dy, dx);
  }

  /** Backward of the forward held here, with arrays; dx may be null. */
  public void backward(float[] dy, float[] dx) {
    layer.backward(this, dy, dx);
  }

  /** Routes x into this context without running the experts. */
  public void route(FloatBuffer x) {
    layer.route(x, this);
  }

  /** Routes an array of tokens into this context. */
  public void route(float[] x) {
    layer.route(x, this);
  }

  /**
   * Scales the auxiliary-loss gradient that backward adds for this context (default 1, kept until
   * changed); 0 reports the aux losses without training on them. The reported values are not scaled.
   */
  public void setAuxGradScale(float scale) {
    synchronized (layer) {
      MoeNative.moe_context_set_aux_grad_scale(live(), scale);
    }
  }

  // ---- what the forward decided ------------------------------------------------------------------

  /** Statistics of the held forward or route (STATE if none). */
  public Stats stats() {
    synchronized (layer) {
      return statsLocked();
    }
  }

  Stats statsLocked() {
    try (moe_stats s = new moe_stats()) { // struct_size set by the constructor
      MoeNative.moe_context_stats(live(), s);
      return new Stats(
          s.getNum_tokens(),
          s.getNum_slots(),
          s.getDropped_slots(),
          s.getLoad_balance_loss(),
          s.getZ_loss(),
          s.getImportance_loss(),
          s.getLoad_loss(),
          s.getAux_loss_total(),
          s.getLoad_cv(),
          s.getMax_load_ratio());
    }
  }

  /** Kept slots of each expert, {@code [E]}, after capacity. */
  public long[] expertCounts() {
    synchronized (layer) {
      int e = (int) layer.numExperts();
      LongBuffer b = direct(e * 8L).asLongBuffer();
      MoeNative.moe_context_expert_counts(live(), Layer.address(b, "counts", true));
      long[] out = new long[e];
      b.get(out);
      return out;
    }
  }

  /** Token-choice decisions {@code [tokens, k]} (UNSUPPORTED for expert-choice routing). */
  public TopK topK() {
    synchronized (layer) {
      int k = (int) layer.topK();
      long n = statsLocked().numTokens() * k;
      if (n > Integer.MAX_VALUE / 4) throw Layer.invalid(n + " routing slots do not fit Java arrays");
      IntBuffer ids = direct(n * 4).asIntBuffer();
      FloatBuffer w = direct(n * 4).asFloatBuffer();
      MoeNative.moe_context_topk(live(), Layer.address(ids, "expert_ids", true), Layer.address(w, "weights", true));
      int[] idsOut = new int[(int) n];
      float[] wOut = new float[(int) n];
      ids.get(idsOut);
      w.get(wOut);
      return new TopK(k, idsOut, wOut);
    }
  }

  /** Every kept (token, expert, weight) assignment, ordered by expert then token. */
  public Assignments assignments() {
    synchronized (layer) {
      long c = live();
      long[] count = new long[1];
      MoeNative.moe_context_assignments(c, 0, 0, 0, 0, count);
      long n = count[0];
      if (n > Integer.MAX_VALUE / 4) throw Layer.invalid(n + " assignments do not fit Java arrays");
      IntBuffer tok = direct(n * 4).asIntBuffer();
      IntBuffer exp = direct(n * 4).asIntBuffer();
      FloatBuffer w = direct(n * 4).asFloatBuffer();
      MoeNative.moe_context_assignments(
          c,
          n,
          Layer.address(tok, "token", true),
          Layer.address(exp, "expert", true),
          Layer.address(w, "weight", true),
          count);
      int m = (int) Math.min(n, count[0]);
      int[] t = new int[m];
      int[] e = new int[m];
      float[] ww = new float[m];
      tok.get(t);
      exp.get(e);
      w.get(ww);
      return new Assignments(t, e, ww);
    }
  }

  private static ByteBuffer direct(long bytes) {
    return ByteBuffer.allocateDirect((int) Math.max(bytes, 8)).order(ByteOrder.nativeOrder());
  }

  @Override
  public String toString() {
    return "Context[" + layer + (isClosed() ? ", closed" : "") + "]";
  }
}
