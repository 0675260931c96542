"""One of the processes of ``tests/parallel/test_coordination.py``: ``Processes.leader_runs`` as the
loop uses it. Prints one JSON line with what this process saw."""

import json

from expint_jax.parallel import coordination, distributed


def main() -> None:
    distributed.initialize()
    processes = coordination.current()
    seen = {"index": processes.index, "count": processes.count}
    runs = []
    seen["value"] = processes.leader_runs("value", lambda: runs.append(1) or {"pool": ["G0", "G1"]})
    seen["ran"] = len(runs)

    def fail():
        raise ValueError("bad record at tasks.jsonl:3")

    try:
        processes.leader_runs("failing", fail)
    except Exception as error:
        seen["failing"] = f"{type(error).__name__}: {error}"
    # Process 0 takes another path: the others must stop waiting with an error naming both calls.
    try:
        processes.leader_runs("other" if processes.is_leader else "expected", lambda: None)
    except Exception as error:
        seen["desync"] = f"{type(error).__name__}: {error}"
    print(json.dumps(seen), flush=True)


if __name__ == "__main__":
    main()
