"""The CPU demo: the SimWeb model organism through three iterations of the paper's recipe.

π_0 is the organism (``expint_jax/organism/pi0``: a 4-layer Qwen3 on a SimWeb sub-vocabulary,
trained from scratch by ``expint organism bootstrap`` on the scripted agent's trajectories, so its
behaviour depends on the lessons in its context). Each iteration: π_k rolls out on the training
tasks, SimWeb's offline writer turns the groups into a principle pool E_k, the teacher (π_k with E_k
injected step-wise) rolls out and its correct trajectories are distilled into the student by forward
KL (off-policy), and π_{k+1} is evaluated on 100 held-out tasks x 3 samples without experience
(internalized) and with E_k (global, step-wise).

    expint run --config configs/simweb_demo.py

The other cells of the paper's comparison change one axis each: ``simweb_demo_instance.py``,
``simweb_demo_global.py``, ``simweb_demo_on_policy.py``, ``simweb_demo_sft.py``.
"""

from expint_jax.config import config_dict
from expint_jax.loop.config import LoopConfig
from expint_jax.organism import shipped_checkpoint, url_style


def get_config():
    c = config_dict(LoopConfig, name="simweb_demo")
    c.iterations = 3
    c.model.checkpoint = str(shipped_checkpoint())
    c.mesh.devices = 1  # a 4-layer model gains nothing from sharding on a CPU
    c.mesh.fsdp = 1
    c.policy.max_batch_size = 256
    c.policy.max_context = 4096
    c.simweb.levels = ("easy", "medium")
    c.simweb.train_tasks_per_level = 30
    c.simweb.eval_tasks_per_level = 50
    c.simweb.url_style = url_style(shipped_checkpoint())  # the URLs the organism learned to copy
    c.agent.max_llm_calls = 10
    c.agent.max_tokens = 256
    c.agent.max_context_tokens = 3800
    c.extract.samples = 4
    c.extract.granularity = "principle"
    c.extract.batch_tasks = 60
    c.injection.mode = "stepwise"
    c.injection.selector = "bm25"
    c.injection.k = 4
    c.distill.regime = "off_policy"
    c.distill.samples = 2
    c.distill.heldout_tasks = 8
    c.eval.samples = 3
    c.budget.max_student_tokens = 4096
    c.budget.max_teacher_tokens = 8192
    c.trainer.step.divergence.kind = "forward_kl"
    c.trainer.epochs = 2
    c.trainer.batching.rows = 8
    c.trainer.batching.min_bucket = 512
    c.trainer.optimizer.learning_rate = 3e-4
    c.trainer.optimizer.warmup_steps = 2
    c.trainer.checkpoint_every = 50
    c.trainer.progress_bar = False
    return c
