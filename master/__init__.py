"""The master: job state machine, scheduler and the loop that serves agents and clients."""
