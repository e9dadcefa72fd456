/* The codebook's exact dynamic program (see gefen_compile/codebook.py), in C: the first step
 * runs it once, and in numpy its divide and conquer cost tenths of a second.
 *
 * Points are integers y (bin centres in units of 2**-12) with integer weights w; a cluster's
 * cost is computed from exact int64 moments about its first point. Cluster 0 is pinned at
 * -PIN, the last at +PIN, the others sit at their weighted mean. Each layer's optimal split is
 * monotone in the end point (the cost satisfies the quadrangle inequality), so a divide and
 * conquer over end points finds every layer in O(n log n); ties keep the leftmost split. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

typedef struct {
    const int64_t *y, *w, *wy, *wyy; /* points, weights, prefix sums (length n + 1) */
    const double *prev;              /* best cost of points 0..i-1 in the clusters so far */
    double *cur;
    int64_t *split;
} Layer;

/* sum(w), sum(w (y - a)), sum(w (y - a)^2) over points i..j-1. */
static inline void moments(const Layer *L, int64_t i, int64_t j, int64_t a, int64_t *w,
                           int64_t *d, int64_t *dd) {
    const int64_t sw = L->w[j] - L->w[i], swy = L->wy[j] - L->wy[i];
    const int64_t swyy = L->wyy[j] - L->wyy[i];
    *w = sw;
    *d = swy - a * sw;
    *dd = swyy - 2 * a * swy + a * a * sw;
}

static inline double free_cost(const Layer *L, int64_t i, int64_t j) {
    int64_t w, d, dd;
    moments(L, i, j, L->y[i], &w, &d, &dd);
    return (double)dd - (double)d * (double)d / (double)w;
}

static inline double pinned_cost(const Layer *L, int64_t i, int64_t j, int64_t centre) {
    int64_t w, d, dd;
    moments(L, i, j, centre, &w, &d, &dd);
    return (double)dd;
}

static void solve(const Layer *L, int64_t lo_end, int64_t hi_end, int64_t lo_split,
                  int64_t hi_split) {
    while (lo_end <= hi_end) {
        const int64_t end = (lo_end + hi_end) / 2;
        const int64_t last = hi_split < end - 1 ? hi_split : end - 1;
        double best = INFINITY;
        int64_t arg = lo_split;
        for (int64_t s = lo_split; s <= last; s++) {
            const double value = L->prev[s] + free_cost(L, s, end);
            if (value < best) best = value, arg = s;
        }
        L->cur[end] = best;
        L->split[end] = arg;
        solve(L, lo_end, end - 1, lo_split, arg); /* recurse left, loop right */
        lo_end = end + 1;
        lo_split = arg;
    }
}

/* Writes the k + 1 cluster edges (0 = e_0 < ... < e_k = n) minimising the total cost and
 * returns that cost; NAN if 2 <= k <= n does not hold or memory runs out. */
double gefen_codebook_dp(int64_t n, const int64_t *y, const int64_t *w, int64_t k, int64_t pin,
                         int64_t *edges) {
    if (k < 2 || k > n) return NAN;
    int64_t *sums = calloc(3 * (size_t)(n + 1), sizeof(int64_t));
    double *costs = malloc(2 * (size_t)(n + 1) * sizeof(double));
    int64_t *split = calloc((size_t)k * (size_t)(n + 1), sizeof(int64_t));
    if (!sums || !costs || !split) {
        free(sums), free(costs), free(split);
        return NAN;
    }
    int64_t *sw = sums, *swy = sums + n + 1, *swyy = sums + 2 * (n + 1);
    for (int64_t i = 0; i < n; i++) {
        sw[i + 1] = sw[i] + w[i];
        swy[i + 1] = swy[i] + w[i] * y[i];
        swyy[i + 1] = swyy[i] + w[i] * y[i] * y[i];
    }
    double *prev = costs, *cur = costs + n + 1;
    Layer L = {y, sw, swy, swyy, prev, cur, NULL};
    for (int64_t j = 0; j <= n; j++) prev[j] = j >= 1 && j <= n - k + 1 ? pinned_cost(&L, 0, j, -pin) : INFINITY;
    for (int64_t layer = 2; layer < k; layer++) {
        const int64_t last_end = n - (k - layer);
        for (int64_t j = 0; j <= n; j++) cur[j] = INFINITY;
        L.prev = prev, L.cur = cur, L.split = split + layer * (n + 1);
        solve(&L, layer, last_end, layer - 1, last_end - 1);
        double *t = prev;
        prev = cur, cur = t;
    }
    L.prev = prev;
    double best = INFINITY;
    int64_t arg = k - 1;
    for (int64_t s = k - 1; s < n; s++) {
        const double total = prev[s] + pinned_cost(&L, s, n, pin);
        if (total < best) best = total, arg = s;
    }
    edges[0] = 0, edges[k] = n, edges[k - 1] = arg;
    for (int64_t layer = k - 1; layer > 1; layer--)
        edges[layer - 1] = split[layer * (n + 1) + edges[layer]];
    free(sums), free(costs), free(split);
    return best;
}
