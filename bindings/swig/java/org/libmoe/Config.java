package org.libmoe;

import java.util.List;
import org.libmoe.jni.MoeNative;
import org.libmoe.jni.moe_config;

/**
 * Everything that defines a layer ({@code moe_config} without its struct_size and comm): an
 * immutable value made by a {@link Builder}.
 *
 * <pre>{@code
 * Config cfg = Config.builder(512, 1024).numExperts(16).topK(2).seed(7).build();
 * Config sw = Config.preset("switch").dModel(512).dFF(2048).build();
 * try (Layer layer = new Layer(cfg)) { ... }
 * }</pre>
 *
 * A builder starts from the library's defaults ({@code moe_config_init}) or from a preset
 * ({@code moe_config_preset}); the meaning of each field is documented in moe.h. Values are
 * checked by the library when a layer is created.
 */
public final class Config {
  /** The names accepted by {@link #preset(String)}. */
  public static final List<String> PRESETS =
      List.of("mixtral", "switch", "shazeer", "expert-choice", "deepseek-v3", "qwen2-moe", "qwen3-moe", "olmoe");

  private final long dModel;
  private final long dFF;
  private final long numExperts;
  private final long topK;
  private final Activation activation;
  private final Routing routing;
  private final Score score;
  private final boolean normalizeTopK;
  private final float routedScale;
  private final long numGroups;
  private final long topKGroups;
  private final float capacityFactor;
  private final DropPolicy dropPolicy;
  private final Noise noise;
  private final float noiseEps;
  private final float auxLossCoef;
  private final float zLossCoef;
  private final float importanceLossCoef;
  private final float loadLossCoef;
  private final float biasUpdateRate;
  private final long numSharedExperts;
  private final long dFFShared;
  private final boolean sharedGate;
  private final Device device;
  private final int deviceIndex;
  private final DType dtype;
  private final boolean allowTf32;
  private final long seed;
  private final boolean checkFinite;

  private Config(Builder b) {
    this.dModel = b.dModel;
    this.dFF = b.dFF;
    this.numExperts = b.numExperts;
    this.topK = b.topK;
    this.activation = b.activation;
    this.routing = b.routing;
    this.score = b.score;
    this.normalizeTopK = b.normalizeTopK;
    this.routedScale = b.routedScale;
    this.numGroups = b.numGroups;
    this.topKGroups = b.topKGroups;
    this.capacityFactor = b.capacityFactor;
    this.dropPolicy = b.dropPolicy;
    this.noise = b.noise;
    this.noiseEps = b.noiseEps;
    this.auxLossCoef = b.auxLossCoef;
    this.zLossCoef = b.zLossCoef;
    this.importanceLossCoef = b.importanceLossCoef;
    this.loadLossCoef = b.loadLossCoef;
    this.biasUpdateRate = b.biasUpdateRate;
    this.numSharedExperts = b.numSharedExperts;
    this.dFFShared = b.dFFShared;
    this.sharedGate = b.sharedGate;
    this.device = b.device;
    this.deviceIndex = b.deviceIndex;
    this.dtype = b.dtype;
    this.allowTf32 = b.allowTf32;
    this.seed = b.seed;
    this.checkFinite = b.checkFinite;
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

  /** A builder holding this configuration, to derive another one. */
  public Builder toBuilder() {
    Builder b = new Builder();
    b.dModel = dModel;
    b.dFF = dFF;
    b.numExperts = numExperts;
    b.topK = topK;
    b.activation = activation;
    b.routing = routing;
    b.score = score;
    b.normalizeTopK = normalizeTopK;
    b.routedScale = routedScale;
    b.numGroups = numGroups;
    b.topKGroups = topKGroups;
    b.capacityFactor = capacityFactor;
    b.dropPolicy = dropPolicy;
    b.noise = noise;
    b.noiseEps = noiseEps;
    b.auxLossCoef = auxLossCoef;
    b.zLossCoef = zLossCoef;
    b.importanceLossCoef = importanceLossCoef;
    b.loadLossCoef = loadLossCoef;
    b.biasUpdateRate = biasUpdateRate;
    b.numSharedExperts = numSharedExperts;
    b.dFFShared = dFFShared;
    b.sharedGate = sharedGate;
    b.device = device;
    b.deviceIndex = deviceIndex;
    b.dtype = dtype;
    b.allowTf32 = allowTf32;
    b.seed = seed;
    b.checkFinite = checkFinite;
    return b;
  }

  /** Creates a layer with this configuration (same as {@code new Layer(this)}). */
  public Layer createLayer() {
    return new Layer(this);
  }

  /** Model (token) width d, > 0. */
  public long dModel() {
    return dModel;
  }

  /** Hidden width of each routed expert, > 0. */
  public long dFF() {
    return dFF;
  }

  /** E, the number of routed experts (default 8). */
  public long numExperts() {
    return numExperts;
  }

  /** K, experts per token, 1 &lt;= k &lt;= E (default 2). */
  public long topK() {
    return topK;
  }

  /** Expert activation (default SWIGLU). */
  public Activation activation() {
    return activation;
  }

  /** Token choice (default) or expert choice. */
  public Routing routing() {
    return routing;
  }

  /** Router score function (default SOFTMAX). */
  public Score score() {
    return score;
  }

  /** Divide the k weights of a token by their sum (default true). */
  public boolean normalizeTopK() {
    return normalizeTopK;
  }

  /** Multiplier of every routed weight (default 1). */
  public float routedScale() {
    return routedScale;
  }

  /** G for group-limited routing, divides E; 1 = off (default). */
  public long numGroups() {
    return numGroups;
  }

  /** Groups kept per token (default 1). */
  public long topKGroups() {
    return topKGroups;
  }

  /** Capacity: &gt; 0 gives C = ceil(cf*T*k/E) slots per expert; &lt;= 0 is dropless (default 0). */
  public float capacityFactor() {
    return capacityFactor;
  }

  /** Which slots an over-full expert keeps (default POSITION). */
  public DropPolicy dropPolicy() {
    return dropPolicy;
  }

  /** Router noise in training (default NONE). */
  public Noise noise() {
    return noise;
  }

  /** Jitter half-width (default 0.01). */
  public float noiseEps() {
    return noiseEps;
  }

  /** Load-balance loss coefficient (default 0.01). */
  public float auxLossCoef() {
    return auxLossCoef;
  }

  /** Router z-loss coefficient (default 0). */
  public float zLossCoef() {
    return zLossCoef;
  }

  /** Importance loss coefficient (default 0). */
  public float importanceLossCoef() {
    return importanceLossCoef;
  }

  /** Smooth load loss coefficient (default 0). */
  public float loadLossCoef() {
    return loadLossCoef;
  }

  /** Aux-loss-free balancing step; 0 = off (default). */
  public float biasUpdateRate() {
    return biasUpdateRate;
  }

  /** S, always-on shared experts (default 0). */
  public long numSharedExperts() {
    return numSharedExperts;
  }

  /** Hidden width of each shared expert; 0 = dFF (default). */
  public long dFFShared() {
    return dFFShared;
  }

  /** Whether the shared output is scaled by sigmoid(x . shared.gate) (default false). */
  public boolean sharedGate() {
    return sharedGate;
  }

  /** CPU (default) or CUDA. */
  public Device device() {
    return device;
  }

  /** CUDA ordinal (default 0). */
  public int deviceIndex() {
    return deviceIndex;
  }

  /** Storage type of the activations (default F32). */
  public DType dtype() {
    return dtype;
  }

  /** Whether CUDA float32 GEMMs may use TF32 (default false). */
  public boolean allowTf32() {
    return allowTf32;
  }

  /** Seed of the parameter initialisation and router noise, an unsigned 64-bit value (default 0). */
  public long seed() {
    return seed;
  }

  /** Whether NaN/Inf in x and dy are refused with NONFINITE (default false). */
  public boolean checkFinite() {
    return checkFinite;
  }

  static Builder fromRaw(moe_config raw) {
    Builder b = new Builder();
    b.dModel = raw.getD_model();
    b.dFF = raw.getD_ff();
    b.numExperts = raw.getNum_experts();
    b.topK = raw.getTop_k();
    b.activation = Activation.fromCode(raw.getActivation());
    b.routing = Routing.fromCode(raw.getRouting());
    b.score = Score.fromCode(raw.getScore());
    b.normalizeTopK = raw.getNormalize_topk() != 0;
    b.routedScale = raw.getRouted_scale();
    b.numGroups = raw.getNum_groups();
    b.topKGroups = raw.getTopk_groups();
    b.capacityFactor = raw.getCapacity_factor();
    b.dropPolicy = DropPolicy.fromCode(raw.getDrop_policy());
    b.noise = Noise.fromCode(raw.getNoise());
    b.noiseEps = raw.getNoise_eps();
    b.auxLossCoef = raw.getAux_loss_coef();
    b.zLossCoef = raw.getZ_loss_coef();
    b.importanceLossCoef = raw.getImportance_loss_coef();
    b.loadLossCoef = raw.getLoad_loss_coef();
    b.biasUpdateRate = raw.getBias_update_rate();
    b.numSharedExperts = raw.getNum_shared_experts();
    b.dFFShared = raw.getD_ff_shared();
    b.sharedGate = raw.getShared_gate() != 0;
    b.device = Device.fromCode(raw.getDevice());
    b.deviceIndex = raw.getDevice_index();
    b.dtype = DType.fromCode(raw.getDtype());
    b.allowTf32 = raw.getAllow_tf32() != 0;
    b.seed = raw.getSeed();
    b.checkFinite = raw.getCheck_finite() != 0;
    return b;
  }

  /** The C struct (moe_config_init, then every field, comm NULL); the caller closes it. */
  moe_config toRaw() {
    moe_config raw = new moe_config();
    raw.setD_model(dModel);
    raw.setD_ff(dFF);
    raw.setNum_experts(numExperts);
    raw.setTop_k(topK);
    raw.setActivation(activation.code());
    raw.setRouting(routing.code());
    raw.setScore(score.code());
    raw.setNormalize_topk(normalizeTopK ? 1 : 0);
    raw.setRouted_scale(routedScale);
    raw.setNum_groups(numGroups);
    raw.setTopk_groups(topKGroups);
    raw.setCapacity_factor(capacityFactor);
    raw.setDrop_policy(dropPolicy.code());
    raw.setNoise(noise.code());
    raw.setNoise_eps(noiseEps);
    raw.setAux_loss_coef(auxLossCoef);
    raw.setZ_loss_coef(zLossCoef);
    raw.setImportance_loss_coef(importanceLossCoef);
    raw.setLoad_loss_coef(loadLossCoef);
    raw.setBias_update_rate(biasUpdateRate);
    raw.setNum_shared_experts(numSharedExperts);
    raw.setD_ff_shared(dFFShared);
    raw.setShared_gate(sharedGate ? 1 : 0);
    raw.setDevice(device.code());
    raw.setDevice_index(deviceIndex);
    raw.setDtype(dtype.code());
    raw.setAllow_tf32(allowTf32 ? 1 : 0);
    raw.setSeed(seed);
    raw.setCheck_finite(checkFinite ? 1 : 0);
    return raw;
  }

  @Override
  public boolean equals(Object other) {
    if (this == other) return true;
    if (!(other instanceof Config)) return false;
    Config o = (Config) other;
    return dModel == o.dModel
        && dFF == o.dFF
        && numExperts == o.numExperts
        && topK == o.topK
        && activation == o.activation
        && routing == o.routing
        && score == o.score
        && normalizeTopK == o.normalizeTopK
        && Float.compare(routedScale, o.routedScale) == 0
        && numGroups == o.numGroups
        && topKGroups == o.topKGroups
        && Float.compare(capacityFactor, o.capacityFactor) == 0
        && dropPolicy == o.dropPolicy
        && noise == o.noise
        && Float.compare(noiseEps, o.noiseEps) == 0
        && Float.compare(auxLossCoef, o.auxLossCoef) == 0
        && Float.compare(zLossCoef, o.zLossCoef) == 0
        && Float.compare(importanceLossCoef, o.importanceLossCoef) == 0
        && Float.compare(loadLossCoef, o.loadLossCoef) == 0
        && Float.compare(biasUpdateRate, o.biasUpdateRate) == 0
        && numSharedExperts == o.numSharedExperts
        && dFFShared == o.dFFShared
        && sharedGate == o.sharedGate
        && device == o.device
        && deviceIndex == o.deviceIndex
        && dtype == o.dtype
        && allowTf32 == o.allowTf32
        && seed == o.seed
        && checkFinite == o.checkFinite;
  }

  @Override
  public int hashCode() {
    return java.util.Objects.hash(
        dModel,
        dFF,
        numExperts,
        topK,
        activation,
        routing,
        score,
        normalizeTopK,
        routedScale,
        numGroups,
        topKGroups,
        capacityFactor,
        dropPolicy,
        noise,
        noiseEps,
        auxLossCoef,
        zLossCoef,
        importanceLossCoef,
        loadLossCoef,
        biasUpdateRate,
        numSharedExperts,
        dFFShared,
        sharedGate,
        device,
        deviceIndex,
        dtype,
        allowTf32,
        seed,
        checkFinite);
  }

  @Override
  public String toString() {
    return "Config[dModel=" + dModel
        + ", dFF=" + dFF
        + ", numExperts=" + numExperts
        + ", topK=" + topK
        + ", activation=" + activation
        + ", routing=" + routing
        + ", score=" + score
        + ", normalizeTopK=" + normalizeTopK
        + ", routedScale=" + routedScale
        + ", numGroups=" + numGroups
        + ", topKGroups=" + topKGroups
        + ", capacityFactor=" + capacityFactor
        + ", dropPolicy=" + dropPolicy
        + ", noise=" + noise
        + ", noiseEps=" + noiseEps
        + ", auxLossCoef=" + auxLossCoef
        + ", zLossCoef=" + zLossCoef
        + ", importanceLossCoef=" + importanceLossCoef
        + ", loadLossCoef=" + loadLossCoef
        + ", biasUpdateRate=" + biasUpdateRate
        + ", numSharedExperts=" + numSharedExperts
        + ", dFFShared=" + dFFShared
        + ", sharedGate=" + sharedGate
        + ", device=" + device
        + ", deviceIndex=" + deviceIndex
        + ", dtype=" + dtype
        + ", allowTf32=" + allowTf32
        + ", seed=" + Long.toUnsignedString(seed)
        + ", checkFinite=" + checkFinite
        + "]";
  }

  /** Fluent builder of a {@link Config}, from {@link Config#builder()} or {@link Config#preset}. */
  public static final class Builder {
    private long dModel;
    private long dFF;
    private long numExperts;
    private long topK;
    private Activation activation;
    private Routing routing;
    private Score score;
    private boolean normalizeTopK;
    private float routedScale;
    private long numGroups;
    private long topKGroups;
    private float capacityFactor;
    private DropPolicy dropPolicy;
    private Noise noise;
    private float noiseEps;
    private float auxLossCoef;
    private float zLossCoef;
    private float importanceLossCoef;
    private float loadLossCoef;
    private float biasUpdateRate;
    private long numSharedExperts;
    private long dFFShared;
    private boolean sharedGate;
    private Device device;
    private int deviceIndex;
    private DType dtype;
    private boolean allowTf32;
    private long seed;
    private boolean checkFinite;

    private Builder() {}

    /** Model (token) width d, > 0. */
    public Builder dModel(long value) {
      this.dModel = value;
      return this;
    }

    /** Hidden width of each routed expert, > 0. */
    public Builder dFF(long value) {
      this.dFF = value;
      return this;
    }

    /** E, the number of routed experts (default 8). */
    public Builder numExperts(long value) {
      this.numExperts = value;
      return this;
    }

    /** K, experts per token, 1 &lt;= k &lt;= E (default 2). */
    public Builder topK(long value) {
      this.topK = value;
      return this;
    }

    /** Expert activation (default SWIGLU). */
    public Builder activation(Activation value) {
      this.activation = java.util.Objects.requireNonNull(value, "activation");
      return this;
    }

    /** Token choice (default) or expert choice. */
    public Builder routing(Routing value) {
      this.routing = java.util.Objects.requireNonNull(value, "routing");
      return this;
    }

    /** Router score function (default SOFTMAX). */
    public Builder score(Score value) {
      this.score = java.util.Objects.requireNonNull(value, "score");
      return this;
    }

    /** Divide the k weights of a token by their sum (default true). */
    public Builder normalizeTopK(boolean value) {
      this.normalizeTopK = value;
      return this;
    }

    /** Multiplier of every routed weight (default 1). */
    public Builder routedScale(float value) {
      this.routedScale = value;
      return this;
    }

    /** G for group-limited routing, divides E; 1 = off (default). */
    public Builder numGroups(long value) {
      this.numGroups = value;
      return this;
    }

    /** Groups kept per token (default 1). */
    public Builder topKGroups(long value) {
      this.topKGroups = value;
      return this;
    }

    /** Capacity: &gt; 0 gives C = ceil(cf*T*k/E) slots per expert; &lt;= 0 is dropless (default 0). */
    public Builder capacityFactor(float value) {
      this.capacityFactor = value;
      return this;
    }

    /** Which slots an over-full expert keeps (default POSITION). */
    public Builder dropPolicy(DropPolicy value) {
      this.dropPolicy = java.util.Objects.requireNonNull(value, "dropPolicy");
      return this;
    }

    /** Router noise in training (default NONE). */
    public Builder noise(Noise value) {
      this.noise = java.util.Objects.requireNonNull(value, "noise");
      return this;
    }

    /** Jitter half-width (default 0.01). */
    public Builder noiseEps(float value) {
      this.noiseEps = value;
      return this;
    }

    /** Load-balance loss coefficient (default 0.01). */
    public Builder auxLossCoef(float value) {
      this.auxLossCoef = value;
      return this;
    }

    /** Router z-loss coefficient (default 0). */
    public Builder zLossCoef(float value) {
      this.zLossCoef = value;
      return this;
    }

    /** Importance loss coefficient (default 0). */
    public Builder importanceLossCoef(float value) {
      this.importanceLossCoef = value;
      return this;
    }

    /** Smooth load loss coefficient (default 0). */
    public Builder loadLossCoef(float value) {
      this.loadLossCoef = value;
      return this;
    }

    /** Aux-loss-free balancing step; 0 = off (default). */
    public Builder biasUpdateRate(float value) {
      this.biasUpdateRate = value;
      return this;
    }

    /** S, always-on shared experts (default 0). */
    public Builder numSharedExperts(long value) {
      this.numSharedExperts = value;
      return this;
    }

    /** Hidden width of each shared expert; 0 = dFF (default). */
    public Builder dFFShared(long value) {
      this.dFFShared = value;
      return this;
    }

    /** Whether the shared output is scaled by sigmoid(x . shared.gate) (default false). */
    public Builder sharedGate(boolean value) {
      this.sharedGate = value;
      return this;
    }

    /** CPU (default) or CUDA. */
    public Builder device(Device value) {
      this.device = java.util.Objects.requireNonNull(value, "device");
      return this;
    }

    /** CUDA ordinal (default 0). */
    public Builder deviceIndex(int value) {
      this.deviceIndex = value;
      return this;
    }

    /** Storage type of the activations (default F32). */
    public Builder dtype(DType value) {
      this.dtype = java.util.Objects.requireNonNull(value, "dtype");
      return this;
    }

    /** Whether CUDA float32 GEMMs may use TF32 (default false). */
    public Builder allowTf32(boolean value) {
      this.allowTf32 = value;
      return this;
    }

    /** Seed of the parameter initialisation and router noise, an unsigned 64-bit value (default 0). */
    public Builder seed(long value) {
      this.seed = value;
      return this;
    }

    /** Whether NaN/Inf in x and dy are refused with NONFINITE (default false). */
    public Builder checkFinite(boolean value) {
      this.checkFinite = value;
      return this;
    }

    /** The immutable configuration. */
    public Config build() {
      return new Config(this);
    }

    /** Shortcut for {@code new Layer(build())}. */
    public Layer createLayer() {
      return new Layer(build());
    }
  }
}
