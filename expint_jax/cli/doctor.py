"""``expint doctor``: what this machine has and what a config needs, before ``expint run``.

    expint doctor                                          # versions, devices, multi-host set-up
    expint doctor --config=configs/paper/qwen3_4b.py:v5p-8 [--config.KEY=VALUE ...]

Prints, one fact a line: package versions; the devices JAX sees (as ``expint run`` sees them: the
CLI starts multi-host JAX first where the environment says so) and the process's place among the
processes; which multi-host variables are set. With a config also: the mesh it asks for and
whether these devices form it, the model checkpoint, the task files, every endpoint it calls, and
every environment variable it reads an API key from, each marked ``set`` or ``NOT SET``.

Secrets: environment variables are shown by name only, never their values (not even in part).

Exit status: 0 when ready (no config given, or ``check_config`` passes and the mesh fits),
1 when something is missing (every problem is listed, not just the first), 2 when the command
line or the config file does not parse (one line, like every command).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import platform
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

USAGE = __doc__
PACKAGES = ("expint-jax", "jax", "jaxlib", "libtpu", "jax-cuda12-plugin", "flax", "optax", "orbax-checkpoint",
            "grain", "ml-collections", "transformers", "numpy")
# Read by expint_jax.parallel.distributed (and the cluster launchers JAX knows), the deadlines by
# expint_jax.parallel.coordination.
MULTIHOST_VARIABLES = ("EXPINT_COORDINATOR", "EXPINT_NUM_PROCESSES", "EXPINT_PROCESS_ID", "SLURM_NTASKS",
                       "SLURM_PROCID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "EXPINT_WAIT_TIMEOUT_S",
                       "EXPINT_START_TIMEOUT_S")


@dataclasses.dataclass(frozen=True)
class EndpointUse:
    """A network service a config calls: what for, the config key that sets it, where."""

    role: str
    key: str
    base_url: str
    model: str = ""


def versions() -> list[tuple[str, str]]:
    found = []
    for package in PACKAGES:
        try:
            found.append((package, importlib.metadata.version(package)))
        except importlib.metadata.PackageNotFoundError:
            found.append((package, "not installed"))
    return [("python", platform.python_version()), *found]


def device_lines() -> list[str]:
    import jax

    devices = jax.devices()
    kinds = Counter(d.device_kind for d in devices)
    lines = [f"backend {jax.default_backend()}: {len(devices)} devices ({jax.local_device_count()} local) "
             f"in process {jax.process_index()} of {jax.process_count()}"]
    lines += [f"{count} x {kind}" for kind, count in kinds.items()]
    limit = _memory_limit(jax.local_devices()[0])
    if limit:
        lines.append(f"memory per device: {limit / 2**30:.1f} GiB")
    return lines


def _memory_limit(device: Any) -> int | None:
    try:
        stats = device.memory_stats()
    except Exception:  # not every backend reports memory (CPU does not)
        return None
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def multihost_lines(environ: Mapping[str, str]) -> list[str]:
    return [f"{name}: {'set' if environ.get(name) else 'not set'}" for name in MULTIHOST_VARIABLES]


def endpoints_of(config: Any) -> list[EndpointUse]:
    """Every service ``config`` (a ``LoopConfig``) calls, in the order the loop calls them."""
    uses = []
    e = config.extract.endpoint
    for role, used in (("experience writer (extract.writer='llm')", config.extract.writer == "llm"),
                       ("step-wise selector (injection.selector='llm')", config.injection.selector == "llm")):
        if used:
            uses.append(EndpointUse(role, "extract.endpoint", e.base_url, e.model))
    if config.env == "webwalker":
        w = config.webwalker
        uses.append(EndpointUse("search tool (Serper)", "webwalker.search_base_url", w.search_base_url))
        uses.append(EndpointUse("visit tool (Jina)", "webwalker.visit_base_url", w.visit_base_url))
        if w.summarizer.base_url:
            uses.append(EndpointUse("page summarizer", "webwalker.summarizer", w.summarizer.base_url,
                                    w.summarizer.model))
        if w.judge == "llm":
            uses.append(EndpointUse("judge (webwalker.judge='llm')", "webwalker.judge_endpoint",
                                    w.judge_endpoint.base_url, w.judge_endpoint.model))
    return uses


def policy_lines(policy: Any) -> list[str]:
    """Who acts; for a served policy, the start command and the names (never the values) of the
    variables set for the server process."""
    if policy.backend != "server":
        return [f"policy: {policy.backend} backend"]
    s = policy.server
    names = ", ".join(item.split("=", 1)[0] for item in s.env) or "none"
    return ["policy: served for each stage it acts in  [policy.server]",
            f"  command: {s.command}", f"  host {s.host}, port {s.port or 'free'}, model name {s.model_name!r}, "
            f"server environment variables: {names}"]


def config_report(config: Any, environ: Mapping[str, str], device_count: int) -> tuple[list[str], list[str]]:
    """``(lines, problems)`` for a bound ``LoopConfig`` on ``device_count`` devices."""
    from expint_jax.config import ConfigError
    from expint_jax.loop.config import check_config, required_env_vars

    lines: list[str] = [f"config {config.name!r}: env {config.env}, {config.iterations} iterations, "
                        f"runs under {config.runs_dir}/{config.name}"]
    problems: list[str] = []
    usable = config.mesh.devices or device_count
    try:
        data, fsdp, tensor = config.mesh.resolve(usable)
        lines.append(f"mesh data x fsdp x tensor = {data} x {fsdp} x {tensor} on {usable} of {device_count} devices")
    except ValueError as e:
        problems.append(f"config.mesh: {e}")
    if config.mesh.devices > device_count:
        problems.append(f"config.mesh.devices={config.mesh.devices} but {device_count} devices are available")
    lines.append(f"model: {config.model.checkpoint or 'the tiny random Qwen3'} "
                 f"({config.model.param_dtype} weights, {config.model.compute_dtype} compute)")
    lines += policy_lines(config.policy)
    if config.env == "webwalker":
        for key in ("train_file", "eval_file"):
            path = getattr(config.webwalker, key)
            if path:
                found = os.path.isfile(path)
                lines.append(f"task file webwalker.{key}: {path} ({'found' if found else 'MISSING'})")
                if not found:
                    problems.append(f"config.webwalker.{key}={path!r}: no such file")
    uses = endpoints_of(config)
    lines.append("endpoints:" if uses else "endpoints: none (runs offline)")
    lines += [f"  {u.role}: {u.base_url or '(no base_url)'}{f' model {u.model}' if u.model else ''}  [{u.key}]"
              for u in uses]
    needed = required_env_vars(config)
    by_name: dict[str, list[str]] = {}
    for key, name in needed.items():
        by_name.setdefault(name, []).append(key)
    lines.append("API keys (environment variables, names only):" if by_name else "API keys: none needed")
    for name, keys in by_name.items():
        present = bool(environ.get(name, "").strip())
        lines.append(f"  {name}: {'set' if present else 'NOT SET'}  [{', '.join(keys)}]")
        if not present:
            problems.append(f"${name} is not set ({', '.join(keys)})")
    # The rest of the start-up checks, with the keys listed above taken as given (a placeholder
    # that is never shown), so that a missing key does not hide the next problem.
    assumed = {**environ, **{name: "placeholder" for name in by_name}}
    try:
        check_config(config, environ=assumed)
    except ConfigError as e:
        if str(e) not in problems:
            problems.append(str(e))
    return lines, problems


def _load(argv: Sequence[str]) -> Any:
    from expint_jax.cli.run import DEFAULT_CONFIG
    from expint_jax.config import bind, parse_command_line
    from expint_jax.loop.config import LoopConfig

    return bind(LoopConfig, parse_command_line("expint doctor", list(argv), DEFAULT_CONFIG))


def main(argv: list[str] | None = None) -> int:
    from expint_jax.cli import errors
    from expint_jax.config import ConfigError

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    unknown = [a for a in argv if not a.startswith("--config")]
    if unknown:
        return errors.refuse("expint doctor", ValueError(f"unknown argument {unknown[0]!r}; give --config=FILE "
                                                         "and --config.KEY=VALUE overrides, or nothing"))
    config = None
    if argv:
        try:
            config = _load(argv)
        except (ConfigError, ValueError) as e:
            return errors.refuse("expint doctor", e)
    import jax

    print("versions:")
    for package, version in versions():
        print(f"  {package}: {version}")
    print("devices:")
    for line in device_lines():
        print(f"  {line}")
    print("multi-host (jax.distributed starts when these say several processes take part):")
    for line in multihost_lines(os.environ):
        print(f"  {line}")
    if config is None:
        return 0
    lines, problems = config_report(config, os.environ, len(jax.devices()))
    for line in lines:
        print(line)
    if problems:
        print(f"{len(problems)} problem{'s' if len(problems) > 1 else ''}:")
        for problem in problems:
            print(f"  {problem}")
        return 1
    print("ready: expint run with this config should start")
    return 0
