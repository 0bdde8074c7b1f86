"""Fault tests (issue 20): each starts the real servers it needs as child processes
(`tests/faults/cluster.py`), does real work, injects a fault with signals (SIGKILL,
SIGSTOP/SIGCONT, a server stopped and started again) and checks invariants afterwards."""
