"""Producers: the pika publish and topology adapters, the local spool, and the launcher.

Depends on ``schemas`` only. ``publisher`` and ``broker`` are the only modules that talk to
pika; every pika exception becomes one of ``producers.errors`` at their boundary.
"""
