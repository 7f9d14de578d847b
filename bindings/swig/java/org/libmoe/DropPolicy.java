package org.libmoe;

/** Which slots an over-full expert keeps (values pinned by moe.h). */
public enum DropPolicy {
  /** the first tokens in order */
  POSITION(0),
  /** the highest-scoring tokens */
  PROBS(1);

  private final int code;

  DropPolicy(int code) {
    this.code = code;
  }

  /** The C value. */
  public int code() {
    return code;
  }

  /** The constant of a C value; throws MoeException (INTERNAL) for a value this version does not know. */
  public static DropPolicy fromCode(int code) {
    for (DropPolicy v : values()) {
      if (v.code == code) return v;
    }
    throw new MoeException(Status.INTERNAL, "unknown DropPolicy value " + code);
  }
}
