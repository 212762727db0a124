"""The job engine (queue, runner, recovery) and one module per job kind."""
