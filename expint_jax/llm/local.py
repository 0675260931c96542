"""``LocalEngine``: a ``ChatBackend`` that generates in process with our Qwen3 and the JAX sampler.

Contract:
  * ``chat(conversations, params)`` encodes each conversation with ``ChatFormat.encode_prompt``
    (the generation prompt appended; with ``enable_thinking=False`` it holds Qwen3's empty think
    block, which is not part of the returned text), groups them by sampling strategy, penalties and stop strings, sorts
    each group by prompt length, cuts it into micro-batches of at most ``max_batch_size``, and
    returns one ``Completion`` per conversation in input order.
    Each micro-batch is left-padded to bucketed widths and to a batch size that the mesh's batch
    axes divide, so a handful of shapes serve every call.
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
    current shardings), so the next call reuses the compiled prefill and decode.
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
from expint_jax.llm.sampler.generation import Generation, generate
from expint_jax.llm.sampler.sampling import from_params, penalties_from_params
from expint_jax.llm.sampler.stops import TokenBytes

log = logging.getLogger(__name__)


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
        ``set_params`` on one does not reach the other."""
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

    def chat(self, conversations: Sequence[Sequence[Message]], params: SamplingSpec) -> list[Completion]:
        """``params``: one ``SamplingParams`` for all conversations, or one per conversation."""
        shared = isinstance(params, SamplingParams)
        each = per_conversation(params, len(conversations))
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
            requests.sort(key=lambda r: len(r.prompt))
            for start in range(0, len(requests), self.max_batch_size):
                batch = requests[start : start + self.max_batch_size]
                with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
                    generations = generate(
                        self._graphdef, self._state, [r.prompt for r in batch],
                        strategy=strategy, max_new_tokens=[r.budget for r in batch],
                        eos_ids=self.chat_format.eos_ids, stops=stops, token_bytes=self.token_bytes,
                        seed=[r.seed for r in batch], row_ids=[r.stream for r in batch],
                        batch_size=self._batch_size(len(batch)), pad_id=self.chat_format.pad_id,
                        penalties=penalties, top_logprobs=top_logprobs,
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

    def _batch_size(self, rows: int) -> int:
        """Rows rounded up to a power of two, then to a multiple of the mesh's batch shards."""
        size = 1 << max(rows - 1, 0).bit_length()
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

