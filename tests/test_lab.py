"""The strategy lab: inputs, the generator, the lab's test model, runs, results, plots, CLI.

Runs go through ``conversation_memory.lab.run`` against the lab's own
deterministic model on ``conversation_memory.testing.ChatServer`` (real HTTP),
with small generated conversations so the file stays fast. Figures are
checked against numbers computed here independently: the model's tokenizer
over the messages each turn could have sent.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from conversation_memory import (
    REPLY_PRIMING,
    ConfigurationError,
    ImportFormatError,
    Memory,
    counter_for,
    get_model,
    lab,
)
from conversation_memory.cli import cli
from conversation_memory.lab import testmodel
from conversation_memory.lab.transcript import request_points

DATA = Path(__file__).parent / "data" / "lab"
MODEL = "gpt-4o-mini"
PNG = b"\x89PNG\r\n\x1a\n"

USER_STRATEGY = '''
from dataclasses import dataclass

from conversation_memory import keep_newest


@dataclass(frozen=True)
class LastTwoTurns:
    """Only the two newest turns, whatever the budget."""

    name = "last-two"

    def select(self, state, budget):
        return keep_newest(state, budget, turns=2)
'''


@pytest.fixture(scope="module")
def small() -> lab.Transcript:
    return lab.generate(40, seed=3, probe_every=5, fact_rate=0.3)


@pytest.fixture(scope="module")
def strategy_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("user") / "my_strategies.py"
    path.write_text(USER_STRATEGY, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def results(small: lab.Transcript, strategy_file: Path) -> lab.Results:
    return lab.run(
        small,
        strategies=["truncate", "summary", f"{strategy_file}:LastTwoTurns"],
        budgets=[300, 800],
        model=MODEL,
    )


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- inputs -----------------------------------------------------------------------------


def test_reads_our_own_export(tmp_path):
    memory = Memory(tmp_path / "chats.db", model=MODEL)
    chat = memory.conversation(system="Be terse.", title="export me")
    chat.append({"role": "user", "content": "Hello, I am Ada."})
    chat.append({"role": "assistant", "content": "Hi Ada."}, pinned=True)
    chat.append({"role": "user", "content": "Bye."})
    path = write(tmp_path, "export.jsonl", chat.export())
    memory.close()

    [transcript] = lab.read_transcripts(path)
    assert transcript.name == "export me"
    assert transcript.system == "Be terse."
    assert [m["content"] for m in transcript.messages] == ["Hello, I am Ada.", "Hi Ada.", "Bye."]
    assert "convmem" not in transcript.messages[0]
    assert transcript.turns == 1


def test_reads_messages_jsonl_with_tool_calls():
    [transcript] = lab.read_transcripts(DATA / "messages.jsonl")
    assert transcript.system == "You are a helpful assistant with tools."
    roles = [m["role"] for m in transcript.messages]
    assert roles == ["user", "assistant", "tool", "assistant", "user", "assistant"]
    assert transcript.messages[1]["tool_calls"][0]["id"] == "call_1"
    assert "refusal" not in transcript.messages[-1]  # null fields other tools write are dropped
    # a request before each assistant message: the call, the answer after the result, the last
    assert request_points(transcript.messages) == [1, 3, 5]
    assert request_points(transcript.messages, live=True) == [1, 5]


def test_reads_conversations_jsonl_empty_and_with_tools():
    first, empty, tools = lab.read_transcripts(DATA / "conversations.jsonl")
    assert first.system == "Be brief."
    assert first.messages[-1] == {"role": "assistant", "content": "Noted."}  # "weight" dropped
    assert first.probes[0].expect == ("4821",)
    assert first.probes[0].after == 2  # default: the end
    assert empty.messages == ()
    assert empty.turns == 0
    assert tools.tools is not None
    assert tools.tools[0]["function"]["name"] == "book"
    assert tools.source == "conversations.jsonl:3"


def test_reads_sharegpt_json_with_function_calls():
    trip, hello, empty = lab.read_transcripts(DATA / "sharegpt.json")
    assert trip.name == "trip-planning"
    assert trip.system == "You are a travel assistant."
    call, result = trip.messages[3], trip.messages[4]
    assert call["role"] == "assistant"
    assert call["content"] is None
    assert json.loads(call["tool_calls"][0]["function"]["arguments"]) == {"city": "Lisbon"}
    assert result == {"role": "tool", "tool_call_id": call["tool_calls"][0]["id"],
                      "content": '{"temperature": 22, "sky": "sunny"}'}  # fmt: skip
    assert [p.after for p in trip.probes] == [2, 8]
    assert trip.probes[1].regex == "lisbon"
    assert [m["role"] for m in hello.messages] == ["user", "assistant"]
    assert empty.messages == ()


def test_reads_sharegpt_as_jsonl(tmp_path):
    lines = [
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
        {
            "conversations": [
                {"from": "system", "value": "Be kind."},
                {"from": "human", "value": "x"},
            ]
        },
    ]
    path = write(tmp_path, "s.jsonl", "\n".join(json.dumps(line) for line in lines))
    first, second = lab.read_transcripts(path)
    assert first.turns == 1
    assert second.system == "Be kind."
    assert second.turns == 0


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("empty.jsonl", "  \n", "the file is empty"),
        ("bad.jsonl", '{"role": "user", "content": "a"}\n\n{"role": "assistant", oops}\n',
         "line 3: not valid JSON"),
        ("role.jsonl", '{"role": "user", "content": "a"}\n{"role": "robot", "content": "b"}\n',
         "line 2: message 1: role is 'robot'"),
        ("key.jsonl", '{"role": "user", "content": "a", "mood": "happy"}\n',
         "line 1: unknown key 'mood'"),
        ("tool.jsonl", '{"role": "user", "content": "a"}\n'
         '{"role": "tool", "tool_call_id": "x", "content": "b"}\n', "line 2: message 1"),
        ("mixed.jsonl", '{"messages": []}\n{"role": "user", "content": "a"}\n',
         'line 2: expected a conversation'),
        ("record.jsonl", '{"messages": [{"role": "user", "content": 5}]}\n',
         "line 1: message 0: content is a int"),
        ("probe.jsonl", '{"messages": [], "probes": [{"question": "q", "after": 3}]}\n',
         'line 1: probe 0: "after" must be a message count from 0 to 0'),
        ("regex.jsonl", '{"messages": [], "probes": [{"question": "q", "regex": "("}]}\n',
         '"regex" does not compile'),
        ("share.json", '[\n  {"conversations": [\n    {"from": "human", "value": "a"},\n'
         '    {"from": "robot", "value": "b"}\n  ]}\n]\n', "line 4: turn 1: \"from\" is 'robot'"),
        ("obs.json", '{"conversations": [\n {"from": "human", "value": "a"},\n'
         ' {"from": "observation", "value": "b"}]}', "line 3: turn 1: a tool result"),
        ("broken.json", '[\n  {"conversations": [\n  }\n]\n', "line 3: not valid JSON"),
        ("shape.json", '[\n  {"conversations": []},\n  {"turns": []}\n]\n',
         "line 3: conversation 1: expected an object"),
    ],
)  # fmt: skip
def test_malformed_files_name_the_line(tmp_path, name, text, expected):
    path = write(tmp_path, name, text)
    with pytest.raises(ImportFormatError) as caught:
        lab.read_transcripts(path)
    assert expected in str(caught.value)
    assert str(caught.value).startswith(name)


def test_unreadable_and_non_utf8_files(tmp_path):
    with pytest.raises(ImportFormatError, match="cannot read"):
        lab.read_transcripts(tmp_path / "missing.jsonl")
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"role": "user", "content": "caf\u00e9"}'.encode("latin-1"))
    with pytest.raises(ImportFormatError, match="not UTF-8"):
        lab.read_transcripts(path)


# --- the generator and the test model -------------------------------------------------------


def test_generator_is_deterministic_and_plants_what_it_probes():
    one = lab.generate(120, seed=11)
    assert one == lab.generate(120, seed=11)
    assert one != lab.generate(120, seed=12)
    assert one.turns == 120
    assert len(one.messages) == 240
    assert len(one.probes) == 12
    history = " ".join(m["content"] for m in one.messages)
    for probe in one.probes:
        said = " ".join(m["content"] for m in one.messages[: probe.after])
        assert probe.answer in said  # planted before it is asked...
        assert history.count(probe.expect[0]) == 1  # ...once, with a value used nowhere else
        assert probe.meta["age"] >= 0
    counts = [
        len(re.split(r"(?<=[.!?]) ", m["content"]))
        for m in lab.generate(50, sentences=(2, 2), fact_rate=0).messages
    ]
    assert set(counts) == {2}


def test_generator_options_are_checked():
    assert lab.generate(10, probe_every=0).probes == ()
    assert lab.generate(10, fact_rate=0).probes == ()
    for bad in ({"turns": 0}, {"fact_rate": 2}, {"probe_every": -1}, {"sentences": (3, 1)}):
        with pytest.raises(ConfigurationError):
            lab.generate(**{"turns": 10, **bad})


def test_reader_answers_only_from_the_request():
    fact = "Also, my sister's locker code is 4821."
    asked = {"role": "user", "content": "What is my sister's locker code?"}
    context = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": fact}]
    assert testmodel.answer([*context, asked]) == fact
    assert testmodel.answer([context[0], asked]) == testmodel.UNKNOWN
    summary = {"role": "system", "content": f"Summary of the earlier conversation:\n{fact}"}
    assert testmodel.answer([summary, asked]) == fact


def test_test_summarizer_is_extractive_and_capped():
    transcript = (
        "user: I like tea. By the way, my cat is called Tofu.\n"
        "assistant: Noted. Tea is nice.\n"
        "user: Before I forget, my code is 1234.\nIt is secret."
    )
    summary = testmodel.extract_summary("Earlier: Ada lives in Oslo.", transcript, 200)
    assert summary == (
        "Earlier: Ada lives in Oslo. By the way, my cat is called Tofu. "
        "Before I forget, my code is 1234."
    )
    capped = testmodel.extract_summary("", transcript, 12)  # 80% of 12 tokens: 27 bytes
    assert capped == "Before I forget, my code is"  # the newest kept, cut to fit
    assert testmodel.extract_summary("", "user: just small talk.", 50) == "just small talk."


def test_scoring_keywords_regex_and_judge_prompt():
    probe = lab.Probe(after=0, question="Code?", expect=("4821",), regex=r"locker")
    assert probe.matches("The locker code is 4821.")
    assert not probe.matches("The locker code is 14821.")  # whole words only
    assert not probe.matches("The code is 4821.")
    assert lab.JUDGE_PROMPT.version == "judge-v1"


# --- runs -----------------------------------------------------------------------------


def test_run_is_internally_consistent(results, small):
    counter = counter_for(MODEL)
    info = get_model(MODEL)
    runs = {r.label: r for r in results.runs}
    assert set(runs) == {
        *(f"{s}@{b}" for s in ("truncate", "summary", "last-two") for b in (300, 800)),
        lab.BASELINE,
    }
    ends = request_points(small.messages)
    for run in results.runs:
        assert run.error is None
        assert run.turns == small.turns == len(ends)
        assert sum(run.tokens) == run.tokens_total == run.metrics()["tokens_total"]
        assert all(t is not None and t <= run.limit for t in run.tokens)
        assert run.cost == pytest.approx(sum(run.costs))
        if run.budget is not None:
            assert run.limit == run.budget
        assert run.tokens_p95 <= run.tokens_max <= run.limit
        assert len(run.probes) == len(small.probes)
        assert run.recall == pytest.approx(run.correct / len(small.probes), abs=1e-4)

    # The baseline sends the system prompt and every message before each turn.
    system = counter.count_message({"role": "system", "content": small.system})
    expected = [
        system + sum(counter.count_message(m) for m in small.messages[:end]) + REPLY_PRIMING
        for end in ends
    ]
    baseline = results.baseline
    assert baseline is not None
    assert list(baseline.tokens) == expected
    assert baseline.limit == info.window - min(info.max_output, 4096)
    # A truncating strategy never sends more than the whole history.
    for label in ("truncate@300", "truncate@800", "last-two@800"):
        assert all(t <= full for t, full in zip(runs[label].tokens, expected, strict=True))
    # Truncation costs the turn's prompt and the transcript's reply, nothing else.
    first = small.messages[ends[0]]["content"]
    assert runs["truncate@300"].costs[0] == pytest.approx(
        info.cost(runs["truncate@300"].tokens[0], counter.count_text(first))
    )
    # Only the summarizing strategy calls the summarizer, and its calls cost.
    assert runs["truncate@300"].summary_calls == runs["last-two@300"].summary_calls == 0
    summary = runs["summary@300"]
    assert summary.summary_calls > 0
    assert summary.summary_failures == 0
    assert summary.summary_prompt_tokens > summary.summary_completion_tokens > 0
    assert summary.cost > runs["truncate@300"].cost - 1e-9
    # The full history remembers everything the generator planted; tight budgets forget.
    assert baseline.recall == 1.0
    assert runs["truncate@300"].recall < 1.0
    assert runs["last-two@300"].recall <= runs["truncate@800"].recall


def test_user_strategy_from_a_file_runs_beside_the_builtins(results):
    mine = results.run("last-two", 800)
    builtin = results.run("truncate", 800)
    assert results.meta["strategies"] == ["truncate", "summary", "last-two"]
    assert mine.tokens_mean < builtin.tokens_mean  # two turns take less than the budget allows
    with pytest.raises(ConfigurationError, match="no run 'nope'"):
        results.run("nope", 800)


def test_same_seed_same_json(strategy_file):
    def once() -> str:
        return lab.run(
            lab.generate(30, seed=3, probe_every=5, fact_rate=0.3),
            strategies=["summary", "hierarchical", f"{strategy_file}:LastTwoTurns"],
            budgets=[300],
            model=MODEL,
        ).to_json()

    first, second = once(), once()
    assert first == second
    assert "timing" not in json.loads(first)
    assert "wall" not in first


def test_results_record_their_provenance(results):
    meta = results.meta
    assert meta["model"] == MODEL
    assert meta["encoding"] == "o200k_base"
    assert meta["backend"] == "test"
    assert meta["test_model"] == testmodel.VERSION
    assert meta["summary_prompt"] == "rolling-v1"
    assert meta["scoring"] == "keywords"
    assert meta["lab_version"] == lab.LAB_VERSION
    assert meta["library_version"]
    assert meta["transcripts"][0]["turns"] == 40
    assert set(results.timing) == {r.label for r in results.runs} | {"total"}
    assert results.to_dict(timing=True)["timing"] == dict(results.timing)


def test_write_json_csv_and_valid_pngs(results, tmp_path):
    written = {p.name for p in results.write(tmp_path)}
    assert written == {
        "results.json",
        "results.csv",
        "results.md",
        "turns.csv",
        "timing.json",
        "tokens_per_turn.png",
        "cumulative_cost.png",
        "retention_vs_tokens.png",
        "recall_vs_tokens.png",
    }
    import matplotlib.image

    pictures = ("tokens_per_turn.png", "cumulative_cost.png", "retention_vs_tokens.png")
    for name in (*pictures, "recall_vs_tokens.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG)
        assert len(data) > 10_000
        height, width, _ = matplotlib.image.imread(tmp_path / name).shape
        assert width > 400
        assert height > 300
    again = lab.Results.load(tmp_path)
    assert again.to_json() == results.to_json() == (tmp_path / "results.json").read_text()
    assert again.timing == dict(results.timing)
    rows = (tmp_path / "results.csv").read_text().splitlines()
    assert rows[0].startswith("strategy,budget,limit,turns,tokens_total,tokens_mean,tokens_p95")
    assert len(rows) == 1 + len(results.runs)
    turns = (tmp_path / "turns.csv").read_text().splitlines()
    assert len(turns) == 1 + sum(r.turns for r in results.runs)
    assert "| truncate | 300 |" in (tmp_path / "results.md").read_text()


def test_files_with_tool_calls_and_empty_conversations_replay():
    transcripts = [
        *lab.read_transcripts(DATA / "conversations.jsonl"),
        *lab.read_transcripts(DATA / "sharegpt.json"),
        *lab.read_transcripts(DATA / "messages.jsonl"),
    ]
    results = lab.run(transcripts, strategies=["truncate", "summary"], budgets=[200], model=MODEL)
    assert results.meta["skipped"] == ["conversations.jsonl:2", "sharegpt.json#2"]
    counter = counter_for(MODEL)
    tools = counter.count_tools(transcripts[2].tools)
    for run in results.runs:
        assert run.error is None
        assert run.turns == sum(t.turns for t in transcripts) == 1 + 2 + 4 + 1 + 3
        assert all(t <= 200 for t in run.tokens) or run.baseline
        # the table-booking conversation sends its tool definitions every turn
        assert run.tokens[1] > tools
    truncate = results.run("truncate", 200)
    probes = {p.question: p for p in truncate.probes}
    assert probes["What is my locker code?"].correct
    assert probes["What is my trip budget?"].turn == 1
    assert probes["Where is my trip to?"].correct


def test_live_mode_regenerates_replies():
    short = lab.generate(20, seed=4, probe_every=5, fact_rate=0.4)
    results = lab.run(short, strategies=["summary"], budgets=[250], mode="live", model=MODEL)
    assert results.meta["mode"] == "live"
    assert results.meta["reply_max_tokens"] == 256
    for run in results.runs:
        assert run.error is None
        assert run.turns == short.turns
        assert all(t <= run.limit for t in run.tokens)
        assert len(run.probes) == len(short.probes)
    assert results.run("summary", 250).summary_calls > 0
    assert results.baseline is not None
    assert results.baseline.budget is None


def test_judge_scoring_agrees_with_keywords_on_generated_facts(small, results):
    judged = lab.run(
        small, strategies=["summary"], budgets=[300], model=MODEL, baseline=False, scoring="judge"
    )
    assert judged.meta["judge_prompt"] == "judge-v1"
    assert judged.meta["judge_model"] == MODEL
    keywords = results.run("summary", 300).probes
    assert [p.answer for p in judged.runs[0].probes] == [p.answer for p in keywords]
    assert [p.correct for p in judged.runs[0].probes] == [p.correct for p in keywords]


def test_a_strategy_that_breaks_its_budget_stops_its_run_only(small):
    def greedy(state, budget):
        from conversation_memory import keep_newest

        return keep_newest(state, budget.__class__(window=10**6))

    results = lab.run(small, strategies=["truncate", greedy], budgets=[300], model=MODEL)
    broken = results.run("greedy", 300)
    assert broken.error is not None
    assert "turn" in broken.error
    assert broken.turns < small.turns
    assert results.run("truncate", 300).error is None


def test_bad_arguments_are_refused(small, tmp_path):
    cases = [
        ({"strategies": ["nonsense"]}, "unknown strategy"),
        ({"strategies": ["truncate", "truncate"]}, "distinct"),
        ({"strategies": [f"{tmp_path}/missing.py:X"]}, "does not exist"),
        ({"strategies": ["no_such_module_xyz:X"]}, "cannot import"),
        ({"strategies": ["conversation_memory.strategies:Nope"]}, "has no 'Nope'"),
        ({"budgets": [300, 300]}, "repeat"),
        ({"budgets": []}, "at least one budget"),
        ({"mode": "dream"}, "mode must be"),
        ({"scoring": "vibes"}, "scoring must be"),
    ]
    for options, message in cases:
        with pytest.raises(ConfigurationError, match=message):
            lab.run(small, **{"model": MODEL, **options})
    with pytest.raises(ConfigurationError, match="empty"):
        lab.run(lab.Transcript(name="nothing", messages=()), model=MODEL)
    broken = write(tmp_path, "broken.py", "raise RuntimeError('boom')\n")
    with pytest.raises(ConfigurationError, match="boom"):
        lab.load_strategy(f"{broken}:X")
    assert lab.load_strategy("conversation_memory.strategies:Truncate").name == "truncate"


# --- the command ------------------------------------------------------------------------


def invoke(*args: str):
    clean = {k: None for k in os.environ if k.startswith(("OPENAI_", "CONVMEM_"))}
    return CliRunner(env={**clean, "COLUMNS": "160"}).invoke(
        cli, ["lab", *args], prog_name="convmem"
    )


def test_cli_help_explains_itself():
    result = invoke("--help")
    assert result.exit_code == 0
    for words in (
        "--strategy", "--budget", "--mode", "--backend", "--judge", "--out", "recall",
        "evidence retention", "--sessions", "--paraphrase",
    ):  # fmt: skip
        assert words in result.output


def test_cli_writes_the_same_files_twice(tmp_path, strategy_file):
    args = ["--turns", "20", "--seed", "5", "-s", "truncate", "-s", "summary:high=0.8,low=0.5",
            "-s", f"{strategy_file}:LastTwoTurns", "-b", "300"]  # fmt: skip
    first = invoke(*args, "--out", str(tmp_path / "a"))
    assert first.exit_code == 0, first.output + repr(first.exception)
    assert "summary:high=0.8,low=0.5" in first.output
    assert "last-two" in first.output
    assert "full history" in first.output
    assert "recall" in first.output
    second = invoke(*args, "--out", str(tmp_path / "b"), "--no-plots", "--json")
    assert second.exit_code == 0
    data = json.loads(second.stdout)
    assert data["timing"]["total"] > 0
    for name in ("results.json", "results.csv", "turns.csv", "results.md"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert not (tmp_path / "b" / "tokens_per_turn.png").exists()
    assert (tmp_path / "a" / "tokens_per_turn.png").read_bytes().startswith(PNG)
    del data["timing"]
    assert data == json.loads((tmp_path / "a" / "results.json").read_text())


def test_cli_talks_to_any_openai_compatible_server():
    with lab.lab_server(model=MODEL) as server:
        result = invoke(
            "--base-url", server.base_url, "--model", MODEL, "--turns", "10", "--probe-every", "5",
            "-s", "truncate", "-b", "300", "--no-baseline", "--json",
        )  # fmt: skip
        asked = len(server.chat_requests)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["meta"]["backend"] == "openai"
    assert data["meta"]["test_model"] is None  # not the lab's own server, as far as it knows
    assert asked == len(data["runs"][0]["probe_results"]) == 2  # replay: probes only
    result = invoke("--backend", "openai", "--turns", "5")
    assert result.exit_code == 1
    assert "No API key" in result.stderr


def test_cli_reads_files_and_reports_bad_ones(tmp_path):
    result = invoke(str(DATA / "sharegpt.json"), "-s", "truncate", "-b", "200", "--json")
    assert result.exit_code == 0, result.output
    names = [t["name"] for t in json.loads(result.stdout)["meta"]["transcripts"]]
    assert names == ["trip-planning", "sharegpt.json#1", "sharegpt.json#2"]
    bad = write(tmp_path, "bad.jsonl", '{"role": "user", "content": "a"}\nnot json\n')
    result = invoke(str(bad))
    assert result.exit_code == 1
    assert "bad.jsonl, line 2: not valid JSON" in result.stderr
    result = invoke("-s", "nonsense")
    assert result.exit_code == 1
    assert "unknown strategy" in result.stderr
    result = invoke("--backend", "test", "--base-url", "http://127.0.0.1:9/v1")
    assert result.exit_code == 1
    assert "--base-url" in result.stderr


def test_hierarchical_under_a_tight_cap_never_passes_it():
    """Regression: hierarchical at budget 600 stopped at turn 94 with BudgetExceeded."""
    results = lab.run(
        lab.generate(turns=120, seed=7),
        strategies=["hierarchical"],
        budgets=[600],
        model="gpt-4o-mini",
        baseline=False,
    )
    run = results.run("hierarchical", 600)
    assert run.error is None
    assert max(run.tokens) <= 600
    assert len(run.tokens) >= 120
