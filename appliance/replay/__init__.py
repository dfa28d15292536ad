"""An offline Coinbase for tests, the demo and benchmarks: trade tapes, the server, hostile frames."""
