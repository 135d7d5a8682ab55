"""What podiam-server and podiam-agent share as processes: flags with environment-variable twins,
logging, and the run-until-signalled process runner.

A package of its own so that the agent depends on it instead of on the server: neither program
imports the other, and this package imports neither (tests/test_layering.py holds that).
"""
