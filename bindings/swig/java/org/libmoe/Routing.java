package org.libmoe;

/** Who chooses (values pinned by moe.h). */
public enum Routing {
  /** each token picks its top-k experts */
  TOKEN_CHOICE(0),
  /** each expert picks its C best tokens */
  EXPERT_CHOICE(1);

  private final int code;

  Routing(int code) {
    this.code = code;
  }

  /** The C value. */
  public int code() {
    return code;
  }

  /** The constant of a C value; throws MoeException (INTERNAL) for a value this version does not know. */
  public static Routing fromCode(int code) {
    for (Routing v : values()) {
      if (v.code == code) return v;
    }
    throw new MoeException(Status.INTERNAL, "unknown Routing value " + code);
  }
}
