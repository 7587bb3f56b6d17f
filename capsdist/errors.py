"""Stands alone: the base of every error a user can fix, imported by every part of capsdist and
by data_tools, so it must depend on nothing. The CLI prints its one-line message and exits 2."""


class UserError(Exception):
    """Bad input (a key, a file, a shard, a checkpoint); the message names it and what to do."""
