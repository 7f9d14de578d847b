package org.libmoe;

import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.FloatBuffer;
import java.nio.ShortBuffer;

/**
 * One parameter and its gradient in the layer's own memory, with no copy: direct buffers over
 * the storage that {@code moe_layer_param_buffers} returns, in native byte order, in the
 * parameter's storage type ({@link #dtype()}). Made by {@link Layer#paramView(String)}.
 *
 * <p>An optimiser step writes through them:
 *
 * <pre>{@code
 * ParamView w1 = layer.paramView("experts.w1");     // F32 storage
 * FloatBuffer p = w1.data(), g = w1.grad();
 * for (int i = 0; i < p.capacity(); i++) p.put(i, p.get(i) - lr * g.get(i));
 * }</pre>
 *
 * Parameters stored in bfloat16 or float16 (the expert weights of a BF16/F16 layer) are seen as
 * {@link ShortBuffer}s of raw bits ({@link #dataBits()}, {@link #gradBits()}); {@link DType#toFloat}
 * and {@link DType#fromFloat} convert one element.
 *
 * <p>Rules, as for {@code moe_layer_param_buffers}:
 *
 * <ul>
 *   <li>Write only while no other call uses the layer (lock the layer: {@code synchronized (layer)},
 *       which every Layer method uses), and not between a training forward and its backward.
 *   <li>Lifetime: the buffers never point at freed memory. Each one keeps the layer's native memory
 *       alive: {@link Layer#close()} frees the layer at once only when no view buffer is reachable
 *       any more; otherwise the memory stays until the garbage collector finds the last view buffer
 *       (and every buffer derived from it) unreachable. After close the buffers still read and write
 *       that memory, which no longer belongs to a usable layer.
 * </ul>
 *
 * Views need a CPU layer: a CUDA layer's storage is device memory, which a Java buffer cannot
 * address (use {@link Layer#paramBufferAddresses(String)}).
 */
public final class ParamView {
  private final ParamInfo info;
  private final DType dtype;
  private final ByteBuffer data;
  private final ByteBuffer grad;

  ParamView(ParamInfo info, DType dtype, ByteBuffer data, ByteBuffer grad) {
    this.info = info;
    this.dtype = dtype;
    this.data = data;
    this.grad = grad;
  }

  /** The parameter's name, e.g. "experts.w1". */
  public String name() {
    return info.name();
  }

  /** Its description (shape, trainable). */
  public ParamInfo info() {
    return info;
  }

  /** The storage type of the parameter and of its gradient (moe_layer_param_dtype). */
  public DType dtype() {
    return dtype;
  }

  /** Number of elements. */
  public long numel() {
    return info.numel();
  }

  /** Whether there is a gradient (false for router.bias). */
  public boolean hasGrad() {
    return grad != null;
  }

  /** The parameter's bytes, any dtype: a new buffer (position 0, native order) over the same memory. */
  public ByteBuffer dataBytes() {
    return bytes(data);
  }

  /** The gradient's bytes, any dtype (see {@link #dataBytes()}). */
  public ByteBuffer gradBytes() {
    return bytes(needGrad());
  }

  /** The parameter as float32 elements; INVALID_ARGUMENT when it is stored in BF16 or F16. */
  public FloatBuffer data() {
    return floats(data, "data");
  }

  /** The gradient as float32 elements; INVALID_ARGUMENT when stored in BF16/F16 or when there is none. */
  public FloatBuffer grad() {
    return floats(needGrad(), "grad");
  }

  /** The parameter's raw 16-bit elements (BF16 or F16 storage); INVALID_ARGUMENT for F32. */
  public ShortBuffer dataBits() {
    return shorts(data, "dataBits");
  }

  /** The gradient's raw 16-bit elements (BF16 or F16 storage); INVALID_ARGUMENT for F32 or none. */
  public ShortBuffer gradBits() {
    return shorts(needGrad(), "gradBits");
  }

  private ByteBuffer needGrad() {
    if (grad == null)
      throw Layer.invalid(info.name() + " has no gradient (it is not trainable)");
    return grad;
  }

  private static ByteBuffer bytes(ByteBuffer root) {
    // duplicate() keeps a reference to root, so the root's cleaner waits for this buffer too.
    return root.duplicate().order(ByteOrder.nativeOrder());
  }

  private FloatBuffer floats(ByteBuffer root, String what) {
    if (dtype != DType.F32)
      throw Layer.invalid(
          what + "(): " + info.name() + " is stored as " + dtype + ", not F32: use "
              + (what.equals("data") ? "dataBits()" : "gradBits()"));
    return bytes(root).asFloatBuffer();
  }

  private ShortBuffer shorts(ByteBuffer root, String what) {
    if (dtype == DType.F32)
      throw Layer.invalid(
          what + "(): " + info.name() + " is stored as F32: use "
              + (what.equals("dataBits") ? "data()" : "grad()"));
    return bytes(root).asShortBuffer();
  }

  @Override
  public String toString() {
    return "ParamView[" + info + ", " + dtype + "]";
  }
}
