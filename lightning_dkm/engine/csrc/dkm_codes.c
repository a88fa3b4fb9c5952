/* Fused CPU passes of the "unique" DKM step over every weight, the compaction of its
 * per-code counts into the distinct values, the weighted core's backward for scalar points
 * with counts, and the grid of average_bits' estimate (the last two at the end;
 * lightning_dkm/engine/native.py).
 *
 * A weight's code is the bit pattern of (x - center) * inverse_unit rounded to float16 (round
 * to nearest even, as PyTorch converts); a palette's table has 65,536 entries, one per bit
 * pattern. Each function goes over P palettes of n weights (row p at p * n, its table at
 * p * 65536) in index order, so that its sums are those of torch.bincount's serial loop, and
 * rounds as the PyTorch ops it replaces do: built with -ffp-contract=off, the one fused
 * multiply-add is the one addcmul_ makes where PyTorch's vectorised kernels make it (the caller
 * says). Tables to add into are zeroed by the caller. -DDKM_PORTABLE builds the conversion
 * without a float16 type or F16C (what older compilers get; the tests build it so too).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define CODES 65536
#define BLOCK 4096 /* weights converted before they are counted (the conversion vectorises) */

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) \
    && defined(__GLIBC__)
/* the gathers vectorise in the AVX2 clone (dispatched by an ifunc: glibc only) */
#define CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

#if defined(__FLT16_MANT_DIG__) && !defined(DKM_PORTABLE)
static inline uint16_t half_bits(float f) {
    _Float16 h = (_Float16)f;
    uint16_t bits;
    memcpy(&bits, &h, sizeof bits);
    return bits;
}
#else
/* IEEE round to nearest even without a float16 type (the FP16 library's method, which
 * PyTorch's c10::Half uses too); a NaN keeps the top of its payload, as the hardware does. */
static inline uint32_t float_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float bits_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t half_bits(float f) {
    float base = fabsf(f) * bits_float(0x77800000u) * bits_float(0x08800000u); /* 2^112 2^-110 */
    const uint32_t w = float_bits(f), shl1_w = w + w, sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = bits_float((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = float_bits(base);
    const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? (0x7E00u | ((w >> 13) & 0x3FFu))
                                                            : nonsign));
}
#endif

static void convert_portable(const float *x, int64_t n, float c, float u, uint16_t *out) {
    for (int64_t i = 0; i < n; ++i) out[i] = half_bits((x[i] - c) * u);
}

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__) && !defined(DKM_PORTABLE)
#include <immintrin.h>
__attribute__((target("avx2,f16c")))
static void convert_f16c(const float *x, int64_t n, float c, float u, uint16_t *out) {
    const __m256 vc = _mm256_set1_ps(c), vu = _mm256_set1_ps(u);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 d = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), vc), vu);
        _mm_storeu_si128((__m128i *)(out + i), _mm256_cvtps_ph(d, _MM_FROUND_TO_NEAREST_INT));
    }
    convert_portable(x + i, n - i, c, u, out + i);
}
static int has_f16c(void) {
    static int known = -1;
    if (known < 0) known = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
    return known;
}
#define CONVERT(x, n, c, u, out) \
    (has_f16c() ? convert_f16c(x, n, c, u, out) : convert_portable(x, n, c, u, out))
#else
#define CONVERT convert_portable
#endif

/* codes[p, i] = half_bits((x[p, i] - center[p]) * inverse_unit[p]) */
void dkm_encode(const float *x, int64_t P, int64_t n, const float *center,
                const float *inverse_unit, uint16_t *codes) {
    for (int64_t p = 0; p < P; ++p) CONVERT(x + p * n, n, center[p], inverse_unit[p], codes + p * n);
}

/* counts[p, code] += 1 for every weight */
void dkm_count(const uint16_t *codes, int64_t P, int64_t n, int64_t *counts) {
    for (int64_t p = 0; p < P; ++p) {
        const uint16_t *row = codes + p * n;
        int64_t *table = counts + p * CODES;
        for (int64_t i = 0; i < n; ++i) ++table[row[i]];
    }
}

/* sums[p, code] += w[p, i], in index order */
void dkm_sum_per_code(const uint16_t *codes, int64_t P, int64_t n, const float *w, float *sums) {
    for (int64_t p = 0; p < P; ++p) {
        const uint16_t *row = codes + p * n;
        const float *weights = w + p * n;
        float *table = sums + p * CODES;
        for (int64_t i = 0; i < n; ++i) table[row[i]] += weights[i];
    }
}

/* out[p, i] = table[p, codes[p, i]] for i < n, rows `stride` apart (a range of the weights) */
CLONES void dkm_look_up(const uint16_t *codes, int64_t P, int64_t n, int64_t stride,
                        const float *table, float *out) {
    for (int64_t p = 0; p < P; ++p) {
        const uint16_t *row = codes + p * stride;
        const float *t = table + p * CODES;
        float *o = out + p * stride;
        for (int64_t i = 0; i < n; ++i) o[i] = t[row[i]];
    }
}

/* out[p, i] = a[p, code] + b[p, code] * g[p, i] with code = codes[p, i]: every weight's
 * gradient in the backward, rounded as index_select + addcmul_ round (one fused multiply-add
 * where `fused`, else the product rounded, then the sum); rows `stride` apart, as above */
CLONES void dkm_look_up_affine(const uint16_t *codes, int64_t P, int64_t n, int64_t stride,
                               const float *a, const float *b, const float *g, float *out,
                               int fused) {
    for (int64_t p = 0; p < P; ++p) {
        const uint16_t *row = codes + p * stride;
        const float *ta = a + p * CODES, *tb = b + p * CODES, *gp = g + p * stride;
        float *o = out + p * stride;
        if (fused)
            for (int64_t i = 0; i < n; ++i) o[i] = fmaf(tb[row[i]], gp[i], ta[row[i]]);
        else
            for (int64_t i = 0; i < n; ++i) o[i] = ta[row[i]] + tb[row[i]] * gp[i];
    }
}

/* The k-th distinct code c of palette p, column col of its row: its flat id p * 65536 + c,
 * palette, rank, bit pattern and count (rounded to float as PyTorch converts an integer) */
static inline void put_distinct(int64_t p, int64_t c, int64_t n, int64_t k, int64_t col,
                                int64_t *ids, int64_t *rows, int64_t *cols, uint16_t *pattern,
                                float *count) {
    ids[k] = p * CODES + c;
    rows[k] = p;
    cols[k] = col;
    pattern[col] = (uint16_t)c;
    count[col] = (float)n;
}

/* zeros after a palette's last distinct code, up to the rows' width */
static inline void pad_distinct(uint16_t *pattern, float *count, int64_t col, int64_t width) {
    for (; col < width; ++col) {
        pattern[col] = 0;
        count[col] = 0.0f;
    }
}

/* occupied[p] = the number of codes of palette p whose count is not 0 */
void dkm_occupied(const int64_t *counts, int64_t P, int64_t *occupied) {
    for (int64_t p = 0; p < P; ++p) {
        const int64_t *table = counts + p * CODES;
        int64_t n = 0;
        for (int64_t c = 0; c < CODES; ++c) n += table[c] != 0;
        occupied[p] = n;
    }
}

/* The occupied codes of every palette in code order (what nonzero() gives): their flat ids
 * p * 65536 + code, palettes and ranks in their palette, and the (P, width) tables of their
 * bit patterns and counts (rounded to float as PyTorch converts an int64), 0 after a palette's
 * last; width is at least the largest dkm_occupied */
void dkm_distinct(const int64_t *counts, int64_t P, int64_t width, int64_t *ids, int64_t *rows,
                  int64_t *cols, uint16_t *patterns, float *table_counts) {
    int64_t k = 0;
    for (int64_t p = 0; p < P; ++p) {
        const int64_t *table = counts + p * CODES;
        uint16_t *pattern = patterns + p * width;
        float *count = table_counts + p * width;
        int64_t col = 0;
        for (int64_t c = 0; c < CODES; ++c)
            if (table[c] != 0)
                put_distinct(p, c, table[c], k++, col++, ids, rows, cols, pattern, count);
        pad_distinct(pattern, count, col, width);
    }
}

/* ---- Tables read at their distinct codes only ------------------------------------------------
 * A palette's codes are a few thousand of its 65,536: after counting, a bitmap of 1024 words per
 * palette marks the codes seen, and the distinct codes come from its set bits in code order
 * (instead of a walk that branches on every entry of the table). A batch's sums per code zero,
 * add into and read only the entries of its codes. */
#define MARK_WORDS (CODES / 64)

/* dkm_encode, counts[p, code] of every code (int32, zeroed here) and marks[p] (written here):
 * bit c of the palette's words set where code c has a weight. A plain count into a zeroed int32
 * table and the marks from it afterwards (a pass of 65,536 compares that vectorises) took half
 * the time of marking inside the count (a branch or a read-modify-write of the mark per weight),
 * and 0.74x that of the int64 count (524,288 weights, 20,000 codes; a throwaway C timer). */
void dkm_encode_mark(const float *x, int64_t P, int64_t n, const float *center,
                     const float *inverse_unit, uint16_t *codes, int32_t *counts,
                     uint64_t *marks) {
    for (int64_t p = 0; p < P; ++p) {
        const float *row = x + p * n;
        uint16_t *out = codes + p * n;
        int32_t *table = counts + p * CODES;
        uint64_t *mark = marks + p * MARK_WORDS;
        memset(table, 0, CODES * sizeof(int32_t));
        for (int64_t start = 0; start < n; start += BLOCK) {
            const int64_t stop = start + BLOCK < n ? start + BLOCK : n;
            CONVERT(row + start, stop - start, center[p], inverse_unit[p], out + start);
            for (int64_t i = start; i < stop; ++i) ++table[out[i]];
        }
        for (int64_t w = 0; w < MARK_WORDS; ++w) {  /* a byte at a time: 2.5x the speed */
            const int32_t *entries = table + w * 64;
            uint64_t word = 0;
            for (int b = 0; b < 64; b += 8) {
                unsigned byte = 0;
                for (int j = 0; j < 8; ++j) byte |= (unsigned)(entries[b + j] != 0) << j;
                word |= (uint64_t)byte << b;
            }
            mark[w] = word;
        }
    }
}

static inline int64_t bits_set(uint64_t word) {
#if defined(__GNUC__) || defined(__clang__)
    return __builtin_popcountll(word);
#else
    int64_t n = 0;
    for (; word; word &= word - 1) ++n;
    return n;
#endif
}

static inline int lowest_bit(uint64_t word) {
#if defined(__GNUC__) || defined(__clang__)
    return __builtin_ctzll(word);
#else
    int b = 0;
    while (!(word & 1)) { word >>= 1; ++b; }
    return b;
#endif
}

/* occupied[p] = the number of codes marked in palette p */
void dkm_marked_occupied(const uint64_t *marks, int64_t P, int64_t *occupied) {
    for (int64_t p = 0; p < P; ++p) {
        int64_t n = 0;
        for (int64_t w = 0; w < MARK_WORDS; ++w) n += bits_set(marks[p * MARK_WORDS + w]);
        occupied[p] = n;
    }
}

/* dkm_distinct over the marked codes (their counts from dkm_encode_mark's table) */
void dkm_marked_distinct(const int32_t *counts, const uint64_t *marks, int64_t P,
                         int64_t width, int64_t *ids, int64_t *rows, int64_t *cols,
                         uint16_t *patterns, float *table_counts) {
    int64_t k = 0;
    for (int64_t p = 0; p < P; ++p) {
        const int32_t *table = counts + p * CODES;
        const uint64_t *mark = marks + p * MARK_WORDS;
        uint16_t *pattern = patterns + p * width;
        float *count = table_counts + p * width;
        int64_t col = 0;
        for (int64_t w = 0; w < MARK_WORDS; ++w) {
            for (uint64_t word = mark[w]; word; word &= word - 1) {
                const int64_t c = w * 64 + lowest_bit(word);
                put_distinct(p, c, table[c], k++, col++, ids, rows, cols, pattern, count);
            }
        }
        pad_distinct(pattern, count, col, width);
    }
}

/* Whether ids[v], rows[v], cols[v] for v0 <= v < v1 stay inside a tensor of P palettes from
 * row row0 (ids[v] in row0 * 65536 .. (row0 + P) * 65536) and a compact table of R rows of
 * width entries: the loops below write nothing where one does not (their caller's indices
 * come from dkm_marked_distinct, so this is a guard, not a branch taken) */
static int indices_fit(const int64_t *ids, const int64_t *rows, const int64_t *cols, int64_t v0,
                       int64_t v1, int64_t row0, int64_t P, int64_t R, int64_t width) {
    for (int64_t v = v0; v < v1; ++v)
        if (ids[v] < row0 * CODES || ids[v] >= (row0 + P) * CODES || rows[v] < 0
            || rows[v] >= R || cols[v] < 0 || cols[v] >= width)
            return 0;
    return 1;
}

/* For the codes v0 <= v < v1 of a batch's distinct values (ids[v] = row * 65536 + code, the
 * rows row0 .. row0 + P - 1 being a tensor's P palettes): the sum of w over the weights of
 * each code, added in index order (dkm_sum_per_code's sums), written to
 * compact[rows[v] * width + cols[v]] (R rows). scratch holds P * 65536 floats; only the
 * entries of those codes are zeroed and read. Returns 0, or 1 (nothing written) where an
 * index is out of range. */
int dkm_sums_at(const uint16_t *codes, int64_t P, int64_t n, const float *w, float *scratch,
                const int64_t *ids, const int64_t *rows, const int64_t *cols, int64_t v0,
                int64_t v1, int64_t row0, int64_t R, int64_t width, float *compact) {
    if (!indices_fit(ids, rows, cols, v0, v1, row0, P, R, width)) return 1;
    const int64_t base = row0 * CODES;
    for (int64_t v = v0; v < v1; ++v) scratch[ids[v] - base] = 0.0f;
    for (int64_t p = 0; p < P; ++p) {
        const uint16_t *row = codes + p * n;
        const float *weights = w + p * n;
        float *table = scratch + p * CODES;
        for (int64_t i = 0; i < n; ++i) table[row[i]] += weights[i];
    }
    for (int64_t v = v0; v < v1; ++v) compact[rows[v] * width + cols[v]] = scratch[ids[v] - base];
    return 0;
}

/* dense[ids[v]] = compact[rows[v] * width + cols[v]] for v < V: a per-value table of R rows
 * spread over the codes of its R palettes (the other entries are not written: no weight reads
 * them). Returns 0, or 1 (nothing written) where an index is out of range. */
int dkm_spread(const float *compact, int64_t R, int64_t width, const int64_t *ids,
               const int64_t *rows, const int64_t *cols, int64_t V, float *dense) {
    if (!indices_fit(ids, rows, cols, 0, V, 0, R, R, width)) return 1;
    for (int64_t v = 0; v < V; ++v) dense[ids[v]] = compact[rows[v] * width + cols[v]];
    return 0;
}

/* ---- The nearest centroid of scalar weights (kmeans.py's _nearest_1d) -----------------------
 * idx[p, i] = the original index of the centroid of palette p nearest to x[p, i] by |x - c|,
 * ties to the lower original index, from the palette's k centroids sorted ascending (sorted,
 * their original indices order), as the PyTorch ops find it: torch.searchsorted's lower bound
 * (the first j with sorted[j] >= x), then the two neighbours compared, the lower one taken at
 * the first of a run of equal centroids (its lowest original index). Where no centroid is
 * NaN the predicate !(sorted[j] >= x) holds for a prefix of j, so the bound is the number of j
 * it holds for: counted a block of weights at a time (the count vectorises over the weights,
 * where a binary search branches unpredictably); a palette with a NaN centroid (sorted last)
 * takes searchsorted's own binary search, which then stops elsewhere than the count. */
#define NEAREST_BLOCK 256

static inline int64_t lower_bound(const float *s, int64_t k, float v) {
    int64_t start = 0, end = k;
    while (start < end) {
        const int64_t mid = start + ((end - start) >> 1);
        if (!(s[mid] >= v)) start = mid + 1;
        else end = mid;
    }
    return start;
}

CLONES void dkm_nearest_sorted(const float *x, int64_t P, int64_t n, const float *sorted,
                               const int64_t *order, int64_t k, int64_t *idx) {
    int64_t count[NEAREST_BLOCK];
    for (int64_t p = 0; p < P; ++p) {
        const float *row = x + p * n, *s = sorted + p * k;
        const int64_t *o = order + p * k;
        int64_t *out = idx + p * n;
        const int counted = !isnan(s[k - 1]);  /* NaN sorts last */
        for (int64_t start = 0; start < n; start += NEAREST_BLOCK) {
            const int64_t m = start + NEAREST_BLOCK < n ? NEAREST_BLOCK : n - start;
            const float *v = row + start;
            if (counted) {
                for (int64_t i = 0; i < m; ++i) count[i] = 0;
                for (int64_t j = 0; j < k; ++j) {
                    const float sj = s[j];
                    for (int64_t i = 0; i < m; ++i) count[i] += !(sj >= v[i]);
                }
            } else {
                for (int64_t i = 0; i < m; ++i) count[i] = lower_bound(s, k, v[i]);
            }
            for (int64_t i = 0; i < m; ++i) {
                const int64_t pos = count[i];
                int64_t lo = pos - 1 < 0 ? 0 : (pos - 1 > k - 1 ? k - 1 : pos - 1);
                const int64_t hi = pos > k - 1 ? k - 1 : pos;
                while (lo > 0 && s[lo - 1] == s[lo]) --lo;  /* a value given twice: its first */
                const float d_lo = fabsf(v[i] - s[lo]), d_hi = fabsf(v[i] - s[hi]);
                const int take_hi = d_hi < d_lo || (d_hi == d_lo && o[hi] < o[lo]);
                out[start + i] = take_hi ? o[hi] : o[lo];
            }
        }
    }
}

/* ---- The weighted core's backward for scalar points with counts (weighted.py) ----------
 * Both loops walk a chunk of m points of P palettes with k <= CORE_MAX_K centroids: the
 * attention a (rows of m points with stride a_j between centroids, a_p between palettes),
 * each point's value x and what it is weighted by, a block of CORE_LANES points at a time
 * (the lanes vectorise). The per-point sums over the centroids run in centroid order; the
 * sums over the points are float32 partial sums per lane, added at the end: the values of the
 * PyTorch ops up to that summation order (their products run in the BLAS's order). */
#define CORE_LANES 16
#define CORE_MAX_K 256

/* One round back (_round_backward, scalar points with counts), with t = 2 / tau of palette p:
 *   b_j = (x_u - cn_j) H_j,  s = sum_j a_uj b_j,  delta_uj = (b_j - s) a_uj,
 *   shared_u += sum_j H_j a_uj + sum_j (c_j t) delta_uj,
 *   to_c_j = (sum_u wx_u delta_uj - c_j sum_u w_u delta_uj) t
 * with w the points' counts and wx their counts times their values. */
CLONES void dkm_round_backward(int64_t P, int64_t k, int64_t m, const float *a, int64_t a_p,
                               int64_t a_j, const float *x, int64_t x_p, const float *w,
                               const float *wx, int64_t w_p, const float *c, const float *cn,
                               const float *H, const float *t, float *shared, int64_t s_p,
                               float *to_c) {
    float cs[CORE_MAX_K], acc0[CORE_MAX_K][CORE_LANES], acc1[CORE_MAX_K][CORE_LANES];
    for (int64_t p = 0; p < P; ++p) {
        const float *ap = a + p * a_p, *xp = x + p * x_p, *wp = w + p * w_p, *wxp = wx + p * w_p;
        const float *cp = c + p * k, *cnp = cn + p * k, *Hp = H + p * k;
        float *sp = shared + p * s_p;
        for (int64_t j = 0; j < k; ++j) {
            cs[j] = cp[j] * t[p];
            for (int l = 0; l < CORE_LANES; ++l) acc0[j][l] = acc1[j][l] = 0.0f;
        }
        for (int64_t u0 = 0; u0 < m; u0 += CORE_LANES) {
            const int lanes = m - u0 < CORE_LANES ? (int)(m - u0) : CORE_LANES;
            float xv[CORE_LANES], s[CORE_LANES], part[CORE_LANES], through[CORE_LANES];
            for (int l = 0; l < CORE_LANES; ++l) {
                xv[l] = l < lanes ? xp[u0 + l] : 0.0f;
                s[l] = part[l] = through[l] = 0.0f;
            }
            if (lanes == CORE_LANES) {
                for (int64_t j = 0; j < k; ++j) {
                    const float *aj = ap + j * a_j + u0;
                    for (int l = 0; l < CORE_LANES; ++l) s[l] += aj[l] * ((xv[l] - cnp[j]) * Hp[j]);
                }
                for (int64_t j = 0; j < k; ++j) {
                    const float *aj = ap + j * a_j + u0;
                    for (int l = 0; l < CORE_LANES; ++l) {
                        const float d = ((xv[l] - cnp[j]) * Hp[j] - s[l]) * aj[l];
                        part[l] += Hp[j] * aj[l];
                        through[l] += cs[j] * d;
                        acc0[j][l] += wp[u0 + l] * d;
                        acc1[j][l] += wxp[u0 + l] * d;
                    }
                }
            } else {
                for (int l = 0; l < lanes; ++l) {
                    for (int64_t j = 0; j < k; ++j)
                        s[l] += ap[j * a_j + u0 + l] * ((xv[l] - cnp[j]) * Hp[j]);
                    for (int64_t j = 0; j < k; ++j) {
                        const float aj = ap[j * a_j + u0 + l];
                        const float d = ((xv[l] - cnp[j]) * Hp[j] - s[l]) * aj;
                        part[l] += Hp[j] * aj;
                        through[l] += cs[j] * d;
                        acc0[j][l] += wp[u0 + l] * d;
                        acc1[j][l] += wxp[u0 + l] * d;
                    }
                }
            }
            for (int l = 0; l < lanes; ++l) sp[u0 + l] += part[l] + through[l];
        }
        for (int64_t j = 0; j < k; ++j) {
            float r0 = 0.0f, r1 = 0.0f;
            for (int l = 0; l < CORE_LANES; ++l) {
                r0 += acc0[j][l];
                r1 += acc1[j][l];
            }
            to_c[p * k + j] = (r1 - cp[j] * r0) * t[p];
        }
    }
}

/* The last round's local part (_local, scalar points with counts) and the loss gradient of
 * the final centroids, with G_u the loss gradient of point u summed over its copies:
 *   y_u = sum_j cn_j a_uj,  delta_uj = (cn_j - y_u) a_uj,  local_u = sum_j (c_j t) delta_uj,
 *   to_c_j = (sum_u (x_u G_u) delta_uj - c_j sum_u G_u delta_uj) t,  U_j = sum_u a_uj G_u */
CLONES void dkm_local_backward(int64_t P, int64_t k, int64_t m, const float *a, int64_t a_p,
                               int64_t a_j, const float *x, int64_t x_p, const float *G,
                               int64_t g_p, const float *c, const float *cn, const float *t,
                               float *local, int64_t l_p, float *to_c, float *U) {
    float cs[CORE_MAX_K], acc0[CORE_MAX_K][CORE_LANES], acc1[CORE_MAX_K][CORE_LANES],
        accu[CORE_MAX_K][CORE_LANES];
    for (int64_t p = 0; p < P; ++p) {
        const float *ap = a + p * a_p, *xp = x + p * x_p, *gp = G + p * g_p;
        const float *cp = c + p * k, *cnp = cn + p * k;
        float *lp = local + p * l_p;
        for (int64_t j = 0; j < k; ++j) {
            cs[j] = cp[j] * t[p];
            for (int l = 0; l < CORE_LANES; ++l) acc0[j][l] = acc1[j][l] = accu[j][l] = 0.0f;
        }
        for (int64_t u0 = 0; u0 < m; u0 += CORE_LANES) {
            const int lanes = m - u0 < CORE_LANES ? (int)(m - u0) : CORE_LANES;
            float g[CORE_LANES], gx[CORE_LANES], y[CORE_LANES], out[CORE_LANES];
            for (int l = 0; l < CORE_LANES; ++l) {
                g[l] = l < lanes ? gp[u0 + l] : 0.0f;
                gx[l] = l < lanes ? xp[u0 + l] * g[l] : 0.0f;
                y[l] = out[l] = 0.0f;
            }
            if (lanes == CORE_LANES) {
                for (int64_t j = 0; j < k; ++j) {
                    const float *aj = ap + j * a_j + u0;
                    for (int l = 0; l < CORE_LANES; ++l) {
                        y[l] += cnp[j] * aj[l];
                        accu[j][l] += aj[l] * g[l];
                    }
                }
                for (int64_t j = 0; j < k; ++j) {
                    const float *aj = ap + j * a_j + u0;
                    for (int l = 0; l < CORE_LANES; ++l) {
                        const float d = (cnp[j] - y[l]) * aj[l];
                        out[l] += cs[j] * d;
                        acc0[j][l] += g[l] * d;
                        acc1[j][l] += gx[l] * d;
                    }
                }
            } else {
                for (int l = 0; l < lanes; ++l) {
                    for (int64_t j = 0; j < k; ++j) {
                        const float aj = ap[j * a_j + u0 + l];
                        y[l] += cnp[j] * aj;
                        accu[j][l] += aj * g[l];
                    }
                    for (int64_t j = 0; j < k; ++j) {
                        const float aj = ap[j * a_j + u0 + l];
                        const float d = (cnp[j] - y[l]) * aj;
                        out[l] += cs[j] * d;
                        acc0[j][l] += g[l] * d;
                        acc1[j][l] += gx[l] * d;
                    }
                }
            }
            for (int l = 0; l < lanes; ++l) lp[u0 + l] = out[l];
        }
        for (int64_t j = 0; j < k; ++j) {
            float r0 = 0.0f, r1 = 0.0f, ru = 0.0f;
            for (int l = 0; l < CORE_LANES; ++l) {
                r0 += acc0[j][l];
                r1 += acc1[j][l];
                ru += accu[j][l];
            }
            to_c[p * k + j] = (r1 - cp[j] * r0) * t[p];
            U[p * k + j] = ru;
        }
    }
}

/* ---- The grid of average_bits' estimate (lightning_dkm/model/bit_budget.py, _snap) ----
 *
 * A palette's values v = x / unit (unit a power of two: v in [-1, 1]; computed as x times
 * 1 / unit, the same exact product rounded once) fall in the cells of the grid of multiples of
 * 1 / grid (a power of two): cell c = round(v * grid) + grid of 2 * grid + 1 (round to
 * nearest even, as torch.round), offset r = (v * grid - round(v * grid)) / grid, each in float32 as the PyTorch
 * ops compute them. The weights are taken in pieces of `piece` columns (all palettes' columns
 * j0 .. j1 - 1 of a piece, then the next), and each piece's float64 sums per cell are added
 * sequentially from 0, then added to the running sums: what `sums += torch.bincount(
 * cells_of_piece, values, size)` gives per piece, bit for bit. A piece of a palette with at
 * least as many columns as cells sums into a zeroed table of every cell; a narrower one (many
 * palettes) lists the cells it touched instead, so that it costs its columns, not the grid
 * (`seen` (size,) holds per cell the last piece and palette that touched it, -1 at first).
 * It returns 1 where a value falls outside the grid (a unit that is not the palette's: the
 * sums are then incomplete), else 0. */

typedef struct {
    double *part;     /* tables x size partial sums of the piece */
    int64_t *seen, *touched, count, size, tables;
    int dense;
} grid_piece;

static inline void piece_begin(grid_piece *g, int64_t columns) {
    g->dense = columns >= g->size;
    g->count = 0;
    if (g->dense) memset(g->part, 0, (size_t)(g->tables * g->size) * sizeof(double));
}

static inline void piece_touch(grid_piece *g, int64_t c, int64_t stamp) {
    if (g->dense || g->seen[c] == stamp) return;
    g->seen[c] = stamp;
    for (int64_t t = 0; t < g->tables; ++t) g->part[t * g->size + c] = 0.0;
    g->touched[g->count++] = c;
}

/* out_t[c] += part_t[c] for the cells the piece touched (every cell of a dense piece: adding
 * 0 changes no sum, which is never -0: it starts at +0) */
static inline void piece_end(const grid_piece *g, double *const *out) {
    for (int64_t t = 0; t < g->tables; ++t) {
        const double *part = g->part + t * g->size;
        double *o = out[t];
        if (o == NULL) continue;  /* a table the pass does not fill */
        if (g->dense)
            for (int64_t c = 0; c < g->size; ++c) o[c] += part[c];
        else
            for (int64_t i = 0; i < g->count; ++i) o[g->touched[i]] += part[g->touched[i]];
    }
}

/* grid a power of two: times 1 / grid is the division, rounded once as it is */
static inline int grid_cell(float x, float inverse_unit, float g, int64_t grid, int64_t *cell,
                            float *offset) {
    const float t = (x * inverse_unit) * g, rounded = nearbyintf(t);
    if (!(rounded >= -(float)grid && rounded <= (float)grid)) return 1;
    *cell = (int64_t)rounded + grid;
    *offset = (t - rounded) * (1.0f / g);
    return 0;
}

/* One pass over the grid (P * size cells), in pieces as above. Where `counts` is given: per
 * cell the number of weights (int64) and the sum of their values v in float64 (`sums`). Where
 * `total` is given, for a sensitivity f (P, n) (f_type 0: none, 1 everywhere; 1: float32; 2:
 * float64): per cell F = sum f (`total`) and F_r = sum f r (`first`), and per palette sum f r^2
 * (`second`), in float64 (f and r converted, f r rounded, then f r r). All added into. `part`
 * holds 3 * size. */
CLONES int dkm_grid(const float *x, int64_t P, int64_t n, const float *unit, int64_t grid,
                    int64_t piece, int64_t *counts, double *sums, const void *f, int f_type,
                    double *total, double *first, double *second, double *part, int64_t *seen,
                    int64_t *touched) {
    const int64_t size = 2 * grid + 1;
    const float g = (float)grid;
    grid_piece gp = {part, seen, touched, 0, size, 3, 0};
    double *part_sum = part, *part_total = part + size, *part_first = part + 2 * size;
    int64_t stamp = 0;
    for (int64_t j0 = 0; j0 < n; j0 += piece) {
        const int64_t j1 = n - j0 > piece ? j0 + piece : n;
        for (int64_t p = 0; p < P; ++p, ++stamp) {
            const float *row = x + p * n;
            const float inverse = 1.0f / unit[p];
            int64_t *count = counts ? counts + p * size : NULL;
            double *out[3] = {sums ? sums + p * size : NULL, total ? total + p * size : NULL,
                              first ? first + p * size : NULL};
            double square = 0.0;
            piece_begin(&gp, j1 - j0);
            for (int64_t j = j0; j < j1; ++j) {
                int64_t c;
                float r32;
                if (grid_cell(row[j], inverse, g, grid, &c, &r32)) return 1;
                piece_touch(&gp, c, stamp);
                if (count) {
                    ++count[c];
                    part_sum[c] += (double)(row[j] * inverse);
                }
                if (total) {
                    const double r = (double)r32;
                    const double w = f_type == 0 ? 1.0 : f_type == 1
                        ? (double)((const float *)f)[p * n + j] : ((const double *)f)[p * n + j];
                    const double fr = w * r;
                    part_total[c] += w;
                    part_first[c] += fr;
                    square += fr * r;
                }
            }
            piece_end(&gp, out);
            if (total) second[p] += square;
        }
    }
    return 0;
}

/* ---- The exact 1-D k-means program (lightning_dkm/engine/optimal1d.py, _optimal_starts) ----
 *
 * For P palettes of M bins with prefix sums (3, P, M + 1) of w, w m and w m^2 (float64), row j
 * of the program holds D_j(i), the least cost of bins 0..i in j + 1 runs, and choice (k, P, M)
 * (int32) the start t of the last run of that optimum. Row 0 is one run; row j's node i takes
 * the least of D_{j-1}(t - 1) - q(t) - (s(i+1) - s(t))^2 / max(w(i+1) - w(t), tiny) over t in
 * [max(left, previous row's best at i), min(right, i)] (the first such t on ties; an empty
 * range keeps its low end and an infinite cost), plus q(i + 1), with left and right the best t
 * of its nearest computed neighbours in the divide and conquer: the last i first (between j and
 * M - 1), then the rest by halves. The last row computes only its last i. Every value is the
 * PyTorch ops' operation for operation (rounded as they are, no fused multiply-add), so the
 * choices are theirs bit for bit. `D` and `row` hold M doubles each. */

typedef struct {
    const double *w, *s, *q; /* the palette's prefix sums */
    const double *before;    /* D_{j-1}(t - 1) - q(t) */
    double *row;             /* D_j */
    int32_t *best, *previous; /* this row's and the previous row's choices */
    double tiny;
} dp_row;

static int64_t dp_node(const dp_row *r, int64_t i, int64_t lo, int64_t hi) {
    const double w_end = r->w[i + 1], s_end = r->s[i + 1];
    if (hi < lo) {
        r->row[i] = INFINITY;
        r->best[i] = (int32_t)lo;
        return lo;
    }
    double least = 0.0;
    int64_t arg = lo;
    for (int64_t t = lo; t <= hi; ++t) {
        double w = w_end - r->w[t], s = s_end - r->s[t];
        w = w < r->tiny ? r->tiny : w;
        s = s * s;
        const double value = r->before[t] - s / w;
        if (t == lo || value < least) {
            least = value;
            arg = t;
        }
    }
    r->row[i] = least + r->q[i + 1];
    r->best[i] = (int32_t)arg;
    return arg;
}

/* nodes lo_i .. hi_i (i) with the best t of their left and right neighbours */
static void dp_range(const dp_row *r, int64_t lo_i, int64_t hi_i, int64_t left, int64_t right) {
    while (lo_i <= hi_i) {
        const int64_t mid = (lo_i + hi_i) / 2;
        const int64_t prev = r->previous[mid];
        const int64_t lo = left > prev ? left : prev, hi = right < mid ? right : mid;
        const int64_t t = dp_node(r, mid, lo, hi);
        dp_range(r, lo_i, mid - 1, left, t);
        lo_i = mid + 1; /* the right half: a loop, not a call */
        left = t;
    }
}

void dkm_optimal_choices(const double *prefix, int64_t P, int64_t M, int64_t k, double tiny,
                         int32_t *choice, double *D, double *row, double *before) {
    const int64_t M1 = M + 1;
    for (int64_t p = 0; p < P; ++p) {
        const double *w = prefix + p * M1, *s = prefix + (P + p) * M1,
                     *q = prefix + (2 * P + p) * M1;
        for (int64_t i = 0; i < M; ++i) {
            double ww = w[i + 1] - w[0], ss = s[i + 1] - s[0];
            ww = ww < tiny ? tiny : ww;
            ss = ss * ss;
            D[i] = q[i + 1] - ss / ww;
            choice[p * M + i] = 0;
        }
        for (int64_t j = 1; j < k; ++j) {
            int32_t *best = choice + (j * P + p) * M;
            const int32_t *previous_row = choice + ((j - 1) * P + p) * M;
            /* row 1 has no previous bound (0); the last row computes its last i only, and keeps
             * the previous row's choices elsewhere, as the PyTorch ops leave them */
            before[0] = INFINITY - q[0];
            for (int64_t t = 1; t < M1; ++t) before[t] = D[t - 1] - q[t];
            for (int64_t i = 0; i < M; ++i) best[i] = j == 1 ? 0 : previous_row[i];
            dp_row r = {w, s, q, before, row, best, best, tiny};
            const int64_t root = dp_node(&r, M - 1, j > best[M - 1] ? j : best[M - 1], M - 1);
            if (j < k - 1) dp_range(&r, 0, M - 2, j, root);
            double *swap = D;
            D = row;
            row = swap;
        }
    }
}
