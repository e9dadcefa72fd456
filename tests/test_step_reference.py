"""Gefen's trajectory against the slow reference over 20 steps (GEFEN_SPEC "One step")."""

import pytest
import torch
from reference_compare import TieAcceptingReference, assert_matches_reference

from gefen_compile import Gefen

SHAPES = {
    "matrix": (24, 40),
    "bias": (24,),
    "3-D": (4, 6, 10),
    "prime": (37,),
    "ragged": (300,),  # period 1: robust blocks 256 + 44, published Q = 150
    "grouped rows": (32, 16),  # rows in groups of 4 of one scale: robust cuts P to a row
    "one element": (1,),
    "late": (8, 16),  # its gradient first appears at step LATE
    "never": (5,),  # never gets a gradient
}
TINY_SHAPES = {"tiny matrix": (3, 4), "tiny vector": (5,)}  # under 256 non-empty bins: padded
LATE = 5
STEPS = 20


def structured_grad(shape, gen, rows_per_scale=1):
    """Rows with their own scales (or groups of rows sharing one), as real weight gradients
    have."""
    rows = torch.exp(2 * torch.randn(-(-shape[0] // rows_per_scale), generator=gen))
    rows = rows.repeat_interleave(rows_per_scale)[: shape[0]]
    return rows.view(-1, *[1] * (len(shape) - 1)) * torch.randn(shape, generator=gen)


def gradient_sequence(shapes, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return [
        [
            None
            if name == "never" or (name == "late" and t < LATE)
            else structured_grad(shape, gen, 4 if name == "grouped rows" else 1).to(dtype)
            for name, shape in shapes.items()
        ]
        for t in range(STEPS)
    ]


def run_both(shapes, dtype, hyper, seed=0, variant="robust"):
    gen = torch.Generator().manual_seed(seed + 100)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes.values()]
    ref = TieAcceptingReference(params, **hyper, variant=variant)
    opt = Gefen(params, **hyper, variant=variant)
    ref.optimizer = opt
    ref.distinct = []  # the codebook's distinct entries after each step
    for grads in gradient_sequence(shapes, dtype, seed):
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()
        opt.step()
        ref.step(grads)
        ref.distinct.append(len(torch.unique(opt.codebook)))
    return params, opt, ref


HYPER = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)


@pytest.mark.parametrize("variant", ["robust", "published"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_trajectory_equals_reference(dtype, variant):
    params, opt, ref = run_both(SHAPES, dtype, HYPER, variant=variant)
    assert_matches_reference(params, opt, ref)


@pytest.mark.parametrize(
    "hyper",
    [
        dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.0, maximize=True),
        dict(lr=5e-2, betas=(0.0, 0.5), eps=1e-3, weight_decay=1.0),
    ],
)
def test_hyperparameters_follow_reference(hyper):
    params, opt, ref = run_both(SHAPES, torch.float32, hyper, seed=1)
    assert_matches_reference(params, opt, ref)


def test_grouped_rows_take_the_variants_periods():
    """The case where the variants' periods differ is really in the trajectories above."""
    for variant, period in (("published", 64), ("robust", 16)):
        params, opt, _ = run_both(SHAPES, torch.float32, HYPER, variant=variant)
        assert opt.state[params[list(SHAPES).index("grouped rows")]]["period"] == period


@pytest.mark.parametrize("variant", ["robust", "published"])
def test_padded_codebook_trajectory(variant):
    """Tiny tensors: the first codebook is padded; robust, it is learned again at each step
    until it is not thin, published, it stays."""
    params, opt, ref = run_both(TINY_SHAPES, torch.float32, HYPER, seed=2, variant=variant)
    assert ref.distinct[0] < 256  # the padded case really ran
    assert (ref.distinct[-1] == 256) == (variant == "robust")
    assert_matches_reference(params, opt, ref)


def test_late_parameter_uses_the_first_codebook():
    params, opt, _ = run_both(SHAPES, torch.float32, HYPER)
    first = Gefen([torch.nn.Parameter(p.detach().clone()) for p in params], **HYPER)
    grads = gradient_sequence(SHAPES, torch.float32, 0)[0]
    for p, g in zip(first.param_groups[0]["params"], grads):
        p.grad = g
    first.step()
    torch.testing.assert_close(opt.codebook, first.codebook, rtol=0, atol=0)
    late = params[list(SHAPES).index("late")]
    assert opt.state[late]["step"].item() == STEPS - LATE
