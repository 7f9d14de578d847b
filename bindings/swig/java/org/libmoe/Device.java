package org.libmoe;

/** Where a layer's activations and parameters live (values pinned by moe.h). */
public enum Device {
  /** host memory, BLAS + OpenMP */
  CPU(0),
  /** a CUDA device (the CUDA module of libmoe) */
  CUDA(1);

  private final int code;

  Device(int code) {
    this.code = code;
  }

  /** The C value. */
  public int code() {
    return code;
  }

  /** The constant of a C value; throws MoeException (INTERNAL) for a value this version does not know. */
  public static Device fromCode(int code) {
    for (Device v : values()) {
      if (v.code == code) return v;
    }
    throw new MoeException(Status.INTERNAL, "unknown Device value " + code);
  }
}
