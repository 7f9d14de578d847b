import java.util.List;
import java.util.SplittableRandom;
import org.libmoe.Comm;
import org.libmoe.Config;
import org.libmoe.Context;
import org.libmoe.Layer;
import org.libmoe.MoeException;
import org.libmoe.ParamInfo;
import org.libmoe.Stats;
import org.libmoe.Status;

/**
 * Expert parallelism from Java, run under mpirun (every rank runs this): each rank builds the layer
 * with a comm from libmoe_mpi, runs a training step on its share of a global batch, and compares
 * with one layer holding every expert run on the whole global batch in the same process: outputs,
 * input gradients, aux losses, its experts' gradients (a slice of the full layer's), and the
 * gradients of the replicated parameters summed over the ranks with Comm.allReduceSum. Exits 1 on
 * any difference (mpirun then fails).
 */
public final class EpMpiCheck {
  private static int rank;
  private static int failures;
  private static int checks;

  private static void check(boolean ok, String what) {
    checks++;
    if (!ok) {
      failures++;
      System.err.println("rank " + rank + ": FAIL " + what);
    }
  }

  private static double relErr(float[] a, float[] b, int bOffset) {
    double num = 0, den = 0;
    for (int i = 0; i < a.length; i++) {
      double d = (double) a[i] - b[bOffset + i];
      num += d * d;
      den += (double) b[bOffset + i] * b[bOffset + i];
    }
    return Math.sqrt(num) / (Math.sqrt(den) + 1e-30);
  }

  private static float[] random(SplittableRandom rng, int n) {
    float[] v = new float[n];
    for (int i = 0; i < n; i++) v[i] = (float) (rng.nextDouble() * 2 - 1);
    return v;
  }

  private static Config config() {
    return Config.builder(16, 24).numExperts(8).topK(2).seed(11)
        .set("aux_loss_coef", 0.01f).set("z_loss_coef", 0.001f).set("importance_loss_coef", 0.01f)
        .set("num_shared_experts", 1).set("shared_gate", true).build();
  }

  public static void main(String[] args) {
    Comm.mpiInit();
    Comm.mpiInit(); // a no-op once MPI is up
    try {
      Comm.mpiFromFortran(-1);
      check(false, "a negative Fortran handle was accepted");
    } catch (MoeException e) {
      check(e.getStatus() == Status.INVALID_ARGUMENT, "a negative Fortran handle gave " + e.getStatus());
    }
    try (Comm comm = Comm.mpiWorld()) {
      rank = comm.rank();
      final int size = comm.size();
      check(size >= 2, "run under mpirun with 2 or more ranks (size " + size + ")");
      final int d = 16;
      // Uneven local batches: rank r holds 5 + 3r tokens of the global batch.
      int total = 0, first = 0, tokens = 0;
      for (int r = 0; r < size; r++) {
        int n = 5 + 3 * r;
        if (r == rank) {
          first = total;
          tokens = n;
        }
        total += n;
      }
      SplittableRandom rng = new SplittableRandom(2024); // the same global batch on every rank
      float[] xg = random(rng, total * d), dyg = random(rng, total * d);
      float[] x = java.util.Arrays.copyOfRange(xg, first * d, (first + tokens) * d);
      float[] dy = java.util.Arrays.copyOfRange(dyg, first * d, (first + tokens) * d);

      try (Layer ref = new Layer(config()); Context rctx = ref.newContext();
           Layer ep = new Layer(config(), comm); Context ctx = ep.newContext()) {
        try {
          comm.close();
          check(false, "the comm closed under an open layer");
        } catch (MoeException e) {
          check(e.getStatus() == Status.STATE, "closing the comm under a layer gave " + e.getStatus());
        }
        float[] yg = new float[total * d], dxg = new float[total * d];
        rctx.forward(xg, yg);
        rctx.backward(dyg, dxg);
        float[] y = new float[tokens * d], dx = new float[tokens * d];
        ctx.forward(x, y);
        ctx.backward(dy, dx);

        double ey = relErr(y, yg, first * d), edx = relErr(dx, dxg, first * d);
        check(ey < 1e-5, "y differs from the single layer's: rel err " + ey);
        check(edx < 1e-5, "dx differs from the single layer's: rel err " + edx);
        Stats s = ctx.stats(), sr = rctx.stats();
        check(Math.abs(s.auxLossTotal() - sr.auxLossTotal()) <= 1e-5f * Math.abs(sr.auxLossTotal()),
            "aux loss " + s.auxLossTotal() + " vs " + sr.auxLossTotal());
        check(Math.abs(s.loadBalanceLoss() - sr.loadBalanceLoss()) <= 1e-5f * Math.abs(sr.loadBalanceLoss()),
            "load-balance loss " + s.loadBalanceLoss() + " vs " + sr.loadBalanceLoss());
        check(Math.abs(s.zLoss() - sr.zLoss()) <= 1e-5f * Math.abs(sr.zLoss()), "z loss " + s.zLoss() + " vs " + sr.zLoss());
        check(s.numTokens() == tokens, "stats count " + s.numTokens() + " local tokens, expected " + tokens);

        List<ParamInfo> params = ep.params();
        check(params.size() == ref.params().size(), "parameter lists differ in length");
        int experts = 0, replicated = 0;
        for (ParamInfo p : params) {
          boolean expert = p.name().startsWith("experts.");
          int n = (int) p.numel();
          int offset = expert ? rank * n : 0;
          float[] full = ref.getParam(p.name()), mine = ep.getParam(p.name());
          check(expert ? full.length == size * n : full.length == n, p.name() + ": " + n + " local of " + full.length);
          check(relErr(mine, full, offset) == 0.0, p.name() + ": initial values are not the full layer's slice");
          if (!p.trainable()) continue;
          float[] g = ep.getGrad(p.name()), gref = ref.getGrad(p.name());
          if (expert) {
            experts++;
          } else {
            comm.allReduceSum(g); // this rank's tokens' share, summed over the ranks
            replicated++;
          }
          double e = relErr(g, gref, offset);
          check(e < 1e-5, "grad of " + p.name() + " differs: rel err " + e);
        }
        check(experts == 3 && replicated >= 4, "compared " + experts + " expert and " + replicated + " replicated gradients");
        float[] ones = {rank + 1, 1};
        comm.allReduceSum(ones);
        check(ones[0] == size * (size + 1) / 2 && ones[1] == size, "allReduceSum gave " + ones[0] + ", " + ones[1]);
      }
      comm.setTimeout(30);
      try {
        comm.setTimeout(-1);
        check(false, "a negative timeout was accepted");
      } catch (MoeException e) {
        check(e.getStatus() == Status.INVALID_ARGUMENT && e.getMessage().contains("moe_mpi_comm_set_timeout"),
            "a negative timeout gave " + e.getStatus() + ": " + e.getMessage());
      }
    }
    Comm.mpiFinalize();
    System.out.println("rank " + rank + ": Java expert parallelism over MPI: " + (failures == 0 ? "ok" : "FAIL") + " ("
        + checks + " checks, " + failures + " failed)");
    System.exit(failures == 0 ? 0 : 1);
  }
}
