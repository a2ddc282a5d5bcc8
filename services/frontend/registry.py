"""Which models are served, by which workers, with which tokenizer: live from etcd.

Workers register a `proto.ModelCard` under `proto.keys.model(ns, model, instance)`; a
Discovery watch on the models prefix keeps this view current, so models appear when their
first worker registers and disappear when the last one's lease goes. Tokenizers are loaded
in a thread the first time a model appears (file reads and building the Rust tokenizer
must not stall the event loop).
"""

from __future__ import annotations

import asyncio
import time

import structlog

import proto
from genset.tokenizer import Tokenizer, load_tokenizer
from proto import keys

log = structlog.get_logger("frontend.registry")


class ModelEntry:
    __slots__ = ("_tokenizer_task", "cards", "created", "name", "tokenizer_source")

    def __init__(self, name: str) -> None:
        self.name = name
        self.cards: dict[int, proto.ModelCard] = {}
        self.created = int(time.time())
        self.tokenizer_source = ""
        self._tokenizer_task: asyncio.Future | None = None

    @property
    def context_length(self) -> int:
        # The smallest context among the workers: a request must fit wherever it is routed.
        return min((c.context_length for c in self.cards.values()), default=0)

    def start_tokenizer(self, source: str) -> None:
        if self._tokenizer_task is not None and source == self.tokenizer_source:
            return
        self.tokenizer_source = source
        loop = asyncio.get_running_loop()
        self._tokenizer_task = loop.run_in_executor(None, load_tokenizer, source)
        # Retrieve exceptions so a bad tokenizer is reported per request, not as "never retrieved".
        self._tokenizer_task.add_done_callback(lambda f: f.cancelled() or f.exception())

    def tokenizer_now(self) -> Tokenizer | None:
        """The tokenizer if it is loaded already (no await on the hot path)."""
        task = self._tokenizer_task
        if task is not None and task.done() and not task.cancelled() and task.exception() is None:
            return task.result()
        return None

    async def tokenizer(self) -> Tokenizer:
        if self._tokenizer_task is None:
            raise RuntimeError(f"model {self.name!r} has no tokenizer configured")
        return await asyncio.shield(self._tokenizer_task)


class ModelRegistry:
    def __init__(self, discovery, namespace: str) -> None:
        self.discovery = discovery
        self.namespace = namespace
        self.models: dict[str, ModelEntry] = {}
        self._key_index: dict[str, tuple[str, int]] = {}  # etcd key -> (model, instance)
        self._membership = None
        self._max_context: int | None = None  # recomputed after the model set changed

    @property
    def max_context(self) -> int:
        """The largest context among the models served; 0 when none is served or one's
        context is unknown (then no limit follows from it). Read for every request's head
        (the HTTP server's size check), so computed once per change of the model set."""
        if self._max_context is None:
            contexts = [e.context_length for e in self.models.values()]
            self._max_context = max(contexts) if contexts and all(contexts) else 0
        return self._max_context

    async def start(self) -> None:
        self._membership = await self.discovery.watch(keys.models_prefix(self.namespace),
                                                      proto.ModelCard)
        for key, card in list(self._membership.items.items()):
            self._put(key, card)
        self._membership.add_listener(self._on_change)

    async def close(self) -> None:
        if self._membership is not None:
            await self._membership.close()

    def _on_change(self, kind: str, key: str, value) -> None:
        try:
            if kind == "put" and isinstance(value, proto.ModelCard):
                self._put(key, value)
            elif kind == "delete":
                self._delete(key)
        except Exception:  # a bad record must never break the watch
            log.exception("model_record_failed", key=key)

    def _put(self, key: str, card: proto.ModelCard) -> None:
        entry = self.models.get(card.model)
        if entry is None:
            entry = self.models[card.model] = ModelEntry(card.model)
            log.info("model_added", model=card.model, instance=f"{card.instance_id:x}")
        entry.cards[card.instance_id] = card
        self._max_context = None
        self._key_index[key] = (card.model, card.instance_id)
        if card.tokenizer:
            entry.start_tokenizer(card.tokenizer)

    def _delete(self, key: str) -> None:
        found = self._key_index.pop(key, None)
        if found is None:
            return
        model, instance = found
        entry = self.models.get(model)
        if entry is None:
            return
        entry.cards.pop(instance, None)
        self._max_context = None
        if not entry.cards:
            del self.models[model]
            log.info("model_removed", model=model)

    def get(self, model: str) -> ModelEntry | None:
        return self.models.get(model)

    def card(self, model: str, instance_id: int) -> proto.ModelCard | None:
        entry = self.models.get(model)
        return None if entry is None else entry.cards.get(instance_id)
