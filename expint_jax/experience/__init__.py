"""Experience: the versioned pool, LLM extraction, step-wise selection and injection, granularity.

The entry points below are the public API; deeper modules are internals.
"""

from expint_jax.exports import public_api

__getattr__, __dir__, __all__ = public_api(__name__, {
    "ExperiencePool": "bank", "ExperienceItem": "bank", "write_pool_files": "bank", "PoolError": "bank", "read_pool": "bank", "write_pool": "bank", "diff_pools": "bank",
    "ExtractionConfig": "extract", "extract_experience": "extract", "group_rollouts": "extract",
    "run_extraction_steps": "extract", "StepPlan": "extract", "scrub_experience_refs": "scrub",
    "check_task_overlap": "overlap",
    "make_selector": "select", "Selector": "select", "Selection": "select",
    "make_injection": "inject", "annotate_injections": "inject", "format_experience_block": "inject",
    "format_global_block": "inject",
    "analyze": "granularity", "analyze_pool": "granularity", "GranularityReport": "granularity",
})
