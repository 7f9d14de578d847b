// Random test inputs: a small deterministic generator, independent of the library's own, and the
// fills the tests draw from it. The same seed gives the same values on every machine.
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

namespace moe_test {

// splitmix64.
class Rng {
 public:
  explicit Rng(uint64_t seed) : s_(seed * 0x9e3779b97f4a7c15ULL + 0x632be59bd9b4e019ULL) {}
  uint64_t next() {
    uint64_t z = (s_ += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }
  // Uniform in [0, 1) with 53 random bits.
  double unit() { return static_cast<double>(next() >> 11) * (1.0 / 9007199254740992.0); }
  // Integer in [0, n).
  int64_t below(int64_t n) { return static_cast<int64_t>(next() % static_cast<uint64_t>(n)); }
  // Integer in [lo, hi].
  int64_t range(int64_t lo, int64_t hi) { return lo + below(hi - lo + 1); }
  // True with the given chance in percent.
  bool chance(int percent) { return below(100) < percent; }
  float uniform(float lo, float hi) { return lo + (hi - lo) * static_cast<float>(unit()); }
  std::vector<float> uniforms(size_t n, float lo = -1.0f, float hi = 1.0f) {
    std::vector<float> v(n);
    for (float &x : v) x = uniform(lo, hi);
    return v;
  }
  // Random sign, magnitude uniform in [bound/64, bound]: random and never (near) zero.
  float nonzero(float bound) {
    const float m = bound * static_cast<float>(1.0 / 64 + (1.0 - 1.0 / 64) * unit());
    return (next() & 1) ? m : -m;
  }
  std::vector<float> nonzeros(size_t n, float bound) {
    std::vector<float> v(n);
    for (float &x : v) x = nonzero(bound);
    return v;
  }
  // Integers in [lo, hi] as floats: sums and products of a few of them are exact in float32, so a
  // naive loop is a bit-exact reference.
  std::vector<float> ints(size_t n, int lo, int hi) {
    std::vector<float> v(n);
    for (float &x : v) x = static_cast<float>(range(lo, hi));
    return v;
  }
  // Odd multiples of step in [-(2m-1) step, (2m-1) step]: never zero, exact in bf16 and f16 for m <= 4
  // and a power-of-two step, and their dot products are exact in float32 (CUTLASS's habit).
  float odd_grid(int m, float step) {
    const int64_t i = below(2 * m);
    return static_cast<float>(2 * i - (2 * m - 1)) * step;
  }
  std::vector<float> odd_grids(size_t n, int m, float step) {
    std::vector<float> v(n);
    for (float &x : v) x = odd_grid(m, step);
    return v;
  }
  template <class T>
  void shuffle(std::vector<T> &v) {
    for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[static_cast<size_t>(below(static_cast<int64_t>(i)))]);
  }

 private:
  uint64_t s_;
};

// n inputs for seed (x, dy, weights): random signs, magnitudes in [bound/64, bound], never zero.
inline std::vector<float> inputs(size_t n, uint64_t seed, float bound = 2.0f) { return Rng(seed).nonzeros(n, bound); }

}  // namespace moe_test
