"""The strategy lab: replay conversations through memory strategies and compare them.

::

    from conversation_memory import lab

    results = lab.run(
        lab.generate(turns=200, seed=7),
        strategies=["truncate", "summary", "my_strategies.py:KeepQuestions"],
        budgets=[600, 2000],
    )
    print(results.run("summary", 600).recall)
    results.write("out/")  # results.json, results.csv, turns.csv, timing.json, PNG plots

Each strategy × budget replays every transcript in a conversation of its own
(on a temporary SQLite file) through the public engine, and is measured per
turn: prompt tokens sent (mean, p95, total), summarizer calls and tokens,
estimated cost, budget use, and two memory figures for the *probe*
questions: **evidence retention**, the share of the messages that hold their
answers which the context still carried when they were asked
(:mod:`~conversation_memory.lab.retention`; no model needed), and
**recall**, the share answered right from that context. A full-history
baseline is measured beside them. :mod:`~conversation_memory.lab.runner` explains the
replay and live modes; :mod:`~conversation_memory.lab.results` what is saved
and what determinism covers (everything but wall time, kept in ``timing``).

Inputs (:func:`read_transcripts`): OpenAI-format JSONL (our own export
included, ``{"messages": [...]}`` lines, or multi-session ``{"sessions":
[...]}`` lines) and ShareGPT JSON; probes may name their evidence. With no
data, :func:`generate` writes long conversations with planted facts and
probes (over dated sessions, asked in other words, on request), and
:func:`generate_corpus` many of them.

The model. By default the lab starts ``conversation_memory.testing.ChatServer``
in-process with :func:`~conversation_memory.lab.testmodel.reply` as its
model: a deterministic *reader* that answers a question only with a sentence
found in the request's own messages (so recall measures what the context
kept), an extractive, size-capped *summarizer* (the first sentence of each
folded message, oldest sentences dropped past the cap), and a keyword
*judge*. Neither is tuned to the generator's phrasing. Pass ``client=`` (any
OpenAI-compatible client: OpenAI, llama.cpp, the local model) to measure a
real model instead; results record the model, backend, and the versions of
the prompts and of the lab.
"""

from conversation_memory.lab.generate import GENERATOR_VERSION, generate, generate_corpus
from conversation_memory.lab.inputs import parse_transcripts, read_transcripts
from conversation_memory.lab.results import BASELINE, ProbeResult, Results, RunResult
from conversation_memory.lab.retention import WAYS
from conversation_memory.lab.runner import (
    DEFAULT_BUDGETS,
    DEFAULT_STRATEGIES,
    LAB_VERSION,
    MODES,
    run,
)
from conversation_memory.lab.scoring import JUDGE_PROMPT, SCORING
from conversation_memory.lab.specs import load_strategy
from conversation_memory.lab.testmodel import lab_server
from conversation_memory.lab.transcript import Probe, Session, Transcript

__all__ = [
    "BASELINE",
    "DEFAULT_BUDGETS",
    "DEFAULT_STRATEGIES",
    "GENERATOR_VERSION",
    "JUDGE_PROMPT",
    "LAB_VERSION",
    "MODES",
    "SCORING",
    "WAYS",
    "Probe",
    "ProbeResult",
    "Results",
    "RunResult",
    "Session",
    "Transcript",
    "generate",
    "generate_corpus",
    "lab_server",
    "load_strategy",
    "parse_transcripts",
    "read_transcripts",
    "run",
]
