"""The one owner of the model: the engine contract, the model thread, the step, per-turn state."""
