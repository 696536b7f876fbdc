"""The model-agnostic training engine: config, distributed setup, parallelism, precision, flow
matching, trainer, checkpointing, metrics, judge, data and the embedded toy world."""

import os

__version__ = "0.1.0"

# Intel MKL's memory manager (torch's CPU BLAS) livelocks when threads that ran a GEMM exit while others
# allocate: the exiting threads' cleanup (mm_cleanup_thread_cbk, munmap in mm_free_all_banks) and the
# allocating ones (mkl_serv_allocate -> mm_account_ptr_by_tid) spun for 30+ minutes in a CPU distill run
# (gdb, 2026-11-28; the intermittent CI hang of stops 27 and 29). Plain malloc instead; MKL reads this at its
# first allocation, after import. A value the user set is kept.
os.environ.setdefault("MKL_DISABLE_FAST_MM", "1")
