"""The robust variant's rows of fused MoE experts: a tiny Mixtral (transformers' experts as one
(experts, out, in) tensor per layer), trained with AdamW, with Gefen, and with Gefen under the
row rule it had before (a row of a 3-D tensor: numel / shape[0], a whole expert), side by side.

    python benchmarks/moe_expert_rows.py [--seeds 1 2] [--steps 200]

Prints each run's evaluation loss and the experts' periods. Data: sequences where each token
follows from the two before it through a fixed random table (learnable, not trivial).
"""

from __future__ import annotations

import argparse
import math

import torch
import transformers

import gefen_compile
from gefen_compile import variant

TOKENS, LENGTH = 64, 32


def batch(step: int, table: torch.Tensor) -> dict[str, torch.Tensor]:
    x = torch.randint(0, TOKENS, (8, LENGTH), generator=torch.Generator().manual_seed(step))
    for t in range(2, LENGTH):
        x[:, t] = table[x[:, t - 1], x[:, t - 2]]
    return {"input_ids": x, "labels": x}


def whole_expert_rows(self: variant.Variant, shape: tuple[int, ...], inferred: int) -> int:
    """The rule before: a row of any 2-D+ tensor is numel / shape[0]."""
    if self.rows_bound_periods and len(shape) >= 2 and shape[0] > 0:
        row = math.prod(shape) // shape[0]
        if row > variant.MAX_ROW_LEFT_ALONE and inferred > row:
            return row
    return inferred


def run(kind: str, seed: int, steps: int, table: torch.Tensor) -> tuple[float, dict]:
    torch.manual_seed(seed)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
        num_experts_per_tok=2, max_position_embeddings=64, router_aux_loss_coef=0.0))
    if kind == "AdamW":
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    else:
        opt = gefen_compile.Gefen(model.named_parameters(), lr=3e-3)
    for step in range(steps):
        model(**batch(step + 10000 * seed, table)).loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        loss = sum(model(**batch(99999 - s, table)).loss.item() for s in range(8)) / 8
    periods = {} if kind == "AdamW" else {
        name.removeprefix("model."): opt.state[p]["period"]
        for name, p in model.named_parameters() if "experts" in name}
    return loss, periods


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    table = torch.randint(0, TOKENS, (TOKENS, TOKENS), generator=torch.Generator().manual_seed(7))
    rule = variant.Variant.period
    for seed in args.seeds:
        for kind in ("AdamW", "Gefen", "Gefen, whole-expert rows"):
            variant.Variant.period = whole_expert_rows if kind.endswith("rows") else rule
            try:
                loss, periods = run(kind, seed, args.steps, table)
            finally:
                variant.Variant.period = rule
            print(f"seed {seed}  {kind:25s} eval loss {loss:.4f}  {periods}")


if __name__ == "__main__":
    main()
