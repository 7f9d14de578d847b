package org.libmoe;

import org.libmoe.jni.MoeNative;
import org.libmoe.jni.MoeNativeConstants;

/** Library-wide information. */
public final class Moe {
  /** MOE_VERSION_NUMBER of the header this binding was generated from (MAJOR*10000 + MINOR*100 + PATCH). */
  public static final int HEADER_VERSION = MoeNativeConstants.MOE_VERSION_NUMBER;

  private Moe() {}

  /** MAJOR*10000 + MINOR*100 + PATCH of the libmoe actually loaded. */
  public static int version() {
    return (int) MoeNative.moe_version();
  }

  /** "MAJOR.MINOR.PATCH" of the libmoe actually loaded. */
  public static String versionString() {
    int v = version();
    return (v / 10000) + "." + (v / 100 % 100) + "." + (v % 100);
  }

  /** The library's name of a status (moe_status_name), e.g. "MOE_ERR_STATE". */
  public static String statusName(Status s) {
    return MoeNative.moe_status_name(s.code());
  }

  /** Where the JNI library was loaded from (see {@link NativeLoader}). */
  public static String nativeSource() {
    NativeLoader.load();
    return NativeLoader.source();
  }
}
