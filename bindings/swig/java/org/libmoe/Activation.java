package org.libmoe;

/** Expert FFN activation (values pinned by moe.h). */
public enum Activation {
  /** (silu(x W1^T) * (x W3^T)) W2^T */
  SWIGLU(0),
  /** (gelu(x W1^T) * (x W3^T)) W2^T, exact GELU */
  GEGLU(1),
  /** relu(x W1^T) W2^T */
  RELU(2),
  /** gelu(x W1^T) W2^T, exact GELU */
  GELU(3),
  /** silu(x W1^T) W2^T */
  SILU(4),
  /** gpt-oss: ((clamp(x W3^T, -l, l) + 1) * hc * sigmoid(alpha hc)) W2^T, hc = min(x W1^T, l) */
  SWIGLU_CLAMPED(5);

  private final int code;

  Activation(int code) {
    this.code = code;
  }

  /** The C value. */
  public int code() {
    return code;
  }

  /** The constant of a C value; throws MoeException (INTERNAL) for a value this version does not know. */
  public static Activation fromCode(int code) {
    for (Activation v : values()) {
      if (v.code == code) return v;
    }
    throw new MoeException(Status.INTERNAL, "unknown Activation value " + code);
  }
}
