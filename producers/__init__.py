"""Producers: the pika publish and topology adapters, the local spool, and the launcher.

Depends on ``schemas`` only. ``connection`` opens every broker connection of exitpipe (one
node or a cluster's list, TLS, heartbeats), consumers' included; ``publisher`` and ``broker``
are the modules that talk to pika, and every pika exception becomes one of
``producers.errors`` at their boundary. ``replicas`` reads where queues live with rabbitmqctl.
"""
