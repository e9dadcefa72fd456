/* Gefen's fast CPU path: the step, the first-step histogram and the period scores, over every
 * tensor of a bucket in one call, threaded with OpenMP.
 *
 * The arithmetic mirrors gefen_compile/kernels/torch_step.py operation by operation (fp32 math,
 * fp64 for fp64 state), and the build disables floating-point contraction, so the codes match the
 * core implementation bit for bit; only the order of the block sums of g^2 differs.
 *
 * Loaded with ctypes (the Python side passes data pointers); the module init below only lets the
 * build tools treat the file as an extension module.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2, DT_F64 = 3 };
/* Columns of a bucket's segment table (gefen_compile/state.py): one row per parameter. */
enum { SEG_ROW0, SEG_BLOCK, SEG_CODE, SEG_V, SEG_V_PER_ELEMENT, SEG_NUMEL, SEG_FIELDS };
enum { H_LR, H_BETA1, H_BETA2, H_EPS, H_WD, H_MAXIMIZE, H_FIELDS };

#define NUM_BINS 4096

typedef struct {
    int64_t num_rows;               /* magnitude blocks, numbered across the bucket */
    const int64_t *segments;        /* [num_params][SEG_FIELDS] */
    int64_t num_params;
    void *const *params;            /* data pointer per parameter */
    const void *const *grads;       /* data pointer per parameter */
    const uint8_t *has_grad;        /* per parameter: 0 skips it this step */
    const int64_t *param_group;     /* group index per parameter */
    const double *hyper;            /* [groups][H_FIELDS] */
    uint8_t *codes;
    void *magnitude;
    void *vmean;
    float *steps;                   /* per parameter */
    const void *codebook;           /* 256 entries, float (or double for fp64 state) */
    const int32_t *lut;             /* [2 * lut_half]: boundaries below each cell */
    const void *bounds;             /* distinct-entry boundaries, then +inf */
    const int32_t *first_index;     /* boundary count -> code */
    int64_t num_distinct;           /* distinct entries (256: the codebook repeats none) */
    int64_t lut_half;               /* cells per unit: a power of two */
    int64_t num_threads;
    int64_t short_row;              /* rows up to this long may be stepped in batches (0: none) */
    /* [num_params][2], or NULL: for a parameter stored channels_last (its gradient too), its
     * channels I and spatial size S: each output channel's I x S logical elements lie in memory
     * as S x I (run_rows steps them through a logical copy); 0 0 for one in logical order.
     * Python guarantees that a block divides I * S or I * S divides the block, both at most
     * CHUNK_ELEMENTS. */
    const int64_t *layout;
} StepArgs;

/* ---- storage formats ---- */

static inline float bf16_to_f32(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch */
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint16_t rounded = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    return (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)0x7fc0 : rounded; /* NaN stays NaN */
}

#define LOAD_F32(ptr, i) (((const float *)(ptr))[i])
#define STORE_F32(ptr, i, v) (((float *)(ptr))[i] = (v))
#define LOAD_BF16(ptr, i) bf16_to_f32(((const uint16_t *)(ptr))[i])
#define STORE_BF16(ptr, i, v) (((uint16_t *)(ptr))[i] = f32_to_bf16(v))
#define LOAD_F16(ptr, i) ((float)((const _Float16 *)(ptr))[i])
#define STORE_F16(ptr, i, v) (((_Float16 *)(ptr))[i] = (_Float16)(v))
#define LOAD_F64(ptr, i) (((const double *)(ptr))[i])
#define STORE_F64(ptr, i, v) (((double *)(ptr))[i] = (v))

static inline double load_any(const void *ptr, int64_t i, int dtype) {
    switch (dtype) {
    case DT_F32: return LOAD_F32(ptr, i);
    case DT_BF16: return LOAD_BF16(ptr, i);
    case DT_F16: return LOAD_F16(ptr, i);
    default: return LOAD_F64(ptr, i);
    }
}

/* ---- the step ---- */

/* Bias corrections per parameter (and its step count), before any row is touched. */
static void count_steps(const StepArgs *a, double *bias1, double *bias2) {
    /* parameters in a row usually share betas and step: pow() once for them */
    double beta1 = NAN, beta2 = NAN, t = NAN, last1 = 0, last2 = 0;
    for (int64_t p = 0; p < a->num_params; p++) {
        if (!a->has_grad[p]) continue;
        const double *h = a->hyper + a->param_group[p] * H_FIELDS;
        a->steps[p] += 1.0f;
        if (h[H_BETA1] != beta1 || h[H_BETA2] != beta2 || (double)a->steps[p] != t) {
            beta1 = h[H_BETA1], beta2 = h[H_BETA2], t = (double)a->steps[p];
            last1 = 1.0 - pow(beta1, t), last2 = 1.0 - pow(beta2, t);
        }
        bias1[p] = last1, bias2[p] = last2;
    }
}

typedef struct BytePlanes BytePlanes; /* the byte-plane rows' tables, below */

/* What every row of one call shares. */
typedef struct {
    const StepArgs *a;
    const double *bias1, *bias2; /* per parameter */
    const BytePlanes *planes;    /* the byte-plane rows' tables */
    const struct CellTable *cells; /* the AVX2 rows' table */
    const int64_t (*chunks)[2];  /* the threads' chunks of rows (row_chunks) */
    int64_t num_chunks;
    int64_t size;                /* bytes an element of the parameters and gradients */
    char *scratch;               /* per thread, scratch_bytes: see run_rows */
    size_t scratch_bytes;
    /* permute_channels, or its AVX2 tiles where the path has AVX2 */
    void (*permute)(char *, char *, int64_t, int64_t, int64_t, int64_t, int64_t, int);
} Step;

/* Rows up to this long keep their first moments from the first pass; longer ones recompute.
 * A multiple of 64, the byte-plane rows' chunk; large enough for the rows of common LLM matrices
 * (8192: Llama's MLP), small enough for a thread's stack. */
#define TILE 8192

/* The block's sum of g^2 is taken in one fixed order on every path, so that all give the same
 * bits: element i goes to running sum i % SUM_LANES, then the halves are added pairwise. */
#define SUM_LANES 16
#define FOLD_LANES(lanes)                                                                       \
    for (int w = SUM_LANES / 2; w > 0; w /= 2)                                                  \
        for (int l = 0; l < w; l++) (lanes)[l] += (lanes)[l + w];

/* Parameter p's constants (T: compute type). */
#define PARAM_SETUP(T)                                                                          \
    const StepArgs *a = s->a;                                                                   \
    const int64_t *seg = a->segments + p * SEG_FIELDS;                                          \
    const int64_t block = seg[SEG_BLOCK];                                                       \
    const int per_element = seg[SEG_V_PER_ELEMENT] != 0, identity = a->num_distinct == 256;     \
    const double *h = a->hyper + a->param_group[p] * H_FIELDS;                                  \
    const T beta1 = (T)h[H_BETA1], keep1 = (T)(1.0 - h[H_BETA1]);                              \
    const T beta2 = (T)h[H_BETA2], keep2 = (T)(1.0 - h[H_BETA2]);                              \
    const T eps = (T)h[H_EPS], sign = h[H_MAXIMIZE] != 0.0 ? (T)-1 : (T)1;                     \
    const T decay = (T)(1.0 - h[H_LR] * h[H_WD]);                                               \
    const T step_size = (T)(h[H_LR] / s->bias1[p]), bias2_t = (T)s->bias2[p];

/* The row's constants and pointers (T: compute type, ST: storage type); returns from the row
 * function if its parameter has no gradient this step. */
#define ROW_SETUP(T, ST, LOAD)                                                                  \
    const int64_t p = owner; /* the parameter owning row r */                                     \
    if (!s->a->has_grad[p]) return;                                                             \
    PARAM_SETUP(T)                                                                              \
    const int64_t row = r - seg[SEG_ROW0], start = row * block;                                 \
    /* the last row of a parameter holds what remains: fewer elements where blocks are ragged */ \
    const int64_t len = seg[SEG_NUMEL] - start < block ? seg[SEG_NUMEL] - start : block;        \
    const ST *restrict g = (const ST *)a->grads[p] + start;                                     \
    ST *restrict param = (ST *)a->params[p] + start;                                            \
    ST *restrict v = (ST *)a->vmean + seg[SEG_V] + (per_element ? start : row);                 \
    uint8_t *restrict codes = a->codes + seg[SEG_CODE] + start;                                 \
    const T old_mag = LOAD(a->magnitude, r);                                                    \
    const int buffered = len <= TILE;

/* The second moment of a block row, from its sum of g^2 (per-element rows update v in the
 * first pass), and the new magnitude; then the stored magnitude (rounded as its dtype rounds)
 * and the step's scale of a block row. A zero block gets code 0, whose dequantised value
 * -1 * 0 changes nothing. */
#define NEW_MAGNITUDE(T, LOAD, STORE, SQRT, V, R, LEN)                                          \
    if (!per_element) STORE(V, 0, LOAD(V, 0) * beta2 + (square_sum / (T)(LEN)) * keep2);        \
    STORE(a->magnitude, R, peak);                                                               \
    const T stored = LOAD(a->magnitude, R);                                                     \
    const int32_t live = stored > 0;                                                            \
    const T shared_scale = step_size / (SQRT(LOAD(V, 0) / bias2_t) + eps);

/* ---- the portable rows: plain loops for the vectoriser ---- */

/* One row kernel per state dtype: T is the compute type, ST the storage type, LOAD/STORE
 * convert. The row is read twice: once for the new magnitude (and the block's mean g^2), once to
 * quantise and update, recomputing the first moment identically rather than storing it. The
 * element loops are written for the vectoriser (lookups in small tables, reductions under
 * `omp simd`), and compiled once per x86 instruction-set level (ISA_*); gefen_cpu_path picks
 * one at run time by the CPU's features. Elsewhere (AArch64: NEON), or built with
 * -DGEFEN_PORTABLE_ONLY, the baseline is the only level. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(GEFEN_PORTABLE_ONLY)
#define X86_PATHS 1
#define ISA_AVX2 __attribute__((target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")))
#define AVX512_FEATURES "avx512f,avx512bw,avx512dq,avx512vl,avx512cd,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt"
#define ISA_AVX512 __attribute__((target(AVX512_FEATURES)))
#else
#define X86_PATHS 0
#endif

/* |x|, +0 for -0: a block of -0 first moments has magnitude +0 on every path, whichever order
 * a vectorised max reduction takes */
#define ABS(x) _Generic((x), float: fabsf, double: fabs)(x)

/* OLD: the old magnitude of element i's block */
#define FIRST_MOMENT(LOAD, i, CODE, OLD)                                                        \
    (codebook[CODE] * (OLD) * beta1 + (sign * LOAD(g, i)) * keep1)

/* The first pass: the new first moment m of every element, its largest magnitude, and the
 * per-element second moment. KEEP stores m for the second pass. */
#define FIRST_PASS_LOOP(T, LOAD, CODE, KEEP, SECOND_MOMENT)                                     \
    _Pragma("omp simd reduction(max:peak)")                                                     \
    for (int64_t i = 0; i < len; i++) {                                                         \
        const T m = FIRST_MOMENT(LOAD, i, CODE, old_mag), gi = sign * LOAD(g, i);               \
        KEEP;                                                                                   \
        const T mag = ABS(m);                                                                   \
        peak = mag > peak ? mag : peak;                                                         \
        SECOND_MOMENT;                                                                          \
    }

/* A block row's sum of g^2 (see SUM_LANES) follows in a loop of its own; (sign g)^2 is g^2. */
#define FIRST_PASS(T, LOAD, STORE, CODE, KEEP)                                                  \
    if (per_element) {                                                                          \
        FIRST_PASS_LOOP(T, LOAD, CODE, KEEP, STORE(v, i, LOAD(v, i) * beta2 + (gi * gi) * keep2)) \
    } else {                                                                                    \
        FIRST_PASS_LOOP(T, LOAD, CODE, KEEP, (void)gi)                                          \
        SQUARE_SUM(T, LOAD, g, len, square_sum)                                                 \
    }

/* The sum of g^2 over the LEN elements from G (see SUM_LANES), into OUT. */
#define SQUARE_SUM(T, LOAD, G, LEN, OUT)                                                        \
    {                                                                                           \
        T lanes[SUM_LANES] = {0};                                                               \
        int64_t i0 = 0;                                                                         \
        for (; i0 + SUM_LANES <= (LEN); i0 += SUM_LANES) {                                      \
            _Pragma("omp simd")                                                                 \
            for (int l = 0; l < SUM_LANES; l++) lanes[l] += LOAD(G, i0 + l) * LOAD(G, i0 + l);  \
        }                                                                                       \
        if (i0 < (LEN)) { /* the same sums in whole vectors: +0 past the end changes none */    \
            _Pragma("omp simd")                                                                 \
            for (int l = 0; l < SUM_LANES; l++) {                                               \
                const T x = i0 + l < (LEN) ? LOAD(G, i0 + l) : (T)0;                            \
                lanes[l] += x * x;                                                              \
            }                                                                                   \
        }                                                                                       \
        FOLD_LANES(lanes)                                                                       \
        OUT = lanes[0];                                                                         \
    }

/* The second pass over elements FROM to N - 1: nearest code of m / magnitude (see
 * codebook.NearestCode), then the update. M: the first moment of element i; STORED: its
 * block's magnitude as stored; MASK: -1 where that is > 0, else 0 (code 0); SCALE: step size /
 * its denominator; CODE: the code of `below` boundaries (the identity unless the codebook
 * repeats entries). */
#define QUANTISE(T, FROM, N, M, STORED, MASK, CODE, EMIT)                                       \
    _Pragma("omp simd")                                                                         \
    for (int64_t i = FROM; i < (N); i++) {                                                      \
        const T x = (M) / (STORED);                                                             \
        T cell = x * (T)half; /* exact: half is a power of two */                               \
        cell = cell >= (T)-half ? cell : (T)-half; /* NaN too */                                \
        cell = cell <= (T)(half - 1) ? cell : (T)(half - 1);                                    \
        /* floor by truncation and correction: (int)floorf() does not vectorise */             \
        const int32_t whole = (int32_t)cell;                                                    \
        int32_t below = lut[whole - ((T)whole > cell) + half];                                  \
        below += x > bounds[below];                                                             \
        const int32_t code = (CODE) & (MASK);                                                   \
        codes[i] = (uint8_t)code;                                                               \
        EMIT;                                                                                   \
    }
#define QUANTISE_AND_UPDATE(T, LOAD, STORE, FROM, N, M, STORED, MASK, SCALE, CODE)              \
    QUANTISE(T, FROM, N, M, STORED, MASK, CODE,                                                 \
             const T update = (codebook[code] * (STORED)) * (SCALE);                            \
             STORE(param, i, LOAD(param, i) * decay - update))

/* One loop per case, so that each is branch-free and vectorises. */
#define ELEMENT_SCALE(LOAD, SQRT) (step_size / (SQRT(LOAD(v, i) / bias2_t) + eps))
#define SECOND_PASS(T, LOAD, STORE, SQRT, FROM, N, M, STORED, MASK, SHARED)                     \
    if (per_element && identity) {                                                              \
        QUANTISE_AND_UPDATE(T, LOAD, STORE, FROM, N, M, STORED, MASK, ELEMENT_SCALE(LOAD, SQRT),   \
                            below);                                                             \
    } else if (per_element) {                                                                   \
        QUANTISE_AND_UPDATE(T, LOAD, STORE, FROM, N, M, STORED, MASK, ELEMENT_SCALE(LOAD, SQRT),   \
                            first[below]);                                                      \
    } else if (identity) {                                                                      \
        QUANTISE_AND_UPDATE(T, LOAD, STORE, FROM, N, M, STORED, MASK, SHARED, below);           \
    } else {                                                                                    \
        QUANTISE_AND_UPDATE(T, LOAD, STORE, FROM, N, M, STORED, MASK, SHARED, first[below]);    \
    }

/* The tables the vectoriser's loops read. */
#define VECTORISER_TABLES(T)                                                                    \
    const T *restrict codebook = (const T *)a->codebook;                                        \
    const T *restrict bounds = (const T *)a->bounds;                                            \
    const int32_t *restrict lut = a->lut, *restrict first = a->first_index;                    \
    const int32_t half = (int32_t)a->lut_half;

#define DEFINE_ROW(NAME, ISA, T, ST, LOAD, STORE, SQRT)                                         \
    ISA static void NAME(const Step *s, int64_t r, int64_t owner) {                             \
        ROW_SETUP(T, ST, LOAD)                                                                  \
        VECTORISER_TABLES(T)                                                                    \
        T peak = 0, square_sum = 0;                                                             \
        T kept[TILE];                                                                           \
        if (buffered) {                                                                         \
            FIRST_PASS(T, LOAD, STORE, codes[i], kept[i] = m)                                   \
        } else {                                                                                \
            FIRST_PASS(T, LOAD, STORE, codes[i], (void)0)                                       \
        }                                                                                       \
        NEW_MAGNITUDE(T, LOAD, STORE, SQRT, v, r, len)                                          \
        if (buffered) {                                                                         \
            SECOND_PASS(T, LOAD, STORE, SQRT, 0, len, kept[i], stored, -live, shared_scale)     \
        } else {                                                                                \
            SECOND_PASS(T, LOAD, STORE, SQRT, 0, len, FIRST_MOMENT(LOAD, i, codes[i], old_mag),    \
                        stored, -live, shared_scale)                                            \
        }                                                                                       \
    }

/* ---- short rows, a batch at a time ----
 *
 * A row's step is one chain of dependent work: first moments, their peak, the new magnitude,
 * then the codes and the update. On a short row that chain is most of the time: every path's
 * row took about as long for 9 elements as for 64 (~125 ns on the VBMI path: 10x fused AdamW's
 * time per element at period 9, a 3x3 convolution's). Consecutive whole rows of a parameter,
 * up to BATCH elements, are stepped together instead, in phases: the first moments of all of
 * them; each row's peak and sum of g^2, then its new magnitude, in loops across rows (the
 * sum's lanes as columns), short chains the core overlaps; the codes and updates of all, each
 * element reading its row's stored magnitude and scale from a per-element copy. The element
 * phases are each path's own (DEFINE_BATCH here, DEFINE_PLANE_BATCH, DEFINE_AVX2_BATCH), the
 * arithmetic the rows', operation for operation: the same bits. Each path batches rows up to
 * its own length (SHORT_ROW_PLANES, SHORT_ROW_AVX2, SHORT_ROW, at run_rows), never past
 * StepArgs.short_row. */
#define BATCH 1024

/* ASSIGN to the elements i0 + l of row j: whole vectors of SUM_LANES from the row's start.
 * Called in row order, the next row overwrites what runs past a row (the buffers have
 * SUM_LANES to spare). */
#define SPREAD(j, ASSIGN)                                                                       \
    for (int64_t i0 = (j) * block; i0 < ((j) + 1) * block; i0 += SUM_LANES) {                   \
        _Pragma("omp simd")                                                                     \
        for (int l = 0; l < SUM_LANES; l++) ASSIGN;                                             \
    }

/* A batch's constants, pointers and buffers; per element: spread holds the old magnitudes,
 * then the stored ones (codes are 0 where that is not > 0); scale first holds the lanes of
 * the sums of g^2 (BATCH_MAGNITUDES). */
#define BATCH_SETUP(T, ST, LOAD)                                                                \
    PARAM_SETUP(T)                                                                              \
    const int64_t row0 = r0 - seg[SEG_ROW0], start = row0 * block, n = rows * block;            \
    const ST *restrict g = (const ST *)a->grads[p] + start;                                     \
    ST *restrict param = (ST *)a->params[p] + start;                                            \
    ST *restrict v = (ST *)a->vmean + seg[SEG_V] + (per_element ? start : row0);                \
    uint8_t *restrict codes = a->codes + seg[SEG_CODE] + start;                                 \
    _Alignas(64) T kept[BATCH + SUM_LANES], spread[BATCH + SUM_LANES];                          \
    _Alignas(64) T scale[BATCH + SUM_LANES];                                                    \
    for (int64_t j = 0; j < rows; j++) {                                                        \
        const T old = LOAD(a->magnitude, r0 + j);                                               \
        SPREAD(j, spread[i0 + l] = old)                                                         \
    }

/* Each row's peak |m| and sum of g^2, across rows (the sum's lanes of SUM_LANES as columns:
 * lane l of row j at lanes[l * rows + j], folded as FOLD_LANES folds), its new magnitude
 * (NEW_MAGNITUDE, across rows), then its stored magnitude and scale spread to its elements. */
#define BATCH_MAGNITUDES(T, LOAD, STORE, SQRT)                                                  \
    {                                                                                           \
        T row_peak[BATCH], row_sum[BATCH], *lanes = scale;                                      \
        const int64_t used = per_element ? 0 : block < SUM_LANES ? block : SUM_LANES;          \
        for (int64_t j = 0; j < rows; j++) row_peak[j] = 0;                                     \
        for (int64_t l = 0; l < used * rows; l++) lanes[l] = 0;                                 \
        for (int64_t i = 0; i < block; i++) {                                                   \
            T *restrict lane = lanes + (i % SUM_LANES) * rows;                                  \
            if (used) {                                                                         \
                _Pragma("omp simd")                                                             \
                for (int64_t j = 0; j < rows; j++) {                                            \
                    const T mag = ABS(kept[j * block + i]);                                     \
                    row_peak[j] = mag > row_peak[j] ? mag : row_peak[j];                        \
                    lane[j] += LOAD(g, j * block + i) * LOAD(g, j * block + i);                 \
                }                                                                               \
            } else {                                                                            \
                _Pragma("omp simd")                                                             \
                for (int64_t j = 0; j < rows; j++) {                                            \
                    const T mag = ABS(kept[j * block + i]);                                     \
                    row_peak[j] = mag > row_peak[j] ? mag : row_peak[j];                        \
                }                                                                               \
            }                                                                                   \
        }                                                                                       \
        /* the lanes past a row hold +0: adding them changes nothing */                         \
        for (int w = SUM_LANES / 2; w > 0; w /= 2)                                              \
            for (int l = 0; l < w && l + w < used; l++) {                                       \
                _Pragma("omp simd")                                                             \
                for (int64_t j = 0; j < rows; j++)                                              \
                    lanes[l * rows + j] += lanes[(l + w) * rows + j];                           \
            }                                                                                   \
        for (int64_t j = 0; j < rows; j++) row_sum[j] = used ? lanes[j] : 0;                    \
        BATCH_FINISH(T, LOAD, STORE, SQRT)                                                      \
    }

/* From each row's peak and sum of g^2 (row_peak, row_sum): its new magnitude (NEW_MAGNITUDE,
 * across rows), then its stored magnitude and scale spread to its elements. */
#define BATCH_FINISH(T, LOAD, STORE, SQRT)                                                      \
    {                                                                                           \
        T row_stored[BATCH], row_scale[BATCH];                                                  \
        /* one loop per case: a per-element row's second moments are not the row's */         \
        if (per_element) BATCH_NEW_MAGNITUDES(T, LOAD, STORE, SQRT, v)                          \
        else BATCH_NEW_MAGNITUDES(T, LOAD, STORE, SQRT, v + j)                                  \
        for (int64_t j = 0; j < rows; j++)                                                      \
            SPREAD(j, (spread[i0 + l] = row_stored[j], scale[i0 + l] = row_scale[j]))           \
    }

/* NEW_MAGNITUDE of every row j, its second moment at V (the shared scale is unused where
 * the second moments are per element). */
#define BATCH_NEW_MAGNITUDES(T, LOAD, STORE, SQRT, V)                                           \
    _Pragma("omp simd")                                                                         \
    for (int64_t j = 0; j < rows; j++) {                                                        \
        const T peak = row_peak[j], square_sum = row_sum[j];                                    \
        NEW_MAGNITUDE(T, LOAD, STORE, SQRT, V, r0 + j, block)                                   \
        (void)live;                                                                             \
        row_stored[j] = stored, row_scale[j] = shared_scale;                                    \
    }

/* The first moments of elements FROM to n - 1 into kept, their second moments where
 * per-element, as the rows compute them. */
#define BATCH_FIRST_MOMENTS(T, LOAD, STORE, FROM)                                               \
    if (per_element) {                                                                          \
        _Pragma("omp simd")                                                                     \
        for (int64_t i = FROM; i < n; i++) {                                                    \
            const T gi = sign * LOAD(g, i);                                                     \
            kept[i] = FIRST_MOMENT(LOAD, i, codes[i], spread[i]);                                  \
            STORE(v, i, LOAD(v, i) * beta2 + (gi * gi) * keep2);                                \
        }                                                                                       \
    } else {                                                                                    \
        _Pragma("omp simd")                                                                     \
        for (int64_t i = FROM; i < n; i++) kept[i] = FIRST_MOMENT(LOAD, i, codes[i], spread[i]);   \
    }

/* Rows r0 to r0 + rows - 1, whole rows of parameter p (which has a gradient), at most BATCH
 * elements in all, in the vectoriser's loops. */
#define DEFINE_BATCH(NAME, ISA, T, ST, LOAD, STORE, SQRT)                                       \
    ISA static void NAME(const Step *s, int64_t r0, int64_t rows, int64_t p) {                  \
        BATCH_SETUP(T, ST, LOAD)                                                                \
        VECTORISER_TABLES(T)                                                                    \
        BATCH_FIRST_MOMENTS(T, LOAD, STORE, 0)                                                  \
        BATCH_MAGNITUDES(T, LOAD, STORE, SQRT)                                                  \
        SECOND_PASS(T, LOAD, STORE, SQRT, 0, n, kept[i], spread[i], -(spread[i] > 0), scale[i]) \
    }

/* The four dtypes' rows and batches at one instruction-set level, as rows##SUFFIX[dtype] and
 * batches##SUFFIX[dtype]. */
#define DEFINE_ROWS(SUFFIX, ISA)                                                                \
    DEFINE_ROW(row_f32##SUFFIX, ISA, float, float, LOAD_F32, STORE_F32, sqrtf)                  \
    DEFINE_ROW(row_bf16##SUFFIX, ISA, float, uint16_t, LOAD_BF16, STORE_BF16, sqrtf)            \
    DEFINE_ROW(row_f16##SUFFIX, ISA, float, _Float16, LOAD_F16, STORE_F16, sqrtf)               \
    DEFINE_ROW(row_f64##SUFFIX, ISA, double, double, LOAD_F64, STORE_F64, sqrt)                 \
    static void (*const rows##SUFFIX[4])(const Step *, int64_t, int64_t) = {                   \
        row_f32##SUFFIX, row_bf16##SUFFIX, row_f16##SUFFIX, row_f64##SUFFIX};                   \
    DEFINE_BATCH(batch_f32##SUFFIX, ISA, float, float, LOAD_F32, STORE_F32, sqrtf)              \
    DEFINE_BATCH(batch_bf16##SUFFIX, ISA, float, uint16_t, LOAD_BF16, STORE_BF16, sqrtf)        \
    DEFINE_BATCH(batch_f16##SUFFIX, ISA, float, _Float16, LOAD_F16, STORE_F16, sqrtf)           \
    DEFINE_BATCH(batch_f64##SUFFIX, ISA, double, double, LOAD_F64, STORE_F64, sqrt)             \
    static void (*const batches##SUFFIX[4])(const Step *, int64_t, int64_t, int64_t) = {       \
        batch_f32##SUFFIX, batch_bf16##SUFFIX, batch_f16##SUFFIX, batch_f64##SUFFIX};

DEFINE_ROWS(_portable, )
#if X86_PATHS
DEFINE_ROWS(_vec_avx2, ISA_AVX2)
DEFINE_ROWS(_vec_avx512, ISA_AVX512)
#endif

/* ---- GefenMuon's momentum rows (gefen_compile/muon.py) ----
 *
 * One parameter at a time: Muon orthogonalises each matrix whole, so the caller steps one
 * matrix, then orthogonalises it. A row is one magnitude block. Gefen's first moment with
 * beta1 = momentum and no sign, then its quantisation; instead of a parameter update, the row
 * writes the update Muon orthogonalises, in bfloat16 (rounded through fp32, as torch rounds). */
typedef struct {
    int64_t numel, block;           /* elements; magnitude block (the last row may be shorter) */
    const void *grad;
    uint8_t *codes;
    void *magnitude;                /* one per row */
    uint16_t *update;               /* bfloat16, numel */
    double momentum;
    int64_t nesterov;
    const void *codebook;           /* as in StepArgs */
    const int32_t *lut;
    const void *bounds;
    const int32_t *first_index;
    int64_t num_distinct;
    int64_t lut_half;
    int64_t num_threads;
} MomentumArgs;

#define EMIT_MOMENTUM(T, LOAD, NESTEROV)                                                        \
    const T quantised = codebook[code] * stored;                                                \
    const T update = NESTEROV ? quantised * beta1 + LOAD(g, i) * keep1 : quantised;            \
    out[i] = f32_to_bf16((float)update)

#define QUANTISE_MOMENTUM(T, LOAD, M, NESTEROV)                                                 \
    if (identity) {                                                                             \
        QUANTISE(T, 0, len, M, stored, -live, below, EMIT_MOMENTUM(T, LOAD, NESTEROV));         \
    } else {                                                                                    \
        QUANTISE(T, 0, len, M, stored, -live, first[below], EMIT_MOMENTUM(T, LOAD, NESTEROV));  \
    }

#define DEFINE_MOMENTUM_ROW(NAME, ISA, T, ST, LOAD, STORE)                                      \
    ISA static void NAME(const MomentumArgs *a, int64_t r) {                                    \
        const int64_t start = r * a->block;                                                     \
        const int64_t len = a->numel - start < a->block ? a->numel - start : a->block;          \
        const ST *restrict g = (const ST *)a->grad + start;                                     \
        uint8_t *restrict codes = a->codes + start;                                             \
        uint16_t *restrict out = a->update + start;                                             \
        const T beta1 = (T)a->momentum, keep1 = (T)(1.0 - a->momentum), sign = (T)1;            \
        const T old_mag = LOAD(a->magnitude, r);                                                \
        VECTORISER_TABLES(T)                                                                    \
        const int identity = a->num_distinct == 256;                                            \
        T peak = 0;                                                                             \
        T kept[TILE];                                                                           \
        const int buffered = len <= TILE;                                                       \
        if (buffered) {                                                                         \
            FIRST_PASS_LOOP(T, LOAD, codes[i], kept[i] = m, (void)gi)                           \
        } else {                                                                                \
            FIRST_PASS_LOOP(T, LOAD, codes[i], (void)0, (void)gi)                               \
        }                                                                                       \
        STORE(a->magnitude, r, peak);                                                           \
        const T stored = LOAD(a->magnitude, r);                                                 \
        const int32_t live = stored > 0;                                                        \
        if (buffered && a->nesterov) {                                                          \
            QUANTISE_MOMENTUM(T, LOAD, kept[i], 1)                                              \
        } else if (buffered) {                                                                  \
            QUANTISE_MOMENTUM(T, LOAD, kept[i], 0)                                              \
        } else if (a->nesterov) {                                                               \
            QUANTISE_MOMENTUM(T, LOAD, FIRST_MOMENT(LOAD, i, codes[i], old_mag), 1)             \
        } else {                                                                                \
            QUANTISE_MOMENTUM(T, LOAD, FIRST_MOMENT(LOAD, i, codes[i], old_mag), 0)             \
        }                                                                                       \
    }

#define DEFINE_MOMENTUM_ROWS(SUFFIX, ISA)                                                       \
    DEFINE_MOMENTUM_ROW(momentum_f32##SUFFIX, ISA, float, float, LOAD_F32, STORE_F32)           \
    DEFINE_MOMENTUM_ROW(momentum_bf16##SUFFIX, ISA, float, uint16_t, LOAD_BF16, STORE_BF16)     \
    DEFINE_MOMENTUM_ROW(momentum_f16##SUFFIX, ISA, float, _Float16, LOAD_F16, STORE_F16)        \
    DEFINE_MOMENTUM_ROW(momentum_f64##SUFFIX, ISA, double, double, LOAD_F64, STORE_F64)         \
    static void (*const momentum_rows##SUFFIX[4])(const MomentumArgs *, int64_t) = {           \
        momentum_f32##SUFFIX, momentum_bf16##SUFFIX, momentum_f16##SUFFIX, momentum_f64##SUFFIX};

DEFINE_MOMENTUM_ROWS(_portable, )
#if X86_PATHS
DEFINE_MOMENTUM_ROWS(_avx2, ISA_AVX2)
DEFINE_MOMENTUM_ROWS(_avx512, ISA_AVX512)
#endif

/* ---- the byte-plane rows (fp32 and bf16 state): AVX-512 VBMI, or AVX-512BW ----
 *
 * The portable rows spend most of their time in table lookups, element by element (as gathers,
 * about 1 cycle per element each on the Zen 4 measured; as scalar loads since setup.py stopped
 * asking the vectoriser for gathers, see the AVX2 rows). Codes are bytes, so a
 * 256-entry fp32 table can instead be read as four 256-byte tables, one per byte of its
 * entries: VBMI's vpermi2b looks up 64 bytes in a 128-byte table per instruction, and two of
 * them with a blend on the index's top bit read a 256-byte one. The four byte vectors are then
 * interleaved into fp32.
 *
 * The cell table (2 * half entries, thousands) is split the same way. Its entry for cell c is
 * the number of boundary steps at or below c; with c = (coarse << shift) + fine, coarse a byte,
 * that is the count below the coarse cell (a 256-byte table) plus how many of the coarse cell's
 * own steps lie at or below fine: one byte table and one byte compare per step, and a coarse
 * cell of a learned codebook holds a few steps (at most one per cell).
 *
 * AVX-512 CPUs without VBMI (Skylake-SP to Cooper Lake) run the same rows with each byte
 * lookup made of four AVX-512BW word permutes (vpermt2w, 32 lanes of a 64-word table) and
 * shifts. That is several times VBMI's cost, but gathers cost more on these CPUs: under the
 * microcode against Downfall (GDS), which their cloud hosts carry, an 8-lane gather takes ~23
 * cycles (an Ice Lake server, 2026-12-07). There, on one thread (benchmarks/bench_kernel_ab.py),
 * these rows took 0.35-0.50x the time of the gathering rows they replace in fp32 (the AVX2
 * rows), 0.51-0.58x in bf16 (the vectoriser's), and 1.15-1.44x the time of the same rows with
 * VBMI's lookups (periods 9 to 768, calls of both interleaved).
 *
 * The arithmetic is the portable rows', operation for operation, so both give the same bits. */
#if X86_PATHS
#include <cpuid.h>
#include <immintrin.h>

/* ISA_AVX512's features and VBMI: helpers of ISA_AVX512 inline into the VBMI rows */
#define ISA_VBMI __attribute__((target("avx512vbmi," AVX512_FEATURES)))
/* ISA_VBMI's and AVX512_BF16's (Sapphire Rapids and later Xeons, Zen 4 and later): the bf16
 * byte-plane rows' conversions to bf16 (store16_converted) */
#define ISA_VBMI_BF16 __attribute__((target("avx512bf16,avx512vbmi," AVX512_FEATURES)))

/* The byte-plane rows' helpers must inline: a helper the compiler declines to inline is called
 * instead, silently, and a VBMI helper so called from a row for CPUs without VBMI would stop
 * the process there. Forced, the mismatch of instruction sets is a compile error. */
#define HELPER static inline __attribute__((always_inline))

/* ASan instruments plain loads and stores, not intrinsics: in sanitized builds (setup.py,
 * GEFEN_SANITIZE=1) a byte-plane or AVX2 row or batch first reads the first poisoned byte, if
 * any, of each range it touches, so that ASan reports what the vector accesses would have read
 * or written. */
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
static void touch_poisoned(const void *ptr, int64_t count, size_t size) {
    const char *bad = __asan_region_is_poisoned((void *)ptr, (size_t)count * size);
    if (bad) (void)*(volatile const char *)bad;
}
#else
#define touch_poisoned(ptr, count, size) ((void)0)
#endif

/* touch_poisoned for every range LEN elements of ST storage in ROWS rows (a row, or a batch of
 * rows) read or write. */
#define TOUCH_ROWS(ST, LEN, ROWS)                                                               \
    touch_poisoned(g, LEN, sizeof(ST));                                                         \
    touch_poisoned(param, LEN, sizeof(ST));                                                     \
    touch_poisoned(codes, LEN, 1);                                                              \
    touch_poisoned(v, per_element ? LEN : ROWS, sizeof(ST));

struct BytePlanes {
    _Alignas(64) uint8_t codebook[4][256]; /* byte b of entry i at [b][i] */
    _Alignas(64) uint8_t bounds[4][256];   /* +inf past the last boundary */
    _Alignas(64) uint8_t first[256];       /* first_index, as bytes */
    _Alignas(64) uint8_t coarse[256];      /* cell table at the coarse cell's first cell */
    uint8_t (*steps)[256]; /* [j][coarse]: fine offset - 1 of its j-th step inside, else 255 */
    int shift, num_steps;  /* cell = (coarse << shift) + fine; steps per coarse cell, at most */
};

/* Fine offsets fit a byte while 2 * half <= 2^16. */
#define MAX_PLANE_CELLS (1 << 16)

static void split_bytes(uint8_t planes[4][256], const float *table, int64_t count) {
    for (int i = 0; i < 256; i++) {
        const float f = i < count ? table[i] : INFINITY;
        uint8_t bytes[4];
        memcpy(bytes, &f, 4);
        for (int b = 0; b < 4; b++) planes[b][i] = bytes[b];
    }
}

/* Returns 0, or -1 if the steps' table could not be allocated (t->steps: free it after). */
static int build_planes(BytePlanes *t, const StepArgs *a) {
    split_bytes(t->codebook, (const float *)a->codebook, 256);
    split_bytes(t->bounds, (const float *)a->bounds, a->num_distinct);
    for (int i = 0; i < 256; i++)
        t->first[i] = (uint8_t)(i < a->num_distinct ? a->first_index[i] : 0);
    const int64_t cells = 2 * a->lut_half;
    t->shift = 0;
    while ((cells >> t->shift) > 256) t->shift++;
    int count[256] = {0};
    memset(t->coarse, 0, sizeof(t->coarse));
    for (int64_t c = 0; c < cells; c++) {
        if ((c & ((1 << t->shift) - 1)) == 0) t->coarse[c >> t->shift] = (uint8_t)a->lut[c];
        else count[c >> t->shift] += a->lut[c] - a->lut[c - 1];
    }
    t->num_steps = 0;
    for (int i = 0; i < 256; i++) t->num_steps = count[i] > t->num_steps ? count[i] : t->num_steps;
    t->steps = aligned_alloc(64, (size_t)(t->num_steps > 0 ? t->num_steps : 1) * 256);
    if (!t->steps) return -1;
    memset(t->steps, 255, (size_t)t->num_steps * 256);
    memset(count, 0, sizeof(count));
    for (int64_t c = 0; c < cells; c++) /* a step of several boundaries counts several times */
        for (int32_t j = (c & ((1 << t->shift) - 1)) ? a->lut[c] - a->lut[c - 1] : 0; j > 0; j--)
            t->steps[count[c >> t->shift]++][c >> t->shift] = (uint8_t)((c & ((1 << t->shift) - 1)) - 1);
    return 0;
}

/* Interleaving byte planes with unpacks works within 128-bit lanes: output vector k, dword
 * 4L + j (element 16k + 4L + j of a chunk) comes from byte 16L + 4k + j of the planes. Index
 * bytes are therefore kept in that order, a transpose of 4x4 groups of 4 bytes, which is its
 * own inverse: the same permutation takes element order there and back. */
ISA_AVX512 HELPER __m512i transpose_groups(__m512i bytes) {
    /* dword 4a + b of the result is dword 4b + a of bytes */
    return _mm512_permutexvar_epi32(
        _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), bytes);
}

/* table[index] for 64 byte indices. */
ISA_VBMI HELPER __m512i lookup_byte_vbmi(const uint8_t table[256], __m512i index) {
    const __m512i *t = (const __m512i *)table;
    const __m512i low = _mm512_permutex2var_epi8(t[0], index, t[1]);
    const __m512i high = _mm512_permutex2var_epi8(t[2], index, t[3]);
    return _mm512_mask_blend_epi8(_mm512_movepi8_mask(index), low, high);
}

/* lookup_byte_vbmi without VBMI: the table as 128 words, word w holding entries 2w and 2w + 1.
 * Each word lane looks up the word of its even byte's index, then of its odd byte's (two
 * permutes each, over words 0-63 and 64-127, blended on the index's top bit), and keeps the
 * entry's byte of each: the even one shifted down to the low byte, the odd one up to the high. */
ISA_AVX512 HELPER __m512i lookup_byte_avx512(const uint8_t table[256], __m512i index) {
    const __m512i *t = (const __m512i *)table;
    const __m512i even = _mm512_and_si512(index, _mm512_set1_epi16(0xff));
    const __m512i odd = _mm512_srli_epi16(index, 8);
    const __m512i even_word = _mm512_srli_epi16(even, 1), odd_word = _mm512_srli_epi16(odd, 1);
    const __m512i top = _mm512_set1_epi16(0x80), one = _mm512_set1_epi16(1);
    const __m512i at_even = _mm512_mask_blend_epi16(
        _mm512_test_epi16_mask(even, top), _mm512_permutex2var_epi16(t[0], even_word, t[1]),
        _mm512_permutex2var_epi16(t[2], even_word, t[3]));
    const __m512i at_odd = _mm512_mask_blend_epi16(
        _mm512_test_epi16_mask(odd, top), _mm512_permutex2var_epi16(t[0], odd_word, t[1]),
        _mm512_permutex2var_epi16(t[2], odd_word, t[3]));
    const __m512i low =
        _mm512_srlv_epi16(at_even, _mm512_slli_epi16(_mm512_and_si512(even, one), 3));
    const __m512i high =
        _mm512_sllv_epi16(at_odd, _mm512_slli_epi16(_mm512_andnot_si512(odd, one), 3));
    return _mm512_mask_blend_epi8(0xaaaaaaaaaaaaaaaaull, low, high);
}

/* 16 lanes of fp32 from storage at p (bf16: widened), those past `lanes` zero; and back, bf16
 * rounded as f32_to_bf16 rounds (NaN: 0x7fc0). */
ISA_AVX512 HELPER __m512 load16(const void *p, __mmask16 lanes, int bf16) {
    if (!bf16) return _mm512_maskz_loadu_ps(lanes, p);
    const __m256i half = _mm256_maskz_loadu_epi16(lanes, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

ISA_AVX512 HELPER void store16(void *p, __mmask16 lanes, __m512 x, int bf16) {
    if (!bf16) {
        _mm512_mask_storeu_ps(p, lanes, x);
        return;
    }
    const __m512i u = _mm512_castps_si512(x);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(
        _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), odd), 16);
    rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q),
                                    _mm512_set1_epi32(0x7fc0));
    _mm256_mask_storeu_epi16(p, lanes, _mm512_cvtepi32_epi16(rounded));
}

/* store16 of bf16 with AVX512_BF16's conversion: vcvtneps2bf16 rounds as f32_to_bf16 rounds,
 * except that it flushes subnormals to zero and keeps a NaN's sign and payload, so vectors with
 * either (their lanes past `lanes` aside) take store16's arithmetic (0.93-0.97x the time of
 * the bf16 byte-plane rows rounding every vector so, a Sapphire Rapids-class Xeon,
 * 2026-12-07). Zeros count among them: with MXCSR's DAZ set, vfpclassps takes a subnormal for
 * a zero. */
#define NAN_ZERO_OR_SUBNORMAL 0xa7 /* vfpclassps's classes: NaNs, +0, -0, subnormals */
ISA_VBMI_BF16 HELPER void store16_converted(void *p, __mmask16 lanes, __m512 x, int bf16) {
    if (__builtin_expect(_mm512_mask_fpclass_ps_mask(lanes, x, NAN_ZERO_OR_SUBNORMAL) == 0, 1))
        _mm256_mask_storeu_epi16(p, lanes, (__m256i)_mm512_cvtneps_pbh(x));
    else
        store16(p, lanes, x, bf16);
}

/* What quantising a row's chunks needs, as vectors. */
typedef struct {
    __m512 stored, half, low_cell, high_cell;
    __m512i half_i, fine_mask, live;
    __m128i shift;
    int identity;
} Quantiser;

/* The helpers of the byte-plane rows at one instruction-set level (ISA), their names ending
 * in SUFFIX, over that level's lookup_byte##SUFFIX. */
#define DEFINE_PLANE_LOOKUPS(SUFFIX, ISA)                                                       \
/* The fp32 table entries of 64 indices (in transposed order), as four vectors in element       \
 * order. */                                                                                    \
ISA HELPER void lookup_f32##SUFFIX(const uint8_t planes[4][256], __m512i index,                 \
                            __m512 out[4]) {                                                    \
    const __m512i b0 = lookup_byte##SUFFIX(planes[0], index);                                   \
    const __m512i b1 = lookup_byte##SUFFIX(planes[1], index);                                   \
    const __m512i b2 = lookup_byte##SUFFIX(planes[2], index);                                   \
    const __m512i b3 = lookup_byte##SUFFIX(planes[3], index);                                   \
    const __m512i low01 = _mm512_unpacklo_epi8(b0, b1), high01 = _mm512_unpackhi_epi8(b0, b1);  \
    const __m512i low23 = _mm512_unpacklo_epi8(b2, b3), high23 = _mm512_unpackhi_epi8(b2, b3);  \
    out[0] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(low01, low23));                          \
    out[1] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(low01, low23));                          \
    out[2] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(high01, high23));                        \
    out[3] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(high01, high23));                        \
}                                                                                               \
                                                                                                \
/* First moments (FIRST_MOMENT) of the n <= 64 elements from i, of old magnitudes old_mag[k]    \
 * (elements i + 16k to i + 16k + 15), and their sign-corrected gradients; lanes past n hold    \
 * what zero codes and gradients give. */                                                       \
ISA HELPER void first_moments##SUFFIX(                                                          \
    const BytePlanes *t, const uint8_t *codes, const void *g, int bf16, int64_t i, __mmask64 n, \
    const __m512 old_mag[4], __m512 beta1, __m512 sign, __m512 keep1, __m512 m[4],              \
    __m512 gi[4]) {                                                                             \
    __m512 dequantised[4];                                                                      \
    lookup_f32##SUFFIX(t->codebook, transpose_groups(_mm512_maskz_loadu_epi8(n, codes + i)),    \
                       dequantised);                                                            \
    for (int k = 0; k < 4; k++) {                                                               \
        const int64_t at = (i + 16 * k) * (bf16 ? 2 : 4);                                       \
        const __mmask16 lanes = (__mmask16)(n >> 16 * k);                                       \
        gi[k] = _mm512_mul_ps(sign, load16((const char *)g + at, lanes, bf16));                 \
        m[k] = _mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(dequantised[k], old_mag[k]), beta1),   \
                             _mm512_mul_ps(gi[k], keep1));                                      \
    }                                                                                           \
}                                                                                               \
                                                                                                \
/* The number of boundaries at or below the cell of each of 64 quotients x (four vectors), in   \
 * the lookups' byte order. */                                                                  \
ISA HELPER __m512i boundaries_below##SUFFIX(const BytePlanes *t, const Quantiser *q,            \
                                          const __m512 x[4]) {                                  \
    __m512i cell[4];                                                                            \
    for (int k = 0; k < 4; k++) {                                                               \
        /* clamped as the portable rows clamp: max/min return their second operand for NaN */   \
        const __m512 scaled = _mm512_min_ps(                                                    \
            _mm512_max_ps(_mm512_mul_ps(x[k], q->half), q->low_cell), q->high_cell);            \
        cell[k] = _mm512_add_epi32(                                                             \
            _mm512_cvt_roundps_epi32(scaled, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC),        \
            q->half_i);                                                                         \
    }                                                                                           \
    /* Cells (under 2^16) to words, then coarse cells and fine offsets to bytes: the in-lane    \
     * packs put dword 4L + j of vector k at byte 16L + 4k + j, the lookups' order. */          \
    const __m512i words01 = _mm512_packus_epi32(cell[0], cell[1]);                              \
    const __m512i words23 = _mm512_packus_epi32(cell[2], cell[3]);                              \
    const __m512i coarse = _mm512_packus_epi16(_mm512_srl_epi16(words01, q->shift),             \
                                               _mm512_srl_epi16(words23, q->shift));            \
    const __m512i fine = _mm512_packus_epi16(_mm512_and_si512(words01, q->fine_mask),           \
                                             _mm512_and_si512(words23, q->fine_mask));          \
    const __m512i one = _mm512_set1_epi8(1);                                                    \
    __m512i below = lookup_byte##SUFFIX(t->coarse, coarse);                                     \
    for (int j = 0; j < t->num_steps; j++) {                                                    \
        const __mmask64 past =                                                                  \
            _mm512_cmplt_epu8_mask(lookup_byte##SUFFIX(t->steps[j], coarse), fine);             \
        below = _mm512_mask_add_epi8(below, past, below, one);                                  \
    }                                                                                           \
    return below;                                                                               \
}                                                                                               \
                                                                                                \
/* The codes of 64 quotients x from their boundary counts (lookups' byte order). */             \
ISA HELPER __m512i nearest_codes##SUFFIX(const BytePlanes *t, const Quantiser *q,               \
                                       const __m512 x[4], __m512i below) {                      \
    __m512 bound[4];                                                                            \
    lookup_f32##SUFFIX(t->bounds, below, bound);                                                \
    /* below + (x > bound): the compares' bits moved to the same order */                       \
    uint64_t above = 0;                                                                         \
    for (int k = 0; k < 4; k++)                                                                 \
        above |= _pdep_u64(_mm512_cmp_ps_mask(x[k], bound[k], _CMP_GT_OQ),                      \
                           0x000f000f000f000full << 4 * k);                                     \
    __m512i code = _mm512_mask_add_epi8(below, above, below, _mm512_set1_epi8(1));              \
    if (!q->identity) code = lookup_byte##SUFFIX(t->first, code);                               \
    return _mm512_and_si512(code, q->live);                                                     \
}

DEFINE_PLANE_LOOKUPS(_vbmi, ISA_VBMI)
DEFINE_PLANE_LOOKUPS(_avx512, ISA_AVX512)

/* Elements ahead of the one being read that the first pass asks the caches for, and the
 * parameter row the second pass will read: without it the loads wait on memory (measured: 1.23x
 * -> 1.06x the time of fused AdamW on one 8M-element tensor, one thread). */
#define PREFETCH_AHEAD 512

/* One row; ST, LOAD/STORE: the storage type and its one-element conversions (for ROW_SETUP);
 * BF16: whether ST is bf16, for load16 and STORE16 (store16, or store16_converted). */
#define DEFINE_PLANE_ROW(NAME, ISA, SUFFIX, ST, LOAD, STORE, BF16, STORE16)                     \
ISA static void NAME(const Step *s, int64_t r, int64_t owner) {                                 \
    ROW_SETUP(float, ST, LOAD)                                                                  \
    TOUCH_ROWS(ST, len, 1)                                                                      \
    const BytePlanes *t = s->planes;                                                            \
    const int32_t half = (int32_t)a->lut_half;                                                  \
    const __m512 old_mag_v = _mm512_set1_ps(old_mag), beta1_v = _mm512_set1_ps(beta1);          \
    const __m512 old_mags[4] = {old_mag_v, old_mag_v, old_mag_v, old_mag_v};                    \
    const __m512 keep1_v = _mm512_set1_ps(keep1), sign_v = _mm512_set1_ps(sign);                \
    const __m512 beta2_v = _mm512_set1_ps(beta2), keep2_v = _mm512_set1_ps(keep2);              \
    _Alignas(64) float kept[TILE];                                                              \
    __m512 peak_v = _mm512_setzero_ps(), sum_v = _mm512_setzero_ps(), m[4], gi[4];              \
    for (int64_t i = 0; i < len; i += 64) {                                                     \
        const __mmask64 n = len - i >= 64 ? ~0ull : (1ull << (len - i)) - 1;                    \
        for (int k = 0; k < 4; k++) {                                                           \
            _mm_prefetch((const char *)(g + i + 16 * k + PREFETCH_AHEAD), _MM_HINT_T0);         \
            _mm_prefetch((const char *)(param + i + 16 * k), _MM_HINT_T0);                      \
        }                                                                                       \
        first_moments##SUFFIX(t, codes, g, BF16, i, n, old_mags, beta1_v, sign_v, keep1_v, m, gi); \
        for (int k = 0; k < 4; k++) {                                                           \
            const __mmask16 lanes = (__mmask16)(n >> 16 * k);                                   \
            const __m512 square = _mm512_mul_ps(gi[k], gi[k]);                                  \
            if (buffered) _mm512_store_ps(kept + i + 16 * k, m[k]);                             \
            /* max(mag, peak) keeps peak when mag is NaN, as the portable rows do */            \
            peak_v = _mm512_mask_max_ps(peak_v, lanes, _mm512_abs_ps(m[k]), peak_v);            \
            if (per_element) {                                                                  \
                ST *vk = v + i + 16 * k;                                                        \
                const __m512 vv = load16(vk, lanes, BF16);                                      \
                STORE16(vk, lanes, _mm512_add_ps(_mm512_mul_ps(vv, beta2_v), _mm512_mul_ps(square, keep2_v)), BF16); \
            } else {                                                                            \
                sum_v = _mm512_add_ps(sum_v, square); /* lanes past n add +0 */                 \
            }                                                                                   \
        }                                                                                       \
    }                                                                                           \
    _Alignas(64) float lanes[SUM_LANES];                                                        \
    _mm512_store_ps(lanes, sum_v);                                                              \
    FOLD_LANES(lanes)                                                                           \
    const float square_sum = lanes[0], peak = _mm512_reduce_max_ps(peak_v);                     \
    NEW_MAGNITUDE(float, LOAD, STORE, sqrtf, v, r, len)                                         \
                                                                                                \
    const Quantiser q = {                                                                       \
        .stored = _mm512_set1_ps(stored),                                                       \
        .half = _mm512_set1_ps((float)half),                                                    \
        .low_cell = _mm512_set1_ps((float)-half),                                               \
        .high_cell = _mm512_set1_ps((float)(half - 1)),                                         \
        .half_i = _mm512_set1_epi32(half),                                                      \
        .fine_mask = _mm512_set1_epi16((short)((1 << t->shift) - 1)),                           \
        .live = _mm512_set1_epi8(live ? -1 : 0),                                                \
        .shift = _mm_cvtsi32_si128(t->shift),                                                   \
        .identity = identity,                                                                   \
    };                                                                                          \
    /* Three loops, each with a dependency chain per chunk short enough for the core to overlap \
     * consecutive chunks (one loop doing all of it ran about 9% slower): the quotients and the \
     * boundary counts below them, the codes, the update. Rows longer than TILE have no buffer: \
     * their codes follow in the first loop. */                                                 \
    _Alignas(64) uint8_t below_buffer[TILE];                                                    \
    for (int64_t i = 0; i < len; i += 64) {                                                     \
        const __mmask64 n = len - i >= 64 ? ~0ull : (1ull << (len - i)) - 1;                    \
        if (buffered) {                                                                         \
            for (int k = 0; k < 4; k++) m[k] = _mm512_load_ps(kept + i + 16 * k);               \
        } else {                                                                                \
            first_moments##SUFFIX(t, codes, g, BF16, i, n, old_mags, beta1_v, sign_v, keep1_v,  \
                                  m, gi);                                                       \
        }                                                                                       \
        __m512 x[4];                                                                            \
        for (int k = 0; k < 4; k++) x[k] = _mm512_div_ps(m[k], q.stored);                       \
        const __m512i below = boundaries_below##SUFFIX(t, &q, x);                               \
        if (buffered) {                                                                         \
            for (int k = 0; k < 4; k++) _mm512_store_ps(kept + i + 16 * k, x[k]);               \
            _mm512_store_si512(below_buffer + i, below);                                        \
        } else {                                                                                \
            const __m512i code = nearest_codes##SUFFIX(t, &q, x, below);                        \
            _mm512_mask_storeu_epi8(codes + i, n, transpose_groups(code));                      \
        }                                                                                       \
    }                                                                                           \
    for (int64_t i = 0; buffered && i < len; i += 64) {                                         \
        const __mmask64 n = len - i >= 64 ? ~0ull : (1ull << (len - i)) - 1;                    \
        __m512 x[4];                                                                            \
        for (int k = 0; k < 4; k++) x[k] = _mm512_load_ps(kept + i + 16 * k);                   \
        const __m512i code = nearest_codes##SUFFIX(t, &q, x, _mm512_load_si512(below_buffer + i)); \
        _mm512_mask_storeu_epi8(codes + i, n, transpose_groups(code));                          \
    }                                                                                           \
    const __m512 decay_v = _mm512_set1_ps(decay), step_v = _mm512_set1_ps(step_size);           \
    const __m512 bias2_v = _mm512_set1_ps(bias2_t), eps_v = _mm512_set1_ps(eps);                \
    const __m512 shared_v = _mm512_set1_ps(shared_scale);                                       \
    for (int64_t i = 0; i < len; i += 64) {                                                     \
        const __mmask64 n = len - i >= 64 ? ~0ull : (1ull << (len - i)) - 1;                    \
        __m512 dequantised[4];                                                                  \
        const __m512i code = transpose_groups(_mm512_maskz_loadu_epi8(n, codes + i));           \
        lookup_f32##SUFFIX(t->codebook, code, dequantised);                                     \
        for (int k = 0; k < 4; k++) {                                                           \
            const __mmask16 lanes = (__mmask16)(n >> 16 * k);                                   \
            ST *pk = param + i + 16 * k;                                                        \
            __m512 scale = shared_v;                                                            \
            if (per_element) { /* ELEMENT_SCALE */                                              \
                const __m512 vv = load16(v + i + 16 * k, lanes, BF16);                          \
                scale = _mm512_div_ps(                                                          \
                    step_v, _mm512_add_ps(_mm512_sqrt_ps(_mm512_div_ps(vv, bias2_v)), eps_v));  \
            }                                                                                   \
            const __m512 update = _mm512_mul_ps(_mm512_mul_ps(dequantised[k], q.stored), scale); \
            const __m512 old = load16(pk, lanes, BF16);                                         \
            STORE16(pk, lanes, _mm512_sub_ps(_mm512_mul_ps(old, decay_v), update), BF16);       \
        }                                                                                       \
    }                                                                                           \
}

/* A batch of short rows (see DEFINE_BATCH) in the byte-plane rows' lookups, 64 elements at a time,
 * each element with its own old magnitude, stored magnitude and scale; each row's peak and
 * sum of g^2 in 16-lane vectors, its lanes those of SUM_LANES (faster than the vectoriser's
 * loops across rows: 0.90x the time at 9 elements, 0.78x at 16, 0.71x at 32). */
#define DEFINE_PLANE_BATCH(NAME, ISA, SUFFIX, ST, LOAD, STORE, BF16, STORE16)                   \
ISA static void NAME(const Step *s, int64_t r0, int64_t rows, int64_t p) {                      \
    BATCH_SETUP(float, ST, LOAD)                                                                \
    TOUCH_ROWS(ST, n, rows)                                                                     \
    const BytePlanes *t = s->planes;                                                            \
    const __m512 beta1_v = _mm512_set1_ps(beta1), keep1_v = _mm512_set1_ps(keep1);              \
    const __m512 sign_v = _mm512_set1_ps(sign), beta2_v = _mm512_set1_ps(beta2);                \
    const __m512 keep2_v = _mm512_set1_ps(keep2);                                               \
    for (int64_t i = 0; i < n; i += 64) {                                                       \
        const __mmask64 in = n - i >= 64 ? ~0ull : (1ull << (n - i)) - 1;                       \
        __m512 old[4], m[4], gi[4];                                                             \
        for (int k = 0; k < 4; k++)                                                             \
            old[k] = _mm512_maskz_loadu_ps((__mmask16)(in >> 16 * k), spread + i + 16 * k);     \
        first_moments##SUFFIX(t, codes, g, BF16, i, in, old, beta1_v, sign_v, keep1_v, m, gi);  \
        for (int k = 0; k < 4; k++) {                                                           \
            const __mmask16 lanes = (__mmask16)(in >> 16 * k);                                  \
            _mm512_mask_storeu_ps(kept + i + 16 * k, lanes, m[k]);                              \
            if (per_element) {                                                                  \
                ST *vk = v + i + 16 * k;                                                        \
                const __m512 square = _mm512_mul_ps(gi[k], gi[k]);                              \
                STORE16(vk, lanes, _mm512_add_ps(_mm512_mul_ps(load16(vk, lanes, BF16), beta2_v), \
                                                 _mm512_mul_ps(square, keep2_v)), BF16);        \
            }                                                                                   \
        }                                                                                       \
    }                                                                                           \
    {                                                                                           \
        float row_peak[BATCH], row_sum[BATCH];                                                  \
        for (int64_t j = 0; j < rows; j++) {                                                    \
            __m512 peak_v = _mm512_setzero_ps(), sum_v = _mm512_setzero_ps();                   \
            for (int64_t i0 = j * block; i0 < (j + 1) * block; i0 += 16) {                      \
                const int64_t left = (j + 1) * block - i0;                                      \
                const __mmask16 lanes = left >= 16 ? 0xffff : (__mmask16)((1u << left) - 1);    \
                /* max(mag, peak) keeps peak when mag is NaN, as the rows do */                 \
                const __m512 mag = _mm512_abs_ps(_mm512_maskz_loadu_ps(lanes, kept + i0));      \
                peak_v = _mm512_max_ps(mag, peak_v);                                            \
                const __m512 gv = load16(g + i0, lanes, BF16);                                  \
                sum_v = _mm512_add_ps(sum_v, _mm512_mul_ps(gv, gv)); /* +0 past the row */      \
            }                                                                                   \
            row_peak[j] = _mm512_reduce_max_ps(peak_v);                                         \
            /* FOLD_LANES */                                                                    \
            const __m256 w8 = _mm256_add_ps(_mm512_castps512_ps256(sum_v),                      \
                                            _mm512_extractf32x8_ps(sum_v, 1));                  \
            const __m128 w4 = _mm_add_ps(_mm256_castps256_ps128(w8),                            \
                                         _mm256_extractf128_ps(w8, 1));                         \
            const __m128 w2 = _mm_add_ps(w4, _mm_movehl_ps(w4, w4));                            \
            row_sum[j] = _mm_cvtss_f32(_mm_add_ss(w2, _mm_movehdup_ps(w2)));                    \
        }                                                                                       \
        BATCH_FINISH(float, LOAD, STORE, sqrtf)                                                 \
    }                                                                                           \
    const int32_t half = (int32_t)a->lut_half;                                                  \
    const Quantiser q = {                                                                       \
        .half = _mm512_set1_ps((float)half),                                                    \
        .low_cell = _mm512_set1_ps((float)-half),                                               \
        .high_cell = _mm512_set1_ps((float)(half - 1)),                                         \
        .half_i = _mm512_set1_epi32(half),                                                      \
        .fine_mask = _mm512_set1_epi16((short)((1 << t->shift) - 1)),                           \
        .live = _mm512_set1_epi8(-1), /* each element's mask follows */                         \
        .shift = _mm_cvtsi32_si128(t->shift),                                                   \
        .identity = identity,                                                                   \
    };                                                                                          \
    const __m512 decay_v = _mm512_set1_ps(decay), step_v = _mm512_set1_ps(step_size);           \
    const __m512 bias2_v = _mm512_set1_ps(bias2_t), eps_v = _mm512_set1_ps(eps);                \
    for (int64_t i = 0; i < n; i += 64) {                                                       \
        const __mmask64 in = n - i >= 64 ? ~0ull : (1ull << (n - i)) - 1;                       \
        __m512 x[4], stored[4], dequantised[4];                                                 \
        uint64_t live = 0; /* the compares' bits in the lookups' order (see nearest_codes) */   \
        for (int k = 0; k < 4; k++) {                                                           \
            const __mmask16 lanes = (__mmask16)(in >> 16 * k);                                  \
            stored[k] = _mm512_maskz_loadu_ps(lanes, spread + i + 16 * k);                      \
            x[k] = _mm512_div_ps(_mm512_maskz_loadu_ps(lanes, kept + i + 16 * k), stored[k]);   \
            live |= _pdep_u64(_mm512_cmp_ps_mask(stored[k], _mm512_setzero_ps(), _CMP_GT_OQ),   \
                              0x000f000f000f000full << 4 * k);                                  \
        }                                                                                       \
        const __m512i code =                                                                    \
            _mm512_maskz_mov_epi8(live, nearest_codes##SUFFIX(t, &q, x,                         \
                                                          boundaries_below##SUFFIX(t, &q, x))); \
        _mm512_mask_storeu_epi8(codes + i, in, transpose_groups(code));                         \
        lookup_f32##SUFFIX(t->codebook, code, dequantised);                                     \
        for (int k = 0; k < 4; k++) {                                                           \
            const __mmask16 lanes = (__mmask16)(in >> 16 * k);                                  \
            ST *pk = param + i + 16 * k;                                                        \
            const __m512 scale_k = per_element /* ELEMENT_SCALE */                              \
                ? _mm512_div_ps(step_v, _mm512_add_ps(_mm512_sqrt_ps(_mm512_div_ps(             \
                      load16(v + i + 16 * k, lanes, BF16), bias2_v)), eps_v))                   \
                : _mm512_maskz_loadu_ps(lanes, scale + i + 16 * k);                             \
            const __m512 update = _mm512_mul_ps(_mm512_mul_ps(dequantised[k], stored[k]), scale_k); \
            STORE16(pk, lanes, _mm512_sub_ps(_mm512_mul_ps(load16(pk, lanes, BF16), decay_v), update), \
                    BF16);                                                                      \
        }                                                                                       \
    }                                                                                           \
}

/* The byte-plane rows and batches of one instruction set and dtype: row_##TAIL, batch_##TAIL */
#define DEFINE_PLANE_STEPS(TAIL, ISA, SUFFIX, ST, LOAD, STORE, BF16, STORE16)                    \
    DEFINE_PLANE_ROW(row_##TAIL, ISA, SUFFIX, ST, LOAD, STORE, BF16, STORE16)                   \
    DEFINE_PLANE_BATCH(batch_##TAIL, ISA, SUFFIX, ST, LOAD, STORE, BF16, STORE16)

DEFINE_PLANE_STEPS(f32_vbmi, ISA_VBMI, _vbmi, float, LOAD_F32, STORE_F32, 0, store16)
DEFINE_PLANE_STEPS(bf16_vbmi, ISA_VBMI, _vbmi, uint16_t, LOAD_BF16, STORE_BF16, 1, store16)
DEFINE_PLANE_STEPS(bf16_vbmi_bf16, ISA_VBMI_BF16, _vbmi, uint16_t, LOAD_BF16, STORE_BF16, 1,
                   store16_converted)
DEFINE_PLANE_STEPS(f32_avx512, ISA_AVX512, _avx512, float, LOAD_F32, STORE_F32, 0, store16)
DEFINE_PLANE_STEPS(bf16_avx512, ISA_AVX512, _avx512, uint16_t, LOAD_BF16, STORE_BF16, 1, store16)


/* ---- the AVX2 rows (fp32 and bf16 state) ----
 *
 * Without AVX-512's permutes, table lookups go element by element, and the vectoriser's rows
 * make four per element: the old code's entry, the cell's boundary count, the boundary, the new
 * code's entry. These rows make two. The code of x is the number of boundaries b < x, and on
 * the unsigned integers that order fp32 values (unsigned_key()), b < x compares the cells (the
 * top bits) and then, within a cell, the offsets (the low bits). With cells so fine that each
 * holds at most one boundary, a cell's 8 bytes give the codes below and above its boundary, the
 * boundary's offset and the entry of the code below, and the next cell's the entry above: one
 * 16-byte load, one integer compare, one blend (0.81-0.96x the time of 4-byte cells and a
 * lookup of the new code's entry, 2026-12-07). The cells follow the floating-point spacing,
 * fine near 0 where the codebook is dense, and cover every fp32 value, NaN (code 0, as in the
 * portable rows) and infinities included, so that no key needs clamping.
 *
 * The lookups are scalar loads put together into vectors (entries8, cells8), not gathers.
 * Under the microcode against Downfall (GDS), which Intel's Skylake to Ice Lake CPUs and their
 * cloud hosts carry, an 8-lane gather takes ~23 cycles (an Ice Lake server, 2026-12-07), where
 * the EPYC and Sapphire Rapids cores measured before took ~5; there these rows took 0.32-0.33x
 * the time of the same rows with gathers (4096x768, fp32 and bf16, 1 and 2 threads), 0.45-0.46x
 * in rows of 64 and 0.52-0.53x in batches of rows of 9. Where the microcode is not, gathers are
 * still slower: on a Sapphire Rapids-class Xeon, gathers for either lookup or both took
 * 1.00-1.31x the time of these loads (4096x768, 16384x64, 116508x9, fp32 and bf16, 1 thread,
 * 2026-12-07). */

#define OFFSET_NONE 0xffffu /* no offset is above it: the cell holds no boundary */

/* The unsigned integer whose order is the order of the fp32 values (bits u), -0 below +0, NaNs
 * past the infinities. */
static inline uint32_t unsigned_key(uint32_t u) { return u ^ ((uint32_t)((int32_t)u >> 31) | 0x80000000u); }

typedef struct CellTable {
    int64_t num_distinct;       /* the tables it was built from */
    float bounds[256];
    int32_t first[256];
    float codebook[256];
    int shift;                  /* cell = unsigned_key(x) >> shift */
    /* Per cell, two words: the codebook entry of the code below its boundary (fp32 bits);
     * then the code below (bits 0-7), the code above (8-15) and the boundary's offset in the
     * cell (16-31; OFFSET_NONE). The code above a cell's boundary is the code below the next
     * cell's (one boundary at most per cell), so the 16 bytes from a cell hold both entries;
     * one cell past the last ends the table. */
    uint32_t *cells;
    /* The cells, at shift 31, of a row whose stored magnitude is 0: every key gets code 0 */
    uint32_t dead[3 * 2];
} CellTable;

/* Fills t->cells for t's bounds, at the coarsest shift from 16 (offsets fit 16 bits) down to
 * 14 (a 2 MB table) that leaves at most one boundary per cell. Returns 0, or -1 if none does,
 * a boundary is not in [-2, 2], or memory runs out. */
static int build_cells(CellTable *t) {
    const int64_t count = t->num_distinct - 1; /* the last bound is +inf */
    uint32_t keys[256], bits;
    for (int64_t j = 0; j < count; j++) {
        const float b = t->bounds[j] == 0.0f ? 0.0f : t->bounds[j]; /* -0 compares as +0 */
        if (!(fabsf(b) <= 2.0f)) return -1;
        memcpy(&bits, &b, 4);
        keys[j] = unsigned_key(bits);
    }
    for (t->shift = 16; t->shift >= 14; t->shift--) {
        int unique = 1;
        for (int64_t j = 1; j < count && unique; j++)
            unique = keys[j] >> t->shift > keys[j - 1] >> t->shift;
        if (unique) break;
    }
    if (t->shift < 14) return -1;
    const uint32_t cells = 1u << (32 - t->shift), mask = (1u << t->shift) - 1;
    uint32_t *cell = t->cells = malloc(((size_t)cells + 1) * 2 * sizeof(uint32_t));
    if (!cell) return -1;
    for (uint32_t c = 0, j = 0; c < cells; c++) {
        while (j < count && keys[j] >> t->shift < c) j++; /* boundaries below the cell */
        const int inside = j < count && keys[j] >> t->shift == c;
        const uint32_t below = (uint32_t)t->first[j], above = (uint32_t)t->first[j + inside];
        cell[2 * c + 1] = below | above << 8 | (inside ? keys[j] & mask : OFFSET_NONE) << 16;
    }
    /* Past +inf (offset 0 of its cell) the keys are NaNs: code 0 */
    const uint32_t inf = unsigned_key(0x7f800000u) >> t->shift;
    cell[2 * inf + 1] = (uint32_t)t->first[count] | 0u << 16;
    for (uint32_t c = inf + 1; c <= cells; c++) cell[2 * c + 1] = OFFSET_NONE << 16;
    for (uint32_t c = 0; c <= cells; c++) /* the entry of the code below */
        memcpy(&cell[2 * c], &t->codebook[cell[2 * c + 1] & 0xff], 4);
    for (int c = 0; c < 3; c++) {
        memcpy(&t->dead[2 * c], &t->codebook[0], 4);
        t->dead[2 * c + 1] = OFFSET_NONE << 16; /* codes 0 below and above */
    }
    return 0;
}

static void free_cell_table(void *table) {
    if (table) free(((CellTable *)table)->cells);
    free(table);
}

/* The cell table of a call's codebook: built when the codebook changes, kept per thread (the
 * Python side calls from any thread, without the GIL), freed when the thread ends. NULL if
 * this codebook's boundaries need cells finer than build_cells allows, or memory runs out. */
static pthread_once_t cell_key_once = PTHREAD_ONCE_INIT;
static pthread_key_t cell_key;
static int cell_key_status = -1;

static void make_cell_key(void) { cell_key_status = pthread_key_create(&cell_key, free_cell_table); }

static const CellTable *cell_table(const StepArgs *a) {
    pthread_once(&cell_key_once, make_cell_key);
    if (cell_key_status != 0) return NULL;
    CellTable *t = pthread_getspecific(cell_key);
    const float *bounds = (const float *)a->bounds;
    if (t && t->num_distinct == a->num_distinct &&
        memcmp(t->bounds, bounds, (size_t)a->num_distinct * sizeof(float)) == 0 &&
        memcmp(t->first, a->first_index, (size_t)a->num_distinct * sizeof(int32_t)) == 0 &&
        memcmp(t->codebook, a->codebook, sizeof(t->codebook)) == 0)
        return t->cells ? t : NULL;
    if (!t && (!(t = calloc(1, sizeof(CellTable))) || pthread_setspecific(cell_key, t) != 0)) {
        free(t);
        return NULL;
    }
    free(t->cells);
    t->cells = NULL;
    t->num_distinct = a->num_distinct;
    memcpy(t->bounds, bounds, (size_t)a->num_distinct * sizeof(float));
    memcpy(t->first, a->first_index, (size_t)a->num_distinct * sizeof(int32_t));
    memcpy(t->codebook, a->codebook, sizeof(t->codebook));
    if (build_cells(t) != 0) {
        free(t->cells);
        t->cells = NULL; /* remembered: this codebook takes the vectoriser's rows */
        return NULL;
    }
    return t;
}

#define LOAD8_F32(ptr) _mm256_loadu_ps(ptr)
#define STORE8_F32(ptr, x) _mm256_storeu_ps(ptr, x)
#define LOAD8_BF16(ptr)                                                                         \
    _mm256_castsi256_ps(_mm256_slli_epi32(                                                      \
        _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(ptr))), 16))
#define STORE8_BF16(ptr, x) _mm_storeu_si128((__m128i *)(ptr), bf16_of(x))

/* f32_to_bf16 of 8 lanes, as 32-bit lanes. */
ISA_AVX2 static inline __m256i bf16_lanes(__m256 x) {
    const __m256i u = _mm256_castps_si256(x);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_srli_epi32(
        _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), odd), 16);
    return _mm256_castps_si256(_mm256_blendv_ps(
        _mm256_castsi256_ps(rounded), _mm256_castsi256_ps(_mm256_set1_epi32(0x7fc0)),
        _mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
}

/* f32_to_bf16 of 8 lanes, packed. */
ISA_AVX2 static inline __m128i bf16_of(__m256 x) {
    /* in-lane packs leave lanes 0-3 in quadword 0, 4-7 in quadword 2 */
    const __m256i lanes = bf16_lanes(x);
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(lanes, lanes), 0x08));
}

/* Two chunks' 16 lanes stored at p, in one pack: STORE8 of each. */
#define STORE16_F32(ptr, first, second)                                                         \
    (_mm256_storeu_ps(ptr, first), _mm256_storeu_ps((ptr) + 8, second))
#define STORE16_BF16(ptr, first, second)                                                        \
    _mm256_storeu_si256((__m256i *)(ptr), _mm256_permute4x64_epi64(                            \
        _mm256_packus_epi32(bf16_lanes(first), bf16_lanes(second)), 0xd8))

/* The codebook entries of the 8 codes at `codes` (see the lookups above). */
ISA_AVX2 static inline __m256 entries8(const float *codebook, const uint8_t *codes) {
    return _mm256_setr_ps(codebook[codes[0]], codebook[codes[1]], codebook[codes[2]],
                          codebook[codes[3]], codebook[codes[4]], codebook[codes[5]],
                          codebook[codes[6]], codebook[codes[7]]);
}

/* The cells at `index` of 8 lanes (see the lookups above and CellTable): the codebook entries
 * below and above their boundaries, and their words of codes and offsets. Each lane's 16 bytes
 * are one load, and the four words of the lanes are transposed. The indices are stored and
 * read back as scalars: left to itself, the compiler extracts them from the vector one by one,
 * on the port that also puts the lanes together (0.94x the time this way in fp32, 0.89x in
 * bf16, 4096x768, measured when the cells were 4 bytes and the lanes 4-byte loads). */
ISA_AVX2 static inline __m256i cells8(const uint32_t *cells, __m256i index, __m256 *below,
                                      __m256 *above) {
    _Alignas(32) uint32_t at[8];
    _mm256_store_si256((__m256i *)at, index);
    __asm__("" : "+m"(at)); /* the compiler no longer knows at's contents */
#define CELL16(k) _mm_loadu_si128((const __m128i *)(cells + 2 * (size_t)at[k]))
#define CELL_PAIR(k) _mm256_inserti128_si256(_mm256_castsi128_si256(CELL16(k)), CELL16(k + 4), 1)
    /* lanes k and k + 4: entry below, word, entry above, the next cell's word */
    const __m256i y0 = CELL_PAIR(0), y1 = CELL_PAIR(1), y2 = CELL_PAIR(2), y3 = CELL_PAIR(3);
#undef CELL_PAIR
#undef CELL16
    const __m256i low01 = _mm256_unpacklo_epi32(y0, y1), low23 = _mm256_unpacklo_epi32(y2, y3);
    const __m256i high01 = _mm256_unpackhi_epi32(y0, y1), high23 = _mm256_unpackhi_epi32(y2, y3);
    *below = _mm256_castsi256_ps(_mm256_unpacklo_epi64(low01, low23));
    *above = _mm256_castsi256_ps(_mm256_unpacklo_epi64(high01, high23));
    return _mm256_unpackhi_epi64(low01, low23);
}

/* FIRST_MOMENT of 8 elements from their 8 code bytes; keep1 carries the sign of maximize
 * ((sign g) keep1 and g (sign keep1) are the same bits: negation is exact). */
ISA_AVX2 static inline __m256 first_moment8(const float *codebook, const uint8_t *codes,
                                            __m256 g, __m256 old_mag, __m256 beta1,
                                            __m256 signed_keep1) {
    const __m256 entry = entries8(codebook, codes);
    return _mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(entry, old_mag), beta1),
                         _mm256_mul_ps(g, signed_keep1));
}

/* What the codes of a row's quotients need, as vectors. */
typedef struct {
    const uint32_t *cells;
    __m256i offset_mask;
    __m128i shift;
} Coder;

/* The coder of a row: code 0 (and codebook[0]) for all of a row not live (its stored magnitude
 * not > 0); batches, whose rows are live or not lane by lane, take the live one and mask. */
ISA_AVX2 static inline Coder coder_of(const CellTable *t, int live) {
    const int shift = live ? t->shift : 31;
    return (Coder){.cells = live ? t->cells : t->dead,
                   .offset_mask = _mm256_set1_epi32((int)((1u << shift) - 1)),
                   .shift = _mm_cvtsi32_si128(shift)};
}

/* The codes of 8 quotients x, as 32-bit lanes, and their codebook entries in *entry. */
ISA_AVX2 static inline __m256i codes8(const Coder *c, __m256 x, __m256 *entry) {
    const __m256i u = _mm256_castps_si256(x);
    const __m256i key = _mm256_xor_si256(
        u, _mm256_or_si256(_mm256_srai_epi32(u, 31), _mm256_set1_epi32((int)0x80000000u)));
    __m256 below, above_entry;
    const __m256i word = cells8(c->cells, _mm256_srl_epi32(key, c->shift), &below, &above_entry);
    const __m256i above = _mm256_cmpgt_epi32(_mm256_and_si256(key, c->offset_mask),
                                             _mm256_srli_epi32(word, 16));
    /* the code above the boundary is the word's second byte */
    const __m256i code = _mm256_srlv_epi32(word, _mm256_and_si256(above, _mm256_set1_epi32(8)));
    *entry = _mm256_blendv_ps(below, above_entry, _mm256_castsi256_ps(above));
    return _mm256_and_si256(code, _mm256_set1_epi32(0xff));
}

/* FOLD_LANES of the 16 lanes even (0-7) and odd (8-15), in vector registers: the same
 * additions in the same order. */
ISA_AVX2 static inline float fold_lanes(__m256 even, __m256 odd) {
    const __m256 w8 = _mm256_add_ps(even, odd);
    const __m128 w4 = _mm_add_ps(_mm256_castps256_ps128(w8), _mm256_extractf128_ps(w8, 1));
    const __m128 w2 = _mm_add_ps(w4, _mm_movehl_ps(w4, w4));
    return _mm_cvtss_f32(_mm_add_ss(w2, _mm_movehdup_ps(w2)));
}

/* The largest of 8 lanes (none NaN: max is then exact in any order). */
ISA_AVX2 static inline float largest(__m256 x) {
    const __m128 w4 = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    const __m128 w2 = _mm_max_ps(w4, _mm_movehl_ps(w4, w4));
    return _mm_cvtss_f32(_mm_max_ss(w2, _mm_movehdup_ps(w2)));
}

/* The low bytes of 8 32-bit lanes, stored as 8 bytes. */
ISA_AVX2 static inline void store_codes8(uint8_t *codes, __m256i code) {
    const __m256i bytes = _mm256_shuffle_epi8(
        code, _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                               0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1));
    const __m128i both = _mm_unpacklo_epi32(_mm256_castsi256_si128(bytes),
                                            _mm256_extracti128_si256(bytes, 1));
    _mm_storel_epi64((__m128i *)codes, both);
}

/* The low bytes of two chunks' 32-bit lanes (at most 255), stored as 16 bytes. */
ISA_AVX2 static inline void store_codes16(uint8_t *codes, __m256i first, __m256i second) {
    /* in-lane packs leave dwords 0, 1, 4, 5: first[0..3], second[0..3], first[4..7], ... */
    const __m256i words = _mm256_packus_epi32(first, second);
    const __m256i bytes = _mm256_packus_epi16(words, words);
    const __m256i order = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 0, 0, 0, 0));
    _mm_storeu_si128((__m128i *)codes, _mm256_castsi256_si128(order));
}

/* One row; ST and LOAD8/STORE8: the storage type and its 8-lane conversions (LOAD/STORE: one
 * element, for ROW_SETUP). The chunk bodies run on the row in place, then on copies of its last
 * len % 8 elements padded to 8 (lanes past the row are computed and dropped). */
#define DEFINE_AVX2_ROW(NAME, ST, LOAD, STORE, LOAD8, STORE8, STORE16)                          \
    ISA_AVX2 static void NAME(const Step *s, int64_t r, int64_t owner) {                        \
        ROW_SETUP(float, ST, LOAD)                                                              \
        TOUCH_ROWS(ST, len, 1)                                                                  \
        (void)identity; /* the cell table holds the codes of repeated entries */                \
        const float *restrict codebook = (const float *)a->codebook;                           \
        const __m256 old_mag_v = _mm256_set1_ps(old_mag), beta1_v = _mm256_set1_ps(beta1);      \
        const __m256 keep1_v = _mm256_set1_ps(sign * keep1);                                    \
        const __m256 beta2_v = _mm256_set1_ps(beta2), keep2_v = _mm256_set1_ps(keep2);         \
        const int64_t whole = len & ~(int64_t)7, rest = len - whole;                            \
        _Alignas(32) float kept[TILE];                                                          \
        ST g_tail[8] = {0}, p_tail[8] = {0}, v_tail[8] = {0};                                   \
        uint8_t c_tail[8] = {0};                                                                \
        if (rest) { /* rows of whole chunks (the common case) skip the copies */                \
            memcpy(g_tail, g + whole, rest * sizeof(ST));                                       \
            memcpy(p_tail, param + whole, rest * sizeof(ST));                                   \
            memcpy(c_tail, codes + whole, rest);                                                \
            if (per_element) memcpy(v_tail, v + whole, rest * sizeof(ST));                      \
        }                                                                                       \
        const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));             \
        const __m256 tail_mask = _mm256_and_ps(abs_mask, _mm256_castsi256_ps(_mm256_cmpgt_epi32( \
            _mm256_set1_epi32((int)rest), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))));         \
        __m256 peak_v = _mm256_setzero_ps(), even = _mm256_setzero_ps(), odd = even;            \
        /* the first pass: m, its peak (lanes past the row masked out), then v, or the sum of   \
         * g^2 in the lanes of SUM_LANES: element i in `even` or `odd` by i / 8 % 2, lane i % 8. \
         * One loop per case, each without branches. */                                         \
        int64_t i = 0;                                                                          \
        if (per_element && buffered) AVX2_FIRST_PASS(LOAD8, STORE8, 1, 1)                       \
        else if (per_element) AVX2_FIRST_PASS(LOAD8, STORE8, 1, 0)                              \
        else if (buffered) AVX2_FIRST_PASS(LOAD8, STORE8, 0, 1)                                 \
        else AVX2_FIRST_PASS(LOAD8, STORE8, 0, 0)                                               \
        const float square_sum = fold_lanes(even, odd), peak = largest(peak_v);                \
        NEW_MAGNITUDE(float, LOAD, STORE, sqrtf, v, r, len)                                     \
        const CellTable *t = s->cells;                                                          \
        const Coder coder = coder_of(t, live);                                                  \
        const __m256 stored_v = _mm256_set1_ps(stored), decay_v = _mm256_set1_ps(decay);        \
        const __m256 step_v = _mm256_set1_ps(step_size), bias2_v = _mm256_set1_ps(bias2_t);     \
        const __m256 eps_v = _mm256_set1_ps(eps), shared_v = _mm256_set1_ps(shared_scale);     \
        /* the second pass: codes, then the update. Kept rows do each in a loop of its own      \
         * (shorter dependency chains, which the core overlaps): the codes' loop writes the     \
         * new codes' entries over the first moments in kept, where the update reads them. The  \
         * others recompute the moments, in one loop. */                                        \
        if (buffered) {                                                                         \
            for (i = 0; i + 16 <= whole; i += 16) {                                             \
                const __m256i c0 = AVX2_CODES(i), c1 = AVX2_CODES(i + 8);                       \
                store_codes16(codes + i, c0, c1);                                               \
            }                                                                                   \
            for (; i < len; i += 8) store_codes8(i < whole ? codes + i : c_tail, AVX2_CODES(i)); \
            if (per_element) AVX2_UPDATES(LOAD8, STORE8, STORE16, 1, AVX2_ENTRIES)              \
            else AVX2_UPDATES(LOAD8, STORE8, STORE16, 0, AVX2_ENTRIES)                          \
        } else {                                                                                \
            AVX2_UPDATES(LOAD8, STORE8, STORE16, per_element, AVX2_RECOMPUTED_ENTRIES)           \
        }                                                                                       \
        if (rest) {                                                                             \
            memcpy(param + whole, p_tail, rest * sizeof(ST));                                   \
            memcpy(codes + whole, c_tail, rest);                                                \
            if (per_element) memcpy(v + whole, v_tail, rest * sizeof(ST));                      \
        }                                                                                       \
    }

/* The first pass over the chunk at I of (G, C, V): the row's gradients, codes and second
 * moments there (its own, or the padded tail's copies). MASK: |.| of the lanes inside the
 * row; SUM: the running sums of its lanes of SUM_LANES. PER, BUF: per_element, buffered. */
#define AVX2_FIRST_CHUNK(LOAD8, STORE8, PER, BUF, G, C, V, I, MASK, SUM)                        \
    {                                                                                           \
        const __m256 gc = LOAD8(G);                                                             \
        const __m256 m = first_moment8(codebook, C, gc, old_mag_v, beta1_v, keep1_v);           \
        if (BUF) _mm256_store_ps(kept + (I), m);                                                \
        /* max(mag, peak) keeps peak when mag is NaN, as the portable rows do */                \
        peak_v = _mm256_max_ps(_mm256_and_ps(m, MASK), peak_v);                                 \
        const __m256 square = _mm256_mul_ps(gc, gc);                                            \
        if (PER)                                                                                \
            STORE8(V, _mm256_add_ps(_mm256_mul_ps(LOAD8(V), beta2_v), _mm256_mul_ps(square, keep2_v))); \
        else                                                                                    \
            SUM = _mm256_add_ps(SUM, square); /* the tail's padding adds +0 */                  \
    }
#define AVX2_FIRST_PASS(LOAD8, STORE8, PER, BUF)                                                \
    {                                                                                           \
        for (; i + 16 <= whole; i += 16) {                                                      \
            /* see PREFETCH_AHEAD: the gradients ahead, the parameters the second pass reads */  \
            _mm_prefetch((const char *)(g + i + PREFETCH_AHEAD), _MM_HINT_T0);                  \
            _mm_prefetch((const char *)(param + i), _MM_HINT_T0);                               \
            AVX2_FIRST_CHUNK(LOAD8, STORE8, PER, BUF, g + i, codes + i, v + i, i, abs_mask, even) \
            AVX2_FIRST_CHUNK(LOAD8, STORE8, PER, BUF, g + i + 8, codes + i + 8, v + i + 8, i + 8, \
                             abs_mask, odd)                                                     \
        }                                                                                       \
        if (i < whole) {                                                                        \
            AVX2_FIRST_CHUNK(LOAD8, STORE8, PER, BUF, g + i, codes + i, v + i, i, abs_mask, even) \
            i += 8;                                                                             \
        }                                                                                       \
        if (rest && i / 8 % 2 == 0)                                                             \
            AVX2_FIRST_CHUNK(LOAD8, STORE8, PER, BUF, g_tail, c_tail, v_tail, i, tail_mask, even) \
        else if (rest)                                                                          \
            AVX2_FIRST_CHUNK(LOAD8, STORE8, PER, BUF, g_tail, c_tail, v_tail, i, tail_mask, odd) \
    }

/* The codebook entries of the new codes of the chunk at I of an unkept row, from its first
 * moments recomputed (the codes are stored: the codes they replace were just read). */
#define AVX2_RECOMPUTED_ENTRIES(LOAD8, I)                                                       \
    ({                                                                                          \
        uint8_t *c = (I) < whole ? codes + (I) : c_tail;                                        \
        const __m256 m = first_moment8(codebook, c, LOAD8((I) < whole ? g + (I) : g_tail),      \
                                       old_mag_v, beta1_v, keep1_v);                            \
        __m256 entry;                                                                           \
        store_codes8(c, codes8(&coder, _mm256_div_ps(m, stored_v), &entry));                   \
        entry;                                                                                  \
    })

/* A kept row's codes of the chunk at I; their codebook entries replace its first moments in
 * kept, where the updates read them (AVX2_ENTRIES). */
#define AVX2_CODES(I)                                                                           \
    ({                                                                                          \
        __m256 entry;                                                                           \
        const __m256i code =                                                                    \
            codes8(&coder, _mm256_div_ps(_mm256_load_ps(kept + (I)), stored_v), &entry);        \
        _mm256_store_ps(kept + (I), entry);                                                     \
        code;                                                                                   \
    })
#define AVX2_ENTRIES(LOAD8, I) _mm256_load_ps(kept + (I))

/* The parameters after the update of the chunk at I, from its new codes' codebook entries
 * (ENTRY(LOAD8, I)), of the row's parameters and (PER) second moments there, or of the padded
 * tail's. */
#define AVX2_UPDATED(LOAD8, PER, ENTRY, I, P, V)                                                \
    ({                                                                                          \
        const __m256 entry = ENTRY(LOAD8, I);                                                   \
        const __m256 scale = PER ? _mm256_div_ps(step_v, _mm256_add_ps( /* ELEMENT_SCALE */     \
                                       _mm256_sqrt_ps(_mm256_div_ps(LOAD8(V), bias2_v)), eps_v)) \
                                 : shared_v;                                                    \
        const __m256 update = _mm256_mul_ps(_mm256_mul_ps(entry, stored_v), scale);            \
        _mm256_sub_ps(_mm256_mul_ps(LOAD8(P), decay_v), update);                                \
    })
/* Every chunk's update, two per iteration: independent loads to overlap, and bf16
 * stored 16 lanes per pack (measured: 1.6x faster in bf16, 1.1x in fp32). */
#define AVX2_UPDATES(LOAD8, STORE8, STORE16, PER, ENTRY)                                        \
    {                                                                                           \
        for (i = 0; i + 16 <= whole; i += 16) {                                                 \
            const __m256 first = AVX2_UPDATED(LOAD8, PER, ENTRY, i, param + i, v + i);           \
            const __m256 second = AVX2_UPDATED(LOAD8, PER, ENTRY, i + 8, param + i + 8, v + i + 8); \
            STORE16(param + i, first, second);                                                  \
        }                                                                                       \
        if (i < whole) {                                                                        \
            STORE8(param + i, AVX2_UPDATED(LOAD8, PER, ENTRY, i, param + i, v + i));             \
            i += 8;                                                                             \
        }                                                                                       \
        if (rest) STORE8(p_tail, AVX2_UPDATED(LOAD8, PER, ENTRY, i, p_tail, v_tail));            \
    }

DEFINE_AVX2_ROW(row_f32_avx2, float, LOAD_F32, STORE_F32, LOAD8_F32, STORE8_F32, STORE16_F32)
DEFINE_AVX2_ROW(row_bf16_avx2, uint16_t, LOAD_BF16, STORE_BF16, LOAD8_BF16, STORE8_BF16,
                STORE16_BF16)

/* BATCH_MAGNITUDES of an AVX2 batch, the squares of its gradients in scale: each row's peak
 * |m| and sum of g^2 in 8-lane vectors, its elements i % 16 < 8 in `even`, the others in
 * `odd` (the lanes of SUM_LANES, as in the rows; +0 past the row), folded as fold_lanes
 * folds. Faster than the vectoriser's loops across rows: 0.88x and 0.91x the batch's time at
 * 9 elements (fp32, bf16), 0.79x and 0.87x at 16, 0.77x and 0.82x at 32. */
#define AVX2_BATCH_MAGNITUDES(LOAD, STORE)                                                      \
    {                                                                                           \
        float row_peak[BATCH], row_sum[BATCH];                                                  \
        const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);                         \
        const __m256i lane_odd = _mm256_add_epi32(lane, _mm256_set1_epi32(8));                  \
        const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));             \
        for (int64_t j = 0; j < rows; j++) {                                                    \
            __m256 peak_v = _mm256_setzero_ps(), even = peak_v, odd = peak_v;                   \
            for (int64_t i0 = j * block; i0 < (j + 1) * block; i0 += 16) {                      \
                const __m256i left = _mm256_set1_epi32((int)((j + 1) * block - i0));            \
                const __m256 in_even = _mm256_castsi256_ps(_mm256_cmpgt_epi32(left, lane));     \
                const __m256 in_odd = _mm256_castsi256_ps(_mm256_cmpgt_epi32(left, lane_odd));  \
                /* max(mag, peak) keeps peak when mag is NaN, as the rows do */                 \
                peak_v = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(kept + i0),                \
                                                     _mm256_and_ps(in_even, abs_mask)), peak_v); \
                peak_v = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(kept + i0 + 8),            \
                                                     _mm256_and_ps(in_odd, abs_mask)), peak_v); \
                if (!per_element) {                                                             \
                    even = _mm256_add_ps(even, _mm256_and_ps(_mm256_loadu_ps(scale + i0), in_even)); \
                    odd = _mm256_add_ps(odd, _mm256_and_ps(_mm256_loadu_ps(scale + i0 + 8), in_odd)); \
                }                                                                               \
            }                                                                                   \
            row_peak[j] = largest(peak_v);                                                      \
            row_sum[j] = per_element ? 0 : fold_lanes(even, odd);                               \
        }                                                                                       \
        BATCH_FINISH(float, LOAD, STORE, sqrtf)                                                 \
    }

/* A batch of short rows (see DEFINE_BATCH) in the AVX2 rows' lookups, 8 elements at a time,
 * each with its own old magnitude, stored magnitude, mask and scale; the last n % 8 in the
 * vectoriser's loops (the same arithmetic). */
#define DEFINE_AVX2_BATCH(NAME, ST, LOAD, STORE, LOAD8, STORE8)                                 \
    ISA_AVX2 static void NAME(const Step *s, int64_t r0, int64_t rows, int64_t p) {             \
        BATCH_SETUP(float, ST, LOAD)                                                            \
        TOUCH_ROWS(ST, n, rows)                                                                 \
        VECTORISER_TABLES(float)                                                                \
        const int64_t whole = n & ~(int64_t)7;                                                  \
        const __m256 beta1_v = _mm256_set1_ps(beta1), keep1_v = _mm256_set1_ps(sign * keep1);  \
        const __m256 beta2_v = _mm256_set1_ps(beta2), keep2_v = _mm256_set1_ps(keep2);         \
        for (int64_t i = 0; i < whole; i += 8) {                                                \
            const __m256 gc = LOAD8(g + i);                                                     \
            _mm256_store_ps(kept + i, first_moment8(codebook, codes + i, gc,                    \
                                                    _mm256_load_ps(spread + i), beta1_v, keep1_v)); \
            const __m256 square = _mm256_mul_ps(gc, gc);                                        \
            if (per_element)                                                                    \
                STORE8(v + i, _mm256_add_ps(_mm256_mul_ps(LOAD8(v + i), beta2_v),               \
                                            _mm256_mul_ps(square, keep2_v)));                   \
            else                                                                                \
                _mm256_store_ps(scale + i, square); /* for AVX2_BATCH_MAGNITUDES */             \
        }                                                                                       \
        BATCH_FIRST_MOMENTS(float, LOAD, STORE, whole)                                          \
        for (int64_t i = whole; i < n && !per_element; i++) scale[i] = LOAD(g, i) * LOAD(g, i);  \
        AVX2_BATCH_MAGNITUDES(LOAD, STORE)                                                      \
        const CellTable *t = s->cells;                                                          \
        const Coder coder = coder_of(t, 1);                                                     \
        const __m256 first_entry = _mm256_set1_ps(codebook[0]);                                 \
        const __m256 decay_v = _mm256_set1_ps(decay), step_v = _mm256_set1_ps(step_size);       \
        const __m256 bias2_v = _mm256_set1_ps(bias2_t), eps_v = _mm256_set1_ps(eps);           \
        for (int64_t i = 0; i < whole; i += 8) {                                                \
            const __m256 stored = _mm256_load_ps(spread + i);                                   \
            /* rows whose stored magnitude is not > 0: code 0 */                                \
            const __m256 live = _mm256_cmp_ps(stored, _mm256_setzero_ps(), _CMP_GT_OQ);         \
            __m256 entry;                                                                       \
            const __m256i code =                                                                \
                codes8(&coder, _mm256_div_ps(_mm256_load_ps(kept + i), stored), &entry);        \
            store_codes8(codes + i, _mm256_and_si256(code, _mm256_castps_si256(live)));         \
            entry = _mm256_blendv_ps(first_entry, entry, live);                                 \
            const __m256 scale_i = per_element /* ELEMENT_SCALE */                              \
                ? _mm256_div_ps(step_v, _mm256_add_ps(                                          \
                      _mm256_sqrt_ps(_mm256_div_ps(LOAD8(v + i), bias2_v)), eps_v))             \
                : _mm256_load_ps(scale + i);                                                    \
            const __m256 update = _mm256_mul_ps(                                                \
                _mm256_mul_ps(entry, stored), scale_i);                                         \
            STORE8(param + i, _mm256_sub_ps(_mm256_mul_ps(LOAD8(param + i), decay_v), update)); \
        }                                                                                       \
        SECOND_PASS(float, LOAD, STORE, sqrtf, whole, n, kept[i], spread[i], -(spread[i] > 0), \
                    scale[i]) \
    }

DEFINE_AVX2_BATCH(batch_f32_avx2, float, LOAD_F32, STORE_F32, LOAD8_F32, STORE8_F32)
DEFINE_AVX2_BATCH(batch_bf16_avx2, uint16_t, LOAD_BF16, STORE_BF16, LOAD8_BF16, STORE8_BF16)
#endif

/* ---- the paths, picked by the CPU's features ---- */

enum { PATH_PORTABLE, PATH_AVX2, PATH_AVX512, PATH_VBMI, PATH_VBMI_BF16, NUM_PATHS };

/* Bit p set where this CPU (and its OS, which must save the vector state: libgcc's feature
 * checks ask it) runs path p. */
int gefen_cpu_paths(void) {
    int paths = 1 << PATH_PORTABLE;
#if X86_PATHS
    __builtin_cpu_init();
    const int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                     __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi") &&
                     __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("popcnt");
    const int avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                       __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
                       __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512cd");
    paths |= avx2 << PATH_AVX2 | avx512 << PATH_AVX512;
    const int vbmi = avx512 && __builtin_cpu_supports("avx512vbmi");
    /* AVX512_BF16: CPUID leaf 7, subleaf 1, EAX bit 5 (not every compiler's feature checks name it) */
    unsigned eax, ebx, ecx, edx;
    const int bf16 = __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) && eax >> 5 & 1;
    paths |= vbmi << PATH_VBMI | (vbmi && bf16) << PATH_VBMI_BF16;
#endif
    return paths;
}

/* The path CPU steps take from now on: `force` >= 0 picks one (tests and benchmarks compare
 * them), -1 only asks. Returns the path in force (by default the fastest this CPU runs), or -1,
 * changing nothing, if it cannot run `force`. */
int gefen_cpu_path(int force) {
    static int in_force = -1;
    const int paths = gefen_cpu_paths();
    if (force >= NUM_PATHS || (force >= 0 && !(paths >> force & 1))) return -1;
    if (force >= 0) in_force = force;
    if (in_force < 0)
        for (int p = PATH_PORTABLE; p < NUM_PATHS; p++)
            if (paths >> p & 1) in_force = p;
    return in_force;
}

/* ---- one call: every row of a bucket ---- */

typedef void (*RowFn)(const Step *, int64_t, int64_t);
typedef void (*BatchFn)(const Step *, int64_t, int64_t, int64_t);

/* The rows a step ran, for reports (kernels/native.py names them): the path's own, or the
 * vectoriser's where its tables do not fit (a fine-grained codebook, fp16 or fp64 state). */
enum {
    ROWS_NONE, ROWS_PORTABLE, ROWS_VEC_AVX2, ROWS_AVX2, ROWS_VEC_AVX512, ROWS_VBMI, ROWS_AVX512,
    ROWS_VBMI_BF16
};
static int last_rows = ROWS_NONE;

int gefen_last_rows(void) { return __atomic_load_n(&last_rows, __ATOMIC_RELAXED); }

/* Elements a thread takes at a time (whole rows, at least one): CHUNK_ELEMENTS, or fewer where
 * that leaves under CHUNKS_PER_THREAD per thread to balance the load, down to MIN_CHUNK. The
 * threads step neighbouring chunks at once, and a chunk's edges may share a cache line of
 * magnitudes, second moments or codes with its neighbours', which they then pass back and
 * forth; each chunk taken also costs the threads a shared counter. Measured on 2 threads
 * against chunks of 16 rows: 15% faster on 64-element rows, 29% with 8000 small tensors (rows
 * rarely at a line's start), the same on rows of 768 to 8192. */
#define CHUNK_ELEMENTS 65536
#define CHUNKS_PER_THREAD 8
#define MIN_CHUNK 4096
/* The most elements of one channels_last parameter a chunk holds: CHUNK_ELEMENTS, then up to a
 * row or an output channel (each at most CHUNK_ELEMENTS: StepArgs.layout). */
#define PERMUTED_MAX (2 * CHUNK_ELEMENTS)
#ifdef _OPENMP
#include <omp.h>
#define THREAD_NUM omp_get_thread_num()
#else
#define THREAD_NUM 0
#endif

/* The elements of one output channel of parameter p, where it is stored channels_last
 * (StepArgs.layout); else 0. */
static inline int64_t layout_unit(const StepArgs *a, int64_t p) {
    return a->layout ? a->layout[2 * p] * a->layout[2 * p + 1] : 0;
}

/* Chunks of whole rows, about `size` elements with a gradient each, in row order: the first
 * row of chunk c and its parameter at chunks[c], then (num_rows, -1). Called with chunks
 * NULL, only counts them. Returns the number of chunks. */
static int64_t row_chunks(const StepArgs *a, int64_t size, int64_t (*chunks)[2]) {
    int64_t n = 0, filled = size; /* the first row opens a chunk */
    for (int64_t p = 0; p < a->num_params; p++) {
        const int64_t *seg = a->segments + p * SEG_FIELDS;
        const int64_t rows = (p + 1 < a->num_params ? seg[SEG_FIELDS + SEG_ROW0] : a->num_rows) - seg[SEG_ROW0];
        const int64_t block = a->has_grad[p] ? seg[SEG_BLOCK] : 0; /* rows without one are free */
        /* a channels_last parameter's chunks hold whole output channels: rows taken `whole`
         * at a time */
        const int64_t unit = layout_unit(a, p);
        const int64_t whole = unit > seg[SEG_BLOCK] ? unit / seg[SEG_BLOCK] : 1;
        for (int64_t r = 0; r < rows;) {
            if (filled >= size) {
                if (chunks) chunks[n][0] = seg[SEG_ROW0] + r, chunks[n][1] = p;
                n++, filled = 0;
            }
            const int64_t fill = block ? ((size - filled + block - 1) / block + whole - 1) / whole * whole
                                       : rows;
            const int64_t take = fill < rows - r ? fill : rows - r;
            filled += take * block, r += take;
        }
    }
    if (chunks) chunks[n][0] = a->num_rows, chunks[n][1] = -1;
    return n;
}

/* The chunk size for a call (see CHUNK_ELEMENTS). */
static int64_t chunk_size(const StepArgs *a) {
    int64_t elements = 0;
    for (int64_t p = 0; p < a->num_params; p++)
        if (a->has_grad[p]) elements += a->segments[p * SEG_FIELDS + SEG_NUMEL];
    const int64_t even = elements / ((a->num_threads > 0 ? a->num_threads : 1) * CHUNKS_PER_THREAD);
    return even > CHUNK_ELEMENTS ? CHUNK_ELEMENTS : even < MIN_CHUNK ? MIN_CHUNK : even;
}

/* The longest rows each path steps in batches, measured against its rows one by one
 * (benchmarks/bench_kernel_ab.py, 1M elements, one thread): the VBMI batches took 0.15-0.16x
 * the time at 9 elements, 0.39-0.45x at 32, 0.57-0.64x at 48, 0.74-0.76x at 64 (fp32, bf16);
 * the AVX2 ones 0.84-0.89x at 48, 0.98-0.99x at 64; the vectoriser's 0.25-0.47x at 9,
 * 0.93-1.06x at 32, 1.0-1.5x at 64. The byte-plane batches with AVX-512BW's lookups (an Ice Lake
 * server, 2026-12-07): 0.17-0.18x at 9, 0.45-0.51x at 32, 0.66-0.68x at 48, 0.86-0.89x at 64. */
#define SHORT_ROW_PLANES 64
#define SHORT_ROW_AVX2 64
#define SHORT_ROW 32

/* Rows r to hi of parameter p: whole rows up to `longest` (and a->short_row) long in
 * batches, the others one by one. */
static inline void rows_of(const Step *s, RowFn row, BatchFn batch, int64_t longest, int64_t p,
                           int64_t r, int64_t hi) {
    const StepArgs *a = s->a;
    const int64_t *seg = a->segments + p * SEG_FIELDS, block = seg[SEG_BLOCK];
    const int64_t whole = seg[SEG_ROW0] + seg[SEG_NUMEL] / block; /* before a ragged last row */
    while (r < hi) {
        int64_t end = whole < hi ? whole : hi;
        end = end < r + BATCH / block ? end : r + BATCH / block;
        if (block <= a->short_row && block <= longest && a->has_grad[p] && r < end) {
            batch(s, r, end - r, p);
            r = end;
        } else {
            row(s, r++, p);
        }
    }
}

/* Copies elements [e0, e1) (whole output channels) of a channels_last tensor between its
 * memory `stored` (each channel's I x S logical elements as S x I) and `logical`, which holds
 * them in logical order from e0: into `logical` where in, else back. */
#define PERMUTE_CHANNELS(T)                                                                     \
    for (int64_t o = e0; o < e1; o += channels * spatial) {                                    \
        T *restrict l = (T *)logical + (o - e0), *restrict m = (T *)stored + o;                \
        for (int64_t y = 0; y < spatial; y++)                                                   \
            for (int64_t c = y < whole_y ? whole_c : 0; c < channels; c++) {                   \
                if (in) l[c * spatial + y] = m[y * channels + c];                               \
                else m[y * channels + c] = l[c * spatial + y];                                  \
            }                                                                                   \
    }
/* Copies elements [e0, e1) (whole output channels) of a channels_last tensor between its
 * memory `stored` (each channel's I x S logical elements as S x I) and `logical`, which holds
 * them in logical order from e0: into `logical` where in, else back. The first whole_y rows'
 * first whole_c columns of each S x I channel are left out (permute_channels_avx2's). */
static void permute_rest(char *logical, char *stored, int64_t e0, int64_t e1, int64_t channels,
                         int64_t spatial, int64_t size, int in, int64_t whole_y, int64_t whole_c) {
    if (size == 2) PERMUTE_CHANNELS(uint16_t)
    else if (size == 4) PERMUTE_CHANNELS(uint32_t)
    else PERMUTE_CHANNELS(uint64_t)
}

static void permute_channels(char *logical, char *stored, int64_t e0, int64_t e1, int64_t channels,
                             int64_t spatial, int64_t size, int in) {
    permute_rest(logical, stored, e0, e1, channels, spatial, size, in, 0, 0);
}

#if X86_PATHS
/* Row j of `to` (rows to_stride apart) from column j of the 8 x 8 32-bit elements at `from`
 * (rows from_stride apart). */
ISA_AVX2 static inline __attribute__((always_inline)) void transpose8(
    float *to, int64_t to_stride, const float *from, int64_t from_stride) {
    __m256 r[8], t[8], u[8];
    for (int k = 0; k < 8; k++) r[k] = _mm256_loadu_ps(from + k * from_stride);
    for (int k = 0; k < 8; k += 2) {
        t[k] = _mm256_unpacklo_ps(r[k], r[k + 1]);     /* columns 0 1 4 5 of rows k, k + 1 */
        t[k + 1] = _mm256_unpackhi_ps(r[k], r[k + 1]); /* columns 2 3 6 7 */
    }
    for (int k = 0; k < 8; k += 4) { /* columns j and j + 4 of rows k to k + 3 */
        u[k] = _mm256_shuffle_ps(t[k], t[k + 2], 0x44);
        u[k + 1] = _mm256_shuffle_ps(t[k], t[k + 2], 0xee);
        u[k + 2] = _mm256_shuffle_ps(t[k + 1], t[k + 3], 0x44);
        u[k + 3] = _mm256_shuffle_ps(t[k + 1], t[k + 3], 0xee);
    }
    for (int j = 0; j < 4; j++) {
        _mm256_storeu_ps(to + j * to_stride, _mm256_permute2f128_ps(u[j], u[j + 4], 0x20));
        _mm256_storeu_ps(to + (j + 4) * to_stride, _mm256_permute2f128_ps(u[j], u[j + 4], 0x31));
    }
}

/* permute_channels, 32-bit elements in 8 x 8 tiles, the rest element by element (ResNet-18's
 * step, stored channels_last: 15.2-16.2 ms against 20.2 with the element loops alone). */
ISA_AVX2 static void permute_channels_avx2(char *logical, char *stored, int64_t e0, int64_t e1,
                                           int64_t channels, int64_t spatial, int64_t size, int in) {
    if (size != 4) {
        permute_channels(logical, stored, e0, e1, channels, spatial, size, in);
        return;
    }
    const int64_t whole_y = spatial & ~(int64_t)7, whole_c = channels & ~(int64_t)7;
    for (int64_t o = e0; o < e1; o += channels * spatial) {
        float *l = (float *)logical + (o - e0), *m = (float *)stored + o;
        for (int64_t y = 0; y < whole_y; y += 8)
            for (int64_t c = 0; c < whole_c; c += 8) {
                if (in) transpose8(l + c * spatial + y, spatial, m + y * channels + c, channels);
                else transpose8(m + y * channels + c, channels, l + c * spatial + y, spatial);
            }
    }
    permute_rest(logical, stored, e0, e1, channels, spatial, size, in, whole_y, whole_c);
}
#endif

/* Every chunk's rows (rows_of). The rows of a channels_last parameter are stepped on a copy in
 * logical order, in the thread's scratch (s->scratch): its parameters' and gradients' elements
 * of the chunk, then its own table of their pointers, pointed at those copies while they are
 * stepped; the parameters' copies are written back. */
static void run_rows(const Step *s, RowFn row, BatchFn batch, int64_t longest, int rows) {
    __atomic_store_n(&last_rows, rows, __ATOMIC_RELAXED);
    const StepArgs *a = s->a;
    const int64_t (*chunks)[2] = s->chunks;
    const int64_t threads = a->num_threads > 0 ? a->num_threads : 1; /* gefen_step's scratch */
    _Pragma("omp parallel num_threads(threads)")
    {
        StepArgs mine = *a;
        Step local = *s;
        char *scratch = NULL;
        if (a->layout) {
            scratch = s->scratch + (size_t)THREAD_NUM * s->scratch_bytes;
            void **tables = (void **)(scratch + 2 * PERMUTED_MAX * s->size);
            memcpy(tables, a->params, (size_t)a->num_params * sizeof(void *));
            memcpy(tables + a->num_params, a->grads, (size_t)a->num_params * sizeof(void *));
            mine.params = tables, mine.grads = (const void *const *)(tables + a->num_params);
            local.a = &mine;
        }
        _Pragma("omp for schedule(dynamic, 1)")
        for (int64_t c = 0; c < s->num_chunks; c++) {
            int64_t p = chunks[c][1];
            for (int64_t r = chunks[c][0]; r < chunks[c + 1][0];) {
                while (p + 1 < a->num_params && a->segments[(p + 1) * SEG_FIELDS + SEG_ROW0] <= r) p++;
                const int64_t *seg = a->segments + p * SEG_FIELDS;
                int64_t hi = p + 1 < a->num_params ? seg[SEG_FIELDS + SEG_ROW0] : a->num_rows;
                hi = hi < chunks[c + 1][0] ? hi : chunks[c + 1][0];
                if (!layout_unit(a, p) || !a->has_grad[p]) {
                    rows_of(s, row, batch, longest, p, r, hi);
                } else {
                    const int64_t e0 = (r - seg[SEG_ROW0]) * seg[SEG_BLOCK];
                    int64_t e1 = (hi - seg[SEG_ROW0]) * seg[SEG_BLOCK];
                    e1 = e1 < seg[SEG_NUMEL] ? e1 : seg[SEG_NUMEL];
                    const int64_t channels = a->layout[2 * p], spatial = a->layout[2 * p + 1];
                    char *param = scratch, *grad = scratch + PERMUTED_MAX * s->size;
                    s->permute(param, (char *)a->params[p], e0, e1, channels, spatial, s->size, 1);
                    s->permute(grad, (char *)a->grads[p], e0, e1, channels, spatial, s->size, 1);
                    ((void **)mine.params)[p] = param - e0 * s->size;
                    ((const void **)mine.grads)[p] = grad - e0 * s->size;
                    rows_of(&local, row, batch, longest, p, r, hi);
                    ((void **)mine.params)[p] = a->params[p];
                    ((const void **)mine.grads)[p] = a->grads[p];
                    s->permute(param, (char *)a->params[p], e0, e1, channels, spatial, s->size, 0);
                }
                r = hi;
            }
        }
    }
}

/* Every chunk's rows on `path` for `dtype`: the byte-plane rows where `planes` (their tables)
 * are given; else the written AVX2 rows where `cells` (their table) is given, or on the VBMI
 * paths for fp32 where the table fits the codebook; else the vectoriser's rows of the path's
 * instruction set. */
static void step_rows(Step *s, int path, int dtype, const BytePlanes *planes,
                      const struct CellTable *cells) {
#if X86_PATHS
    /* by path from PATH_AVX512 and dtype (fp32 rows have no conversions to bf16) */
    static const RowFn plane_rows[3][2] = {{row_f32_avx512, row_bf16_avx512},
                                           {row_f32_vbmi, row_bf16_vbmi},
                                           {row_f32_vbmi, row_bf16_vbmi_bf16}};
    static const BatchFn plane_batches[3][2] = {{batch_f32_avx512, batch_bf16_avx512},
                                                {batch_f32_vbmi, batch_bf16_vbmi},
                                                {batch_f32_vbmi, batch_bf16_vbmi_bf16}};
    static const int plane_rows_run[3][2] = {{ROWS_AVX512, ROWS_AVX512},
                                             {ROWS_VBMI, ROWS_VBMI},
                                             {ROWS_VBMI, ROWS_VBMI_BF16}};
    const int vbmi = path >= PATH_VBMI;
    if (planes) {
        const int level = path - PATH_AVX512;
        s->planes = planes;
        run_rows(s, plane_rows[level][dtype], plane_batches[level][dtype], SHORT_ROW_PLANES,
                 plane_rows_run[level][dtype]);
    } else if (cells || (vbmi && dtype == DT_F32 && (cells = cell_table(s->a)))) {
        /* on the VBMI path where the codebook is too fine for the byte planes: faster than the
         * vectoriser's rows for fp32 (not for bf16: its conversions use the vectoriser's 16
         * lanes better) */
        s->cells = cells;
        run_rows(s, dtype == DT_F32 ? row_f32_avx2 : row_bf16_avx2,
                 dtype == DT_F32 ? batch_f32_avx2 : batch_bf16_avx2, SHORT_ROW_AVX2, ROWS_AVX2);
    } else if (path >= PATH_AVX512) {
        run_rows(s, rows_vec_avx512[dtype], batches_vec_avx512[dtype], SHORT_ROW, ROWS_VEC_AVX512);
    } else if (path == PATH_AVX2) {
        run_rows(s, rows_vec_avx2[dtype], batches_vec_avx2[dtype], SHORT_ROW, ROWS_VEC_AVX2);
    } else
#else
    (void)path, (void)planes, (void)cells;
#endif
        run_rows(s, rows_portable[dtype], batches_portable[dtype], SHORT_ROW, ROWS_PORTABLE);
}

/* Returns 0, or -1 for an unknown dtype or a failed allocation. */
int gefen_step(const StepArgs *a, int dtype) {
    if (dtype < DT_F32 || dtype > DT_F64) return -1;
    const int path = gefen_cpu_path(-1);
    /* everything allocated before the step counts move: a failure leaves the state as it was */
    double *bias = malloc(2 * (size_t)(a->num_params > 0 ? a->num_params : 1) * sizeof(double));
    const int64_t size = chunk_size(a), count = row_chunks(a, size, NULL);
    int64_t (*chunks)[2] = malloc((size_t)(count + 1) * sizeof *chunks);
    /* per thread: the channels_last rows' copies and pointer tables (run_rows) */
    static const int64_t sizes[] = {4, 2, 2, 8};
    const int64_t threads = a->num_threads > 0 ? a->num_threads : 1;
    const size_t scratch_bytes = 2 * PERMUTED_MAX * (size_t)sizes[dtype] +
                                 2 * (size_t)a->num_params * sizeof(void *);
    char *scratch = a->layout ? malloc((size_t)threads * scratch_bytes) : NULL;
    int status = bias && chunks && (scratch || !a->layout) ? 0 : -1;
    const BytePlanes *tables = NULL;
    const struct CellTable *cells = NULL;
#if X86_PATHS
    /* The written AVX2 rows' cell table, where the path takes those rows first and the table
     * fits the codebook: on the AVX2 path, and on AVX-512 CPUs without VBMI, where they took
     * 0.76-0.97x the time of the byte-plane rows with AVX-512BW's lookups (fp32 and bf16, 1 and
     * 2 threads, an Ice Lake server with both forced, 2026-12-07). Else the byte-plane rows'
     * tables, where the path has those rows and their bytes hold the codebook's cells. */
    if (status == 0 && dtype <= DT_BF16 && (path == PATH_AVX2 || path == PATH_AVX512))
        cells = cell_table(a);
    BytePlanes planes = {.steps = NULL};
    if (status == 0 && !cells && path >= PATH_AVX512 && dtype <= DT_BF16 &&
        2 * a->lut_half <= MAX_PLANE_CELLS) {
        status = build_planes(&planes, a);
        tables = &planes;
    }
#endif
    if (status == 0) {
        row_chunks(a, size, chunks);
        count_steps(a, bias, bias + a->num_params);
        Step s = {a, bias, bias + a->num_params, NULL, NULL, (const int64_t(*)[2])chunks, count,
                  sizes[dtype], scratch, scratch_bytes, permute_channels};
#if X86_PATHS
        if (path >= PATH_AVX2) s.permute = permute_channels_avx2;
#endif
        step_rows(&s, path, dtype, tables, cells);
    }
#if X86_PATHS
    free(planes.steps);
#endif
    free(bias);
    free(chunks);
    free(scratch);
    return status;
}

/* GefenMuon's momentum step of one parameter, rows in parallel on the path gefen_cpu_path
 * picks (the vectoriser's rows of its instruction set, reported as the rows last run). Returns
 * 0, or -1 for an unknown dtype or block. */
int gefen_momentum(const MomentumArgs *a, int dtype) {
    if (dtype < DT_F32 || dtype > DT_F64 || a->block < 1) return -1;
    void (*row)(const MomentumArgs *, int64_t) = momentum_rows_portable[dtype];
    int rows_run = ROWS_PORTABLE;
#if X86_PATHS
    const int path = gefen_cpu_path(-1);
    if (path >= PATH_AVX512) row = momentum_rows_avx512[dtype], rows_run = ROWS_VEC_AVX512;
    else if (path == PATH_AVX2) row = momentum_rows_avx2[dtype], rows_run = ROWS_VEC_AVX2;
#endif
    __atomic_store_n(&last_rows, rows_run, __ATOMIC_RELAXED);
    const int64_t rows = (a->numel + a->block - 1) / a->block;
    _Pragma("omp parallel for schedule(static) num_threads(a->num_threads)")
    for (int64_t r = 0; r < rows; r++) row(a, r);
    return 0;
}

/* ---- first step: histogram of normalised rows ---- */

/* Elements whose bins one vectorised loop computes before they are counted. */
#define HISTOGRAM_CHUNK 256

/* Counts into two uint32 histograms (alternating elements, so that runs of one bin do not
 * wait on their own increments) the bins of row g[0..len), divided by its max |g| in fp32;
 * v + 1 >= 0, so truncation is floor. One per dtype and instruction-set level. */
#define DEFINE_HISTOGRAM_ROW(NAME, ISA, ST, LOAD)                                               \
    ISA static void NAME(const void *data, int64_t len, float sign, uint32_t (*local)[NUM_BINS]) { \
        const ST *restrict g = (const ST *)data;                                                \
        float peak = 0.0f;                                                                      \
        _Pragma("omp simd reduction(max:peak)")                                                 \
        for (int64_t i = 0; i < len; i++) {                                                     \
            const float x = (float)LOAD(g, i), magnitude = x < 0 ? -x : x;                      \
            peak = magnitude > peak ? magnitude : peak;                                         \
        }                                                                                       \
        int32_t bins[HISTOGRAM_CHUNK];                                                          \
        for (int64_t lo = 0; lo < len; lo += HISTOGRAM_CHUNK) {                                 \
            const int64_t n = len - lo < HISTOGRAM_CHUNK ? len - lo : HISTOGRAM_CHUNK;          \
            _Pragma("omp simd")                                                                 \
            for (int64_t i = 0; i < n; i++) {                                                   \
                const float x = sign * (float)LOAD(g, lo + i);                                  \
                const float v = peak > 0.0f ? x / peak : 0.0f;                                  \
                /* clamped before the conversion: a NaN (never passed in: the first step       \
                 * refuses non-finite gradients) lands in the last bin, not out of bounds */   \
                const float bin = (v + 1.0f) * (float)(NUM_BINS / 2);                           \
                bins[i] = bin < NUM_BINS - 1 ? (int32_t)bin : NUM_BINS - 1;                     \
            }                                                                                   \
            for (int64_t i = 0; i < n; i++) local[i & 1][bins[i]]++;                            \
        }                                                                                       \
    }
#define DEFINE_HISTOGRAM_ROWS(SUFFIX, ISA)                                                      \
    DEFINE_HISTOGRAM_ROW(histogram_f32##SUFFIX, ISA, float, LOAD_F32)                           \
    DEFINE_HISTOGRAM_ROW(histogram_bf16##SUFFIX, ISA, uint16_t, LOAD_BF16)                      \
    DEFINE_HISTOGRAM_ROW(histogram_f16##SUFFIX, ISA, _Float16, LOAD_F16)                        \
    DEFINE_HISTOGRAM_ROW(histogram_f64##SUFFIX, ISA, double, LOAD_F64)                          \
    static void (*const histograms##SUFFIX[4])(const void *, int64_t, float, uint32_t(*)[NUM_BINS]) = { \
        histogram_f32##SUFFIX, histogram_bf16##SUFFIX, histogram_f16##SUFFIX, histogram_f64##SUFFIX};

DEFINE_HISTOGRAM_ROWS(_portable, )
#if X86_PATHS
DEFINE_HISTOGRAM_ROWS(_avx2, ISA_AVX2)
DEFINE_HISTOGRAM_ROWS(_avx512, ISA_AVX512)
#endif

/* Adds to counts[NUM_BINS] the bins of every tensor viewed as rows of row_lengths[t] elements
 * (the last row holds what remains), each row divided by its max |g| in fp32 (zero rows count
 * as 0). negate[t]: maximize. */
void gefen_histogram(int64_t num_tensors, const void *const *data, const int64_t *dtypes,
                     const int64_t *numel, const int64_t *row_lengths, const int64_t *negate,
                     int64_t *counts, int64_t num_threads) {
    const int path = gefen_cpu_path(-1);
    void (*const *rows)(const void *, int64_t, float, uint32_t(*)[NUM_BINS]) = histograms_portable;
#if X86_PATHS
    if (path >= PATH_AVX512) rows = histograms_avx512;
    else if (path == PATH_AVX2) rows = histograms_avx2;
#endif
    (void)path;
    _Pragma("omp parallel num_threads(num_threads)") {
        int64_t total[NUM_BINS];
        uint32_t local[2][NUM_BINS]; /* emptied into total before any can wrap */
        int64_t pending = 0;
        memset(total, 0, sizeof(total));
        memset(local, 0, sizeof(local));
        for (int64_t t = 0; t < num_tensors; t++) {
            const int64_t row_length = row_lengths[t], rows_in = (numel[t] + row_length - 1) / row_length;
            const int dtype = (int)dtypes[t];
            const size_t size = dtype == DT_F32 ? 4 : dtype == DT_F64 ? 8 : 2;
            const float sign = negate[t] ? -1.0f : 1.0f;
            _Pragma("omp for schedule(dynamic, 64) nowait")
            for (int64_t r = 0; r < rows_in; r++) {
                const int64_t base = r * row_length;
                const int64_t len = numel[t] - base < row_length ? numel[t] - base : row_length;
                if (pending + len > UINT32_MAX) {
                    for (int b = 0; b < NUM_BINS; b++) total[b] += local[0][b] + (int64_t)local[1][b];
                    memset(local, 0, sizeof(local));
                    pending = 0;
                }
                pending += len;
                rows[dtype]((const char *)data[t] + base * size, len, sign, local);
            }
        }
        _Pragma("omp critical")
        for (int b = 0; b < NUM_BINS; b++) counts[b] += total[b] + local[0][b] + (int64_t)local[1][b];
    }
}

/* ---- first step: period scores ---- */

/* Elements per chunk. Its quarters (chunk_prefix's running sums) start 7680 bytes apart, not a
 * multiple of 4096: a load whose address matches an earlier store's in its low 12 bits waits
 * for it (4K aliasing), which made the four sums of 4096-element chunks no faster than one. */
#define SCORE_CHUNK 3840

/* log(x) for normal x > 0, written for the vectoriser (libm's log is a call per element, most
 * of the scores' time): x = 2^e m with m in [sqrt(1/2), sqrt(2)), log m = 2 atanh(s) with
 * s = (m - 1) / (m + 1), |s| < 0.172, by its series to s^15 (remainder under 1e-13), e ln 2
 * in two parts (fdlibm's). Scores need far less (they are means of thousands of logs, compared
 * between periods), and equal inputs still give equal logs, so constant runs stay exactly
 * constant. */
static inline double log_positive(double x) {
    uint64_t bits;
    memcpy(&bits, &x, 8);
    /* the exponent of x / sqrt(1/2), biased by 2048 so a logical shift reads it */
    const uint64_t offset = (bits - 0x3fe6a09e667f3bcdull) ^ 0x8000000000000000ull;
    const uint64_t top = offset & 0xfff0000000000000ull; /* (e + 2048) << 52 */
    const uint64_t m_bits = bits - top + 0x8000000000000000ull, e_bits = (top >> 52) + 0x4338000000000000ull - 2048;
    double m, e;
    memcpy(&m, &m_bits, 8);
    memcpy(&e, &e_bits, 8);
    e -= 6755399441055744.0; /* 2^52 + 2^51: the integer e */
    const double s = (m - 1.0) / (m + 1.0), z = s * s;
    double series = 1.0 / 15;
    for (int k = 13; k >= 1; k -= 2) series = series * z + 1.0 / k;
    return e * 6.93147180369123816490e-01 + (2.0 * s * series + e * 1.90821492927058770002e-10);
}

/* The chunk's x - x0, x = log(g^2 + 1e-12), into xs[0 .. hi - lo), and the largest |g| and
 * whether a NaN is there so far (peak, nan), one loop per dtype. */
#define SCORE_LOGS(ST, LOAD)                                                                    \
    {                                                                                           \
        const ST *restrict g = (const ST *)data + lo;                                           \
        _Pragma("omp simd reduction(max:peak) reduction(|:nan)")                                \
        for (int64_t i = 0; i < hi - lo; i++) {                                                 \
            const double gi = LOAD(g, i), magnitude = fabs(gi);                                 \
            xs[i] = log_positive(gi * gi + 1e-12) - x0;                                         \
            peak = magnitude > peak ? magnitude : peak;                                         \
            nan |= gi != gi;                                                                    \
        }                                                                                       \
    }

/* SCORE_LOGS a pair of elements at a time: xs[i] = log(a b) - log(a0 a0), a and b the pair's
 * g^2 + 1e-12, for i < slots = (hi - lo) / 2: half the logs, and a constant run's pairs are
 * still exactly zero. */
#define SCORE_PAIR_LOGS(ST, LOAD)                                                               \
    {                                                                                           \
        const ST *restrict g = (const ST *)data + lo;                                           \
        _Pragma("omp simd reduction(max:peak) reduction(|:nan)")                                \
        for (int64_t i = 0; i < slots; i++) {                                                   \
            const double u = LOAD(g, 2 * i), v = LOAD(g, 2 * i + 1);                            \
            const double mu = fabs(u), mv = fabs(v), magnitude = mu > mv ? mu : mv;            \
            xs[i] = log_positive((u * u + 1e-12) * (v * v + 1e-12)) - pair0;                    \
            peak = magnitude > peak ? magnitude : peak;                                         \
            nan |= (u != u) | (v != v);                                                         \
        }                                                                                       \
    }

/* The largest |g| of g[0 .. n) and whether a NaN is there (peak, nan): of the tensors too
 * short to score. */
#define EXTREMES(ST, LOAD)                                                                      \
    {                                                                                           \
        const ST *restrict g = (const ST *)data;                                                \
        _Pragma("omp simd reduction(max:peak) reduction(|:nan)")                                \
        for (int64_t i = 0; i < n; i++) {                                                       \
            const double magnitude = fabs((double)LOAD(g, i));                                  \
            peak = magnitude > peak ? magnitude : peak;                                         \
            nan |= magnitude != magnitude;                                                      \
        }                                                                                       \
    }

/* LOOP(ST, LOAD), one of the loops above, for the elements of `dtype`. */
#define BY_DTYPE(LOOP)                                                                          \
    switch (dtype) {                                                                            \
    case DT_F32: LOOP(float, LOAD_F32) break;                                                   \
    case DT_BF16: LOOP(uint16_t, LOAD_BF16) break;                                              \
    case DT_F16: LOOP(_Float16, LOAD_F16) break;                                                \
    default: LOOP(double, LOAD_F64)                                                             \
    }

/* Independent running sums per chunk: one sum is a chain of dependent adds (4 cycles each),
 * SCAN_LANES of them overlap. */
#define SCAN_LANES 4

/* In place, xs[i] becomes base + xs[0] + ... + xs[i] for i < len (xs holds SCORE_CHUNK
 * values; those from len on are set to zero). Each quarter is summed on its own, then shifted
 * by the sum before it; the order differs from one running sum by rounding only, and a run
 * of zeros (a constant gradient's x - x0) stays exactly zero. */
static inline __attribute__((always_inline)) void chunk_prefix(double *restrict xs, int64_t len,
                                                              double base) {
    const int64_t quarter = (len + SCAN_LANES - 1) / SCAN_LANES;
    for (int64_t i = len; i < SCAN_LANES * quarter; i++) xs[i] = 0.0;
    double sum[SCAN_LANES] = {base};
    for (int64_t i = 0; i < quarter; i++)
        for (int k = 0; k < SCAN_LANES; k++) xs[k * quarter + i] = sum[k] += xs[k * quarter + i];
    for (int k = 1; k < SCAN_LANES; k++) {
        const double carry = xs[k * quarter - 1];
        double *restrict part = xs + k * quarter;
        _Pragma("omp simd")
        for (int64_t i = 0; i < quarter; i++) part[i] += carry;
    }
}

/* facts[0]: finite as fp32, facts[1]: non-zero (NaN counts), from the largest |g| and the NaN
 * flag; returns 0. */
static int finish_facts(double peak, int nan, double facts[2]) {
    facts[0] = !nan && isfinite((float)peak);
    facts[1] = nan || peak != 0.0;
    return 0;
}

/* The running sum of x - x0 before element e of the chunk from lo, from its running sums of
 * single elements (unit 1) or of pairs (unit 2: an odd e adds its last element's own log). */
static inline double prefix_at(const double *prefix, int unit, int64_t lo, int64_t e,
                               const void *data, int dtype, double x0) {
    const int64_t k = e - lo;
    if (unit == 1) return prefix[k];
    if (!(k & 1)) return prefix[k >> 1];
    const double g = load_any(data, e - 1, dtype);
    return prefix[k >> 1] + (log_positive(g * g + 1e-12) - x0);
}

/* What a tensor's first gradient tells (see gefen_first_gradient_facts): whether it is finite
 * as fp32 and holds a non-zero element, and the scores of its candidate periods: mean
 * |difference| of adjacent block means of x = log(g^2 + 1e-12), all from running prefix sums
 * of x - x[0] (exact over constant runs): blocks of p end at multiples of p, and adjacent block
 * means differ by the prefix's second difference there, over p. One pass over the data. */
#define DEFINE_FIRST_FACTS(NAME, ISA)                                                           \
    ISA static int NAME(const void *data, int dtype, int64_t n, int64_t num_cands,              \
                        const int64_t *cands, double *scores, double facts[2]) {                \
        return first_facts_one(data, dtype, n, num_cands, cands, scores, facts);                \
    }

static inline __attribute__((always_inline)) int first_facts_one(
    const void *data, int dtype, int64_t n, int64_t num_cands, const int64_t *cands,
    double *scores, double facts[2]) {
    double peak = 0.0;
    int nan = 0;
    if (num_cands == 0) {
        BY_DTYPE(EXTREMES)
        return finish_facts(peak, nan, facts);
    }
    double *edge = calloc((size_t)num_cands * 3, sizeof(double)); /* prefix, last sum, total */
    int64_t *seen = calloc((size_t)num_cands, sizeof(int64_t));   /* block edges passed */
    /* prefix[0] is the sum before the chunk, xs = prefix + 1 its running sums */
    double prefix[SCORE_CHUNK + 1], *const xs = prefix + 1;
    if (!edge || !seen) {
        free(edge);
        free(seen);
        return -1;
    }
    const double g0 = load_any(data, 0, dtype), a0 = g0 * g0 + 1e-12;
    const double x0 = log_positive(a0), pair0 = log_positive(a0 * a0);
    /* One log per pair of elements where the block edges fall on even elements but a few: an
     * odd edge takes one more log, not vectorised, ~20 times a vectorised one, so odd
     * candidate periods' edges must be under 1/64 of the elements (a period 9 makes 1/18:
     * 1.02-1.17x the time with pairs; with none, 0.66-0.70x). */
    double odd_edges = 0.0;
    for (int64_t c = 0; c < num_cands; c++)
        if (cands[c] & 1) odd_edges += 0.5 / (double)cands[c];
    const int unit = n % 2 == 0 && odd_edges <= 1.0 / 64 ? 2 : 1, shift = unit - 1;
    prefix[0] = 0.0;
    for (int64_t lo = 0; lo < n; lo += SCORE_CHUNK) {
        const int64_t hi = lo + SCORE_CHUNK < n ? lo + SCORE_CHUNK : n, slots = (hi - lo) >> shift;
        if (unit == 2) {
            BY_DTYPE(SCORE_PAIR_LOGS)
        } else {
            BY_DTYPE(SCORE_LOGS)
        }
        chunk_prefix(xs, slots, prefix[0]);
        for (int64_t c = 0; c < num_cands; c++) {
            const int64_t p = cands[c];
            double *e = edge + 3 * c, last_prefix = e[0], last_diff = e[1], total = e[2];
            int64_t count = seen[c], end = (lo / p + 1) * p;
            if (count == 0 && end <= hi) { /* the first block: no block before it */
                const double s = prefix_at(prefix, unit, lo, end, data, dtype, x0);
                last_diff = s - last_prefix, last_prefix = s;
                count = 1, end += p;
            }
            /* four totals: one is a chain of dependent adds (4 cycles each) */
            double part[4] = {total, 0.0, 0.0, 0.0};
            if (!(p & shift)) { /* every edge on a running sum kept: q sums apart */
                const int64_t q = p >> shift;
                for (; end + 3 * p <= hi; end += 4 * p, count += 4) {
                    const double *b = prefix + ((end - lo) >> shift);
                    const double s0 = b[0], s1 = b[q], s2 = b[2 * q], s3 = b[3 * q];
                    const double d0 = s0 - last_prefix, d1 = s1 - s0, d2 = s2 - s1, d3 = s3 - s2;
                    part[0] += fabs(d0 - last_diff), part[1] += fabs(d1 - d0);
                    part[2] += fabs(d2 - d1), part[3] += fabs(d3 - d2);
                    last_prefix = s3, last_diff = d3;
                }
            }
            for (; end <= hi; end += p, count++) {
                const double s = prefix_at(prefix, unit, lo, end, data, dtype, x0);
                const double diff = s - last_prefix; /* p times this block's mean */
                part[0] += fabs(diff - last_diff);
                last_diff = diff, last_prefix = s;
            }
            total = (part[0] + part[1]) + (part[2] + part[3]);
            e[0] = last_prefix, e[1] = last_diff, e[2] = total, seen[c] = count;
        }
        prefix[0] = prefix[slots];
    }
    for (int64_t c = 0; c < num_cands; c++)
        scores[c] = edge[3 * c + 2] / (double)(seen[c] - 1) / (double)cands[c];
    free(edge);
    free(seen);
    return finish_facts(peak, nan, facts);
}

/* first_facts_one at each instruction-set level (the logs vectorise). */
DEFINE_FIRST_FACTS(first_facts_portable, )
#if X86_PATHS
DEFINE_FIRST_FACTS(first_facts_avx2, ISA_AVX2)
DEFINE_FIRST_FACTS(first_facts_avx512, ISA_AVX512)
#endif

/* For every tensor t: out[t] = 1 where its gradient is finite as fp32 (its largest |g|, as
 * fp32, too: a float64 one beyond fp32's range would overflow the histogram's normalisation),
 * else 0; out[num_tensors + t] = 1 where it holds a non-zero element (or NaN); and the scores of
 * its candidate periods cands[offsets[t] .. offsets[t + 1]) at out[2 * num_tensors +
 * offsets[t] ..]. Returns 0, or -1 if an allocation failed. */
int gefen_first_gradient_facts(int64_t num_tensors, const void *const *data, const int64_t *dtypes,
                               const int64_t *numel, const int64_t *offsets, const int64_t *cands,
                               double *out, int64_t num_threads) {
    int (*one)(const void *, int, int64_t, int64_t, const int64_t *, double *, double[2]) =
        first_facts_portable;
#if X86_PATHS
    if (gefen_cpu_path(-1) >= PATH_AVX512) one = first_facts_avx512;
    else if (gefen_cpu_path(-1) == PATH_AVX2) one = first_facts_avx2;
#endif
    double *const scores = out + 2 * num_tensors;
    int status = 0;
    _Pragma("omp parallel for schedule(dynamic, 1) num_threads(num_threads) reduction(min:status)")
    for (int64_t t = 0; t < num_tensors; t++) {
        const int64_t first = offsets[t];
        double facts[2];
        const int s = one(data[t], (int)dtypes[t], numel[t], offsets[t + 1] - first,
                          cands + first, scores + first, facts);
        out[t] = facts[0], out[num_tensors + t] = facts[1];
        if (s < status) status = s;
    }
    return status;
}

/* ---- the step's per-tensor host work, in one call ---- */

/* torch.Tensor's descriptors (set by bind(), kernels/native.py): reading them straight skips
 * the attribute lookup through a Parameter's class and instance dict, most of the cost. */
enum { GRAD, DTYPE, NUMEL, CONTIGUOUS, DATA_PTR, IS_NEG, DEVICE, DESCRIPTORS };
static PyObject *descriptors[DESCRIPTORS];

/* torch.autograd.graph.increment_version, which bumps the version counters of the parameters
 * step_tables vouches for where the shim cannot (set by bind()). */
static PyObject *increment_version;

static PyObject *bind(PyObject *self, PyObject *args) {
    PyObject *given[DESCRIPTORS], *increment;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOOOOOOO", &given[GRAD], &given[DTYPE], &given[NUMEL],
                          &given[CONTIGUOUS], &given[DATA_PTR], &given[IS_NEG], &given[DEVICE],
                          &increment))
        return NULL;
    Py_INCREF(increment);
    Py_XSETREF(increment_version, increment);
    for (int k = 0; k < DESCRIPTORS; k++) {
        Py_INCREF(given[k]);
        Py_XSETREF(descriptors[k], given[k]);
    }
    Py_RETURN_NONE;
}

/* torch's stable C shim (torch/csrc/inductor/aoti_torch/c/shim.h, the ABI AOTInductor's
 * compiled models call): a tensor's facts for a few ns each, where the method calls above cost
 * ~80 ns. Set by bind_shim() (kernels/tensor_shim.py, which found where a torch.Tensor object
 * holds its at::Tensor, the shim's handle, and checked every function against Python's
 * answers); offset 0 where that failed, or to turn it off. */
static struct {
    Py_ssize_t offset;        /* of the at::Tensor in a torch.Tensor (or Parameter) object */
    PyObject *types;          /* the exact types read this way: others may override methods */
    int32_t strided;          /* the strided layout's code */
    Py_ssize_t neg_offset;    /* the word of a TensorImpl that holds its negation bit (not in */
    uint64_t neg_bit;         /* the shim; a torch._neg_view's data reads negated), and the bit */
    int32_t (*layout)(void *, int32_t *), (*dtype)(void *, int32_t *);
    int32_t (*contiguous)(void *, _Bool *), (*numel)(void *, int64_t *);
    int32_t (*data_ptr)(void *, void **);
    int32_t (*device_type)(void *, int32_t *), (*device_index)(void *, int32_t *);
    /* Words of a TensorImpl that point to its StorageImpl, AutogradMeta, VersionCounter and
     * Python object, which step_tables asks the caches for ahead of their use (a prefetch
     * never faults: a wrong word only costs time); -1 where not found. */
    Py_ssize_t storage_word, meta_word, counter_word, object_word;
    /* The word of an AutogradMeta that points to the gradient's TensorImpl, read (a load, not a
     * prefetch: only where it was read back from probes) to ask for the gradient's lines
     * before its getter runs; -1 where not found. */
    Py_ssize_t grad_word;
    /* torch::autograd::impl::bump_version(const at::Tensor &), or NULL where it is not used:
     * it throws (through C: the process ends) for a tensor without a version counter, an
     * inference tensor, which counter_word (then known) tells. */
    void (*bump)(void *);
} shim;

static PyObject *bind_shim(PyObject *self, PyObject *args) {
    Py_ssize_t offset, neg_offset, storage_word, meta_word, counter_word, object_word, grad_word;
    PyObject *types;
    int strided;
    unsigned long long neg_bit, fn[7], bump;
    (void)self;
    if (!PyArg_ParseTuple(args, "nO!inKKKKKKKKnnnnnK", &offset, &PyTuple_Type, &types, &strided,
                          &neg_offset, &neg_bit, &fn[0], &fn[1], &fn[2], &fn[3], &fn[4], &fn[5],
                          &fn[6], &storage_word, &meta_word, &counter_word, &object_word,
                          &grad_word, &bump))
        return NULL;
    if ((bump && counter_word < 0) || (grad_word >= 0 && meta_word < 0)) {
        PyErr_SetString(PyExc_ValueError, "bind_shim: bump_version needs the counter's word, "
                                          "the gradient's word the autograd meta's");
        return NULL;
    }
    Py_INCREF(types);
    Py_XSETREF(shim.types, types);
    shim.strided = strided;
    shim.neg_offset = neg_offset;
    shim.neg_bit = neg_bit;
    shim.layout = (int32_t(*)(void *, int32_t *))(uintptr_t)fn[0];
    shim.dtype = (int32_t(*)(void *, int32_t *))(uintptr_t)fn[1];
    shim.contiguous = (int32_t(*)(void *, _Bool *))(uintptr_t)fn[2];
    shim.numel = (int32_t(*)(void *, int64_t *))(uintptr_t)fn[3];
    shim.data_ptr = (int32_t(*)(void *, void **))(uintptr_t)fn[4];
    shim.device_type = (int32_t(*)(void *, int32_t *))(uintptr_t)fn[5];
    shim.device_index = (int32_t(*)(void *, int32_t *))(uintptr_t)fn[6];
    shim.storage_word = storage_word;
    shim.meta_word = meta_word;
    shim.counter_word = counter_word;
    shim.object_word = object_word;
    shim.grad_word = grad_word;
    shim.bump = (void (*)(void *))(uintptr_t)bump;
    shim.offset = offset;
    Py_RETURN_NONE;
}

/* Whether tensor t is read through the shim. */
static inline int shimmed(PyObject *t) {
    if (!shim.offset) return 0;
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(shim.types); k++)
        if ((PyObject *)Py_TYPE(t) == PyTuple_GET_ITEM(shim.types, k)) return 1;
    return 0;
}

/* t's attribute behind getset descriptor k, a new reference (NULL with the error set). */
static inline PyObject *get(PyObject *t, int k) {
    return Py_TYPE(descriptors[k])->tp_descr_get(descriptors[k], t, NULL);
}

/* t.method() for method descriptor k, a new reference (NULL with the error set). */
static inline PyObject *call(PyObject *t, int k) { return PyObject_Vectorcall(descriptors[k], &t, 1, NULL); }

/* An int64 from t.method() for method descriptor k; -1 with the error set on failure. */
static int64_t call_int(PyObject *t, int k) {
    PyObject *result = call(t, k);
    if (!result) return -1;
    const int64_t value = PyLong_AsLongLong(result);
    Py_DECREF(result);
    return value;
}

/* The bucket's device: the torch.device object, and the shim's codes for it. */
typedef struct {
    PyObject *object;
    int32_t type, index;
} Device;

/* Whether tensor t is as the bucket's state was built: on its device (a model moved after
 * its first step is not: the kernels would follow another device's pointers), strided, not
 * negated (a neg view's memory holds -t), of dtype `dtype` (the shim's code for it: `code`;
 * `size` bytes an element), contiguous, of `numel` elements and with memory of its own (a
 * storage-less subclass or an efficient zero tensor has data pointer 0) aligned to its
 * elements (a torch.frombuffer at an odd offset is not; the kernels load whole elements);
 * then its data pointer into *ptr. 1 yes, 0 no (the Python side then converts it or raises
 * the error that names it), -1 error (set). */
static int usable(PyObject *t, const Device *device, PyObject *dtype, int32_t code, int64_t size,
                  int64_t numel, int64_t *ptr) {
    if (shimmed(t)) {
        void *h = (char *)t + shim.offset, *data;
        const char *impl = *(char *const *)h; /* the at::Tensor's TensorImpl */
        int32_t layout, d, type, index;
        _Bool contiguous;
        int64_t n;
        if (*(const uint64_t *)(impl + shim.neg_offset) & shim.neg_bit) return 0;
        if (shim.device_type(h, &type) || type != device->type || shim.device_index(h, &index) ||
            index != device->index || shim.layout(h, &layout) || layout != shim.strided ||
            shim.dtype(h, &d) || d != code || shim.contiguous(h, &contiguous) || !contiguous ||
            shim.numel(h, &n) || n != numel || shim.data_ptr(h, &data) || (!data && numel) ||
            (uintptr_t)data % size)
            return 0;
        *ptr = (int64_t)(intptr_t)data;
        return 1;
    }
    PyObject *where = get(t, DEVICE);
    if (!where) return -1;
    const int same = PyObject_RichCompareBool(where, device->object, Py_EQ);
    Py_DECREF(where);
    if (same <= 0) return same;
    PyObject *d = get(t, DTYPE);
    if (!d) return -1;
    Py_DECREF(d);
    if (d != dtype) return 0;
    PyObject *contiguous = call(t, CONTIGUOUS);
    if (!contiguous) {
        PyErr_Clear(); /* sparse, say: the general path raises the error that names the tensor */
        return 0;
    }
    Py_DECREF(contiguous);
    if (contiguous != Py_True) return 0;
    PyObject *negated = call(t, IS_NEG);
    if (!negated) return -1;
    Py_DECREF(negated);
    if (negated != Py_False) return 0;
    const int64_t n = call_int(t, NUMEL);
    if (n != numel) return PyErr_Occurred() ? -1 : 0;
    *ptr = call_int(t, DATA_PTR);
    return PyErr_Occurred() ? -1 : (*ptr != 0 || !numel) && *ptr % size == 0;
}

/* How far ahead of the parameter whose gradient step_tables reads it asks the caches for a later
 * parameter's object, TensorImpl, the objects that TensorImpl points to (storage, autograd
 * meta, version counter), its gradient's TensorImpl, and the objects that one points to
 * (storage, Python object); a gradient is checked AHEAD_GRAD parameters after it is read. Each
 * stage then finds the lines the one before asked for, and the misses of several parameters
 * overlap instead of coming one after another (8,000 parameters' metadata are not in the
 * caches after a step). */
#define AHEAD_OBJECT 16
#define AHEAD_IMPL 12
#define AHEAD_POINTEES 8
#define AHEAD_GRAD_IMPL 5
#define AHEAD_GRAD_POINTEES 2
#define AHEAD_GRAD 4
#define IMPL_LINES 4 /* the cache lines of a TensorImpl that the shim's answers read */

/* The error set, taken (a new reference; the error indicator cleared), and set again. */
#if PY_VERSION_HEX >= 0x030C0000
static PyObject *take_error(void) { return PyErr_GetRaisedException(); }
static void restore_error(PyObject *error) { PyErr_SetRaisedException(error); }
#else
static PyObject *take_error(void) {
    PyObject *type, *value, *trace;
    PyErr_Fetch(&type, &value, &trace);
    PyErr_NormalizeException(&type, &value, &trace);
    if (trace) PyException_SetTraceback(value, trace);
    Py_XDECREF(type);
    Py_XDECREF(trace);
    return value;
}
static void restore_error(PyObject *error) {
    PyErr_SetObject((PyObject *)Py_TYPE(error), error);
    Py_DECREF(error);
}
#endif

/* Tensor t's TensorImpl, if t is read through the shim; else NULL. */
static inline const char *impl_of(PyObject *t) {
    return shimmed(t) ? *(const char *const *)((char *)t + shim.offset) : NULL;
}

/* Asks the caches for the lines of tensor object t that say whether it is read through the
 * shim (its type) and where its TensorImpl is (a prefetch never faults: any address will do). */
static inline void prefetch_object(PyObject *t) {
    __builtin_prefetch(t);
    __builtin_prefetch((char *)t + shim.offset);
}

/* Asks the caches for the first lines of a TensorImpl (its refcount, which a getter's copy of
 * the tensor writes, in the first). */
static inline void prefetch_lines(const char *impl) {
    __builtin_prefetch(impl, 1);
    for (int k = 1; k < IMPL_LINES; k++) __builtin_prefetch(impl + 64 * k);
}

/* Asks the caches for the first 64 bytes of the object that word `word` of TensorImpl `impl`
 * points to (two lines: malloc aligns to 16 bytes), if the word is known. */
static inline void prefetch_pointee(const char *impl, Py_ssize_t word) {
    if (word >= 0) {
        const char *object = *(const char *const *)(impl + word);
        __builtin_prefetch(object, 1);
        __builtin_prefetch(object + 63, 1);
    }
}

/* The TensorImpl of parameter p's gradient (UndefinedTensorImpl's where it has none), read
 * through its autograd meta; NULL where p is not read through the shim, has no autograd meta,
 * or the words are not known. */
static inline const char *grad_impl_of(PyObject *p) {
    const char *impl = shim.grad_word >= 0 ? impl_of(p) : NULL;
    const char *meta = impl ? *(const char *const *)(impl + shim.meta_word) : NULL;
    return meta ? *(const char *const *)(meta + shim.grad_word) : NULL;
}

/* Bumps parameter p's version counter, as an in-place op does, through the shim where it can;
 * else p joins *later (a list made here, NULL until then), whose counters step_tables bumps in
 * one call at its end. 0, or -1 with the error set. */
static int bump_version(PyObject *p, PyObject **later) {
    const char *impl = shim.bump ? impl_of(p) : NULL;
    if (impl) {
        /* an inference tensor has no counter: torch's increment_version skips it too */
        if (*(void *const *)(impl + shim.counter_word)) shim.bump((char *)p + shim.offset);
        return 0;
    }
    if (!*later && !(*later = PyList_New(0))) return -1;
    return PyList_Append(*later, p);
}

/* Bumps the version counters of the parameters in the list `later` (bump_version's), in one
 * call; takes the reference. 0, or -1 with the error set. */
static int bump_later(PyObject *later) {
    PyObject *done = PyObject_CallOneArg(increment_version, later);
    Py_DECREF(later);
    Py_XDECREF(done);
    return done ? 0 : -1;
}

/* step_tables(params, numels, device, device_type, device_index, dtype, code, size, grads,
 * param_ptrs, grad_ptrs, has_grad): for every parameter (a plain tensor: its .grad is read
 * here) on `device` (the shim's codes: device_type, device_index), its gradient's and its own
 * data pointers into the int64 tables at param_ptrs and grad_ptrs (addresses), and whether it
 * has a gradient into the uint8 table at has_grad: the attribute reads and method calls Python
 * would make per tensor, without the interpreter. `code`: dtype's code in the shim. The
 * gradients go into the list `grads` (as long as params), which the caller holds while the
 * kernel reads them (on CUDA, until it is queued): another thread replacing a .grad meanwhile
 * must not free its memory. Returns -1 when the tables are ready, with the version counters of
 * the parameters that have a gradient bumped (the step writes them), -2 when no parameter has
 * a gradient, else the index of the first parameter the Python side must look at (its gradient
 * or itself not as the state was built: it converts, or raises the error that names it). */
static PyObject *step_tables(PyObject *self, PyObject *args) {
    PyObject *params, *numels, *dtype, *grads;
    Device device;
    int code;
    Py_ssize_t size;
    unsigned long long param_address, grad_address, has_address;
    (void)self;
    if (!PyArg_ParseTuple(args, "O!O!OiiOinO!KKK", &PyList_Type, &params, &PyList_Type, &numels,
                          &device.object, &device.type, &device.index, &dtype, &code, &size,
                          &PyList_Type, &grads, &param_address, &grad_address, &has_address))
        return NULL;
    if (!descriptors[GRAD]) {
        PyErr_SetString(PyExc_RuntimeError, "step_tables: bind() torch.Tensor's descriptors first");
        return NULL;
    }
    const Py_ssize_t count = PyList_GET_SIZE(params);
    if (PyList_GET_SIZE(numels) != count || PyList_GET_SIZE(grads) != count) {
        PyErr_SetString(PyExc_ValueError, "step_tables: one numel and one gradient slot per parameter");
        return NULL;
    }
    int64_t *param_ptrs = (int64_t *)(uintptr_t)param_address;
    int64_t *grad_ptrs = (int64_t *)(uintptr_t)grad_address;
    uint8_t *has_grad = (uint8_t *)(uintptr_t)has_address;
    int any = 0;
    /* i: the parameter whose gradient is read; j: the one checked (see AHEAD_*). A gradient
     * that cannot be read stops the reading; its error is raised once the parameters before it
     * are checked (one of them may be the first the Python side must look at). */
    Py_ssize_t readable = count;
    PyObject *unread = NULL, *later = NULL; /* that error; parameters to bump at the end */
    for (Py_ssize_t i = 0; i < readable + AHEAD_GRAD; i++) {
        const char *impl;
        if (i + AHEAD_OBJECT < readable) prefetch_object(PyList_GET_ITEM(params, i + AHEAD_OBJECT));
        if (i + AHEAD_IMPL < readable && (impl = impl_of(PyList_GET_ITEM(params, i + AHEAD_IMPL))))
            prefetch_lines(impl);
        if (i + AHEAD_POINTEES < readable && (impl = impl_of(PyList_GET_ITEM(params, i + AHEAD_POINTEES)))) {
            prefetch_pointee(impl, shim.storage_word);
            prefetch_pointee(impl, shim.meta_word);
            prefetch_pointee(impl, shim.counter_word);
        }
        if (i + AHEAD_GRAD_IMPL < readable && (impl = grad_impl_of(PyList_GET_ITEM(params, i + AHEAD_GRAD_IMPL))))
            prefetch_lines(impl);
        if (i + AHEAD_GRAD_POINTEES < readable && (impl = grad_impl_of(PyList_GET_ITEM(params, i + AHEAD_GRAD_POINTEES)))) {
            prefetch_pointee(impl, shim.storage_word);
            prefetch_pointee(impl, shim.object_word);
        }
        if (i < readable) {
            PyObject *ahead = get(PyList_GET_ITEM(params, i), GRAD);
            if (ahead) {
                if ((impl = impl_of(ahead))) prefetch_lines(impl); /* where grad_word is not known */
                PyList_SetItem(grads, i, ahead); /* takes the reference */
            } else {
                unread = take_error();
                readable = i;
            }
        }
        const Py_ssize_t j = i - AHEAD_GRAD;
        if (j < 0) continue;
        if (j >= readable) break;
        PyObject *p = PyList_GET_ITEM(params, j), *g = PyList_GET_ITEM(grads, j);
        has_grad[j] = g != Py_None;
        if (g == Py_None) continue;
        const int64_t numel = PyLong_AsLongLong(PyList_GET_ITEM(numels, j));
        int ok = numel < 0 && PyErr_Occurred()
                     ? -1 : usable(g, &device, dtype, code, size, numel, grad_ptrs + j);
        if (ok == 1) ok = usable(p, &device, dtype, code, size, numel, param_ptrs + j);
        if (ok == 1 && bump_version(p, &later) < 0) ok = -1;
        if (ok != 1) { /* those before it are bumped, whichever way: the general path bumps all */
            Py_XDECREF(unread);
            if (ok == 0 && later) {
                const int bumped = bump_later(later);
                later = NULL;
                if (bumped < 0) return NULL;
            }
            Py_XDECREF(later);
            return ok < 0 ? NULL : PyLong_FromSsize_t(j);
        }
        any = 1;
    }
    if (unread) {
        Py_XDECREF(later);
        restore_error(unread);
        return NULL;
    }
    if (later && bump_later(later) < 0) return NULL;
    return PyLong_FromLong(any ? -1 : -2);
}

static PyMethodDef methods[] = {
    {"bind", bind, METH_VARARGS, "torch.Tensor's grad, dtype, numel, is_contiguous, data_ptr."},
    {"bind_shim", bind_shim, METH_VARARGS, "torch's C shim: object offset, types, functions."},
    {"step_tables", step_tables, METH_VARARGS, "The step's pointer tables (see cpu_step.c)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, .m_name = "_cpu", .m_size = -1,
                                    .m_methods = methods};

/* The digest of the sources this library was built from (setup.py, kernels/source_digest.py):
 * kernels/native.py refuses a library built from other sources than those beside it. */
#ifndef GEFEN_SOURCE_DIGEST
#define GEFEN_SOURCE_DIGEST "none (not built by setup.py)"
#endif

PyMODINIT_FUNC PyInit__cpu(void) {
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddStringConstant(m, "source_digest", GEFEN_SOURCE_DIGEST) < 0) Py_CLEAR(m);
    return m;
}