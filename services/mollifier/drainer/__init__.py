"""The mollifier's drainer: the drain loop (`drainer.py`), its run-store writer (`writer.py`) and
its own process (`app.py`, run by `python -m services.mollifier.drainer`)."""
