"""Model code: tensors in, tensors out, batch-first; no asyncio, no sessions."""
