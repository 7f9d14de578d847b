package org.libmoe;

import java.util.Arrays;

/**
 * One named parameter tensor, PyTorch nn.Linear layout ({@code [out, in]}, row-major).
 *
 * @param name e.g. "router.weight", "experts.w1"
 * @param shape 1 to 3 dimensions
 * @param trainable false for router.bias (changed by bias balancing, never by gradients)
 */
public record ParamInfo(String name, long[] shape, boolean trainable) {
  public ParamInfo {
    shape = shape.clone();
  }

  /** The dimensions (a copy). */
  @Override
  public long[] shape() {
    return shape.clone();
  }

  /** Number of float32 elements. */
  public long numel() {
    long n = 1;
    for (long d : shape) n *= d;
    return n;
  }

  @Override
  public boolean equals(Object o) {
    return o instanceof ParamInfo p
        && p.name.equals(name)
        && Arrays.equals(p.shape, shape)
        && p.trainable == trainable;
  }

  @Override
  public int hashCode() {
    return name.hashCode() * 31 + Arrays.hashCode(shape) + (trainable ? 1 : 0);
  }

  @Override
  public String toString() {
    return name + Arrays.toString(shape) + (trainable ? "" : " (not trainable)");
  }
}
