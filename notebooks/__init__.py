"""Makes pytest import this folder's conftest.py as ``notebooks.conftest``, so it does not
shadow ``tests/conftest.py``, which the test modules import as ``conftest``."""
