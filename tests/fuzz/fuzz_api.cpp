// libFuzzer harness of the whole C API on the CPU backend. The input bytes are a program: a series
// of operations (create a layer from a config the bytes describe, create and destroy contexts,
// forward, backward, route, every accessor, parameter access, destroy in any order) on up to three
// layers and four contexts, with arguments that are valid, NULL, of the wrong layer, overlapping,
// out of range, or buffers of exactly the size the call is told (so that AddressSanitizer sees any
// read or write past what the caller declared). Layers may get a fake two-rank comm whose "other
// rank" answers with bytes from the input, as a broken or hostile peer would. Checkpoints: files made
// from a layer's own save with bytes overwritten or cut, from JSON tokens, or from raw bytes, loaded
// with moe_layer_load (op bytes 252-255).
//
// Oracles, besides the sanitizers: every status is a moe_status other than MOE_ERR_INTERNAL; a
// failed call leaves a message that starts with its own name; calls that must fail (NULL handles,
// sizes that overflow) fail; a failed moe_layer_create leaves *out alone; at the end every layer
// without a comm still runs a clean forward and backward.
//
// Built by tests/fuzz/run.sh with clang -fsanitize=fuzzer,address,undefined (or, --sanitizers
// ubsan, -fsanitize=fuzzer,undefined -D_GLIBCXX_ASSERTIONS); the same file with
// replay_main.cpp replays the committed corpus and regression inputs in every build (fuzz.replay).
#include <moe/moe.h>
#include <stdlib.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <string>
#include <vector>

#include "core/half.h"  // store_elem: one element in a moe_dtype

extern "C" const char *moe_fuzz_status_name_of_int(int v);  // c_caller.c

namespace {

// ---- input bytes -----------------------------------------------------------------------------

struct Reader {
  const uint8_t *p;
  size_t n;
  bool empty() const { return n == 0; }
  uint8_t u8() {
    if (!n) return 0;
    --n;
    return *p++;
  }
  uint32_t u32() {
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) v |= static_cast<uint32_t>(u8()) << (8 * i);
    return v;
  }
  uint64_t u64() {
    const uint64_t lo = u32();  // two statements: the operands of | are unsequenced (GCC and clang differ)
    return lo | (static_cast<uint64_t>(u32()) << 32);
  }
  int64_t range(int64_t lo, int64_t hi) { return lo + static_cast<int64_t>(u8() % static_cast<uint64_t>(hi - lo + 1)); }
  bool flag() { return u8() & 1; }
  // Mostly small values in [lo, hi]; sometimes a value chosen to break size arithmetic.
  int64_t size(int64_t lo, int64_t hi) {
    const uint8_t c = u8();
    if (c < 224) return lo + c % (hi - lo + 1);
    static const int64_t evil[] = {0, -1, -7, INT64_MIN, INT64_MAX, INT32_MAX, int64_t{INT32_MAX} + 1,
                                   int64_t{1} << 32, int64_t{1} << 40, int64_t{1} << 62, 3037000500,
                                   INT64_MAX / 2 + 1, int64_t{1} << 21, 65536, 1 << 30, -(int64_t{1} << 40)};
    return evil[c % (sizeof evil / sizeof evil[0])];
  }
  float real() {
    const uint8_t c = u8();
    static const float special[] = {0.0f, -0.0f, 1.0f, -1.0f, 0.5f, 1e-30f, 1e30f,
                                    std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                                    std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::max(),
                                    std::numeric_limits<float>::denorm_min(), -2.5f, 1.25f, 3.0f, 100.0f};
    if (c < 16) return special[c];
    if (c < 32) {
      const uint32_t bits = u32();
      float f;
      std::memcpy(&f, &bits, sizeof f);
      return f;
    }
    return (static_cast<float>(c) - 144.0f) / 32.0f;
  }
};

// ---- bookkeeping -----------------------------------------------------------------------------

int64_t g_calls = 0, g_refused = 0, g_layers = 0;

[[noreturn]] void bug(const char *what, const char *detail) {
  std::fprintf(stderr, "libmoe fuzz oracle: %s: %s\n", what, detail);
  std::abort();
}

// Every call goes through here: a valid status, never MOE_ERR_INTERNAL, a message on failure.
moe_status seen(moe_status s, const char *fn) {
  ++g_calls;
  if (static_cast<int>(s) < 0 || static_cast<int>(s) > MOE_ERR_INTERNAL) bug(fn, "status outside moe_status");
  if (s == MOE_ERR_INTERNAL) bug(fn, moe_last_error());
  if (s != MOE_OK) {
    ++g_refused;
    // The text must be this call's: "fn: ...". A non-empty text alone could be left over from an
    // earlier call, even of an earlier input, and the verdict would depend on what ran before.
    const char *text = moe_last_error();
    const size_t n = std::strlen(fn);
    if (std::strncmp(text, fn, n) != 0 || text[n] != ':') bug(fn, "failed without a message of its own");
  }
  return s;
}

void must_fail(moe_status s, const char *fn) {
  if (s == MOE_OK) bug(fn, "accepted an argument it must refuse");
}

// An exact-size heap copy: a pointer the caller says holds `bytes` bytes.
struct Block {
  std::vector<unsigned char> store;
  void *get() { return store.empty() ? nullptr : store.data(); }
};

std::vector<float> values(Reader &in, int64_t n) {
  std::vector<float> v(static_cast<size_t>(n));
  const int mode = in.range(0, 7);
  // sin(0.7 i + mode), by rotation: a sinf per element was a tenth of the fuzzer's time.
  const double ca = std::cos(0.7), sa = std::sin(0.7);
  double s = std::sin(static_cast<double>(mode)), c = std::cos(static_cast<double>(mode));
  for (int64_t i = 0; i < n; ++i) {
    v[i] = static_cast<float>(s);
    const double next = s * ca + c * sa;
    c = c * ca - s * sa;
    s = next;
  }
  if (mode >= 5 && n > 0)  // a few special values at chosen places
    for (int j = in.range(1, 3); j > 0; --j) v[in.range(0, 255) % n] = in.real();
  return v;
}

// ---- a fake second rank ----------------------------------------------------------------------

// Rank 0 of 2. Rows and counts this rank sends to itself come back; what "rank 1" sends is made up
// from the input: consistent small counts, or values a broken peer could send.
struct FakePeer {
  std::vector<uint8_t> bytes;
  size_t pos = 0;
  uint8_t next() { return bytes.empty() ? 0 : bytes[pos++ % bytes.size()]; }
  int64_t count() {
    const uint8_t c = next();
    if (c < 200) return c % 5;
    static const int64_t evil[] = {-1, INT64_MIN, INT64_MAX, int64_t{1} << 31, int64_t{1} << 40, 7, 1000};
    return evil[c % 7];
  }
  int fail_after = -1;  // hook calls before one fails; -1: never
  int calls = 0;
  bool fail() { return fail_after >= 0 && calls++ >= fail_after; }
};

moe_status peer_counts(void *user, const int64_t *send, int64_t *recv) {
  auto *p = static_cast<FakePeer *>(user);
  if (p->fail()) return MOE_ERR_COMM;
  recv[0] = send[0];
  recv[1] = p->count();
  return MOE_OK;
}

moe_status peer_rows(void *user, const void *send, const int64_t *sc, void *recv, const int64_t *rc,
                     size_t row_bytes, void *) {
  auto *p = static_cast<FakePeer *>(user);
  if (p->fail()) return MOE_ERR_COMM;
  // The library promises buffers of sum(counts) rows; its own rows come back first.
  if (sc[0] != rc[0]) bug("exchange_rows", "this rank's rows to itself differ in count");
  std::memcpy(recv, send, static_cast<size_t>(rc[0]) * row_bytes);
  unsigned char *out = static_cast<unsigned char *>(recv) + static_cast<size_t>(rc[0]) * row_bytes;
  const size_t peer = static_cast<size_t>(rc[1]) * row_bytes;
  if (row_bytes % sizeof(double) == 0 && rc[1] == 1 && p->next() < 128) {
    // A statistics row (doubles): counts as the peer may send them, good or bad.
    const size_t nd = row_bytes / sizeof(double);
    for (size_t i = 0; i < nd; ++i) {
      const uint8_t c = p->next();
      double v = c % 4;
      if (c >= 240) {
        static const double evil[] = {std::numeric_limits<double>::quiet_NaN(), -1.0, 1e300, 0.5,
                                      std::numeric_limits<double>::infinity(), 9.3e18, -1e300, 1e17};
        v = evil[c % 8];
      }
      std::memcpy(out + i * sizeof(double), &v, sizeof v);
    }
  } else if (row_bytes % sizeof(int64_t) == 0 && rc[1] == 1 && row_bytes <= 64 * sizeof(int64_t)) {
    // Per-expert row counts (int64).
    for (size_t i = 0; i < row_bytes / sizeof(int64_t); ++i) {
      const int64_t v = p->count();
      std::memcpy(out + i * sizeof(int64_t), &v, sizeof v);
    }
  } else {
    for (size_t i = 0; i < peer; ++i) out[i] = p->next();
  }
  return MOE_OK;
}

// ---- the world of one input ------------------------------------------------------------------

struct LayerSlot {
  moe_layer *l = nullptr;
  moe_config cfg{};
  bool has_comm = false;
  FakePeer peer;
  moe_comm comm{};
};

struct CtxSlot {
  moe_context *c = nullptr;
  int layer = -1;       // slot of its layer (which may since hold another layer)
  int64_t d = 1, E = 1, k = 1;  // its layer's sizes
  int64_t T = -1;       // tokens of its last successful forward or route
  bool trained = false;
};

constexpr int kLayers = 3, kCtxs = 4;
constexpr int64_t kMaxD = 16, kMaxFF = 32, kMaxE = 16, kMaxT = 32;

struct World {
  LayerSlot L[kLayers];
  CtxSlot C[kCtxs];
};

const char *kNames[] = {"router.weight", "router.noise_weight", "router.bias",    "experts.w1",       "experts.w3",
                        "experts.w2",    "shared.w1",           "shared.w3",      "shared.w2",        "shared.gate",
                        "experts",       "",                    "router.weight.", "EXPERTS.W1",       "router.logit_bias",
                        "experts.b1",    "experts.b3",          "experts.b2"};

// The number of parameters moe.h's list implies for the layer's configuration: router.weight,
// router.bias, experts.w1 and w2 always; the rest each behind its own option.
int expected_num_params(moe_layer *l) {
  moe_config c;
  moe_config_init(&c);
  if (moe_layer_get_config(l, &c) != MOE_OK) bug("moe_layer_get_config", "refused a live layer");
  const int glu = c.activation == MOE_ACT_SWIGLU || c.activation == MOE_ACT_GEGLU ||
                  c.activation == MOE_ACT_SWIGLU_CLAMPED;
  int n = 4 + glu + (c.noise == MOE_NOISE_GAUSSIAN) + (c.router_logit_bias != 0);
  if (c.expert_bias) n += 2 + glu;
  if (c.num_shared_experts > 0) n += 2 + glu + (c.shared_gate != 0);
  return n;
}

// Elements of a parameter, or -1 if the layer has no such parameter.
int64_t numel_of(moe_layer *l, const char *name) {
  for (int i = 0; i < moe_layer_num_params(l); ++i) {
    moe_param_info info{};
    if (moe_layer_param_info(l, i, &info) != MOE_OK) continue;
    if (std::strcmp(info.name, name) != 0) continue;
    int64_t n = 1;
    for (int j = 0; j < info.ndim; ++j) n *= info.shape[j];
    return n;
  }
  return -1;
}

// Products saturating at 2^100, in 128-bit arithmetic.
__int128 sat(__int128 a, __int128 b) {
  const __int128 cap = static_cast<__int128>(1) << 100;
  if (a <= 0 || b <= 0) return 0;
  return a > cap / b ? cap : a * b;
}

struct Need {
  bool overflow;  // a parameter's bytes overflow int64: the library must refuse the config
  __int128 bytes; // roughly what parameters and gradients take otherwise
};

Need param_bytes(const moe_config &c) {
  const __int128 d = c.d_model, ff = c.d_ff, E = c.num_experts, S = c.num_shared_experts;
  const __int128 ffs = c.d_ff_shared > 0 ? c.d_ff_shared : c.d_ff;
  const __int128 max = INT64_MAX;
  const __int128 experts = sat(sat(sat(E, ff), d), 8), router = sat(sat(E, d), 8);
  const __int128 shared = S > 0 ? sat(sat(sat(S, ffs), d), 8) : 0;
  return {experts > max || router > max || shared > max, 3 * (experts + router + shared)};
}

void op_create(World &w, Reader &in) {
  const int slot = in.range(0, kLayers - 1);
  LayerSlot &s = w.L[slot];
  if (s.l) return;  // occupied
  moe_config cfg;
  moe_config_init(&cfg);
  const uint8_t preset = in.u8();
  static const char *presets[] = {"mixtral", "switch", "shazeer", "expert-choice", "deepseek-v3", "qwen2-moe"};
  if (preset < 96) seen(moe_config_preset(&cfg, presets[preset % 6]), "moe_config_preset");
  cfg.d_model = in.range(1, 8);
  cfg.d_ff = in.range(1, 12);
  if (cfg.num_experts > kMaxE) {
    cfg.num_experts = 8;
    if (cfg.top_k > 4) cfg.top_k = 4;
    if (cfg.num_groups > 1) cfg.num_groups = 4, cfg.topk_groups = 2;
  }
  cfg.seed = in.u8();
  // Field mutations.
  for (int m = in.range(0, 6); m > 0; --m) {
    switch (in.range(0, 31)) {
      case 0: cfg.d_model = in.size(1, kMaxD); break;
      case 1: cfg.d_ff = in.size(1, kMaxFF); break;
      case 2: cfg.num_experts = in.size(1, kMaxE); break;
      case 3: cfg.top_k = in.size(1, 4); break;
      case 4: {
        int v = in.range(-2, 6);
        std::memcpy(&cfg.activation, &v, sizeof v);
        if (v == MOE_ACT_SWIGLU_CLAMPED) {  // gpt-oss's pieces: the clamp's parameters (any, bad ones too), biases
          cfg.swiglu_alpha = in.real();
          cfg.swiglu_limit = in.real();
          cfg.router_logit_bias = in.range(0, 1);
          cfg.expert_bias = in.range(0, 1);
        }
      } break;
      case 5: { int v = in.range(-1, 2); std::memcpy(&cfg.routing, &v, sizeof v); } break;
      case 6: { int v = in.range(-1, 2); std::memcpy(&cfg.score, &v, sizeof v); } break;
      case 7: cfg.normalize_topk = in.range(-1, 1); break;
      case 8: cfg.routed_scale = in.real(); break;
      case 9: cfg.num_groups = in.size(1, 8); break;
      case 10: cfg.topk_groups = in.size(1, 4); break;
      case 11: cfg.capacity_factor = in.real(); break;
      case 12: { int v = in.range(-1, 2); std::memcpy(&cfg.drop_policy, &v, sizeof v); } break;
      case 13: { int v = in.range(-1, 3); std::memcpy(&cfg.noise, &v, sizeof v); } break;
      case 14: cfg.noise_eps = in.real(); break;
      case 15: cfg.aux_loss_coef = in.real(); break;
      case 16: cfg.z_loss_coef = in.real(); break;
      case 17: cfg.importance_loss_coef = in.real(); break;
      case 18: cfg.load_loss_coef = in.real(); break;
      case 19: cfg.bias_update_rate = in.real(); break;
      case 20: cfg.num_shared_experts = in.size(0, 2); break;
      case 21: cfg.d_ff_shared = in.size(0, kMaxFF); break;
      case 22: cfg.shared_gate = in.range(0, 2); break;
      case 23: { int v = in.range(-1, 2); std::memcpy(&cfg.device, &v, sizeof v); } break;
      case 24: { int v = in.range(-1, 3); std::memcpy(&cfg.dtype, &v, sizeof v); } break;
      case 25: cfg.check_finite = in.range(0, 2); break;
      case 26: cfg.allow_tf32 = in.range(0, 1); cfg.device_index = in.range(-1, 1); break;
      case 27: cfg.seed = in.u64(); break;
      case 28: cfg.num_experts = in.range(1, 4) * 2; cfg.top_k = in.range(1, 2); break;
      case 29: cfg.capacity_factor = in.range(0, 3) * 0.5f; break;
      case 30: cfg.noise = MOE_NOISE_GAUSSIAN; cfg.load_loss_coef = 0.01f; cfg.importance_loss_coef = 0.01f; break;
      default: cfg.num_groups = 2; cfg.topk_groups = 1; cfg.num_experts = 4; cfg.top_k = in.range(1, 2); break;
    }
  }
  // A comm: none, a fake two-rank one, or a broken one.
  s.has_comm = false;
  const uint8_t cm = in.u8();
  if (cm >= 200) {
    s.peer = FakePeer{};
    for (int i = in.range(1, 48); i > 0; --i) s.peer.bytes.push_back(in.u8());
    s.peer.fail_after = in.u8() < 40 ? in.range(0, 6) : -1;
    s.comm = moe_comm{};
    s.comm.struct_size = sizeof(moe_comm);
    s.comm.size = 2;
    s.comm.rank = 0;
    s.comm.user = &s.peer;
    s.comm.exchange_counts = peer_counts;
    s.comm.exchange_rows = peer_rows;
    switch (cm % 8) {
      case 0: s.comm.struct_size = 8; break;
      case 1: s.comm.size = 0; break;
      case 2: s.comm.rank = 2; break;
      case 3: s.comm.exchange_rows = nullptr; break;
      case 4: s.comm.size = 1; break;
      default: break;
    }
    cfg.comm = &s.comm;
    s.has_comm = true;
  }
  // Sizes the library must refuse (the products overflow) are tried; sizes that merely need much
  // memory are not (the fuzzer would spend its time in memset).
  const Need need = param_bytes(cfg);
  const bool overflow = need.overflow;
  if (!overflow && (need.bytes > (4 << 20) || cfg.d_model > 4096 || cfg.d_ff > 4096 || cfg.num_experts > 4096 ||
                    cfg.d_ff_shared > 65536 || cfg.num_shared_experts > 64))
    return;
  // The struct as the caller passes it: the whole struct, a short one, a longer one from a newer
  // header (zero tail: accepted; nonzero tail: refused), or NULL.
  moe_layer *sentinel = reinterpret_cast<moe_layer *>(static_cast<uintptr_t>(0x5a5a5a5a));
  moe_layer *out = sentinel;
  const uint8_t how = in.u8();
  Block blk;
  const moe_config *arg = &cfg;
  if (how >= 224) {
    size_t sz = sizeof(moe_config);
    switch (how % 4) {
      case 0: sz = sizeof(size_t) + how % 16; break;
      case 1: sz = sizeof(moe_config) - 1 - how % 8; break;
      default: sz = sizeof(moe_config) + 8 * (1 + how % 4); break;
    }
    cfg.struct_size = sz;
    blk.store.assign(sz, 0);
    std::memcpy(blk.store.data(), &cfg, sz < sizeof cfg ? sz : sizeof cfg);
    if (sz > sizeof cfg && how % 4 == 3) blk.store[sz - 1] = 1;
    arg = static_cast<const moe_config *>(blk.get());
  }
  const uint8_t null = in.u8();
  if (null == 255) {
    must_fail(seen(moe_layer_create(nullptr, &out), "moe_layer_create"), "moe_layer_create(NULL cfg)");
    return;
  }
  if (null == 254) {
    must_fail(seen(moe_layer_create(arg, nullptr), "moe_layer_create"), "moe_layer_create(NULL out)");
    return;
  }
  const moe_status st = seen(moe_layer_create(arg, &out), "moe_layer_create");
  if (st != MOE_OK) {
    if (out != sentinel) bug("moe_layer_create", "a failed create wrote *out");
    return;
  }
  if (overflow) bug("moe_layer_create", "accepted sizes whose products overflow");
  s.l = out;
  s.cfg = cfg;
  s.cfg.comm = s.has_comm ? &s.comm : nullptr;
  ++g_layers;
}

int pick_layer(World &w, Reader &in) {
  const int i = in.range(0, kLayers - 1);
  return w.L[i].l ? i : -1;
}

int pick_ctx(World &w, Reader &in) {
  const int i = in.range(0, kCtxs - 1);
  return w.C[i].c ? i : -1;
}

// A context argument for a call on layer li: its own, another layer's, or none.
moe_context *ctx_arg(World &w, Reader &in, int li, int *ci_out) {
  *ci_out = -1;
  const int ci = pick_ctx(w, in);
  if (ci < 0) return nullptr;
  *ci_out = ci;
  (void)li;
  return w.C[ci].c;
}

void op_forward(World &w, Reader &in, bool route) {
  const int li = pick_layer(w, in);
  moe_layer *l = li >= 0 ? w.L[li].l : nullptr;
  const moe_config &cfg = li >= 0 ? w.L[li].cfg : moe_config{};
  int ci = -1;
  moe_context *ctx = ctx_arg(w, in, li, &ci);
  if (!route && in.u8() < 64) ctx = nullptr, ci = -1;
  const int64_t d = li >= 0 ? cfg.d_model : 4;
  int64_t T = in.size(0, kMaxT);
  const int64_t per = li >= 0 ? (cfg.top_k > cfg.num_experts ? cfg.top_k : cfg.num_experts) : 1;
  // Token counts the library must refuse (negative, or too many) come with a small buffer; counts
  // it could accept are only tried when small.
  const bool refuse = T < 0 || T > INT32_MAX / per || static_cast<__int128>(T) * d * 4 >= (static_cast<__int128>(1) << 63);
  if (!refuse && T > kMaxT) T = kMaxT;
  const int64_t n = refuse ? 4 : T * d;
  // x and y: separate buffers of exactly n floats, x or y NULL, y == x, or y overlapping x by all
  // but one element (one buffer of n + 1 floats).
  const uint8_t ptrs = in.u8();
  std::vector<float> x = values(in, n);
  std::vector<float> y(static_cast<size_t>(n), 7.0f);
  const void *xp = n ? x.data() : nullptr;
  void *yp = n ? y.data() : nullptr;
  if (ptrs >= 240) {
    xp = nullptr;
  } else if (ptrs >= 230) {
    yp = nullptr;
  } else if (ptrs >= 224) {
    yp = const_cast<void *>(xp);
  } else if (ptrs >= 220) {
    x.push_back(0.0f);
    xp = x.data();
    yp = x.data() + 1;
  }
  moe_status s;
  if (route) s = seen(moe_route(l, xp, T, ctx), "moe_route");
  else s = seen(moe_forward(l, xp, T, route ? nullptr : yp, ctx), "moe_forward");
  if (!l || refuse) must_fail(s, route ? "moe_route(bad)" : "moe_forward(bad)");
  if (ci >= 0 && w.C[ci].layer != li) must_fail(s, "forward with another layer's context");
  if (s == MOE_OK && ci >= 0) {
    w.C[ci].T = T;
    w.C[ci].trained = !route;
  }
}

void op_backward(World &w, Reader &in) {
  const int ci = pick_ctx(w, in);
  const int li = ci >= 0 && in.u8() < 224 ? w.C[ci].layer : pick_layer(w, in);
  moe_layer *l = li >= 0 ? w.L[li].l : nullptr;
  moe_context *ctx = ci >= 0 ? w.C[ci].c : nullptr;
  // dy and dx exactly as large as the context's last forward (the caller's promise).
  const int64_t T = ci >= 0 && w.C[ci].T > 0 ? w.C[ci].T : 0;
  const int64_t d = ci >= 0 ? w.C[ci].d : 1;
  const int64_t n = T * d;
  std::vector<float> dy = values(in, n), dx(static_cast<size_t>(n), 3.0f);
  const uint8_t ptrs = in.u8();
  const void *dyp = n ? dy.data() : nullptr;
  void *dxp = n ? dx.data() : nullptr;
  if (ptrs >= 240) dyp = nullptr;
  else if (ptrs >= 200) dxp = nullptr;
  else if (ptrs >= 196) dxp = const_cast<void *>(dyp);
  const moe_status s = seen(moe_backward(l, ctx, dyp, dxp), "moe_backward");
  if (!l || !ctx) must_fail(s, "moe_backward(NULL)");
  if (ci >= 0 && li >= 0 && w.C[ci].layer != li) must_fail(s, "backward with another layer's context");
}

void op_accessors(World &w, Reader &in) {
  const int ci = pick_ctx(w, in);
  moe_context *ctx = ci >= 0 ? w.C[ci].c : nullptr;
  const int64_t T = ci >= 0 && w.C[ci].T > 0 ? w.C[ci].T : 0;
  const int64_t E = ci >= 0 ? w.C[ci].E : 1, k = ci >= 0 ? w.C[ci].k : 1;
  switch (in.range(0, 4)) {
    case 0: {
      // The library reads struct_size and writes min(struct_size, sizeof) bytes.
      const size_t sz = in.flag() ? sizeof(moe_stats) : static_cast<size_t>(in.range(0, 160));
      Block b;
      b.store.assign(sz < sizeof(size_t) ? sizeof(size_t) : sz, 0);
      std::memcpy(b.get(), &sz, sizeof sz);
      moe_stats *out = in.u8() < 250 ? static_cast<moe_stats *>(b.get()) : nullptr;
      seen(moe_context_stats(ctx, out), "moe_context_stats");
      break;
    }
    case 1: {
      std::vector<int64_t> counts(static_cast<size_t>(E));
      seen(moe_context_expert_counts(ctx, in.u8() < 250 ? counts.data() : nullptr), "moe_context_expert_counts");
      break;
    }
    case 2: {
      std::vector<int32_t> ids(static_cast<size_t>(T * k));
      std::vector<float> wts(static_cast<size_t>(T * k));
      const uint8_t m = in.u8();
      seen(moe_context_topk(ctx, m & 1 || ids.empty() ? nullptr : ids.data(), m & 2 || wts.empty() ? nullptr : wts.data()),
           "moe_context_topk");
      break;
    }
    default: {
      int64_t count = -1;
      seen(moe_context_assignments(ctx, 0, nullptr, nullptr, nullptr, &count), "moe_context_assignments");
      int64_t cap = count >= 0 ? count : 0;
      const uint8_t m = in.u8();
      if (m >= 200) cap = in.size(0, 8);  // possibly too small, or negative
      // Arrays of exactly cap entries; for an absurd cap, of the count the library will write.
      const size_t room = cap > 0 && cap < 4096 ? static_cast<size_t>(cap) : (count > 0 ? static_cast<size_t>(count) : 1);
      std::vector<int32_t> tok(room), ex(room);
      std::vector<float> wt(room);
      int64_t got = -1;
      const moe_status s =
          seen(moe_context_assignments(ctx, cap, m & 1 ? nullptr : tok.data(), m & 2 ? nullptr : ex.data(),
                                       m & 4 ? nullptr : wt.data(), in.u8() < 250 ? &got : nullptr),
               "moe_context_assignments");
      if (s == MOE_OK && got != count) bug("moe_context_assignments", "count changed");
      break;
    }
  }
}

void op_params(World &w, Reader &in) {
  const int li = pick_layer(w, in);
  moe_layer *l = li >= 0 ? w.L[li].l : nullptr;
  const char *name = in.u8() < 250 ? kNames[in.range(0, sizeof kNames / sizeof kNames[0] - 1)] : nullptr;
  const int64_t numel = l && name ? numel_of(l, name) : -1;
  int64_t count = numel >= 0 ? numel : in.size(0, 64);
  const uint8_t c = in.u8();
  if (c >= 200) count = in.size(0, 64);
  else if (c >= 180 && count > INT64_MIN && count < INT64_MAX) count = count + (c & 1 ? 1 : -1);
  // The buffer holds exactly `count` floats (the caller's promise), or one if count is absurd:
  // larger than the parameter and than 2^16 (a library that reads such a count is wrong anyway,
  // and the fuzzer's time went into filling megabytes that a correct library never reads).
  const int64_t absurd = numel > (int64_t{1} << 16) ? numel + 1 : int64_t{1} << 16;
  const size_t room = count > 0 && count <= absurd ? static_cast<size_t>(count) : 1;
  std::vector<float> host = values(in, static_cast<int64_t>(room));
  float *hp = in.u8() < 250 ? host.data() : nullptr;
  switch (in.range(0, 8)) {
    case 0: {
      const moe_status s = seen(moe_layer_set_param(l, name, hp, count), "moe_layer_set_param");
      if (count != numel || !hp) must_fail(s, "moe_layer_set_param(bad)");
      break;
    }
    case 1: {
      const moe_status s = seen(moe_layer_get_param(l, name, hp, count), "moe_layer_get_param");
      if (count != numel || !hp) must_fail(s, "moe_layer_get_param(bad)");
      break;
    }
    case 2: seen(moe_layer_get_grad(l, name, hp, count), "moe_layer_get_grad"); break;
    case 3: {
      moe_param_info info{};
      const int idx = static_cast<int>(in.size(0, 10));
      const moe_status s = seen(moe_layer_param_info(l, idx, in.u8() < 250 ? &info : nullptr), "moe_layer_param_info");
      if (s == MOE_OK && (info.ndim < 1 || info.ndim > 3 || !info.name)) bug("moe_layer_param_info", "bad info");
      break;
    }
    case 4: {
      // Write through the layer's own storage (allowed between steps), e.g. NaN weights, in the
      // dtype the parameter is stored in: bf16/f16 storage holds numel 2-byte elements.
      void *data = nullptr, *grad = nullptr;
      const moe_status s = seen(moe_layer_param_buffers(l, name, in.flag() ? &data : nullptr, &grad),
                                "moe_layer_param_buffers");
      if (s == MOE_OK && data && numel > 0) {
        moe_dtype dt = MOE_DTYPE_F32;
        if (seen(moe_layer_param_dtype(l, name, &dt), "moe_layer_param_dtype") != MOE_OK)
          bug("moe_layer_param_dtype", "refused a parameter that moe_layer_param_buffers accepted");
        if (dt != MOE_DTYPE_F32 && dt != MOE_DTYPE_BF16 && dt != MOE_DTYPE_F16) bug("moe_layer_param_dtype", "not a moe_dtype");
        for (int j = in.range(1, 4); j > 0; --j) {
          // The value first, then the index: the order the bytes were read in before (C++17 reads
          // the right side of an assignment first); function arguments would be unsequenced.
          const float v = in.real();
          moe::store_elem(data, dt, in.u32() % numel, v);
        }
      }
      break;
    }
    case 5: seen(moe_layer_zero_grad(l), "moe_layer_zero_grad"); break;
    case 6: {
      const size_t sz = in.flag() ? sizeof(moe_config) : static_cast<size_t>(in.range(0, 255));
      Block b;
      b.store.assign(sz < sizeof(size_t) ? sizeof(size_t) : sz, 0);
      std::memcpy(b.get(), &sz, sizeof sz);
      seen(moe_layer_get_config(l, in.u8() < 250 ? static_cast<moe_config *>(b.get()) : nullptr), "moe_layer_get_config");
      break;
    }
    case 7: {
      int dummy = 0;
      seen(moe_layer_set_stream(l, in.flag() ? &dummy : nullptr), "moe_layer_set_stream");
      break;
    }
    default: {
      const int n = moe_layer_num_params(l);
      if (!l && n != -1) bug("moe_layer_num_params", "NULL layer did not give -1");
      if (l && n != expected_num_params(l)) bug("moe_layer_num_params", "not the count its configuration implies");
      break;
    }
  }
}

void op_misc(Reader &in) {
  switch (in.range(0, 4)) {
    case 0: {
      // Any int, as a C caller may pass (through c_caller.c: in C++ an enum holding a value outside
      // its range is undefined behaviour in the caller).
      const int v = static_cast<int>(in.u32());
      const char *name = moe_fuzz_status_name_of_int(v);
      if (!name || (v > MOE_ERR_INTERNAL || v < 0 ? std::strcmp(name, "MOE_ERR_UNKNOWN") != 0 : false))
        bug("moe_status_name", "wrong name for a value outside the enum");
      break;
    }
    case 1: {
      moe_config cfg;
      moe_config_init(&cfg);
      std::string name(in.range(0, 12), 'a');
      for (char &ch : name) ch = static_cast<char>(in.range(97, 122));
      static const char *names[] = {"mixtral", "switch", "shazeer", "expert-choice", "deepseek-v3", "qwen2-moe"};
      const uint8_t m = in.u8();
      const char *n = m < 128 ? names[m % 6] : (m < 250 ? name.c_str() : nullptr);
      seen(moe_config_preset(m == 255 ? nullptr : &cfg, n), "moe_config_preset");
      break;
    }
    case 2: moe_config_init(nullptr); break;
    case 3: if (moe_version() != MOE_VERSION_NUMBER) bug("moe_version", "mismatch"); break;
    default: (void)moe_last_error(); break;
  }
}

void op_ctx_create(World &w, Reader &in) {
  const int ci = in.range(0, kCtxs - 1);
  if (w.C[ci].c) return;
  const int li = pick_layer(w, in);
  moe_context *c = nullptr;
  const uint8_t m = in.u8();
  const moe_status s = seen(moe_context_create(li >= 0 ? w.L[li].l : nullptr, m == 255 ? nullptr : &c),
                            "moe_context_create");
  if (li < 0 || m == 255) must_fail(s, "moe_context_create(NULL)");
  if (s == MOE_OK) {
    const moe_config &cfg = w.L[li].cfg;
    w.C[ci] = CtxSlot{c, li, cfg.d_model, cfg.num_experts, cfg.top_k, -1, false};
  }
}

void op_ctx_destroy(World &w, Reader &in) {
  const int ci = pick_ctx(w, in);
  if (ci < 0) {
    moe_context_destroy(nullptr);
    return;
  }
  moe_context_destroy(w.C[ci].c);
  w.C[ci] = CtxSlot{};
}

void op_layer_destroy(World &w, Reader &in) {
  const int li = pick_layer(w, in);
  if (li < 0) {
    moe_layer_destroy(nullptr);
    return;
  }
  // Contexts of the layer stay usable on their own (accessors); the layer handle is gone.
  moe_layer_destroy(w.L[li].l);
  w.L[li].l = nullptr;
}

// ---- checkpoints -----------------------------------------------------------------------------

// One scratch folder per process for checkpoint files, made on first use and removed at exit. A
// plain array, not a std::string: an atexit handler must not read a static destroyed before it runs.
char g_scratch[4096];

const char *scratch_dir() {
  if (!g_scratch[0]) {
    const std::string t = (std::filesystem::temp_directory_path() / "moe_fuzz_XXXXXX").string();
    if (t.size() >= sizeof g_scratch) bug("scratch_dir", "temporary directory path too long");
    std::memcpy(g_scratch, t.c_str(), t.size() + 1);
    if (!::mkdtemp(g_scratch)) bug("scratch_dir", "mkdtemp failed");
  }
  return g_scratch;
}

void remove_scratch() {
  if (!g_scratch[0]) return;
  std::error_code ec;
  std::filesystem::remove_all(g_scratch, ec);
}

// Pieces of safetensors headers, so that short inputs reach the checks behind the JSON parser.
const char *const kJsonTokens[] = {
    "{", "}", "[", "]", ",", ":", "\"router.weight\"", "\"router.bias\"", "\"experts.w1\"", "\"experts.w2\"",
    "\"experts.w3\"", "\"blk.router.weight\"", "\"dtype\"", "\"F32\"", "\"BF16\"", "\"F16\"", "\"I8\"",
    "\"shape\"", "\"data_offsets\"", "\"__metadata__\"", "0", "1", "2", "4", "8", "16", "32", "64",
    "18446744073709551615", "-1", "1e3", "2.0", "\"\xff\"", "\"a\"", " ", "null", "true", "\"weight_map\""};

// moe_layer_load of a file the input makes: a layer's own save with bytes overwritten, cut short
// or its header length changed; or a header put together from JSON tokens; or raw bytes. Oracles:
// a failed load leaves every parameter as it was; a NULL layer or path fails.
void op_checkpoint(World &w, Reader &in) {
  int li = pick_layer(w, in);
  moe_layer *own = nullptr;  // a small layer of the op's own when the input has none yet
  if (li < 0 && in.flag()) {
    moe_config cfg;
    moe_config_init(&cfg);
    cfg.d_model = 4;
    cfg.d_ff = 6;
    cfg.num_experts = 2;
    cfg.top_k = 1;
    cfg.num_shared_experts = in.range(0, 1);
    cfg.dtype = static_cast<moe_dtype>(in.range(0, 2));
    if (seen(moe_layer_create(&cfg, &own), "moe_layer_create") != MOE_OK) bug("op_checkpoint", "create");
  }
  moe_layer *l = li >= 0 ? w.L[li].l : own;
  static const char *const families[] = {"libmoe", "mixtral", "qwen2-moe", "qwen3-moe", "olmoe",
                                         "deepseek-v3", "switch", "gpt-oss", "llama"};
  const uint8_t f = in.u8();
  const char *family = f < 128 ? nullptr : families[f % 9];
  const char *prefix = in.flag() ? "blk" : nullptr;
  const std::string path = std::string(scratch_dir()) + "/ckpt.safetensors";
  std::vector<unsigned char> file;
  const uint8_t how = in.u8() % 4;
  if (how <= 1) {
    // Saved in the family's names where one is drawn (refused for a layer the family cannot hold),
    // so that the load below reads that family's layout.
    const moe_status saved = !l ? MOE_ERR_INVALID_ARGUMENT
                             : family ? seen(moe_layer_save_as(l, path.c_str(), prefix, family), "moe_layer_save_as")
                                      : seen(moe_layer_save(l, path.c_str(), prefix), "moe_layer_save");
    if (saved == MOE_OK) {
      std::ifstream is(path, std::ios::binary);
      file.assign(std::istreambuf_iterator<char>(is), {});
    }
    for (int j = in.range(0, 3); j > 0 && !file.empty(); --j) {
      const uint8_t kind = in.u8() % 4;
      const uint32_t at = in.u32();
      if (kind == 0) {
        file.resize(at % file.size());
      } else if (kind == 1 && file.size() >= 8) {
        const uint64_t len = in.size(0, 4096);
        for (int b = 0; b < 8; ++b) file[b] = static_cast<unsigned char>(len >> (8 * b));
      } else {
        const uint8_t v = in.u8();
        file[at % file.size()] = v;
      }
    }
  } else if (how == 2) {
    std::string h;
    for (int j = in.range(1, 40); j > 0; --j) h += kJsonTokens[in.u8() % (sizeof kJsonTokens / sizeof kJsonTokens[0])];
    const uint64_t len = in.flag() ? h.size() : static_cast<uint64_t>(in.size(0, 512));
    for (int b = 0; b < 8; ++b) file.push_back(static_cast<unsigned char>(len >> (8 * b)));
    file.insert(file.end(), h.begin(), h.end());
    for (int j = in.range(0, 64); j > 0; --j) file.push_back(in.u8());
  } else {
    for (int j = in.range(0, 255); j > 0; --j) file.push_back(in.u8());
  }
  {
    std::ofstream os(path, std::ios::binary | std::ios::trunc);
    os.write(reinterpret_cast<const char *>(file.data()), static_cast<std::streamsize>(file.size()));
  }
  // Every parameter's bytes before the load, to check that a failed load changed nothing.
  std::vector<std::vector<float>> before;
  const int np = l ? moe_layer_num_params(l) : 0;
  for (int i = 0; i < np; ++i) {
    moe_param_info pi{};
    seen(moe_layer_param_info(l, i, &pi), "moe_layer_param_info");
    int64_t n = 1;
    for (int j = 0; j < pi.ndim; ++j) n *= pi.shape[j];
    before.emplace_back(static_cast<size_t>(n));
    seen(moe_layer_get_param(l, pi.name, before.back().data(), n), "moe_layer_get_param");
  }
  const bool null_path = in.u8() == 255;
  const moe_status s = seen(moe_layer_load(l, null_path ? nullptr : path.c_str(), prefix, family), "moe_layer_load");
  if (!l || null_path) must_fail(s, "moe_layer_load(NULL)");
  if (s != MOE_OK)
    for (int i = 0; i < np; ++i) {
      moe_param_info pi{};
      seen(moe_layer_param_info(l, i, &pi), "moe_layer_param_info");
      std::vector<float> now(before[i].size());
      seen(moe_layer_get_param(l, pi.name, now.data(), static_cast<int64_t>(now.size())), "moe_layer_get_param");
      if (std::memcmp(now.data(), before[i].data(), now.size() * sizeof(float)) != 0)
        bug("moe_layer_load", "a failed load changed a parameter");
    }
  moe_layer_destroy(own);
}

// A clean training step must still work on every layer the input left (without a comm: the fake
// peer may keep failing by design).
void final_check(World &w) {
  for (LayerSlot &s : w.L) {
    if (!s.l || s.has_comm) continue;
    const int64_t T = 3, d = s.cfg.d_model;
    std::vector<float> x(T * d), y(T * d), dx(T * d);
    for (int64_t i = 0; i < T * d; ++i) x[i] = 0.1f * static_cast<float>(i % 7) - 0.3f;
    moe_context *c = nullptr;
    if (seen(moe_context_create(s.l, &c), "moe_context_create") != MOE_OK) bug("final", "context");
    moe_status st = seen(moe_forward(s.l, x.data(), T, y.data(), c), "moe_forward");
    if (st != MOE_OK) bug("final forward", moe_last_error());
    st = seen(moe_backward(s.l, c, x.data(), dx.data()), "moe_backward");
    if (st != MOE_OK && st != MOE_ERR_NONFINITE) bug("final backward", moe_last_error());
    moe_context_destroy(c);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  Reader in{data, size};
  World w;
  for (int step = 0; step < 48 && !in.empty(); ++step) {
    const uint8_t op = in.u8();
    if (op >= 252) {  // the four highest op bytes (create, context, forward before)
      op_checkpoint(w, in);
      continue;
    }
    switch (op % 12) {
      case 0: case 1: op_create(w, in); break;
      case 2: op_ctx_create(w, in); break;
      case 3: case 4: op_forward(w, in, false); break;
      case 5: op_backward(w, in); break;
      case 6: op_forward(w, in, true); break;
      case 7: op_accessors(w, in); break;
      case 8: op_params(w, in); break;
      case 9: op_ctx_destroy(w, in); break;
      case 10: op_layer_destroy(w, in); break;
      default: op_misc(in); break;
    }
  }
  final_check(w);
  // Teardown in an order the input picks: contexts first, or layers first (deferred free).
  const bool layers_first = size > 0 && (data[size - 1] & 1);
  if (layers_first)
    for (LayerSlot &s : w.L) moe_layer_destroy(s.l);
  for (CtxSlot &c : w.C) moe_context_destroy(c.c);
  if (!layers_first)
    for (LayerSlot &s : w.L) moe_layer_destroy(s.l);
  return 0;
}

// AddressSanitizer reports a write past a heap block only when it lands on poisoned memory. Just
// past the block's redzone lies the next block of its size class, live or free depending on what
// earlier inputs allocated and freed, so an overflow of a few hundred bytes was reported in a long
// run and not when its input was replayed alone. With redzones of at least 1 KiB (default: 16 to
// 128 bytes for small blocks), an overflow of up to 1 KiB is reported whatever ran before. Read by
// the ASan runtime at start-up, in libFuzzer and replay builds alike; ASAN_OPTIONS may override.
extern "C" const char *__asan_default_options() { return "redzone=1024"; }

// Totals for run.sh's report.
extern "C" void moe_fuzz_print_totals(void) {
  std::fprintf(stderr, "moe_fuzz: %lld API calls, %lld refused with a status (bad inputs), %lld layers created\n",
               (long long)g_calls, (long long)g_refused, (long long)g_layers);
}

extern "C" int LLVMFuzzerInitialize(int *, char ***) {
  std::atexit(moe_fuzz_print_totals);
  std::atexit(remove_scratch);
  return 0;
}
