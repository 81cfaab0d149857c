"""DeepSpeed tensor-parallel mode: one model sharded over several VMs, served by rank 0.

`config` holds the DS_* settings, `tp` the per-rank logic (rank 0 serves the one API
router through a `ModelBackend` whose requests are broadcast to every rank; the
other ranks follow), `launcher` the `deepspeed --launcher pdsh` wrapper, and `cli`
the `python -m app deepspeed serve|launch` commands. DeepSpeed and torch are
imported only inside functions, so importing this package is cheap.
"""
