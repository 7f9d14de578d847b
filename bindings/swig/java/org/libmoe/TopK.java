package org.libmoe;

/**
 * Token-choice routing decisions, {@code [tokens, k]} each in choice order; a slot dropped by
 * capacity has expert -1 and weight 0.
 *
 * @param k slots per token
 * @param expertIds the chosen experts
 * @param weights their routing weights
 */
public record TopK(int k, int[] expertIds, float[] weights) {
  /** Number of tokens. */
  public int numTokens() {
    return k == 0 ? 0 : expertIds.length / k;
  }
}
