"""`voice-agent loadtest`: simulated callers over the network, measured as they hear it.

records.py   the data: one spoken question (`Utterance`) and one measured turn (`TurnRecord`).
corpus.py    the bundled spoken questions (corpus/) or the user's own (`--speech DIR`).
dialects.py  one small client per wire protocol (native, OpenAI Realtime, Twilio) over `websockets`.
caller.py    one caller: streams speech in real time, measures each turn on its monotonic clock.
run.py, stats.py, report.py   the command: callers, steps and ramps; percentiles and SLOs; JSON and plots.
"""
