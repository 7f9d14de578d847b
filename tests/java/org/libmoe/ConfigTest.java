package org.libmoe;

import static org.junit.jupiter.api.Assertions.*;

import java.util.ArrayList;
import java.util.List;
import org.junit.jupiter.api.Test;
import org.libmoe.jni.MoeNative;
import org.libmoe.jni.moe_config_field_info;
import org.libmoe.jni.moe_config_type;

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

  /** A valid text for field f other than its default. */
  private static String otherValue(Config.Field f) {
    switch (f.type()) {
      case ENUM:
        return f.values().get(f.values().get(0).equals(f.defaultValue()) ? f.values().size() - 1 : 0);
      case BOOL:
        return f.defaultValue().equals("true") ? "false" : "true";
      case FLOAT:
        return Float.toString(Float.parseFloat(f.defaultValue()) + 0.375f);
      default:
        return Long.toString(Long.parseLong(f.defaultValue()) + 3);
    }
  }

  @Test
  void fieldsAreTheLibrarysTable() {
    List<String> fromC = new ArrayList<>();
    try (moe_config_field_info info = new moe_config_field_info()) {
      for (int i = 0; i < MoeNative.moe_config_num_fields(); i++) {
        MoeNative.moe_config_field(i, info);
        if (info.getType() != moe_config_type.MOE_CONFIG_POINTER) fromC.add(info.getName());
      }
    }
    List<String> names = new ArrayList<>();
    for (Config.Field f : Config.FIELDS) names.add(f.name());
    assertEquals(fromC, names);
    assertTrue(names.contains("capacity_factor") && !names.contains("comm"), names.toString());
    Config defaults = Config.builder().build();
    for (Config.Field f : Config.FIELDS) {
      assertEquals(f.defaultValue(), defaults.get(f.name()), f.name());
      assertFalse(f.description().isEmpty(), f.name());
      assertEquals(f.type() == Config.Type.ENUM, !f.values().isEmpty(), f.name());
    }
    assertEquals(List.of("float32", "bfloat16", "float16"), Config.FIELDS.get(indexOf("dtype")).values());
    assertEquals(Config.PRESETS, List.copyOf(Config.presetDescriptions().keySet()));
  }

  private static int indexOf(String name) {
    for (int i = 0; i < Config.FIELDS.size(); i++) if (Config.FIELDS.get(i).name().equals(name)) return i;
    return -1;
  }

  @Test
  void everyFieldIsSettableByName() {
    Config defaults = Config.builder().build();
    for (Config.Field f : Config.FIELDS) {
      String value = otherValue(f);
      Config c = Config.builder().set(f.name(), value).build();
      assertNotEquals(f.defaultValue(), c.get(f.name()), f.name());
      if (f.type() == Config.Type.FLOAT)
        assertEquals(Float.parseFloat(value), Float.parseFloat(c.get(f.name())), f.name());
      else
        assertEquals(value, c.get(f.name()), f.name());
      for (Config.Field g : Config.FIELDS)
        if (g != f) assertEquals(defaults.get(g.name()), c.get(g.name()), f.name() + " changed " + g.name());
      // The same through a typed Java value, and through the C struct and back.
      Object typed;
      switch (f.type()) {
        case BOOL: typed = Boolean.parseBoolean(value); break;
        case FLOAT: typed = Float.parseFloat(value); break;
        case ENUM: typed = value; break;
        default: typed = Long.parseLong(value);
      }
      Config t = Config.builder().set(f.name(), typed).build();
      assertEquals(c, t, f.name());
    }
  }

  @Test
  void setByNameTakesTheLibrarysSpellings() {
    Config c = Config.builder(8, 16).set("dtype", "bf16").set("activation", Activation.GEGLU)
        .set("routing", "expert-choice").set("capacity_factor", 1.25).set("seed", -1L)
        .set("normalize_topk", false).build();
    assertEquals(DType.BF16, c.dtype());
    assertEquals("bfloat16", c.get("dtype"));
    assertEquals(Activation.GEGLU, c.activation());
    assertEquals(Routing.EXPERT_CHOICE, c.routing());
    assertEquals(1.25f, c.capacityFactor());
    assertEquals("18446744073709551615", c.get("seed"));
    assertFalse(c.normalizeTopK());
    assertEquals(0.01f, Config.builder().set("aux_loss_coef", 0.01).build().auxLossCoef());
    assertEquals("0.01", Config.builder().auxLossCoef(0.01f).build().get("aux_loss_coef"));
    try (Layer l = c.createLayer()) {
      assertEquals(c, l.config());
    }
  }

  @Test
  void badNamesAndValuesNameTheFieldAndLeaveTheBuilderUnchanged() {
    Config.Builder b = Config.builder(8, 16);
    Config before = b.build();
    MoeException e = assertThrows(MoeException.class, () -> b.set("d_modle", 8));
    assertEquals(Status.INVALID_ARGUMENT, e.getStatus());
    assertTrue(e.getLibraryMessage().contains("d_modle") && e.getLibraryMessage().contains("d_model"), e.getMessage());
    e = assertThrows(MoeException.class, () -> b.set("activation", "swish"));
    assertEquals(Status.INVALID_ARGUMENT, e.getStatus());
    assertTrue(e.getLibraryMessage().contains("activation='swish' is not one of 'swiglu', 'geglu'"), e.getMessage());
    e = assertThrows(MoeException.class, () -> b.set("top_k", "two"));
    assertTrue(e.getLibraryMessage().contains("top_k='two'"), e.getMessage());
    e = assertThrows(MoeException.class, () -> b.set("top_k", null));
    assertEquals(Status.INVALID_ARGUMENT, e.getStatus());
    e = assertThrows(MoeException.class, () -> b.set("capacity_factor", Float.NaN));
    assertTrue(e.getLibraryMessage().contains("capacity_factor"), e.getMessage());
    e = assertThrows(MoeException.class, () -> b.set("dtype", DType.BF16.toString() + "x"));
    assertTrue(e.getLibraryMessage().contains("'float32', 'bfloat16', 'float16'"), e.getMessage());
    assertThrows(MoeException.class, () -> Config.builder().build().get("nope"));
    assertEquals(before, b.build(), "a refused set changes nothing");
  }
}
