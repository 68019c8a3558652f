"""Facts about chat models: tokenizer, context window, output limit, price.

The facts are data (``models.json``, shipped in the package), not code: a
:class:`ModelRegistry` is built from that table, and users add the models we
don't know with :func:`register_model` — a name of their own (an Ollama or
llama.cpp model) with its window, or a name that serves a known model (an
Azure deployment, a gateway's alias) with ``like="gpt-4o"``. A JSON models
file, named by ``CONVMEM_MODELS`` and read by :func:`load_models` (or
:func:`load_models_from_env`), does the same without code. Lookups are exact
first, then regardless of case (Azure deployments are often named
``GPT-4o``); a dated snapshot such as ``gpt-4o-2024-08-06`` or
``gpt-4-0613`` then resolves to the longest registered name it starts with
(followed by ``-``), so only snapshots whose facts differ need their own row. Fine-tuned names
(``ft:gpt-4o-mini-2024-07-18:org::id``) resolve through their base model.
The name sent to the server is always the caller's, unchanged.

Besides the limits, each model carries the constants its counter needs: the
per-tool overheads of the cookbook's ``num_tokens_for_tools`` approximation
(which differ between the cl100k and the gpt-4o families) and the image tile
costs. Prices are approximate list prices, dated in the table; they serve cost
estimates, never budgeting.

A model whose server tokenizes differently from every tiktoken encoding (the
local SmolLM2, any llama.cpp model) also carries an initial ``correction``:
how far the server's count is expected to run above ours *before* its first
reply has calibrated the conversation (see
:func:`conversation_memory.calibration.next_correction`). It comes from
measurements against the real server, chosen so a first request already fits
the window; OpenAI models keep the identity, their counts being exact.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from conversation_memory import _config
from conversation_memory.errors import ConfigurationError, UnknownModel
from conversation_memory.types import Correction

__all__ = [
    "ImageCost",
    "ModelInfo",
    "ModelRegistry",
    "ToolConstants",
    "default_registry",
    "get_model",
    "load_models",
    "load_models_from_env",
    "register_model",
]

# Encodings tiktoken knows; a model registered with another name could never be counted.
_ENCODINGS = frozenset(
    {"cl100k_base", "o200k_base", "o200k_harmony", "p50k_base", "p50k_edit", "r50k_base", "gpt2"}
)


@dataclass(frozen=True, slots=True)
class ToolConstants:
    """Overheads of the cookbook's ``num_tokens_for_tools`` approximation."""

    func_init: int
    """Added per function definition."""
    prop_init: int
    """Added once per function that has properties."""
    prop_key: int
    """Added per property."""
    enum_init: int
    """Added per property with an ``enum`` (negative: the enum replaces some framing)."""
    enum_item: int
    """Added per enum value, besides the value's own tokens."""
    func_end: int
    """Added once per request that has tools."""


# The cookbook's two measured families; o200k models other than gpt-4o(-mini) are assumed
# to share the gpt-4o framing since they share its tokenizer and chat format.
CL100K_TOOLS = ToolConstants(
    func_init=10, prop_init=3, prop_key=3, enum_init=-3, enum_item=3, func_end=12
)
O200K_TOOLS = ToolConstants(
    func_init=7, prop_init=3, prop_key=3, enum_init=-3, enum_item=3, func_end=12
)


@dataclass(frozen=True, slots=True)
class ImageCost:
    """Tokens of one image under the published tile rule."""

    base: int = 85
    """Tokens of a ``detail: low`` image, and the fixed part of a high-detail one."""
    tile: int = 170
    """Tokens per 512px tile of a high-detail image."""


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the library needs to know about one model."""

    name: str
    encoding: str
    """tiktoken encoding name, e.g. ``o200k_base``."""
    window: int
    """Context window in tokens: prompt and reply together."""
    max_output: int
    """Most tokens one reply may have."""
    input_price: float | None = None
    """Approximate USD per 1M prompt tokens, or None when unknown."""
    output_price: float | None = None
    """Approximate USD per 1M completion tokens, or None when unknown."""
    tool_constants: ToolConstants = field(default=O200K_TOOLS)
    image_cost: ImageCost = field(default_factory=ImageCost)
    prices_as_of: str | None = None
    """Date of the price list the prices come from."""
    correction: Correction = field(default_factory=Correction)
    """Expected ``server count = ours * factor + margin`` until the server's own usage
    calibrates a conversation (identity when our count is the server's)."""

    def cost(self, prompt_tokens: int, completion_tokens: int = 0) -> float | None:
        """Approximate USD cost of one request, or None when a price is unknown."""
        if self.input_price is None or self.output_price is None:
            return None
        return (prompt_tokens * self.input_price + completion_tokens * self.output_price) / 1e6


MAX_DEFAULT_OUTPUT = 4096
"""A model registered with a window alone may write a quarter of it per reply, at most this."""


def _default_tools(encoding: str) -> ToolConstants:
    return O200K_TOOLS if encoding.startswith("o200k") else CL100K_TOOLS


def _positive_int(argument: str, value: object, model: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigurationError(
            f"{argument} for model {model!r} must be a positive integer number of tokens, "
            f"got {value!r}.",
            model=model,
            argument=argument,
        )
    return value


def _price(argument: str, value: object, model: str) -> float | None:
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ConfigurationError(
            f"{argument} for model {model!r} must be a non-negative number of USD per 1M "
            f"tokens or None, got {value!r}.",
            model=model,
            argument=argument,
        )
    return float(value)


def _correction(value: object, model: str) -> Correction:
    """``value`` as a Correction (``Correction`` checks its own numbers)."""
    if value is None:
        return Correction()
    try:
        if isinstance(value, Mapping) and set(value) <= {"factor", "margin"}:
            value = Correction(**value)  # a models.json row
    except ConfigurationError as exc:
        raise ConfigurationError(f"model {model!r}: {exc}", model=model) from None
    if not isinstance(value, Correction):
        raise ConfigurationError(
            f"correction for model {model!r} must be a Correction(factor=..., margin=...), "
            f"got {value!r}.",
            model=model,
            argument="correction",
        )
    return value


def _make_info(
    name: object,
    *,
    window: object,
    max_output: object,
    encoding: object,
    input_price: object,
    output_price: object,
    tool_constants: ToolConstants | None,
    image_cost: ImageCost | None,
    prices_as_of: str | None,
    correction: object = None,
) -> ModelInfo:
    if not isinstance(name, str) or not name.strip():
        raise ConfigurationError(
            f"name must be a non-empty model name, got {name!r}.", argument="name"
        )
    window = _positive_int("window", window, name)
    max_output = _positive_int("max_output", max_output, name)
    if max_output > window:
        raise ConfigurationError(
            f"max_output ({max_output}) for model {name!r} cannot exceed its window ({window}); "
            "the window counts the prompt and the reply together.",
            model=name,
            argument="max_output",
        )
    if encoding not in _ENCODINGS:
        raise ConfigurationError(
            f"encoding for model {name!r} must be one of tiktoken's encodings "
            f"({', '.join(sorted(_ENCODINGS))}), got {encoding!r}.",
            model=name,
            argument="encoding",
        )
    return ModelInfo(
        name=name,
        encoding=encoding,
        window=window,
        max_output=max_output,
        input_price=_price("input_price", input_price, name),
        output_price=_price("output_price", output_price, name),
        tool_constants=tool_constants or _default_tools(encoding),
        image_cost=image_cost or ImageCost(),
        prices_as_of=prices_as_of,
        correction=_correction(correction, name),
    )


class ModelRegistry:
    """A table of :class:`ModelInfo` keyed by model name.

    Reads never lock: writers swap in a new dict, so a lookup sees either the
    old table or the new one, never half of a change.
    """

    def __init__(self, models: Iterable[ModelInfo] = ()) -> None:
        self._models: dict[str, ModelInfo] = {info.name: info for info in models}
        self._lock = threading.Lock()

    @classmethod
    def builtin(cls) -> ModelRegistry:
        """A fresh registry holding the models shipped in ``models.json``."""
        text = resources.files("conversation_memory").joinpath("models.json").read_text("utf-8")
        return cls(_parse_table(json.loads(text)))

    def get(self, name: str) -> ModelInfo:
        """The facts for ``name``: exact match, else the longest registered prefix."""
        info = self.find(name)
        if info is None:
            raise UnknownModel(
                f"Unknown model {name!r}: it is not in the model registry, so its tokenizer "
                f"and context window are unknown. Register it first: in Python "
                f"register_model({name!r}, window=..., max_output=..., encoding='o200k_base') "
                f"(or like='gpt-4o' for a deployment or alias of a known model), or pass "
                f"counter=... and budget=... explicitly; on the command line convmem chat "
                f"-m {name} --window N [--max-output N]; or list it in a JSON file named by "
                f'CONVMEM_MODELS: {{"{name}": {{"window": 8192, "max_output": 1024}}}}.',
                model=name,
            )
        return info

    def find(self, name: str) -> ModelInfo | None:
        """Like :meth:`get`, but None for an unknown model."""
        models = self._models
        if not isinstance(name, str):
            return None
        info = models.get(name)
        if info is not None:
            return info
        if name.startswith("ft:"):
            # ft:BASE:org:suffix:id — a fine-tune has its base model's facts.
            return self.find(name[3:].split(":", 1)[0])
        lowered = name.lower()
        best: ModelInfo | None = None
        for known, candidate in models.items():
            folded = known.lower()
            if folded == lowered:
                return candidate
            if lowered.startswith(folded + "-") and (best is None or len(known) > len(best.name)):
                best = candidate
        return best

    def register(
        self,
        name: str,
        *,
        like: str | None = None,
        window: int | None = None,
        max_output: int | None = None,
        encoding: str | None = None,
        input_price: float | None = None,
        output_price: float | None = None,
        tool_constants: ToolConstants | None = None,
        image_cost: ImageCost | None = None,
        correction: Correction | None = None,
    ) -> ModelInfo:
        """Add (or replace) a model; arguments are validated and named when wrong.

        ``like`` names a known model whose facts this name shares (an Azure
        deployment of it, a gateway's alias); the other arguments override
        them. Without ``like``, ``window`` is needed; ``max_output`` defaults
        to a quarter of it, at most 4,096, and ``encoding`` to cl100k_base.
        ``correction`` is the expected gap between the server's token count and
        ours until its replies calibrate a conversation; give one for a server
        whose tokenizer is not the ``encoding``'s (e.g. ``Correction(1.25, 16)``).
        """
        given = {
            "window": window,
            "max_output": max_output,
            "encoding": encoding,
            "input_price": input_price,
            "output_price": output_price,
            "tool_constants": tool_constants,
            "image_cost": image_cost,
            "correction": correction,
        }
        facts: dict[str, Any] = dict.fromkeys(
            ("input_price", "output_price", "tool_constants", "image_cost", "prices_as_of")
        )
        facts["encoding"] = "cl100k_base"
        if like is not None:
            base = self.find(like)
            if base is None:
                raise UnknownModel(
                    f"like={like!r} for model {name!r}: {like!r} is not in the model registry; "
                    "name a known model (e.g. like='gpt-4o') or give window= and max_output=.",
                    model=like,
                    argument="like",
                )
            facts = {f.name: getattr(base, f.name) for f in fields(ModelInfo) if f.name != "name"}
            if window is not None and max_output is None:
                given["max_output"] = min(base.max_output, _positive_int("window", window, name))
        elif window is None:
            raise ConfigurationError(
                f"model {name!r} needs its context window: register it with window=... (and "
                "max_output=...), or like='a-known-model' when it serves one.",
                model=name,
                argument="window",
            )
        elif max_output is None:
            quarter = _positive_int("window", window, name) // 4
            given["max_output"] = min(MAX_DEFAULT_OUTPUT, max(1, quarter))
        facts.update({key: value for key, value in given.items() if value is not None})
        info = _make_info(name, **facts)
        self._add([info])
        return info

    def _add(self, infos: Iterable[ModelInfo]) -> None:
        """Add or replace models in one swap (see the class docstring)."""
        with self._lock:
            self._models = {**self._models, **{info.name: info for info in infos}}

    def names(self) -> list[str]:
        """Registered model names, sorted."""
        return sorted(self._models)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.find(name) is not None

    def __iter__(self) -> Iterator[ModelInfo]:
        return iter([self._models[name] for name in self.names()])

    def __len__(self) -> int:
        return len(self._models)

    def __repr__(self) -> str:
        return f"<ModelRegistry with {len(self._models)} models>"


def _parse_table(table: Mapping[str, Any]) -> list[ModelInfo]:
    tools = {
        key: ToolConstants(**{k: v for k, v in value.items() if k != "about"})
        for key, value in table["tool_formats"].items()
    }
    images = {
        key: ImageCost(**{k: v for k, v in value.items() if k != "about"})
        for key, value in table["image_formats"].items()
    }
    as_of = table["prices"]["as_of"]
    infos = []
    for name, row in table["models"].items():
        encoding = row["encoding"]
        infos.append(
            _make_info(
                name,
                window=row["window"],
                max_output=row["max_output"],
                encoding=encoding,
                input_price=row.get("input_price"),
                output_price=row.get("output_price"),
                tool_constants=tools[row.get("tools", encoding.removesuffix("_base"))],
                image_cost=images[row.get("images", "tiles")],
                prices_as_of=as_of,
                correction=row.get("correction"),
            )
        )
    return infos


default_registry = ModelRegistry.builtin()
"""The registry used when none is passed; :func:`register_model` adds to it."""


def register_model(
    name: str,
    *,
    like: str | None = None,
    window: int | None = None,
    max_output: int | None = None,
    encoding: str | None = None,
    input_price: float | None = None,
    output_price: float | None = None,
    tool_constants: ToolConstants | None = None,
    image_cost: ImageCost | None = None,
    correction: Correction | None = None,
) -> ModelInfo:
    """Register a model in the default registry (see :meth:`ModelRegistry.register`)::

    register_model("llama3.2", window=8192, max_output=1024)  # its own facts
    register_model("prod-gpt4o", like="gpt-4o")  # an Azure deployment of gpt-4o
    """
    return default_registry.register(
        name,
        like=like,
        window=window,
        max_output=max_output,
        encoding=encoding,
        input_price=input_price,
        output_price=output_price,
        tool_constants=tool_constants,
        image_cost=image_cost,
        correction=correction,
    )


def get_model(name: str) -> ModelInfo:
    """Facts for ``name`` from the default registry; raises :class:`UnknownModel`."""
    return default_registry.get(name)


_FILE_KEYS = ("like", "window", "max_output", "encoding", "input_price", "output_price")


def load_models(
    path: str | os.PathLike[str], *, registry: ModelRegistry | None = None
) -> list[ModelInfo]:
    """Register every model a JSON models file lists (in the default registry by default).

    The file maps names to :func:`register_model`'s arguments ``like``,
    ``window``, ``max_output``, ``encoding``, ``input_price`` and
    ``output_price``::

        {"llama3.2": {"window": 8192, "max_output": 1024}, "prod-gpt4o": {"like": "gpt-4o"}}

    ``Memory`` loads the file ``CONVMEM_MODELS`` names, so every ``convmem``
    command knows those models. Nothing is registered unless every row is
    valid; the error names the file and the model.
    """
    if not isinstance(path, str | os.PathLike):
        raise ConfigurationError(
            f"a models file is a path, got {type(path).__name__}.", argument="path"
        )
    target = registry or default_registry

    def refused(detail: str, **context: Any) -> ConfigurationError:
        return ConfigurationError(
            f"models file {os.fspath(path)}: {detail}. It lists models outside the registry "
            'as JSON, e.g. {"llama3.2": {"window": 8192, "max_output": 1024}}.',
            argument="CONVMEM_MODELS",
            **context,
        )

    try:
        table = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise refused("no such file") from None
    except OSError as exc:
        raise refused(f"can't be read ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise refused(f"is not JSON ({exc})") from None
    if not isinstance(table, Mapping):
        raise refused(f"must hold a JSON object of models, not {type(table).__name__}")
    scratch = ModelRegistry(target)  # rows may be `like` the ones above them
    infos = []
    for name, row in table.items():
        if not isinstance(row, Mapping):
            raise refused(f"model {name!r} must map to an object of facts", model=name)
        unknown = sorted(set(row) - set(_FILE_KEYS))
        if unknown:
            raise refused(
                f"model {name!r} has the unknown key {unknown[0]!r} (known: "
                f"{', '.join(_FILE_KEYS)})",
                model=name,
            )
        try:
            infos.append(scratch.register(name, **row))
        except ConfigurationError as exc:
            raise refused(exc.message, model=name) from None
    target._add(infos)
    return infos


def load_models_from_env(
    env: Mapping[str, str] | None = None, *, registry: ModelRegistry | None = None
) -> list[ModelInfo]:
    """Register the models of the file ``CONVMEM_MODELS`` names (:func:`load_models`);
    none when it is unset. ``Memory()`` and every ``convmem`` command do this first.

    ``env`` replaces the process environment (for tests)."""
    path = _config.models_file(env)
    return [] if path is None else load_models(path, registry=registry)
