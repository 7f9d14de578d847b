/**
 * Java binding of libmoe, a Mixture-of-Experts layer with a C ABI: {@link org.libmoe.Layer}
 * (AutoCloseable), {@link org.libmoe.Context}, {@link org.libmoe.Config} (builder and presets)
 * and {@link org.libmoe.MoeException} for every failure. The generated JNI classes live in
 * {@code org.libmoe.jni}; the jar loads its native library itself ({@link org.libmoe.NativeLoader}).
 */
package org.libmoe;
