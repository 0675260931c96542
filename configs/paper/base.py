"""The paper's setting on WebWalkerQA, shared by every config in configs/paper/ (no model yet).

Principle-level experience built by the release's schedule (3 epochs x 25 steps of 4 queries x 5
rollouts, the pool so far in every rollout's prompt), step-wise injection chosen by an LLM
selector, off-policy distillation; 3 iterations, lr 1e-5, batch 128, 5 epochs, 32K context, pool
<= 50 items, <= 100 LLM calls per trajectory; the release's sampling (agent: temperature 0.7,
top_p 0.95, presence penalty 1.1; experience LLM: temperature 0, 8192 tokens). Web tools on
WebWalkerQA (Serper search, Jina visit with pages summarized by the writer's endpoint), an LLM
judge, and DeepSeek as the OpenAI-compatible writer and selector. The model files (qwen3_4b.py, qwen3_8b.py) add the
checkpoint; the ablation files change one axis each.

The hardware is one key, the config file's argument: ``--config=configs/paper/qwen3_4b.py:v5p-32``
(default ``v5p-8``). It sets the mesh and how the batch of 128 is split into micro-batches
(one 32K row per device per micro-batch) and how many rows the rollout engine decodes together:

    target    devices                      mesh (data, fsdp, tensor)   micro-batches   rollout rows
    v5p-8     4 chips x 95 GB, 1 host       1, 4, 1                     32              16
    v4-8      4 chips x 32 GB, 1 host       1, 4, 1                     32              8
    v5p-32    16 chips x 95 GB, 4 hosts     2, 8, 1                     8               32
    8xh100    8 GPUs x 80 GB, 1 node        1, 8, 1                     16              16

By the compile check (``benchmarks/bench_compile_memory.py``, figures in BENCHMARKS.md) the
Qwen3-4B train step at 32K tokens needs about 61 GB per chip: a v4-8 runs the rollouts (prefill
and decode fit its 32 GB) but not that step. Qwen3-8B changes the v5p-8 and 8xh100 layouts
(``qwen3_8b.LAYOUTS``).

Environment variables (names only; set them before ``expint run``, ``expint doctor`` checks):
DEEPSEEK_API_KEY (writer, selector, page summarizer, judge), SERPER_API_KEY (search),
JINA_API_KEY (visit). Task files: data/webwalkerqa/train.jsonl and data/webwalkerqa/eval.jsonl
in the WebWalkerQA format (``{"question", "answer", "root_url", "info": {"difficulty_level", ...}}``);
``--config.webwalker.eval_file=''`` splits the train file instead (``webwalker.eval_fraction``).
"""

from expint_jax.config import ConfigError, config_dict
from expint_jax.loop.config import LoopConfig

DEEPSEEK = {"base_url": "https://api.deepseek.com/v1", "model": "deepseek-chat", "api_key_env": "DEEPSEEK_API_KEY"}

# target -> (mesh data, fsdp, tensor), micro-batches of the 128-row batch, rows the rollout engine decodes together
TARGETS = {
    "v5p-8": ((1, 4, 1), 32, 16),
    "v4-8": ((1, 4, 1), 32, 8),
    "v5p-32": ((2, 8, 1), 8, 32),
    "8xh100": ((1, 8, 1), 16, 16),
}
CONTEXT = 32768


def get_config(target="v5p-8"):
    if target not in TARGETS:
        raise ConfigError(f"configs/paper: unknown target {target!r}; choose one of {', '.join(TARGETS)} "
                          "(--config=configs/paper/<file>.py:<target>)")
    (data, fsdp, tensor), micro_batches, rollout_rows = TARGETS[target]
    c = config_dict(LoopConfig, name="paper_base")
    c.runs_dir = "runs/paper"
    c.iterations = 3

    c.model.param_dtype = "float32"  # fp32 master weights: a 1e-5 step vanishes in bfloat16
    c.model.compute_dtype = "bfloat16"
    c.model.remat = "full"  # 32K-token rows
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data, fsdp, tensor

    c.env = "webwalker"
    c.webwalker.train_file = "data/webwalkerqa/train.jsonl"
    c.webwalker.eval_file = "data/webwalkerqa/eval.jsonl"
    c.webwalker.judge = "llm"
    for endpoint in (c.webwalker.judge_endpoint, c.webwalker.summarizer, c.extract.endpoint):
        endpoint.update(DEEPSEEK)

    c.policy.backend = "local"
    c.policy.max_batch_size = rollout_rows
    c.policy.max_context = CONTEXT
    c.agent.max_llm_calls = 100
    c.agent.max_context_tokens = CONTEXT
    c.agent.temperature = 0.7  # the release's agent sampling, stated here so a schema default cannot move it
    c.agent.top_p = 0.95
    c.agent.presence_penalty = 1.1
    c.agent.max_tokens = 4096  # per assistant turn

    c.extract.granularity = "principle"
    c.extract.writer = "llm"
    c.extract.temperature = 0.0  # the release's experience LLM
    c.extract.max_tokens = 8192
    c.extract.schedule = "release_steps"  # the release's extraction: 3 epochs x 25 steps of 4 queries x 5 rollouts
    c.extract.steps.epochs = 3
    c.extract.steps.batches_per_epoch = 25
    c.extract.steps.queries_per_batch = 4
    c.extract.samples = 5  # the release's rollouts per extraction query
    c.extract.max_pool_size = 50
    c.injection.mode = "stepwise"
    c.injection.selector = "llm"

    c.distill.regime = "off_policy"
    c.trainer.step.divergence.kind = "forward_kl"
    c.trainer.step.micro_batches = micro_batches
    c.trainer.epochs = 5
    c.trainer.optimizer.learning_rate = 1e-5
    c.trainer.batching.rows = 128
    c.budget.max_student_tokens = CONTEXT
    c.budget.max_teacher_tokens = 2 * CONTEXT  # the student's context plus the injected experience
    return c
