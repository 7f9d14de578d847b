package org.libmoe;

import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.Collections;
import java.util.HashMap;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import org.libmoe.jni.MoeNative;
import org.libmoe.jni.moe_config;
import org.libmoe.jni.moe_config_field_info;

/**
 * Everything that defines a layer ({@code moe_config} without its struct_size and comm): an
 * immutable value made by a {@link Builder}.
 *
 * <pre>{@code
 * Config cfg = Config.builder(512, 1024).numExperts(16).topK(2).seed(7).build();
 * Config sw = Config.preset("switch").dModel(512).dFF(2048).build();
 * Config c = Config.builder(512, 1024).set("dtype", "bf16").set("capacity_factor", 1.25f).build();
 * try (Layer layer = new Layer(cfg)) { ... }
 * }</pre>
 *
 * The fields, their types, defaults and enum names come from the library's own table ({@link
 * #FIELDS}, {@code moe_config_field}); each value is held as its canonical text ({@code
 * moe_config_get}), and {@link Builder#set(String, Object)} sets any field by its moe.h name
 * through {@code moe_config_set}, which checks the value's form at once. The typed accessors are
 * shorthands for the fields this class knows; a field added to moe.h later is reached by name.
 * How fields fit together is checked by the library when a layer is created.
 */
public final class Config {
  /** How a field is stored (the values of {@code moe_config_type}, in order). */
  public enum Type {
    INT64,
    INT,
    BOOL,
    FLOAT,
    UINT64,
    ENUM,
    POINTER
  }

  /**
   * One field of {@code moe_config} as the library describes it.
   *
   * @param name its name in moe.h, e.g. "top_k"
   * @param type how it is stored
   * @param defaultValue the canonical text of its default
   * @param values for an ENUM, its names in the order of their C values; empty otherwise
   * @param description one line: meaning, units, range
   */
  public record Field(String name, Type type, String defaultValue, List<String> values, String description) {}

  /** Every field a Java caller can set, in header order (the comm pointer is not among them). */
  public static final List<Field> FIELDS;

  /** The names accepted by {@link #preset(String)}, in the library's order. */
  public static final List<String> PRESETS;

  private static final Map<String, Integer> INDEX = new HashMap<>();

  static {
    List<Field> fields = new ArrayList<>();
    try (moe_config_field_info info = new moe_config_field_info()) {
      for (int i = 0; i < MoeNative.moe_config_num_fields(); i++) {
        MoeNative.moe_config_field(i, info);
        int t = info.getType();
        if (t < 0 || t >= Type.values().length || Type.values()[t] == Type.POINTER) continue; // not settable here
        Type type = Type.values()[t];
        List<String> names = new ArrayList<>();
        for (int v = 0; v < info.getNum_values(); v++) names.add(info.value_name(v));
        INDEX.put(info.getName(), fields.size());
        fields.add(new Field(info.getName(), type, info.getDefault_value(), List.copyOf(names), info.getDescription()));
      }
    }
    FIELDS = List.copyOf(fields);
    List<String> presets = new ArrayList<>();
    for (int i = 0; i < MoeNative.moe_config_num_presets(); i++) presets.add(MoeNative.moe_config_preset_name(i));
    PRESETS = List.copyOf(presets);
  }

  private final String[] values; // canonical text, by index in FIELDS

  private Config(String[] values) {
    this.values = values.clone();
  }

  /** A builder with the library defaults and the two widths set. */
  public static Builder builder(long dModel, long dFF) {
    return builder().dModel(dModel).dFF(dFF);
  }

  /** A builder with the library defaults; dModel and dFF are 0 and must be set. */
  public static Builder builder() {
    try (moe_config raw = new moe_config()) { // the constructor runs moe_config_init
      return fromRaw(raw);
    }
  }

  /**
   * A builder with the routing recipe of a published model ({@link #PRESETS}); the widths are 0
   * and must be set, numExperts and topK may be changed.
   *
   * @throws MoeException INVALID_ARGUMENT for an unknown name, UNSUPPORTED for a preset whose
   *     routing this build lacks
   */
  public static Builder preset(String name) {
    if (name == null) throw new MoeException(Status.INVALID_ARGUMENT, "preset name is null");
    if (name.indexOf('\0') >= 0)
      throw new MoeException(Status.INVALID_ARGUMENT, "preset name contains a NUL character");
    try (moe_config raw = new moe_config()) {
      MoeNative.moe_config_preset(raw, name);
      return fromRaw(raw);
    }
  }

  /** Each preset's name and its one-line description (model, source, the fields it sets). */
  public static Map<String, String> presetDescriptions() {
    Map<String, String> out = new LinkedHashMap<>();
    for (int i = 0; i < MoeNative.moe_config_num_presets(); i++)
      out.put(MoeNative.moe_config_preset_name(i), MoeNative.moe_config_preset_description(i));
    return Collections.unmodifiableMap(out);
  }

  /** A builder holding this configuration, to derive another one. */
  public Builder toBuilder() {
    return new Builder(values);
  }

  /** Creates a layer with this configuration (same as {@code new Layer(this)}). */
  public Layer createLayer() {
    return new Layer(this);
  }

  /**
   * The canonical text of field name ("swiglu", "0.01", "18446744073709551615", "true").
   *
   * @throws MoeException INVALID_ARGUMENT for a name that is not in {@link #FIELDS}
   */
  public String get(String name) {
    return values[index(name)];
  }

  // ---- typed shorthands (the meaning, range and default of each field are in moe.h) ------------
  /** Model (token) width d, > 0. */
  public long dModel() { return Long.parseLong(get("d_model")); }
  /** Hidden width of each routed expert, > 0. */
  public long dFF() { return Long.parseLong(get("d_ff")); }
  /** E, the number of routed experts (default 8). */
  public long numExperts() { return Long.parseLong(get("num_experts")); }
  /** K, experts per token, 1 &lt;= k &lt;= E (default 2). */
  public long topK() { return Long.parseLong(get("top_k")); }
  /** Expert activation (default SWIGLU). */
  public Activation activation() { return Activation.fromCode(code("activation")); }
  /** Token choice (default) or expert choice. */
  public Routing routing() { return Routing.fromCode(code("routing")); }
  /** Router score function (default SOFTMAX). */
  public Score score() { return Score.fromCode(code("score")); }
  /** Divide the k weights of a token by their sum (default true). */
  public boolean normalizeTopK() { return flag("normalize_topk"); }
  /** Multiplier of every routed weight (default 1). */
  public float routedScale() { return Float.parseFloat(get("routed_scale")); }
  /** G for group-limited routing, divides E; 1 = off (default). */
  public long numGroups() { return Long.parseLong(get("num_groups")); }
  /** Groups kept per token (default 1). */
  public long topKGroups() { return Long.parseLong(get("topk_groups")); }
  /** Capacity: &gt; 0 gives C = ceil(cf*T*k/E) slots per expert; &lt;= 0 is dropless (default 0). */
  public float capacityFactor() { return Float.parseFloat(get("capacity_factor")); }
  /** Which slots an over-full expert keeps (default POSITION). */
  public DropPolicy dropPolicy() { return DropPolicy.fromCode(code("drop_policy")); }
  /** Router noise in training (default NONE). */
  public Noise noise() { return Noise.fromCode(code("noise")); }
  /** Jitter half-width (default 0.01). */
  public float noiseEps() { return Float.parseFloat(get("noise_eps")); }
  /** Load-balance loss coefficient (default 0.01). */
  public float auxLossCoef() { return Float.parseFloat(get("aux_loss_coef")); }
  /** Router z-loss coefficient (default 0). */
  public float zLossCoef() { return Float.parseFloat(get("z_loss_coef")); }
  /** Importance loss coefficient (default 0). */
  public float importanceLossCoef() { return Float.parseFloat(get("importance_loss_coef")); }
  /** Smooth load loss coefficient (default 0). */
  public float loadLossCoef() { return Float.parseFloat(get("load_loss_coef")); }
  /** Aux-loss-free balancing step; 0 = off (default). */
  public float biasUpdateRate() { return Float.parseFloat(get("bias_update_rate")); }
  /** S, always-on shared experts (default 0). */
  public long numSharedExperts() { return Long.parseLong(get("num_shared_experts")); }
  /** Hidden width of each shared expert; 0 = dFF (default). */
  public long dFFShared() { return Long.parseLong(get("d_ff_shared")); }
  /** Whether the shared output is scaled by sigmoid(x . shared.gate) (default false). */
  public boolean sharedGate() { return flag("shared_gate"); }
  /** CPU (default) or CUDA. */
  public Device device() { return Device.fromCode(code("device")); }
  /** CUDA ordinal (default 0). */
  public int deviceIndex() { return Integer.parseInt(get("device_index")); }
  /** Storage type of the activations (default F32). */
  public DType dtype() { return DType.fromCode(code("dtype")); }
  /** Whether CUDA float32 GEMMs may use TF32 (default false). */
  public boolean allowTf32() { return flag("allow_tf32"); }
  /** Seed of the parameter initialisation and router noise, an unsigned 64-bit value (default 0). */
  public long seed() { return Long.parseUnsignedLong(get("seed")); }
  /** Whether NaN/Inf in x and dy are refused with NONFINITE (default false). */
  public boolean checkFinite() { return flag("check_finite"); }

  private boolean flag(String name) {
    return get(name).equals("true");
  }

  private int code(String name) {
    int code = FIELDS.get(index(name)).values().indexOf(get(name));
    return code >= 0 ? code : Integer.parseInt(get(name)); // a value without a name reads as its number
  }

  private static int index(String name) {
    Integer i = name == null ? null : INDEX.get(name);
    if (i == null) {
      List<String> names = new ArrayList<>();
      for (Field f : FIELDS) names.add(f.name());
      throw new MoeException(Status.INVALID_ARGUMENT,
          "name: Config has no field '" + name + "' (the fields are: " + String.join(", ", names) + ")");
    }
    return i;
  }

  static Builder fromRaw(moe_config raw) {
    String[] values = new String[FIELDS.size()];
    for (int i = 0; i < values.length; i++) values[i] = text(raw, FIELDS.get(i).name());
    return new Builder(values);
  }

  private static String text(moe_config raw, String name) {
    byte[] buf = new byte[MoeNative.MOE_CONFIG_VALUE_MAX];
    MoeNative.moe_config_get(raw, name, buf);
    int n = 0;
    while (n < buf.length && buf[n] != 0) n++;
    return new String(buf, 0, n, StandardCharsets.UTF_8);
  }

  /** The C struct (moe_config_init, then every field, comm NULL); the caller closes it. */
  moe_config toRaw() {
    moe_config raw = new moe_config();
    try {
      for (int i = 0; i < values.length; i++) MoeNative.moe_config_set(raw, FIELDS.get(i).name(), values[i]);
      return raw;
    } catch (RuntimeException e) {
      raw.close();
      throw e;
    }
  }

  @Override
  public boolean equals(Object other) {
    return this == other || (other instanceof Config && Arrays.equals(values, ((Config) other).values));
  }

  @Override
  public int hashCode() {
    return Arrays.hashCode(values);
  }

  /** "Config[d_model=512, d_ff=1024, ...]": every field by its moe.h name and canonical text. */
  @Override
  public String toString() {
    StringBuilder s = new StringBuilder("Config[");
    for (int i = 0; i < values.length; i++)
      s.append(i == 0 ? "" : ", ").append(FIELDS.get(i).name()).append('=').append(values[i]);
    return s.append(']').toString();
  }

  /** Fluent builder of a {@link Config}, from {@link Config#builder()} or {@link Config#preset}. */
  public static final class Builder {
    private final String[] values;

    private Builder(String[] values) {
      this.values = values.clone();
    }

    /**
     * Sets field name (its moe.h name, one of {@link #FIELDS}) to value: a String in the
     * field's text form ("bf16", "0.01", "true", "expert_choice"), a Boolean, a Number, or one of
     * this package's enums (Activation.GEGLU, DType.BF16, ...).
     *
     * @throws MoeException INVALID_ARGUMENT naming the field and what it accepts, for an unknown
     *     name or a value of the wrong form or out of range (the builder is unchanged)
     */
    public Builder set(String name, Object value) {
      int i = index(name);
      Field f = FIELDS.get(i);
      try (moe_config raw = new moe_config()) {
        MoeNative.moe_config_set(raw, name, toText(f, value));
        values[i] = text(raw, name);
      }
      return this;
    }

    private static String toText(Field f, Object value) {
      if (value == null) throw new MoeException(Status.INVALID_ARGUMENT, f.name() + ": value is null");
      if (value instanceof Boolean) return (Boolean) value ? "true" : "false";
      if (value instanceof Enum<?>) return ((Enum<?>) value).name(); // names match the C names, in any case
      if (f.type() == Type.FLOAT && value instanceof Double) return Float.toString(((Double) value).floatValue());
      if (f.type() == Type.UINT64 && value instanceof Long) return Long.toUnsignedString((Long) value);
      if (value instanceof String || value instanceof Number) return value.toString();
      throw new MoeException(Status.INVALID_ARGUMENT,
          f.name() + ": a " + value.getClass().getName() + " is not a value (give a String, Boolean, Number or enum)");
    }

    /** Model (token) width d, > 0. */
    public Builder dModel(long value) { return set("d_model", value); }
    /** Hidden width of each routed expert, > 0. */
    public Builder dFF(long value) { return set("d_ff", value); }
    /** E, the number of routed experts (default 8). */
    public Builder numExperts(long value) { return set("num_experts", value); }
    /** K, experts per token, 1 &lt;= k &lt;= E (default 2). */
    public Builder topK(long value) { return set("top_k", value); }
    /** Expert activation (default SWIGLU). */
    public Builder activation(Activation value) { return set("activation", nonNull(value, "activation")); }
    /** Token choice (default) or expert choice. */
    public Builder routing(Routing value) { return set("routing", nonNull(value, "routing")); }
    /** Router score function (default SOFTMAX). */
    public Builder score(Score value) { return set("score", nonNull(value, "score")); }
    /** Divide the k weights of a token by their sum (default true). */
    public Builder normalizeTopK(boolean value) { return set("normalize_topk", value); }
    /** Multiplier of every routed weight (default 1). */
    public Builder routedScale(float value) { return set("routed_scale", value); }
    /** G for group-limited routing, divides E; 1 = off (default). */
    public Builder numGroups(long value) { return set("num_groups", value); }
    /** Groups kept per token (default 1). */
    public Builder topKGroups(long value) { return set("topk_groups", value); }
    /** Capacity: &gt; 0 gives C = ceil(cf*T*k/E) slots per expert; &lt;= 0 is dropless (default 0). */
    public Builder capacityFactor(float value) { return set("capacity_factor", value); }
    /** Which slots an over-full expert keeps (default POSITION). */
    public Builder dropPolicy(DropPolicy value) { return set("drop_policy", nonNull(value, "dropPolicy")); }
    /** Router noise in training (default NONE). */
    public Builder noise(Noise value) { return set("noise", nonNull(value, "noise")); }
    /** Jitter half-width (default 0.01). */
    public Builder noiseEps(float value) { return set("noise_eps", value); }
    /** Load-balance loss coefficient (default 0.01). */
    public Builder auxLossCoef(float value) { return set("aux_loss_coef", value); }
    /** Router z-loss coefficient (default 0). */
    public Builder zLossCoef(float value) { return set("z_loss_coef", value); }
    /** Importance loss coefficient (default 0). */
    public Builder importanceLossCoef(float value) { return set("importance_loss_coef", value); }
    /** Smooth load loss coefficient (default 0). */
    public Builder loadLossCoef(float value) { return set("load_loss_coef", value); }
    /** Aux-loss-free balancing step; 0 = off (default). */
    public Builder biasUpdateRate(float value) { return set("bias_update_rate", value); }
    /** S, always-on shared experts (default 0). */
    public Builder numSharedExperts(long value) { return set("num_shared_experts", value); }
    /** Hidden width of each shared expert; 0 = dFF (default). */
    public Builder dFFShared(long value) { return set("d_ff_shared", value); }
    /** Whether the shared output is scaled by sigmoid(x . shared.gate) (default false). */
    public Builder sharedGate(boolean value) { return set("shared_gate", value); }
    /** CPU (default) or CUDA. */
    public Builder device(Device value) { return set("device", nonNull(value, "device")); }
    /** CUDA ordinal (default 0). */
    public Builder deviceIndex(int value) { return set("device_index", value); }
    /** Storage type of the activations (default F32). */
    public Builder dtype(DType value) { return set("dtype", nonNull(value, "dtype")); }
    /** Whether CUDA float32 GEMMs may use TF32 (default false). */
    public Builder allowTf32(boolean value) { return set("allow_tf32", value); }
    /** Seed of the parameter initialisation and router noise, an unsigned 64-bit value (default 0). */
    public Builder seed(long value) { return set("seed", value); }
    /** Whether NaN/Inf in x and dy are refused with NONFINITE (default false). */
    public Builder checkFinite(boolean value) { return set("check_finite", value); }

    private static <T> T nonNull(T value, String what) {
      return java.util.Objects.requireNonNull(value, what);
    }

    /** The immutable configuration. */
    public Config build() {
      return new Config(values);
    }

    /** Shortcut for {@code new Layer(build())}. */
    public Layer createLayer() {
      return new Layer(build());
    }
  }
}
