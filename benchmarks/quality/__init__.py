"""Training-quality suite: AdamW against Gefen (robust and published) on five workloads.

    python -m benchmarks.quality                      # everything, seeds 0 1 2 (~30 min, 2 cores)
    python -m benchmarks.quality --quick              # tiny sizes: a smoke test, about a minute
    python -m benchmarks.quality --workloads digits mlp --seeds 0

A benchmark, not a test: it measures how far each Gefen variant's final validation loss is
from AdamW's, with every optimizer of a seed starting from the same weights and seeing the same
batches, and writes ``summary.md``, ``curves.csv`` and one ``<workload>.png`` per workload under
``--out``. The modules: ``optimizers`` (the three contestants, built alike), ``data`` (the BPE
tokens, the digits split, the MLP problems), ``models`` (the networks not already in
``examples/``), ``workloads`` (one training loop per kind of task), ``report`` (the files).
"""
