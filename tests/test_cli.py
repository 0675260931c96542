"""The ``expint`` dispatcher and the ``check-model`` command on a sharded mesh."""

from expint_jax import cli


def test_help_lists_commands(capsys):
    assert cli.main(["--help"]) == 0
    assert "check-model" in capsys.readouterr().out


def test_unknown_command_is_an_error(capsys):
    assert cli.main(["train-everything"]) == 2
    assert "unknown command 'train-everything'" in capsys.readouterr().err


def test_check_model_on_a_2x2x2_mesh_reports_shardings_and_parity(capsys):
    assert cli.main(["check-model", "--mesh", "2,2,2", "--tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2}" in out
    assert "P(None, 'fsdp', 'tensor', None)" in out  # q_proj
    assert "max |logit diff|" in out and out.rstrip().endswith("OK")
