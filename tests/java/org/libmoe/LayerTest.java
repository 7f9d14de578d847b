package org.libmoe;

import static org.junit.jupiter.api.Assertions.*;
import static org.libmoe.TestData.*;

import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.FloatBuffer;
import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import org.junit.jupiter.api.Test;

class LayerTest {
  private static Status status(Runnable r) {
    return assertThrows(MoeException.class, r::run).getStatus();
  }

  @Test
  void buffersAndArraysGiveTheSameOutput() {
    try (Layer layer = small().createLayer()) {
      float[] x = data(5 * 16, 1);
      float[] y = layer.forward(x);
      assertTrue(java.util.stream.IntStream.range(0, y.length).anyMatch(i -> y[i] != 0f));

      FloatBuffer bx = direct(x);
      FloatBuffer by = direct(x.length);
      layer.forward(bx, by);
      assertArrayEquals(y, toArray(by));
      assertEquals(0, bx.position(), "positions are not moved");
      assertEquals(x.length, by.remaining());

      // The remaining elements from the position are used.
      FloatBuffer px = direct(x.length + 16);
      px.position(16);
      px.put(x);
      px.position(16);
      FloatBuffer py = direct(x.length + 32);
      py.position(32);
      layer.forward(px, py);
      assertArrayEquals(y, toArray(py));

      // Deterministic: another layer with the same seed gives the same bits.
      try (Layer other = small().createLayer()) {
        assertArrayEquals(y, other.forward(x));
      }
      layer.forward(new float[0], new float[0]);
    }
  }

  @Test
  void checkpointsRoundTripAndBadFilesAreRefused(@org.junit.jupiter.api.io.TempDir java.nio.file.Path dir)
      throws java.io.IOException {
    try (Layer a = small().createLayer(); Layer b = small().seed(11).createLayer()) {
      float[] w = data(4 * 32 * 16, 5);
      a.setParam("experts.w1", w);
      String path = dir.resolve("m.safetensors").toString();
      a.save(path, "model.layers.0.mlp");
      assertFalse(java.util.Arrays.equals(w, b.getParam("experts.w1")));
      b.load(path, "model.layers.0.mlp", "libmoe");
      for (ParamInfo p : a.params()) assertArrayEquals(a.getParam(p.name()), b.getParam(p.name()), p.name());
      float[] x = data(5 * 16, 6);
      assertArrayEquals(a.forward(x), b.forward(x));

      // A file cut short: refused, naming the file, and the layer keeps its values.
      byte[] bytes = java.nio.file.Files.readAllBytes(java.nio.file.Path.of(path));
      String cut = dir.resolve("cut.safetensors").toString();
      java.nio.file.Files.write(java.nio.file.Path.of(cut), java.util.Arrays.copyOf(bytes, bytes.length - 7));
      MoeException e = assertThrows(MoeException.class, () -> b.load(cut, "model.layers.0.mlp", null));
      assertEquals(Status.INVALID_ARGUMENT, e.getStatus());
      assertTrue(e.getMessage().contains("cut.safetensors"), e.getMessage());
      assertArrayEquals(a.forward(x), b.forward(x));
      assertEquals(Status.INVALID_ARGUMENT, status(() -> b.load(null)));
      // gpt-oss's naming needs a gpt-oss layer (clamped SwiGLU): refused for this one.
      assertEquals(Status.INVALID_ARGUMENT, status(() -> b.load(path, "model.layers.0.mlp", "gpt-oss")));
    }
  }

  @Test
  void savesInAFamilysNamesAndLoadsBackBitForBit(@org.junit.jupiter.api.io.TempDir java.nio.file.Path dir)
      throws java.io.IOException {
    try (Layer a = small().createLayer(); Layer b = small().seed(11).createLayer()) {
      a.setParam("experts.w1", data(4 * 32 * 16, 5));
      a.setParam("experts.w2", data(4 * 16 * 32, 6));
      a.setParam("router.bias", new float[4]);  // mixtral has no selection bias
      String path = dir.resolve("mixtral.safetensors").toString();
      a.save(path, "model.layers.0.block_sparse_moe", "mixtral");
      // The file holds transformers 5's fused expert tensor under the family's prefix.
      String head = new String(java.nio.file.Files.readAllBytes(java.nio.file.Path.of(path)),
          java.nio.charset.StandardCharsets.ISO_8859_1);
      assertTrue(head.contains("\"model.layers.0.block_sparse_moe.experts.gate_up_proj\""), head.substring(0, 200));
      assertFalse(java.util.Arrays.equals(a.getParam("experts.w1"), b.getParam("experts.w1")));
      b.load(path, "model.layers.0.block_sparse_moe", "mixtral");
      for (ParamInfo p : a.params()) assertArrayEquals(a.getParam(p.name()), b.getParam(p.name()), p.name());

      // A selection bias mixtral cannot hold: refused, naming it, and the file is left as it was.
      byte[] before = java.nio.file.Files.readAllBytes(java.nio.file.Path.of(path));
      a.setParam("router.bias", new float[] {0f, 0.5f, 0f, 0f});
      MoeException e = assertThrows(MoeException.class, () -> a.save(path, "model.layers.0.block_sparse_moe", "mixtral"));
      assertEquals(Status.INVALID_ARGUMENT, e.getStatus());
      assertTrue(e.getMessage().contains("router.bias"), e.getMessage());
      assertArrayEquals(before, java.nio.file.Files.readAllBytes(java.nio.file.Path.of(path)));
      // libmoe's names hold it; a null family is libmoe's.
      a.save(path, null, null);
      b.load(path);
      assertArrayEquals(a.getParam("router.bias"), b.getParam("router.bias"));
    }
  }

  /** A safetensors file of float32 tensors, written by hand (header length, JSON, data). */
  private static void writeSafetensors(java.nio.file.Path file, String[] names, long[][] shapes, float[][] values)
      throws java.io.IOException {
    StringBuilder h = new StringBuilder("{");
    long offset = 0;
    for (int i = 0; i < names.length; ++i) {
      StringBuilder shape = new StringBuilder();
      for (long s : shapes[i]) shape.append(shape.length() == 0 ? "" : ",").append(s);
      long end = offset + 4L * values[i].length;
      h.append(i == 0 ? "" : ",").append('"').append(names[i]).append("\":{\"dtype\":\"F32\",\"shape\":[")
          .append(shape).append("],\"data_offsets\":[").append(offset).append(',').append(end).append("]}");
      offset = end;
    }
    h.append('}');
    byte[] header = h.toString().getBytes(java.nio.charset.StandardCharsets.UTF_8);
    ByteBuffer b = ByteBuffer.allocate(8 + header.length + (int) offset).order(ByteOrder.LITTLE_ENDIAN);
    b.putLong(header.length).put(header);
    for (float[] v : values) for (float f : v) b.putFloat(f);
    java.nio.file.Files.write(file, b.array());
  }

  @Test
  void gptOssCheckpointLoads(@org.junit.jupiter.api.io.TempDir java.nio.file.Path dir) throws java.io.IOException {
    final int d = 6, ff = 4, e = 4;
    // transformers' GptOssMLP: gate_up_proj [E, d, 2ff], gate and up interleaved on the last axis.
    float[] router = data(e * d, 1), rbias = data(e, 2), gateUp = data(e * d * 2 * ff, 3);
    float[] gateUpBias = data(e * 2 * ff, 4), down = data(e * ff * d, 5), downBias = data(e * d, 6);
    java.nio.file.Path file = dir.resolve("model.safetensors");
    String p = "model.layers.0.mlp.";
    writeSafetensors(file,
        new String[] {p + "router.weight", p + "router.bias", p + "experts.gate_up_proj",
          p + "experts.gate_up_proj_bias", p + "experts.down_proj", p + "experts.down_proj_bias"},
        new long[][] {{e, d}, {e}, {e, d, 2 * ff}, {e, 2 * ff}, {e, ff, d}, {e, d}},
        new float[][] {router, rbias, gateUp, gateUpBias, down, downBias});
    try (Layer layer = Config.preset("gpt-oss").dModel(d).dFF(ff).numExperts(e).topK(2).createLayer()) {
      layer.load(dir.toString(), "model.layers.0.mlp", "gpt-oss");
      assertArrayEquals(router, layer.getParam("router.weight"));
      assertArrayEquals(rbias, layer.getParam("router.logit_bias"));
      assertArrayEquals(downBias, layer.getParam("experts.b2"));
      float[] w1 = layer.getParam("experts.w1"), w3 = layer.getParam("experts.w3"), w2 = layer.getParam("experts.w2");
      float[] b1 = layer.getParam("experts.b1"), b3 = layer.getParam("experts.b3");
      for (int x = 0; x < e; ++x) {
        for (int f = 0; f < ff; ++f) {
          assertEquals(gateUpBias[x * 2 * ff + 2 * f], b1[x * ff + f]);
          assertEquals(gateUpBias[x * 2 * ff + 2 * f + 1], b3[x * ff + f]);
          for (int i = 0; i < d; ++i) {
            assertEquals(gateUp[(x * d + i) * 2 * ff + 2 * f], w1[(x * ff + f) * d + i]);
            assertEquals(gateUp[(x * d + i) * 2 * ff + 2 * f + 1], w3[(x * ff + f) * d + i]);
            assertEquals(down[(x * ff + f) * d + i], w2[(x * d + i) * ff + f]);
          }
        }
      }
      float[] y = layer.forward(data(3 * d, 7));
      for (float v : y) assertTrue(Float.isFinite(v));
    }
  }

  @Test
  void badBuffersAreRefusedBeforeLibmoeIsCalled() {
    try (Layer layer = small().createLayer()) {
      float[] x = data(3 * 16, 2);
      float[] y = layer.forward(x);
      assertEquals(Status.INVALID_ARGUMENT, status(() -> layer.forward(new float[17], new float[17])));
      MoeException e = assertThrows(MoeException.class, () -> layer.forward(x, new float[16]));
      assertTrue(e.getMessage().contains("expected 48"), e.getMessage());
      assertEquals(Status.INVALID_ARGUMENT, status(() -> layer.forward(FloatBuffer.wrap(x), direct(x.length))));
      FloatBuffer bigEndian = ByteBuffer.allocateDirect(x.length * 4).asFloatBuffer();
      assertEquals(Status.INVALID_ARGUMENT, status(() -> layer.forward(direct(x), bigEndian)));
      assertEquals(Status.INVALID_ARGUMENT, status(() -> layer.forward(direct(x), direct(x).asReadOnlyBuffer())));
      FloatBuffer both = direct(x);
      assertEquals(Status.INVALID_ARGUMENT, status(() -> layer.forward(both, both)));
      assertEquals(Status.INVALID_ARGUMENT, status(() -> layer.forward((float[]) null, y)));
      // Still usable, still the same.
      assertArrayEquals(y, layer.forward(x));
    }
  }

  @Test
  void trainingStepBackwardAndGradients() {
    try (Layer layer = small().createLayer(); Context ctx = layer.newContext()) {
      int t = 12;
      float[] x = data(t * 16, 3);
      float[] y = new float[x.length];
      ctx.forward(x, y);
      assertArrayEquals(layer.forward(x), y, "no noise: training and inference forwards agree");
      float[] dy = new float[y.length];
      for (int i = 0; i < y.length; i++) dy[i] = y[i] / t;
      float[] dx = new float[x.length];
      ctx.backward(dy, dx);
      float[] g1 = layer.getGrad("experts.w1");
      assertTrue(norm(g1) > 0 && norm(dx) > 0);

      // Backward again accumulates; with buffers this time.
      FloatBuffer bdx = direct(x.length);
      ctx.backward(direct(dy), bdx);
      assertArrayEquals(dx, toArray(bdx));
      float[] g2 = layer.getGrad("experts.w1");
      for (int i = 0; i < g1.length; i++) assertEquals(2 * g1[i], g2[i], 1e-5f * (1 + Math.abs(g2[i])));
      ctx.backward(dy, null);

      layer.zeroGrad();
      assertEquals(0.0, norm(layer.getGrad("experts.w1")));
      assertEquals(Status.INVALID_ARGUMENT, status(() -> ctx.backward(new float[16], null)));
      assertEquals(Status.INVALID_ARGUMENT, status(() -> ctx.backward(dy, new float[16])));
    }
  }

  @Test
  void backwardOutOfOrderIsAStateError() {
    try (Layer layer = small().createLayer(); Context ctx = layer.newContext()) {
      float[] x = data(4 * 16, 4);
      MoeException e = assertThrows(MoeException.class, () -> ctx.backward(x, null));
      assertEquals(Status.STATE, e.getStatus());
      // The message names the call the user made, not the accessor used to check.
      assertTrue(e.getMessage().contains("backward"), e.getMessage());
      assertFalse(e.getMessage().contains("moe_context_stats"), e.getMessage());
      ctx.route(x);
      assertEquals(Status.STATE, status(() -> ctx.backward(x, null)));
      assertEquals(4, ctx.stats().numTokens());
    }
  }

  @Test
  void dxMatchesFiniteDifferences() {
    // k = E: the selection never changes under a perturbation; no aux loss: L = sum(y * r).
    try (Layer layer = Config.builder(4, 8).numExperts(3).topK(3).auxLossCoef(0f).seed(11).createLayer();
        Context ctx = layer.newContext()) {
      float[] x = data(3 * 4, 5);
      float[] r = data(3 * 4, 6);
      float[] dx = new float[x.length];
      ctx.forward(x, new float[x.length]);
      ctx.backward(r, dx);
      float h = 1e-2f;
      for (int i = 0; i < x.length; i++) {
        float[] xp = x.clone();
        float[] xm = x.clone();
        xp[i] += h;
        xm[i] -= h;
        double fd = (dot(layer.forward(xp), r) - dot(layer.forward(xm), r)) / (2.0 * h);
        assertEquals(fd, dx[i], 2e-3 + 2e-2 * Math.abs(fd), "dx[" + i + "]");
      }
    }
  }

  @Test
  void paramsByName() {
    try (Layer layer = small().createLayer()) {
      List<String> names = new ArrayList<>();
      for (ParamInfo p : layer.params()) names.add(p.name());
      assertTrue(names.containsAll(List.of("router.weight", "router.bias", "experts.w1", "experts.w3", "experts.w2")), names.toString());
      ParamInfo w1 = layer.paramInfo("experts.w1");
      assertArrayEquals(new long[] {4, 32, 16}, w1.shape());
      assertEquals(4 * 32 * 16, w1.numel());
      assertTrue(w1.trainable());
      assertFalse(layer.paramInfo("router.bias").trainable());

      float[] w = layer.getParam("router.weight");
      assertEquals(4 * 16, w.length);
      for (float v : w) assertTrue(Math.abs(v) <= 0.25f);
      float[] fresh = new float[w.length];
      for (int i = 0; i < fresh.length; i++) fresh[i] = i * 0.001f;
      layer.setParam("router.weight", fresh);
      assertArrayEquals(fresh, layer.getParam("router.weight"));
      FloatBuffer out = direct(fresh.length);
      layer.getParam("router.weight", out);
      assertArrayEquals(fresh, toArray(out));
      layer.setParam("router.weight", direct(w));
      assertArrayEquals(w, layer.getParam("router.weight"));

      assertEquals(Status.INVALID_ARGUMENT, status(() -> layer.setParam("router.weight", new float[3])));
      MoeException e = assertThrows(MoeException.class, () -> layer.getParam("no.such", direct(4)));
      assertTrue(e.getLibraryMessage().contains("no.such"), e.getLibraryMessage());
      assertEquals(Status.INVALID_ARGUMENT, status(() -> layer.getGrad("router.bias", direct(4))));
      assertEquals(Status.INVALID_ARGUMENT, status(() -> layer.getParam("no.such")));
      assertArrayEquals(w, layer.getParam("router.weight"), "failed calls changed nothing");

      long[] bufs = layer.paramBufferAddresses("router.bias");
      assertNotEquals(0, bufs[0]);
      assertEquals(0, bufs[1]);
    }
  }

  @Test
  void routingStatistics() {
    try (Layer layer = small().createLayer(); Context ctx = layer.newContext()) {
      assertEquals(Status.STATE, status(ctx::stats));
      int t = 40;
      float[] x = data(t * 16, 7);
      ctx.forward(direct(x), direct(x.length));
      Stats s = ctx.stats();
      assertEquals(t, s.numTokens());
      assertEquals(2L * t, s.numSlots());
      assertEquals(0, s.droppedSlots());
      assertTrue(s.loadBalanceLoss() > 0 && s.auxLossTotal() > 0);
      long[] counts = ctx.expertCounts();
      assertEquals(4, counts.length);
      assertEquals(2L * t, java.util.Arrays.stream(counts).sum());
      TopK topk = ctx.topK();
      assertEquals(2, topk.k());
      assertEquals(t, topk.numTokens());
      for (int i = 0; i < t; i++) {
        assertEquals(1.0f, topk.weights()[2 * i] + topk.weights()[2 * i + 1], 1e-5f);
        assertNotEquals(topk.expertIds()[2 * i], topk.expertIds()[2 * i + 1]);
      }
      Assignments a = ctx.assignments();
      assertEquals(2 * t, a.size());
      for (int i = 1; i < a.size(); i++) {
        boolean ordered = a.expert()[i - 1] < a.expert()[i]
            || (a.expert()[i - 1] == a.expert()[i] && a.token()[i - 1] < a.token()[i]);
        assertTrue(ordered, "ordered by expert then token");
      }
      for (int e = 0; e < 4; e++) {
        int n = 0;
        for (int v : a.expert()) if (v == e) n++;
        assertEquals(counts[e], n);
      }
    }
  }

  @Test
  void expertChoiceHasNoTopK() {
    try (Layer layer = Config.preset("expert-choice").dModel(8).dFF(16).numExperts(4).createLayer();
        Context ctx = layer.newContext()) {
      ctx.route(data(16 * 8, 8));
      assertEquals(Status.UNSUPPORTED, status(ctx::topK));
      Stats s = ctx.stats();
      assertEquals(s.numSlots() - s.droppedSlots(), ctx.assignments().size());
    }
  }

  @Test
  void capacityDropsAreReported() {
    try (Layer layer = small().capacityFactor(0.5f).createLayer(); Context ctx = layer.newContext()) {
      ctx.route(data(64 * 16, 9));
      Stats s = ctx.stats();
      assertTrue(s.droppedSlots() > 0);
      assertEquals(s.numSlots() - s.droppedSlots(), java.util.Arrays.stream(ctx.expertCounts()).sum());
      int dropped = 0;
      for (int id : ctx.topK().expertIds()) if (id == -1) dropped++;
      assertEquals(s.droppedSlots(), dropped);
    }
  }

  @Test
  void auxGradScaleZeroDropsTheAuxGradient() {
    float[] x = data(20 * 16, 10);
    float[] dy = data(20 * 16, 11);
    float[] scaled;
    float[] without;
    try (Layer a = small().auxLossCoef(0.5f).createLayer(); Context ctx = a.newContext()) {
      ctx.setAuxGradScale(0f);
      ctx.forward(x, new float[x.length]);
      ctx.backward(dy, null);
      scaled = a.getGrad("router.weight");
      assertEquals(Status.INVALID_ARGUMENT, status(() -> ctx.setAuxGradScale(Float.NaN)));
    }
    try (Layer b = small().auxLossCoef(0f).createLayer(); Context ctx = b.newContext()) {
      ctx.forward(x, new float[x.length]);
      ctx.backward(dy, null);
      without = b.getGrad("router.weight");
    }
    assertArrayEquals(without, scaled, 1e-6f);
  }

  @Test
  void checkFiniteRefusesNaN() {
    try (Layer layer = small().checkFinite(true).createLayer()) {
      float[] x = data(3 * 16, 12);
      x[20] = Float.NaN;
      float[] y = new float[x.length];
      assertEquals(Status.NONFINITE, status(() -> layer.forward(x, y)));
      for (float v : y) assertEquals(0f, v, "a failed call leaves y untouched");
    }
  }

  @Test
  void contextOfAnotherLayerIsRefused() {
    try (Layer a = small().createLayer(); Layer b = small().createLayer(); Context ctx = a.newContext()) {
      float[] x = data(2 * 16, 13);
      float[] y = new float[x.length];
      // Every method that takes a context checks whose it is first: before sizes, before asking the
      // context for its forward (b's backward would otherwise report "no forward" or a size).
      List<Runnable> calls = List.of(
          () -> b.forward(x, y, ctx),
          () -> b.forward(direct(x), direct(x.length), ctx),
          () -> b.backward(ctx, y, null),
          () -> b.backward(ctx, direct(y), direct(y.length)),
          () -> b.backward(ctx, new float[3], null),
          () -> b.route(x, ctx),
          () -> b.route(direct(x), ctx),
          () -> b.forwardRaw(0, 2, 0, ctx),
          () -> b.backwardRaw(ctx, 0, 0),
          () -> b.routeRaw(0, 2, ctx));
      a.forward(x, y, ctx); // ctx now holds a forward of a: b must still refuse it
      for (Runnable call : calls) {
        MoeException e = assertThrows(MoeException.class, call::run);
        assertEquals(Status.INVALID_ARGUMENT, e.getStatus(), e.getMessage());
        String m = e.getLibraryMessage();
        assertTrue(m.startsWith("ctx belongs to another layer (Layer[dModel=16, numExperts=4, topK=2]@0x"), m);
        assertTrue(m.contains("@0x" + Long.toHexString(a.handle())), "names the context's layer: " + m);
        assertTrue(m.contains("@0x" + Long.toHexString(b.handle())), "names this layer: " + m);
        assertTrue(m.contains("newContext()"), m);
      }
      // nothing changed: ctx still holds a's forward, and a's backward runs
      assertEquals(2, ctx.stats().numTokens());
      a.backward(ctx, y, null);
    }
  }

  @Test
  void paramDtypeSaysHowBuffersAreStored() {
    try (Layer l = small().dtype(DType.BF16).createLayer()) {
      assertEquals(DType.BF16, l.paramDtype("experts.w1"));
      assertEquals(DType.BF16, l.paramDtype("experts.w2"));
      assertEquals(DType.F32, l.paramDtype("router.weight"));
      assertEquals(DType.F32, l.paramDtype("router.bias"));
      MoeException e = assertThrows(MoeException.class, () -> l.paramDtype("experts.w9"));
      assertEquals(Status.INVALID_ARGUMENT, e.getStatus());
      assertTrue(e.getLibraryMessage().contains("experts.w9"), e.getLibraryMessage());
    }
    try (Layer l = small().createLayer()) {
      assertEquals(DType.F32, l.paramDtype("experts.w1"));
    }
  }

  @Test
  void cudaOrOtherDtypesSayWhy() {
    try (Layer l = small().dtype(DType.BF16).createLayer()) {
      assertEquals(Status.INVALID_ARGUMENT, status(() -> l.forward(new float[16], new float[16])));
    } catch (MoeException e) {
      assertEquals(Status.UNSUPPORTED, e.getStatus());
    }
    try (Layer l = small().device(Device.CUDA).createLayer()) {
      assertEquals(Device.CUDA, l.config().device()); // a machine with a GPU
    } catch (MoeException e) {
      assertTrue(e.getStatus() == Status.UNSUPPORTED || e.getStatus() == Status.DEVICE, e.toString());
      assertFalse(e.getLibraryMessage().isEmpty());
    }
  }

  @Test
  void oneLayerSharedBetweenThreads() throws Exception {
    ExecutorService pool = Executors.newFixedThreadPool(4);
    try (Layer layer = small().createLayer()) {
      float[] x = data(8 * 16, 14);
      float[] want = layer.forward(x);
      List<Future<float[]>> results = new ArrayList<>();
      for (int i = 0; i < 16; i++) {
        final int k = i;
        results.add(pool.submit(() -> {
          if (k % 4 == 1) assertThrows(MoeException.class, () -> layer.getParam("nope", direct(1)));
          FloatBuffer y = direct(x.length);
          layer.forward(direct(x), y);
          return toArray(y);
        }));
      }
      for (Future<float[]> f : results) assertArrayEquals(want, f.get());
    } finally {
      pool.shutdown();
    }
  }

  private static double norm(float[] v) {
    double s = 0;
    for (float f : v) s += (double) f * f;
    return Math.sqrt(s);
  }

  private static double dot(float[] a, float[] b) {
    double s = 0;
    for (int i = 0; i < a.length; i++) s += (double) a[i] * b[i];
    return s;
  }
}
