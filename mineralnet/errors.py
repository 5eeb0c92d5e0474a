"""The one exception type that the command line turns into a single clear error line."""


class MineralNetError(Exception):
    """A problem with the user's input (a file, a value, a missing package), stated with its fix.

    The message must name the file or value and say what to do. ``mineralnet`` prints it as
    one line, ``mineralnet: error: <message>``, and exits with status 2.
    """


def fixed_batch_error(path, fixed: int, batch: int) -> MineralNetError:
    """A model file with a fixed batch asked to run another batch size (the benchmark's timing rows)."""
    import os

    return MineralNetError(f"{os.fspath(path)!r} has a fixed batch of {fixed}, not {batch}; "
                           f"export with --dynamic to time other batch sizes")
