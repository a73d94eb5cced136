"""Small pipelines built in-process, offline: the command line's embedded default model and the
tests' pipelines (:mod:`.tiny`). Not an adapter and not part of the attention line; importing
``fastdit`` does not import it."""
