"""schedsearch: ML-guided schedule search for TVM kernels. `import schedsearch` stays cheap: no TVM here."""


def load(path):
    """An exported module (`schedsearch export` / `build`) as a callable on torch tensors: see export.load."""
    from .export import load as _load

    return _load(path)
