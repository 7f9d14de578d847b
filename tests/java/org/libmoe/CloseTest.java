package org.libmoe;

import static org.junit.jupiter.api.Assertions.*;
import static org.libmoe.TestData.*;

import org.junit.jupiter.api.Test;

/** The layer (and its contexts) are freed by close() and by try-with-resources. */
class CloseTest {
  @Test
  void closeFreesTheLayerAndItsContexts() {
    int open = Layer.openCount();
    Layer layer = small().createLayer();
    assertEquals(open + 1, Layer.openCount());
    assertNotEquals(0, layer.handle());
    Context a = layer.newContext();
    Context b = layer.newContext();
    b.close();
    assertTrue(b.isClosed());
    assertEquals(1, layer.openContexts().size());

    layer.close();
    assertTrue(layer.isClosed());
    assertEquals(0, layer.handle());
    assertTrue(a.isClosed(), "closing the layer closes its open contexts first");
    assertEquals(open, Layer.openCount());
    layer.close(); // again: nothing
    a.close();
    assertEquals(open, Layer.openCount());

    MoeException e = assertThrows(MoeException.class, () -> layer.forward(new float[16], new float[16]));
    assertEquals(Status.STATE, e.getStatus());
    assertEquals(Status.STATE, assertThrows(MoeException.class, layer::newContext).getStatus());
    assertEquals(Status.STATE, assertThrows(MoeException.class, () -> layer.getParam("router.weight")).getStatus());
    assertEquals(Status.STATE, assertThrows(MoeException.class, a::stats).getStatus());
  }

  @Test
  void tryWithResourcesClosesEvenOnException() {
    int open = Layer.openCount();
    Layer escaped;
    Context escapedCtx;
    try (Layer layer = small().createLayer(); Context ctx = layer.newContext()) {
      escaped = layer;
      escapedCtx = ctx;
      ctx.forward(data(16, 1), new float[16]);
      assertEquals(open + 1, Layer.openCount());
    }
    assertTrue(escaped.isClosed());
    assertTrue(escapedCtx.isClosed());
    assertEquals(open, Layer.openCount());

    Layer[] inside = new Layer[1];
    assertThrows(MoeException.class, () -> {
      try (Layer layer = small().createLayer()) {
        inside[0] = layer;
        layer.forward(new float[3], new float[3]); // not a multiple of dModel
      }
    });
    assertTrue(inside[0].isClosed());
    assertEquals(open, Layer.openCount());
  }

  @Test
  void closedLayersGiveTheirMemoryBack() throws Exception {
    // Each layer holds 3 * 8 * 512 * 128 floats of parameters (6 MB, written by the initialisation)
    // and its context what a forward saves; 40 of them leaked would be well over 240 MB.
    Config cfg = Config.builder(128, 512).numExperts(8).build();
    float[] x = data(8 * 128, 2);
    float[] y = new float[x.length];
    try (Layer l = new Layer(cfg); Context c = l.newContext()) {
      c.forward(x, y);
    }
    long before = rssBytes();
    for (int i = 0; i < 40; i++) {
      try (Layer l = new Layer(cfg); Context c = l.newContext()) {
        c.forward(x, y);
      }
    }
    long grown = rssBytes() - before;
    assertTrue(grown < 150L << 20, "RSS grew by " + (grown >> 20) + " MB over 40 closed layers");
  }
}
