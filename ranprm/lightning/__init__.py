"""Thin Lightning shells around the pure stages: the module, callbacks, checkpoint IO, loggers, hardware choices."""
