"""The consuming side: pure policy and state machine, the store, and the daemons around them."""
