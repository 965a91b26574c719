"""The factory's records and the store that reads and writes them.

Importing anything from this package registers every table (the build's in storage.models,
`longwriter eval`'s in storage.eval_models, `longwriter pairs`' in storage.pair_models) on
SQLModel's metadata, so `Store(url)` creates all of them whichever module was imported first:
a table used to exist only if its module happened to be imported before the store opened.
"""

from storage import eval_models, models, pair_models

__all__ = ["eval_models", "models", "pair_models"]
