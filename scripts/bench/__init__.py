"""Measurement code of ``scripts/benchmark.py``: timers and memory probes (:mod:`.timing`, :mod:`.probe`), the
networks' plain twins (:mod:`.nets`), classical registration peers (:mod:`.classical`), the five sections
(:mod:`.cost`, :mod:`.accuracy`) and the markdown report (:mod:`.report`)."""
