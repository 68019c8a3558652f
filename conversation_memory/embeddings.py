"""Optional semantic recall: embedding stored messages through an OpenAI-compatible endpoint.

``Memory(..., embeddings="text-embedding-3-small")`` (or an :class:`Embeddings`
for more settings) embeds every stored message with
``client.embeddings.create`` and keeps the vectors beside the messages
(``store.vectors``), so that recall can find old turns by meaning as well as
by their words. Without it recall is lexical and needs no model.

**When.** Messages are embedded after the turn that stored them has been
committed, in batches of ``Embeddings.batch``, never inside the turn:

* ``Memory``: a background thread (one per memory) embeds what each stored
  turn added while the caller goes on. A thread rather than "at the next
  turn": the next turn may be minutes away, and recall wants the vectors
  before then; and rather than inline: an embeddings request costs tens of
  milliseconds the user would wait for.
* ``AsyncMemory``: a task on the event loop (one per conversation at a time),
  the store's part in worker threads as everywhere in ``aio``.
* An in-memory database (``:memory:``) is one connection shared by every
  thread, which a second thread must not use mid-transaction: there the
  embedding runs right after the turn is stored, in the caller's thread.
* ``Embeddings(background=False)`` leaves it to explicit calls.

**Resumable.** What lacks a vector is read from the database each time
(``VectorStore.pending``), so nothing is lost when the endpoint fails: the
failed batch is left as it was, and the next run (after the next turn, or
``Conversation.embed_pending()``) embeds it. A failure never fails a turn;
the background's last one is kept in ``Embedder.last_error``. There are no
retries inside a run (the next run is the retry), so an endpoint that is down
costs one failed request per stored turn.
"""

from __future__ import annotations

import asyncio
import base64
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from conversation_memory.errors import ConfigurationError, MalformedResponse
from conversation_memory.store.values import Segment
from conversation_memory.store.vectors import NewVector, Unembedded, VectorStore, numpy, pack

if TYPE_CHECKING:
    import openai

    from conversation_memory.store.log import ConversationLog

DEFAULT_BATCH = 64
DEFAULT_TIMEOUT = 30.0
DEFAULT_MIN_SIMILARITY = 0.1
"""How similar (cosine) a message must be to the question for its vector to recall it.

Measured with all-MiniLM-L6-v2 on ``bench/bench_recall.py``'s paraphrased probes,
whose facts sit in messages of several sentences (the answer's message scores a
median 0.16 with its question): retention 16.9% at 0.3, 35.2% at 0.15, 36.6% at
0.05 (3 conversations, 4,000 tokens, ``recall``). Below it, a message unrelated to
everything still comes back, if nothing better does."""


@dataclass(frozen=True, slots=True)
class Embeddings:
    """How messages are embedded (``Memory(embeddings=...)``; a model name alone will do).

    ``client`` is an ``openai.OpenAI`` (``openai.AsyncOpenAI`` for an
    ``AsyncMemory``) for any OpenAI-compatible embeddings endpoint; None uses
    the memory's own chat client, or one from ``OPENAI_API_KEY`` /
    ``OPENAI_BASE_URL``. ``dimensions`` is sent to the endpoint when set
    (``text-embedding-3`` models shorten their vectors). ``batch`` messages go
    in one request; ``timeout`` bounds each request, in seconds.
    ``background=False`` embeds only when ``embed_pending()`` is called.

    A recalling strategy (``"recall"``, ``"summary+recall"``) then finds earlier
    turns by meaning as well as by words: the new question is embedded before
    the context is read (one request per turn, bounded by ``timeout``; if it
    fails, recall goes by words alone and the turn goes on), and the messages
    nearest it are fused with the words' ranking. Only those more than
    ``min_similarity`` similar (cosine) count (:data:`DEFAULT_MIN_SIMILARITY`):
    a message that holds its answer among other sentences scores low (0.1-0.3
    with all-MiniLM-L6-v2), while a floor too low lets unrelated messages that
    share a word with the question crowd out the one the vectors found (raise
    it, to 0.3 say, where messages are short and to the point). Messages not
    embedded yet are found by their words.
    """

    model: str
    client: Any = None
    dimensions: int | None = None
    batch: int = DEFAULT_BATCH
    timeout: float = DEFAULT_TIMEOUT
    background: bool = True
    min_similarity: float = DEFAULT_MIN_SIMILARITY

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip() or len(self.model) > 255:
            raise ConfigurationError(
                f"embeddings model must be a model name of at most 255 characters, "
                f"got {self.model!r}",
                argument="embeddings",
            )
        if self.dimensions is not None and (
            isinstance(self.dimensions, bool)
            or not isinstance(self.dimensions, int)
            or self.dimensions < 1
        ):
            raise ConfigurationError(
                f"embeddings dimensions must be a whole number of 1 or more (or None for the "
                f"model's own), got {self.dimensions!r}",
                argument="embeddings",
            )
        if isinstance(self.batch, bool) or not isinstance(self.batch, int) or self.batch < 1:
            raise ConfigurationError(
                f"embeddings batch must be a whole number of 1 or more, got {self.batch!r}",
                argument="embeddings",
            )
        if (
            isinstance(self.timeout, bool)
            or not isinstance(self.timeout, int | float)
            or not self.timeout > 0
        ):
            raise ConfigurationError(
                f"embeddings timeout must be a number of seconds above 0, got {self.timeout!r}",
                argument="embeddings",
            )
        similarity = self.min_similarity
        if (
            isinstance(similarity, bool)
            or not isinstance(similarity, int | float)
            or not -1 <= similarity < 1
        ):
            raise ConfigurationError(
                "embeddings min_similarity is the cosine similarity a message needs to be "
                f"recalled by meaning, from -1 up to (not including) 1 (e.g. 0.3); got "
                f"{similarity!r}",
                argument="embeddings",
            )
        if not isinstance(self.background, bool):
            raise ConfigurationError(
                f"embeddings background must be True or False, got {self.background!r}",
                argument="embeddings",
            )


def as_embeddings(value: Embeddings | str | None) -> Embeddings | None:
    """The ``embeddings=`` setting checked: an :class:`Embeddings`, a model name, or None."""
    if value is None or isinstance(value, Embeddings):
        found = value
    elif isinstance(value, str):
        found = Embeddings(value)
    else:
        raise ConfigurationError(
            "embeddings must be an embedding model's name or conversation_memory.Embeddings"
            f"(model=..., client=...), got {type(value).__name__}",
            argument="embeddings",
        )
    if found is not None:
        numpy()  # the scan needs it: say so now rather than at the first recall
    return found


def _request(settings: Embeddings, texts: Sequence[str]) -> dict[str, Any]:
    request: dict[str, Any] = {
        "model": settings.model,
        "input": list(texts),
        "encoding_format": "base64",
        "timeout": settings.timeout,
    }
    if settings.dimensions is not None:
        request["dimensions"] = settings.dimensions
    return request


def decode(response: Any, count: int, model: str) -> list[bytes]:
    """The vectors of an embeddings response, in input order, as stored (float32).

    ``encoding_format="base64"`` is asked for (a quarter of the bytes of
    JSON numbers); a server that answers with lists of floats anyway is read too.
    """
    data = sorted(getattr(response, "data", None) or [], key=lambda item: item.index)
    if [item.index for item in data] != list(range(count)):
        raise MalformedResponse(
            f"the embeddings endpoint answered {len(data)} vectors for {count} inputs "
            "(or numbered them wrongly); check that the base URL and model name are right",
            model=model,
        )
    vectors = []
    for item in data:
        value = item.embedding
        vector = base64.b64decode(value) if isinstance(value, str) else pack(value)
        if not vector or len(vector) % 4:
            raise MalformedResponse(
                "the embeddings endpoint answered an empty or malformed vector", model=model
            )
        vectors.append(vector)
    if len({len(v) for v in vectors}) > 1:
        raise MalformedResponse(
            "the embeddings endpoint answered vectors of different lengths in one batch",
            model=model,
        )
    return vectors


def _failure(exc: Exception, model: str) -> Exception:
    from conversation_memory.llm.mapping import map_error

    return map_error(exc, model=model, attempts=1, now=time.time) or exc


def _vectors(batch: Sequence[Unembedded], texts: Sequence[str], found: list[bytes]) -> list[Any]:
    """New rows for ``batch``: the vectors found for its texts, empty ones for no text."""
    vectors = iter(found)
    return [
        NewVector(m.conversation_id, m.position, next(vectors) if m.text.strip() else b"")
        for m in batch
    ]


class _Progress:
    """How far each conversation is embedded: every position up to the mark has its
    vector, so the next run starts past it. Kept per open conversation (its log) and
    lineage: a fork whose parent was deleted was handed copies, with no vectors, of
    the messages it shared, and a new process, or a conversation opened anew, starts
    from the beginning once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done: weakref.WeakKeyDictionary[ConversationLog, tuple[list[Segment], int]] = (
            weakref.WeakKeyDictionary()
        )

    def after(self, log: ConversationLog, segments: list[Segment]) -> int:
        with self._lock:
            lineage, position = self._done.get(log, (segments, -1))
        return position if lineage == segments else -1

    def reached(self, log: ConversationLog, segments: list[Segment], position: int) -> None:
        with self._lock:
            lineage, before = self._done.get(log, (segments, -1))
            if lineage != segments:
                before = -1
            self._done[log] = (segments, max(before, position))


class Embedder:
    """Embeds a memory's stored messages, in the calling thread or a background one."""

    def __init__(
        self, settings: Embeddings, client: openai.OpenAI, vectors: VectorStore, *, inline: bool
    ) -> None:
        self.settings = settings
        self._client = client.with_options(max_retries=0)  # one retry layer: the next run
        self._vectors = vectors
        self._inline = inline
        self._progress = _Progress()
        self._cond = threading.Condition()
        self._waiting: dict[str, ConversationLog] = {}
        self._thread: threading.Thread | None = None
        self._closing = False
        self.last_error: Exception | None = None
        """The last failure of a background run (None: none yet)."""

    def embed(self, texts: Sequence[str]) -> list[bytes]:
        """Vectors for ``texts`` (float32 bytes), one request; raises a ModelError."""
        settings = self.settings
        try:
            response = self._client.embeddings.create(**_request(settings, texts))
        except Exception as exc:
            raise _failure(exc, settings.model) from exc
        return decode(response, len(texts), settings.model)

    def embed_question(self, text: str) -> bytes:
        """A turn's question embedded for recall; a failure is kept in
        :attr:`last_error` and raised (the turn then recalls by words)."""
        try:
            return self.embed([text])[0]
        except Exception as exc:
            self.last_error = exc
            raise

    def embed_pending(self, log: ConversationLog) -> int:
        """Embed every message of ``log``'s lineage lacking a vector; how many were stored.

        Raises the endpoint's ModelError; batches stored before it stay stored.
        """
        if not log.stored:
            return 0
        settings, done = self.settings, 0
        segments = log.lineage()
        while True:
            batch = self._vectors.pending(
                segments,
                settings.model,
                after=self._progress.after(log, segments),
                limit=settings.batch,
            )
            if not batch or self._closing:
                return done
            texts = [m.text for m in batch if m.text.strip()]
            found = self.embed(texts) if texts else []
            self._vectors.save(settings.model, _vectors(batch, texts, found))
            self._progress.reached(log, segments, batch[-1].position)
            done += len(batch)

    def stored(self, log: ConversationLog) -> None:
        """A turn of ``log`` was stored: embed what it added (see the module)."""
        if not self.settings.background:
            return
        if self._inline:
            self._quietly(log)
            return
        with self._cond:
            if self._closing:
                return
            self._waiting[log.id] = log
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._work, name="convmem-embeddings", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def _quietly(self, log: ConversationLog) -> None:
        try:
            self.embed_pending(log)
        except Exception as exc:  # never the turn's failure; the next run resumes
            self.last_error = exc

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return
                _, log = self._waiting.popitem()
            self._quietly(log)

    def close(self, timeout: float | None = None) -> None:
        """Stop the background thread after the request it is making (if any)."""
        with self._cond:
            self._closing = True
            self._waiting.clear()
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout if timeout is not None else self.settings.timeout)


class AsyncEmbedder:
    """The asyncio twin of :class:`Embedder`: tasks on the loop, the store in threads."""

    def __init__(
        self,
        settings: Embeddings,
        client: openai.AsyncOpenAI,
        vectors: VectorStore,
        *,
        inline: bool,
        in_thread: Callable[..., Awaitable[Any]],
    ) -> None:
        self.settings = settings
        self._client = client.with_options(max_retries=0)
        self._vectors = vectors
        self._inline = inline
        self._in_thread = in_thread
        self._progress = _Progress()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()
        self._calling: set[asyncio.Task[Any]] = set()
        """Tasks awaiting the endpoint (safe to cancel: no store call in a thread)."""
        self._closing = False
        self.last_error: Exception | None = None

    async def embed(self, texts: Sequence[str]) -> list[bytes]:
        settings = self.settings
        task = asyncio.current_task()
        if task is not None:
            self._calling.add(task)
        try:
            response = await self._client.embeddings.create(**_request(settings, texts))
        except Exception as exc:
            raise _failure(exc, settings.model) from exc
        finally:
            self._calling.discard(task)  # type: ignore[arg-type]
        return decode(response, len(texts), settings.model)

    async def embed_question(self, text: str) -> bytes:
        """See :meth:`Embedder.embed_question`."""
        try:
            return (await self.embed([text]))[0]
        except Exception as exc:
            self.last_error = exc
            raise

    async def embed_pending(self, log: ConversationLog) -> int:
        if not log.stored:
            return 0
        settings, done = self.settings, 0
        segments = await self._in_thread(log.lineage)
        while True:
            batch = await self._in_thread(
                self._vectors.pending,
                segments,
                settings.model,
                after=self._progress.after(log, segments),
                limit=settings.batch,
            )
            if not batch or self._closing:
                return done
            texts = [m.text for m in batch if m.text.strip()]
            found = await self.embed(texts) if texts else []
            await self._in_thread(self._vectors.save, settings.model, _vectors(batch, texts, found))
            self._progress.reached(log, segments, batch[-1].position)
            done += len(batch)

    async def stored(self, log: ConversationLog) -> None:
        if not self.settings.background or self._closing:
            return
        if self._inline:
            await self._quietly(log)
            return
        if log.id in self._tasks:
            self._again.add(log.id)  # the running task looks once more when it is done
            return
        self._tasks[log.id] = asyncio.get_running_loop().create_task(self._run(log))

    async def _quietly(self, log: ConversationLog) -> None:
        try:
            await self.embed_pending(log)
        except Exception as exc:
            self.last_error = exc

    async def _run(self, log: ConversationLog) -> None:
        try:
            while True:
                self._again.discard(log.id)
                await self._quietly(log)
                if log.id not in self._again:
                    return
        finally:
            self._tasks.pop(log.id, None)

    async def aclose(self) -> None:
        """Stop the running tasks and wait for them: one awaiting the endpoint is
        cancelled; one in a store call (a thread, which a cancel would not stop)
        ends after it, before the store is closed under it."""
        self._closing = True
        tasks = list(self._tasks.values())
        for task in self._calling:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


__all__ = [
    "DEFAULT_MIN_SIMILARITY",
    "AsyncEmbedder",
    "Embedder",
    "Embeddings",
    "as_embeddings",
    "decode",
]
