"""Every config in configs/ and configs/paper/ binds to its schema (nothing is run); the paper
configs hold the paper's setting on every hardware target, and the ablation cells change one axis."""

from pathlib import Path

import pytest

from expint_jax.config import ConfigError, bind, load_config_file, to_dict
from expint_jax.distill.run import DistillRunConfig
from expint_jax.loop.config import LoopConfig

ROOT = Path(__file__).resolve().parents[1] / "configs"
PAPER = ROOT / "paper"
TARGETS = ("v5p-8", "v4-8", "v5p-32", "8xh100")
SCHEMAS = {"distill_cpu_demo.py": DistillRunConfig}


@pytest.mark.parametrize("path", sorted(ROOT.glob("*.py")), ids=lambda p: p.name)
def test_every_top_level_config_binds(path):
    bind(SCHEMAS.get(path.name, LoopConfig), load_config_file(path))


def _paper(path: Path, target: str) -> LoopConfig:
    return bind(LoopConfig, load_config_file(path, target))


PAPER_CELLS = [(p, t) for p in sorted(PAPER.glob("*.py")) for t in TARGETS
               if not (p.name.startswith("qwen3_8b") and t == "v4-8")]


@pytest.mark.parametrize("path, target", PAPER_CELLS, ids=lambda x: getattr(x, "name", x))
def test_every_paper_config_binds_on_every_target(path, target):
    config = _paper(path, target)
    assert config.env == "webwalker" and config.iterations == 3
    assert config.trainer.batching.rows == 128 and config.trainer.epochs == 5
    assert config.trainer.optimizer.learning_rate == 1e-5
    assert config.trainer.batching.rows % config.trainer.step.micro_batches == 0
    assert config.budget.max_student_tokens == config.agent.max_context_tokens == config.policy.max_context == 32768
    assert config.extract.max_pool_size == 50 and config.agent.temperature == 0.7 and config.agent.max_llm_calls == 100
    assert config.extract.writer == "llm" and config.extract.endpoint.api_key_env == "DEEPSEEK_API_KEY"
    assert config.webwalker.judge == "llm"
    # Thinking off for the hybrid Qwen3-8B (every 8B cell); Qwen3-4B-Instruct-2507 has no thinking mode.
    assert config.model.enable_thinking is not path.name.startswith("qwen3_8b")


def test_the_target_sets_the_mesh_and_an_unknown_one_names_the_choices():
    meshes = {t: _paper(PAPER / "qwen3_4b.py", t).mesh for t in TARGETS}
    assert (meshes["v5p-8"].fsdp, meshes["v5p-32"].data * meshes["v5p-32"].fsdp, meshes["8xh100"].fsdp) == (4, 16, 8)
    with pytest.raises(ConfigError, match="unknown target 'v6e-8'; choose one of v5p-8, v4-8, v5p-32, 8xh100"):
        load_config_file(PAPER / "qwen3_4b.py", "v6e-8")
    with pytest.raises(ConfigError, match="Qwen3-8B does not fit a v4-8"):
        load_config_file(PAPER / "qwen3_8b.py", "v4-8")


def _differences(a: dict, b: dict, prefix: str = "") -> set[str]:
    keys = set(a) | set(b)
    out = set()
    for key in keys:
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            out |= _differences(a[key], b[key], f"{prefix}{key}.")
        elif a.get(key) != b.get(key):
            out.add(prefix + key)
    return out


@pytest.mark.parametrize("model", ["qwen3_4b", "qwen3_8b"])
def test_the_recipe_is_principle_stepwise_off_policy_and_each_ablation_changes_one_axis(model):
    recipe = _paper(PAPER / f"{model}.py", "v5p-8")
    assert (recipe.extract.granularity, recipe.injection.mode, recipe.injection.selector, recipe.distill.regime) == (
        "principle", "stepwise", "llm", "off_policy")
    expected = {"instance": {"extract.granularity"}, "global_injection": {"injection.mode"},
                "on_policy": {"distill.regime"}, "sft": {"distill.regime"}}
    for cell, changed in expected.items():
        ablation = _paper(PAPER / f"{model}_{cell}.py", "v5p-8")
        assert _differences(to_dict(recipe), to_dict(ablation)) == {"name"} | changed
        assert ablation.name == f"{model}_{cell}"


# Top-level ablation cells: base config -> {cell config: the keys it changes besides ``name``}.
TOP_LEVEL_ABLATIONS = {
    "recipe.py": {"instance.py": {"extract.granularity"}, "global_injection.py": {"injection.mode"},
                  "on_policy.py": {"distill.regime"}, "sft.py": {"distill.regime"}},
    "simweb_demo.py": {"simweb_demo_instance.py": {"extract.granularity"},
                       "simweb_demo_global.py": {"injection.mode"},
                       "simweb_demo_on_policy.py": {"distill.regime"}, "simweb_demo_sft.py": {"distill.regime"}},
}


@pytest.mark.parametrize("base, cell, changed",
                         [(b, c, k) for b, cells in TOP_LEVEL_ABLATIONS.items() for c, k in cells.items()],
                         ids=lambda x: x if isinstance(x, str) else None)
def test_each_top_level_ablation_changes_one_axis_of_its_base(base, cell, changed):
    recipe = bind(LoopConfig, load_config_file(ROOT / base))
    assert (recipe.extract.granularity, recipe.injection.mode, recipe.distill.regime) == (
        "principle", "stepwise", "off_policy")
    ablation = bind(LoopConfig, load_config_file(ROOT / cell))
    assert _differences(to_dict(recipe), to_dict(ablation)) == {"name"} | changed
    assert ablation.name == Path(cell).stem


def test_every_ablation_cell_in_configs_is_in_the_table():
    """A new ``<base>_<axis>.py`` cell beside a base must be listed above, so its one-axis check runs."""
    listed = {cell for cells in TOP_LEVEL_ABLATIONS.values() for cell in cells}
    found = {p.name for p in ROOT.glob("simweb_demo_*.py")}
    assert found <= listed, f"cells missing from TOP_LEVEL_ABLATIONS: {sorted(found - listed)}"
