"""Tool retrieval for ``/retrieving_tools``: BM25 over each tool's name, description and parameter docs.

Needs no network and no key. When ``embedding_url`` is configured (an OpenAI-compatible
``/embeddings`` endpoint), tools are ranked by cosine similarity of embeddings instead, falling
back to BM25 if the endpoint fails.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

from toolserver.node.registry import Registry

log = logging.getLogger("toolserver.node")

_TOKEN = re.compile(r"[A-Za-z]+|\d+")
_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])")
_STOP = frozenset(
    {
        "a", "an", "and", "are", "as", "at", "be", "by", "can", "do", "for", "from", "how", "i", "in", "is",
        "it", "its", "me", "my", "of", "on", "or", "please", "that", "the", "this", "to", "use", "want",
        "what", "when", "which", "with", "you", "your",
    }
)  # fmt: skip


def _stem(word: str) -> str:
    for suffix in ("ing", "ies", "es", "ed", "s"):
        if len(word) > len(suffix) + 2 and word.endswith(suffix):
            return word[: -len(suffix)] + ("y" if suffix == "ies" else "")
    return word


def tokenize(text: str) -> list[str]:
    """Lower-case word stems; snake_case and CamelCase identifiers are split into words."""
    words = _TOKEN.findall(_CAMEL.sub(" ", text.replace("_", " ")))
    return [_stem(w.lower()) for w in words if w.lower() not in _STOP]


class ToolRetriever:
    """Ranks the registry's tools (hidden ones included) against a question."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._version = -1
        self._names: list[str] = []
        self._bm25: Any = None
        self._embeddings: dict[str, list[float]] = {}

    def _refresh(self) -> None:
        if self._version == self.registry.version:
            return
        from rank_bm25 import BM25Okapi

        specs = list(self.registry.tools.values())
        self._names = [s.name for s in specs]
        # the name counts twice: it is the most telling part of a tool
        corpus = [tokenize(s.name) + tokenize(s.doc_text()) for s in specs]
        self._bm25 = BM25Okapi(corpus) if corpus else None
        self._embeddings = {}
        self._version = self.registry.version

    async def retrieve(self, question: str, top_k: int) -> list[str]:
        """Names of the ``top_k`` tools closest to ``question``, best first."""
        import anyio.to_thread

        await anyio.to_thread.run_sync(self._refresh)
        if not self._names:
            return []
        if self.registry.ctx.config.embedding_url:
            try:
                return (await self._by_embedding(question))[:top_k]
            except Exception as exc:
                log.warning("embedding retrieval failed, using BM25: %s", exc)
        return self._by_bm25(question)[:top_k]

    def _by_bm25(self, question: str) -> list[str]:
        scores = self._bm25.get_scores(tokenize(question))
        order = sorted(range(len(self._names)), key=lambda i: (-float(scores[i]), i))
        return [self._names[i] for i in order]

    async def _by_embedding(self, question: str) -> list[str]:
        missing = [n for n in self._names if n not in self._embeddings]
        if missing:
            texts = [self.registry.tools[n].doc_text() for n in missing]
            for name, vector in zip(missing, await self._embed(texts), strict=True):
                self._embeddings[name] = vector
        (query,) = await self._embed([question])
        scores = {n: _cosine(query, self._embeddings[n]) for n in self._names}
        return sorted(self._names, key=lambda n: -scores[n])

    async def _embed(self, texts: list[str]) -> list[list[float]]:
        import httpx

        cfg = self.registry.ctx.config
        headers = {}
        if cfg.embedding_api_key:
            headers["Authorization"] = f"Bearer {cfg.embedding_api_key.get_secret_value()}"
        async with httpx.AsyncClient(timeout=30) as client:
            response = await client.post(
                cfg.embedding_url, json={"model": cfg.embedding_model, "input": texts}, headers=headers
            )
            response.raise_for_status()
            data = response.json()["data"]
        data.sort(key=lambda item: item.get("index", 0))
        if len(data) != len(texts):
            raise ValueError(f"the embedding endpoint returned {len(data)} vectors for {len(texts)} texts")
        return [list(map(float, item["embedding"])) for item in data]


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=False))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0
