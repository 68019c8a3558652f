"""What the lab measures of memory: evidence retention, paraphrased multi-session probes,
the reading of real text, and multi-session inputs with evidence.

Retention is checked on hand-made transcripts where it is known which message
holds each answer and whether the strategy's context can still carry it; runs go
through ``lab.run`` against the lab's own model on a real ``ChatServer``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re

import pytest

from conversation_memory import ConfigurationError, ImportFormatError, lab
from conversation_memory.lab import testmodel
from conversation_memory.lab.results import percent
from conversation_memory.lab.retention import Sent, retained, whole_history
from conversation_memory.lab.text import contains, content_words, normalize, sentences
from conversation_memory.testing import ChatServer

MODEL = "gpt-4o-mini"

# --- reading real text ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "Dr. Smith lives at No. 5 Baker St. in London. He likes tea.",
            ["Dr. Smith lives at No. 5 Baker St. in London.", "He likes tea."],
        ),
        (
            "Bring fruit, e.g. apples, i.e. the red ones. Then rest.",
            ["Bring fruit, e.g. apples, i.e. the red ones.", "Then rest."],
        ),
        (
            "It costs 3.50 euros, about 1,250.75 in all. Really!",
            ["It costs 3.50 euros, about 1,250.75 in all.", "Really!"],
        ),
        (
            "See https://example.com/a.b?c=1 for more. Is www.x.org up? Yes.",
            ["See https://example.com/a.b?c=1 for more.", "Is www.x.org up?", "Yes."],
        ),
        (
            "J. R. R. Tolkien wrote it. Mr. and Mrs. Dursley read it.",
            ["J. R. R. Tolkien wrote it.", "Mr. and Mrs. Dursley read it."],
        ),
        (
            "We met at 5 p.m. and talked. We left at 10 p.m. The bus was late.",
            ["We met at 5 p.m. and talked.", "We left at 10 p.m.", "The bus was late."],
        ),
        ("I packed pens, paper etc. Then I went.", ["I packed pens, paper etc.", "Then I went."]),
        ('He said "stop." Then he left.', ['He said "stop."', "Then he left."]),
        ("First line\nsecond line.  Third?", ["First line", "second line.", "Third?"]),
        ("", []),
    ],
)
def test_sentences_survive_abbreviations_decimals_and_urls(text, expected):
    assert sentences(text) == expected


def test_answers_are_scored_ignoring_case_and_punctuation():
    assert normalize("Mint-Green, 4,821 (Kraków)!") == "mint green 4821 kraków"
    assert contains("The code: 4,821.", "4821")
    assert contains("it is MINT GREEN", "mint-green")
    assert not contains("The code is 14821.", "4821")  # still whole words
    assert not contains("anything", "")
    probe = lab.Probe(after=0, question="?", expect=("Alfa Romeo", "4821"))
    assert probe.matches("An alfa-romeo, plate 4,821.")
    assert not probe.matches("An Alfa Romeo.")
    assert content_words("My sister's cat, Dr. Who?") == {"sister", "cat", "dr"}


def test_reader_and_summarizer_keep_sentences_with_abbreviations_whole():
    fact = "Dr. Smith's cat is called Tofu."
    context = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": f"Hello there. {fact} It is old."},
    ]
    asked = {"role": "user", "content": "What is Dr. Smith's cat called?"}
    assert testmodel.answer([*context, asked]) == fact
    transcript = "user: The rent is 1,250.50 euros, e.g. for May. it rose.\nassistant: ok."
    assert testmodel.extract_summary("", transcript, 200) == (
        "The rent is 1,250.50 euros, e.g. for May."
    )


def test_recall_and_retention_print_one_decimal_and_counts():
    assert percent(5, 1532) == "0.3% (5/1,532)"
    assert percent(6, 1532) == "0.4% (6/1,532)"
    assert percent(0, 0) == "n/a"


# --- retention, counted -----------------------------------------------------------------


def test_retained_reads_raw_retrieved_and_summary_text():
    probe = lab.Probe(after=9, question="Which digits?", expect=("4821",), evidence=(1, 3, 5, 7))
    sent = Sent(
        raw=frozenset({1}),
        retrieved=frozenset({3}),
        summaries=((4, 6, "The locker code is 4,821."), (7, 8, "Small talk only.")),
    )
    where = {1: 1, 3: 3, 5: 5, 7: 7}
    assert retained(probe, sent, where.get) == ((1, 3, 5, 7), ("raw", "retrieved", "summary", None))
    # A summary with the answer counts only for the messages it covers.
    outside = Sent(raw=frozenset(), summaries=((0, 2, "The locker code is 4821."),))
    assert retained(probe, outside, where.get)[1] == ("summary", None, None, None)
    # A message the replay did not store as written is not measured at all.
    assert retained(probe, sent, {1: 1}.get) == ((1,), ("raw",))
    assert retained(probe, whole_history(8), lambda i: i)[1] == ("raw",) * 4
    assert retained(probe, whole_history(6), lambda i: i)[1] == ("raw", "raw", "raw", None)


def _filler(n: int) -> str:
    """Small talk with neither a number nor a name: the extractive summarizer drops it."""
    return (
        "we talked about the weather for a while and it stayed pleasant"
        + " all day" * (n % 4)
        + "."
    )


@pytest.fixture(scope="module")
def hand_made() -> lab.Transcript:
    """A fact with a number early (the extractive summarizer keeps it), one without a
    name or number early (it drops it), an assistant message that makes no request,
    then small talk, and a fact in the newest turn."""
    messages = [
        {"role": "user", "content": "My locker code is 4821. " + _filler(0)},
        {"role": "assistant", "content": "noted."},
        {"role": "user", "content": "my favourite colour is teal. " + _filler(1)},
        {"role": "assistant", "content": "noted."},
        {"role": "assistant", "content": "anything else? " + _filler(2)},
    ]
    for n in range(3, 23):
        messages += [
            {"role": "user", "content": _filler(n)},
            {"role": "assistant", "content": "i see. " + _filler(n + 100)},
        ]
    messages += [
        {"role": "user", "content": "my room is on the top floor. " + _filler(99)},
        {"role": "assistant", "content": "noted."},
    ]
    count = len(messages)
    probes = [
        {"question": "Which digits?", "expect": ["4821"], "evidence": [0]},
        {"question": "Which hue?", "expect": ["teal"], "evidence": [2]},
        {"question": "Which storey?", "expect": ["top floor"], "evidence": [count - 2]},
        {"question": "Anything?", "expect": ["anything"], "evidence": [4]},
    ]
    record = {"name": "hand-made", "messages": messages, "probes": probes}
    return lab.parse_transcripts(json.dumps(record) + "\n")[0]


def test_retention_is_counted_from_what_the_context_carried(hand_made):
    results = lab.run(
        hand_made, strategies=["truncate", "summary"], budgets=[300, 20_000], model=MODEL
    )
    ways = {r.label: [p.retained for p in r.probes] for r in results.runs}
    # Truncated to 300 tokens only the newest turn is left.
    assert ways["truncate@300"] == [(None,), (None,), ("raw",), (None,)]
    # With room for everything, everything is sent as it is.
    assert ways["truncate@20000"] == [("raw",)] * 4
    assert ways["full history"] == [("raw",)] * 4
    # The summary holds the code (a number) but not the colour, nor the assistant's aside.
    assert ways["summary@300"] == [("summary",), (None,), ("raw",), (None,)]
    tight = results.run("summary", 300)
    assert (tight.evidence, tight.evidence_retained, tight.retention) == (4, 2, 0.5)
    assert tight.retained_by == {"raw": 1, "retrieved": 0, "summary": 1, "lost": 2}
    assert results.run("truncate", 300).retention == 0.25
    assert results.baseline.retention == 1.0
    metrics = tight.metrics()
    assert metrics["retained_summary"] == 1
    assert metrics["retained_raw"] == 1
    assert "| summary | 300 |" in results.to_markdown()
    assert "50.0% (2/4)" in results.to_markdown()
    assert "evidence_retained,retention,retained_raw" in results.to_csv()
    again = lab.Results.from_dict(json.loads(results.to_json()))
    assert again.to_json() == results.to_json()
    assert again.run("summary", 300).probes == tight.probes


def test_live_mode_measures_only_the_messages_stored_as_written(hand_made):
    """Live mode stores the model's replies instead of the transcript's: evidence in the
    transcript's replies is not measured (neither kept nor lost); the user's is."""
    results = lab.run(
        hand_made, strategies=["truncate"], budgets=[20_000], mode="live", model=MODEL
    )
    newest = len(hand_made.messages) - 2
    for run in results.runs:
        assert [p.evidence for p in run.probes] == [(0,), (2,), (newest,), ()]
        assert run.retention == 1.0
        assert run.evidence == 3


def test_retention_needs_no_model_answer(hand_made):
    """Recall needs the reader to answer; retention is the same whoever answers."""
    with (
        ChatServer(model=MODEL, reply=lambda body: "no idea") as server,
        server.client() as client,
    ):
        silent = lab.run(
            hand_made, strategies=["truncate"], budgets=[300], model=MODEL, client=client
        )
    run = silent.run("truncate", 300)
    assert run.recall == 0.0
    assert run.retention == 0.25


# --- the generator: sessions, other words, evidence ---------------------------------------


def test_the_plain_generator_is_unchanged():
    """The README's table depends on it: the same arguments, the same conversation."""
    one = lab.generate(120, seed=11)
    digest = hashlib.sha256(json.dumps(one.messages).encode()).hexdigest()
    assert digest[:16] == "72777b8c06a53a7f"  # as generated before sessions existed
    assert one.sessions == ()
    for probe in one.probes:
        (index,) = probe.evidence
        assert probe.expect[0] in one.messages[index]["content"]
        assert set(probe.meta) == {"planted_turn", "age"}


@pytest.fixture(scope="module")
def corpus() -> list[lab.Transcript]:
    return lab.generate_corpus(4, turns=150, sessions=5, final_probes=30, seed=3)


def test_paraphrased_probes_share_no_content_word_with_their_evidence(corpus):
    asked = 0
    for transcript in corpus:
        for probe in transcript.probes:
            words = content_words(probe.question)
            assert words
            for index in probe.evidence:
                said = transcript.messages[index]["content"]
                assert not words & content_words(said), (probe.question, said)
            asked += 1
    assert asked >= 40


def test_paraphrased_probes_point_at_the_messages_that_answer_them(corpus):
    kinds = set()
    for transcript in corpus:
        last = transcript.sessions[-1]
        for probe in transcript.probes:
            kinds.add(probe.meta["kind"])
            assert probe.after == len(transcript.messages)
            assert probe.meta["session"] < last.number  # facts of earlier sessions
            said = " ".join(transcript.messages[i]["content"] for i in probe.evidence)
            if probe.meta["kind"] != "event":
                assert probe.matches(said)
                continue
            # "yesterday": the date is the session's date minus a day, not said anywhere.
            assert "yesterday" in said.casefold()
            assert not probe.matches(said)
            session = max(
                (s for s in transcript.sessions if s.start <= max(probe.evidence)),
                key=lambda s: s.start,
            )
            assert session.start in probe.evidence
            day_before = session.date - dt.timedelta(days=1)
            assert probe.matches(f"on {day_before.day} {day_before:%B}")
            assert probe.matches(f"{day_before:%B} {day_before.day}th")
    assert {"event", "pet", "colour", "code"} <= kinds


def test_sessions_have_dates_headers_and_speakers(corpus):
    transcript = corpus[0]
    assert [s.number for s in transcript.sessions] == [1, 2, 3, 4, 5]
    assert [s.start for s in transcript.sessions] == [0, 60, 120, 180, 240]
    dates = [s.date for s in transcript.sessions]
    assert dates == sorted(set(dates))
    for session in transcript.sessions:
        opening = transcript.messages[session.start]["content"]
        assert opening.startswith(f"[Session {session.number} · ")
        assert f"{session.date.day} {session.date:%B %Y}]\n" in opening
    names = {(m["role"], m["name"]) for m in transcript.messages}
    assert len(names) == 2
    assert transcript.turns == 150
    assert corpus == lab.generate_corpus(4, turns=150, sessions=5, final_probes=30, seed=3)
    assert "sessions=5, paraphrase=True" in transcript.source


def test_the_corpus_is_big_enough_for_the_issue():
    corpus = lab.generate_corpus()
    assert len(corpus) >= 20
    assert all(t.turns >= 300 and len(t.sessions) >= 2 for t in corpus)
    assert all(t.probes and all(p.evidence for p in t.probes) for t in corpus)


def test_generator_session_options_are_checked():
    for bad in ({"sessions": 0}, {"sessions": 11}, {"final_probes": -1}, {"start": "May"}):
        with pytest.raises(ConfigurationError):
            lab.generate(**{"turns": 10, **bad})
    with pytest.raises(ConfigurationError):
        lab.generate_corpus(0)
    plain = lab.generate(30, seed=1, paraphrase=True)
    assert plain.sessions == ()
    assert all(p.meta["kind"] != "event" for p in plain.probes)


# --- inputs: sessions and evidence --------------------------------------------------------


def _sessions_record(**changes: object) -> dict:
    record = {
        "name": "two-days",
        "speakers": {"user": "Maya", "assistant": "Sam"},
        "sessions": [
            {
                "date": "2024-05-14",
                "messages": [
                    {"role": "user", "content": "Dr. Ng moved house yesterday."},
                    {"role": "assistant", "content": "Oh, nice."},
                ],
            },
            {
                "date": "2024-05-20",
                "messages": [
                    {"role": "user", "content": "Back again."},
                    {"role": "assistant", "content": "Welcome back.", "name": "Sam2"},
                ],
            },
        ],
        "probes": [{"question": "When did Ng relocate?", "regex": "13 May", "evidence": [0]}],
    }
    record.update(changes)
    return record


def test_reads_multi_session_transcripts_with_evidence():
    text = json.dumps(_sessions_record()) + "\n" + json.dumps(_sessions_record(name="b")) + "\n"
    first, second = lab.parse_transcripts(text, name="s.jsonl")
    assert second.name == "b"
    assert first.messages[0] == {
        "role": "user",
        "content": "[Session 1 · Tuesday 14 May 2024]\nDr. Ng moved house yesterday.",
        "name": "Maya",
    }
    assert first.messages[2]["content"].startswith("[Session 2 · Monday 20 May 2024]\n")
    assert first.messages[3]["name"] == "Sam2"  # a message's own name wins
    assert first.sessions == (
        lab.Session(start=0, date=dt.date(2024, 5, 14), number=1),
        lab.Session(start=2, date=dt.date(2024, 5, 20), number=2),
    )
    assert first.probes[0].evidence == (0,)
    assert first.probes[0].after == 4


@pytest.mark.parametrize(
    ("probes", "expected"),
    [
        ([{"question": "q", "expect": "x", "evidence": [4]}], "names message 4, but the conv"),
        ([{"question": "q", "expect": "x", "evidence": [-1]}], "names message -1"),
        ([{"question": "q", "expect": "x", "after": 2, "evidence": [3]}], "said after the probe"),
        ([{"question": "q", "expect": "x", "evidence": 0}], '"evidence" must be a list'),
        ([{"question": "q", "expect": "x", "evidence": ["0"]}], '"evidence" must be a list'),
    ],
)
def test_bad_evidence_is_refused_naming_the_line(probes, expected):
    text = (
        json.dumps(_sessions_record(name="a")) + "\n" + json.dumps(_sessions_record(probes=probes))
    )
    with pytest.raises(ImportFormatError, match=re.escape(expected)) as caught:
        lab.parse_transcripts(text + "\n", name="bad.jsonl")
    assert str(caught.value).startswith("bad.jsonl, line 2: probe 0:")


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"sessions": []}, '"sessions" must be a non-empty list'),
        (
            {"sessions": [{"date": "14/05/2024", "messages": [{"role": "user", "content": "a"}]}]},
            'session 1: "date" must be an ISO date',
        ),
        ({"sessions": [{"messages": []}]}, "session 1 has no messages"),
        ({"sessions": [{"date": "2024-05-14"}]}, "session 1: expected"),
        ({"speakers": ["Maya"]}, '"speakers" must map roles to names'),
    ],
)
def test_bad_sessions_are_refused_naming_the_line(changes, expected):
    text = "\n" + json.dumps(_sessions_record(probes=None, **changes)) + "\n"
    with pytest.raises(ImportFormatError, match=re.escape(expected)) as caught:
        lab.parse_transcripts(text, name="bad.jsonl")
    assert str(caught.value).startswith("bad.jsonl, line 2:")


def test_the_cli_generates_paraphrased_sessions_and_shows_retention():
    from click.testing import CliRunner

    from conversation_memory.cli import cli

    result = CliRunner().invoke(
        cli,
        [
            "lab",
            "--turns",
            "40",
            "--sessions",
            "3",
            "--paraphrase",
            "--final-probes",
            "6",
            "--probe-every",
            "0",
            "-s",
            "truncate",
            "-b",
            "400",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    truncate, full = data["runs"]
    assert "sessions=3, paraphrase=True" in data["meta"]["transcripts"][0]["source"]
    assert full["retention"] == 1.0
    assert full["evidence"] == full["evidence_retained"] >= 3
    assert truncate["retention"] < 1.0
    assert all(p["evidence"] for p in truncate["probe_results"])
