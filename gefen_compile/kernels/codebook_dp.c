/* The layers of the codebook's exact dynamic program (see gefen_compile/codebook.py), in C:
 * the first step runs them once (twice for the robust variant's zero pin), and in numpy their
 * divide and conquer cost tenths of a second.
 *
 * Points are integers y (bin centres in units of 2**-12) with integer weights w; a cluster's
 * cost is computed from exact int64 moments about its first point. Cluster 0 is pinned at
 * -PIN, the others sit at their weighted mean (codebook.py adds the clusters pinned at +PIN
 * and, for the robust variant, at 0, and reads the edges off the split tables). Each layer's
 * optimal split is monotone in the end point (the cost satisfies the quadrangle inequality), so
 * a divide and conquer over end points finds every layer in O(n log n); ties keep the leftmost
 * split. It is monotone in the number of clusters too (Knuth's bound: one more cluster never
 * starts the last one earlier), so the previous layer's split at an end bounds the search from
 * below: 2.5 times fewer costs on a 2048-point side, where clusters hold a few points each. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

typedef struct {
    const int64_t *y, *w, *wy, *wyy; /* points, weights, prefix sums (length n + 1) */
    const double *prev;              /* best cost of points 0..i-1 in the clusters so far */
    double *cur;
    int64_t *split;
    const int64_t *prev_split; /* the previous layer's splits */
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
        /* at most last: where rounding breaks a near tie against the bound, one split remains */
        const int64_t above = lo_split > L->prev_split[end] ? lo_split : L->prev_split[end];
        const int64_t first = above < last ? above : last;
        double best = INFINITY;
        int64_t arg = first;
        for (int64_t s = first; s <= last; s++) {
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

/* The DP's layers 1..count (see _layers in gefen_compile/codebook.py): best[c * (n + 1) + j],
 * the optimal cost of points 0..j-1 in c non-empty clusters, the first pinned at -pin and the
 * others free; split[c * (n + 1) + j], where the last of them starts. best and split hold
 * (count + 1) * (n + 1) values. Returns 0, or -1 if 1 <= count <= n does not hold or memory
 * runs out. */
int gefen_codebook_layers(int64_t n, const int64_t *y, const int64_t *w, int64_t count,
                          int64_t pin, double *best, int64_t *split) {
    if (count < 1 || count > n) return -1;
    int64_t *sums = calloc(3 * (size_t)(n + 1), sizeof(int64_t));
    if (!sums) return -1;
    int64_t *sw = sums, *swy = sums + n + 1, *swyy = sums + 2 * (n + 1);
    for (int64_t i = 0; i < n; i++) {
        sw[i + 1] = sw[i] + w[i];
        swy[i + 1] = swy[i] + w[i] * y[i];
        swyy[i + 1] = swyy[i] + w[i] * y[i] * y[i];
    }
    for (int64_t j = 0; j < (count + 1) * (n + 1); j++) best[j] = INFINITY, split[j] = 0;
    Layer L = {y, sw, swy, swyy, NULL, NULL, NULL, NULL};
    for (int64_t j = 1; j <= n; j++) best[(n + 1) + j] = pinned_cost(&L, 0, j, -pin);
    for (int64_t layer = 2; layer <= count; layer++) {
        L.prev = best + (layer - 1) * (n + 1), L.cur = best + layer * (n + 1);
        L.split = split + layer * (n + 1), L.prev_split = split + (layer - 1) * (n + 1);
        solve(&L, layer, n, layer - 1, n - 1);
    }
    free(sums);
    return 0;
}
