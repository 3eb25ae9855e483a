class UserError(Exception):
    """A problem the user can fix (bad file, flag, target...): the CLI prints it as one line."""
