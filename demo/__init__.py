"""The local demo (`make demo`, `python -m demo`) and the local stack (`make up`, `python -m
demo.up`). Developer tools, not product: built from the test servers in tests/support (the demo
depends on them, never the other way round), and kept out of the wheel and the images."""
