package org.libmoe;

import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.FloatBuffer;

/** Deterministic inputs and direct buffers for the tests. */
final class TestData {
  private TestData() {}

  /** n values in [-1, 1) from a 64-bit LCG. */
  static float[] data(int n, long seed) {
    float[] v = new float[n];
    long s = seed;
    for (int i = 0; i < n; i++) {
      s = s * 6364136223846793005L + 1442695040888963407L;
      v[i] = (float) ((double) (s >>> 40) / (1L << 24) * 2.0 - 1.0);
    }
    return v;
  }

  static FloatBuffer direct(int n) {
    return ByteBuffer.allocateDirect(n * 4).order(ByteOrder.nativeOrder()).asFloatBuffer();
  }

  static FloatBuffer direct(float[] v) {
    FloatBuffer b = direct(v.length);
    b.put(v).flip();
    return b;
  }

  static float[] toArray(FloatBuffer b) {
    float[] v = new float[b.remaining()];
    b.duplicate().get(v);
    return v;
  }

  static Config.Builder small() {
    return Config.builder(16, 32).numExperts(4).topK(2).seed(3);
  }

  /** Resident set size of this process, from /proc/self/statm. */
  static long rssBytes() throws java.io.IOException {
    String statm = java.nio.file.Files.readString(java.nio.file.Path.of("/proc/self/statm"));
    return Long.parseLong(statm.trim().split("\\s+")[1]) * 4096L;
  }
}
