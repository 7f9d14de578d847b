package org.libmoe;

/** Router noise in training (values pinned by moe.h). */
public enum Noise {
  /** no noise */
  NONE(0),
  /** learned Gaussian noise (Shazeer et al.) */
  GAUSSIAN(1),
  /** multiplicative jitter in [1-eps, 1+eps] */
  JITTER(2);

  private final int code;

  Noise(int code) {
    this.code = code;
  }

  /** The C value. */
  public int code() {
    return code;
  }

  /** The constant of a C value; throws MoeException (INTERNAL) for a value this version does not know. */
  public static Noise fromCode(int code) {
    for (Noise v : values()) {
      if (v.code == code) return v;
    }
    throw new MoeException(Status.INTERNAL, "unknown Noise value " + code);
  }
}
