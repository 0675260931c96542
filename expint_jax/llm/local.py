"""``LocalEngine``: a ``ChatBackend`` that generates in process with our Qwen3 and the JAX sampler.

Contract:
  * ``chat(conversations, params)`` encodes each conversation with ``ChatFormat.encode_prompt``
    (the generation prompt appended; with ``enable_thinking=False`` it holds Qwen3's empty think
    block, which is not part of the returned text), groups them by sampling strategy, penalties
    and stop strings, sorts each group by the length of what must be prefilled (the prompt, less
    what the prefix cache holds) and then by prompt length, cuts it into micro-batches of at most
    ``max_batch_size``, and
    returns one ``Completion`` per conversation in input order.
  * Shapes: a micro-batch is left-padded to bucketed widths (``generation.Layout``) and has
    ``max_batch_size`` rows whenever its group has more conversations than that (the last one
    padded with inactive rows), else the group's size rounded up to a power of two (a call of
    one conversation does not pay for eight); either way a multiple of the mesh's batch shards.
    A stage of lockstep agent rollouts so hits one batch size (and powers of two below it in its
    last turns) and a handful of widths (``compile_counts`` tells how many programs were compiled).
  * Prefix cache (``prefix_cache_mib`` > 0; 512 MiB by default, 0 turns it off): the keys and
    values of recent prompts and their completions are kept (``sampler.prefix_cache``: at most
    that much memory, eviction rules there), and a prompt that starts with a kept sequence
    prefills only the rest: an agent's next turn re-feeds only the reply, the tool result and the
    experience block, and rollouts of a stage share their system prompt. Results do not depend on
    what the cache holds, up to floating-point reassociation (the same caveat as micro-batching).
    ``counters`` sums the work done (prompt, reused, prefilled and generated tokens).
  * ``Completion``: ``text`` without the eos token or stop string; ``finish_reason`` "stop" (eos
    or a stop string, ``stop_string`` names which) or "length"; ``token_ids``/``logprobs`` are the
    tokens of ``text`` and their log-probabilities under the unmodified model distribution.
    With ``SamplingParams.top_logprobs = k`` it also carries ``top_logprobs``: every generated id
    (eos and stop-string tokens included), and at each of them and one position past the last,
    the unmodified distribution's top-k log-probabilities and tail mass (``expint_jax.token_signal``).
  * A conversation that leaves no room in ``max_context`` gets ``finish_reason="length"`` and an
    ``error``; one that cannot be encoded gets ``finish_reason="error"``. The rest of the batch
    is unaffected. ``max_tokens`` is clipped to the room left in the context.
  * ``count_tokens(messages)`` is the length of the prompt ``chat`` would generate from (the chat
    template with the generation prompt, the real tokenizer), so a caller's context budget and
    the engine's agree to the token.
  * ``params`` is one ``SamplingParams`` or one per conversation (seeds and ``max_tokens`` may
    differ within a batch).
  * Seeds: with one ``SamplingParams`` and a seed, conversation i of a call samples from stream i
    of that seed; with one ``SamplingParams`` per conversation, its seed alone picks its stream,
    wherever it sits in the call. Either way results do not depend on micro-batching or on the
    other conversations. A missing seed is drawn fresh for every call.
  * Weights: ``set_params`` swaps parameter values of the same shapes and dtypes (placed on the
    current shardings), so the next call reuses the compiled prefill and decode; it empties the
    prefix cache (its keys and values belong to the old weights).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from expint_jax.models.chat import ChatFormat
from expint_jax.models.config import DTypePolicy
from expint_jax.models.hf import load_checkpoint
from expint_jax.models.qwen3 import Qwen3
from expint_jax.models.tokenizer import load_tokenizer
from expint_jax.parallel.rules import DEFAULT_RULES, LogicalRules, logical_to_spec
from expint_jax.records import Completion, Message, SamplingParams
from expint_jax.llm.base import BackendError, SamplingSpec, per_conversation
from expint_jax.llm.sampler import generation
from expint_jax.llm.sampler.generation import Generation, GenerationCounters, generate
from expint_jax.llm.sampler.prefix_cache import PAGE_TOKENS, PrefixCache
from expint_jax.llm.sampler.sampling import from_params, penalties_from_params
from expint_jax.llm.sampler.stops import TokenBytes

log = logging.getLogger(__name__)

# Memory the prefix cache may hold by default. The organism-sized Qwen3 (4 layers x 2 KV heads x
# 32 dims, fp32) takes 2 KiB a token: 262,144 tokens, a stage of ~128 SimWeb rollouts (~1,700 tokens
# each at the end, their system prompt shared). The arena grows on demand, so less is held
# while less is used.
DEFAULT_PREFIX_CACHE_MIB = 512.0


class LocalEngine:
    """Batched chat completion with a local model; see the module docstring for the contract."""

    def __init__(
        self,
        model: Qwen3,
        tokenizer: Any,
        *,
        mesh: jax.sharding.Mesh | None = None,
        max_batch_size: int = 8,
        max_context: int | None = None,
        enable_thinking: bool = True,
        prefix_cache_mib: float = DEFAULT_PREFIX_CACHE_MIB,
    ):
        if max_batch_size < 1:
            raise BackendError(f"LocalEngine: max_batch_size must be >= 1, got {max_batch_size}")
        config = model.config
        self.max_context = int(max_context or config.max_position_embeddings)
        if self.max_context < 2:
            raise BackendError(f"LocalEngine: max_context must be >= 2, got {self.max_context}")
        self.mesh = mesh
        self.max_batch_size = max_batch_size
        self.chat_format = ChatFormat(tokenizer, enable_thinking=enable_thinking)
        self.token_bytes = TokenBytes.from_tokenizer(tokenizer, config.vocab_size)
        self._graphdef, state = nnx.split(model)
        # Committed arrays from the start: parameters swapped in later are committed too (device_put),
        # and jit keys its cache on committedness.
        self._state = jax.device_put(state, jax.tree.map(lambda x: x.sharding, state))
        self._batch_divisor = _batch_divisor(mesh, model.rules)
        self._seeds = np.random.default_rng()
        if not prefix_cache_mib >= 0:
            raise BackendError(f"LocalEngine: prefix_cache_mib must be >= 0, got {prefix_cache_mib}")
        self.prefix_cache = None
        if prefix_cache_mib:
            tokens = int(prefix_cache_mib * 2**20) // PrefixCache.token_bytes(config, model.policy.compute)
            self.prefix_cache = PrefixCache(config, model.policy.compute, max(tokens, PAGE_TOKENS))
        self.counters = GenerationCounters()

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        *,
        mesh: jax.sharding.Mesh | None = None,
        policy: DTypePolicy | None = None,
        rules: LogicalRules = DEFAULT_RULES,
        tokenizer_path: str | Path | None = None,
        **kwargs: Any,
    ) -> LocalEngine:
        """Loads a Hugging Face Qwen3 directory; the tokenizer comes from ``tokenizer_path``, else
        from the checkpoint when it carries tokenizer files, else the offline Qwen3 tokenizer."""
        path = Path(path)
        model = load_checkpoint(path, mesh=mesh, rules=rules, policy=policy)
        if tokenizer_path is None and (path / "tokenizer.json").is_file():
            tokenizer_path = path
        log.info("LocalEngine: model from %s, tokenizer from %s", path, tokenizer_path or "the offline Qwen3 build")
        return cls(model, load_tokenizer(tokenizer_path), mesh=mesh, **kwargs)

    def with_thinking(self, enable_thinking: bool) -> LocalEngine:
        """This engine prompting in the other thinking mode: the same weights, compiled functions
        and settings, another chat format (``self`` when the mode is already the one asked for).
        ``set_params`` on one does not reach the other; they share the prefix cache, which every
        call binds to its own engine's weights (``PrefixCache.bind``)."""
        if enable_thinking == self.chat_format.enable_thinking:
            return self
        other = copy.copy(self)
        other.chat_format = ChatFormat(self.chat_format.tokenizer, enable_thinking=enable_thinking)
        return other

    @property
    def state(self) -> nnx.State:
        """The current parameters (as ``nnx.split`` returns them)."""
        return self._state

    @property
    def model(self) -> Qwen3:
        """A model holding the current parameters."""
        return nnx.merge(self._graphdef, self._state)

    def set_params(self, params: nnx.State | Qwen3) -> None:
        """Swaps in new weights (a model or its state); shapes and dtypes must match the current ones."""
        state = nnx.split(params)[1] if isinstance(params, nnx.Module) else params
        old, old_tree = jax.tree_util.tree_flatten_with_path(self._state)
        new, new_tree = jax.tree_util.tree_flatten_with_path(state)
        if old_tree != new_tree:
            raise ValueError("set_params: the new parameters do not have the structure of the current model")
        for (path, current), (_, incoming) in zip(old, new):
            if current.shape != incoming.shape or current.dtype != incoming.dtype:
                raise ValueError(
                    f"set_params: {jax.tree_util.keystr(path)} is {incoming.dtype}{list(incoming.shape)}, "
                    f"expected {current.dtype}{list(current.shape)}"
                )
        shardings = jax.tree.map(lambda x: x.sharding, self._state)
        self._state = jax.device_put(state, shardings)
        if self.prefix_cache is not None:
            self.prefix_cache.clear()

    def chat(self, conversations: Sequence[Sequence[Message]], params: SamplingSpec) -> list[Completion]:
        """``params``: one ``SamplingParams`` for all conversations, or one per conversation."""
        shared = isinstance(params, SamplingParams)
        each = per_conversation(params, len(conversations))
        if self.prefix_cache is not None:
            self.prefix_cache.bind(self._state)  # a copy (``with_thinking``) may have other weights
            self.prefix_cache.new_epoch()
        call_seed = int(self._seeds.integers(2**31))
        results: list[Completion | None] = [None] * len(conversations)
        groups: dict[tuple[Any, Any, tuple[str, ...], int], list[_Request]] = {}
        for i, (messages, p) in enumerate(zip(conversations, each)):
            prompt = self._prompt(i, messages)
            if isinstance(prompt, Completion):
                results[i] = prompt
                continue
            if shared:  # conversation i is stream i of the call's seed
                seed, stream = (call_seed if p.seed is None else p.seed), i
            else:  # its own seed alone decides
                seed, stream = (int(self._seeds.integers(2**31)) if p.seed is None else p.seed), 0
            budget = min(p.max_tokens, self.max_context - len(prompt))
            request = _Request(index=i, prompt=prompt, budget=budget, seed=seed, stream=stream)
            key = (from_params(p), penalties_from_params(p), tuple(p.stop), p.top_logprobs)
            groups.setdefault(key, []).append(request)

        for (strategy, penalties, stops, top_logprobs), requests in groups.items():
            requests.sort(key=self._prefill_order)
            rows = self._batch_size(len(requests))
            for start in range(0, len(requests), self.max_batch_size):
                batch = requests[start : start + self.max_batch_size]
                with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
                    generations = generate(
                        self._graphdef, self._state, [r.prompt for r in batch],
                        strategy=strategy, max_new_tokens=[r.budget for r in batch],
                        eos_ids=self.chat_format.eos_ids, stops=stops, token_bytes=self.token_bytes,
                        seed=[r.seed for r in batch], row_ids=[r.stream for r in batch],
                        batch_size=rows, pad_id=self.chat_format.pad_id,
                        penalties=penalties, top_logprobs=top_logprobs,
                        prefix_cache=self.prefix_cache, counters=self.counters,
                    )
                for request, generation in zip(batch, generations):
                    results[request.index] = _completion(generation)
        return results  # type: ignore[return-value]

    def count_tokens(self, messages: Sequence[Message]) -> int:
        """Tokens of the prompt ``chat`` builds for ``messages`` (generation prompt included)."""
        return len(self.chat_format.encode_prompt(messages))

    def _prompt(self, index: int, messages: Sequence[Message]) -> np.ndarray | Completion:
        """The prompt's token ids, or the completion that says why it cannot be generated from."""
        try:
            prompt = self.chat_format.encode_prompt(messages)
        except (TypeError, ValueError) as e:
            return Completion(text="", finish_reason="error", error=f"conversation {index}: {e}")
        if len(prompt) >= self.max_context:
            return Completion(
                text="", finish_reason="length",
                error=f"conversation {index}: the prompt is {len(prompt)} tokens, which leaves no room in the "
                      f"context of {self.max_context} tokens",
            )
        return prompt

    def compile_counts(self) -> dict[str, int]:
        """How many programs the sampler's jitted functions hold (compiled for this process's shapes)."""
        return {name: getattr(generation, name)._cache_size() for name in ("prefill", "extend", "decode")}

    def _prefill_order(self, request: _Request) -> tuple[int, int]:
        """Sort key: the bucketed width still to prefill (what the prefix cache holds is not), then
        the prompt length, so that a micro-batch pads little in either."""
        size = len(request.prompt)
        reused = 0 if self.prefix_cache is None else self.prefix_cache.match(request.prompt, use=False).length
        return generation.bucket(size - reused), size

    def _batch_size(self, requests: int) -> int:
        """Rows of every micro-batch for a group of ``requests``: ``max_batch_size`` when they fill
        more than one micro-batch, else rounded up to a power of two; then a multiple of the mesh's
        batch shards."""
        size = self.max_batch_size if requests > self.max_batch_size else 1 << max(requests - 1, 0).bit_length()
        return math.ceil(size / self._batch_divisor) * self._batch_divisor


@dataclasses.dataclass(frozen=True)
class _Request:
    index: int  # position in the chat call
    prompt: np.ndarray
    budget: int  # max new tokens: max_tokens clipped to the room left in the context
    seed: int
    stream: int


def _completion(generation: Generation) -> Completion:
    return Completion(
        text=generation.text or "",
        finish_reason="length" if generation.finish_reason == "length" else "stop",
        token_ids=generation.token_ids,
        logprobs=generation.logprobs,
        stop_string=generation.stop_string,
        top_logprobs=generation.top_logprobs,
    )


def _batch_divisor(mesh: jax.sharding.Mesh | None, rules: LogicalRules) -> int:
    """How many shards the ``batch`` logical axis has on ``mesh`` (1 without a mesh)."""
    if mesh is None:
        return 1
    (axes,) = logical_to_spec(("batch",), rules, dict(mesh.shape))
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)

