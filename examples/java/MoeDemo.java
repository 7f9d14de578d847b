/*
 * moe_demo: one training step of a libmoe layer on random data (Java version of examples/c/moe_demo.c).
 *
 * Creates a layer, runs a training forward on random tokens, takes the loss
 * L = 1/(2T) * sum_t |y_t|^2, runs the backward with dy = y / T, and prints the routing summary, a
 * bar chart of the load of each expert and a few gradient norms: the same lines, for the same flags,
 * as the C and Rust versions (tests/examples_compare checks that).
 *
 *   java -cp moe-demo.jar:libmoe.jar MoeDemo [--device cpu|cuda] [--tokens T] [--experts E]
 *        [--top-k K] [--d-model D] [--d-ff F] [--seed S]
 *
 * Activations go to libmoe as direct FloatBuffers (no copy). --device cuda needs device memory,
 * which plain Java cannot allocate: the Java demo says so (after libmoe said whether a CUDA layer
 * can be created at all).
 */
import java.io.BufferedWriter;
import java.io.FileOutputStream;
import java.io.FileDescriptor;
import java.io.IOException;
import java.io.OutputStreamWriter;
import java.io.PrintStream;
import java.io.Writer;
import java.math.BigDecimal;
import java.math.RoundingMode;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.FloatBuffer;
import java.nio.charset.StandardCharsets;
import org.libmoe.Config;
import org.libmoe.Context;
import org.libmoe.Device;
import org.libmoe.Layer;
import org.libmoe.Moe;
import org.libmoe.MoeException;
import org.libmoe.ParamInfo;
import org.libmoe.Stats;
import org.libmoe.Status;

public final class MoeDemo {
  private static final String USAGE =
      "usage: moe_demo [--device cpu|cuda] [--tokens T] [--experts E] [--top-k K]\n"
          + "                [--d-model D] [--d-ff F] [--seed S]\n"
          + "defaults: --device cpu --tokens 512 --experts 8 --top-k 2 --d-model 64 --d-ff 128 --seed 42\n";

  // The C demo writes raw UTF-8 whatever the locale: so does this one.
  private static final PrintStream ERR =
      new PrintStream(new FileOutputStream(FileDescriptor.err), true, StandardCharsets.UTF_8);

  // ---- options ------------------------------------------------------------------------------------
  static final class Options {
    Device device = Device.CPU;
    long tokens = 512, experts = 8, topK = 2, dModel = 64, dFF = 128, seed = 42;
  }

  /** Thrown after the reason has been printed on stderr. */
  static final class Failed extends Exception {
    private static final long serialVersionUID = 1L;
  }

  /** strtoll(s, &end, 10) with *end == '\0', as the C demo parses: white space and a sign, saturating. */
  static long parseI64(String flag, String s) throws Failed {
    if (s == null) {
      ERR.printf("moe_demo: %s needs a value%n", flag);
      throw new Failed();
    }
    int i = 0;
    while (i < s.length() && (s.charAt(i) == ' ' || (s.charAt(i) >= '\t' && s.charAt(i) <= '\r'))) i++;
    boolean neg = false;
    if (i < s.length() && (s.charAt(i) == '-' || s.charAt(i) == '+')) neg = s.charAt(i++) == '-';
    String digits = s.substring(i);
    if (digits.isEmpty() || !digits.chars().allMatch(c -> c >= '0' && c <= '9')) {
      ERR.printf("moe_demo: %s expects an integer, got '%s'%n", flag, s);
      throw new Failed();
    }
    BigDecimal v = new BigDecimal(digits);
    if (neg) v = v.negate();
    if (v.compareTo(BigDecimal.valueOf(Long.MAX_VALUE)) > 0) return Long.MAX_VALUE;
    if (v.compareTo(BigDecimal.valueOf(Long.MIN_VALUE)) < 0) return Long.MIN_VALUE;
    return v.longValueExact();
  }

  static Options parseArgs(String[] args) throws Failed {
    Options o = new Options();
    for (int i = 0; i < args.length; i++) {
      String flag = args[i];
      if (flag.equals("-h") || flag.equals("--help")) {
        System.out.print(USAGE);
        System.out.flush();
        System.exit(0);
      }
      String name;
      String val;
      int eq = flag.indexOf('=');
      if (eq >= 0 && flag.substring(0, eq).getBytes(StandardCharsets.UTF_8).length < 64) {
        name = flag.substring(0, eq);
        val = flag.substring(eq + 1);
      } else {
        name = flag;
        val = i + 1 < args.length ? args[++i] : null;
      }
      switch (name) {
        case "--device":
          if ("cpu".equals(val)) o.device = Device.CPU;
          else if ("cuda".equals(val)) o.device = Device.CUDA;
          else {
            ERR.printf("moe_demo: --device expects cpu or cuda, got '%s'%n", val == null ? "" : val);
            throw new Failed();
          }
          break;
        case "--tokens": o.tokens = parseI64(name, val); break;
        case "--experts": o.experts = parseI64(name, val); break;
        case "--top-k": o.topK = parseI64(name, val); break;
        case "--d-model": o.dModel = parseI64(name, val); break;
        case "--d-ff": o.dFF = parseI64(name, val); break;
        case "--seed": o.seed = parseI64(name, val); break;
        default:
          ERR.printf("moe_demo: unknown option '%s'%n", flag);
          ERR.print(USAGE);
          throw new Failed();
      }
    }
    if (o.tokens < 0) {
      ERR.printf("moe_demo: --tokens must be >= 0, got %d%n", o.tokens);
      throw new Failed();
    }
    return o;
  }

  // ---- a small deterministic PRNG (splitmix64), as in the C demo ------------------------------------
  private static long rngState;

  static long rngNext() {
    long z = (rngState += 0x9E3779B97F4A7C15L);
    z = (z ^ (z >>> 30)) * 0xBF58476D1CE4E5B9L;
    z = (z ^ (z >>> 27)) * 0x94D049BB133111EBL;
    return z ^ (z >>> 31);
  }

  /** uniform in [-1, 1) */
  static float rngUniform() {
    return (float) ((double) (rngNext() >>> 11) * 0x1.0p-52 - 1.0);
  }

  // ---- printf("%.Nf") as C prints it: the exact binary value, ties to even -------------------------------
  static String fixed(double v, int decimals) {
    if (Double.isNaN(v)) return "nan";
    if (Double.isInfinite(v)) return v > 0 ? "inf" : "-inf";
    String s = new BigDecimal(v).setScale(decimals, RoundingMode.HALF_EVEN).toPlainString();
    if ((v < 0 || (v == 0 && 1 / v < 0)) && !s.startsWith("-")) s = "-" + s; // -0.0000
    return s;
  }

  static String padLeft(String s, int width) {
    return s.length() >= width ? s : " ".repeat(width - s.length()) + s;
  }

  static String padRight(String s, int width) {
    return s.length() >= width ? s : s + " ".repeat(width - s.length());
  }

  static double l2norm(FloatBuffer v) {
    double s = 0.0;
    for (int i = 0; i < v.limit(); i++) s += (double) v.get(i) * (double) v.get(i);
    return Math.sqrt(s);
  }

  static double l2norm(float[] v) {
    double s = 0.0;
    for (float x : v) s += (double) x * (double) x;
    return Math.sqrt(s);
  }

  static boolean allFinite(FloatBuffer v) {
    for (int i = 0; i < v.limit(); i++) if (!Float.isFinite(v.get(i))) return false;
    return true;
  }

  /** A horizontal bar of width value/max * width cells, drawn with eighth blocks. */
  static String bar(double value, double max, int width) {
    String[] eighths = {"", "\u258F", "\u258E", "\u258D", "\u258C", "\u258B", "\u258A", "\u2589"};
    long cells = max > 0.0 ? Math.round(value / max * width * 8.0) : 0;
    long full = cells / 8, rest = cells % 8, used = full + (rest > 0 ? 1 : 0);
    StringBuilder b = new StringBuilder();
    for (long i = 0; i < full; i++) b.append('\u2588');
    b.append(eighths[(int) rest]);
    for (long i = used; i < width; i++) b.append(' ');
    return b.toString();
  }

  static void printLoadChart(Writer out, long[] counts, long slots) throws IOException {
    long max = 0;
    for (long c : counts) max = Math.max(max, c);
    double mean = counts.length > 0 ? (double) slots / (double) counts.length : 0.0;
    out.write("\nper-expert load (kept slots; perfectly balanced = " + fixed(mean, 1) + " each)\n");
    for (int e = 0; e < counts.length; e++) {
      double pct = slots > 0 ? 100.0 * (double) counts[e] / (double) slots : 0.0;
      out.write("  expert " + padLeft(Integer.toString(e), 3) + " \u2502" + bar(counts[e], max, 40) + "\u2502 "
          + padLeft(Long.toString(counts[e]), 6) + "  " + padLeft(fixed(pct, 1), 5) + "%\n");
    }
  }

  static FloatBuffer floats(long n) {
    return ByteBuffer.allocateDirect((int) Math.max(n * 4, 4)).order(ByteOrder.nativeOrder())
        .asFloatBuffer().limit((int) n);
  }

  static void report(String what, MoeException e) {
    ERR.printf("moe_demo: %s failed: %s: %s%n", what, e.getStatusName(), e.getLibraryMessage());
  }

  // ---- main ---------------------------------------------------------------------------------------------
  static void run(Options o, Writer out) throws IOException, Failed {
    if (Moe.version() != Moe.HEADER_VERSION) {
      out.write("note: built against libmoe " + Moe.HEADER_VERSION + " but running with " + Moe.version() + "\n");
    }
    Config cfg = Config.builder(o.dModel, o.dFF).numExperts(o.experts).topK(o.topK).device(o.device)
        .seed(o.seed).zLossCoef(0.001f).build();
    Layer layer;
    try {
      layer = new Layer(cfg);
    } catch (MoeException e) {
      if (o.device == Device.CUDA && (e.getStatus() == Status.UNSUPPORTED || e.getStatus() == Status.DEVICE)) {
        ERR.printf("moe_demo: CUDA is unavailable (%s): %s%n", e.getStatusName(), e.getLibraryMessage());
        ERR.printf("moe_demo: run with --device cpu to use the CPU backend%n");
      } else {
        report("moe_layer_create", e);
      }
      throw new Failed();
    }
    try (layer) {
      if (o.device == Device.CUDA) {
        ERR.printf("moe_demo: the Java demo cannot allocate CUDA device memory; run the C or Rust demo for --device cuda%n");
        throw new Failed();
      }
      String what = "moe_context_create";
      try (Context ctx = layer.newContext()) {
        out.write("libmoe " + Moe.versionString() + "  device " + (o.device == Device.CUDA ? "cuda" : "cpu")
            + "  tokens " + o.tokens + "  d_model " + o.dModel + "  d_ff " + o.dFF + "  experts " + o.experts
            + "  top-k " + o.topK + "  seed " + Long.toUnsignedString(o.seed) + "\n");

        // random tokens, deterministic in the seed
        long n = o.tokens * o.dModel;
        if (n > Integer.MAX_VALUE / 4) {
          ERR.printf("moe_demo: out of host memory%n");
          throw new Failed();
        }
        FloatBuffer x = floats(n), y = floats(n), dx = floats(n);
        rngState = o.seed ^ 0xD1B54A32D192ED03L;
        for (int i = 0; i < n; i++) x.put(i, rngUniform());

        // training forward: routing statistics and activations are kept in ctx
        what = "moe_forward";
        ctx.forward(x, y);
        if (!allFinite(y)) {
          ERR.printf("moe_demo: the forward produced a non-finite output%n");
          throw new Failed();
        }

        // loss = 1/(2T) sum |y|^2, so dy = y / T
        double loss = 0.0;
        for (int i = 0; i < n; i++) loss += 0.5 * (double) y.get(i) * (double) y.get(i);
        if (o.tokens > 0) loss /= (double) o.tokens;
        for (int i = 0; i < n; i++) y.put(i, o.tokens > 0 ? y.get(i) / (float) o.tokens : 0.0f);
        what = "moe_backward";
        ctx.backward(y, dx);
        if (!allFinite(dx)) {
          ERR.printf("moe_demo: the backward produced a non-finite dL/dx%n");
          throw new Failed();
        }

        // routing summary
        what = "moe_context_stats";
        Stats stats = ctx.stats();
        what = "moe_context_expert_counts";
        long[] counts = ctx.expertCounts();
        long kept = 0;
        for (long c : counts) kept += c;

        out.write("\nrouting summary\n");
        out.write("  tokens               " + stats.numTokens() + "\n");
        out.write("  routing slots        " + stats.numSlots() + " (tokens x top-k)\n");
        out.write("  dropped slots        " + stats.droppedSlots() + "\n");
        out.write("  load-balance loss    " + fixed(stats.loadBalanceLoss(), 4) + " (1.0 = perfectly balanced)\n");
        out.write("  router z-loss        " + fixed(stats.zLoss(), 4) + "\n");
        out.write("  aux loss (weighted)  " + fixed(stats.auxLossTotal(), 6) + "\n");
        out.write("  load CV              " + fixed(stats.loadCv(), 4) + " (std/mean of expert loads)\n");
        out.write("  max/mean load        " + fixed(stats.maxLoadRatio(), 3) + "\n");
        printLoadChart(out, counts, kept);

        // gradient norms
        out.write("\ntraining step: loss = 1/(2T) sum |y|^2 = " + fixed(loss, 6) + "\n");
        out.write("  |x|  " + fixed(l2norm(x), 4) + "   |dL/dx|  " + fixed(l2norm(dx), 6) + "\n");
        out.write("  gradient norms:\n");
        what = "moe_layer_param_info";
        for (ParamInfo p : layer.params()) {
          StringBuilder shape = new StringBuilder();
          long[] dims = p.shape();
          for (int d = 0; d < dims.length; d++) shape.append(d > 0 ? " x " : "").append(dims[d]);
          if (!p.trainable()) {
            out.write("    " + padRight(p.name(), 20) + " [" + shape + "]  (not trainable)\n");
            continue;
          }
          what = "moe_layer_get_grad";
          float[] g = layer.getGrad(p.name());
          out.write("    " + padRight(p.name(), 20) + " [" + shape + "]  |grad| = " + fixed(l2norm(g), 6) + "\n");
          for (float v : g) {
            if (!Float.isFinite(v)) {
              ERR.printf("moe_demo: the gradient of %s is not finite%n", p.name());
              throw new Failed();
            }
          }
        }
      } catch (MoeException e) {
        report(what, e);
        throw new Failed();
      }
    }
  }

  public static void main(String[] args) {
    Writer out = new BufferedWriter(new OutputStreamWriter(new FileOutputStream(FileDescriptor.out), StandardCharsets.UTF_8));
    int rc = 0;
    try {
      run(parseArgs(args), out);
    } catch (Failed f) {
      rc = 1;
    } catch (IOException e) {
      ERR.printf("moe_demo: writing the output failed: %s%n", e.getMessage());
      rc = 1;
    } finally {
      try {
        out.flush();
      } catch (IOException e) {
        rc = 1;
      }
    }
    System.exit(rc);
  }
}
