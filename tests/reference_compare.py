"""An optimizer's state and parameters against the slow reference's (tests/reference.py)."""

import numpy as np
import torch
from reference import K, RefGefen, codebook_cost, points

# Parameters: float64 math in the reference, fp32 (fp64 for fp64 state) in Gefen.
PARAM_TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float16: dict(rtol=2e-3, atol=1e-4),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-3),
}


def assert_matches_reference(params, opt, ref):
    """Same codebook, periods, step counts, codes and magnitudes (bit for bit: every discrete
    decision follows the spec's arithmetic); second moments and parameters within rounding."""
    if ref.codebook is None:  # no gradient yet
        assert opt.codebook is None
    else:
        np.testing.assert_array_equal(opt.codebook.numpy(), ref.codebook)
    for p, ref_p, ref_state in zip(params, ref.params, ref.state):
        if ref_state is None:
            assert not opt.state.get(p)  # get: reading state[p] would add an entry
            continue
        state, dtype = opt.state[p], ref_state["dtype"]
        assert state["period"] == ref_state["period"]
        assert state["step"].item() == ref_state["step"]
        assert state["codes"].dtype == torch.uint8
        assert state["magnitude"].dtype == dtype and state["vmean"].dtype == dtype
        np.testing.assert_array_equal(state["codes"].long().numpy(), ref_state["codes"])
        np.testing.assert_array_equal(state["magnitude"].double().numpy(), ref_state["magnitude"])
        # The block sums of g^2 add in another order: rounding apart, which in the subnormal
        # range (fp16 from 6e-5 down) is one step of the smallest subnormal, not relative.
        finfo = torch.finfo(dtype)
        np.testing.assert_allclose(
            state["vmean"].double().numpy(), ref_state["vmean"], rtol=PARAM_TOL[dtype]["rtol"],
            atol=finfo.smallest_normal * finfo.eps,
        )
        torch.testing.assert_close(p.detach(), ref_p, **PARAM_TOL[dtype])


class TieAcceptingReference(RefGefen):
    """The reference, taking Gefen's codebook where the two DP solutions differ but reach the
    same optimal cost: with more points than entries, equal-cost clusterings are common (two
    neighbours at the same distance, and low-precision gradients with few distinct values),
    and the spec lets ties break either way. Set ``optimizer`` before the first step."""

    optimizer = None

    def learn_codebook(self, counts):
        codebook, learned = super().learn_codebook(counts), self.optimizer.codebook.numpy()
        if len(points(counts)[0]) < K - self.robust or np.array_equal(codebook, learned):
            return codebook  # the padded codebook has no ties: it must be equal
        np.testing.assert_allclose(
            codebook_cost(counts, learned), codebook_cost(counts, codebook), rtol=1e-9
        )
        return learned
