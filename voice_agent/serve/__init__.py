"""The network edge: routes, connections, turn-taking, VAD, wire protocols."""
