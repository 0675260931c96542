"""``expint doctor``: versions and devices always; with a config, the mesh, task files, endpoints
and API keys it needs, every problem listed (exit 1), names of key variables only, never values."""

import json

import pytest

from expint_jax import cli
from expint_jax.cli import doctor

SECRET = "doctor-test-secret-value"
PAPER = "configs/paper/qwen3_4b.py"


@pytest.fixture(autouse=True)
def no_keys(monkeypatch):
    for name in ("DEEPSEEK_API_KEY", "SERPER_API_KEY", "JINA_API_KEY"):
        monkeypatch.delenv(name, raising=False)


def test_without_a_config_it_prints_versions_devices_and_the_multihost_variables(capsys):
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "  jax: " in out and "  python: " in out
    assert "backend cpu: 8 devices (8 local) in process 0 of 1" in out  # conftest's 8 fake devices
    assert "  EXPINT_COORDINATOR: not set" in out


def test_the_tiny_config_is_ready(capsys):
    assert doctor.main(["--config=configs/loop_tiny.py"]) == 0
    out = capsys.readouterr().out
    assert "mesh data x fsdp x tensor = 1 x 1 x 1 on 1 of 8 devices" in out
    assert "endpoints: none (runs offline)" in out and "API keys: none needed" in out and "ready" in out
    assert "policy: local backend" in out


def test_a_served_policy_shows_its_command_and_variable_names_only(capsys):
    code = doctor.main(["--config=configs/loop_tiny.py", "--config.policy.backend=server",
                        "--config.policy.server.command=no-such-engine serve {checkpoint} --port {port}",
                        f"--config.policy.server.env=('CUDA_VISIBLE_DEVICES=4,5', 'HF_TOKEN={SECRET}')"])
    out = capsys.readouterr().out
    assert code == 1 and SECRET not in out
    assert "'no-such-engine' is not an executable on PATH" in out.split("problem:\n", 1)[1]
    assert "  command: no-such-engine serve {checkpoint} --port {port}" in out
    assert "server environment variables: CUDA_VISIBLE_DEVICES, HF_TOKEN" in out


def test_a_paper_config_lists_its_endpoints_and_every_problem_by_key_name(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("DEEPSEEK_API_KEY", SECRET)
    line = {"question": "q?", "answer": "a", "root_url": "https://x.example/", "info": {"difficulty_level": "easy"}}
    tasks = tmp_path / "t.jsonl"
    tasks.write_text(json.dumps(line) + "\n")
    code = doctor.main([f"--config={PAPER}:v5p-32", f"--config.webwalker.train_file={tasks}",
                        "--config.model.checkpoint="])
    out = capsys.readouterr().out
    assert code == 1 and SECRET not in out
    assert "  DEEPSEEK_API_KEY: set  [extract.endpoint.api_key_env, webwalker.summarizer.api_key_env, " \
           "webwalker.judge_endpoint.api_key_env]" in out
    assert "  SERPER_API_KEY: NOT SET  [webwalker.search_api_key_env]" in out
    assert "  experience writer (extract.writer='llm'): https://api.deepseek.com/v1 model deepseek-chat" in out
    assert "  search tool (Serper): https://google.serper.dev  [webwalker.search_base_url]" in out
    problems = out.split("problems:\n", 1)[1].splitlines()
    assert problems == [
        "  config.mesh: mesh: data*fsdp*tensor = 2*8*1 = 16 but 8 devices are available",
        "  config.webwalker.eval_file='data/webwalkerqa/eval.jsonl': no such file",
        "  $SERPER_API_KEY is not set (webwalker.search_api_key_env)",
        "  $JINA_API_KEY is not set (webwalker.visit_api_key_env)",
    ]


def test_the_8xh100_layout_fits_eight_devices(capsys, monkeypatch):
    for name in ("DEEPSEEK_API_KEY", "SERPER_API_KEY", "JINA_API_KEY"):
        monkeypatch.setenv(name, SECRET)
    doctor.main([f"--config={PAPER}:8xh100"])
    out = capsys.readouterr().out
    assert "mesh data x fsdp x tensor = 1 x 8 x 1 on 8 of 8 devices" in out and SECRET not in out
    assert "NOT SET" not in out


@pytest.mark.parametrize("argv, message", [
    (["--config=configs/loop_tiny.py", "--config.bogus=1"], "expint doctor: config.bogus: unknown key"),
    (["--verbose"], "expint doctor: unknown argument '--verbose'"),
])
def test_a_bad_command_line_is_one_line_with_status_2(capsys, argv, message):
    assert doctor.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and len(err.splitlines()) == 1
