"""``write_report(run_dir)``: the loop's results as a table, plots and TensorBoard scalars.

Read from the published stages only (``iter_<k>/<stage>/done.json`` and their files), so the
report can be rebuilt at any time (``expint report RUN_DIR``) and never shows a half-done stage:

  * ``report.md``: one row per policy π_j (j = 0: the base, from ``iter_000/base_eval``; j = k+1:
    the result of iteration k, from ``iter_<k>/eval``) × evaluation mode, with the accuracy
    (Avg. Pass@n), pass@n, best single pass, premature-answer rate, assistant turns, tool calls,
    assistant tokens, the accuracy delta against π_0 in the same mode and each round's Pass@1;
    then one row per iteration with the pool (size, diff, granularity shares), the acceptance
    rate, the held-out KL before/after training and the training status (e.g. a kept policy and
    why); then, for a SimWeb run, what the testbed builds in and what is learned
    (``describe_testbed``: the scripted agent's designed effects, or the model organism's record).
  * ``plots/``: ``accuracy.png`` (internalized = mode none vs in-context modes across policies,
    the base as a dashed line, as in the paper's figures), ``assistant_turns.png``,
    ``premature_answers.png``, ``acceptance.png``, ``pool.png`` (size and granularity shares).
  * ``tensorboard/``: every figure above as scalars ``eval/<mode>/<metric>`` and
    ``iteration/<name>`` at step j (rewritten whole each time).
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from expint_jax import storage

MODES = ("none", "global", "stepwise")
EVAL_COLUMNS = (("accuracy", "acc"), ("pass_at_n", "pass@n"), ("best_single", "best1"),
                ("premature_answer_rate", "premature"), ("mean_assistant_turns", "turns"),
                ("mean_tool_calls", "tools"), ("mean_assistant_tokens", "tokens"))


def _published(run_dir: Path, k: int, stage: str) -> Path | None:
    folder = run_dir / f"iter_{k:03d}" / stage
    return folder if (folder / "done.json").exists() else None


def _iterations(run_dir: Path) -> list[int]:
    found = []
    for path in run_dir.glob("iter_*"):
        if path.is_dir() and path.name[5:].isdigit():
            found.append(int(path.name[5:]))
    return sorted(found)


def collect(run_dir: str | Path) -> dict[str, Any]:
    """Everything the report shows: ``{"policies": {j: eval.json}, "iterations": {k: facts}}``."""
    run_dir = Path(run_dir)
    policies: dict[int, dict[str, Any]] = {}
    iterations: dict[int, dict[str, Any]] = {}
    base = _published(run_dir, 0, "base_eval")
    if base is not None:
        policies[0] = storage.read_json(base / "eval.json")
    for k in _iterations(run_dir):
        facts: dict[str, Any] = {}
        for stage in ("extract", "data", "train"):
            folder = _published(run_dir, k, stage)
            if folder is not None:
                facts[stage] = storage.read_json(folder / "done.json")["summary"]
        evaluated = _published(run_dir, k, "eval")
        if evaluated is not None:
            policies[k + 1] = storage.read_json(evaluated / "eval.json")
        if facts:
            iterations[k] = facts
    stopped = run_dir / "stopped.json"
    config = run_dir / "config.json"
    return {"policies": policies, "iterations": iterations,
            "stopped": storage.read_json(stopped) if stopped.exists() else None,
            "config": storage.read_json(config) if config.exists() else None}


def describe_testbed(config: Mapping[str, Any] | None) -> str:
    """What a SimWeb run's results can and cannot show ("" for other environments)."""
    if not config or config.get("env", "simweb") != "simweb":
        return ""
    from expint_jax.rollout.envs.simweb.sensitivity import Sensitivity, designed_effects

    policy = config.get("policy", {})
    lines = ["## What this testbed builds in", ""]
    if policy.get("backend") == "reference":
        sensitive = policy.get("reference_sensitive", True)
        lines.append(f"Every rollout is SimWeb's scripted agent (mistake rate {policy.get('reference_mistake_rate')}); "
                     "the network is trained and exported but never acts, so internalized accuracy cannot move. "
                     + ("Its response to experience in context is designed, not learned:" if sensitive
                        else "It ignores experience (`policy.reference_sensitive=False`)."))
        if sensitive:
            lines += ["", designed_effects(Sensitivity())]
        return "\n".join(lines) + "\n"
    checkpoint = Path(config.get("model", {}).get("checkpoint") or "")
    record = checkpoint / "organism.json" if str(checkpoint) else None
    if record is not None and record.is_file():
        made = storage.read_json(record)
        lines += [f"π_0 is the SimWeb model organism (`{checkpoint}`, made by `{' '.join(made.get('command', []))}`): "
                  "a small Qwen3 trained from scratch to imitate SimWeb's scripted agent under a mix of contexts.",
                  "", "* Designed in: the scripted agent it imitated, whose mistakes and whose response to lessons "
                  "in context are set by hand (below). The network saw those lessons in training, so its use of "
                  "them is learned imitation of a designed response (measured with `expint organism gate`).",
                  "* Not designed: everything that happens across iterations. No rule moves the network's behaviour "
                  "without lessons; internalization, its gains or its collapse, come from the distillation alone.",
                  "", designed_effects(Sensitivity())]
        return "\n".join(lines) + "\n"
    return ""


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def _delta(value: float | None, base: float | None) -> str:
    if value is None or base is None:
        return "–"
    return f"{value - base:+.3f}"


def render_markdown(data: Mapping[str, Any], title: str) -> str:
    policies, iterations = data["policies"], data["iterations"]
    lines = [f"# {title}", "", "Policy π_0 is the base model; π_{k+1} is the result of iteration k (trained on E_k). "
             "Mode `none` is the internalized policy (no experience in context); `global` / `stepwise` put E_k in "
             "context (for π_0: E_0). Δ is against π_0 in the same mode. acc = Avg. Pass@n; best1 = the best "
             "round's Pass@1.", ""]
    header = ["policy", "mode", *(label for _, label in EVAL_COLUMNS), "Δacc", "Pass@1 per round"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    base = policies.get(0, {})
    for j in sorted(policies):
        for mode in MODES:
            metrics = policies[j].get(mode)
            if not isinstance(metrics, Mapping):
                continue
            if "skipped" in metrics:
                lines.append(f"| π_{j} | {mode} | skipped: {metrics['skipped']} |" + " |" * (len(header) - 3))
                continue
            base_acc = base.get(mode, {}).get("accuracy") if isinstance(base.get(mode), Mapping) else None
            rounds = metrics.get("per_sample_accuracy")
            cells = [f"π_{j}", mode, *(_fmt(metrics.get(name)) for name, _ in EVAL_COLUMNS),
                     _delta(metrics.get("accuracy"), base_acc),
                     " / ".join(_fmt(r, 2) for r in rounds) if rounds else "–"]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Iterations", "",
              "| k | pool | pool diff | url / number / entity / strategy share | informative groups | acceptance | "
              "held-out KL before → after | training |", "|---|---|---|---|---|---|---|---|"]
    for k in sorted(iterations):
        facts = iterations[k]
        extract, data_facts, trained = facts.get("extract", {}), facts.get("data", {}), facts.get("train", {})
        g = extract.get("granularity_report") or {}
        shares = " / ".join(_fmt(g.get(name), 2) for name in ("url_share", "number_share", "entity_share",
                                                               "strategy_share")) if g else "–"
        kl = f"{_fmt(trained.get('kl_before'), 4)} → {_fmt(trained.get('kl_after'), 4)}" if trained else "–"
        status = trained.get("status", "–")
        if trained.get("reason"):
            status += f" ({trained['reason']})"
        acceptance = data_facts.get("acceptance_rate")
        if acceptance is None and data_facts:
            acceptance = data_facts.get("empty") or "n/a (on-policy)"
        lines.append(f"| {k} | {_fmt(extract.get('pool_size'))} | {extract.get('diff_vs_previous', '–')} | {shares} | "
                     f"{_fmt(extract.get('informative_groups'))} | {_fmt(acceptance)} | {kl} | {status} |")
    if data.get("stopped"):
        lines += ["", f"**The loop stopped at {data['stopped']['stage']}**: {data['stopped']['reason']} "
                      "(on_empty=stop)."]
    note = describe_testbed(data.get("config"))
    if note:
        lines += ["", note]
    lines += ["", "Plots: `plots/accuracy.png`, `plots/assistant_turns.png`, `plots/premature_answers.png`, "
                  "`plots/acceptance.png`, `plots/pool.png`; TensorBoard: `tensorboard --logdir tensorboard`.", ""]
    return "\n".join(lines)


def _series(policies: Mapping[int, Any], mode: str, metric: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for j in sorted(policies):
        metrics = policies[j].get(mode)
        if isinstance(metrics, Mapping) and metrics.get(metric) is not None:
            xs.append(j)
            ys.append(float(metrics[metric]))
    return xs, ys


def write_plots(data: Mapping[str, Any], directory: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    directory.mkdir(parents=True, exist_ok=True)
    policies, iterations = data["policies"], data["iterations"]
    written = []
    labels = {"none": "internalized (no experience)", "global": "in context: global", "stepwise": "in context: stepwise"}
    for metric, name, ylabel in (("accuracy", "accuracy.png", "accuracy (Avg. Pass@n)"),
                                 ("mean_assistant_turns", "assistant_turns.png", "assistant turns per rollout"),
                                 ("premature_answer_rate", "premature_answers.png", "answered with no tool call")):
        fig, ax = plt.subplots(figsize=(6, 3.8))
        for mode in MODES:
            xs, ys = _series(policies, mode, metric)
            if xs:
                ax.plot(xs, ys, "o-", label=labels[mode])
        base = policies.get(0, {}).get("none")
        if isinstance(base, Mapping) and base.get(metric) is not None:
            ax.axhline(float(base[metric]), color="gray", ls="--", label="base π_0 (no experience)")
        ax.set_xlabel("policy π_j (j = iterations of internalization)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(directory / name, dpi=100)
        plt.close(fig)
        written.append(directory / name)
    ks = sorted(iterations)
    fig, ax = plt.subplots(figsize=(6, 3.8))
    rates = [(k, iterations[k].get("data", {}).get("acceptance_rate")) for k in ks]
    rates = [(k, r) for k, r in rates if r is not None]
    if rates:
        ax.bar([k for k, _ in rates], [r for _, r in rates])
    ax.set_xlabel("iteration k")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("teacher acceptance rate")
    fig.tight_layout()
    fig.savefig(directory / "acceptance.png", dpi=100)
    plt.close(fig)
    written.append(directory / "acceptance.png")
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.8))
    sizes = [(k, iterations[k].get("extract", {}).get("pool_size")) for k in ks]
    sizes = [(k, s) for k, s in sizes if s is not None]
    if sizes:
        left.plot([k for k, _ in sizes], [s for _, s in sizes], "o-")
    left.set_xlabel("iteration k")
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.set_ylabel("pool size |E_k|")
    for share in ("url_share", "number_share", "entity_share", "strategy_share"):
        points = [(k, iterations[k].get("extract", {}).get("granularity_report", {}).get(share)) for k in ks]
        points = [(k, v) for k, v in points if v is not None]
        if points:
            right.plot([k for k, _ in points], [v for _, v in points], "o-", label=share)
    right.set_xlabel("iteration k")
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.set_ylabel("share of pool items")
    if right.get_legend_handles_labels()[0]:
        right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(directory / "pool.png", dpi=100)
    plt.close(fig)
    written.append(directory / "pool.png")
    return written


def write_scalars(data: Mapping[str, Any], directory: Path) -> None:
    from tensorboardX import SummaryWriter

    shutil.rmtree(directory, ignore_errors=True)
    with SummaryWriter(str(directory)) as writer:
        for j, result in sorted(data["policies"].items()):
            for mode in MODES:
                metrics = result.get(mode)
                if not isinstance(metrics, Mapping):
                    continue
                for name, _ in EVAL_COLUMNS:
                    if metrics.get(name) is not None:
                        writer.add_scalar(f"eval/{mode}/{name}", float(metrics[name]), j)
        for k, facts in sorted(data["iterations"].items()):
            values = {"pool_size": facts.get("extract", {}).get("pool_size"),
                      "acceptance_rate": facts.get("data", {}).get("acceptance_rate"),
                      "heldout_kl_before": facts.get("train", {}).get("kl_before"),
                      "heldout_kl_after": facts.get("train", {}).get("kl_after"),
                      **{share: facts.get("extract", {}).get("granularity_report", {}).get(share)
                         for share in ("url_share", "number_share", "entity_share", "strategy_share")}}
            for name, value in values.items():
                if isinstance(value, (int, float)):
                    writer.add_scalar(f"iteration/{name}", float(value), k)


def write_report(run_dir: str | Path) -> Path:
    """Writes ``report.md``, ``plots/`` and ``tensorboard/`` under ``run_dir``; returns the report's path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    data = collect(run_dir)
    write_plots(data, run_dir / "plots")
    write_scalars(data, run_dir / "tensorboard")
    path = run_dir / "report.md"
    storage.write_text(path, render_markdown(data, f"expint run: {run_dir.name}"))
    return path
