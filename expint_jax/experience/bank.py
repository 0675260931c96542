"""The experience bank: immutable pools of lessons, their identity across edits, and their files.

Contract:
  * An ``ExperiencePool`` is an ordered tuple of ``ExperienceItem``s with unique display ids and
    unique uids. Every edit (``add``, ``update``, ``delete``, ``renumbered``, ``truncated``)
    returns a new pool; nothing mutates.
  * Identity. ``id`` is the display id the model sees (``G0``, ``G1``, ...); it changes whenever
    the pool is renumbered. ``uid`` is the stable identity: assigned once when an item is added,
    kept by ``update`` and by renumbering, never reused for another text within one pool. A new
    uid is ``"<iteration>-<hash of the text>"`` (``x`` when the iteration is unknown), suffixed
    ``-2``, ``-3``... on a clash, so a replayed extraction assigns the same uids. ``diff_pools``
    matches items by uid: same uid and text -> unchanged, same uid and new text -> updated.
    Pools imported from the release's flat format have no uids; theirs are derived from the text,
    so between two flat pools an edited item shows up as one deletion plus one addition.
  * Provenance: ``iteration`` is the iteration whose extraction wrote the item's current text
    (``None`` when unknown), ``writer`` what wrote it (``stages.WRITER`` for the LLM pipeline,
    ``rollout.envs.simweb.writer.WRITER`` for SimWeb's deterministic writer, ``None`` when unknown, e.g. an
    imported pool), ``source_task_ids`` the training tasks whose rollouts led to it.
  * Files: our JSONL (one item object per line, ``*.jsonl``) keeps everything; the release's flat
    ``{"G0": "text", ...}`` JSON (``*.json``, see ``release_format``) keeps ids and texts only.
    Both are written atomically; reading either validates it and names the file, line and key.
  * ``write_pool_files`` writes a pool in both formats with its granularity report; where the
    files of each iteration live is the loop's business (``expint_jax.loop.layout``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from expint_jax import storage
from expint_jax.experience import granularity, release_format

Granularity = Literal["principle", "instance"]
GRANULARITIES: tuple[str, ...] = ("principle", "instance")
DEFAULT_MAX_POOL_SIZE = 50

_DISPLAY_ID = re.compile(r"G(\d+)")


class PoolError(ValueError):
    """A pool or item is malformed; the message names the file, line or key."""


def check_granularity(granularity: str, where: str = "granularity") -> str:
    if granularity not in GRANULARITIES:
        raise PoolError(f"{where}: {granularity!r} is not one of {GRANULARITIES}")
    return granularity


def display_id(index: int) -> str:
    return f"G{index}"


@dataclasses.dataclass(frozen=True)
class ExperienceItem:
    id: str
    text: str
    granularity: str
    uid: str
    iteration: int | None = None
    source_task_ids: tuple[str, ...] = ()
    writer: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id.strip():
            raise PoolError(f"experience item id must be a non-empty string, got {self.id!r}")
        if not isinstance(self.text, str) or not self.text.strip():
            raise PoolError(f"experience item {self.id}: text must be a non-empty string, got {self.text!r}")
        if not isinstance(self.uid, str) or not self.uid:
            raise PoolError(f"experience item {self.id}: uid must be a non-empty string, got {self.uid!r}")
        check_granularity(self.granularity, f"experience item {self.id}")

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "text": self.text,
            "granularity": self.granularity,
            "uid": self.uid,
            "iteration": self.iteration,
            "source_task_ids": list(self.source_task_ids),
            "writer": self.writer,
        }

    @classmethod
    def from_json(cls, obj: Any, where: str) -> ExperienceItem:
        if not isinstance(obj, Mapping):
            raise PoolError(f"{where}: expected an object, got {type(obj).__name__}")
        for key, types in (("id", str), ("text", str), ("granularity", str), ("uid", str)):
            if not isinstance(obj.get(key), types):
                raise PoolError(f"{where}: key {key!r} must be a string, got {obj.get(key)!r}")
        iteration = obj.get("iteration")
        if iteration is not None and (not isinstance(iteration, int) or isinstance(iteration, bool)):
            raise PoolError(f"{where}: key 'iteration' must be an integer or null, got {iteration!r}")
        sources = obj.get("source_task_ids", [])
        if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
            raise PoolError(f"{where}: key 'source_task_ids' must be a list of strings")
        writer = obj.get("writer")  # absent in files written before it existed
        if writer is not None and not isinstance(writer, str):
            raise PoolError(f"{where}: key 'writer' must be a string or null, got {writer!r}")
        try:
            return cls(obj["id"], obj["text"], obj["granularity"], obj["uid"], iteration, tuple(sources), writer)
        except PoolError as e:
            raise PoolError(f"{where}: {e}") from None


def text_key(text: str) -> str:
    """Identity of a lesson's wording: case, spacing and punctuation do not count (duplicate detection)."""
    return " ".join(re.sub(r"[^\w]+", " ", text.casefold()).split())


def new_uid(text: str, iteration: int | None, taken: Iterable[str]) -> str:
    """A deterministic uid for a newly added text, distinct from every uid in ``taken``."""
    digest = hashlib.sha1(" ".join(text.split()).encode("utf-8")).hexdigest()[:10]
    base = f"{'x' if iteration is None else iteration}-{digest}"
    taken = set(taken)
    uid, n = base, 1
    while uid in taken:
        n += 1
        uid = f"{base}-{n}"
    return uid


@dataclasses.dataclass(frozen=True)
class ExperiencePool:
    items: tuple[ExperienceItem, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "items", tuple(self.items))
        for attribute in ("id", "uid"):
            seen: set[str] = set()
            for item in self.items:
                value = getattr(item, attribute)
                if value in seen:
                    raise PoolError(f"pool has two items with {attribute} {value!r}")
                seen.add(value)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[ExperienceItem]:
        return iter(self.items)

    def __contains__(self, item_id: object) -> bool:
        return any(item.id == item_id for item in self.items)

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(item.id for item in self.items)

    def as_mapping(self) -> dict[str, str]:
        """id -> text, in pool order: the view the selectors and the injection code use."""
        return {item.id: item.text for item in self.items}

    def get(self, item_id: str) -> ExperienceItem:
        for item in self.items:
            if item.id == item_id:
                return item
        raise KeyError(f"no experience item with id {item_id!r} (pool ids: {', '.join(self.ids) or 'none'})")

    def add(self, text: str, *, granularity: str, iteration: int | None = None,
            source_task_ids: Iterable[str] = (), writer: str | None = None) -> ExperiencePool:
        """Appends an item under the next free ``G<n>`` id."""
        used = [int(m.group(1)) for m in (_DISPLAY_ID.fullmatch(i) for i in self.ids) if m]
        item = ExperienceItem(
            id=display_id(max(used, default=-1) + 1),
            text=text,
            granularity=granularity,
            uid=new_uid(text, iteration, (i.uid for i in self.items)),
            iteration=iteration,
            source_task_ids=tuple(dict.fromkeys(source_task_ids)),
            writer=writer,
        )
        return ExperiencePool(self.items + (item,))

    def update(self, item_id: str, text: str, *, iteration: int | None = None,
               source_task_ids: Iterable[str] = (), writer: str | None = None) -> ExperiencePool:
        """Rewrites one item's text; uid kept, sources merged, ``iteration`` and ``writer`` the new text's."""
        old = self.get(item_id)
        sources = tuple(dict.fromkeys((*old.source_task_ids, *source_task_ids)))
        new = dataclasses.replace(old, text=text, iteration=iteration, source_task_ids=sources, writer=writer)
        return ExperiencePool(tuple(new if i.id == item_id else i for i in self.items))

    def delete(self, item_id: str) -> ExperiencePool:
        self.get(item_id)
        return ExperiencePool(tuple(i for i in self.items if i.id != item_id))

    def renumbered(self) -> ExperiencePool:
        """Display ids ``G0..G{n-1}`` in pool order; uids unchanged."""
        return ExperiencePool(tuple(dataclasses.replace(item, id=display_id(k)) for k, item in enumerate(self.items)))

    def truncated(self, max_size: int, *, previous: ExperiencePool | None = None) -> ExperiencePool:
        """At most ``max_size`` items, kept in pool order: the cap without an LLM to merge lessons.

        Without ``previous``: the first ``max_size`` items. With ``previous`` (the pool this one
        was edited from): the items the edit added or rewrote (``diff_pools(previous, self)``)
        are kept first, in pool order, then the unchanged ones. The unchanged lessons were in
        ``previous``, which the loop has already internalized into the weights; keeping them first
        would freeze a full pool and discard every new lesson the current policy still lacks.
        """
        if max_size < 0:
            raise PoolError(f"max_size must be >= 0, got {max_size}")
        if previous is None:
            return ExperiencePool(self.items[:max_size])
        diff = diff_pools(previous, self)
        fresh = {item.uid for item in diff.added} | {after.uid for _, after in diff.updated}
        ranked = sorted(range(len(self.items)), key=lambda k: (self.items[k].uid not in fresh, k))
        kept = sorted(ranked[:max_size])
        return ExperiencePool(tuple(self.items[k] for k in kept))

    def rewritten(self, entries: Iterable[tuple[str | None, str]], *, granularity: str,
                  iteration: int | None = None, writer: str | None = None) -> ExperiencePool:
        """A new pool from ``(continued id or None, text)`` pairs, numbered ``G0..`` in that order.

        The first entry naming an id of this pool continues that item (uid and sources kept;
        ``iteration`` and ``writer`` updated if the text changed). Every other entry is a new item.
        """
        remaining = {item.id: item for item in self.items}
        taken = [item.uid for item in self.items]
        items: list[ExperienceItem] = []
        for source, text in entries:
            old = remaining.pop(source, None) if source is not None else None
            if old is None:
                uid = new_uid(text, iteration, taken)
                taken.append(uid)
                items.append(ExperienceItem(display_id(len(items)), text, granularity, uid, iteration, writer=writer))
            else:
                changed = {"text": text, "iteration": iteration, "writer": writer} if old.text != text else {}
                items.append(dataclasses.replace(old, id=display_id(len(items)), **changed))
        return ExperiencePool(tuple(items))

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, str], *, granularity: str,
                     iteration: int | None = None) -> ExperiencePool:
        """A pool from ``{id: text}`` (e.g. the release's flat format), keeping ids and order."""
        check_granularity(granularity)
        items: list[ExperienceItem] = []
        for item_id, text in mapping.items():
            uid = new_uid(text, iteration, (i.uid for i in items))
            items.append(ExperienceItem(item_id, text, granularity, uid, iteration))
        return cls(tuple(items))


@dataclasses.dataclass(frozen=True)
class PoolDiff:
    """What changed between two pools, matched by uid (display ids may have been renumbered)."""

    added: tuple[ExperienceItem, ...]
    updated: tuple[tuple[ExperienceItem, ExperienceItem], ...]  # (before, after)
    deleted: tuple[ExperienceItem, ...]
    unchanged: tuple[ExperienceItem, ...]  # as they are in the newer pool

    def to_json(self) -> dict[str, Any]:
        return {
            "added": [i.to_json() for i in self.added],
            "updated": [{"before": b.to_json(), "after": a.to_json()} for b, a in self.updated],
            "deleted": [i.to_json() for i in self.deleted],
            "unchanged": [i.uid for i in self.unchanged],
        }

    def summary(self) -> str:
        return (f"+{len(self.added)} added, ~{len(self.updated)} updated, -{len(self.deleted)} deleted, "
                f"{len(self.unchanged)} unchanged")


def diff_pools(before: ExperiencePool, after: ExperiencePool) -> PoolDiff:
    old = {item.uid: item for item in before}
    new_uids = {item.uid for item in after}
    added, updated, unchanged = [], [], []
    for item in after:
        previous = old.get(item.uid)
        if previous is None:
            added.append(item)
        elif previous.text != item.text:
            updated.append((previous, item))
        else:
            unchanged.append(item)
    deleted = tuple(item for item in before if item.uid not in new_uids)
    return PoolDiff(tuple(added), tuple(updated), deleted, tuple(unchanged))


def write_pool(path: str | Path, pool: ExperiencePool) -> None:
    """Writes our JSONL (``*.jsonl``) or the release's flat JSON (``*.json``), atomically."""
    path = Path(path)
    if path.suffix == ".jsonl":
        storage.write_jsonl(path, (item.to_json() for item in pool))
    elif path.suffix == ".json":
        storage.write_text(path, release_format.dump_release_pool(pool.as_mapping()))
    else:
        raise PoolError(f"{path}: a pool file must end in .jsonl (ours) or .json (the release's flat format)")


def read_pool(path: str | Path, *, granularity: str = "principle") -> ExperiencePool:
    """Reads either format; ``granularity`` labels the items of a flat ``*.json`` pool."""
    path = Path(path)
    if path.suffix == ".json":
        mapping = release_format.parse_release_pool(_read_text(path), where=str(path))
        return ExperiencePool.from_mapping(mapping, granularity=granularity)
    if path.suffix != ".jsonl":
        raise PoolError(f"{path}: a pool file must end in .jsonl (ours) or .json (the release's flat format)")
    items = []
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PoolError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        items.append(ExperienceItem.from_json(obj, where))
    try:
        return ExperiencePool(tuple(items))
    except PoolError as e:
        raise PoolError(f"{path}: {e}") from None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PoolError(f"{path}: pool file does not exist") from None


POOL_FILES = ("pool.jsonl", "pool.json", "granularity.json")


def write_pool_files(directory: str | Path, pool: ExperiencePool) -> Path:
    """Writes ``pool.jsonl`` (ours), ``pool.json`` (the release's flat format) and the pool's
    ``granularity.json`` report into ``directory``, each atomically; returns the ``pool.jsonl`` path.
    Each file is whole, but the set is not swapped as one: callers that need all-or-nothing write
    into a staging directory they publish afterwards (the loop's stages do)."""
    directory = Path(directory)
    write_pool(directory / "pool.json", pool)
    granularity.write_report(directory / "granularity.json", granularity.analyze_pool(pool))
    write_pool(directory / "pool.jsonl", pool)
    return directory / "pool.jsonl"
