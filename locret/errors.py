class LocretError(Exception):
    """A problem with the user's input (checkpoint, settings, prompt). Scripts print it as one line."""
