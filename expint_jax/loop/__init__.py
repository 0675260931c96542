"""The self-evolution loop: π_k acts, E_k is written from its scored rollouts, E_k is distilled
into π_{k+1}, π_{k+1} is evaluated, and again.

``run_loop(LoopConfig)`` runs (or resumes) it; ``driver`` holds the schedule, ``stages`` the work
of each stage, ``regimes`` the three distillation regimes, ``layout`` the run directory and its
atomically published stages, ``metrics`` the evaluation figures, ``report`` the report,
``hosts`` who does what when several JAX processes (hosts) run the loop together;
``cells`` runs several configs over seeds and ``comparison`` turns them into the paper's comparisons
(intervals across seeds, one table and figure per axis).
"""

from expint_jax.exports import public_api

__getattr__, __dir__, __all__ = public_api(__name__, {
    "LoopConfig": "config", "check_config": "config",
    "run_loop": "driver", "schedule": "driver", "LoopResult": "driver",
    "Regime": "regimes", "make_regime": "regimes",
    "StaleStageError": "layout",
    "evaluate": "metrics",
    "write_report": "report",
    "plan_runs": "cells", "run_all": "cells",
    "CellResult": "comparison", "write_comparisons": "comparison",
})
