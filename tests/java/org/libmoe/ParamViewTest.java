package org.libmoe;

import static org.junit.jupiter.api.Assertions.*;
import static org.libmoe.TestData.*;

import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.FloatBuffer;
import java.nio.ShortBuffer;
import org.junit.jupiter.api.Assumptions;
import org.junit.jupiter.api.Test;

/** Zero-copy parameter and gradient views (Layer.paramView): writes, dtypes, lifetime. */
class ParamViewTest {
  private static double norm(float[] v) {
    double s = 0;
    for (float f : v) s += (double) f * f;
    return Math.sqrt(s);
  }

  private static MoeException error(Runnable r) {
    return assertThrows(MoeException.class, r::run);
  }

  /** One training forward and backward with loss 1/2 |y|^2, gradients accumulated in the layer. */
  private static void forwardBackward(Layer layer, float[] x) {
    try (Context ctx = layer.newContext()) {
      float[] y = new float[x.length];
      ctx.forward(x, y);
      ctx.backward(y, null);
    }
  }

  @Test
  void anSgdStepThroughTheViewsIsWhatGetParamReturns() {
    try (Layer layer = small().numSharedExperts(1).createLayer()) {
      float[] x = data(8 * 16, 21);
      forwardBackward(layer, x);
      float[] before = layer.forward(x);
      float lr = 0.5f;
      int stepped = 0;
      for (ParamInfo p : layer.params()) {
        ParamView v = layer.paramView(p.name());
        assertSame(v, layer.paramView(p.name()), "one view per name");
        assertEquals(DType.F32, v.dtype());
        assertEquals(p, v.info());
        FloatBuffer w = v.data();
        assertTrue(w.isDirect());
        assertEquals(ByteOrder.nativeOrder(), w.order());
        assertEquals(p.numel(), w.capacity());
        float[] old = layer.getParam(p.name());
        assertArrayEquals(old, toArray(w), "the view is the parameter");
        if (!p.trainable()) {
          assertFalse(v.hasGrad());
          assertEquals(Status.INVALID_ARGUMENT, error(v::grad).getStatus());
          continue;
        }
        FloatBuffer g = v.grad();
        float[] grad = layer.getGrad(p.name());
        assertArrayEquals(grad, toArray(g), "the grad view is the gradient");
        assertTrue(norm(grad) > 0, p.name() + " has a gradient");
        float[] want = new float[old.length];
        for (int i = 0; i < old.length; i++) {
          want[i] = old[i] - lr * grad[i];
          w.put(i, w.get(i) - lr * g.get(i));
        }
        assertArrayEquals(want, layer.getParam(p.name()), p.name() + ": the step reached the layer");
        stepped++;
      }
      assertTrue(stepped >= 4, "router.weight, experts.w1/w2/w3, shared.*");
      // the grad views follow zero_grad and the next backward without being made again
      layer.zeroGrad();
      for (float f : toArray(layer.paramView("experts.w2").grad())) assertEquals(0f, f);
      forwardBackward(layer, x);
      assertArrayEquals(layer.getGrad("experts.w2"), toArray(layer.paramView("experts.w2").grad()));
      // and the step changed what the layer computes
      assertFalse(java.util.Arrays.equals(before, layer.forward(x)));
    }
  }

  @Test
  void writesThroughTheByteViewAndItsSlices() {
    try (Layer layer = small().createLayer()) {
      ParamView v = layer.paramView("router.weight");
      FloatBuffer tail = v.dataBytes().position(4 * 8).slice().order(ByteOrder.nativeOrder()).asFloatBuffer();
      tail.put(0, 3.25f);
      assertEquals(3.25f, layer.getParam("router.weight")[8]);
      layer.setParam("router.weight", new float[(int) v.numel()]);
      assertEquals(0f, v.data().get(8), "setParam is seen through the view");
    }
  }

  @Test
  void viewsRespectTheParametersDtype() {
    for (DType dt : new DType[] {DType.BF16, DType.F16}) {
      Layer layer;
      try {
        layer = small().dtype(dt).createLayer();
      } catch (MoeException e) {
        assertEquals(Status.UNSUPPORTED, e.getStatus(), e.toString());
        Assumptions.abort(dt + " layers are not supported by this build: " + e.getLibraryMessage());
        return;
      }
      try (layer) {
        forwardBackwardRaw(layer, dt);
        // the router stays float32 in a low-precision layer; the experts are stored in dt
        ParamView router = layer.paramView("router.weight");
        assertEquals(DType.F32, router.dtype());
        assertEquals(DType.F32, layer.paramDtype("router.weight"));
        assertArrayEquals(layer.getParam("router.weight"), toArray(router.data()));

        ParamView w1 = layer.paramView("experts.w1");
        assertEquals(dt, w1.dtype());
        assertEquals(dt, layer.paramDtype("experts.w1"));
        MoeException e = error(w1::data);
        assertEquals(Status.INVALID_ARGUMENT, e.getStatus());
        assertTrue(e.getMessage().contains("experts.w1 is stored as " + dt), e.getMessage());
        assertEquals(Status.INVALID_ARGUMENT, error(router::dataBits).getStatus());
        assertEquals(Status.INVALID_ARGUMENT, error(w1::grad).getStatus());

        ShortBuffer bits = w1.dataBits();
        assertEquals(w1.numel(), bits.capacity());
        assertEquals(w1.numel() * 2, w1.dataBytes().capacity());
        float[] values = layer.getParam("experts.w1");
        for (int i = 0; i < values.length; i++) assertEquals(values[i], dt.toFloat(bits.get(i)), "element " + i);
        ShortBuffer gbits = w1.gradBits();
        float[] grad = layer.getGrad("experts.w1");
        for (int i = 0; i < grad.length; i++) assertEquals(grad[i], dt.toFloat(gbits.get(i)), "grad " + i);

        // an SGD step in dt through the view, rounded as libmoe rounds set_param
        float lr = 0.25f;
        float[] want = new float[values.length];
        for (int i = 0; i < values.length; i++) {
          float next = values[i] - lr * dt.toFloat(gbits.get(i));
          bits.put(i, dt.fromFloat(next));
          want[i] = next;
        }
        float[] got = layer.getParam("experts.w1");
        layer.setParam("experts.w1", want); // libmoe's own rounding of the same values
        assertArrayEquals(layer.getParam("experts.w1"), got, "fromFloat rounds as libmoe does");
      }
    }
  }

  /** A training step of a low-precision CPU layer, through direct buffers in its dtype. */
  private static void forwardBackwardRaw(Layer layer, DType dt) {
    int n = 4 * 16;
    float[] xf = data(n, 22);
    ByteBuffer xb = ByteBuffer.allocateDirect(2 * n).order(ByteOrder.nativeOrder());
    ByteBuffer yb = ByteBuffer.allocateDirect(2 * n).order(ByteOrder.nativeOrder());
    ShortBuffer x = xb.asShortBuffer();
    for (int i = 0; i < n; i++) x.put(i, dt.fromFloat(xf[i]));
    try (Context ctx = layer.newContext()) {
      layer.forwardRaw(Layer.address(xb, "x", false), 4, Layer.address(yb, "y", true), ctx);
      layer.backwardRaw(ctx, Layer.address(yb, "dy", false), 0);
    }
  }

  @Test
  void aViewKeepsTheLayersMemoryAliveAfterClose() throws Exception {
    Layer layer = small().createLayer();
    ParamView v = layer.paramView("experts.w1");
    FloatBuffer w = v.data();
    float[] values = layer.getParam("experts.w1");
    int open = Layer.openCount();
    layer.close();
    assertEquals(open - 1, Layer.openCount());
    assertFalse(layer.nativeFreed(), "a reachable view holds the memory");
    assertEquals(values[7], w.get(7), "the view still reads the parameter after close");
    w.put(7, 1.5f); // and writing is harmless
    assertEquals(Status.STATE, error(() -> layer.paramView("experts.w1")).getStatus());
    assertEquals(Status.STATE, error(() -> layer.paramDtype("experts.w1")).getStatus());

    v = null;
    w = null;
    for (int i = 0; i < 200 && !layer.nativeFreed(); i++) {
      System.gc();
      Thread.sleep(20);
    }
    assertTrue(layer.nativeFreed(), "the memory is freed once the views are unreachable");
  }

  @Test
  void withoutViewsCloseFreesAtOnce() {
    Layer layer = small().createLayer();
    layer.close();
    assertTrue(layer.nativeFreed());
  }

  @Test
  void badNamesAndDevices() {
    try (Layer layer = small().createLayer()) {
      MoeException e = error(() -> layer.paramView("experts.w9"));
      assertEquals(Status.INVALID_ARGUMENT, e.getStatus());
      assertTrue(e.getMessage().contains("experts.w9"), e.getMessage());
      assertEquals(Status.INVALID_ARGUMENT, error(() -> layer.paramDtype("nope")).getStatus());
      assertEquals(Status.INVALID_ARGUMENT, error(() -> layer.paramView(null)).getStatus());
    }
  }
}
