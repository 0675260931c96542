"""The copy probe: can a network copy from its context what acting on SimWeb needs?

``copy_probe(backend, config, count)`` (``expint organism probe --checkpoint DIR``) asks the network
for the first ``count`` drills (``organism.drills``) of a world it never trained on, greedily, and
counts exact replies per kind: ``link`` (open a named link: find the title, copy its URL), ``fact``
(copy a fact's value), ``repeat`` (copy link lines verbatim) and, when the config asks for them,
``search`` (open a named page out of search results). It is cheap (one batched call,
no tools) and answers the question the gate cannot separate: a network that cannot copy a URL
fails the gate with and without experience alike. It measures the bootstrap's drill phase
directly; after the later phases it measures whether the skill survived, in a format the agent
never uses, so read it as a lower bound there.
"""

from __future__ import annotations

import dataclasses

from expint_jax.organism.drills import DrillConfig, drills
from expint_jax.records import SamplingParams

KINDS = ("link", "fact", "repeat", "search")


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    exact: dict[str, int]  # per kind: replies equal to the drill's
    total: dict[str, int]
    examples: tuple[tuple[str, str], ...]  # (wanted, got) for the first few misses

    def rate(self, kind: str) -> float:
        return self.exact[kind] / self.total[kind] if self.total[kind] else float("nan")

    def to_json(self) -> dict:
        return {"exact": self.exact, "total": self.total, "examples": [list(e) for e in self.examples]}


def copy_probe(backend, config: DrillConfig, count: int = 64, max_tokens: int = 160) -> ProbeResult:
    if count < 1:
        raise ValueError(f"copy_probe: count must be >= 1, got {count}")
    probes = drills(config)[:count]
    replies = backend.chat([list(t.messages[:1]) for t in probes], SamplingParams(temperature=0.0,
                                                                                   max_tokens=max_tokens))
    exact, total = dict.fromkeys(KINDS, 0), dict.fromkeys(KINDS, 0)
    misses = []
    for drill, reply in zip(probes, replies, strict=True):
        kind, wanted, got = drill.metadata["drill"], drill.messages[1].content.strip(), reply.text.strip()
        total[kind] += 1
        exact[kind] += got == wanted
        if got != wanted and len(misses) < 3:
            misses.append((wanted, got))
    return ProbeResult(exact, total, tuple(misses))


def format_probe(result: ProbeResult, where: str) -> str:
    lines = [f"{where}: copy probe, greedy, exact replies"]
    lines += [f"  {kind}: {result.exact[kind]}/{result.total[kind]}" for kind in KINDS if result.total[kind]]
    for wanted, got in result.examples:
        lines += [f"  wanted: {' '.join(wanted.split())}", f"  got:    {' '.join(got.split())}"]
    return "\n".join(lines)
