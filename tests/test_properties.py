"""Property-based tests (Hypothesis): random parameter sets, dtypes, param groups and gradient
schedules, each stepped by Gefen and by the slow reference (tests/reference.py), and resumed at a
random step from a saved state_dict into a fresh optimizer, which must equal, bit for bit, the
run that never stopped.

The examples are derandomized (the same ones on every run, so CI is reproducible) and bounded so
the file runs in well under 90 s on 2 cores. GEFEN_HYPOTHESIS_PROFILE=thorough draws many more,
at random: the first run to try after changing the step, its state or checkpoints."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from reference_compare import TieAcceptingReference, assert_matches_reference
from test_checkpoint import saved_and_loaded
from test_optimizer_contract import assert_tree_equal

from gefen_compile import Gefen

settings.register_profile(  # no shrinking: a failure reports the example as generated
    "ci", max_examples=100, deadline=None, derandomize=True, database=None,
    phases=[Phase.explicit, Phase.generate], suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
PROFILE = settings.get_profile(os.environ.get("GEFEN_HYPOTHESIS_PROFILE", "ci"))

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
PRIMES = [2, 3, 5, 7, 13, 31, 37, 61, 97, 131, 251]
# Every tensor under 300 elements: the reference's O(B^2 K) codebook stays fast. Gradients scale
# by row (the first dimension), so the shapes with four rows or more of over 8 elements usually
# get a period above 1.
SHAPES = st.one_of(
    st.just(()),  # 0-d
    st.sampled_from([(0,), (3, 0), (0, 4, 2)]),  # empty
    st.sampled_from(PRIMES).map(lambda n: (n,)),  # prime lengths: period 1
    st.tuples(st.integers(1, 6), st.integers(1, 8)),  # period 1
    st.tuples(st.integers(4, 12), st.integers(9, 24)),
    st.tuples(st.integers(4, 6), st.integers(1, 4), st.integers(3, 12)),  # 3-D
    st.sampled_from([(4, 64), (2, 4, 32), (8, 32)]),  # long rows
    st.sampled_from([(257,), (269,), (280,)]),  # period 1, ragged magnitude blocks (robust)
)
HYPER = st.fixed_dictionaries({
    "lr": st.sampled_from([1e-3, 1e-2, 0.1]),
    "betas": st.tuples(st.sampled_from([0.0, 0.5, 0.9]), st.sampled_from([0.5, 0.99, 0.999])),
    "eps": st.sampled_from([1e-8, 1e-6, 1e-3]),
    "weight_decay": st.sampled_from([0.0, 0.1, 1.0]),
    "maximize": st.booleans(),
})
# A parameter's gradient at one step: row-scaled noise (most often), none, or all zeros.
GRADIENTS = st.sampled_from(["noise", "noise", "noise", None, None, "zero"])


@dataclass
class Case:
    shapes: list[tuple[int, ...]]
    dtypes: list[torch.dtype]
    groups: list[dict]  # hyperparameters, and "members": indices into shapes
    schedule: list[list[str | None]]  # [step][parameter]: a GRADIENTS value
    scales: list[float]  # per parameter
    save_at: int  # steps before the state_dict round trip
    seed: int
    variant: str


@st.composite
def cases(draw) -> Case:
    num_params = draw(st.integers(1, 4))
    num_groups = draw(st.integers(1, min(3, num_params)))
    owner = draw(st.lists(st.integers(0, num_groups - 1), min_size=num_params,
                          max_size=num_params))
    groups = [{**draw(HYPER), "members": [i for i, g in enumerate(owner) if g == gi]}
              for gi in range(num_groups)]
    steps = draw(st.integers(1, 6))
    return Case(
        shapes=draw(st.lists(SHAPES, min_size=num_params, max_size=num_params)),
        dtypes=draw(st.lists(st.sampled_from(DTYPES), min_size=num_params, max_size=num_params)),
        groups=[g for g in groups if g["members"]],
        schedule=draw(st.lists(st.lists(GRADIENTS, min_size=num_params, max_size=num_params),
                               min_size=steps, max_size=steps)),
        scales=draw(st.lists(st.sampled_from([1.0, 1e-3]), min_size=num_params,
                             max_size=num_params)),
        save_at=draw(st.integers(0, steps)),
        seed=draw(st.integers(0, 2**16)),
        variant=draw(st.sampled_from(["robust", "published"])),
    )


def gradients(case: Case) -> list[list[torch.Tensor | None]]:
    """Every step's gradients, from the case's seed: rows with their own scales, as weight
    gradients have."""
    gen = torch.Generator().manual_seed(case.seed)
    steps = []
    for kinds in case.schedule:
        grads = []
        for shape, dtype, scale, kind in zip(case.shapes, case.dtypes, case.scales, kinds):
            rows = torch.exp(torch.randn(shape[:1] + (1,) * (len(shape) - 1), generator=gen))
            noise = scale * rows * torch.randn(shape, generator=gen)
            grads.append(None if kind is None else (noise * (kind == "noise")).to(dtype))
        steps.append(grads)
    return steps


def initial_values(case: Case) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(case.seed + 1)
    return [torch.randn(s, generator=gen).to(d) for s, d in zip(case.shapes, case.dtypes)]


def param_groups(case: Case, params: list[torch.Tensor], with_hyper: bool = True) -> list[dict]:
    """The case's groups over ``params`` (hyperparameters left at Gefen's defaults unless
    ``with_hyper``: a loaded state_dict must bring them back)."""
    return [
        {"params": [params[i] for i in g["members"]],
         **({k: v for k, v in g.items() if k != "members"} if with_hyper else {})}
        for g in case.groups
    ]


def step(opt: Gefen, params: list[torch.Tensor], grads: list[torch.Tensor | None]) -> None:
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()
    opt.step()


def in_group_order(case: Case, values: list) -> list:
    """``values`` (one per parameter) in the order the optimizer numbers parameters."""
    return [values[i] for g in case.groups for i in g["members"]]


@PROFILE
@given(case=cases())
def test_random_cases_follow_the_reference_and_resume_bit_identically(case):
    schedule = gradients(case)
    values = initial_values(case)

    # The run that never stops, against the reference.
    straight = [torch.nn.Parameter(v.clone()) for v in values]
    opt = Gefen(param_groups(case, straight), variant=case.variant)
    ref = TieAcceptingReference.from_groups(param_groups(case, values), variant=case.variant)
    ref.optimizer = opt
    for grads in schedule:
        step(opt, straight, grads)
        ref.step(in_group_order(case, grads))
    assert_matches_reference(in_group_order(case, straight), opt, ref)

    # The same run, saved after `save_at` steps and loaded into a fresh optimizer over fresh
    # parameter tensors (as a new process would), then continued.
    resumed = [torch.nn.Parameter(v.clone()) for v in values]
    first = Gefen(param_groups(case, resumed), variant=case.variant)
    for grads in schedule[:case.save_at]:
        step(first, resumed, grads)
    checkpoint = saved_and_loaded(first.state_dict())  # through torch.save and torch.load
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in resumed]
    # The variant comes back from the state_dict: the fresh optimizer is built with the other.
    other = "published" if case.variant == "robust" else "robust"
    second = Gefen(param_groups(case, resumed, with_hyper=False), variant=other)
    second.load_state_dict(checkpoint)
    for grads in schedule[case.save_at:]:
        step(second, resumed, grads)

    assert_tree_equal([p.detach() for p in straight], [p.detach() for p in resumed], "params")
    assert_tree_equal(opt.state_dict(), second.state_dict(), "state_dict")
