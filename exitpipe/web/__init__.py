"""``exitpipe web``: the operator's read-only dashboard.

``views`` turns what the store, the archive and the broker say into what a page shows (pure);
``sources`` reads them (the adapters); ``app`` serves the pages and the JSON API (Starlette,
Jinja2 templates with autoescaping, no JavaScript build). Nothing here writes anywhere: no
requeue, no purge, no store write.
"""
