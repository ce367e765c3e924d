"""Shared test harnesses (importable as ``helpers.<module>`` from the test files) and the scripts the
tests launch as subprocesses (``cli_hang.py``, ``ddp_run.py``)."""
