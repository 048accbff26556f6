"""The engine: the one owner of the model, serving every session with step-level batching.

- `api`: the contract everything above the engine uses (sessions, turns, events, timings). No torch.
- `config` / `build`: the engine's limits (`EngineConfig`), and building an engine from model files
  (`files` says which files: `--model-dir`, models/, or the embedded demo model).
- `sessions`: the asyncio side (`LocalSession`, whose calls post commands); `thread`: the model thread
  that applies them and runs the steps.
- `worker`: the step (schedule -> run -> postprocess) over every live turn; `scheduler` its policy (pure
  Python), `turns` what it keeps per session and per turn, `conversation` multi-turn memory and KV reuse.
- Per-reply state: `reply` (one reply's decoding state and the batched LLM / TTS steps), `schedule` (the
  read/write schedule), `flow_stream` / `flow_cache` / `vocoder` (one reply's streaming flow and HiFT).

Arrows point down only: `voice_agent.serve` -> `voice_agent.engine` -> `voice_agent.model`.
"""
