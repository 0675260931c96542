"""The loop's extraction: the LLM writer through an OpenAI-compatible endpoint (a local scripted
server answering every pipeline stage), and the running pool injected into later rollout batches."""

from expint_jax.experience.bank import read_pool
from expint_jax.experience.extract.stages import WRITER
from expint_jax.loop import driver, stages
from expint_jax.loop.layout import StageDir, StageId
from tests.experience.fake_extractor import extractor_llm
from tests.fakes.http_server import ScriptedServer
from tests.loop.conftest import loop_config

ONLY = [StageId(0, "rollouts"), StageId(0, "extract")]


def _config(tmp_path, url, **overrides):
    return loop_config(tmp_path, **{
        "policy__backend": "reference", "extract__writer": "llm", "extract__endpoint__base_url": url,
        "extract__endpoint__model": "fake", "extract__endpoint__max_attempts": 1, "simweb__train_tasks_per_level": 6,
        "extract__samples": 4, "extract__batch_tasks": 3, **overrides})


def test_the_llm_writer_builds_the_pool_through_the_endpoint(tmp_path):
    script = extractor_llm()
    with ScriptedServer(script) as server:
        driver.run_loop(_config(tmp_path, server.url), only=ONLY, echo=lambda line: None)
    run_dir = tmp_path / "loop_tiny"
    summary = StageDir(run_dir, StageId(0, "extract")).marker()["summary"]
    pool = read_pool(run_dir / "iter_000" / "extract" / "pool.jsonl")
    assert summary["writer"] == "llm" and summary["pool_size"] == len(pool) > 0
    assert all(item.writer == WRITER and item.iteration == 0 for item in pool)
    assert sum(script.hits.values()) > 0 and (run_dir / "iter_000" / "extract" / "pipeline" / "stats.json").exists()


def test_the_running_pool_is_injected_into_the_later_batches(tmp_path):
    with ScriptedServer(extractor_llm()) as server:
        driver.run_loop(_config(tmp_path, server.url, extract__inject_running_pool=True, extract__batch_tasks=2),
                        only=ONLY, echo=lambda line: None)
    rollouts_dir = tmp_path / "loop_tiny" / "iter_000" / "rollouts"
    batches = [stages.read_trajectories(rollouts_dir / f"rollouts_{b:04d}.jsonl") for b in range(3)]
    pools = [read_pool(rollouts_dir / f"running_{b:04d}" / "pool.jsonl") for b in range(3)]
    assert all(t.injection == "none" for t in batches[0])  # nothing written yet
    for b in (1, 2):  # batch b sees, globally, the pool written from the batches before it
        before = pools[b - 1]
        if len(before):
            assert all(t.injection == "global" and all(item.text in t.global_injection for item in before)
                       for t in batches[b])
        else:
            assert all(t.injection == "none" for t in batches[b])
    assert any(len(pool) for pool in pools[:2])  # the check above saw an injection
    final = read_pool(tmp_path / "loop_tiny" / "iter_000" / "extract" / "pool.jsonl")
    assert final == pools[-1] == read_pool(rollouts_dir / "running_final" / "pool.jsonl")
    assert StageDir(tmp_path / "loop_tiny", StageId(0, "extract")).marker()["summary"]["from"].startswith("the running")
