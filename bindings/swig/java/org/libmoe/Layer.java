package org.libmoe;

import java.lang.ref.Cleaner;
import java.lang.ref.Reference;
import java.nio.Buffer;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.FloatBuffer;
import java.nio.IntBuffer;
import java.nio.LongBuffer;
import java.util.ArrayList;
import java.util.Collections;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.atomic.AtomicInteger;
import org.libmoe.jni.MoeNative;
import org.libmoe.jni.moe_config;
import org.libmoe.jni.moe_param_info;

/**
 * A Mixture-of-Experts layer ({@code moe_layer}): routing, forward, backward and the auxiliary
 * losses. Free it with {@link #close()}, best with try-with-resources:
 *
 * <pre>{@code
 * try (Layer layer = Config.builder(64, 128).numExperts(8).seed(42).createLayer();
 *      Context ctx = layer.newContext()) {
 *   ctx.forward(x, y);                 // training forward (float[] or direct FloatBuffer)
 *   ctx.backward(dy, dx);              // gradients accumulate in the layer
 *   float[] g = layer.getGrad("experts.w1");
 * }
 * }</pre>
 *
 * <p>Activations are {@code [tokens, dModel]} row-major float32. Direct {@link FloatBuffer}s in
 * native byte order are passed to libmoe with no copy (their remaining elements, from their
 * position; positions are not moved); {@code float[]} arguments are copied once through a direct
 * buffer the layer keeps. Sizes are checked before libmoe is called. Host buffers need a CPU
 * float32 layer; CUDA or bf16/f16 layers take device addresses through the {@code *Raw} methods.
 *
 * <p>Thread safety: libmoe lets one thread at a time use a layer and its contexts; every method of
 * Layer and Context locks the layer, so a layer may be shared between threads (calls are
 * serialised). Closing the layer closes its contexts first. There is no finalizer: an unclosed
 * layer keeps its native memory until the process ends.
 *
 * <p>Parameters and gradients can be read and written in place through {@link #paramView(String)}
 * (direct buffers, no copy); such a view keeps the layer's native memory alive until it is
 * unreachable, so it never points at freed memory (see {@link ParamView}).
 */
public final class Layer implements AutoCloseable {
  private static final AtomicInteger OPEN = new AtomicInteger();
  private static final AtomicInteger NATIVE = new AtomicInteger();

  /**
   * The native layer, destroyed when its last holder lets go: the Layer (at close) and each
   * parameter view buffer (when the garbage collector finds it unreachable).
   */
  private static final class Owner {
    private long handle;
    private int holders = 1;

    Owner(long handle) {
      this.handle = handle;
      NATIVE.incrementAndGet();
    }

    synchronized void retain() {
      holders++;
    }

    synchronized void release() {
      if (--holders == 0) {
        MoeNative.moe_layer_destroy(handle);
        handle = 0;
        NATIVE.decrementAndGet();
      }
    }
  }

  /** Created on the first view: one daemon thread that releases the views' hold on layers. */
  private static final class Views {
    static final Cleaner CLEANER = Cleaner.create();
  }

  private long handle;
  private final Comm comm;
  private final Owner owner;
  private final Map<String, ParamView> views = new HashMap<>();
  private final long dModel;
  private final long numExperts;
  private final long topK;
  private final boolean host;
  private final boolean hostF32;
  private final List<Context> contexts = new ArrayList<>();
  private ByteBuffer scratchIn;
  private ByteBuffer scratchOut;

  /**
   * Creates a layer; its parameters are initialised deterministically from the config's seed.
   *
   * @throws MoeException INVALID_ARGUMENT (bad sizes, k &gt; E, ...), UNSUPPORTED (CUDA module or dtype
   *     not available), DEVICE, OUT_OF_MEMORY
   */
  public Layer(Config config) {
    this(config, null);
  }

  /**
   * Creates a layer whose experts are spread over the ranks of comm (expert parallelism): this
   * rank holds {@code numExperts / comm.size()} of them, and every rank creates its layer with
   * the same config (collective). Parameter shapes and gradients are this rank's (see {@link
   * Comm}); close the layer before the comm. A null comm: an ordinary layer.
   *
   * @throws MoeException as {@link #Layer(Config)}; INVALID_ARGUMENT when numExperts is not a
   *     multiple of the comm's size; STATE when the comm is closed
   */
  public Layer(Config config, Comm comm) {
    if (config == null) throw invalid("config is null");
    long[] out = new long[1];
    try (moe_config raw = config.toRaw()) {
      if (comm != null) MoeNative.moe_java_config_set_comm(raw, comm.attach());
      try {
        MoeNative.moe_layer_create(raw, out);
      } catch (RuntimeException e) {
        if (comm != null) comm.detach();
        throw e;
      }
    }
    this.comm = comm;
    handle = out[0];
    owner = new Owner(handle);
    OPEN.incrementAndGet();
    try {
      Config eff = config();
      dModel = eff.dModel();
      numExperts = eff.numExperts();
      topK = eff.topK();
      host = eff.device() == Device.CPU;
      hostF32 = host && eff.dtype() == DType.F32;
    } catch (RuntimeException e) {
      close();
      throw e;
    }
  }

  /** Number of layers created in this JVM and not yet closed (for leak checks). */
  public static int openCount() {
    return OPEN.get();
  }

  /**
   * Number of native layers not yet freed: the open layers plus the closed ones whose memory a
   * reachable {@link ParamView} buffer still holds (for leak checks).
   */
  public static int nativeCount() {
    return NATIVE.get();
  }

  // ---- lifetime ------------------------------------------------------------------------------

  /**
   * Frees the layer, after closing its open contexts; every later call on it (or its contexts)
   * throws STATE. The native memory is freed now, or, while {@link ParamView} buffers of this layer
   * are still reachable, once the garbage collector finds the last of them unreachable. Calling
   * close again does nothing.
   */
  @Override
  public synchronized void close() {
    if (handle == 0) return;
    for (Context c : new ArrayList<>(contexts)) c.closeLocked();
    contexts.clear();
    views.clear();
    handle = 0;
    owner.release();
    if (comm != null) comm.detach();
    scratchIn = null;
    scratchOut = null;
    OPEN.decrementAndGet();
  }

  /** Whether the native layer has been freed (close, then no view buffer left); for the tests. */
  boolean nativeFreed() {
    synchronized (owner) {
      return owner.handle == 0;
    }
  }

  /** Whether {@link #close()} has been called. */
  public synchronized boolean isClosed() {
    return handle == 0;
  }

  /** The {@code moe_layer *} address (0 once closed), for calling the C API through other means. */
  public synchronized long handle() {
    return handle;
  }

  long live() {
    if (handle == 0) throw new MoeException(Status.STATE, "the layer is closed");
    return handle;
  }

  /** A new, empty context for training forwards and routing; closed with the layer at the latest. */
  public synchronized Context newContext() {
    long h = live();
    long[] out = new long[1];
    MoeNative.moe_context_create(h, out);
    Context c = new Context(this, out[0]);
    contexts.add(c);
    return c;
  }

  void forget(Context c) {
    contexts.remove(c);
  }

  /** The contexts of this layer that are still open. */
  public synchronized List<Context> openContexts() {
    return Collections.unmodifiableList(new ArrayList<>(contexts));
  }

  // ---- configuration -------------------------------------------------------------------------

  /** The effective configuration (defaults filled in, dFFShared resolved). */
  public synchronized Config config() {
    long h = live();
    try (moe_config raw = new moe_config()) {
      MoeNative.moe_layer_get_config(h, raw);
      return Config.fromRaw(raw).build();
    }
  }

  /** Model width d: activations are {@code [tokens, dModel]}. */
  public long dModel() {
    return dModel;
  }

  /** Number of routed experts E (the length of {@link Context#expertCounts()}). */
  public long numExperts() {
    return numExperts;
  }

  /** k, the routing slots per token. */
  public long topK() {
    return topK;
  }

  /** Makes a CUDA layer issue its work on a {@code cudaStream_t} (0: the default stream). */
  public synchronized void setStream(long cudaStream) {
    MoeNative.moe_layer_set_stream(live(), cudaStream);
  }

  // ---- parameters ----------------------------------------------------------------------------

  /** Every named parameter, in the library's order. */
  public synchronized List<ParamInfo> params() {
    long h = live();
    int n = MoeNative.moe_layer_num_params(h);
    List<ParamInfo> list = new ArrayList<>(n);
    try (moe_param_info info = new moe_param_info()) {
      for (int i = 0; i < n; i++) {
        MoeNative.moe_layer_param_info(h, i, info);
        long[] shape = new long[Math.max(0, Math.min(3, info.getNdim()))];
        for (int d = 0; d < shape.length; d++) shape[d] = info.dim(d);
        list.add(new ParamInfo(info.getName(), shape, info.getTrainable() != 0));
      }
    }
    return Collections.unmodifiableList(list);
  }

  /** The description of parameter {@code name}. */
  public synchronized ParamInfo paramInfo(String name) {
    for (ParamInfo p : params()) {
      if (p.name().equals(name)) return p;
    }
    throw invalid("no parameter named '" + name + "'");
  }

  /** A copy of parameter {@code name} (row-major float32). */
  public synchronized float[] getParam(String name) {
    float[] out = new float[checkedCount(paramInfo(name).numel())];
    FloatBuffer s = scratch(true, out.length);
    MoeNative.moe_layer_get_param(live(), name, address(s, "scratch", true), out.length);
    s.get(out);
    return out;
  }

  /** Copies parameter {@code name} into the remaining elements of a direct buffer (exactly its size). */
  public synchronized void getParam(String name, FloatBuffer out) {
    long a = address(out, "out", true);
    MoeNative.moe_layer_get_param(live(), name, a, out.remaining());
    Reference.reachabilityFence(out);
  }

  /** Overwrites parameter {@code name} (exactly its number of elements); not between a training forward and its backward. */
  public synchronized void setParam(String name, float[] values) {
    if (values == null) throw invalid("values is null");
    FloatBuffer s = scratch(false, values.length);
    s.put(values).flip();
    MoeNative.moe_layer_set_param(live(), name, address(s, "scratch", false), values.length);
  }

  /** Overwrites parameter {@code name} from the remaining elements of a direct buffer. */
  public synchronized void setParam(String name, FloatBuffer values) {
    long a = address(values, "values", false);
    MoeNative.moe_layer_set_param(live(), name, a, values.remaining());
    Reference.reachabilityFence(values);
  }

  /**
   * Sets every parameter from a safetensors checkpoint (moe_layer_load): {@code path} is a
   * .safetensors file, a model.safetensors.index.json (sharded) or a directory holding either;
   * {@code prefix} names the block (e.g. "model.layers.3.mlp", or null); {@code family} its naming
   * and layout (null or "libmoe", "mixtral", "qwen2-moe", "qwen3-moe", "olmoe", "deepseek-v3",
   * "switch", "gpt-oss"). The layer's configuration must match the checkpoint; on any error (a MoeException
   * naming the file, the tensor and the fault) nothing is changed.
   */
  public synchronized void load(String path, String prefix, String family) {
    if (path == null) throw invalid("path is null");
    MoeNative.moe_layer_load(live(), path, prefix, family);
  }

  /** {@link #load(String, String, String)} of a file in libmoe's own names, with no prefix. */
  public void load(String path) {
    load(path, null, null);
  }

  /**
   * Writes every parameter to one safetensors file in libmoe's names (prefix + "." + name, or the
   * bare names with a null prefix), each in its storage dtype, atomically (moe_layer_save).
   * {@link #load(String, String, String)} of it into a layer of the same configuration restores
   * it bit for bit.
   */
  public synchronized void save(String path, String prefix) {
    if (path == null) throw invalid("path is null");
    MoeNative.moe_layer_save(live(), path, prefix);
  }

  /**
   * Writes every parameter to one safetensors file in the key names and layout of {@code family}
   * (moe_layer_save_as): a family {@link #load(String, String, String)} knows, written as
   * transformers 5's fused experts for the gated families, Switch's per-expert modules and
   * gpt-oss's plain tensors; null or "libmoe" is {@link #save(String, String)}. Refused (nothing
   * written) while a parameter the family has no tensor for is not zero. Loading the file with the
   * same prefix and family into a layer of the same configuration restores it bit for bit.
   */
  public synchronized void save(String path, String prefix, String family) {
    if (path == null) throw invalid("path is null");
    MoeNative.moe_layer_save_as(live(), path, prefix, family);
  }

  /** {@link #save(String, String)} with no prefix. */
  public void save(String path) {
    save(path, null);
  }

  /** A copy of the accumulated gradient of trainable parameter {@code name}. */
  public synchronized float[] getGrad(String name) {
    float[] out = new float[checkedCount(paramInfo(name).numel())];
    FloatBuffer s = scratch(true, out.length);
    MoeNative.moe_layer_get_grad(live(), name, address(s, "scratch", true), out.length);
    s.get(out);
    return out;
  }

  /** Copies the gradient of {@code name} into the remaining elements of a direct buffer. */
  public synchronized void getGrad(String name, FloatBuffer out) {
    long a = address(out, "out", true);
    MoeNative.moe_layer_get_grad(live(), name, a, out.remaining());
    Reference.reachabilityFence(out);
  }

  /** Sets every gradient to zero. */
  public synchronized void zeroGrad() {
    MoeNative.moe_layer_zero_grad(live());
  }

  /**
   * The addresses of the layer's own storage of parameter {@code name} and of its gradient (0 for
   * router.bias), on the layer's device, contiguous, in {@link #paramDtype}{@code (name)}: 4-byte
   * float32 elements, or 2-byte bfloat16/float16 ones in a BF16/F16 layer. Valid until the layer
   * is closed. For optimisers that update weights in place through other native code.
   */
  public synchronized long[] paramBufferAddresses(String name) {
    long[] data = new long[1];
    long[] grad = new long[1];
    MoeNative.moe_layer_param_buffers(live(), name, data, grad);
    return new long[] {data[0], grad[0]};
  }

  /**
   * The storage type of parameter {@code name} and of its gradient: the layer's dtype for
   * experts.* and shared.w1/w3/w2, F32 for router.* and shared.gate.
   */
  public synchronized DType paramDtype(String name) {
    if (name == null) throw invalid("name is null");
    int[] out = new int[1];
    MoeNative.moe_layer_param_dtype(live(), name, out);
    return DType.fromCode(out[0]);
  }

  /**
   * Parameter {@code name} and its gradient in the layer's own memory, as direct buffers with no
   * copy (an optimiser step writes through them). A CPU layer only. The same view is returned for
   * the same name. See {@link ParamView} for the rules, and for how a view keeps the layer's
   * memory alive after {@link #close()}.
   *
   * @throws MoeException INVALID_ARGUMENT for an unknown name or a CUDA layer; STATE once closed
   */
  public synchronized ParamView paramView(String name) {
    long h = live();
    if (name == null) throw invalid("name is null");
    ParamView v = views.get(name);
    if (v != null) return v;
    if (!host)
      throw invalid(
          "paramView(\"" + name + "\"): the parameters of a CUDA layer are in device memory, which a Java"
              + " buffer cannot address; use paramBufferAddresses");
    ParamInfo info = paramInfo(name);
    DType dtype = paramDtype(name);
    long bytes = info.numel() * dtype.size();
    if (bytes > Integer.MAX_VALUE)
      throw invalid("paramView(\"" + name + "\"): " + bytes + " bytes do not fit one Java buffer");
    long[] data = new long[1];
    long[] grad = new long[1];
    MoeNative.moe_layer_param_buffers(h, name, data, grad);
    v = new ParamView(info, dtype, holdingBuffer(data[0], bytes), grad[0] == 0 ? null : holdingBuffer(grad[0], bytes));
    views.put(name, v);
    return v;
  }

  /** A direct buffer over this layer's memory that keeps the native layer alive while reachable. */
  private ByteBuffer holdingBuffer(long address, long bytes) {
    ByteBuffer b = MoeNative.moe_java_direct_buffer(address, bytes).order(ByteOrder.nativeOrder());
    owner.retain();
    // Buffers derived from b (duplicate, asFloatBuffer, slice) reference b, so b becomes
    // unreachable only after all of them. The action must not capture b itself.
    Views.CLEANER.register(b, owner::release);
    return b;
  }

  // ---- compute: direct buffers (no copy) ----------------------------------------------------------

  /** Inference: {@code y = MoE(x)}; both hold {@code tokens * dModel} remaining floats. */
  public void forward(FloatBuffer x, FloatBuffer y) {
    forward(x, y, null);
  }

  /**
   * Training forward when {@code ctx} is given (router noise, routing and activations saved in
   * ctx for {@link #backward}, bias update); inference when it is null.
   */
  public synchronized void forward(FloatBuffer x, FloatBuffer y, Context ctx) {
    long c = ctx == null ? 0 : ctxHandle(ctx);
    long t = tokens("x", x == null ? -1 : x.remaining());
    sameSize("y", y == null ? -1 : y.remaining(), x.remaining());
    long ax = address(x, "x", false);
    long ay = address(y, "y", true);
    noOverlap("x", ax, "y", ay, x.remaining());
    MoeNative.moe_forward(live(), ax, t, ay, c);
    Reference.reachabilityFence(x);
    Reference.reachabilityFence(y);
  }

  /**
   * Backward of the training forward held by {@code ctx}: writes dx (may be null) and adds to
   * every gradient, auxiliary losses included. dy and dx hold as many floats as that forward's x.
   */
  public synchronized void backward(Context ctx, FloatBuffer dy, FloatBuffer dx) {
    long c = ctxHandle(ctx);
    tokens("dy", dy == null ? -1 : dy.remaining());
    long want = forwardSize(ctx);
    sameSize("dy", dy.remaining(), want);
    long ady = address(dy, "dy", false);
    long adx = 0;
    if (dx != null) {
      sameSize("dx", dx.remaining(), want);
      adx = address(dx, "dx", true);
      noOverlap("dy", ady, "dx", adx, want);
    }
    MoeNative.moe_backward(live(), c, ady, adx);
    Reference.reachabilityFence(dy);
    Reference.reachabilityFence(dx);
  }

  /** Routes x without running the experts (ctx then holds inference routing and statistics). */
  public synchronized void route(FloatBuffer x, Context ctx) {
    long c = ctxHandle(ctx);
    long t = tokens("x", x == null ? -1 : x.remaining());
    MoeNative.moe_route(live(), address(x, "x", false), t, c);
    Reference.reachabilityFence(x);
  }

  // ---- compute: float[] (one copy each way) ---------------------------------------------------------

  /** Inference into a new array. */
  public float[] forward(float[] x) {
    if (x == null) throw invalid("x is null");
    float[] y = new float[x.length];
    forward(x, y, null);
    return y;
  }

  /** Inference: {@code y = MoE(x)}, both {@code tokens * dModel} floats. */
  public void forward(float[] x, float[] y) {
    forward(x, y, null);
  }

  /** Training forward when ctx is given, inference when null (see the FloatBuffer overload). */
  public synchronized void forward(float[] x, float[] y, Context ctx) {
    long c = ctx == null ? 0 : ctxHandle(ctx);
    long t = tokens("x", x == null ? -1 : x.length);
    sameSize("y", y == null ? -1 : y.length, x.length);
    FloatBuffer in = scratch(false, x.length);
    in.put(x).flip();
    FloatBuffer out = scratch(true, y.length);
    MoeNative.moe_forward(live(), address(in, "x", false), t, address(out, "y", true), c);
    out.get(y);
  }

  /** Backward with arrays; dx may be null. */
  public synchronized void backward(Context ctx, float[] dy, float[] dx) {
    long c = ctxHandle(ctx);
    tokens("dy", dy == null ? -1 : dy.length);
    long want = forwardSize(ctx);
    sameSize("dy", dy.length, want);
    if (dx != null) sameSize("dx", dx.length, want);
    FloatBuffer in = scratch(false, dy.length);
    in.put(dy).flip();
    FloatBuffer out = dx == null ? null : scratch(true, dx.length);
    MoeNative.moe_backward(live(), c, address(in, "dy", false), out == null ? 0 : address(out, "dx", true));
    if (dx != null) out.get(dx);
  }

  /** Routes an array of tokens into ctx. */
  public synchronized void route(float[] x, Context ctx) {
    long c = ctxHandle(ctx);
    long t = tokens("x", x == null ? -1 : x.length);
    FloatBuffer in = scratch(false, x.length);
    in.put(x).flip();
    MoeNative.moe_route(live(), address(in, "x", false), t, c);
  }

  // ---- compute: raw device addresses ------------------------------------------------------------------

  /**
   * {@code moe_forward} on raw addresses in the layer's dtype on its device (ctx null: inference).
   * Nothing is checked here beyond what libmoe checks: the caller guarantees the sizes.
   */
  public synchronized void forwardRaw(long x, long numTokens, long y, Context ctx) {
    long c = ctx == null ? 0 : ctxHandle(ctx);
    MoeNative.moe_forward(live(), x, numTokens, y, c);
  }

  /** {@code moe_backward} on raw addresses (dx may be 0). */
  public synchronized void backwardRaw(Context ctx, long dy, long dx) {
    long c = ctxHandle(ctx);
    MoeNative.moe_backward(live(), c, dy, dx);
  }

  /** {@code moe_route} on a raw address. */
  public synchronized void routeRaw(long x, long numTokens, Context ctx) {
    long c = ctxHandle(ctx);
    MoeNative.moe_route(live(), x, numTokens, c);
  }

  // ---- helpers -----------------------------------------------------------------------------------------

  static MoeException invalid(String message) {
    return new MoeException(Status.INVALID_ARGUMENT, message);
  }

  /** Every method that takes a context checks first that it is one of this layer's. */
  private long ctxHandle(Context ctx) {
    if (ctx == null) throw invalid("ctx is null");
    if (ctx.layer() != this)
      throw invalid(
          "ctx belongs to another layer (" + ctx.layer().describe() + "), not to this one ("
              + describe() + "): use a context made by this layer's newContext()");
    return ctx.live();
  }

  /**
   * The sizes and the native address, to tell two layers apart in a message. Takes no lock (it
   * describes another layer while this one is locked).
   */
  private String describe() {
    long h = handle;
    return "Layer[dModel=" + dModel + ", numExperts=" + numExperts + ", topK=" + topK + "]"
        + (h == 0 ? " (closed)" : "@0x" + Long.toHexString(h));
  }

  /** Floats of the x of the forward held by ctx (STATE if it holds none). */
  private long forwardSize(Context ctx) {
    try {
      return ctx.statsLocked().numTokens() * dModel;
    } catch (MoeException e) {
      // None held is the caller's mistake in calling backward: say so, not the stats call used to ask.
      if (e.getStatus() != Status.STATE) throw e;
      throw new MoeException(
          Status.STATE, "Layer.backward: ctx holds no training forward: call forward with this context first");
    }
  }

  private long tokens(String what, long count) {
    live();
    if (count < 0) throw invalid(what + " is null");
    if (!hostF32)
      throw invalid(
          what
              + " is a host buffer but this layer is not a CPU float32 layer; use the *Raw methods"
              + " with device addresses");
    if (dModel <= 0 || count % dModel != 0)
      throw invalid(what + " has " + count + " floats, not a multiple of dModel = " + dModel);
    return count / dModel;
  }

  private static void sameSize(String what, long count, long want) {
    if (count < 0) throw invalid(what + " is null");
    if (count != want) throw invalid(what + " has " + count + " floats, expected " + want);
  }

  private static void noOverlap(String a, long pa, String b, long pb, long floats) {
    long bytes = floats * 4;
    if (floats > 0 && pa < pb + bytes && pb < pa + bytes)
      throw invalid(a + " and " + b + " overlap");
  }

  private static int checkedCount(long n) {
    if (n > Integer.MAX_VALUE - 8) throw invalid("a parameter of " + n + " floats does not fit a Java array");
    return (int) n;
  }

  /** The address of the first remaining element of a direct buffer in native order. */
  static long address(Buffer b, String what, boolean writable) {
    if (b == null) throw invalid(what + " is null");
    if (!b.isDirect())
      throw invalid(
          what
              + " is not a direct buffer (use ByteBuffer.allocateDirect(n * 4)"
              + ".order(ByteOrder.nativeOrder()).asFloatBuffer(), or the float[] overload)");
    if (writable && b.isReadOnly()) throw invalid(what + " is read-only");
    int size;
    if (b instanceof FloatBuffer) {
      size = 4;
      if (((FloatBuffer) b).order() != ByteOrder.nativeOrder())
        throw invalid(what + " is not in native byte order (use .order(ByteOrder.nativeOrder()))");
    } else if (b instanceof IntBuffer) {
      size = 4;
      if (((IntBuffer) b).order() != ByteOrder.nativeOrder())
        throw invalid(what + " is not in native byte order");
    } else if (b instanceof LongBuffer) {
      size = 8;
      if (((LongBuffer) b).order() != ByteOrder.nativeOrder())
        throw invalid(what + " is not in native byte order");
    } else if (b instanceof ByteBuffer) {
      size = 1;
    } else {
      throw invalid(what + " must be a FloatBuffer, IntBuffer, LongBuffer or ByteBuffer");
    }
    return MoeNative.moe_java_buffer_address(b) + (long) b.position() * size;
  }

  /** One of the two scratch buffers, cleared, limited to n floats. */
  private FloatBuffer scratch(boolean out, int n) {
    ByteBuffer s = out ? scratchOut : scratchIn;
    long bytes = (long) n * 4;
    if (bytes > Integer.MAX_VALUE) throw invalid(n + " floats do not fit one direct buffer");
    if (s == null || s.capacity() < bytes) {
      s = ByteBuffer.allocateDirect((int) Math.max(bytes, 64)).order(ByteOrder.nativeOrder());
      if (out) scratchOut = s;
      else scratchIn = s;
    }
    FloatBuffer f = s.asFloatBuffer();
    f.limit(n);
    return f;
  }

  @Override
  public String toString() {
    return "Layer[dModel=" + dModel + ", numExperts=" + numExperts + ", topK=" + topK
        + (isClosed() ? ", closed" : "") + "]";
  }
}
