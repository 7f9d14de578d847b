package org.libmoe;

/** Router score function (values pinned by moe.h). */
public enum Score {
  /** softmax over the experts */
  SOFTMAX(0),
  /** sigmoid of each logit */
  SIGMOID(1);

  private final int code;

  Score(int code) {
    this.code = code;
  }

  /** The C value. */
  public int code() {
    return code;
  }

  /** The constant of a C value; throws MoeException (INTERNAL) for a value this version does not know. */
  public static Score fromCode(int code) {
    for (Score v : values()) {
      if (v.code == code) return v;
    }
    throw new MoeException(Status.INTERNAL, "unknown Score value " + code);
  }
}
