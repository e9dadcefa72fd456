"""A plain training script over a zoo model, with torch.optim.AdamW and the model compiled
(``torch.compile(model)``, as nanoGPT's ``--compile=True``): what test_model_zoo.py runs under
``python -m gefen_compile``. Usage: zoo_train.py MODEL OUT.pt"""

import sys

import torch

from zoo_models import LR, WEIGHT_DECAY, build, eager_step, state_bytes, train

name, out = sys.argv[1:]
model = build(name)
opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
losses = train(name, eager_step(name, torch.compile(model), opt))
torch.save({
    "losses": losses,
    "params": [p.detach() for p in model.parameters()],
    "state_keys": sorted({k for s in opt.state.values() for k in s}),
    "state_bytes": state_bytes(opt),
}, out)
