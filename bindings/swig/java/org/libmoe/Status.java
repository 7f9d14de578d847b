package org.libmoe;

/** Why a libmoe call failed: {@code moe_status} without {@code MOE_OK} (values pinned by moe.h). */
public enum Status {
  /** A null argument, a size out of range, a name that does not exist, a buffer of the wrong size. */
  INVALID_ARGUMENT(1),
  /** A host or device allocation failed; nothing was changed. */
  OUT_OF_MEMORY(2),
  /** A feature this build or this backend does not provide. */
  UNSUPPORTED(3),
  /** The CUDA runtime or a kernel failed, or no usable device. */
  DEVICE(4),
  /** A communicator hook returned an error. */
  COMM(5),
  /** A call out of order, e.g. backward without a training forward, or a closed layer. */
  STATE(6),
  /** check_finite found NaN or Inf in an input. */
  NONFINITE(7),
  /** A bug in libmoe. */
  INTERNAL(8),
  /** A status this version of the binding does not know (a newer library). */
  UNKNOWN(-1);

  private final int code;

  Status(int code) {
    this.code = code;
  }

  /** The C value ({@code -1} for UNKNOWN). */
  public int code() {
    return code;
  }

  /** The library's name of the status, e.g. {@code "MOE_ERR_INVALID_ARGUMENT"}. */
  public String statusName() {
    return this == UNKNOWN ? "MOE_ERR_UNKNOWN" : "MOE_ERR_" + name();
  }

  /** The constant of a C value; UNKNOWN for values outside the enum. */
  public static Status fromCode(int code) {
    for (Status s : values()) {
      if (s.code == code && s != UNKNOWN) return s;
    }
    return UNKNOWN;
  }
}
