package org.libmoe;

import static org.junit.jupiter.api.Assertions.*;

import org.junit.jupiter.api.Test;

class ConfigTest {
  @Test
  void defaultsComeFromTheLibrary() {
    Config c = Config.builder(64, 128).build();
    assertEquals(64, c.dModel());
    assertEquals(128, c.dFF());
    assertEquals(8, c.numExperts());
    assertEquals(2, c.topK());
    assertEquals(Activation.SWIGLU, c.activation());
    assertEquals(Routing.TOKEN_CHOICE, c.routing());
    assertEquals(Device.CPU, c.device());
    assertEquals(DType.F32, c.dtype());
    assertTrue(c.normalizeTopK());
    assertEquals(0.01f, c.auxLossCoef(), 1e-7f);
    assertEquals(0, Config.builder().build().dModel());
  }

  @Test
  void builderAndEffectiveConfig() {
    Config c = Config.builder(32, 64).numExperts(16).topK(4).activation(Activation.GEGLU)
        .noise(Noise.JITTER).zLossCoef(0.001f).seed(-1L).build();
    try (Layer l = new Layer(c)) {
      Config eff = l.config();
      assertEquals(16, eff.numExperts());
      assertEquals(4, eff.topK());
      assertEquals(Activation.GEGLU, eff.activation());
      assertEquals(Noise.JITTER, eff.noise());
      assertEquals(-1L, eff.seed(), "the seed is an unsigned 64-bit value");
      assertEquals(c, eff, "nothing was defaulted differently");
      assertEquals(16, l.numExperts());
      assertEquals(4, l.topK());
      assertEquals(32, l.dModel());
    }
    Config d = c.toBuilder().topK(1).build();
    assertEquals(1, d.topK());
    assertNotEquals(c, d);
    assertEquals(c, c.toBuilder().build());
    assertEquals(c.hashCode(), c.toBuilder().build().hashCode());
    assertTrue(c.toString().contains("seed=18446744073709551615"), c.toString());
  }

  @Test
  void presets() {
    for (String name : Config.PRESETS) {
      Config c = Config.preset(name).dModel(32).dFF(64).build();
      assertEquals(32, c.dModel(), name);
    }
    Config sw = Config.preset("switch").build();
    assertEquals(1, sw.topK());
    assertEquals(Activation.RELU, sw.activation());
    assertEquals(1.25f, sw.capacityFactor(), 1e-6f);
    assertEquals(Routing.EXPERT_CHOICE, Config.preset("expert-choice").build().routing());
    Config ds = Config.preset("deepseek-v3").build();
    assertEquals(256, ds.numExperts());
    assertEquals(8, ds.topK());
    assertEquals(8, ds.numGroups());
    assertEquals(4, ds.topKGroups());
    assertEquals(1, ds.numSharedExperts());
    assertEquals(Score.SIGMOID, ds.score());
    try (Layer l = Config.preset("mixtral").dModel(8).dFF(16).numExperts(4).createLayer()) {
      assertEquals(4, l.numExperts());
    }
  }

  @Test
  void unknownPresetThrowsWithStatusAndMessage() {
    MoeException e = assertThrows(MoeException.class, () -> Config.preset("gpt-5"));
    assertEquals(Status.INVALID_ARGUMENT, e.getStatus());
    assertEquals(1, e.getStatusCode());
    assertEquals("MOE_ERR_INVALID_ARGUMENT", e.getStatusName());
    assertTrue(e.getLibraryMessage().contains("gpt-5"), e.getLibraryMessage());
    assertEquals("MOE_ERR_INVALID_ARGUMENT: " + e.getLibraryMessage(), e.getMessage());
    assertEquals(Status.INVALID_ARGUMENT, assertThrows(MoeException.class, () -> Config.preset(null)).getStatus());
  }

  @Test
  void invalidConfigsAreRefusedByTheLibrary() {
    int open = Layer.openCount();
    MoeException e = assertThrows(MoeException.class, () -> new Layer(Config.builder(16, 32).numExperts(2).topK(3).build()));
    assertEquals(Status.INVALID_ARGUMENT, e.getStatus());
    assertFalse(e.getLibraryMessage().isEmpty());
    assertThrows(MoeException.class, () -> Config.builder(0, 32).createLayer());
    assertThrows(MoeException.class, () -> Config.builder(-1, 32).createLayer());
    assertThrows(MoeException.class, () -> new Layer(null));
    assertEquals(open, Layer.openCount(), "failed constructors leave nothing open");
  }

  @Test
  void statusNamesMatchTheLibrary() {
    for (Status s : Status.values()) {
      if (s == Status.UNKNOWN) continue;
      assertEquals(Moe.statusName(s), s.statusName());
      assertEquals(s, Status.fromCode(s.code()));
    }
    assertEquals(Status.UNKNOWN, Status.fromCode(99));
  }
}
