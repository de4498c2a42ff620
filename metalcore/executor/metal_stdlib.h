// The subset of the Metal Shading Language that metalcore's shaders use, as C++17 for clang.
//
// The executor (metal_executor.py) compiles a shader as C++ against this header after a source
// translation that: turns each `kernel void f(...)` into a plain function plus an entry wrapper
// (Metal's [[attribute]] parameters are not C++), rewrites `threadgroup T x[N];` declarations into
// references into per-threadgroup storage, rewrites vector constructors `float4(...)` into
// mtl::make<float, 4>(...), and rewrites `device`/`constant` pointers into mtl::dptr<T>, which checks
// every access against its buffer in bounds-checked mode and is a plain pointer otherwise.
//
// What is here: address-space qualifiers, scalar and vector types (clang ext_vector_type: the swizzle
// and layout rules of Metal's vectors, float3 is 16 bytes), half (_Float16), bfloat (__bf16), math
// (metal::, precise::, fast::; fast:: is computed precisely here), SIMD-group functions over 32-wide
// groups, threadgroup/simdgroup barriers, and atomics. Anything else is undeclared, so using it is a
// compile error that names it — never a silent mis-execution.
#pragma once
#include <type_traits>

#include "metal_rt_abi.h"

#ifndef MTL_CHECKED
#define MTL_CHECKED 1
#endif

// Polled by every loop condition of the translated shader (one load and a branch per iteration), so
// that an endless loop stops when its launch is interrupted or runs past its time limit. A constant
// evaluation (a loop in a constexpr function) skips it.
#define MTL_POLL()                                                                               \
  (__builtin_is_constant_evaluated() ||                                                          \
   !__builtin_expect(__atomic_load_n(&mtl_rt_stop_requests, __ATOMIC_RELAXED), 0) || mtl_rt_poll())

// ---- address spaces -------------------------------------------------------------------------------
#define device
#define constant const
#define thread
#define threadgroup

// ---- scalar and vector types ----------------------------------------------------------------------
typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef unsigned long ulong;
typedef _Float16 half;
typedef __bf16 bfloat;

#define MTL_VEC(T, name)                                      \
  typedef T name##2 __attribute__((ext_vector_type(2)));      \
  typedef T name##3 __attribute__((ext_vector_type(3)));      \
  typedef T name##4 __attribute__((ext_vector_type(4)));
MTL_VEC(float, float)
MTL_VEC(half, half)
MTL_VEC(bfloat, bfloat)
MTL_VEC(int, int)
MTL_VEC(uint, uint)
MTL_VEC(short, short)
MTL_VEC(ushort, ushort)
MTL_VEC(char, char)
MTL_VEC(uchar, uchar)
MTL_VEC(long, long)
MTL_VEC(ulong, ulong)
MTL_VEC(bool, bool)
#undef MTL_VEC

namespace metal {
template <class T, int N>
using vec = T __attribute__((ext_vector_type(N)));

#define MTL_USING_VEC(name) using ::name##2; using ::name##3; using ::name##4;
MTL_USING_VEC(float) MTL_USING_VEC(half) MTL_USING_VEC(bfloat) MTL_USING_VEC(int) MTL_USING_VEC(uint)
MTL_USING_VEC(short) MTL_USING_VEC(ushort) MTL_USING_VEC(char) MTL_USING_VEC(uchar) MTL_USING_VEC(long)
MTL_USING_VEC(ulong) MTL_USING_VEC(bool)
#undef MTL_USING_VEC
}  // namespace metal

namespace mtl {

template <class T>
struct vtraits {
  static constexpr int n = 1;
  using elem = T;
  static constexpr bool is_vec = false;
};
template <class T, int N>
struct vtraits<T __attribute__((ext_vector_type(N)))> {
  static constexpr int n = N;
  using elem = T;
  static constexpr bool is_vec = true;
};
template <class T>
using elem_t = typename vtraits<T>::elem;
template <class T>
constexpr bool is_vec_v = vtraits<T>::is_vec;
template <class T>
constexpr bool is_float_scalar_v =
    std::is_same_v<T, float> || std::is_same_v<T, half> || std::is_same_v<T, bfloat>;
template <class T>
constexpr bool is_int_scalar_v = std::is_integral_v<T> && !std::is_same_v<T, bool>;
template <class T>
constexpr bool is_float_v = is_float_scalar_v<elem_t<T>>;
template <class T>
constexpr bool is_int_v = is_int_scalar_v<elem_t<T>>;
template <class T>
constexpr bool is_arith_v = is_float_v<T> || is_int_v<T>;

// Vector construction: float4(x), float4(a.xy, b.xy), float4(h4) (element-wise conversion).
template <class T, int N, class A>
inline void put(metal::vec<T, N>& r, int& i, const A& a) {
  if constexpr (is_vec_v<A>) {
    for (int k = 0; k < vtraits<A>::n; ++k) r[i++] = T(a[k]);
  } else {
    r[i++] = T(a);
  }
}
template <class T, int N, class... A>
inline metal::vec<T, N> make(const A&... a) {
  metal::vec<T, N> r{};
  if constexpr (sizeof...(A) == 0) {
    return r;
  } else if constexpr (sizeof...(A) == 1 && (!is_vec_v<A> && ...)) {
    for (int k = 0; k < N; ++k) r[k] = T(a...);
    return r;
  } else {
    static_assert((vtraits<A>::n + ...) == N, "vector constructor: the components do not add up to the size");
    int i = 0;
    (put<T, N>(r, i, a), ...);
    return r;
  }
}

// ---- bounds-checked device pointers ---------------------------------------------------------------
#if MTL_CHECKED
template <class T>
struct dptr {
  T* p = nullptr;
  const mtl_rt::Region* r = nullptr;

  dptr() = default;
  dptr(decltype(nullptr)) {}
  dptr(T* p_, const mtl_rt::Region* r_) : p(p_), r(r_) {}
  // A raw pointer (e.g. &buf[i]) finds its buffer again; one into no argument stays unchecked.
  dptr(T* p_) : p(p_), r(p_ ? mtl_rt_region_of(p_) : nullptr) {}
  template <class U, class = std::enable_if_t<std::is_convertible_v<U*, T*> && !std::is_same_v<U, T>>>
  dptr(const dptr<U>& o) : p(o.p), r(o.r) {}

  T* check(T* q) const {
    if (r && ((const char*)q < r->base || (const char*)q + sizeof(T) > r->base + r->size))
      mtl_rt_oob(r, q, sizeof(T));
    return q;
  }
  T& operator*() const { return *check(p); }
  T* operator->() const { return check(p); }
  template <class I, class = std::enable_if_t<std::is_integral_v<I>>>
  T& operator[](I i) const { return *check(p + i); }
  template <class I, class = std::enable_if_t<std::is_integral_v<I>>>
  dptr operator+(I i) const { return dptr(p + i, r); }
  template <class I, class = std::enable_if_t<std::is_integral_v<I>>>
  friend dptr operator+(I i, const dptr& a) { return dptr(a.p + i, a.r); }
  template <class I, class = std::enable_if_t<std::is_integral_v<I>>>
  dptr operator-(I i) const { return dptr(p - i, r); }
  long operator-(const dptr& o) const { return p - o.p; }
  template <class I> dptr& operator+=(I i) { p += i; return *this; }
  template <class I> dptr& operator-=(I i) { p -= i; return *this; }
  dptr& operator++() { ++p; return *this; }
  dptr& operator--() { --p; return *this; }
  dptr operator++(int) { dptr t = *this; ++p; return t; }
  dptr operator--(int) { dptr t = *this; --p; return t; }
  explicit operator bool() const { return p != nullptr; }
  bool operator==(const dptr& o) const { return p == o.p; }
  bool operator!=(const dptr& o) const { return p != o.p; }
  bool operator<(const dptr& o) const { return p < o.p; }
  bool operator<=(const dptr& o) const { return p <= o.p; }
  bool operator>(const dptr& o) const { return p > o.p; }
  bool operator>=(const dptr& o) const { return p >= o.p; }
};
template <class U, class T>
inline dptr<U> ptr_cast(const dptr<T>& a) { return dptr<U>((U*)a.p, a.r); }
template <class U, class T>
inline dptr<U> ptr_cast(T* a) { return dptr<U>((U*)a); }
template <class T>
inline T* raw(const dptr<T>& a) { return a.check(a.p); }

// A device pointer stored in a buffer (a tensor-list argument): 8 bytes, like on the GPU; it finds its
// tensor's bounds when it is loaded.
template <class T>
struct devptr {
  T* p;
  operator dptr<T>() const { return dptr<T>(p); }
  template <class I, class = std::enable_if_t<std::is_integral_v<I>>>
  T& operator[](I i) const { return dptr<T>(p)[i]; }
};
#else
template <class T>
using dptr = T*;
template <class T>
using devptr = T*;
template <class U, class T>
inline U* ptr_cast(T* a) { return (U*)a; }
template <class T>
inline T* raw(T* a) { return a; }
#endif

// ---- kernel arguments (used by the generated entry wrappers) -------------------------------------
template <class T>
struct is_dptr : std::false_type {};
#if MTL_CHECKED
template <class T>
struct is_dptr<dptr<T>> : std::true_type {};
#endif

inline const mtl_rt::Buffer& buffer(const mtl_rt::LaunchArgs* a, int idx) {
  if (idx >= int(a->nbufs) || a->bufs[idx].ptr == nullptr && a->bufs[idx].size != 0)
    mtl_rt_fail("[error]", "kernel argument buffer not bound");
  return a->bufs[idx];
}

template <class T>
inline T arg(const mtl_rt::LaunchArgs* a, int idx) {
  const mtl_rt::Buffer& b = buffer(a, idx);
  if constexpr (is_dptr<std::remove_cv_t<T>>::value) {
    using P = std::remove_cv_t<T>;
    using E = std::remove_pointer_t<decltype(P().p)>;
    return P((E*)b.ptr, b.region);
  } else if constexpr (std::is_pointer_v<T>) {
    return (T)b.ptr;
  } else if constexpr (std::is_reference_v<T>) {
    using E = std::remove_reference_t<T>;
    if (b.size < sizeof(E)) {
      if (b.region) mtl_rt_oob(b.region, b.ptr, sizeof(E));
      mtl_rt_fail("[oob]", "a reference argument is larger than the bytes passed for it");
    }
    return *(E*)b.ptr;
  } else {
    static_assert(std::is_pointer_v<T>, "kernel buffer arguments must be device/constant pointers or references");
  }
}

template <class T>
inline T builtin(const uint32_t* v) {
  if constexpr (is_vec_v<T>) {
    T r{};
    for (int k = 0; k < vtraits<T>::n; ++k) r[k] = elem_t<T>(v[k]);
    return r;
  } else {
    return T(v[0]);
  }
}
template <class T>
inline T builtin(uint32_t v) {
  static_assert(!is_vec_v<T>, "this attribute is a scalar");
  return T(v);
}

// ---- threadgroup storage --------------------------------------------------------------------------
#if MTL_CHECKED
// A threadgroup array in bounds-checked mode: indexing checks against the whole declaration, as a
// device pointer checks against its buffer; it decays to a checked pointer. `tile[i][j]` of a 2-D
// array goes through a view of the row.
template <class A>
struct tgarray {
  using E = std::remove_extent_t<A>;
  E* p;
  const mtl_rt::Region* r;

  template <class I, class = std::enable_if_t<std::is_integral_v<I>>>
  decltype(auto) operator[](I i) const {
    if constexpr (std::is_array_v<E>) {
      return tgarray<E>{*dptr<E>(p, r).check(p + i), r};
    } else {
      return dptr<E>(p, r)[i];
    }
  }
  template <class U, class = std::enable_if_t<std::is_convertible_v<E*, U*>>>
  operator dptr<U>() const { return dptr<U>(p, r); }
  template <class I, class = std::enable_if_t<std::is_integral_v<I>>>
  dptr<E> operator+(I i) const { return dptr<E>(p + i, r); }
  E& operator*() const { return dptr<E>(p, r)[0]; }
};
#endif

// `threadgroup T name...;`: a view of the threadgroup's storage for it (checked arrays), or a
// reference (scalars; arrays in unchecked mode).
template <class T, int K>
inline decltype(auto) tg_var(const char* name) {
  static const char key = 0;
  const mtl_rt::Region* r = mtl_rt_tg_alloc(&key, sizeof(T), alignof(T), name);
#if MTL_CHECKED
  if constexpr (std::is_array_v<T>) {
    return tgarray<T>{reinterpret_cast<std::remove_extent_t<T>*>(r->base), r};
  } else {
    return *reinterpret_cast<T*>(r->base);
  }
#else
  return *reinterpret_cast<T*>(r->base);
#endif
}

template <class T>
inline T poison() {
  if constexpr (is_vec_v<T>) {
    T r{};
    for (int k = 0; k < vtraits<T>::n; ++k) r[k] = poison<elem_t<T>>();
    return r;
  } else if constexpr (is_float_scalar_v<T>) {
    return T(__builtin_nanf(""));
  } else {
    return T(0x5A5A5A5A);
  }
}

}  // namespace mtl

// ---- math -----------------------------------------------------------------------------------------
namespace metal {

#define MTL_UNARY(name, expr)                                                            \
  inline float name(float x) { return expr; }                                           \
  inline half name(half x) { return half(name(float(x))); }                              \
  inline bfloat name(bfloat x) { return bfloat(name(float(x))); }                        \
  template <class V, class = std::enable_if_t<mtl::is_vec_v<V> && mtl::is_float_v<V>>>  \
  inline V name(V v) {                                                                  \
    V r{};                                                                              \
    for (int k = 0; k < mtl::vtraits<V>::n; ++k) r[k] = name(v[k]);                     \
    return r;                                                                           \
  }

MTL_UNARY(exp, __builtin_expf(x))
MTL_UNARY(exp2, __builtin_exp2f(x))
MTL_UNARY(exp10, __builtin_powf(10.0f, x))
MTL_UNARY(log, __builtin_logf(x))
MTL_UNARY(log2, __builtin_log2f(x))
MTL_UNARY(log10, __builtin_log10f(x))
MTL_UNARY(sqrt, __builtin_sqrtf(x))
MTL_UNARY(rsqrt, 1.0f / __builtin_sqrtf(x))
MTL_UNARY(sin, __builtin_sinf(x))
MTL_UNARY(cos, __builtin_cosf(x))
MTL_UNARY(tan, __builtin_tanf(x))
MTL_UNARY(asin, __builtin_asinf(x))
MTL_UNARY(acos, __builtin_acosf(x))
MTL_UNARY(atan, __builtin_atanf(x))
MTL_UNARY(sinh, __builtin_sinhf(x))
MTL_UNARY(cosh, __builtin_coshf(x))
MTL_UNARY(tanh, __builtin_tanhf(x))
MTL_UNARY(erf, __builtin_erff(x))
MTL_UNARY(fabs, __builtin_fabsf(x))
MTL_UNARY(floor, __builtin_floorf(x))
MTL_UNARY(ceil, __builtin_ceilf(x))
MTL_UNARY(round, __builtin_roundf(x))
MTL_UNARY(rint, __builtin_rintf(x))
MTL_UNARY(trunc, __builtin_truncf(x))
MTL_UNARY(fract, __builtin_fminf(x - __builtin_floorf(x), 0x1.fffffep-1f))
MTL_UNARY(saturate, __builtin_fminf(__builtin_fmaxf(x, 0.0f), 1.0f))
MTL_UNARY(sign, x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : (x == x ? 0.0f : x)))
#undef MTL_UNARY

#define MTL_BINARY(name, expr)                                                           \
  inline float name(float x, float y) { return expr; }                                  \
  inline half name(half x, half y) { return half(name(float(x), float(y))); }            \
  inline bfloat name(bfloat x, bfloat y) { return bfloat(name(float(x), float(y))); }    \
  template <class V, class = std::enable_if_t<mtl::is_vec_v<V> && mtl::is_float_v<V>>>  \
  inline V name(V a, V b) {                                                             \
    V r{};                                                                              \
    for (int k = 0; k < mtl::vtraits<V>::n; ++k) r[k] = name(a[k], b[k]);               \
    return r;                                                                           \
  }

MTL_BINARY(pow, __builtin_powf(x, y))
MTL_BINARY(powr, __builtin_powf(x, y))
MTL_BINARY(atan2, __builtin_atan2f(x, y))
MTL_BINARY(fmod, __builtin_fmodf(x, y))
MTL_BINARY(fmin, __builtin_fminf(x, y))
MTL_BINARY(fmax, __builtin_fmaxf(x, y))
MTL_BINARY(copysign, __builtin_copysignf(x, y))
MTL_BINARY(step, y < x ? 0.0f : 1.0f)
#undef MTL_BINARY

// min/max: fmin/fmax semantics for floating point, as Metal's.
template <class T, class = std::enable_if_t<mtl::is_arith_v<T>>>
inline T min(T a, T b) {
  if constexpr (mtl::is_vec_v<T>) {
    T r{};
    for (int k = 0; k < mtl::vtraits<T>::n; ++k) r[k] = min(a[k], b[k]);
    return r;
  } else if constexpr (mtl::is_float_scalar_v<T>) {
    return T(__builtin_fminf(float(a), float(b)));
  } else {
    return b < a ? b : a;
  }
}
template <class T, class = std::enable_if_t<mtl::is_arith_v<T>>>
inline T max(T a, T b) {
  if constexpr (mtl::is_vec_v<T>) {
    T r{};
    for (int k = 0; k < mtl::vtraits<T>::n; ++k) r[k] = max(a[k], b[k]);
    return r;
  } else if constexpr (mtl::is_float_scalar_v<T>) {
    return T(__builtin_fmaxf(float(a), float(b)));
  } else {
    return a < b ? b : a;
  }
}
template <class T, class = std::enable_if_t<mtl::is_arith_v<T>>>
inline T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }
template <class T, class = std::enable_if_t<mtl::is_arith_v<T>>>
inline T abs(T x) {
  if constexpr (mtl::is_vec_v<T>) {
    T r{};
    for (int k = 0; k < mtl::vtraits<T>::n; ++k) r[k] = abs(x[k]);
    return r;
  } else if constexpr (mtl::is_float_scalar_v<T>) {
    return T(__builtin_fabsf(float(x)));
  } else {
    return x < 0 ? T(-x) : x;
  }
}
template <class T, class = std::enable_if_t<mtl::is_float_v<T>>>
inline T fma(T a, T b, T c) {
  if constexpr (mtl::is_vec_v<T>) {
    T r{};
    for (int k = 0; k < mtl::vtraits<T>::n; ++k) r[k] = fma(a[k], b[k], c[k]);
    return r;
  } else {
    return T(__builtin_fmaf(float(a), float(b), float(c)));
  }
}
template <class T, class = std::enable_if_t<mtl::is_float_v<T>>>
inline T mad(T a, T b, T c) { return fma(a, b, c); }
template <class T, class = std::enable_if_t<mtl::is_float_v<T>>>
inline T mix(T x, T y, T a) { return x + (y - x) * a; }

// select(a, b, c): c ? b : a, element-wise for vectors (c: bool or an integer/bool vector).
template <class T, class C>
inline T select(T a, T b, C c) {
  if constexpr (mtl::is_vec_v<T>) {
    T r{};
    for (int k = 0; k < mtl::vtraits<T>::n; ++k) {
      bool ck;
      if constexpr (mtl::is_vec_v<C>) ck = c[k] != 0; else ck = bool(c);
      r[k] = ck ? b[k] : a[k];
    }
    return r;
  } else {
    return c ? b : a;
  }
}

template <class T>
inline bool isnan(T x) { return float(x) != float(x); }
template <class T>
inline bool isinf(T x) { return __builtin_isinf(float(x)); }
template <class T>
inline bool isfinite(T x) { return __builtin_isfinite(float(x)); }
template <class T>
inline bool signbit(T x) { return __builtin_signbit(float(x)); }

template <class V, class = std::enable_if_t<mtl::is_vec_v<V>>>
inline bool all(V v) {
  for (int k = 0; k < mtl::vtraits<V>::n; ++k) if (!v[k]) return false;
  return true;
}
template <class V, class = std::enable_if_t<mtl::is_vec_v<V>>>
inline bool any(V v) {
  for (int k = 0; k < mtl::vtraits<V>::n; ++k) if (v[k]) return true;
  return false;
}
template <class V, class = std::enable_if_t<mtl::is_vec_v<V> && mtl::is_float_v<V>>>
inline mtl::elem_t<V> dot(V a, V b) {
  float s = 0.0f;
  for (int k = 0; k < mtl::vtraits<V>::n; ++k) s += float(a[k]) * float(b[k]);
  return mtl::elem_t<V>(s);
}
template <class V, class = std::enable_if_t<mtl::is_vec_v<V> && mtl::is_float_v<V>>>
inline mtl::elem_t<V> length(V a) { return mtl::elem_t<V>(__builtin_sqrtf(float(dot(a, a)))); }
template <class V, class = std::enable_if_t<mtl::is_vec_v<V> && mtl::is_float_v<V>>>
inline V normalize(V a) { return a * mtl::elem_t<V>(1.0f / __builtin_sqrtf(float(dot(a, a)))); }

template <class T>
inline uint popcount(T x) { return uint(__builtin_popcountll((unsigned long long)(std::make_unsigned_t<T>)x)); }

template <class To, class From>
inline To as_type(From x) {
  static_assert(sizeof(To) == sizeof(From), "as_type: the types must have the same size");
  return __builtin_bit_cast(To, x);
}

// Metal's fast:: and precise:: variants. On the CPU both are the precise function.
#define MTL_MATH_NAMES(X)                                                                           \
  X(exp) X(exp2) X(exp10) X(log) X(log2) X(log10) X(sqrt) X(rsqrt) X(sin) X(cos) X(tan) X(asin)   \
  X(acos) X(atan) X(sinh) X(cosh) X(tanh) X(erf) X(fabs) X(floor) X(ceil) X(round) X(rint)         \
  X(trunc) X(fract) X(saturate) X(sign) X(pow) X(powr) X(atan2) X(fmod) X(fmin) X(fmax)           \
  X(copysign) X(step) X(min) X(max) X(clamp) X(abs) X(fma) X(mad) X(mix) X(normalize) X(length)
#define MTL_USING(name) using metal::name;
namespace precise { MTL_MATH_NAMES(MTL_USING) }
namespace fast { MTL_MATH_NAMES(MTL_USING) }
#undef MTL_USING
#undef MTL_MATH_NAMES

// ---- barriers -------------------------------------------------------------------------------------
enum class mem_flags : unsigned { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
inline constexpr mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(unsigned(a) | unsigned(b)); }

inline void threadgroup_barrier(mem_flags, uint32_t line = __builtin_LINE(), uint32_t col = __builtin_COLUMN()) {
  mtl_rt_barrier(line, col);
}
inline void simdgroup_barrier(mem_flags, uint32_t line = __builtin_LINE(), uint32_t col = __builtin_COLUMN()) {
  const char nothing = 0;
  mtl_rt_collect(&nothing, 0, line, col);
}

// ---- SIMD-group functions (32 lanes) --------------------------------------------------------------
// Each call is a rendezvous of the SIMD-group's active lanes at that call site. A lane that reads an
// inactive lane (finished, in another branch, or missing from a partial SIMD-group) gets poison (NaN,
// 0x5A5A5A5A), where a GPU gives an undefined value: a kernel that depends on it shows wrong results.
namespace detail {
template <class T>
inline T slot(const mtl_rt::Collect* c, uint32_t lane) {
  T v;
  __builtin_memcpy(&v, c->snap + lane * mtl_rt::kSlotBytes, sizeof(T));
  return v;
}
template <class T>
inline const mtl_rt::Collect* gather(const T& x, uint32_t line, uint32_t col) {
  static_assert(sizeof(T) <= mtl_rt::kSlotBytes, "SIMD-group functions take scalars and vectors up to 16 bytes");
  return mtl_rt_collect(&x, sizeof(T), line, col);
}
template <class T>
inline T read(const mtl_rt::Collect* c, uint32_t src, T own) {
  (void)own;
  if (src >= mtl_rt::kSimdWidth || !(c->mask >> src & 1)) return mtl::poison<T>();
  return slot<T>(c, src);
}
template <class T, class F>
inline T reduce(const T& x, uint32_t line, uint32_t col, F f) {
  const mtl_rt::Collect* c = gather(x, line, col);
  bool first = true;
  T acc{};
  for (uint32_t l = 0; l < mtl_rt::kSimdWidth; ++l) {
    if (!(c->mask >> l & 1)) continue;
    T v = slot<T>(c, l);
    acc = first ? v : f(acc, v);
    first = false;
  }
  return acc;
}
}  // namespace detail

#define MTL_SITE uint32_t line = __builtin_LINE(), uint32_t col = __builtin_COLUMN()

template <class T> inline T simd_sum(T x, MTL_SITE) { return detail::reduce(x, line, col, [](T a, T b) { return T(a + b); }); }
template <class T> inline T simd_product(T x, MTL_SITE) { return detail::reduce(x, line, col, [](T a, T b) { return T(a * b); }); }
template <class T> inline T simd_max(T x, MTL_SITE) { return detail::reduce(x, line, col, [](T a, T b) { return max(a, b); }); }
template <class T> inline T simd_min(T x, MTL_SITE) { return detail::reduce(x, line, col, [](T a, T b) { return min(a, b); }); }
template <class T> inline T simd_and(T x, MTL_SITE) { return detail::reduce(x, line, col, [](T a, T b) { return T(a & b); }); }
template <class T> inline T simd_or(T x, MTL_SITE) { return detail::reduce(x, line, col, [](T a, T b) { return T(a | b); }); }
template <class T> inline T simd_xor(T x, MTL_SITE) { return detail::reduce(x, line, col, [](T a, T b) { return T(a ^ b); }); }

template <class T>
inline T simd_prefix_exclusive_sum(T x, MTL_SITE) {
  const mtl_rt::Collect* c = detail::gather(x, line, col);
  T acc{};
  for (uint32_t l = 0; l < c->lane; ++l)
    if (c->mask >> l & 1) acc = T(acc + detail::slot<T>(c, l));
  return acc;
}
template <class T>
inline T simd_prefix_inclusive_sum(T x, MTL_SITE) {
  const mtl_rt::Collect* c = detail::gather(x, line, col);
  T acc{};
  for (uint32_t l = 0; l <= c->lane; ++l)
    if (c->mask >> l & 1) acc = T(acc + detail::slot<T>(c, l));
  return acc;
}
template <class T>
inline T simd_prefix_exclusive_product(T x, MTL_SITE) {
  const mtl_rt::Collect* c = detail::gather(x, line, col);
  T acc = mtl::elem_t<T>(1);
  for (uint32_t l = 0; l < c->lane; ++l)
    if (c->mask >> l & 1) acc = T(acc * detail::slot<T>(c, l));
  return acc;
}

template <class T, class I>
inline T simd_shuffle(T x, I src, MTL_SITE) {
  const mtl_rt::Collect* c = detail::gather(x, line, col);
  return detail::read(c, uint32_t(src), x);
}
template <class T, class I>
inline T simd_broadcast(T x, I src, MTL_SITE) { return simd_shuffle(x, src, line, col); }
template <class T>
inline T simd_broadcast_first(T x, MTL_SITE) {
  const mtl_rt::Collect* c = detail::gather(x, line, col);
  return detail::slot<T>(c, uint32_t(__builtin_ctzll(c->mask)));
}
// shuffle_down/up leave the upper/lower `delta` lanes' own values unchanged (no wrap-around).
template <class T, class I>
inline T simd_shuffle_down(T x, I delta, MTL_SITE) {
  const mtl_rt::Collect* c = detail::gather(x, line, col);
  const uint32_t src = c->lane + uint32_t(delta);
  if (src >= mtl_rt::kSimdWidth) return x;
  return detail::read(c, src, x);
}
template <class T, class I>
inline T simd_shuffle_up(T x, I delta, MTL_SITE) {
  const mtl_rt::Collect* c = detail::gather(x, line, col);
  if (c->lane < uint32_t(delta)) return x;
  return detail::read(c, c->lane - uint32_t(delta), x);
}
template <class T, class I>
inline T simd_shuffle_xor(T x, I mask, MTL_SITE) {
  const mtl_rt::Collect* c = detail::gather(x, line, col);
  return detail::read(c, (c->lane ^ uint32_t(mask)) & (mtl_rt::kSimdWidth - 1), x);
}

struct simd_vote {
  using vote_t = ulong;
  vote_t v;
  explicit constexpr simd_vote(vote_t x = 0) : v(x) {}
  explicit operator vote_t() const { return v; }
  bool all() const = delete;  // needs the active mask: use simd_all
  bool any() const { return v != 0; }
};
inline simd_vote simd_ballot(bool b, MTL_SITE) {
  const mtl_rt::Collect* c = detail::gather(b, line, col);
  ulong bits = 0;
  for (uint32_t l = 0; l < mtl_rt::kSimdWidth; ++l)
    if ((c->mask >> l & 1) && detail::slot<bool>(c, l)) bits |= ulong(1) << l;
  return simd_vote(bits);
}
inline simd_vote simd_active_threads_mask(MTL_SITE) {
  const bool t = true;
  return simd_vote(detail::gather(t, line, col)->mask);
}
inline bool simd_any(bool b, MTL_SITE) { return simd_ballot(b, line, col).v != 0; }
inline bool simd_all(bool b, MTL_SITE) {
  const mtl_rt::Collect* c = detail::gather(b, line, col);
  for (uint32_t l = 0; l < mtl_rt::kSimdWidth; ++l)
    if ((c->mask >> l & 1) && !detail::slot<bool>(c, l)) return false;
  return true;
}
inline bool simd_is_first(MTL_SITE) {
  const bool t = true;
  const mtl_rt::Collect* c = detail::gather(t, line, col);
  return c->lane == uint32_t(__builtin_ctzll(c->mask));
}
#undef MTL_SITE

// ---- atomics --------------------------------------------------------------------------------------
enum memory_order { memory_order_relaxed = __ATOMIC_RELAXED, memory_order_seq_cst = __ATOMIC_SEQ_CST };

template <class T>
struct atomic {
  using value_type = T;
  T v;
};
using atomic_int = atomic<int>;
using atomic_uint = atomic<uint>;
using atomic_bool = atomic<bool>;
using atomic_float = atomic<float>;
using atomic_ulong = atomic<ulong>;

namespace detail {
template <class A>
inline auto* atomic_addr(A* a) { return &const_cast<std::remove_cv_t<A>*>(a)->v; }
#if MTL_CHECKED
template <class A>
inline auto* atomic_addr(const mtl::dptr<A>& a) { return atomic_addr(mtl::raw(a)); }
#endif
template <class P>
using atomic_value_t = std::remove_pointer_t<decltype(atomic_addr(std::declval<P>()))>;

template <class T, class F>
inline T atomic_update(T* p, F f) {
  T old, desired;
  __atomic_load(p, &old, __ATOMIC_RELAXED);
  do {
    desired = f(old);
  } while (!__atomic_compare_exchange(p, &old, &desired, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
  return old;
}
}  // namespace detail

template <class P, class U>
inline auto atomic_fetch_add_explicit(P obj, U val, memory_order) {
  auto* p = detail::atomic_addr(obj);
  using T = std::remove_pointer_t<decltype(p)>;
  if constexpr (mtl::is_float_scalar_v<T>) {
    return detail::atomic_update(p, [&](T o) { return T(o + T(val)); });
  } else {
    return __atomic_fetch_add(p, T(val), __ATOMIC_RELAXED);
  }
}
template <class P, class U>
inline auto atomic_fetch_sub_explicit(P obj, U val, memory_order) {
  auto* p = detail::atomic_addr(obj);
  using T = std::remove_pointer_t<decltype(p)>;
  if constexpr (mtl::is_float_scalar_v<T>) {
    return detail::atomic_update(p, [&](T o) { return T(o - T(val)); });
  } else {
    return __atomic_fetch_sub(p, T(val), __ATOMIC_RELAXED);
  }
}
template <class P, class U>
inline auto atomic_fetch_max_explicit(P obj, U val, memory_order) {
  auto* p = detail::atomic_addr(obj);
  using T = std::remove_pointer_t<decltype(p)>;
  return detail::atomic_update(p, [&](T o) { return max(o, T(val)); });
}
template <class P, class U>
inline auto atomic_fetch_min_explicit(P obj, U val, memory_order) {
  auto* p = detail::atomic_addr(obj);
  using T = std::remove_pointer_t<decltype(p)>;
  return detail::atomic_update(p, [&](T o) { return min(o, T(val)); });
}
template <class P, class U>
inline auto atomic_fetch_and_explicit(P obj, U val, memory_order) {
  auto* p = detail::atomic_addr(obj);
  return __atomic_fetch_and(p, val, __ATOMIC_RELAXED);
}
template <class P, class U>
inline auto atomic_fetch_or_explicit(P obj, U val, memory_order) {
  auto* p = detail::atomic_addr(obj);
  return __atomic_fetch_or(p, val, __ATOMIC_RELAXED);
}
template <class P, class U>
inline auto atomic_fetch_xor_explicit(P obj, U val, memory_order) {
  auto* p = detail::atomic_addr(obj);
  return __atomic_fetch_xor(p, val, __ATOMIC_RELAXED);
}
template <class P>
inline auto atomic_load_explicit(P obj, memory_order) {
  auto* p = detail::atomic_addr(obj);
  std::remove_pointer_t<decltype(p)> v;
  __atomic_load(p, &v, __ATOMIC_RELAXED);
  return v;
}
template <class P, class U>
inline void atomic_store_explicit(P obj, U val, memory_order) {
  auto* p = detail::atomic_addr(obj);
  std::remove_pointer_t<decltype(p)> v = val;
  __atomic_store(p, &v, __ATOMIC_RELAXED);
}
template <class P, class U>
inline auto atomic_exchange_explicit(P obj, U val, memory_order) {
  auto* p = detail::atomic_addr(obj);
  std::remove_pointer_t<decltype(p)> v = val, old;
  __atomic_exchange(p, &v, &old, __ATOMIC_RELAXED);
  return old;
}
template <class P, class E, class U>
inline bool atomic_compare_exchange_weak_explicit(P obj, E* expected, U desired, memory_order, memory_order) {
  auto* p = detail::atomic_addr(obj);
  std::remove_pointer_t<decltype(p)> d = desired;
  return __atomic_compare_exchange(p, expected, &d, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
}

}  // namespace metal

// Metal's float limits (metal_stdlib provides these as macros).
#define FLT_MAX __FLT_MAX__
#define FLT_MIN __FLT_MIN__
#define FLT_EPSILON __FLT_EPSILON__
#define HALF_MAX half(65504.0f)
#define INFINITY __builtin_inff()
#define NAN __builtin_nanf("")
#define M_PI_F 3.14159265358979323846f
#define M_SQRT2_F 1.41421356237309504880f
#define M_SQRT1_2_F 0.70710678118654752440f
#define M_2_SQRTPI_F 1.12837916709551257390f
#define M_LN2_F 0.69314718055994530942f
#define M_LOG2E_F 1.44269504088896340736f
