r"""The invertnet application: the ``invertnet`` command line, run configs (``configs/*.json``), run folders and
the registry of model kinds. One client of the library; the library never imports it."""
