"""CPU demo of context distillation (about 6 minutes on 2 cores with a cold XLA cache, 3 warm; fully offline).

A tiny random Qwen3 (real vocabulary and tokenizer) is distilled toward itself with step-wise
experience in context, on trajectories of the scripted SimWeb agent with a principle-level pool
written by the offline writer. Watch the held-out KL fall. See expint_jax/distill/run.py.

    expint distill --config=configs/distill_cpu_demo.py
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.output_dir = "runs/distill_cpu_demo"
    c.export_student = True

    c.model = ml_collections.ConfigDict()
    c.model.checkpoint = ""  # a Hugging Face Qwen3 directory, or "" for the tiny random model below
    c.model.tiny = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                        head_dim=16, init_std=0.1)
    c.model.param_dtype = "float32"
    c.model.compute_dtype = "float32"
    c.model.remat = "none"
    c.model.seed = 0

    c.mesh = dict(data=1, fsdp=-1, tensor=1)

    c.data = ml_collections.ConfigDict()
    c.data.train = ()  # trajectory JSONL files; empty = build the offline SimWeb demo data
    c.data.eval = ()
    c.data.budget = dict(max_student_tokens=4096, max_teacher_tokens=8192, overflow="truncate")
    c.data.demo = dict(seed=0, train_tasks_per_level=4, eval_tasks_per_level=2, levels=("easy", "medium"),
                       rollouts_per_task=4, mistake_rate=0.3, max_pool_size=50, injection="stepwise",
                       selector="bm25", selector_k=4)

    c.trainer = ml_collections.ConfigDict()
    c.trainer.epochs = 2
    c.trainer.max_steps = config_dict.placeholder(int)
    c.trainer.checkpoint_every = 10
    c.trainer.keep_checkpoints = 2
    c.trainer.eval_every = 0
    c.trainer.eval_at_start = True
    c.trainer.log_every = 1
    c.trainer.progress_bar = True
    c.trainer.step = dict(divergence=dict(kind="forward_kl", beta=0.5, top_k=64, temperature=1.0),
                          reduction="token_mean", chunk_size=512, micro_batches=1, track_kl=True)
    c.trainer.batching = dict(rows=4, seed=0, sort_window=16, min_bucket=128, drop_remainder=False)
    c.trainer.optimizer = dict(learning_rate=1e-3, warmup_steps=2, end_lr_ratio=0.1, weight_decay=0.0,
                               max_grad_norm=1.0)  # total_steps: set by the trainer to the run length
    return c
