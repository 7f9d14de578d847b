package org.libmoe;

/**
 * Every kept (token, expert, weight) routing assignment, ordered by expert then token: entry i is
 * ({@code token[i]}, {@code expert[i]}, {@code weight[i]}).
 *
 * @param token token index of each assignment
 * @param expert expert index of each assignment
 * @param weight routing weight of each assignment
 */
public record Assignments(int[] token, int[] expert, float[] weight) {
  /** Number of assignments. */
  public int size() {
    return token.length;
  }
}
