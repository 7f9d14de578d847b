package org.libmoe;

/**
 * Storage type of the activations and of the expert weights; host copies of parameters are always
 * float32 (values pinned by moe.h).
 */
public enum DType {
  /** float32 */
  F32(0, 4),
  /** bfloat16: the upper 16 bits of a float32 */
  BF16(1, 2),
  /** IEEE binary16 */
  F16(2, 2);

  private final int code;
  private final int size;

  DType(int code, int size) {
    this.code = code;
    this.size = size;
  }

  /** The C value. */
  public int code() {
    return code;
  }

  /** Bytes per element. */
  public int size() {
    return size;
  }

  /** The constant of a C value; throws MoeException (INTERNAL) for a value this version does not know. */
  public static DType fromCode(int code) {
    for (DType v : values()) {
      if (v.code == code) return v;
    }
    throw new MoeException(Status.INTERNAL, "unknown DType value " + code);
  }

  /** The float32 value of one 16-bit element of this type (BF16 or F16), exactly. */
  public float toFloat(short bits) {
    int b = bits & 0xffff;
    switch (this) {
      case BF16:
        return Float.intBitsToFloat(b << 16);
      case F16:
        {
          int sign = (b & 0x8000) << 16;
          int exp = (b >>> 10) & 0x1f;
          int man = b & 0x3ff;
          if (exp == 0x1f) return Float.intBitsToFloat(sign | 0x7f800000 | (man << 13));
          if (exp != 0) return Float.intBitsToFloat(sign | ((exp + 112) << 23) | (man << 13));
          float v = man * 0x1p-24f; // subnormal (or zero): man * 2^-24, exact in float32
          return sign != 0 ? -v : v;
        }
      default:
        throw Layer.invalid("toFloat: F32 elements are floats already");
    }
  }

  /** The 16-bit element of this type (BF16 or F16) nearest to v, ties to even, as libmoe rounds. */
  public short fromFloat(float v) {
    int f = Float.floatToRawIntBits(v);
    switch (this) {
      case BF16:
        {
          if (Float.isNaN(v)) return (short) ((f >>> 16) | 0x40);
          int rounded = f + 0x7fff + ((f >>> 16) & 1);
          return (short) (rounded >>> 16);
        }
      case F16:
        {
          int sign = (f >>> 16) & 0x8000;
          float a = Math.abs(v);
          if (Float.isNaN(v)) return (short) (sign | 0x7e00);
          if (a >= 65520f) return (short) (sign | 0x7c00); // rounds to infinity
          if (a < 0x1p-14f) {
            // subnormal: a multiple of 2^-24, rounded to nearest even by Math.rint
            return (short) (sign | (int) Math.rint(a * 0x1p24f));
          }
          int bits = Float.floatToRawIntBits(a);
          int exp = (bits >>> 23) - 112;
          int man = bits & 0x7fffff;
          int h = (exp << 10) | (man >>> 13);
          int rest = man & 0x1fff;
          if (rest > 0x1000 || (rest == 0x1000 && (h & 1) != 0)) h++; // carries into the exponent correctly
          return (short) (sign | h);
        }
      default:
        throw Layer.invalid("fromFloat: F32 elements are floats already");
    }
  }
}
