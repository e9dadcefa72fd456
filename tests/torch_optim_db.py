"""Runs PyTorch's own AdamW inputs (``torch.testing._internal.common_optimizers``: the AdamW
``OptimizerInfo``'s ``optim_inputs_func`` and ``optim_error_inputs_func``) against Gefen and
prints what happened as JSON, for tests/test_torch_optim_db.py to judge.

A separate process because importing torch's internal test modules changes global state (it
freezes torch.backends flags and patches TorchScript calls), which must not leak into the
rest of the suite. Prints ``{"skip": reason}`` where the module or its AdamW entry is missing.
"""

from __future__ import annotations

import json
import warnings

import torch

from gefen_compile import Gefen

STEPS = 3


def outcome(call) -> dict:
    """What ``call()`` raised or warned: type names along the MRO and the message."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            call()
        except Exception as error:  # noqa: BLE001 - every outcome is reported to the test
            return {"raised": [c.__name__ for c in type(error).__mro__], "message": str(error)}
    return {"raised": None, "warnings": [[c.category.__name__, str(c.message)] for c in caught]}


def error_cases(info, error_on_step) -> list[dict]:
    cases = []
    for error_input in info.optim_error_inputs_func(device="cpu", dtype=torch.float32):
        optim_input = error_input.optimizer_error_input
        params, kwargs = optim_input.params, optim_input.kwargs
        step = error_input.error_on == error_on_step

        def call(params=params, kwargs=kwargs, step=step):
            opt = Gefen(params, **kwargs)
            if step:
                opt.step()

        cases.append({"desc": optim_input.desc, "expected": error_input.error_type.__name__,
                      "regex": error_input.error_regex, **outcome(call)})
    return cases


def valid_cases(info) -> list[dict]:
    """Every valid input (those torch lists for CPU and for CUDA, all run on CPU): a few steps
    of a small model."""
    cases, seen = [], set()
    for device in ("cpu", "cuda"):  # only selects torch's lists; everything runs on CPU
        for optim_input in info.optim_inputs_func(device=device):
            if optim_input.desc in seen:  # the CUDA list repeats the CPU one
                continue
            seen.add(optim_input.desc)
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(),
                                        torch.nn.Linear(8, 2))
            before = [p.detach().clone() for p in model.parameters()]

            def call(model=model, kwargs=optim_input.kwargs):
                opt = Gefen(model.parameters(), **kwargs)
                for _ in range(STEPS):
                    opt.zero_grad()
                    model(torch.randn(4, 6)).square().sum().backward()
                    opt.step()

            result = outcome(call)
            after = list(model.parameters())
            result["changed"] = all(not torch.equal(a, b) for a, b in zip(after, before))
            result["finite"] = all(bool(p.isfinite().all()) for p in after)
            cases.append({"desc": optim_input.desc,
                          "amsgrad": bool(optim_input.kwargs.get("amsgrad")), **result})
    return cases


def main() -> None:
    try:
        from torch.testing._internal import common_optimizers
    except ImportError as error:  # expecttest missing, or the internal module moved
        print(json.dumps({"skip": f"torch.testing._internal.common_optimizers: {error!r}"}))
        return
    infos = [i for i in getattr(common_optimizers, "optim_db", [])
             if i.optim_cls is torch.optim.AdamW]
    error_on = getattr(common_optimizers, "OptimizerErrorEnum", None)
    if not infos or error_on is None:
        print(json.dumps({"skip": f"torch {torch.__version__}'s common_optimizers has no AdamW "
                                  "OptimizerInfo or no OptimizerErrorEnum"}))
        return
    print(json.dumps({"torch": torch.__version__,
                      "errors": error_cases(infos[0], error_on.STEP_ERROR),
                      "valid": valid_cases(infos[0])}))


if __name__ == "__main__":
    main()
