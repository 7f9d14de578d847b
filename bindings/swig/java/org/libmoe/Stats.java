package org.libmoe;

/**
 * Routing statistics of the forward or route held by a context ({@code moe_stats}).
 *
 * @param numTokens T of the forward
 * @param numSlots routing slots: T*k (token choice) or E*C (expert choice)
 * @param droppedSlots slots dropped by capacity
 * @param loadBalanceLoss load-balance loss, 1.0 when perfectly balanced
 * @param zLoss mean over tokens of logsumexp(logits)^2
 * @param importanceLoss CV^2 of per-expert gate-weight sums
 * @param loadLoss CV^2 of the smooth per-expert load (noisy routing)
 * @param auxLossTotal the coefficient-weighted sum that backward differentiates
 * @param loadCv std/mean of per-expert kept slot counts
 * @param maxLoadRatio max/mean of per-expert kept slot counts
 */
public record Stats(
    long numTokens,
    long numSlots,
    long droppedSlots,
    float loadBalanceLoss,
    float zLoss,
    float importanceLoss,
    float loadLoss,
    float auxLossTotal,
    float loadCv,
    float maxLoadRatio) {}
