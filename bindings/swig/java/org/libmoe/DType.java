package org.libmoe;

/** Storage type of the activations; host copies of parameters are always float32 (values pinned by moe.h). */
public enum DType {
  /** float32 */
  F32(0),
  /** bfloat16 */
  BF16(1),
  /** IEEE half */
  F16(2);

  private final int code;

  DType(int code) {
    this.code = code;
  }

  /** The C value. */
  public int code() {
    return code;
  }

  /** The constant of a C value; throws MoeException (INTERNAL) for a value this version does not know. */
  public static DType fromCode(int code) {
    for (DType v : values()) {
      if (v.code == code) return v;
    }
    throw new MoeException(Status.INTERNAL, "unknown DType value " + code);
  }
}
