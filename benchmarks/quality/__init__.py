"""Training-quality suite: AdamW against Gefen (robust and published) on five workloads, and
Muon against GefenMuon (and AdamW) on a sixth.

    python -m benchmarks.quality                      # the five, seeds 0 1 2 (~30 min, 2 cores)
    python -m benchmarks.quality --quick              # tiny sizes: a smoke test, about a minute
    python -m benchmarks.quality --workloads digits mlp --seeds 0
    python -m benchmarks.quality --workloads gpt2-bpe-muon --out benchmarks/results/quality/muon

A benchmark, not a test: it measures how far each Gefen variant's final validation loss is
from AdamW's, with every optimizer of a seed starting from the same weights and seeing the same
batches, and writes ``summary.md``, ``curves.csv`` and one ``<workload>.png`` per workload under
``--out``. The modules: ``optimizers`` (the contestants, built alike), ``data`` (the BPE
tokens, the digits split, the MLP problems), ``models`` (the networks not already in
``examples/``), ``workloads`` (one training loop per kind of task), ``report`` (the files).
"""
