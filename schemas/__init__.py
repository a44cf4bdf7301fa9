"""The contract of exitpipe: codes, statuses, wire models and topology names. Data only, no I/O."""
