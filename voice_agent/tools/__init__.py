"""Commands besides the server: generate, bench, download."""
