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
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2, DT_F64 = 3 };
/* Columns of a bucket's segment table (gefen_compile/state.py): one row per parameter. */
enum { SEG_ROW0, SEG_BLOCK, SEG_CODE, SEG_V, SEG_V_PER_ELEMENT, SEG_FIELDS };
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
    int64_t identity_codes;         /* first_index[i] == i: the codebook repeats no entry */
    int64_t lut_half;               /* cells per unit: a power of two */
    int64_t num_threads;
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

/* The parameter owning row r: the last whose first row is at most r (empty parameters own no
 * row and share their first row with the next parameter, so they are skipped). */
static inline int64_t param_of_row(const StepArgs *a, int64_t r) {
    int64_t lo = 0, hi = a->num_params - 1;
    while (lo < hi) {
        const int64_t mid = (lo + hi + 1) / 2;
        if (a->segments[mid * SEG_FIELDS + SEG_ROW0] <= r) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

/* Bias corrections per parameter (and its step count), before any row is touched. */
static void count_steps(const StepArgs *a, double *bias1, double *bias2) {
    for (int64_t p = 0; p < a->num_params; p++) {
        if (!a->has_grad[p]) continue;
        const double *h = a->hyper + a->param_group[p] * H_FIELDS;
        a->steps[p] += 1.0f;
        double t = (double)a->steps[p];
        bias1[p] = 1.0 - pow(h[H_BETA1], t);
        bias2[p] = 1.0 - pow(h[H_BETA2], t);
    }
}

/* One row kernel per state dtype: T is the compute type, ST the storage type, LOAD/STORE
 * convert. The row is read twice: once for the new magnitude (and the block's mean g^2), once to
 * quantise and update, recomputing the first moment identically rather than storing it. The
 * element loops are written for the vectoriser (gathers from small tables, reductions under
 * `omp simd`); a clone for AVX2-era x86 cores is picked when the library loads. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=haswell", "default")))
#else
#define VECTOR_CLONES
#endif

#define FIRST_MOMENT(LOAD, i, CODE) (codebook[CODE] * old_mag * beta1 + (sign * LOAD(g, i)) * keep1)
/* Rows up to this long keep their first moments from the first pass; longer ones recompute. */
#define TILE 2048

/* The first pass: the new first moment M of every element, its largest magnitude, and the
 * second moment (per element, or the block's sum of g^2). KEEP stores m for the second pass. */
#define FIRST_PASS_LOOP(T, LOAD, CODE, KEEP, REDUCTIONS, SECOND_MOMENT)                       \
    _Pragma(REDUCTIONS)                                                                         \
    for (int64_t i = 0; i < len; i++) {                                                         \
        const T m = FIRST_MOMENT(LOAD, i, CODE), gi = sign * LOAD(g, i);                        \
        KEEP;                                                                                   \
        const T mag = m < 0 ? -m : m;                                                           \
        peak = mag > peak ? mag : peak;                                                         \
        SECOND_MOMENT;                                                                          \
    }

#define FIRST_PASS(T, LOAD, STORE, CODE, KEEP)                                                  \
    if (per_element) {                                                                          \
        FIRST_PASS_LOOP(T, LOAD, CODE, KEEP, "omp simd reduction(max:peak)",                   \
                        STORE(v, i, LOAD(v, i) * beta2 + (gi * gi) * keep2))                    \
    } else {                                                                                    \
        FIRST_PASS_LOOP(T, LOAD, CODE, KEEP,                                                    \
                        "omp simd reduction(max:peak) reduction(+:square_sum)",                 \
                        square_sum += gi * gi)                                                  \
    }

/* The second pass: nearest code of m / magnitude (see codebook.NearestCode), then the update.
 * M: the first moment of element i; SCALE: step size / its denominator; CODE: the code of
 * `below` boundaries (the identity unless the codebook repeats entries). */
#define QUANTISE_AND_UPDATE(T, LOAD, STORE, M, SCALE, CODE)                                     \
    _Pragma("omp simd")                                                                         \
    for (int64_t i = 0; i < len; i++) {                                                         \
        const T x = (M) / stored;                                                               \
        T cell = x * (T)half; /* exact: half is a power of two */                               \
        cell = cell >= (T)-half ? cell : (T)-half; /* NaN too */                                \
        cell = cell <= (T)(half - 1) ? cell : (T)(half - 1);                                    \
        /* floor by truncation and correction: (int)floorf() does not vectorise */             \
        const int32_t whole = (int32_t)cell;                                                    \
        int32_t below = lut[whole - ((T)whole > cell) + half];                                  \
        below += x > bounds[below];                                                             \
        const int32_t code = (CODE) & -live;                                                    \
        codes[i] = (uint8_t)code;                                                               \
        const T update = (codebook[code] * stored) * (SCALE);                                   \
        STORE(param, i, LOAD(param, i) * decay - update);                                       \
    }

/* One loop per case, so that each is branch-free and vectorises. */
#define ELEMENT_SCALE(LOAD, SQRT) (step_size / (SQRT(LOAD(v, i) / bias2_t) + eps))
#define SECOND_PASS(T, LOAD, STORE, SQRT, M)                                                    \
    if (per_element && identity) {                                                              \
        QUANTISE_AND_UPDATE(T, LOAD, STORE, M, ELEMENT_SCALE(LOAD, SQRT), below);                     \
    } else if (per_element) {                                                                   \
        QUANTISE_AND_UPDATE(T, LOAD, STORE, M, ELEMENT_SCALE(LOAD, SQRT), first[below]);              \
    } else if (identity) {                                                                      \
        QUANTISE_AND_UPDATE(T, LOAD, STORE, M, shared_scale, below);                            \
    } else {                                                                                    \
        QUANTISE_AND_UPDATE(T, LOAD, STORE, M, shared_scale, first[below]);                     \
    }

#define DEFINE_STEP(NAME, T, ST, LOAD, STORE, SQRT)                                             \
    VECTOR_CLONES static void NAME##_row(const StepArgs *a, int64_t r, const double *bias1,     \
                                         const double *bias2) {                                 \
        const int64_t p = param_of_row(a, r);                                                   \
        if (!a->has_grad[p]) return;                                                            \
        const int64_t *seg = a->segments + p * SEG_FIELDS;                                      \
        const int64_t len = seg[SEG_BLOCK], row = r - seg[SEG_ROW0], start = row * len;         \
        const int per_element = seg[SEG_V_PER_ELEMENT] != 0, identity = a->identity_codes != 0; \
        const double *h = a->hyper + a->param_group[p] * H_FIELDS;                              \
        const T beta1 = (T)h[H_BETA1], keep1 = (T)(1.0 - h[H_BETA1]);                          \
        const T beta2 = (T)h[H_BETA2], keep2 = (T)(1.0 - h[H_BETA2]);                          \
        const T eps = (T)h[H_EPS], sign = h[H_MAXIMIZE] != 0.0 ? (T)-1 : (T)1;                 \
        const T decay = (T)(1.0 - h[H_LR] * h[H_WD]);                                           \
        const T step_size = (T)(h[H_LR] / bias1[p]), bias2_t = (T)bias2[p];                    \
        const T *restrict codebook = (const T *)a->codebook;                                    \
        const T *restrict bounds = (const T *)a->bounds;                                        \
        const int32_t *restrict lut = a->lut, *restrict first = a->first_index;                \
        const int32_t half = (int32_t)a->lut_half;                                              \
        const ST *restrict g = (const ST *)a->grads[p] + start;                                 \
        ST *restrict param = (ST *)a->params[p] + start;                                        \
        ST *restrict v = (ST *)a->vmean + seg[SEG_V] + (per_element ? start : row);             \
        uint8_t *restrict codes = a->codes + seg[SEG_CODE] + start;                             \
        const T old_mag = LOAD(a->magnitude, r);                                                \
        T peak = 0, square_sum = 0;                                                             \
        T kept[TILE];                                                                           \
        int32_t index[TILE]; /* codes widened: gathers want 32-bit indices */                   \
        const int buffered = len <= TILE;                                                       \
        if (buffered) {                                                                         \
            for (int64_t i = 0; i < len; i++) index[i] = codes[i];                              \
            FIRST_PASS(T, LOAD, STORE, index[i], kept[i] = m)                                   \
        } else {                                                                                \
            FIRST_PASS(T, LOAD, STORE, codes[i], (void)0)                                       \
        }                                                                                       \
        if (!per_element) STORE(v, 0, LOAD(v, 0) * beta2 + (square_sum / (T)len) * keep2);      \
        STORE(a->magnitude, r, peak);                                                           \
        const T stored = LOAD(a->magnitude, r);                                                 \
        /* A zero block gets code 0, whose dequantised value -1 * 0 changes nothing. */         \
        const int32_t live = stored > 0;                                                        \
        const T shared_scale = step_size / (SQRT(LOAD(v, 0) / bias2_t) + eps);                  \
        if (buffered) {                                                                         \
            SECOND_PASS(T, LOAD, STORE, SQRT, kept[i])                                          \
        } else {                                                                                \
            SECOND_PASS(T, LOAD, STORE, SQRT, FIRST_MOMENT(LOAD, i, codes[i]))                  \
        }                                                                                       \
    }                                                                                           \
                                                                                                \
    static void NAME(const StepArgs *a, const double *bias1, const double *bias2) {             \
        _Pragma("omp parallel for schedule(dynamic, 16) num_threads(a->num_threads)")           \
        for (int64_t r = 0; r < a->num_rows; r++) NAME##_row(a, r, bias1, bias2);               \
    }

DEFINE_STEP(step_f32, float, float, LOAD_F32, STORE_F32, sqrtf)
DEFINE_STEP(step_bf16, float, uint16_t, LOAD_BF16, STORE_BF16, sqrtf)
DEFINE_STEP(step_f16, float, _Float16, LOAD_F16, STORE_F16, sqrtf)
DEFINE_STEP(step_f64, double, double, LOAD_F64, STORE_F64, sqrt)

/* Returns 0, or -1 for an unknown dtype or a failed allocation. */
int gefen_step(const StepArgs *a, int dtype) {
    double *bias = malloc(2 * (size_t)(a->num_params > 0 ? a->num_params : 1) * sizeof(double));
    if (!bias) return -1;
    count_steps(a, bias, bias + a->num_params);
    int status = 0;
    switch (dtype) {
    case DT_F32: step_f32(a, bias, bias + a->num_params); break;
    case DT_BF16: step_bf16(a, bias, bias + a->num_params); break;
    case DT_F16: step_f16(a, bias, bias + a->num_params); break;
    case DT_F64: step_f64(a, bias, bias + a->num_params); break;
    default: status = -1;
    }
    free(bias);
    return status;
}

/* ---- first step: histogram of normalised rows ---- */

/* Adds to counts[NUM_BINS] the bins of every tensor viewed as rows of its period, each row
 * divided by its max |g| in fp32 (zero rows count as 0). negate[t]: maximize. */
void gefen_histogram(int64_t num_tensors, const void *const *data, const int64_t *dtypes,
                     const int64_t *numel, const int64_t *periods, const int64_t *negate,
                     int64_t *counts, int64_t num_threads) {
    _Pragma("omp parallel num_threads(num_threads)") {
        int64_t local[NUM_BINS];
        memset(local, 0, sizeof(local));
        for (int64_t t = 0; t < num_tensors; t++) {
            const int64_t period = periods[t], rows = numel[t] / period;
            const int dtype = (int)dtypes[t];
            const float sign = negate[t] ? -1.0f : 1.0f;
            _Pragma("omp for schedule(dynamic, 64) nowait")
            for (int64_t r = 0; r < rows; r++) {
                const int64_t base = r * period;
                float peak = 0.0f;
                for (int64_t i = 0; i < period; i++) {
                    float g = (float)load_any(data[t], base + i, dtype);
                    g = g < 0 ? -g : g;
                    if (g > peak) peak = g;
                }
                for (int64_t i = 0; i < period; i++) {
                    const float g = sign * (float)load_any(data[t], base + i, dtype);
                    const float v = peak > 0.0f ? g / peak : 0.0f;
                    float b = floorf((v + 1.0f) * (float)(NUM_BINS / 2));
                    b = b < 0.0f ? 0.0f : (b > NUM_BINS - 1 ? NUM_BINS - 1 : b);
                    local[(int64_t)b]++;
                }
            }
        }
        _Pragma("omp critical")
        for (int b = 0; b < NUM_BINS; b++) counts[b] += local[b];
    }
}

/* ---- first step: period scores ---- */

#define SCORE_CHUNK 4096

/* Scores of the candidate periods of one tensor: mean |difference| of adjacent block means of
 * x = log(g^2 + 1e-12), all from one running prefix sum of x - x[0] (exact over constant runs). */
static int period_scores_one(const void *data, int dtype, int64_t n, int64_t num_cands,
                             const int64_t *cands, double *scores) {
    double *edge = calloc((size_t)num_cands * 3, sizeof(double)); /* prefix, last sum, total */
    int64_t *seen = calloc((size_t)num_cands, sizeof(int64_t));   /* block edges passed */
    double prefix[SCORE_CHUNK + 1];
    if (!edge || !seen) {
        free(edge);
        free(seen);
        return -1;
    }
    const double g0 = load_any(data, 0, dtype), x0 = log(g0 * g0 + 1e-12);
    prefix[0] = 0.0;
    for (int64_t lo = 0; lo < n; lo += SCORE_CHUNK) {
        const int64_t hi = lo + SCORE_CHUNK < n ? lo + SCORE_CHUNK : n;
        for (int64_t i = lo; i < hi; i++) {
            const double g = load_any(data, i, dtype);
            prefix[i - lo + 1] = prefix[i - lo] + (log(g * g + 1e-12) - x0);
        }
        for (int64_t c = 0; c < num_cands; c++) {
            const int64_t p = cands[c];
            double *e = edge + 3 * c;
            for (int64_t end = (lo / p + 1) * p; end <= hi; end += p) {
                const double s = prefix[end - lo];
                const double diff = s - e[0]; /* p times this block's mean */
                if (seen[c] >= 1) e[2] += fabs(diff - e[1]);
                e[1] = diff;
                e[0] = s;
                seen[c]++;
            }
        }
        prefix[0] = prefix[hi - lo];
    }
    for (int64_t c = 0; c < num_cands; c++)
        scores[c] = edge[3 * c + 2] / (double)(seen[c] - 1) / (double)cands[c];
    free(edge);
    free(seen);
    return 0;
}

/* Scores of every tensor; candidates of tensor t are cands[offsets[t] .. offsets[t + 1]).
 * Returns 0, or -1 if an allocation failed. */
int gefen_period_scores(int64_t num_tensors, const void *const *data, const int64_t *dtypes,
                        const int64_t *numel, const int64_t *offsets, const int64_t *cands,
                        double *scores, int64_t num_threads) {
    int status = 0;
    _Pragma("omp parallel for schedule(dynamic, 1) num_threads(num_threads) reduction(min:status)")
    for (int64_t t = 0; t < num_tensors; t++) {
        const int64_t first = offsets[t], count = offsets[t + 1] - first;
        if (count > 0) {
            const int s = period_scores_one(data[t], (int)dtypes[t], numel[t], count,
                                            cands + first, scores + first);
            if (s < status) status = s;
        }
    }
    return status;
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, .m_name = "_cpu", .m_size = -1};

PyMODINIT_FUNC PyInit__cpu(void) { return PyModule_Create(&module); }
